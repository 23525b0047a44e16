"""The training loop: fit(config) builds everything from the config, then trains epoch by epoch, evaluating and
checkpointing, and exports the best model.

Shape follows nanoGPT's single readable loop and open_clip's train_one_epoch / evaluate: one step, one epoch, the
end of an epoch, fit. What the loop uses has rooms of its own: precision (the autocast choice), feature_cache (a
locked image tower's features), distill (the teacher's cached embeddings), ema (the weight average), preemption
(checkpoints inside an epoch, stop signals), run_directory (logs, checkpoints, resume, the checks before training)
and evaluation (the evaluators `liteclip eval-retrieval` and `eval-zeroshot` run). The library (model, loss,
pipeline, evaluation) never imports this module.

Determinism: each epoch reseeds torch, NumPy, Python and the data order from (seed, epoch), so a run resumed from an
epoch checkpoint replays the remaining epochs bit for bit, and two CPU runs with one seed give identical losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from liteclip import distributed
from liteclip.files import load_weights, refuse_overlap
from liteclip.config import Config, DataConfig, OptimConfig, RetentionSet, TrainConfig, parse_retention_set
from liteclip.data import (build_dataloaders, build_datasets, ignore_stop_signals, load_splits, set_data_epoch,
                           zero_shot_task)
from liteclip.data.captions import CaptionedImage, SkippedImages, epoch_seed
from liteclip.train.distill import DistillTerm, WithTeacherEmbeddings, teacher_embeddings
from liteclip.train.ema import WeightAverage
from liteclip.embedding import image_file_loader
from liteclip.errors import ConfigError, NonFiniteError, NonFiniteLossError
from liteclip.evaluation import evaluate_retention, evaluate_retrieval, evaluate_zero_shot, retention_task
from liteclip.train.feature_cache import CachedFeatureDataset, use_feature_cache
from liteclip.loss import clip_loss, siglip_loss
from liteclip.model import CLIP, build_model
from liteclip.train.optim import build_optimizer, lr_multiplier, set_lr
from liteclip.precision import Precision, cpu_bf16_is_measured, resolve_precision
from liteclip.pretrained import check_model_folder
from liteclip.train.preemption import StepCheckpoints
from liteclip.train.run_directory import (BEST, LAST, RunDirectory, TrainState, checkpoint_bytes, checkpoint_state,
                                          load_checkpoint, restore)
from liteclip.runtime import keep_freed_memory_for

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- one step


def contrastive_step(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], precision: Precision,
                     scaler: torch.amp.GradScaler | None, loss_name: str = "clip",
                     distill: DistillTerm | None = None, mask_same_image: bool = True) -> torch.Tensor:
    """Forward and backward for one optimiser step; returns the (detached) loss over the whole global batch.

    With one micro-batch this is the plain CLIP step on embeddings gathered across ranks. With k micro-batches it
    is gradient caching: embed all k without gradients, then re-embed each one with gradients against the cached
    embeddings of the others, so every caption is contrasted with all k*B images, as in one batch of k*B.
    loss_name: "clip" (clip_loss) or "siglip" (siglip_loss, on logits with the model's learned bias).
    distill: adds the distillation term on the same global logits, against the teacher embeddings the
    micro-batches carry ("teacher_image_embeds", "teacher_text_embeds").
    mask_same_image: pairs of one image's image and another of its captions (batches that carry "image_index")
    are left out of the loss instead of being negatives (loss.mask_same_image).
    """
    contrastive = clip_loss if loss_name == "clip" else siglip_loss
    if distill is not None:  # the teacher's embeddings in the same global order as the student's logits
        teacher = [torch.cat([distributed.all_gather_no_grad(batch[key].float()) for batch in micro_batches])
                   for key in ("teacher_image_embeds", "teacher_text_embeds")]  # (k*W*B, D_teacher) each
    exclude = same_image_pairs(micro_batches) if mask_same_image else None

    def objective(logits: torch.Tensor) -> torch.Tensor:
        loss = contrastive(logits, exclude)
        return loss if distill is None else loss + distill(logits, *teacher)

    micro_batches = [{k: v for k, v in batch.items() if not k.startswith("teacher_") and k != "image_index"}
                     for batch in micro_batches]
    if len(micro_batches) == 1:
        with precision.autocast():
            out = model(**micro_batches[0])
        image_embeds = distributed.all_gather_with_grad(out.image_embeds)  # (W*B, D)
        text_embeds = distributed.all_gather_with_grad(out.text_embeds)
        loss = objective(pair_logits(image_embeds.float(), text_embeds.float(), out.logit_scale, out.logit_bias))
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
            # the temperature's (and bias's) gradient must be counted once, not k times; the synced (last) pass
            # carries it
            scale = out.logit_scale if index == last else out.logit_scale.detach()
            bias = out.logit_bias if index == last or out.logit_bias is None else out.logit_bias.detach()
            loss = objective(pair_logits(torch.cat(images), torch.cat(texts), scale, bias))
            _backward(loss, scaler)
    return loss.detach()


def same_image_pairs(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """(N, N) bool over the global batch, in the logits' order: off-diagonal pairs whose image is the same image;
    None when there are none (or the batches carry no image_index), so the usual batch takes the plain loss."""
    if any("image_index" not in batch for batch in micro_batches):
        return None
    ids = torch.cat([distributed.all_gather_no_grad(batch["image_index"]) for batch in micro_batches])  # (k*W*B,)
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same if bool(same.any()) else None


def pair_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """(N, N) logits of every image against every text: scale * cosine similarity (+ bias, SigLIP)."""
    logits = scale * image_embeds @ text_embeds.t()
    return logits if bias is None else logits + bias


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
    inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "image_features", "input_ids", "attention_mask",
                                                       "teacher_image_embeds", "teacher_text_embeds", "image_index")}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------- setup


@dataclass
class TrainingSetup:
    """What fit builds from the config before the first step."""

    model: CLIP  # unwrapped: evaluation and checkpoints use it
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper: the steps use it
    datasets: dict[str, Any]  # train / val / test; CachedFeatureDataset with a cached locked tower
    train_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    precision: Precision
    device: torch.device
    total_steps: int
    loss_name: str = "clip"  # loss.name
    mask_same_image: bool = True  # loss.mask_same_image
    distill: DistillTerm | None = None  # distill.teacher: the term added to the loss
    ema: WeightAverage | None = None  # train.ema_decay: the averaged weights, evaluated and exported when on
    skipped_images: SkippedImages = field(default_factory=SkippedImages)  # training images that did not decode
    val_image_loader: DataLoader | None = None  # the val split's images, its workers kept between evaluations
    retention: dict[RetentionSet, Any] = field(default_factory=dict)  # train.retention: each set, read once

    @property
    def eval_model(self) -> CLIP:
        """What evaluation, the best checkpoint's score and the export use: the average if there is one."""
        return self.ema.module if self.ema is not None else self.model


def build_training(config: Config, splits: dict[str, list[CaptionedImage]],
                   ctx: distributed.DistributedContext) -> TrainingSetup:
    """Model, datasets, loader, optimiser and precision, from the config; identical initial weights on every rank."""
    seed_everything(config.train.seed)
    model = build_model(config.model).to(ctx.device)
    datasets = build_datasets(config.data, model.data_config, splits, config.train.seed, ctx.rank, ctx.world_size)
    # auto on a CPU may be measured, and a measurement can differ between ranks: all train in rank 0's choice
    precision = distributed.all_gather_object(resolve_precision(config.train.precision, ctx.device))[0]
    if config.train.cache_image_features:
        augmentation = f"{config.data.augment}:{config.data.crop_scale}:{config.data.horizontal_flip}"
        datasets = use_feature_cache(model, datasets, Path(config.data.root) / ".liteclip_cache", ctx.device,
                                     precision, config.data.num_workers, config.train.cached_views, augmentation)
    distill = None
    if config.distill.teacher:
        teacher = teacher_embeddings(config.distill.teacher, datasets["train"].images,
                                     Path(config.data.root) / ".liteclip_cache", ctx.device, precision,
                                     config.data.num_workers, config.distill.trust_remote_code)
        datasets["train"] = WithTeacherEmbeddings(datasets["train"], teacher)
        distill = DistillTerm(config.distill.weight, config.distill.temperature, teacher.scale)
    loaders = build_dataloaders(config.data, model.tokenizer, config.model.text.max_length, model.data_config,
                                datasets, seed=config.train.seed, rank=ctx.rank, world_size=ctx.world_size,
                                pin_memory=ctx.device.type == "cuda")
    optimizer = build_optimizer(model, config.optim)
    ema = WeightAverage(model, config.train.ema_decay) if config.train.ema_decay else None
    if config.train.compile:
        compile_towers(model)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision.needs_grad_scaler else None
    steps_per_epoch = len(loaders["train"]) // config.train.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(loaders['train'])} training batch(es) of data.batch_size={config.data.batch_size} "
                          f"make no optimiser step of train.accum_steps={config.train.accum_steps}; lower either, "
                          f"or use more data")
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    retention = {spec: retention_task(spec) for spec in map(parse_retention_set, config.train.retention)}
    return TrainingSetup(model, model, datasets, loaders["train"], optimizer, scaler, precision, ctx.device,
                         total_steps, config.loss.name, config.loss.mask_same_image, distill, ema,
                         val_image_loader=validation_image_loader(config.data, model, datasets["val"]),
                         retention=retention)


