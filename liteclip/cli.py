"""Every command line of the project: `liteclip train | predict | index | search | serve | eval-zeroshot |
eval-retrieval | wise-ft | average | export | data ...`. `train.py` and `python -m liteclip.data` are thin doors into this module.

Each command imports what it needs when it runs, so parsing and `--help` never load torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from liteclip.errors import InputError, LiteclipError

DEFAULT_CONFIG = "configs/demo.yaml"


def _count_at_least(minimum: int, meaning: str):
    """An argparse type for whole numbers >= minimum: a clear usage error instead of a traceback later."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {meaning}")
        return value
    return parse


_positive_int = _count_at_least(1, "at least 1")


def _port(text: str) -> int:
    """An argparse type for a TCP port: 1 to 65535."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; ports go from 1 to 65535")
    return value
_non_negative_int = _count_at_least(0, "0 (decode in this process) or more")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from liteclip.config import load_config
    from liteclip.train.preemption import TrainingStopped
    from liteclip.train.loop import fit

    config = load_config(args.config, args.set)
    resume_command = shlex.join([*args.invoked_as, "--config", args.config, *(["--set", *args.set] if args.set
                                                                              else []), "--resume", "auto"])
    try:
        fit(config, resume=args.resume, show_progress=not args.no_progress)
    except TrainingStopped as stopped:
        print(f"liteclip train: {stopped}\nresume: {resume_command}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        last = Path(config.train.output_dir) / "last.pt"
        where = f"the last checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        print(f"liteclip train: interrupted; {where}\nresume: {resume_command}", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process says it
        print(_next_steps(config))
    return 0


def _next_steps(config) -> str:
    """What the end of a training run prints: where the model went, one command that uses it, the notebook."""
    model_dir = config.train.model_dir
    image, labels = _example_query(config)
    predict = shlex.join(["liteclip", "predict", image, "--model-dir", str(model_dir), "--labels", *labels])
    return "\n".join([
        f"\nDone: the best model is in {model_dir}/ (config, weights, tokenizer, model card).",
        f"Try it:     {predict}",
        "In Python:  ZeroShotPipeline(" + repr(str(model_dir)) + ").predict(image, labels)",
        "Notebook:   jupyter lab notebooks/inference.ipynb   (zero-shot bars, search, neighbours; "
        "pip install jupyterlab)",
    ])


def _example_query(config) -> tuple[str, list[str]]:
    """A test image and its own label among two others where the dataset has labels (the demo), else a
    placeholder; a training that finished is never failed by its closing message."""
    from liteclip.data import zero_shot_task

    try:
        task = zero_shot_task(config.data, "test")
    except (OSError, ValueError):
        task = None
    if task is None or not task.items:
        return "path/to/photo.jpg", ["a photo of a dog", "a photo of a cat", "a photo of a beach"]
    item = task.items[0]
    right = task.labels[item.label]
    return str(item.image_path), [right, *[label for label in task.labels if label != right][:2]]


def _pipeline(args: argparse.Namespace, templates: list[str] | None = None):
    from liteclip.pipeline import ZeroShotPipeline

    return ZeroShotPipeline(args.model_dir, device=args.device, templates=templates,
                            trust_remote_code=args.trust_remote_code)


def _emit(args: argparse.Namespace, data, table_rows: list[tuple], header: tuple) -> None:
    """JSON for scripts, an aligned table for people."""
    if args.json:
        print(json.dumps(data, indent=2))
        return
    widths = [max(len(str(h)), *(len(str(r[i])) for r in table_rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in table_rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def _cmd_predict(args: argparse.Namespace) -> int:
    from liteclip.data.image_folder import list_images

    images = []
    for item in args.images:
        found = [str(path) for path in list_images(item)] if Path(item).is_dir() else [item]
        if not found:
            raise InputError(f"{item}: no image files in this folder or below it")
        images += found
    pipeline = _pipeline(args, args.template)
    if len(images) == 1:  # one image that does not decode is an error, not an empty table
        results = [pipeline.predict(images[0], args.labels, top_k=args.top_k)]
    else:  # among several, it is skipped (and logged) and the others are classified
        results = pipeline.predict(images, args.labels, top_k=args.top_k, batch_size=args.batch_size,
                                   num_workers=args.num_workers)
    data = [{"image": image, "probabilities": pipeline.probabilities,
             "predictions": [{"label": l, "probability": p} for l, p in result]}
            for image, result in zip(images, results)]
    rows = [(image, label, f"{prob * 100:.2f}%") for image, result in zip(images, results) for label, prob in result]
    rows += [(image, "(skipped: does not decode)", "") for image, result in zip(images, results) if not result]
    header = "probability" if pipeline.probabilities == "softmax" else "probability (sigmoid, each label alone)"
    _emit(args, data, rows, ("image", "label", header))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from liteclip.search.image_search import ImageSearch

    search = ImageSearch(_pipeline(args))
    encoded = search.index(args.folder, args.index, batch_size=args.batch_size, num_workers=args.num_workers,
                           chunk_size=args.chunk_size)
    data = {"index": str(args.index), "images": len(search), "encoded": encoded,
            "skipped": [{"path": str(row.file), "reason": row.reason} for row in search.skipped]}
    _emit(args, data, [(str(args.index), len(search), encoded, len(search.skipped))],
          ("index", "images", "newly encoded", "skipped (does not decode)"))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from liteclip.search.image_search import ImageSearch

    search = ImageSearch(_pipeline(args))
    if not Path(args.index).is_file():
        raise FileNotFoundError(f"no index at {args.index}; build one with "
                                f"`liteclip index FOLDER --index {args.index}`")
    search.load(args.index)
    if not args.image and not args.query:
        raise InputError("give a query (text, image paths, terms joined by + and -) or --image FILE")
    hits = search.similar(args.image, args.top_k) if args.image else search.query(args.query, args.top_k)
    if args.print0 or args.paths:  # for xargs: nothing but the paths, best first, byte for byte as the OS has them
        end = b"\0" if args.print0 else b"\n"  # --print0 for xargs -0: a newline in a file name cannot split it
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(os.fsencode(path) + end for path, _ in hits))
        sys.stdout.buffer.flush()
        return 0
    if not hits:
        raise InputError(f"none of the images in {args.index} is still there (moved or deleted since they were "
                         f"indexed); run `liteclip index` again")
    data = [{"path": str(path), "score": score} for path, score in hits]
    _emit(args, data, [(str(path), f"{score:.4f}") for path, score in hits], ("path", "score"))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    from liteclip.search.image_search import ImageSearch
    from liteclip.search.serve import serve

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise InputError("liteclip serve needs its web framework: pip install -e '.[serve]'")
    if args.folder is None and not Path(args.index).is_file():
        raise FileNotFoundError(f"no index at {args.index}; build one with `liteclip index FOLDER --index "
                                f"{args.index}`, or pass --folder FOLDER to index it while the page serves")
    if args.folder is not None and not Path(args.folder).is_dir():
        raise FileNotFoundError(f"--folder {args.folder} is not a folder")
    search = ImageSearch(_pipeline(args))
    if Path(args.index).is_file():
        try:
            search.load(args.index)
        except InputError:  # another model's index: the background indexing rebuilds it
            if args.folder is None:
                raise
    serve(search, Path(args.index), args.host, args.port, Path(args.folder) if args.folder else None,
          tuple(args.allow_host))
    return 0


def _cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from liteclip.data.image_folder import read_image_folder
    from liteclip.evaluation import evaluate_zero_shot

    pipeline = _pipeline(args)
    task = read_image_folder(args.folder, args.template)
    result = evaluate_zero_shot(pipeline.model, task, args.batch_size, pipeline.device)
    rows = [(name, v["count"], f"{v['top1']:.2f}") for name, v in result["per_class"].items()]
    rows.append(("ALL", sum(v["count"] for v in result["per_class"].values()),
                 "  ".join(f"{k}={v:.2f}" for k, v in result.items() if k.startswith("top"))))
    _emit(args, result, rows, ("class", "images", "top1 %"))
    return 0


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from liteclip.config import load_config
    from liteclip.data import load_splits
    from liteclip.evaluation import evaluate_retrieval
    from liteclip.pretrained import read_model_config

    pipeline = _pipeline(args)
    if args.config or args.set:  # --set alone applies on top of the config the model was trained with
        data_config = load_config(args.config or Path(args.model_dir) / "config.yaml", args.set).data
    else:
        data_config = read_model_config(args.model_dir).data
    split = load_splits(data_config, generate=False)[args.split]
    metrics = evaluate_retrieval(pipeline.model, split, args.batch_size, pipeline.device)
    rows = [(k, f"{v:.2f} %") for k, v in metrics.items() if k != "loss"]
    rows.append(("contrastive loss", f"{metrics['loss']:.4f}"))
    _emit(args, metrics, rows, ("metric", args.split))
    return 0


def _load_for_averaging(name: str, device: str, trust_remote_code: bool):
    from liteclip.model import CLIP

    return CLIP.from_pretrained(name, device=device, trust_remote_code=trust_remote_code)


def _scoring_config(config_path: str | None, model_dir: str, sets: list[str]):
    """The config models are scored with: --config, else the fine-tuned model's own (its data and retention)."""
    from liteclip.config import load_config

    path = config_path or str(Path(model_dir) / "config.yaml")
    if not Path(path).is_file():
        raise InputError(f"no config to score models with: {path} does not exist; pass --config CONFIG.yaml "
                         f"with the data (its val split) and train.retention sets")
    return load_config(path, sets)


