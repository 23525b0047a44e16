"""The training engine on tiny models: a few steps each, all on the CPU."""

import csv
import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from liteclip import CLIP, build_model
from liteclip.train.run_directory import load_checkpoint
from liteclip.cli import main
from liteclip.config import load_config
from liteclip.data import build_dataloaders, ignore_stop_signals, load_splits
from liteclip.loss import clip_loss
from liteclip.train.optim import build_optimizer
from liteclip.runtime import keep_freed_memory_for
from liteclip.train import loop as training
from liteclip.errors import NonFiniteLossError
from liteclip.precision import Precision
from liteclip.train.preemption import StepCheckpoints, TrainingStopped
from liteclip.train.loop import contrastive_step, fit, optimizer_step, to_device

FP32 = Precision(None, "cpu")

REPO = Path(__file__).resolve().parents[2]  # the repository root: configs/demo.yaml is relative to it


def tiny_overrides(tmp_path, *extra):
    """A run small enough for a test: 48 demo images at 32 px, timm test_convnext3, the demo's own 2-layer text tower."""
    data_root = tmp_path / "demo"
    return [
        f"data.root={data_root}", "data.demo_num_images=48", "data.demo_image_size=32", "data.batch_size=8",
        "data.num_workers=0", "model.image.name=test_convnext3", "model.image.model_kwargs={}",
        "model.image.pretrained=false", "model.image.image_size=32", "model.image.crop_pct=1.0",
        f"model.text.name={data_root}/text_encoder",
        "model.text.pretrained=false", "model.text.max_length=16", "model.projection.dim=32",
        "model.projection.dropout=0.0", "optim.warmup_steps=2", "optim.lr=1e-3", "train.epochs=2",
        "train.log_every=1", f"train.output_dir={tmp_path / 'run'}", f"train.model_dir={tmp_path / 'model'}",
        *extra,
    ]


def tiny_config(tmp_path, *extra):
    return load_config("configs/demo.yaml", tiny_overrides(tmp_path, *extra))


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def fixed_batches(config, count, batch_size):
    """`count` deterministic batches of the demo data, built with the config's own model tokenizer."""
    splits = load_splits(config.data)
    torch.manual_seed(0)
    model = build_model(config.model)
    loaders = build_dataloaders(config.data, model.tokenizer, 16, model.data_config, seed=0)
    images = splits["train"][: count * batch_size]
    transform = loaders["val"].dataset.transform
    from liteclip.data.captions import CaptionCollator, load_image

    collate = CaptionCollator(model.tokenizer, 16)
    samples = [{"pixel_values": transform(load_image(im.image_path)), "caption": im.captions[0], "image_index": i}
               for i, im in enumerate(images)]
    batches = [collate(samples[i * batch_size:(i + 1) * batch_size]) for i in range(count)]
    return model, [{k: v for k, v in b.items() if k != "image_index"} for b in batches]


def test_loss_falls_on_a_fixed_batch(tmp_path):
    config = tiny_config(tmp_path)
    model, (batch,) = fixed_batches(config, 1, 16)
    model.eval()  # fixed inputs, no dropout: the loss curve is the optimiser's alone
    optimizer = build_optimizer(model, config.optim)
    losses = []
    for _ in range(25):
        losses.append(contrastive_step(model, [batch], FP32, None).item())
        optimizer_step(model, optimizer, None, 1.0)
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_autocast_trains_on_the_cpu_and_keeps_fp32_weights(tmp_path):
    config = tiny_config(tmp_path)
    model, (batch,) = fixed_batches(config, 1, 16)
    model.eval()
    optimizer = build_optimizer(model, config.optim)
    bf16 = Precision(torch.bfloat16, "cpu")
    losses = []
    for _ in range(25):
        losses.append(contrastive_step(model, [batch], bf16, None).item())
        optimizer_step(model, optimizer, None, 1.0)
    assert losses[-1] < 0.7 * losses[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast casts activations, not weights
    with bf16.autocast():  # the convolutions ran in bf16 (the tower's final LayerNorm returns fp32)
        assert model.image_encoder.model.stem(batch["pixel_values"]).dtype == torch.bfloat16


def test_train_command_writes_logs_checkpoints_and_model(tmp_path, capsys):
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", "--set", *tiny_overrides(tmp_path)]) == 0
    next_steps = capsys.readouterr().out  # the first-run message: where the model is, and a command that uses it
    assert f"{tmp_path / 'model'}/" in next_steps and "notebooks/inference.ipynb" in next_steps
    predict = shlex.split(next(line for line in next_steps.splitlines() if "liteclip predict" in line).split(":", 1)[1])
    assert predict[:2] == ["liteclip", "predict"] and Path(predict[2]).is_file()
    assert main(predict[1:]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and any(label in table[1] for label in predict[predict.index("--labels") + 1:])
    run = tmp_path / "run"
    steps = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1))
    assert {"loss", "lr", "samples_per_s"} <= set(steps[0])
    epochs = read_rows(run / "epochs.csv")
    assert len(epochs) == 2 and {"mean_recall", "image_to_text_R@1", "text_to_image_R@10", "val_loss"} <= set(epochs[0])
    assert load_config(run / "config.yaml").model.image.name == "test_convnext3"
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    model = CLIP.from_pretrained(tmp_path / "model")
    best = load_checkpoint(run / "best.pt")["model"]
    assert torch.equal(model.state_dict()["logit_scale"], best["logit_scale"])
    final = read_rows(run / "final_metrics.csv")
    assert {"test_mean_recall", "zero_shot_seen_top1"} <= {r["metric"] for r in final}
    card = (tmp_path / "model" / "README.md").read_text()  # the model card carries the final metrics
    assert "library_name: liteclip" in card and "| test_mean_recall |" in card