def validation_image_loader(data: DataConfig, model: CLIP, val: Any) -> DataLoader | None:
    """The val split's image files in a loader whose workers persist between the per-epoch evaluations (a fresh
    loader would fork new workers from the trainer every epoch, which costs more than a small split's decoding). None
    where there are no workers or no files to decode (an empty split, cached features)."""
    if data.num_workers == 0 or len(val) == 0 or isinstance(val, CachedFeatureDataset):
        return None
    return image_file_loader([image.image_path for image in val.images], model.data_config,
                             data.evaluation_batch_size, data.num_workers, persistent_workers=True,
                             worker_init_fn=ignore_stop_signals)


def keep_the_started_precision(setup: TrainingSetup, state: TrainState, choice: str) -> None:
    """Where `auto` is measured on this CPU (cpu_bf16_is_measured), a resumed run trains in the precision its start
    measured, even if the measurement now comes out otherwise on a busy machine. Where features decide (AMX, no
    bf16, GPUs by kind), today's answer stands: a run moved to other hardware takes what suits it. (Cached image
    features, built before the checkpoint is read, stay in the precision measured now.)"""
    if (choice != "auto" or setup.device.type != "cpu" or not cpu_bf16_is_measured() or not state.precision
            or state.precision == setup.precision.name):
        return
    logger.warning("precision auto: this run started in %s and keeps it (measured now: %s); set "
                   "train.precision to choose", state.precision, setup.precision.name)
    setup.precision = resolve_precision(state.precision, setup.device)  # bf16 or fp32: no scaler either way


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


