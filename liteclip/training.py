"""The training engine: fit(config) builds everything from the config, trains, evaluates, checkpoints and exports.

Shape follows open_clip's train_one_epoch / evaluate and nanoGPT's single readable loop. This is the only module that
imports the whole package; the library (model, loss, pipeline) never imports it.

Determinism: each epoch reseeds torch, NumPy, Python and the data order from (seed, epoch), so a run resumed from an
epoch checkpoint replays the remaining epochs bit for bit, and two CPU runs with one seed give identical losses.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from liteclip import distributed
from liteclip.checkpoint import atomic_write_bytes, load_checkpoint, load_weights, save_checkpoint
from liteclip.config import Config
from liteclip.data import build_dataloaders, build_datasets, load_splits
from liteclip.data.captions import unpack_sample_key
from liteclip.loss import clip_loss
from liteclip.metrics import retrieval_recall, zero_shot_accuracy
from liteclip.model import CLIP, build_model
from liteclip.optim import build_optimizer, lr_multiplier, set_lr
from liteclip.pipeline import encode_image_files, encode_texts
from liteclip.runtime import keep_freed_memory_for

logger = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Precision:
    """How the forward pass runs: an autocast dtype (or None for fp32) and whether fp16 needs a gradient scaler."""

    dtype: torch.dtype | None
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    """AMX bf16 tiles (Intel Xeons since Sapphire Rapids). Other CPUs emulate much of bf16: they stay in fp32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(amx and avx512_bf16 and amx() and avx512_bf16())


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 where the hardware has it (CUDA, AMX CPUs), fp16 (with a scaler) on older GPUs, else fp32."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_native_bf16():
            choice = "bf16"  # 1.4x on a convnext_tiny step on a 2-core AMX Xeon (benchmarks/image_tower.py)
        else:
            choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(dtype, device.type)


def compile_towers(model: CLIP) -> None:
    """torch.compile both towers in place (parameter names unchanged), falling back to eager where unsupported."""
    try:
        import torch._dynamo

        # an operator or platform the compiler cannot handle runs eagerly instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        model.image_encoder.compile()
        model.text_encoder.compile()
    except Exception as error:  # no compiler toolchain, an old torch: train eagerly
        logger.warning("torch.compile is unavailable here (%s); training without it", error)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


# --------------------------------------------------------------------------------------------------- one step


