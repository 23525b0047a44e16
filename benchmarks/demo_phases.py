"""Where the demo main job's time goes, phase by phase: data generation, decoding and augmentation, the forward and
backward passes, the optimiser, the per-epoch evaluation, the test and zero-shot evaluation, and the export.

    python -m benchmarks.demo_phases                                   # configs/demo.yaml, 2 epochs timed
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.demo_phases   # as an AVX2-only CPU runs it
    python -m benchmarks.demo_phases --set model.image.image_size=48 data.demo_image_size=48

Builds the run as `train.py` does (the same config, builders, loader, step and evaluators) in a temporary folder,
then times each phase on its own: the loader is drained once without training (decoding and augmentation), and each
step is split into forward (both towers and the loss), backward and optimiser with nothing else between them. The
first epoch is a warm-up (what it costs beyond a later one is printed too: compilation, under train.compile); the
figures are the mean over the epochs after it. The step's FLOPs (torch's FlopCounterMode) over its forward and
backward time give its rate, in an fp32 run also as a fraction of this CPU's fp32 matmul and conv peaks
(`benchmarks.kernels`). Ends with the whole run projected from the phases: generation + epochs x (epoch + its
evaluation) + the first epoch's extra + test + export. Run it alone: a second heavy job on 2 cores slows both
several times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kernels import cpu_model_name, fp32_peaks
from liteclip import distributed
from liteclip.config import Config, load_config
from liteclip.data import load_splits, prepare_dataset, set_data_epoch
from liteclip.train.optim import lr_multiplier, set_lr
from liteclip.loss import clip_loss, siglip_loss
from liteclip.runtime import keep_freed_memory_for
from liteclip.train.loop import (TrainingSetup, build_training, evaluate_split, optimizer_step, pair_logits,
                               same_image_pairs, seed_everything, to_device, zero_shot_metrics)

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Phases:
    """Seconds per phase, summed over the timed epochs."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def step_phases(setup: TrainingSetup, batch: dict[str, torch.Tensor], step: int, config: Config,
                phases: Phases) -> None:
    """One training step as contrastive_step and optimizer_step run it (one micro-batch), each part timed."""
    contrastive = clip_loss if setup.loss_name == "clip" else siglip_loss
    exclude = same_image_pairs([batch]) if setup.mask_same_image else None
    inputs = {key: value for key, value in batch.items() if key != "image_index"}
    set_lr(setup.optimizer, lr_multiplier(step, setup.total_steps, config.optim))
    start = time.perf_counter()
    with setup.precision.autocast():
        out = setup.train_model(**inputs)
    loss = contrastive(pair_logits(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale,
                                   out.logit_bias), exclude)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer_step(setup.train_model, setup.optimizer, None, config.optim.grad_clip)
    done = time.perf_counter()
    phases.add("forward (towers + loss)", forward - start)
    phases.add("backward", backward - forward)
    phases.add("optimiser", done - backward)


def step_flops(setup: TrainingSetup, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward and backward (the optimiser's elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, setup.precision.autocast():
        out = setup.train_model(**{key: value for key, value in batch.items() if key != "image_index"})
        pair_logits(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale, None).sum().backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_epoch(setup: TrainingSetup, config: Config, epoch: int, phases: Phases) -> int:
    """Drains the epoch's loader once (decoding and augmentation), then trains it phase by phase, then evaluates as
    the trainer does after an epoch. Returns the steps trained."""
    seed_everything(epoch)
    set_data_epoch(setup.train_loader, epoch)
    start = time.perf_counter()
    batches = [to_device(batch, setup.device) for batch in setup.train_loader]
    phases.add("decode + augment + collate", time.perf_counter() - start)
    setup.train_model.train()
    for index, batch in enumerate(batches):
        step_phases(setup, batch, epoch * len(batches) + index, config, phases)
    start = time.perf_counter()
    evaluate_split(setup, "val", config.data)
    phases.add("evaluation after the epoch", time.perf_counter() - start)
    return len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as train.py takes them")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time; the first is a warm-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="liteclip-phases-") as folder:
        root = Path(folder) / "demo"
        config = load_config(args.config, [f"data.root={root}", f"model.text.name={root / 'text_encoder'}",
                                           f"train.output_dir={folder}/run", f"train.model_dir={folder}/model",
                                           *args.set])
        start = time.perf_counter()
        prepare_dataset(config.data)  # as the trainer generates it: count, size and seed from the config
        generation = time.perf_counter() - start
        report(config, generation, args.epochs)


def report(config: Config, generation: float, epochs: int) -> None:
    ctx = distributed.init_distributed(config.train.device)
    with keep_freed_memory_for(ctx.device, config.train.keep_cpu_memory):
        setup = build_training(config, load_splits(config.data), ctx)
        phases, steps = Phases(), 0
        for epoch in range(epochs):
            if epoch == 1:
                warm_up = sum(phases.seconds.values())
                phases = Phases()
                steps = 0
            steps += time_epoch(setup, config, epoch, phases)
        timed_epochs = max(epochs - 1, 1)
        start = time.perf_counter()
        evaluate_split(setup, "test", config.data)
        zero_shot_metrics(setup, config.data)
        test = time.perf_counter() - start
        start = time.perf_counter()
        setup.eval_model.save_pretrained(config.train.model_dir, full_config=config, metrics={})
        export = time.perf_counter() - start
        flops = step_flops(setup, to_device(next(iter(setup.train_loader)), setup.device))
    print(f"CPU: {cpu_model_name()}; threads {torch.get_num_threads()}; precision {setup.precision.name}; "
          f"image tower {config.model.image.name} at {config.model.image.image_size} px, batch "
          f"{config.data.batch_size}, {steps // timed_epochs} steps an epoch")
    per_epoch = {name: seconds / timed_epochs for name, seconds in phases.seconds.items()}
    warm_up_excess = warm_up - sum(per_epoch.values()) if epochs > 1 else 0.0
    print(f"{'phase':<34}{'s':>9}")
    print(f"{'data generation (once)':<34}{generation:>9.2f}")
    for name, seconds in per_epoch.items():
        print(f"{name + ' (an epoch)':<34}{seconds:>9.2f}")
    print(f"{'test + zero-shot evaluation':<34}{test:>9.2f}")
    if epochs > 1:  # what the first epoch cost beyond a timed one: start-up, and compilation under train.compile
        print(f"{'first epoch beyond a later one':<34}{warm_up_excess:>9.2f}")
    print(f"{'export (save_pretrained)':<34}{export:>9.2f}")
    compute = per_epoch["forward (towers + loss)"] + per_epoch["backward"]
    rate = flops * steps / timed_epochs / compute / 1e9
    if setup.precision.name == "fp32":
        peaks = fp32_peaks()
        print(f"step: {flops / 1e9:.1f} GFLOP forward + backward, {rate:.0f} GFLOP/s: "
              f"{rate / peaks['matmul']:.0%} of the fp32 matmul peak ({peaks['matmul']:.0f} GFLOP/s), "
              f"{rate / peaks['conv']:.0%} of the fp32 conv peak ({peaks['conv']:.0f} GFLOP/s)")
    else:  # bf16 kernels have peaks of their own (benchmarks.kernels compares the two formats)
        print(f"step: {flops / 1e9:.1f} GFLOP forward + backward, {rate:.0f} GFLOP/s in {setup.precision.name} "
              f"(the fraction of the fp32 peaks is printed for fp32 runs: --set train.precision=fp32)")
    projected = generation + config.train.epochs * sum(per_epoch.values()) + warm_up_excess + test + export
    print(f"projected_run_s={projected:.1f}")


if __name__ == "__main__":
    main()