# ------------------------------------------------------------------------------------------------- one epoch


def train_one_epoch(setup: TrainingSetup, state: TrainState, train_config: TrainConfig, optim_config: OptimConfig,
                    log_step: Callable[[dict], None], checkpoints: StepCheckpoints,
                    write_checkpoint: Callable[[], str], show_progress: bool = True) -> float:
    """Trains one epoch, or the rest of one after a mid-epoch checkpoint; returns its mean loss.

    Raises NonFiniteLossError naming the first bad step, and TrainingStopped after writing a checkpoint when a stop
    signal arrived.
    """
    setup.train_model.train()
    device, optimizer = setup.device, setup.optimizer
    last_step = len(setup.train_loader) // train_config.accum_steps  # the epoch's last step, counted from 1
    if train_config.max_steps is not None:
        last_step = max(state.epoch_step, min(last_step, state.epoch_step + train_config.max_steps - state.step))
    progress = tqdm(total=last_step, initial=state.epoch_step, desc=f"epoch {state.epoch + 1}/{train_config.epochs}",
                    leave=False, disable=not show_progress, dynamic_ncols=True)
    # running sums stay on the device: reading a loss back is a host-device sync, done only every log_every steps
    loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
    window_sum = torch.tensor(state.window_loss_sum, device=device)
    window_start = time.perf_counter()
    iterator = iter(setup.train_loader)
    first_step = True
    while state.epoch_step < last_step:
        batches = [next(iterator) for _ in range(train_config.accum_steps)]
        setup.skipped_images.add(entry for batch in batches for entry in batch.get("skipped", ()))
        state.stream_shards.update(batch["stream_position"] for batch in batches if "stream_position" in batch)
        micro_batches = [to_device(batch, device) for batch in batches]
        set_lr(optimizer, lr_multiplier(state.step, setup.total_steps, optim_config))
        try:
            loss = contrastive_step(setup.train_model, micro_batches, setup.precision, setup.scaler, setup.loss_name,
                                    setup.distill, setup.mask_same_image)
        except (TypeError, ValueError, RuntimeError) as error:
            if first_step:
                refuse_tower_arguments(setup.model, error)
            raise
        first_step = False
        optimizer_step(setup.train_model, optimizer, setup.scaler, optim_config.grad_clip)
        if setup.ema is not None:
            setup.ema.update(setup.model)
        state.step += 1
        state.epoch_step += 1
        loss_sum += loss
        window_sum += loss
        state.window_steps += 1
        state.window_samples += sum(len(b["input_ids"]) for b in micro_batches) * distributed.world_size()
        if state.window_steps == train_config.log_every or state.epoch_step == last_step:
            log_step(window_row(state, window_sum, time.perf_counter() - window_start, optimizer, progress))
            window_sum.zero_()
            window_start, state.window_samples, state.window_steps = time.perf_counter(), 0, 0
        progress.update(1)
        write, stop = checkpoints.check()
        if write:
            state.epoch_loss_sum, state.window_loss_sum = loss_sum.item(), window_sum.item()  # a sync, but rare
            path = write_checkpoint()
            checkpoints.written()
            if stop:
                raise checkpoints.stop_error(path, state.step)
    progress.close()
    return (loss_sum / max(state.epoch_step, 1)).item()


