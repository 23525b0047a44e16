"""Real photos, real pretrained towers: a liteclip recipe on Flickr8K, and open_clip trained on the same towers and
data, both scored by liteclip's evaluator on the val and test splits.

    python -m benchmarks.flickr8k --root $REALDATA_HOME/flickr8k_raw \\
        --image-tower tf_efficientnet_lite0 \\
        --image-weights $REALDATA_HOME/weights/efficientnet-lite0/tf_efficientnet_lite0.timm.safetensors \\
        --text-tower $REALDATA_HOME/weights/paraphrase-MiniLM-L3-v2/hf [--recipe configs/flickr8k.yaml] [--set ...]

liteclip trains through the same fit() as train.py: the recipe YAML, with the towers, the data root and a locked
image tower with cached features (LiT) set on top, then whatever --set adds. The wall time is split into feature
caching, training, evaluation (every epoch's validation and the final test) and the rest (building, export).

open_clip (open-clip-torch, with its open_clip_train harness) trains the same towers: the timm tower with the same
weights, the same Hugging Face text tower with mean pooling, linear projections of the same size, `--lock-image`,
the same epochs, batch size, learning rate, weight decay and warmup, with its own CSV loader, augmentation, loss and
the precision it would pick (amp_bf16 where the CPU has native bf16, else fp32). Its loader reads one row per
(image, caption) pair; by default (--open-clip-captions one) its CSV holds, for each epoch, every training image once
with one caption, so it trains on the same number of pairs as liteclip's one caption per image per epoch; with
`all` every caption is a row, five times the pairs per epoch. Its in-training validation pairs each image with one
caption row, so its own recall is not comparable; both models are scored here by liteclip's multi-caption evaluator
on their own embeddings. open_clip has one learning rate for everything: the recipe's `optim.lr` (liteclip's recipe
gives the pretrained towers `optim.tower_lr`), or --open-clip-lr, to give it its own best rate on the val split.

Flickr8K is research-only: this script reads it from --root and writes only under --out (default: a folder
liteclip_bench beside --root) and liteclip's feature cache under --root, never into the repository. Read the test
split once per recipe, at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
RECALL_KEYS = [f"{direction}_R@{k}" for direction in ("text_to_image", "image_to_text") for k in (1, 5, 10)]


class Stopwatch:
    """Seconds spent inside named phases, summed over calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, module: Any, attribute: str, name: str) -> None:
        """Times every call of module.attribute as phase `name` (the benchmark's own view into fit)."""
        original: Callable = getattr(module, attribute)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(module, attribute, timed)


# ----------------------------------------------------------------------------------------------------- liteclip


def liteclip_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    return [f"data.root={args.root}", "data.dataset=flickr8k", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", f"model.image.name={args.image_tower}",
            f"model.image.weights_file={args.image_weights}", "model.image.tune=locked",
            "train.cache_image_features=true", f"model.text.name={args.text_tower}", f"train.epochs={args.epochs}",
            f"train.output_dir={out / 'liteclip' / 'run'}", f"train.model_dir={out / 'liteclip' / 'model'}",
            *args.set]