def test_same_seed_same_losses_whatever_the_number_of_workers(tmp_path):
    losses = []
    for name, workers in (("a", 0), ("b", 2)):
        config = tiny_config(tmp_path / name, f"data.num_workers={workers}", "train.epochs=2", "train.max_steps=8")
        fit(config, show_progress=False)
        losses.append([r["loss"] for r in read_rows(tmp_path / name / "run" / "metrics.csv")])
    assert len(losses[0]) == 8 and losses[0] == losses[1]


def test_cpu_runs_keep_freed_memory_unless_told_not_to_and_losses_are_unchanged(tmp_path, monkeypatch):
    entered = []

    def spy(device, enabled=True):
        entered.append((device.type, enabled))
        return keep_freed_memory_for(device, enabled)

    monkeypatch.setattr(training, "keep_freed_memory_for", spy)
    losses = []
    for keep in (True, False):
        config = tiny_config(tmp_path / str(keep), "train.device=cpu", f"train.keep_cpu_memory={keep}",
                             "train.max_steps=4")
        fit(config, show_progress=False)
        losses.append([r["loss"] for r in read_rows(tmp_path / str(keep) / "run" / "metrics.csv")])
    assert entered == [("cpu", True), ("cpu", False)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # an allocator setting, not a numerical one


def crash_in_second_epoch(monkeypatch, config):
    """Runs fit until the second epoch starts, then raises KeyboardInterrupt there, as a crash would."""
    real_epoch = training.train_one_epoch
    calls = {"n": 0}

    def crashing_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", crashing_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(config, show_progress=False)
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)


def train_tiny_model(tmp_path, *extra):
    """A model trained for a few steps on the demo data, exported as train.py exports it; returns its directory."""
    here = os.getcwd()
    os.chdir(REPO)  # configs/demo.yaml is relative
    try:
        fit(tiny_config(tmp_path, "train.epochs=1", "train.zero_shot_eval=false", *extra), show_progress=False)
    finally:
        os.chdir(here)
    return tmp_path / "model"