def _refuse_writing_over_inputs(out: str, inputs: list[str], what: str) -> None:
    """Before any model is loaded: --out is neither an input nor in or around one, and saving there would be
    allowed (no file of the user's under a model file's name)."""
    from liteclip.files import refuse_overlap
    from liteclip.pretrained import check_model_folder

    for source in inputs:
        if Path(source).is_dir():
            refuse_overlap(out, source, what)
    check_model_folder(out)


def _new_plot_path(path: str | None, inputs: list[str], out: str) -> Path | None:
    """--plot, checked before any work: a new .png file, in a folder (or one to make), not inside an input model
    or the --out folder."""
    if path is None:
        return None
    plot = Path(path)
    if plot.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: the plot is a PNG; give a path ending in .png")
    if plot.exists() or plot.is_symlink():
        raise InputError(f"--plot {path} exists; liteclip does not write over a file it did not make: choose a new "
                         f"path")
    for parent in [plot.parent, *plot.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--plot {path}: {parent} is a file, not a folder")
    for folder in [*inputs, out]:
        if Path(folder).is_dir() or folder == out:
            inside = plot.resolve().parent
            target = Path(folder).resolve()
            if inside == target or target in inside.parents:
                raise InputError(f"--plot {path} is inside the model folder {folder}; put the plot elsewhere")
    return plot


def _cmd_wise_ft(args: argparse.Namespace) -> int:
    from liteclip.train.weight_averaging import (ModelScorer, describe_kept, interpolate, plot_alphas, summary_rows,
                                                 weights_without_counterpart)

    _refuse_writing_over_inputs(args.out, [args.start, args.finetuned], "wise-ft")
    plot = _new_plot_path(args.plot, [args.start, args.finetuned], args.out)
    device = args.device or "cpu"
    alphas = sorted(set(args.alpha))
    scorer = None
    if len(alphas) > 1 or args.config or plot:
        scorer = ModelScorer(_scoring_config(args.config, args.finetuned, args.set), device, args.batch_size)
        scorer.check_rule(args.pick)
    start = _load_for_averaging(args.start, device, args.trust_remote_code)
    finetuned = _load_for_averaging(args.finetuned, device, args.trust_remote_code)
    weights_without_counterpart(start, finetuned)  # a mismatch fails here, before any scoring
    _warn_on_other_preprocessing([args.start, args.finetuned], [start, finetuned])
    rows, models, kept = [], {}, []
    for alpha in alphas:
        model, kept = interpolate(start, finetuned, alpha)
        if scorer is not None:
            rows.append((alpha, scorer(model)))
        models[alpha] = model
    logging.getLogger("liteclip").info("wise-ft: %s", describe_kept(kept))
    chosen = alphas[0] if len(alphas) == 1 else max(rows, key=lambda row: row[1].by(args.pick))[0]
    saved = models[chosen]
    metrics = {"wise_ft_alpha": chosen}
    if rows:
        scores = dict(rows)[chosen]
        metrics.update({"val_mean_recall": scores.val} if scores.val is not None else {})
        metrics.update(scores.retention)
    full_config = _saved_config(args.finetuned)
    saved.save_pretrained(args.out, full_config=full_config, metrics=metrics)
    drawn = plot_alphas(rows, plot) if plot is not None and rows else None
    data = {"out": args.out, "alpha": chosen, "pick": args.pick if len(alphas) > 1 else None,
            "kept_fine_tuned": kept, "plot": str(drawn) if drawn else None,
            "alphas": [{"alpha": alpha, "val_mean_recall": scores.val, **scores.retention} for alpha, scores in rows]}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if rows:
        header, table = summary_rows(rows)
        _emit(args, data, [tuple(row) for row in table], tuple(header))
    print(f"wrote alpha {chosen:g}{f' (best by --pick {args.pick})' if len(alphas) > 1 else ''} to {args.out}"
          + (f"; plot: {drawn}" if drawn else ""))
    return 0


def _warn_on_other_preprocessing(names: list[str], models: list) -> None:
    """The written model takes the fine-tuned (or first) model's preprocessing; say so where the inputs differ."""
    for name, model in zip(names[1:], models[1:]):
        if model.data_config != models[0].data_config:
            logging.getLogger("liteclip").warning(
                "%s and %s preprocess images differently (%s against %s); the written model keeps %s's",
                names[0], name, models[0].data_config, model.data_config, names[-1] if len(names) == 2 else names[0])


def _saved_config(model_dir: str):
    """A liteclip folder's full config (its data and training sections), or None for other models."""
    from liteclip.pretrained import read_model_config

    return read_model_config(model_dir) if (Path(model_dir) / "config.yaml").is_file() else None


def _cmd_average(args: argparse.Namespace) -> int:
    from liteclip.train.weight_averaging import ModelScorer, average, greedy_soup

    _refuse_writing_over_inputs(args.out, args.models, "average")
    if len(set(map(str, (Path(name).resolve() for name in args.models)))) != len(args.models):
        logging.getLogger("liteclip").warning("a model is named twice: it counts twice in the average")
    device = args.device or "cpu"
    scorer = None
    if args.greedy:
        scorer = ModelScorer(_scoring_config(args.config, args.models[0], args.set), device, args.batch_size)
        scorer.check_rule(args.pick)
    models = [_load_for_averaging(name, device, args.trust_remote_code) for name in args.models]
    _warn_on_other_preprocessing(args.models, models)
    metrics: dict[str, float] = {}
    if scorer is not None:
        scores = [scorer(model).by(args.pick) for model in models]
        soup, chosen = greedy_soup(models, scores, lambda model: scorer(model).by(args.pick))
        names = [args.models[i] for i in chosen]
        metrics["soup_score"] = scorer(soup).by(args.pick) if len(chosen) > 1 else scores[chosen[0]]
    else:
        soup, names = average(models), list(args.models)
    soup.save_pretrained(args.out, full_config=_saved_config(args.models[0]), metrics=metrics or None)
    data = {"out": args.out, "models": names, "greedy": args.greedy, **metrics}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"wrote the {'greedy' if args.greedy else 'uniform'} average of {len(names)} model(s) to {args.out}: "
              + ", ".join(names))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from liteclip.files import written_names
    from liteclip.export import export_onnx, export_timm
    from liteclip.model import CLIP

    model = CLIP.from_pretrained(args.model_dir, trust_remote_code=args.trust_remote_code)
    out = args.out or f"{str(args.model_dir).rstrip('/')}_{args.format}"
    written = export_onnx(model, out, args.opset) if args.format == "onnx" else export_timm(model, out)
    print(f"{args.format} export of {args.model_dir} written to {written}: "
          + ", ".join(sorted(written_names(Path(written)))))
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from liteclip.data.download import download_dataset

    pins = dict(item.split("=", 1) for item in args.sha256)
    root = download_dataset(args.name, args.root, args.base_url, pins, keep_archives=args.keep_archives)
    print(f"{args.name} ready in {root}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from liteclip.data.download import check_dataset
    from liteclip.data.shards import check_shards

    if args.root.endswith(".tar"):  # a shard or a brace pattern of shards, as data.shards names them
        bad = check_shards(args.root)
    else:
        bad = check_dataset(args.root, args.captions_file, args.image_column, args.caption_column, args.split_column,
                            encoding=args.encoding)
    for row in bad:
        print(row)
    print(f"{len(bad)} bad row(s) in {args.root}" if bad else f"{args.root}: no problems found")
    return 1 if bad else 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from liteclip.data.download import prepare_images

    before, after, skipped = prepare_images(args.source, args.destination, args.size)
    saved = 100.0 * (1 - after / before) if before else 0.0
    for row in skipped:
        print(f"skipped {row}")
    print(f"images: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({saved:.0f}% smaller); "
          f"{len(skipped)} undecodable image(s) left out; set data.root={args.destination} to train on the copy")
    return 0


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from liteclip.config import DataConfig
    from liteclip.data import demo as demo_data, load_splits
    from liteclip.data.shards import write_shards

    demo: dict[str, int] = {}
    marker = Path(args.source) / demo_data.MARKER
    if args.dataset == "demo" and marker.is_file():  # shard the demo data that is there, whatever its settings
        recorded = json.loads(marker.read_text())
        demo = {f"demo_{key}": recorded[key] for key in ("num_images", "image_size", "seed")}
    config = DataConfig(dataset=args.dataset, root=args.source, captions_file=args.captions_file,
                        image_column=args.image_column, caption_column=args.caption_column,
                        split_column=args.split_column, encoding=args.encoding, **demo)
    splits = load_splits(config, generate=args.dataset == "demo")  # the demo is generated on first use, as in training
    for split in args.split or ("train", "val", "test"):
        if not splits[split]:
            print(f"{split}: no images, no shards written")
            continue
        pattern, count = write_shards(splits[split], Path(args.destination), split, args.shard_size,
                                      seed=args.seed if split == "train" else None)
        key = "shards" if split == "train" else f"{split}_shards"
        print(f"{split}: {count} images -> data.{key}: {pattern}"
              + (f"  (data.epoch_samples: {count})" if split == "train" else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liteclip", description="Train and use small CLIP models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_train, _add_predict, _add_index, _add_search, _add_serve, _add_eval_zeroshot,
                        _add_eval_retrieval, _add_wise_ft, _add_average, _add_export, _add_data):
        add_command(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config",
                                description="Train a CLIP model. Example: liteclip train --config configs/demo.yaml "
                                            "--set optim.lr=1e-4 train.epochs=3")
    train.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted overrides applied on top of the config, e.g. optim.lr=1e-4 data.batch_size=32")
    train.add_argument("--resume", default=None, metavar="PATH|auto",
                       help="continue from a checkpoint, or 'auto' for the run directory's last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    train.set_defaults(handler=_cmd_train)


def _add_inference_command(commands: argparse._SubParsersAction, name: str, help_text: str, handler,
                           description: str) -> argparse.ArgumentParser:
    """A subcommand that loads a saved model: --model-dir, --device and --json in common."""
    command = commands.add_parser(name, help=help_text, description=description)
    command.add_argument("--model-dir", default="model", help="model directory from save_pretrained (./model)")
    command.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    command.add_argument("--json", action="store_true", help="machine-readable output")
    _add_trust_remote_code(command)
    command.set_defaults(handler=handler)
    return command


def _add_trust_remote_code(command: argparse.ArgumentParser) -> None:
    command.add_argument("--trust-remote-code", action="store_true",
                         help="let a model folder that carries Python code of its own run it (only for folders "
                              "you trust; without it such a folder is refused)")


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = _add_inference_command(
        commands, "predict", "zero-shot classify images among text labels", _cmd_predict,
        "Example: liteclip predict cat.jpg --labels 'a photo of a dog' 'a photo of a cat'")
    predict.add_argument("images", nargs="+", help="image files, or folders (every image under them)")
    predict.add_argument("--labels", nargs="+", required=True, help="candidate labels (at least 2)")
    predict.add_argument("--template", action="append", help="prompt template with {}, repeatable")
    predict.add_argument("--top-k", type=_positive_int, default=None, help="show only the k most likely labels")
    predict.add_argument("--batch-size", type=_positive_int, default=64)
    predict.add_argument("--num-workers", type=_non_negative_int, default=0,
                         help="processes decoding images (default 0)")


def _add_index(commands: argparse._SubParsersAction) -> None:
    index = _add_inference_command(commands, "index", "embed every image under a folder for search", _cmd_index,
                                   "Example: liteclip index photos/ --index photos.index")
    index.add_argument("folder")
    index.add_argument("--index", default="liteclip.index", help="index file (re-indexing reuses unchanged files)")
    index.add_argument("--batch-size", type=_positive_int, default=64)
    index.add_argument("--num-workers", type=_non_negative_int, default=0,
                       help="processes decoding images (default 0)")
    index.add_argument("--chunk-size", type=_positive_int, default=4096,
                       help="images encoded between writes of the unfinished index (default 4096)")
    index.add_argument("--no-faiss", action="store_true", help=argparse.SUPPRESS)  # older scripts: no FAISS copy now


def _add_search(commands: argparse._SubParsersAction) -> None:
    search = _add_inference_command(
        commands, "search", "text-to-image (or image-to-image) search in an index", _cmd_search,
        "Examples: liteclip search 'a boy jumping with skateboard' --index photos.index; weighted terms: "
        "liteclip search '2:golden retriever + ./pool.jpg - grass' --index photos.index")
    search.add_argument("query", nargs="?", help="text, an image path, or weighted terms joined by + and - "
                                                 "('2:dog + ./pool.jpg - grass')")
    search.add_argument("--paths", action="store_true", help="print only the paths, best first, one a line")
    search.add_argument("--print0", action="store_true",
                        help="print only the paths, each ended by a NUL byte (for xargs -0: safe for any file name)")
    search.add_argument("--image", help="find images similar to this image instead")
    search.add_argument("--index", default="liteclip.index")
    search.add_argument("--top-k", type=_positive_int, default=5)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = _add_inference_command(
        commands, "serve", "a local web page to search, find similar and label the photos of an index", _cmd_serve,
        "Example: liteclip index photos/ --index photos.index && liteclip serve --index photos.index, then open "
        "http://127.0.0.1:8765/ (pip install -e '.[serve]')")
    serve.add_argument("--index", default="liteclip.index", help="the index `liteclip index` wrote")
    serve.add_argument("--folder", default=None,
                       help="index this folder's new and changed images in the background while serving")
    serve.add_argument("--host", default="127.0.0.1",
                       help="127.0.0.1 (this machine only, the default); 0.0.0.0 shows the photos to the network, "
                            "to those given the address with its access token")
    serve.add_argument("--port", type=_port, default=8765)
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name the page may be opened by (repeatable; a name of your own network "
                            "for 0.0.0.0); requests for any other name are refused, as DNS rebinding would send")


def _add_eval_zeroshot(commands: argparse._SubParsersAction) -> None:
    zeroshot = _add_inference_command(
        commands, "eval-zeroshot", "zero-shot accuracy on an ImageFolder directory", _cmd_eval_zeroshot,
        "Example: liteclip eval-zeroshot pets/ --template 'a photo of a {}.'")
    zeroshot.add_argument("folder", help="root/<class name>/*.jpg")
    zeroshot.add_argument("--template", action="append", help="prompt template with {}, repeatable")
    zeroshot.add_argument("--batch-size", type=_positive_int, default=64)


def _add_eval_retrieval(commands: argparse._SubParsersAction) -> None:
    retrieval = _add_inference_command(
        commands, "eval-retrieval", "retrieval recall of a model on a captions dataset split", _cmd_eval_retrieval,
        "Example: liteclip eval-retrieval --split test  (data as in the model's config)")
    retrieval.add_argument("--config", default=None, help="take the data section from this YAML instead")
    retrieval.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    retrieval.add_argument("--split", default="test", choices=["train", "val", "test"])
    retrieval.add_argument("--batch-size", type=_positive_int, default=64)


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} must be between 0 (the start) and 1 (the fine-tuned model)")
    return value


def _add_weight_space_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--out", required=True, help="the model folder to write (a new or empty folder, or one "
                                                      "liteclip saved)")
    command.add_argument("--config", default=None, help="the YAML whose val split and train.retention sets score "
                                                        "the models (default: the fine-tuned model's config.yaml)")
    command.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides on that config")
    command.add_argument("--pick", choices=["balanced", "val", "retention"], default="balanced",
                         help="how the best is chosen: val (in-domain), retention (mean of the retention sets), "
                              "balanced (the mean of the two; default)")
    command.add_argument("--batch-size", type=_positive_int, default=64)
    command.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    command.add_argument("--json", action="store_true", help="machine-readable output")
    _add_trust_remote_code(command)


def _add_wise_ft(commands: argparse._SubParsersAction) -> None:
    wise_ft = commands.add_parser(
        "wise-ft", help="interpolate a fine-tuned model with the model it started from (WiSE-FT)",
        description="Write (1 - alpha) * START + alpha * FINETUNED as a model folder (Wortsman et al. 2022). With "
                    "several alphas, each is scored on the val split and the train.retention sets and the one "
                    "--pick names is written. Example: liteclip wise-ft openai/clip-vit-base-patch32 model "
                    "--alpha 0 0.25 0.5 0.75 1 --out model_wise --plot wise_ft.png")
    wise_ft.add_argument("start", help="what the fine-tuning started from: a liteclip or Hugging Face folder, or "
                                       "open_clip:ARCH@TAG_OR_FILE")
    wise_ft.add_argument("finetuned", help="the fine-tuned liteclip model folder")
    wise_ft.add_argument("--alpha", type=_alpha, nargs="+", default=[0.5],
                         help="0: the start, 1: the fine-tuned model (default 0.5); several: scored, best kept")
    wise_ft.add_argument("--plot", default=None, help="a new PNG of in-domain against retention by alpha")
    _add_weight_space_options(wise_ft)
    wise_ft.set_defaults(handler=_cmd_wise_ft)


def _add_average(commands: argparse._SubParsersAction) -> None:
    average = commands.add_parser(
        "average", help="average models fine-tuned from one start (a model soup)",
        description="Write the average of the weights of MODELS as a model folder (Wortsman et al. 2022): uniform, "
                    "or with --greedy, adding models best first while the val score of the average does not drop. "
                    "Example: liteclip average run_a/model run_b/model run_c/model --greedy --out soup")
    average.add_argument("models", nargs="+", help="liteclip model folders fine-tuned from one start")
    average.add_argument("--greedy", action="store_true", help="the greedy soup, by --pick's score")
    _add_weight_space_options(average)
    average.set_defaults(handler=_cmd_average)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a saved model as ONNX files or its image tower as a timm checkpoint",
        description="Examples: liteclip export model --format onnx --out model_onnx (needs the export extra: pip "
                    "install 'liteclip[export]'); liteclip export model --format timm --out model_timm")
    export.add_argument("model_dir", help="model directory from save_pretrained")
    export.add_argument("--format", required=True, choices=["onnx", "timm"])
    export.add_argument("--out", default=None, help="output directory (default MODEL_DIR_FORMAT)")
    export.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default 17)")
    _add_trust_remote_code(export)
    export.set_defaults(handler=_cmd_export)