def run_liteclip(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from liteclip import evaluation
    from liteclip.train import loop as training
    from liteclip.config import load_config
    from liteclip.data import load_splits
    from liteclip.model import CLIP

    config = load_config(args.recipe, liteclip_overrides(args, out))
    clock = Stopwatch()
    clock.wrap(training, "use_feature_cache", "caching")
    clock.wrap(training, "evaluate_split", "evaluation")
    with clock.phase("total"):
        fit_metrics = training.fit(config, show_progress=not args.no_progress)
    model = CLIP.from_pretrained(config.train.model_dir)
    splits = load_splits(config.data, generate=False)
    with clock.phase("scoring"):
        val = evaluation.evaluate_retrieval(model, splits["val"], 256, "cpu", show_progress=False,
                                            num_workers=args.workers)
    test = {key.removeprefix("test_"): value for key, value in fit_metrics.items() if key.startswith("test_")}
    seconds = clock.seconds
    seconds["training"] = seconds["total"] - seconds.get("caching", 0.0) - seconds.get("evaluation", 0.0)
    return {"val": val, "test": test, "seconds": seconds}


# ----------------------------------------------------------------------------------------------------- open_clip


def open_clip_model_config(args: argparse.Namespace, embed_dim: int, image_size: int) -> dict[str, Any]:
    """A CustomTextCLIP of the same towers: the timm tower by name, the Hugging Face text tower from its folder."""
    return {"embed_dim": embed_dim, "custom_text": True,
            "vision_cfg": {"timm_model_name": args.image_tower, "timm_model_pretrained": False, "timm_pool": "avg",
                           "timm_proj": "linear", "image_size": image_size},
            "text_cfg": {"hf_model_name": str(args.text_tower), "hf_tokenizer_name": str(args.text_tower),
                         "hf_model_pretrained": True, "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                         "context_length": 77}}


def write_open_clip_start(args: argparse.Namespace, directory: Path, embed_dim: int) -> Path:
    """A local-dir open_clip model: its config, the tower's own preprocessing, and a checkpoint whose image trunk
    holds the same pretrained weights liteclip loads (the text tower loads from its folder)."""
    import open_clip
    import timm
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    data_config = timm.data.resolve_data_config(model=timm.create_model(args.image_tower, pretrained=False))
    model_config = open_clip_model_config(args, embed_dim, data_config["input_size"][-1])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_config,
        "preprocess_cfg": {"mean": list(data_config["mean"]), "std": list(data_config["std"]),
                           "interpolation": data_config["interpolation"], "resize_mode": "shortest"}}, indent=2))
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**{key: value for key, value in model_config.items() if key != "custom_text"})
    tower = timm.create_model(args.image_tower, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(args.image_weights)})
    model.visual.trunk.load_state_dict(tower.state_dict())
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    # a local-dir model's tokenizer is read from the folder itself
    AutoTokenizer.from_pretrained(str(args.text_tower)).save_pretrained(str(directory))
    return directory


def write_open_clip_csv(split, path: Path, captions: str, epochs: int) -> tuple[Path, int]:
    """open_clip's CSV and the number of passes over it. "all": one row per (image, caption) pair, read `epochs`
    times; "one": for each epoch, every image once with one caption drawn with a fixed seed (liteclip's
    train_captions: one), all epochs in one file read once, so both see the same pairs and schedule length."""
    rng = random.Random(0)
    if captions == "all":
        rows, passes = [(image.image_path, caption) for image in split for caption in image.captions], epochs
    else:
        rows = [(image.image_path, rng.choice(image.captions)) for _ in range(epochs) for image in split]
        passes = 1
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path, passes


def open_clip_precision() -> str:
    from liteclip.precision import resolve_precision

    bf16 = resolve_precision("auto", torch.device("cpu")).dtype == torch.bfloat16
    return "amp_bf16" if bf16 else "fp32"


def run_open_clip(args: argparse.Namespace, out: Path, recipe) -> dict[str, Any]:
    from liteclip.data import load_splits

    splits = load_splits(recipe.data, generate=False)
    work = out / "open_clip"
    start = write_open_clip_start(args, work / "start", recipe.model.projection.dim)
    train_csv, passes = write_open_clip_csv(splits["train"], work / "train.tsv", args.open_clip_captions,
                                            args.epochs)
    command = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{start}",
               "--train-data", str(train_csv), "--dataset-type", "csv", "--csv-separator", "\t",
               "--lock-image", "--batch-size", str(args.batch_size), "--epochs", str(passes),
               "--lr", str(args.open_clip_lr or recipe.optim.lr), "--wd", str(recipe.optim.weight_decay),
               "--warmup", str(recipe.optim.warmup_steps), "--precision", open_clip_precision(),
               "--workers", str(args.workers), "--device", "cpu", "--logs", str(work / "logs"), "--name", "run",
               "--save-frequency", str(passes), "--zeroshot-frequency", "0", "--val-frequency", "0",
               "--seed", "0", "--log-every-n-steps", "20"]
    shutil.rmtree(work / "logs", ignore_errors=True)  # open_clip_train stops at once when its run folder exists
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = {"training": time.perf_counter() - started}
    checkpoint = work / "logs" / "run" / "checkpoints" / f"epoch_{passes}.pt"
    scoring = time.perf_counter()
    result = {split: score_open_clip(start, checkpoint, splits[split], args.workers) for split in ("val", "test")}
    seconds["scoring"] = time.perf_counter() - scoring
    seconds["total"] = seconds["training"]
    return {**result, "seconds": seconds}