def refuse_tower_arguments(model: CLIP, error: Exception) -> None:
    """A ConfigError naming model.image.model_kwargs or model.image.image_size when the first step fails and the
    config set them: timm takes values a tower cannot run with (a drop rate of 2, 1-pixel images) and fails only
    when it runs."""
    image = model.config.image
    settings = [f"model.image.model_kwargs={image.model_kwargs}"] if image.model_kwargs else []
    settings += [f"model.image.image_size={image.image_size}"] if image.image_size is not None else []
    if settings:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise ConfigError(f"the first training step failed ({reason}); the config sets {' and '.join(settings)}, "
                          f"which {image.name} may not run with: check them (model.image.model_kwargs={{}} and "
                          f"model.image.image_size=null give the tower's own)") from error


def window_row(state: TrainState, window_sum: torch.Tensor, elapsed: float, optimizer: torch.optim.Optimizer,
               progress: tqdm) -> dict[str, Any]:
    """The log row of the steps since the last one: their mean loss (the sync point), lr and throughput."""
    window_loss = (window_sum / state.window_steps).item()
    if not math.isfinite(window_loss):
        raise NonFiniteLossError(
            f"non-finite loss ({window_loss}) by optimiser step {state.step} (epoch {state.epoch + 1}); training "
            f"stopped, the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip, or use "
            f"train.precision=fp32.")
    row = {"epoch": state.epoch + 1, "step": state.step, "loss": window_loss, "lr": optimizer.param_groups[-1]["lr"],
           "samples_per_s": state.window_samples / max(elapsed, 1e-9)}
    progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{row['lr']:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
    return row


# ------------------------------------------------------------------------------------------- end of an epoch


def evaluate_split(setup: TrainingSetup, split: str, data: DataConfig, raw: bool = False) -> dict[str, float]:
    """Retrieval recall and contrastive loss on a split, by the evaluator `liteclip eval-retrieval` runs ({} for an
    empty split); of the averaged weights when there are some, unless `raw`."""
    dataset = setup.datasets[split]
    if len(dataset) == 0:
        return {}
    features = dataset.features if isinstance(dataset, CachedFeatureDataset) else None
    model = setup.model if raw else setup.eval_model
    return evaluate_retrieval(model, dataset.images, data.evaluation_batch_size, setup.device,
                              setup.precision.autocast, show_progress=False, num_workers=data.num_workers,
                              image_features=features, loss_name=setup.loss_name,
                              image_loader=setup.val_image_loader if split == "val" else None)


def retention_metrics(setup: TrainingSetup, data: DataConfig) -> dict[str, float]:
    """Each train.retention set's figure ({} without any), of the model evaluation scores."""
    if not setup.retention:
        return {}
    return evaluate_retention(setup.eval_model, setup.retention, data.evaluation_batch_size, setup.device,
                              setup.precision.autocast)


def log_retention_summary(run: RunDirectory, best_epoch: int) -> None:
    """start -> best epoch's -> change, for each retention column of epochs.csv."""
    rows = run.epoch_rows()
    names = [key for key in (rows[0] if rows else {}) if key.startswith("retention_")]
    best = next((row for row in rows if str(row.get("epoch")) == str(best_epoch)), None)
    for name in names:
        start = rows[0].get(name)
        end = best.get(name) if best else None
        if start in (None, "") or end in (None, ""):
            continue
        logger.info("%s: %.2f before the first step -> %.2f at the best epoch (%d): %+.2f", name, float(start),
                    float(end), best_epoch, float(end) - float(start))


def zero_shot_metrics(setup: TrainingSetup, data: DataConfig) -> dict[str, float]:
    """Zero-shot top-1 on the test split's own zero-shot task, overall and per group, by the evaluator `liteclip
    eval-zeroshot` runs ({} for a dataset without class labels)."""
    task = zero_shot_task(data, "test")
    if task is None:
        return {}
    result = evaluate_zero_shot(setup.eval_model, task, data.evaluation_batch_size, setup.device,
                                setup.precision.autocast, show_progress=False, num_workers=data.num_workers)
    metrics = {"zero_shot_top1": result["top1"]}
    metrics.update({f"zero_shot_{group}_top1": values["top1"] for group, values in result["per_group"].items()})
    metrics["zero_shot_chance"] = result["chance"]
    return metrics


def refuse_non_finite_weights(model: nn.Module, state: TrainState) -> None:
    """Stops the run before a checkpoint of weights that hold NaN or infinity is written."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        raise NonFiniteLossError(
            f"after epoch {state.epoch} (step {state.step}) {len(bad)} weight tensor(s) hold NaN or infinity (first: "
            f"{bad[0]}); training stopped, the last good checkpoint is kept. Lower optim.lr or set optim.grad_clip.")


def finite_validation(setup: TrainingSetup, data: DataConfig, state: TrainState,
                      raw: bool = False) -> dict[str, float]:
    """evaluate_split on the val split; non-finite embeddings or a non-finite loss stop the run as a non-finite
    training loss does (a NaN model would otherwise rank every caption first and score 100)."""
    try:
        validation = evaluate_split(setup, "val", data, raw=raw)
    except NonFiniteError as error:
        raise NonFiniteLossError(f"validation after epoch {state.epoch}: {error}. Training stopped; the last good "
                                 f"checkpoint is kept.") from None
    # paired_loss is NaN by definition when no batch has two images (nothing to contrast): not a divergence
    has_pairs = len(setup.datasets["val"]) > 1 and data.evaluation_batch_size > 1
    if validation and has_pairs and not math.isfinite(validation["loss"]):
        raise NonFiniteLossError(
            f"non-finite validation loss ({validation['loss']}) after epoch {state.epoch} (step {state.step}); "
            f"training stopped, the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip, or use "
            f"train.precision=fp32.")
    return validation


def end_epoch(setup: TrainingSetup, state: TrainState, train_loss: float, config: Config,
              run: RunDirectory) -> None:
    """Evaluates (every train.eval_every epochs, and after the last), keeps the best checkpoint by validation
    recall, writes the last one and logs the epoch."""
    metrics: dict[str, Any] = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss}
    if setup.skipped_images:
        metrics["skipped_images"] = len(setup.skipped_images)  # so far in this process, each file counted once
    refuse_non_finite_weights(setup.model, state)
    if state.epoch % config.train.eval_every == 0 or state.epoch == config.train.epochs:
        validation = finite_validation(setup, config.data, state)
        if validation:
            metrics["val_loss"] = validation.pop("loss")
            metrics.update(validation)
        metrics.update(retention_metrics(setup, config.data))
        if setup.ema is not None and config.train.ema_evaluate_raw:
            raw = finite_validation(setup, config.data, state, raw=True)
            metrics.update({f"raw_{'val_loss' if key == 'loss' else key}": value for key, value in raw.items()})
    # best by validation recall; a run without a validation split falls back to the training loss
    score = metrics.get("mean_recall", -train_loss if len(setup.datasets["val"]) == 0 else None)
    improved = score is not None and score > state.best_metric
    if improved:
        state.best_metric, state.best_epoch = score, state.epoch
    run.save(LAST, checkpoint_state(setup.model, setup.optimizer, setup.scaler, state, config, ema=setup.ema))
    if improved:
        run.keep_as(BEST, LAST)  # the same checkpoint: linked, not written twice
    run.log_epoch(metrics)


def export_best(setup: TrainingSetup, config: Config, run: RunDirectory) -> dict[str, float]:
    """Loads the best checkpoint, evaluates it on the test split (and on the dataset's zero-shot task, if it has
    one) and writes it with save_pretrained."""
    best = run.path / BEST
    if best.is_file():
        checkpoint = load_checkpoint(best)
        load_weights(setup.model, checkpoint["model"], str(best))
        if setup.ema is not None:
            setup.ema.averaged.load_state_dict(checkpoint["ema"])
    metrics = {f"test_{k}": v for k, v in evaluate_split(setup, "test", config.data).items()}
    if config.train.zero_shot_eval:
        metrics.update(zero_shot_metrics(setup, config.data))
    setup.eval_model.save_pretrained(config.train.model_dir, full_config=config, metrics=metrics)
    run.write_final_metrics(metrics)
    logger.info("best model saved to %s", config.train.model_dir)
    if config.train.wise_ft_alphas:
        write_wise_ft(setup, config)
    return metrics


def wise_ft_dir(config: Config) -> Path:
    return Path(f"{config.train.model_dir.rstrip('/')}-wise-ft")


def write_wise_ft(setup: TrainingSetup, config: Config) -> None:
    """train.wise_ft_alphas: the best model interpolated with the run's starting weights (rebuilt as the run built
    them: same seed, same config), each alpha scored, the best by the mean of val and retention saved."""
    from liteclip.train.weight_averaging import ModelScorer, interpolate, summary_rows

    seed_everything(config.train.seed)  # build_training's seed and build: the very weights the run started from
    start = build_model(config.model).to(setup.device)
    scorer = ModelScorer(config, setup.device, config.data.evaluation_batch_size)
    rows, best = [], None
    for alpha in sorted(set(config.train.wise_ft_alphas)):
        model, _ = interpolate(start, setup.eval_model, alpha)
        scores = scorer(model)
        rows.append((alpha, scores))
        if best is None or scores.by("balanced") > best[1].by("balanced"):
            best = (alpha, scores, model)
    header, table = summary_rows(rows)
    for row in table:
        logger.info("wise-ft: %s", "  ".join(f"{name}={value}" for name, value in zip(header, row)))
    alpha, scores, model = best
    metrics = {"wise_ft_alpha": alpha, **({"val_mean_recall": scores.val} if scores.val is not None else {}),
               **scores.retention}
    model.save_pretrained(wise_ft_dir(config), full_config=config, metrics=metrics)
    logger.info("WiSE-FT: alpha %g saved to %s", alpha, wise_ft_dir(config))


# ------------------------------------------------------------------------------------------------------ fit


def train_epochs(setup: TrainingSetup, state: TrainState, config: Config, run: RunDirectory,
                 ctx: distributed.DistributedContext, show_progress: bool) -> None:
    """The epochs left to train, each followed by end_epoch; inside an epoch, checkpoints on a timer or a signal."""
    checkpoints = StepCheckpoints(config.train.checkpoint_every_minutes)

    def write_checkpoint() -> str:  # called on every rank at the same step
        rng_per_rank = distributed.all_gather_object(torch.get_rng_state())  # each rank resumes with its own
        for positions in distributed.all_gather_object(dict(state.stream_shards)):  # every rank's readers
            state.stream_shards.update(positions)
        if ctx.is_main:
            run.save(LAST, checkpoint_state(setup.model, setup.optimizer, setup.scaler, state, config, rng_per_rank,
                                            setup.ema))
        distributed.barrier()
        return str(run.path / LAST)

    with checkpoints.catching_stop_signals():
        while state.epoch < config.train.epochs and (config.train.max_steps is None or
                                                     state.step < config.train.max_steps):
            if state.epoch_step == 0:  # a run resumed mid-epoch keeps the RNG state its checkpoint restored
                seed_everything(epoch_seed(config.train.seed, state.epoch) + ctx.rank)
            set_data_epoch(setup.train_loader, state.epoch, state.epoch_step * config.train.accum_steps,
                           state.stream_shards)
            train_loss = train_one_epoch(setup, state, config.train, config.optim,
                                         run.log_step if ctx.is_main else lambda row: None, checkpoints,
                                         write_checkpoint, show_progress and ctx.is_main)
            state.epoch += 1
            state.start_epoch()
            if ctx.is_main:
                end_epoch(setup, state, train_loss, config, run)
            checkpoints.written()  # end_epoch wrote last.pt
            distributed.barrier()


def refuse_writing_into_the_start(config: Config) -> None:
    """A run that starts from a model folder (model.init_from: DIR) never exports into, around or inside it, nor
    keeps its run directory there: the start is what `liteclip wise-ft` needs afterwards."""
    start = config.model.init_from
    if not start or not Path(start).is_dir():
        return
    refuse_overlap(config.train.model_dir, start, "train.model_dir")
    if Path(config.train.output_dir).resolve().is_relative_to(Path(start).resolve()):
        raise ConfigError(f"train.output_dir={config.train.output_dir} is inside model.init_from={start}; keep the "
                          f"run's files outside the model it starts from")


def fit(config: Config, resume: str | None = None, show_progress: bool = True) -> dict[str, float]:
    """Trains a CLIP model as the config says; returns the final metrics (test split of the best model).

    Args:
        config: the resolved config.
        resume: None, "auto" (the run directory's last checkpoint, if any) or a checkpoint path.
        show_progress: tqdm bars.
    """
    refuse_writing_into_the_start(config)  # before the run directory is made
    ctx = distributed.init_distributed(config.train.device)
    run = RunDirectory(config.train.output_dir)
    # without it a CPU step spends much of its time faulting freed activations back in (liteclip.runtime)
    with keep_freed_memory_for(ctx.device, config.train.keep_cpu_memory), \
            run.locked() if ctx.is_main else contextlib.nullcontext():
        resume_path = run.resume_path(resume)
        if ctx.is_main:
            # nothing is written before the checks: a model folder that would refuse the export, a resumed
            # checkpoint whose config cannot be resumed with (prepare compares it first)
            check_model_folder(config.train.model_dir)
            if config.train.wise_ft_alphas:
                check_model_folder(wise_ft_dir(config))
            run.prepare(config, resume_path)
            splits = load_splits(config.data)  # the demo data is generated here, once, by rank 0
        distributed.barrier()
        if not ctx.is_main:
            splits = load_splits(config.data)
        setup = build_training(config, splits, ctx)
        if ctx.is_main:
            run.check_free_space(Path(config.train.model_dir), *checkpoint_bytes(setup.model, setup.optimizer))
        state = TrainState()
        if resume_path is not None:
            restore(resume_path, setup.model, setup.optimizer, setup.scaler, state, ctx.rank, setup.ema)
            keep_the_started_precision(setup, state, config.train.precision)
        state.precision = setup.precision.name
        if ctx.world_size > 1:
            setup.train_model = torch.nn.parallel.DistributedDataParallel(
                setup.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if ctx.is_main:
            run.open_logs(resume_step=state.step if resume_path else None)
            if setup.retention and resume_path is None:  # the starting model's figures: the row before any step
                run.log_epoch({"epoch": 0, "step": 0, **retention_metrics(setup, config.data)})
        logger.info("training %d epochs, %d steps in all, on %s (%s), %d process(es)", config.train.epochs,
                    setup.total_steps, ctx.device, setup.precision.dtype or "fp32", ctx.world_size)

        train_epochs(setup, state, config, run, ctx, show_progress)
        final = export_best(setup, config, run) if ctx.is_main else {}
        if ctx.is_main and setup.retention:
            log_retention_summary(run, state.best_epoch)
        distributed.barrier()
        distributed.cleanup()
        return final