def _add_captions_file_arguments(command: argparse.ArgumentParser, captions_help: str) -> None:
    """How to read a captions file, as the data section's keys of the same names say it."""
    command.add_argument("--captions-file", default=None, help=captions_help)
    command.add_argument("--image-column", default="image")
    command.add_argument("--caption-column", default="caption")
    command.add_argument("--split-column", default=None)
    command.add_argument("--encoding", default="utf-8", help="text encoding of the captions file (data.encoding)")


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="download, check, prepare and shard datasets",
                               description="Dataset tools (also `python -m liteclip.data ...`).")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    download = data_commands.add_parser(
        "download", help="download, verify and extract a dataset",
        description="Example: python -m liteclip.data download flickr8k --root data/flickr8k")
    download.add_argument("name", choices=["flickr8k"])
    download.add_argument("--root", required=True, help="where the dataset goes")
    download.add_argument("--base-url", default=None, help="a mirror holding the same archive names")
    download.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                          help="pin an archive's SHA-256 (repeatable)")
    download.add_argument("--keep-archives", action="store_true", help="keep the zip files after extraction")
    download.set_defaults(handler=_cmd_data_download)
    check = data_commands.add_parser(
        "check", help="report every bad row of a dataset, or every bad sample of shards; exit 1 if any",
        description="Examples: python -m liteclip.data check data/flickr8k; python -m liteclip.data check "
                    "'data/shards/train-{000000..000009}.tar' (quoted, as data.shards names them)")
    check.add_argument("root", help="a dataset folder, or a shard pattern ending in .tar")
    _add_captions_file_arguments(check, "CSV/TSV relative to ROOT (default: Flickr8K layouts)")
    check.set_defaults(handler=_cmd_data_check)
    prepare = data_commands.add_parser("prepare", help="write a resized copy of a dataset folder",
                                       description="Example: python -m liteclip.data prepare data/flickr8k "
                                                   "data/flickr8k_256 --size 256")
    prepare.add_argument("source")
    prepare.add_argument("destination")
    prepare.add_argument("--size", type=_positive_int, default=256, help="shorter side in pixels (default 256)")
    prepare.set_defaults(handler=_cmd_data_prepare)
    shard = data_commands.add_parser(
        "shard", help="write a dataset as webdataset tar shards (data.dataset: webdataset)",
        description="Example: python -m liteclip.data shard data/flickr8k data/flickr8k_shards --shard-size 1000. "
                    "Writes DST/train-000000.tar, ..., val-*.tar and test-*.tar, and prints the config lines.")
    shard.add_argument("source", help="the dataset's root (data.root)")
    shard.add_argument("destination")
    shard.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard (default 1000)")
    shard.add_argument("--dataset", choices=["demo", "flickr8k", "csv"], default="flickr8k",
                       help="how to read SOURCE (data.dataset; default flickr8k)")
    _add_captions_file_arguments(shard, "csv: the captions file, relative to SOURCE")
    shard.add_argument("--split", action="append", choices=["train", "val", "test"],
                       help="only this split (repeatable; default all three)")
    shard.add_argument("--seed", type=int, default=0, help="the training images' shuffle before sharding")
    shard.set_defaults(handler=_cmd_data_shard)


def _invocation(command: str) -> list[str]:
    """How this command was started, to print a command that repeats it: `python train.py`, `python -m liteclip
    train`, or `liteclip train` (also when main() is called from Python)."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("liteclip")
    if started.name == "train.py":
        return ["python", str(started)]
    if started.name == "__main__.py":
        return ["python", "-m", "liteclip", command]
    return ["liteclip", command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and not (args.query or args.image):
        parser.error("search needs a text query or --image PATH")
    _setup_logging(args.verbose)
    args.invoked_as = _invocation(args.command)
    with contextlib.suppress(AttributeError, ValueError):  # a file name that is not UTF-8 prints as its bytes, as ls
        sys.stdout.reconfigure(errors="surrogateescape")  # does, rather than stopping the table halfway
    try:
        return args.handler(args)
    except (LiteclipError, OSError) as error:
        # problems a user can fix (liteclip's own, and files that are missing, unreadable or full): a one-line
        # reason, not a traceback from deep inside a library; anything else is a bug and keeps its traceback
        print(f"liteclip {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