def test_resume_ends_with_the_same_weights(tmp_path, monkeypatch):
    fit(tiny_config(tmp_path / "straight", "train.epochs=3"), show_progress=False)

    crash_in_second_epoch(monkeypatch, tiny_config(tmp_path / "resumed", "train.epochs=3"))
    assert load_checkpoint(tmp_path / "resumed" / "run" / "last.pt")["epoch"] == 1
    fit(tiny_config(tmp_path / "resumed", "train.epochs=3"), resume="auto", show_progress=False)

    straight = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "run" / "last.pt")
    assert straight["step"] == resumed["step"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    steps = [int(r["step"]) for r in read_rows(tmp_path / "resumed" / "run" / "metrics.csv")]
    assert steps == list(range(1, straight["step"] + 1))  # no step missing or logged twice
    resumed_losses = [r["loss"] for r in read_rows(tmp_path / "resumed" / "run" / "metrics.csv")]
    straight_losses = [r["loss"] for r in read_rows(tmp_path / "straight" / "run" / "metrics.csv")]
    assert resumed_losses == straight_losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def loss_that_breaks(logits, exclude=None):
        loss = clip_loss(logits, exclude)
        if not torch.is_grad_enabled():  # evaluation: leave it alone
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 7 else loss  # the 8th optimiser step goes bad

    monkeypatch.setattr(training, "clip_loss", loss_that_breaks)
    config = tiny_config(tmp_path, "train.epochs=3")
    with pytest.raises(NonFiniteLossError, match="optimiser step 8"):
        fit(config, show_progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert all(torch.isfinite(t).all() for t in best["model"].values() if t.is_floating_point())
    assert not (tmp_path / "model").exists()


def test_best_pt_stays_the_best_epoch_after_a_worse_one(tmp_path, monkeypatch):
    recalls = iter([50.0, 60.0, 40.0])  # epoch 2 is the best; epoch 3 is worse
    real = training.evaluate_split

    def scripted(setup, split, *args, **kwargs):
        metrics = real(setup, split, *args, **kwargs)
        return {**metrics, "mean_recall": next(recalls)} if split == "val" else metrics

    monkeypatch.setattr(training, "evaluate_split", scripted)
    fit(tiny_config(tmp_path, "train.epochs=3"), show_progress=False)
    best, last = (load_checkpoint(tmp_path / "run" / name) for name in ("best.pt", "last.pt"))
    assert (best["epoch"], best["best_epoch"], last["epoch"], last["best_epoch"]) == (2, 2, 3, 2)
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_unwritable_output_directory_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tiny_config(tmp_path, f"train.output_dir={blocker / 'run'}")
    with pytest.raises(PermissionError, match="cannot write to"):
        fit(config, show_progress=False)
    assert not (tmp_path / "demo").exists()  # failed before even preparing the data


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


SIGLIP = ("loss.name=siglip", "model.logit_scale_init=2.302585", "model.logit_bias_init=-10")


@pytest.mark.parametrize("loss_overrides", [(), SIGLIP], ids=["clip", "siglip"])
def test_gradient_caching_matches_one_big_batch(tmp_path, loss_overrides):
    config = tiny_config(tmp_path, *loss_overrides)
    model, (half_a, half_b) = fixed_batches(config, 2, 4)
    model.eval()  # no dropout, so the no-grad and the grad passes see the same embeddings
    full = {k: torch.cat([half_a[k], half_b[k]]) if k == "pixel_values" else None for k in half_a}
    ids = [half_a["input_ids"], half_b["input_ids"]]
    masks = [half_a["attention_mask"], half_b["attention_mask"]]
    length = max(i.shape[1] for i in ids)
    full["input_ids"] = torch.cat([torch.nn.functional.pad(i, (0, length - i.shape[1])) for i in ids])
    full["attention_mask"] = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])

    big_loss = contrastive_step(model, [full], FP32, None, config.loss.name)
    big_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    cached_loss = contrastive_step(model, [half_a, half_b], FP32, None, config.loss.name)
    cached_grads = grads_of(model)
    torch.testing.assert_close(cached_loss, big_loss, atol=1e-5, rtol=1e-5)
    assert big_grads.keys() == cached_grads.keys() and "logit_scale" in big_grads
    for name in big_grads:
        torch.testing.assert_close(cached_grads[name], big_grads[name], atol=2e-5, rtol=1e-3, msg=name)