def contrastive_step(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], precision: Precision,
                     scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Forward and backward for one optimiser step; returns the (detached) loss over the whole global batch.

    With one micro-batch this is the plain CLIP step on embeddings gathered across ranks. With k micro-batches it
    is gradient caching: embed all k without gradients, then re-embed each one with gradients against the cached
    embeddings of the others, so every caption is contrasted with all k*B images, as in one batch of k*B.
    """
    if len(micro_batches) == 1:
        with precision.autocast():
            out = model(**micro_batches[0])
        image_embeds = distributed.all_gather_with_grad(out.image_embeds)  # (W*B, D)
        text_embeds = distributed.all_gather_with_grad(out.text_embeds)
        loss = clip_loss((out.logit_scale * image_embeds.float() @ text_embeds.float().t()))
        _backward(loss, scaler)
        return loss.detach()

    with torch.no_grad(), precision.autocast():
        outs = [model(**batch) for batch in micro_batches]
    cached_images = [distributed.all_gather_no_grad(o.image_embeds.float()) for o in outs]  # k x (W*B, D)
    cached_texts = [distributed.all_gather_no_grad(o.text_embeds.float()) for o in outs]
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        # DDP must all-reduce once, after the last backward; earlier ones only accumulate locally
        sync = contextlib.nullcontext() if index == last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                out = model(**batch)
            images = list(cached_images)
            texts = list(cached_texts)
            images[index] = distributed.all_gather_with_grad(out.image_embeds.float())
            texts[index] = distributed.all_gather_with_grad(out.text_embeds.float())
            # the temperature's gradient must be counted once, not k times; the synced (last) pass carries it
            scale = out.logit_scale if index == last else out.logit_scale.detach()
            loss = clip_loss(scale * torch.cat(images) @ torch.cat(texts).t())
            _backward(loss, scaler)
    return loss.detach()


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   grad_clip: float | None) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "image_features", "input_ids", "attention_mask")}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------------- one epoch


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    best_metric: float = -math.inf
    best_epoch: int = -1


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, state: TrainState,
                    config: Config, total_steps: int, precision: Precision, scaler: torch.amp.GradScaler | None,
                    device: torch.device, log_row: Callable[[dict], None], show_progress: bool = True) -> float:
    """Trains one epoch; returns its mean loss. Raises NonFiniteLossError naming the first bad step."""
    model.train()
    accum = config.train.accum_steps
    log_every = config.train.log_every
    num_steps = len(loader) // accum
    if config.train.max_steps is not None:
        num_steps = max(0, min(num_steps, config.train.max_steps - state.step))
    progress = tqdm(total=num_steps, desc=f"epoch {state.epoch + 1}/{config.train.epochs}", leave=False,
                    disable=not show_progress, dynamic_ncols=True)
    # running sums stay on the device: reading a loss back is a host-device sync, done only every log_every steps
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    window_start, window_samples, window_steps, done = time.perf_counter(), 0, 0, 0
    iterator = iter(loader)
    for _ in range(num_steps):
        micro_batches = [to_device(next(iterator), device) for _ in range(accum)]
        set_lr(optimizer, lr_multiplier(state.step, total_steps, config.optim))
        loss = contrastive_step(model, micro_batches, precision, scaler)
        optimizer_step(model, optimizer, scaler, config.optim.grad_clip)
        state.step += 1
        done += 1
        loss_sum += loss
        window_sum += loss
        window_steps += 1
        window_samples += sum(len(b["input_ids"]) for b in micro_batches) * distributed.world_size()
        if window_steps == log_every or done == num_steps:
            window_loss = (window_sum / window_steps).item()  # the sync point
            if not math.isfinite(window_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({window_loss}) by optimiser step {state.step} (epoch {state.epoch + 1}); "
                    f"training stopped, the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip, or "
                    f"use train.precision=fp32.")
            elapsed = time.perf_counter() - window_start
            row = {"epoch": state.epoch + 1, "step": state.step, "loss": window_loss,
                   "lr": optimizer.param_groups[-1]["lr"], "samples_per_s": window_samples / max(elapsed, 1e-9)}
            log_row(row)
            progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{row['lr']:.2e}",
                                 samples_s=f"{row['samples_per_s']:.1f}")
            window_sum.zero_()
            window_start, window_samples, window_steps = time.perf_counter(), 0, 0
        progress.update(1)
    progress.close()
    return (loss_sum / max(done, 1)).item()


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def embed_split(model: CLIP, loader: DataLoader, device: torch.device, precision: Precision,
                show_progress: bool = False) -> dict[str, Any]:
    """Embeds every image of an evaluation split once, and every caption of it; also the paired validation loss."""
    model.eval()
    image_embeds, losses = [], []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not show_progress):
        inputs = to_device(batch, device)
        with precision.autocast():
            out = model(**inputs)
        image_embeds.append(out.image_embeds.float())
        if len(batch["input_ids"]) > 1:
            losses.append(clip_loss(out.logits_per_image.float()))
    images = loader.dataset.images
    captions = [caption for image in images for caption in image.captions]
    text_to_image = torch.tensor([i for i, image in enumerate(images) for _ in image.captions])
    text_embeds = encode_texts(model, captions, loader.batch_size or 64, device, precision.autocast)
    return {"image_embeds": torch.cat(image_embeds), "text_embeds": text_embeds, "text_to_image": text_to_image,
            "loss": torch.stack(losses).mean().item() if losses else float("nan")}


def evaluate(model: CLIP, loader: DataLoader, device: torch.device, precision: Precision) -> dict[str, float]:
    """Validation loss and retrieval recall R@1/5/10 in both directions, over the whole split."""
    if len(loader.dataset) == 0:
        return {}
    embedded = embed_split(model, loader, device, precision)
    metrics = {"val_loss": embedded["loss"]}
    metrics.update(retrieval_recall(embedded["image_embeds"], embedded["text_embeds"], embedded["text_to_image"]))
    return metrics


@torch.no_grad()
def evaluate_demo_zero_shot(model: CLIP, root: str | Path, device: torch.device, precision: Precision,
                            split: str = "test") -> dict[str, float]:
    """Zero-shot top-1 accuracy on the demo's single-object images, over all colour-shape labels, reported
    separately for combinations seen in training and for the held-out ones."""
    from liteclip.data.demo import all_combinations, class_prompt, zero_shot_items

    model.eval()
    items = zero_shot_items(root, split)
    prompts = [class_prompt(color, shape) for color, shape in all_combinations()]
    class_embeds = encode_texts(model, prompts, len(prompts), device, precision.autocast)
    image_embeds = encode_image_files(model, [item.image_path for item in items], 64, device, precision.autocast)
    labels = torch.tensor([item.label for item in items])
    held_out = torch.tensor([item.held_out for item in items])
    metrics = {}
    for name, mask in (("seen", ~held_out), ("held_out", held_out)):
        if mask.any():
            metrics[f"zero_shot_{name}_top1"] = zero_shot_accuracy(image_embeds[mask], class_embeds, labels[mask],
                                                                   ks=(1,))["top1"]
    metrics["zero_shot_chance"] = 100.0 / len(prompts)
    return metrics


# ------------------------------------------------------------------------------- locked-tower feature cache


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Samples carrying precomputed image-tower features instead of pixels (same contract otherwise)."""

    def __init__(self, dataset: Any, features: torch.Tensor):
        self.dataset = dataset  # an ImageCaptionDataset: its images, caption mode and pairs are reused
        self.features = features  # (N_images, F)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = unpack_sample_key(key)
        image_index, caption_index = self.dataset.locate(index, generator)
        return {"image_features": self.features[image_index],
                "caption": self.dataset.images[image_index].captions[caption_index], "image_index": image_index}

    @property
    def images(self):
        return self.dataset.images