@torch.no_grad()
def score_open_clip(start: Path, checkpoint: Path, images, workers: int) -> dict[str, float]:
    """liteclip's multi-caption recall on the embeddings of the trained open_clip model."""
    import open_clip

    from liteclip.metrics import caption_groups_of, retrieval_recall

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{start}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({name.removeprefix("module."): tensor for name, tensor in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{start}")
    loader = DataLoader(PreprocessedImages([image.image_path for image in images], preprocess), batch_size=64,
                        num_workers=workers)
    image_embeds = torch.cat([model.encode_image(pixels, normalize=True) for pixels in loader])
    captions = [caption for image in images for caption in image.captions]
    text_embeds = torch.cat([model.encode_text(tokenizer(captions[start:start + 256]), normalize=True)
                             for start in range(0, len(captions), 256)])
    owner = torch.tensor([index for index, image in enumerate(images) for _ in image.captions])
    return retrieval_recall(image_embeds, text_embeds, owner, caption_groups=caption_groups_of(captions))


class PreprocessedImages(Dataset):
    """Image files through open_clip's own evaluation transform (decoded upright by liteclip's decoder)."""

    def __init__(self, paths: list[Path], preprocess: Callable):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from liteclip.data.images import open_rgb

        return self.preprocess(open_rgb(self.paths[index]))


# ------------------------------------------------------------------------------------------------------- table


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = ["", *[f"val {key}" for key in RECALL_KEYS], *[f"test {key}" for key in RECALL_KEYS], "minutes"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for name, result in results.items():
        figures = [f"{result[split][key]:.1f}" for split in ("val", "test") for key in RECALL_KEYS]
        seconds = result["seconds"]
        parts = ", ".join(f"{phase} {value / 60:.1f}" for phase, value in seconds.items() if phase != "total")
        print(f"| {name} | " + " | ".join(figures) + f" | {seconds['total'] / 60:.1f} ({parts}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="Flickr8K in either layout (data.root)")
    parser.add_argument("--image-tower", required=True, help="timm name, e.g. tf_efficientnet_lite0")
    parser.add_argument("--image-weights", type=Path, required=True, help="the tower's weights file")
    parser.add_argument("--text-tower", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--recipe", default=str(REPO / "configs" / "flickr8k.yaml"), help="liteclip config YAML")
    parser.add_argument("--set", nargs="*", default=[], help="liteclip overrides on top of the recipe")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: ROOT/../liteclip_bench")
    parser.add_argument("--no-open-clip", action="store_true", help="train liteclip only")
    parser.add_argument("--open-clip-captions", choices=["one", "all"], default="one",
                        help="one: each image once per epoch with one caption, as liteclip's default (the same "
                             "pairs); all: every (image, caption) row every epoch, open_clip's plain CSV use")
    parser.add_argument("--open-clip-lr", type=float, default=None,
                        help="open_clip's one learning rate (default: the recipe's optim.lr, the heads' rate); "
                             "tune it on the val split as an open_clip user would, e.g. the recipe's tower_lr")
    parser.add_argument("--only-open-clip", action="store_true", help="train open_clip only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for path in (args.root, args.image_weights, args.text_tower):
        if not path.exists():
            parser.error(f"{path} does not exist")
    from liteclip.config import load_config

    out = (args.out or args.root.resolve().parent / "liteclip_bench").resolve()
    recipe = load_config(args.recipe, liteclip_overrides(args, out))
    if args.no_open_clip and args.only_open_clip:
        parser.error("--no-open-clip and --only-open-clip leave nothing to train")
    results = {} if args.only_open_clip else {"liteclip": run_liteclip(args, out)}
    if not args.no_open_clip:
        results[f"open_clip, lr {args.open_clip_lr or recipe.optim.lr:g}"] = run_open_clip(args, out, recipe)
    print_table(results)


if __name__ == "__main__":
    main()