def join_cpu_process_group(rank, world_size, port, config_path):
    """In a spawned test process: joins a gloo group as torchrun would set it up; returns the config and the model
    every rank builds identically."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from liteclip import distributed

    distributed.init_distributed("cpu")
    config = load_config(config_path)
    torch.manual_seed(0)
    return config, build_model(config.model).eval()


def _ddp_worker(rank, world_size, port, config_path, batches_path, out_path, loss_name="clip"):
    from liteclip import distributed

    config, model = join_cpu_process_group(rank, world_size, port, config_path)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = torch.load(batches_path)[rank]
    loss = contrastive_step(ddp, [batch], FP32, None, loss_name)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads_of(model)}, out_path)
    distributed.cleanup()


@pytest.mark.parametrize("loss_overrides", [(), SIGLIP], ids=["clip", "siglip"])
def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, loss_overrides):
    config = tiny_config(tmp_path, *loss_overrides)
    model, (half_a, half_b) = fixed_batches(config, 2, 4)
    length = max(half_a["input_ids"].shape[1], half_b["input_ids"].shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))
    halves = [{k: pad(v) if k != "pixel_values" else v for k, v in h.items()} for h in (half_a, half_b)]
    full = {k: torch.cat([halves[0][k], halves[1][k]]) for k in halves[0]}
    torch.manual_seed(0)
    reference = build_model(config.model).eval()
    loss = contrastive_step(reference, [full], FP32, None, config.loss.name)
    expected = grads_of(reference)
    assert ("logit_bias" in expected) == bool(loss_overrides)  # SigLIP's bias is trained, and its gradient checked

    (tmp_path / "config.yaml").write_text(config.to_yaml())
    torch.save(halves, tmp_path / "batches.pt")
    mp.spawn(_ddp_worker, args=(2, 29500 + os.getpid() % 1000 + len(loss_overrides), str(tmp_path / "config.yaml"),
                                str(tmp_path / "batches.pt"), str(tmp_path / "out.pt"), config.loss.name),
             nprocs=2, join=True)
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["loss"], loss, atol=1e-5, rtol=1e-5)
    assert result["grads"].keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(result["grads"][name], expected[name], atol=2e-5, rtol=1e-3, msg=name)


def _precision_worker(rank, world_size, port, config_path, out_path):
    from liteclip import distributed, precision

    config, _ = join_cpu_process_group(rank, world_size, port, config_path)
    # a measurement that comes out differently on each rank: bf16 3x faster on rank 0, slower on rank 1
    precision.cpu_bf16_feature = lambda: "avx512_bf16"
    precision.measure_cpu_bf16 = lambda: precision.Bf16Measurement(300.0 if rank == 0 else 50.0, 100.0, 0.1)
    setup = training.build_training(config, load_splits(config.data), distributed.init_distributed("cpu"))
    torch.save({"rank": rank, "dtype": setup.precision.dtype,
                "alone": precision.resolve_precision("auto", torch.device("cpu")).dtype}, f"{out_path}.{rank}")
    distributed.cleanup()


def test_ranks_train_in_rank_zeros_measured_precision(tmp_path):
    config = tiny_config(tmp_path, "train.precision=auto")
    load_splits(config.data)  # writes the demo data once, before the ranks read it
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    mp.spawn(_precision_worker, args=(2, 29600 + os.getpid() % 1000, str(tmp_path / "config.yaml"),
                                      str(tmp_path / "out.pt")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"out.pt.{rank}") for rank in range(2)]
    assert [r["alone"] for r in results] == [torch.bfloat16, None]  # each rank alone would have chosen its own
    assert [r["dtype"] for r in results] == [torch.bfloat16, torch.bfloat16]


def test_a_resumed_run_keeps_the_precision_auto_chose_at_its_start(tmp_path, monkeypatch, caplog):
    from liteclip import precision

    config = tiny_config(tmp_path, "train.device=cpu", "train.precision=auto")  # what auto picks on a CPU
    monkeypatch.setattr(training, "cpu_bf16_is_measured", lambda: True)  # a CPU with AVX-512 BF16 alone
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: True)  # the start measures bf16 faster
    real_check = StepCheckpoints.check
    monkeypatch.setattr(StepCheckpoints, "check", lambda self: (True, True))  # stop after the first step
    with pytest.raises(TrainingStopped):
        fit(config, show_progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["precision"] == "bf16"

    monkeypatch.setattr(StepCheckpoints, "check", real_check)
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: False)  # the resume measures otherwise
    dtypes = set()
    real_step = training.contrastive_step
    monkeypatch.setattr(training, "contrastive_step", lambda model, batches, chosen, *rest:
                        dtypes.add(chosen.dtype) or real_step(model, batches, chosen, *rest))
    with caplog.at_level("WARNING"):
        fit(config, resume="auto", show_progress=False)
    assert dtypes == {torch.bfloat16}
    assert "started in bf16 and keeps it (measured now: fp32)" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "last.pt")["precision"] == "bf16"
    fresh = tiny_config(tmp_path, "train.device=cpu", "train.precision=auto", f"train.output_dir={tmp_path / 'fresh'}")
    dtypes.clear()
    fit(fresh, show_progress=False)  # a new run measures afresh
    assert dtypes == {None}
    monkeypatch.setattr(training, "cpu_bf16_is_measured", lambda: False)  # features decide: they are followed
    monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: True)
    dtypes.clear()
    fit(tiny_config(tmp_path, "train.device=cpu", "train.precision=auto", "train.epochs=3",
                    f"train.output_dir={tmp_path / 'fresh'}"), resume="auto", show_progress=False)
    assert dtypes == {torch.bfloat16}  # the checkpoint said fp32


def test_an_fp16_run_resumes_with_its_gradient_scaler_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    # fp16 is what train.precision: auto takes on GPUs without bf16; the scaler's path runs on a CPU just the same
    settings = ("train.device=cpu", "train.precision=fp16", "train.max_steps=6")
    fit(tiny_config(tmp_path / "straight", *settings), show_progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    assert straight["precision"] == "fp16" and straight["scaler"]["scale"] < 2.0 ** 16  # it backed off: overflows

    real_check = StepCheckpoints.check
    monkeypatch.setattr(StepCheckpoints, "check", lambda self: (True, True))  # stop after the first step
    with pytest.raises(TrainingStopped):
        fit(tiny_config(tmp_path / "stopped", *settings), show_progress=False)
    monkeypatch.setattr(StepCheckpoints, "check", real_check)
    fit(tiny_config(tmp_path / "stopped", *settings), resume="auto", show_progress=False)
    resumed = load_checkpoint(tmp_path / "stopped" / "run" / "last.pt")
    assert resumed["scaler"] == straight["scaler"]
    losses = [[r["loss"] for r in read_rows(tmp_path / name / "run" / "metrics.csv")]
              for name in ("straight", "stopped")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_locked_image_tower_features_are_cached_and_reused(tmp_path, monkeypatch):
    extra = ("model.image.tune=locked", "train.cache_image_features=true", "train.epochs=1", "train.max_steps=3")
    first = fit(tiny_config(tmp_path / "a", *extra), show_progress=False)
    caches = list((tmp_path / "a" / "demo" / ".liteclip_cache").glob("image_features_*.safetensors"))
    assert len(caches) == 3  # train, val, test

    def tower_must_not_run(*args, **kwargs):
        raise AssertionError("the image tower ran although its features were cached")

    monkeypatch.setattr(CLIP, "image_features", tower_must_not_run)
    monkeypatch.setattr(training, "zero_shot_metrics", lambda *a, **k: {})  # it encodes raw test images
    config = tiny_config(tmp_path / "a", *extra, f"train.output_dir={tmp_path / 'again'}")
    second = fit(config, show_progress=False)
    assert second["test_mean_recall"] == pytest.approx(first["test_mean_recall"])
    losses = [[r["loss"] for r in read_rows(d / "metrics.csv")] for d in (tmp_path / "a" / "run", tmp_path / "again")]
    assert losses[0] == losses[1]


def test_feature_cache_needs_a_locked_tower(tmp_path):
    with pytest.raises(ValueError, match="model.image.locked"):
        fit(tiny_config(tmp_path, "train.cache_image_features=true"), show_progress=False)


def test_compile_keeps_parameter_names_and_falls_back_when_unavailable(tmp_path, monkeypatch, caplog):
    model, _ = fixed_batches(tiny_config(tmp_path), 1, 2)
    names = list(model.state_dict())
    training.compile_towers(model)
    assert list(model.state_dict()) == names  # checkpoints stay loadable without any _orig_mod. surgery

    def no_compiler(self, *args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.nn.Module, "compile", no_compiler)
    with caplog.at_level("WARNING"):
        fit(tiny_config(tmp_path / "run2", "train.compile=true", "train.epochs=1", "train.max_steps=2"),
            show_progress=False)
    assert "torch.compile is unavailable here (no C++ compiler)" in caplog.text
    assert (tmp_path / "run2" / "model" / "model.safetensors").is_file()


def test_validation_columns_reach_the_epoch_log_when_the_first_epoch_is_not_evaluated(tmp_path):
    fit(tiny_config(tmp_path, "train.epochs=3", "train.eval_every=2"), show_progress=False)
    epochs = read_rows(tmp_path / "run" / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2, 3]
    assert {"val_loss", "mean_recall", "image_to_text_R@1"} <= set(epochs[0])
    assert [r["val_loss"] != "" for r in epochs] == [False, True, True]  # epoch 2, and the last epoch
    assert all(float(r["train_loss"]) > 0 for r in epochs)


def test_validation_workers_start_once_per_run_and_the_metrics_match_decoding_in_process(tmp_path, monkeypatch):
    started = tmp_path / "val_workers_started"

    def record_start(worker_id):  # runs in each val-loader worker as it starts
        with open(started, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        ignore_stop_signals(worker_id)

    monkeypatch.setattr(training, "ignore_stop_signals", record_start)
    recalls = {}
    for workers in (0, 1):
        fit(tiny_config(tmp_path / str(workers), f"data.num_workers={workers}", "train.epochs=3"), show_progress=False)
        recalls[workers] = [(r["val_loss"], r["mean_recall"])
                            for r in read_rows(tmp_path / str(workers) / "run" / "epochs.csv")]
    assert len(started.read_text().split()) == 1  # three evaluations, one worker start
    assert len(recalls[1]) == 3 and recalls[1] == recalls[0]


def test_the_trainers_test_recall_equals_eval_retrieval_on_the_saved_model(tmp_path, capsys):
    config = tiny_config(tmp_path, "train.precision=fp32", "data.eval_batch_size=8", "train.epochs=1")
    final = fit(config, show_progress=False)
    assert main(["eval-retrieval", "--model-dir", str(tmp_path / "model"), "--split", "test", "--batch-size", "8",
                 "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    recall_keys = [k for k in cli if "R@" in k] + ["mean_recall"]
    assert len(recall_keys) == 7
    assert {k: final[f"test_{k}"] for k in recall_keys} == {k: cli[k] for k in recall_keys}
    assert final["test_loss"] == pytest.approx(cli["loss"], rel=1e-5)
    written = {r["metric"]: float(r["value"]) for r in read_rows(tmp_path / "run" / "final_metrics.csv")}
    assert written["test_mean_recall"] == cli["mean_recall"]


def write_captions_with_planted_bad_images(root):
    """24 good training images, 6 for val and test, and four planted in training: undecodable, truncated,
    16-bit (which decodes) and one whose header claims 14000 x 14000 pixels."""
    from PIL import Image

    from tests.conftest import draw_image
    from tests.data.test_images import png_claiming

    rows = []
    for i in range(30):
        draw_image(root / f"{i}.png", ((37 * i) % 256, (91 * i) % 256, 120), size=32)
        rows.append((f"{i}.png", f"picture number {i % 7}", "train" if i < 24 else ("val" if i < 27 else "test")))
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    draw_image(root / "whole.jpg", (10, 200, 10), size=64)
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:200])
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(root / "deep.png")
    (root / "huge.png").write_bytes(png_claiming(14000, 14000))
    rows += [(name, "a planted file", "train") for name in ("broken.jpg", "truncated.jpg", "deep.png", "huge.png")]
    (root / "captions.csv").write_text("image,caption,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return ["broken.jpg", "truncated.jpg", "huge.png"]


def csv_config(tmp_path, data_root, text_dir, *extra):
    return load_config("configs/demo.yaml", [
        "data.dataset=csv", f"data.root={data_root}", "data.captions_file=captions.csv", "data.split_column=split",
        "data.batch_size=4", "data.num_workers=0", "model.image.name=test_convnext3", "model.image.model_kwargs={}",
        "model.image.pretrained=false", "model.image.image_size=32", "model.image.crop_pct=1.0",
        f"model.text.name={text_dir}",
        "model.text.pretrained=true", "model.text.max_length=16", "model.projection.dim=32",
        "model.projection.dropout=0.0", "optim.warmup_steps=2", "train.epochs=2", "train.log_every=1",
        "train.precision=fp32", f"train.output_dir={tmp_path / 'run'}", f"train.model_dir={tmp_path / 'model'}",
        *extra])


def test_a_run_over_planted_bad_images_completes_names_each_once_and_resumes_exactly(tmp_path, tiny_text_dir,
                                                                                       caplog, monkeypatch):
    data_root = tmp_path / "data"
    data_root.mkdir()
    bad = write_captions_with_planted_bad_images(data_root)
    with caplog.at_level("WARNING", logger="liteclip"):
        fit(csv_config(tmp_path / "straight", data_root, tiny_text_dir), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "skipped training image" in r.getMessage()]
    for name in bad:
        assert sum(str(data_root / name) in w for w in warnings) == 1, name
    assert not any("deep.png" in w for w in warnings)  # a 16-bit image decodes
    epochs = read_rows(tmp_path / "straight" / "run" / "epochs.csv")
    assert epochs[-1]["skipped_images"] == "3"
    assert (tmp_path / "straight" / "model" / "model.safetensors").is_file()

    crash_in_second_epoch(monkeypatch, csv_config(tmp_path / "resumed", data_root, tiny_text_dir))
    fit(csv_config(tmp_path / "resumed", data_root, tiny_text_dir), resume="auto", show_progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "run" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_a_second_training_on_a_run_directory_in_use_fails_at_once(tmp_path):
    from liteclip.errors import RunInUseError
    from liteclip.train.run_directory import RunDirectory

    with RunDirectory(tmp_path / "run").locked():  # as a first training holds it
        with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()}"):
            fit(tiny_config(tmp_path), show_progress=False)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_a_siglip_run_trains_evaluates_and_exports_its_bias(tmp_path):
    final = fit(tiny_config(tmp_path, *SIGLIP, "train.epochs=1", "train.max_steps=3"), show_progress=False)
    assert np.isfinite(final["test_loss"]) and "test_mean_recall" in final
    model = CLIP.from_pretrained(tmp_path / "model")
    best = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert torch.equal(model.logit_bias.detach(), best["logit_bias"]) and best["logit_bias"].item() != -10.0


def test_with_a_weight_average_the_average_is_evaluated_kept_and_exported(tmp_path):
    fit(tiny_config(tmp_path, "train.ema_decay=0.9", "train.ema_evaluate_raw=true", "train.epochs=2"),
        show_progress=False)
    epochs = read_rows(tmp_path / "run" / "epochs.csv")
    assert {"mean_recall", "raw_mean_recall", "raw_val_loss"} <= set(epochs[0])
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    exported = CLIP.from_pretrained(tmp_path / "model").state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, best["ema"][f"module.{name}"]), name  # the export is the average, not the raw
    assert any(not torch.equal(best["model"][name], tensor) for name, tensor in exported.items())


def test_a_resumed_run_compares_its_config_before_writing_refuses_a_new_model_and_names_what_changed(
        tmp_path, monkeypatch, caplog):
    import yaml

    from liteclip.config import ConfigError

    crash_in_second_epoch(monkeypatch, tiny_config(tmp_path))
    run = tmp_path / "run"
    written, step = (run / "config.yaml").read_text(), load_checkpoint(run / "last.pt")["step"]
    with pytest.raises(ConfigError, match=r"cannot resume .*last.pt .*model.projection.dim: 32 -> 64"):
        fit(tiny_config(tmp_path, "model.projection.dim=64"), resume="auto", show_progress=False)
    assert (run / "config.yaml").read_text() == written  # refused before anything was written

    with caplog.at_level("WARNING", logger="liteclip.train.run_directory"):
        fit(tiny_config(tmp_path, "optim.lr=5e-4", "optim.weight_decay=0.2"), resume="auto", show_progress=False)
    assert "optim.lr: 0.001 -> 0.0005" in caplog.text and "optim.weight_decay: 0.05 -> 0.2" in caplog.text
    assert yaml.safe_load((run / f"config.until_step_{step}.yaml").read_text())["optim"]["lr"] == 1e-3
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    groups = load_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert {group["base_lr"] for group in groups} == {5e-4}  # the new settings took effect
    assert {group["weight_decay"] for group in groups} == {0.2, 0.0}


def test_an_epoch_whose_embeddings_collapse_is_never_kept_as_best(tmp_path, monkeypatch):
    real_epoch = training.train_one_epoch
    calls = {"n": 0}

    def collapsing_second_epoch(setup, *args, **kwargs):
        loss = real_epoch(setup, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # both heads now map every input to one point: all similarities tie
            with torch.no_grad():
                for head in (setup.model.image_projection, setup.model.text_projection):
                    head.projection.weight.zero_()
                    head.projection.bias.zero_()
        return loss

    monkeypatch.setattr(training, "train_one_epoch", collapsing_second_epoch)
    # 24 validation images, so that a collapsed model's ranks (23 wrong images tied with the right one) miss at K=10
    fit(tiny_config(tmp_path, "train.zero_shot_eval=false", "data.demo_num_images=240"), show_progress=False)
    epochs = read_rows(tmp_path / "run" / "epochs.csv")
    assert float(epochs[1]["mean_recall"]) == 0.0 < float(epochs[0]["mean_recall"])
    assert load_checkpoint(tmp_path / "run" / "best.pt")["best_epoch"] == 1


def test_every_caption_sampling_never_makes_two_captions_of_one_image_negatives(tmp_path):
    from liteclip.train.loop import same_image_pairs

    config = tiny_config(tmp_path, "data.train_captions=all", "data.batch_size=16")
    load_splits(config.data)  # generates the demo data, its text tower included
    model = build_model(config.model)
    loader = build_dataloaders(config.data, model.tokenizer, 16, model.data_config, seed=0)["train"]
    loader.sampler.set_epoch(0)
    repeated = 0
    for batch in loader:
        ids = batch["image_index"].tolist()
        exclude = same_image_pairs([batch])
        expected = [[i != j and ids[i] == ids[j] for j in range(len(ids))] for i in range(len(ids))]
        repeated += sum(map(sum, expected))
        assert (exclude.tolist() if exclude is not None else [[False] * len(ids)] * len(ids)) == expected
    assert repeated > 0  # the demo's images have several captions, so all-caption batches do repeat images
    # the step leaves exactly those pairs out: its loss is the masked loss of the same logits
    model.eval()
    batch = next(iter(loader))
    exclude = same_image_pairs([batch])
    step_loss = contrastive_step(model, [to_device(batch, torch.device("cpu"))], FP32, None)
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    torch.testing.assert_close(step_loss, clip_loss(out.logits_per_image, exclude), atol=1e-5, rtol=1e-5)
    plain = contrastive_step(model, [to_device(batch, torch.device("cpu"))], FP32, None, mask_same_image=False)
    torch.testing.assert_close(plain, clip_loss(out.logits_per_image), atol=1e-5, rtol=1e-5)


def assert_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, *overrides):
    """A run crashed in its second epoch and resumed ends with the weights of the same run uninterrupted."""
    fit(tiny_config(tmp_path / "straight", *overrides), show_progress=False)
    crash_in_second_epoch(monkeypatch, tiny_config(tmp_path / "resumed", *overrides))
    fit(tiny_config(tmp_path / "resumed", *overrides), resume="auto", show_progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "run" / "last.pt")
    assert straight["step"] == resumed["step"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_an_every_caption_run_with_masking_resumes_with_the_same_weights(tmp_path, monkeypatch):
    assert_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, "train.epochs=3",
                                                     "data.train_captions=all", "data.demo_num_images=24")


@pytest.mark.parametrize("weight_check", [True, False])
def test_weights_that_went_nan_with_a_finite_loss_stop_the_run_and_are_never_scored_or_exported(tmp_path, monkeypatch,
                                                                                               weight_check):
    """Issue 38: optim.lr=.inf gave a finite loss on its step and NaN weights after it; validation then scored the
    NaN model 100% and it was exported as best. Either guard stops the run: the weight check after the epoch, and
    (without it) the evaluation, which refuses non-finite embeddings."""
    real_epoch, epochs = training.train_one_epoch, []

    def diverging_epoch(setup, *args, **kwargs):
        loss = real_epoch(setup, *args, **kwargs)
        epochs.append(loss)
        if len(epochs) == 2:  # the last step of the second epoch diverged after its (finite) loss was taken
            with torch.no_grad():
                next(setup.model.image_projection.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(training, "train_one_epoch", diverging_epoch)
    if not weight_check:
        monkeypatch.setattr(training, "refuse_non_finite_weights", lambda model, state: None)
    with pytest.raises(NonFiniteLossError, match="after epoch 2"):
        fit(tiny_config(tmp_path, "train.epochs=3"), show_progress=False)
    assert all(math.isfinite(loss) for loss in epochs)
    for name in ("last.pt", "best.pt"):
        checkpoint = load_checkpoint(tmp_path / "run" / name)
        assert checkpoint["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert [row["epoch"] for row in read_rows(tmp_path / "run" / "epochs.csv")] == ["1"]  # epoch 2 never logged
    assert not (tmp_path / "model").exists()


def test_tower_arguments_timm_accepts_but_cannot_run_with_are_a_config_error_at_the_first_step(tmp_path, capsys):
    """Issue 38: `model_kwargs` that timm rejects only when the tower runs were a raw traceback."""
    config = ["--config", "configs/demo.yaml", "--no-progress", "--set", *tiny_overrides(tmp_path),
              "model.image.name=resnet10t", "model.image.model_kwargs={drop_rate: 2.0}"]
    assert main(["train", *config]) == 2
    err = capsys.readouterr().err
    assert "the first training step failed (ValueError: dropout probability" in err
    assert "model.image.model_kwargs={'drop_rate': 2.0}" in err and "Traceback" not in err
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", "--set", *tiny_overrides(tmp_path),
                 "model.image.image_size=1"]) == 2
    err = capsys.readouterr().err
    assert "the first training step failed" in err and "model.image.image_size=1" in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["liteclip model without its weights", "bert tower", "empty folder"])
def test_init_from_a_folder_that_is_not_a_clip_checkpoint_is_one_line_naming_what_it_is(tmp_path, tiny_text_dir,
                                                                                        capsys, what):
    import shutil

    folder = tmp_path / "folder"
    if what == "liteclip model without its weights":  # a whole one is a start (test_weight_averaging.py)
        train_tiny_model(tmp_path / "trained", "train.max_steps=1")
        shutil.copytree(tmp_path / "trained" / "model", folder)
        (folder / "model.safetensors").unlink()
        expected = "is a liteclip model folder without its model.safetensors"
    elif what == "bert tower":
        shutil.copytree(tiny_text_dir, folder)
        expected = "is a 'bert' model, not a CLIP or SigLIP checkpoint"
    else:
        folder.mkdir()
        expected = "a folder without the config.json of a Hugging Face model or the config.yaml"
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", "--set", *tiny_overrides(tmp_path),
                 f"model.init_from={folder}"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_run_into_a_folder_of_the_users_files_is_refused_and_their_temporary_files_are_never_removed(tmp_path,
                                                                                                      capsys):
    """A run writes config.yaml, metrics.csv ... into train.output_dir: a folder no run has used that holds files of
    those names is the user's. And only the run's own half-written temporaries are cleaned up."""
    from tests.user_files import assert_user_files_untouched, plant_user_files

    theirs = tmp_path / "project"
    before = plant_user_files(theirs, names=("config.yaml", "metrics.csv"))
    assert main(["train", "--config", "configs/demo.yaml", "--no-progress", "--set", *tiny_overrides(tmp_path),
                 f"train.output_dir={theirs}"]) == 2
    err = capsys.readouterr().err
    assert "holds config.yaml, metrics.csv, which no liteclip run wrote there" in err and "Traceback" not in err
    assert_user_files_untouched(theirs, before, exactly=True)
    (tmp_path / ".my-editor-swap.tmp").write_text("unsaved work")  # beside the model folder: the user's
    fit(tiny_config(tmp_path, "train.epochs=1", "train.max_steps=1"), show_progress=False)
    assert (tmp_path / ".my-editor-swap.tmp").read_text() == "unsaved work"