def feature_cache_key(model: CLIP, paths: list[Path], precision: Precision) -> str:
    """Identifies cached features: tower name, tower weights, eval transform, precision and the exact file list."""
    import hashlib
    import json

    digest = hashlib.sha256()
    digest.update(model.config.image.name.encode())
    digest.update(str(precision.dtype).encode())  # bf16 features (an AMX CPU, a GPU) are not fp32 ones
    digest.update(json.dumps(model.data_config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for path in paths:
        digest.update(str(path).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def cached_image_features(model: CLIP, paths: list[Path], cache_dir: Path, device: torch.device,
                          precision: Precision, num_workers: int = 0) -> torch.Tensor:
    """(N, F) locked-tower features for image files, computed once and kept in cache_dir as safetensors."""
    from safetensors.torch import load_file, save

    path = cache_dir / f"image_features_{feature_cache_key(model, paths, precision)}.safetensors"
    if path.is_file():
        logger.info("image features from cache %s", path)
        return load_file(str(path))["features"]
    model.eval()
    features = encode_image_files(model, paths, 64, device, precision.autocast, show_progress=True,
                                  num_workers=num_workers, tower_features=True).cpu()
    atomic_write_bytes(path, save({"features": features.contiguous()}))
    logger.info("cached %d image features in %s", len(paths), path)
    return features


def use_feature_cache(model: CLIP, datasets: dict[str, Any], config: Config, device: torch.device,
                      precision: Precision) -> dict[str, Any]:
    """Swaps every split's images for cached features; later epochs and later runs skip the image tower."""
    if not config.model.image.locked:
        raise ValueError("train.cache_image_features needs model.image.locked: true (features of a tower that "
                         "trains change every step)")
    cache_dir = Path(config.data.root) / ".liteclip_cache"
    swapped = {}
    for split, dataset in datasets.items():
        paths = [image.image_path for image in dataset.images]
        features = cached_image_features(model, paths, cache_dir, device, precision, config.data.num_workers) \
            if paths else torch.empty(0)
        swapped[split] = CachedFeatureDataset(dataset, features)
    return swapped


# ------------------------------------------------------------------------------------------ run bookkeeping


class CsvLog:
    """Appends rows to a CSV, flushing each; on resume drops rows past the resumed step so none repeat."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.fields: list[str] | None = None
        if path.is_file():
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows:
                self.fields = list(rows[0].keys())
            if resume_step is not None:
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                self._rewrite(kept)
            elif rows:
                self._rewrite([])  # a fresh run starts a fresh log
                self.fields = None

    def _rewrite(self, rows: list[dict]) -> None:
        with tempfile.NamedTemporaryFile("w", newline="", dir=self.path.parent, delete=False) as tmp:
            if self.fields and rows:
                writer = csv.DictWriter(tmp, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp.name, self.path)
        if not rows:
            self.fields = None

    def __call__(self, row: dict) -> None:
        new_file = self.fields is None
        if new_file:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()


class TensorBoardLog:
    """Mirrors logged rows to TensorBoard when the tensorboard package is installed; a no-op otherwise."""

    def __init__(self, directory: Path, prefix: str):
        self.prefix = prefix
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(directory))

    def __call__(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.prefix}/{key}", value, row["step"])
        self.writer.flush()


def check_writable(*directories: Path) -> None:
    """Fails before training, not after an hour, if an output directory cannot take a checkpoint."""
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"x" * 1024)
            probe.unlink()
        except OSError as error:
            raise PermissionError(f"cannot write to {directory} ({error.strerror}); choose another "
                                  f"train.output_dir / train.model_dir or free some space") from None
        for stale in directory.glob(".*.tmp"):  # left by a run killed in the middle of a checkpoint write
            stale.unlink(missing_ok=True)
        free = shutil.disk_usage(directory).free
        if free < 64 * 2**20:
            raise OSError(f"only {free // 2**20} MiB free in {directory}; checkpoints need more")


def training_state(model: CLIP, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   state: TrainState, config: Config) -> dict[str, Any]:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": state.epoch, "step": state.step, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
        "rng": {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": config.to_dict(),
    }


def restore(path: Path, model: CLIP, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
            state: TrainState) -> None:
    checkpoint = load_checkpoint(path)
    load_weights(model, checkpoint["model"], str(path))
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
    state.best_metric, state.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    logger.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.step)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        path = output_dir / LAST
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
    return path


# ------------------------------------------------------------------------------------------------------ fit


def fit(config: Config, resume: str | None = None, show_progress: bool = True) -> dict[str, float]:
    """Trains a CLIP model as the config says; returns the final metrics (test split of the best model).

    Args:
        config: the resolved config.
        resume: None, "auto" (the run directory's last checkpoint, if any) or a checkpoint path.
        show_progress: tqdm bars.
    """
    ctx = distributed.init_distributed(config.train.device)
    # without it a CPU step can spend two fifths of its time faulting freed activations back in (liteclip.runtime)
    with keep_freed_memory_for(ctx.device, config.train.keep_cpu_memory):
        return train_and_export(config, ctx, resume, show_progress)


def train_and_export(config: Config, ctx: distributed.DistributedContext, resume: str | None,
                     show_progress: bool) -> dict[str, float]:
    """fit's body: everything from the data to the exported best model, in one process of the run."""
    output_dir, model_dir = Path(config.train.output_dir), Path(config.train.model_dir)
    if ctx.is_main:
        check_writable(output_dir, model_dir.parent if model_dir.parent != Path("") else Path("."))
        atomic_write_bytes(output_dir / "config.yaml", config.to_yaml().encode())
        splits = load_splits(config.data)  # the demo data is generated here, once, by rank 0
    distributed.barrier()
    if not ctx.is_main:
        splits = load_splits(config.data)

    seed_everything(config.train.seed)  # identical initial weights on every rank
    model = build_model(config.model).to(ctx.device)
    datasets = build_datasets(config.data, model.data_config, splits)
    precision = resolve_precision(config.train.precision, ctx.device)
    if config.train.cache_image_features:
        datasets = use_feature_cache(model, datasets, config, ctx.device, precision)
    loaders = build_dataloaders(config.data, model.tokenizer, config.model.text.max_length, model.data_config,
                                datasets, seed=config.train.seed, rank=ctx.rank, world_size=ctx.world_size,
                                pin_memory=ctx.device.type == "cuda")
    optimizer = build_optimizer(model, config.optim, ctx.device.type)
    if config.train.compile:
        compile_towers(model)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision.dtype == torch.float16 else None
    steps_per_epoch = len(loaders["train"]) // config.train.accum_steps
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)

    state = TrainState()
    resume_path = resolve_resume(resume, output_dir)
    if resume_path is not None:
        restore(resume_path, model, optimizer, scaler, state)
    train_model = model
    if ctx.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    resume_step = state.step if resume_path else None
    step_log = CsvLog(output_dir / "metrics.csv", resume_step) if ctx.is_main else None
    epoch_log = CsvLog(output_dir / "epochs.csv", resume_step) if ctx.is_main else None
    board = {name: TensorBoardLog(output_dir / "tensorboard", name) for name in ("train", "val")} if ctx.is_main else {}

    def log_row(row: dict) -> None:
        if step_log is not None:
            step_log(row)
            board["train"](row)

    logger.info("training %d epochs x %d steps on %s (%s), %d process(es)", config.train.epochs, steps_per_epoch,
                ctx.device, precision.dtype or "fp32", ctx.world_size)

    while state.epoch < config.train.epochs and (config.train.max_steps is None or
                                                 state.step < config.train.max_steps):
        seed_everything(epoch_seed(config.train.seed, state.epoch) + ctx.rank)
        loaders["train"].sampler.set_epoch(state.epoch)  # data order and every sample's augmentation
        train_loss = train_one_epoch(train_model, loaders["train"], optimizer, state, config, total_steps,
                                     precision, scaler, ctx.device, log_row, show_progress and ctx.is_main)
        state.epoch += 1
        if ctx.is_main:
            metrics = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss}
            last_epoch = state.epoch == config.train.epochs
            if state.epoch % config.train.eval_every == 0 or last_epoch:
                metrics.update(evaluate(model, loaders["val"], ctx.device, precision))
            # best by validation recall; a run without a validation split falls back to the training loss
            score = metrics.get("mean_recall", -train_loss if len(loaders["val"].dataset) == 0 else None)
            if score is not None and score > state.best_metric:
                state.best_metric, state.best_epoch = score, state.epoch
                save_checkpoint(output_dir / BEST, training_state(model, optimizer, scaler, state, config))
            save_checkpoint(output_dir / LAST, training_state(model, optimizer, scaler, state, config))
            epoch_log(metrics)
            board["val"](metrics)
            logger.info("epoch %d: %s", state.epoch, format_metrics(metrics))
        distributed.barrier()

    final = {}
    if ctx.is_main:
        final = export_best(model, output_dir, model_dir, config, loaders["test"], ctx.device, precision)
    distributed.barrier()
    distributed.cleanup()
    return final


def export_best(model: CLIP, output_dir: Path, model_dir: Path, config: Config, test_loader: DataLoader,
                device: torch.device, precision: Precision) -> dict[str, float]:
    """Loads the best checkpoint, evaluates it on the test split and writes it with save_pretrained."""
    if (output_dir / BEST).is_file():
        load_weights(model, load_checkpoint(output_dir / BEST)["model"], str(output_dir / BEST))
    metrics = {f"test_{k}": v for k, v in evaluate(model, test_loader, device, precision).items()}
    if config.data.dataset == "demo" and config.train.zero_shot_eval:
        metrics.update(evaluate_demo_zero_shot(model, config.data.root, device, precision))
    model.save_pretrained(model_dir, full_config=config)
    (output_dir / "final_metrics.csv").write_text(
        "metric,value\n" + "".join(f"{k},{v}\n" for k, v in metrics.items()))
    logger.info("test: %s", format_metrics(metrics))
    logger.info("best model saved to %s", model_dir)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
