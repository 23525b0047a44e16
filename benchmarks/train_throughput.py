"""Training throughput: the liteCLIP reference setup and open_clip against liteclip's defaults, side by side on the
same batches.

    python -m benchmarks.train_throughput                              # convnext_tiny + bert-mini shape, 224 px
    python -m benchmarks.train_throughput --without keep_cpu_memory    # also liteclip minus one lever
    python -m benchmarks.train_throughput --config configs/demo.yaml --batch-size 64
    python -m benchmarks.train_throughput --batch-size 16 --steps 4 --image-size 160

With --config, the image tower (name, input size, model_kwargs) comes from the config, and so does the text tower
when it is a local directory; a hub text tower is replaced by a random one of bert-mini's shape (no downloads here).

The levers, all off in the reference (as liteCLIP trains) and all on in liteclip's defaults:
    dynamic_padding    captions tokenised per batch and padded to its longest (reference: per sample in
                       __getitem__, padded to 128 tokens)
    channels_last      NHWC image tower and pixels
    autocast           bf16 autocast where the hardware has it (as train.precision: auto decides: liteclip.precision)
    lazy_readback      the loss read back every 50 steps (reference: one `.item()` per step)
    fused_optimizer    fused AdamW (reference: torch.optim.AdamW's default, a loop over tensors on a CPU)
    pin_memory         pinned host batches, copied without blocking (CUDA)
    keep_cpu_memory    freed memory kept for the next step instead of faulted back in (CPU, glibc; liteclip.runtime)

open_clip (pip install open-clip-torch; skipped with a message when absent) is the codebase users would otherwise
pick. Its variant builds the same towers through open_clip's own classes (CustomTextCLIP: the timm tower by name,
the Hugging Face text tower from the same local directory, mean pooling, linear projections) and trains the same
images and caption texts as open_clip does: captions tokenised per sample by its HFTokenizer (padded to 77 tokens),
its ClipLoss, AdamW without decay on gains and biases, and its recommended precision, autocast through
open_clip_train's get_autocast ("amp", fp16, on CUDA; "amp_bf16" on a CPU with native bf16; fp32 on other CPUs).

Each variant runs in its own process, since the allocator setting is process-wide and so that each one's peak
memory is its own. Steps alternate a, b, a, b (one process computing at a time) so that a noisy shared machine slows
all alike; every process builds the same random batches from the same seed. Random init: weights do not change the
cost. The text tower is built offline with bert-mini's shape (4 layers, 256 wide, 30,522-token vocabulary).
Prints per-variant samples/s, the share of time spent waiting for data and peak memory, then
`speedup_vs_open_clip=<float>` (when it ran) and, as its last line, `speedup_vs_reference=<float>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import multiprocessing
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.image_tower import synchronize
from liteclip.config import config_from_dict
from liteclip.data.captions import CaptionCollator
from liteclip.data.demo import write_text_tower
from liteclip.loss import clip_loss
from liteclip.model import build_model
from liteclip.train.optim import build_optimizer, param_groups
from liteclip.runtime import keep_freed_memory_for
from liteclip.precision import Precision, resolve_precision

WORDS = ("a man in a red shirt is climbing a rock wall while two dogs run across the green grass near the water "
         "and a child in a blue jacket jumps off a wooden bench at the park").split()


@dataclass(frozen=True)
class Levers:
    dynamic_padding: bool = True
    channels_last: bool = True
    autocast: bool = True
    lazy_readback: bool = True
    fused_optimizer: bool = True
    pin_memory: bool = True
    keep_cpu_memory: bool = True


REFERENCE = Levers(**{lever.name: False for lever in dataclasses.fields(Levers)})
DEFAULTS = Levers()


@dataclass(frozen=True)
class Settings:
    text_dir: str
    image_model: str
    image_size: int
    batch_size: int
    steps: int
    workers: int
    image_model_kwargs: dict = field(default_factory=dict)  # model.image.model_kwargs from --config


def text_positions(text_dir: str) -> int:
    """How many token positions the text tower has (liteCLIP pads to 128, open_clip to 77: at most this many)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(text_dir).max_position_embeddings


TEXT_SHAPES = {  # name: (layers, hidden width, attention heads); the feed-forward is 4x the width in both
    "bert-mini": (4, 256, 4),     # google/bert_uncased_L-4_H-256_A-4
    "minilm-l3": (3, 384, 12),    # nreimers/MiniLM-L3-H384-uncased
}


def write_text_shape(directory: Path, shape: str = "bert-mini") -> Path:
    """A random text tower of a known model's shape (TEXT_SHAPES), with a 30,522-token vocabulary and 512
    positions, written offline."""
    from transformers import AutoConfig

    layers, width, heads = TEXT_SHAPES[shape]
    write_text_tower(directory, WORDS, hidden_size=width, num_layers=layers, num_heads=heads)
    config = AutoConfig.from_pretrained(directory)
    config.vocab_size, config.max_position_embeddings = 30522, 512
    config.save_pretrained(directory)
    return directory


def captions(count: int, seed: int = 0) -> list[str]:
    """Flickr-like captions: 8 to 20 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 21))) for _ in range(count)]


class ReferenceDataset(Dataset):
    """liteCLIP's shape: every sample tokenised alone and padded to max_length in __getitem__."""

    def __init__(self, images: torch.Tensor, texts: list[str], tokenizer, max_length: int = 128):
        self.images, self.texts, self.tokenizer, self.max_length = images, texts, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        tokens = self.tokenizer(self.texts[index], padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"pixel_values": self.images[index], "input_ids": tokens["input_ids"][0],
                "attention_mask": tokens["attention_mask"][0]}


class DefaultDataset(Dataset):
    """liteclip's sample contract: the caption stays text until the collate function pads the batch."""

    def __init__(self, images: torch.Tensor, texts: list[str]):
        self.images, self.texts = images, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "caption": self.texts[index], "image_index": index}


class Variant:
    """One training setup: its model, optimiser and loader, stepped one batch at a time."""

    def __init__(self, levers: Levers, settings: Settings, device: torch.device):
        self.levers, self.device = levers, device
        config = config_from_dict({"model": {
            "image": {"name": settings.image_model, "pretrained": False, "image_size": settings.image_size,
                      "channels_last": levers.channels_last, "model_kwargs": settings.image_model_kwargs},
            "text": {"name": settings.text_dir, "pretrained": False,
                     "max_length": min(128, text_positions(settings.text_dir))}}})
        torch.manual_seed(0)
        self.model = build_model(config.model).to(device).train()
        if levers.fused_optimizer:
            self.optimizer = build_optimizer(self.model, config.optim)
        else:
            self.optimizer = torch.optim.AdamW(param_groups(self.model, config.optim))

        count = settings.batch_size * (settings.steps + 1)
        torch.manual_seed(0)
        images = torch.randn(count, 3, settings.image_size, settings.image_size)
        texts = captions(count)
        tokenizer = self.model.tokenizer
        # liteCLIP pads to 128; a tower with fewer positions (the demo's 64) is padded to its limit instead
        max_length = self.model.config.text.max_length
        pin = levers.pin_memory and device.type == "cuda"
        common = {"batch_size": settings.batch_size, "shuffle": False, "num_workers": settings.workers,
                  "pin_memory": pin}
        if levers.dynamic_padding:
            loader = DataLoader(DefaultDataset(images, texts), collate_fn=CaptionCollator(tokenizer, max_length),
                                **common)
        else:
            loader = DataLoader(ReferenceDataset(images, texts, tokenizer, max_length), **common)
        self.iterator = iter(loader)
        self.non_blocking = pin
        bf16 = resolve_precision("auto", device).dtype == torch.bfloat16  # as train.precision: auto decides
        self.precision = Precision(torch.bfloat16 if levers.autocast and bf16 else None, device.type)
        self.read_every = 50 if levers.lazy_readback else 1
        self.steps = 0
        self.pending = torch.zeros((), device=device)

    def step(self) -> tuple[int, float, float]:
        """One optimiser step; returns (samples, seconds waiting for data, seconds computing)."""
        start = time.perf_counter()
        batch = next(self.iterator)
        batch = {k: v.to(self.device, non_blocking=self.non_blocking) for k, v in batch.items() if k != "image_index"}
        loaded = time.perf_counter()
        with self.precision.autocast():
            out = self.model(**batch)
        loss = clip_loss(out.logits_per_image.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending += loss.detach()
        self.steps += 1
        if self.steps % self.read_every == 0:
            self.pending.item()  # the host-device sync; every step for the reference, rarely for the default
            self.pending.zero_()
        synchronize(self.device)  # the timing needs the work finished; training itself does not wait here
        end = time.perf_counter()
        return len(batch["input_ids"]), loaded - start, end - loaded


def open_clip_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("open_clip", "open_clip_train"))


class OpenClipVariant:
    """The same towers, batches and optimiser settings, trained as open_clip trains them."""

    def __init__(self, settings: Settings, device: torch.device):
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg
        from open_clip_train.precision import get_autocast

        self.device = device
        vision = CLIPVisionCfg(timm_model_name=settings.image_model, timm_model_pretrained=False, timm_pool="avg",
                               timm_proj="linear", image_size=settings.image_size)
        text = CLIPTextCfg(hf_model_name=settings.text_dir, hf_tokenizer_name=settings.text_dir,
                           hf_model_pretrained=False, hf_pooler_type="mean_pooler", hf_proj_type="linear",
                           context_length=min(77, text_positions(settings.text_dir)))
        torch.manual_seed(0)
        self.model = open_clip.CustomTextCLIP(256, vision, text).to(device).train()
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=5e-4, betas=(0.9, 0.98),
                                           eps=1e-6)
        self.loss = open_clip.ClipLoss()
        bf16 = resolve_precision("auto", device).dtype == torch.bfloat16
        self.precision_name = "amp" if device.type == "cuda" else "amp_bf16" if bf16 else "fp32"
        self.autocast = get_autocast(self.precision_name, device_type=device.type)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision_name == "amp" else None

        count = settings.batch_size * (settings.steps + 1)
        torch.manual_seed(0)
        images = torch.randn(count, 3, settings.image_size, settings.image_size)
        tokenizer = open_clip.tokenizer.HFTokenizer(settings.text_dir, context_length=text.context_length)
        dataset = OpenClipDataset(images, captions(count), tokenizer)
        self.iterator = iter(DataLoader(dataset, batch_size=settings.batch_size, shuffle=False,
                                        num_workers=settings.workers, pin_memory=device.type == "cuda"))

    def step(self) -> tuple[int, float, float]:
        start = time.perf_counter()
        images, texts = (t.to(self.device, non_blocking=True) for t in next(self.iterator))
        loaded = time.perf_counter()
        with self.autocast():
            image_features, text_features, logit_scale = self.model(images, texts)
            loss = self.loss(image_features, text_features, logit_scale)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))  # as open_clip's train_one_epoch does every step
        synchronize(self.device)
        return len(images), loaded - start, time.perf_counter() - loaded


class OpenClipDataset(Dataset):
    """open_clip's CsvDataset shape: the caption tokenised (padded to the context length) in __getitem__."""

    def __init__(self, images: torch.Tensor, texts: list[str], tokenizer):
        self.images, self.texts, self.tokenizer = images, texts, tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.tokenizer([self.texts[index]])[0]


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # KiB on Linux


def serve_variant(connection, levers: Levers | None, settings: Settings) -> None:
    """Child process: builds one variant (open_clip's when levers is None), then runs one step each time the parent
    asks."""
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with keep_freed_memory_for(device, levers is not None and levers.keep_cpu_memory):
            variant = Variant(levers, settings, device) if levers is not None else OpenClipVariant(settings, device)
            connection.send(("ready", torch.get_num_threads()))
            while connection.recv() == "step":
                connection.send(("step", variant.step()))
            connection.send(("peak", peak_memory(device)))
    except Exception:
        connection.send(("error", traceback.format_exc()))


class VariantProcess:
    def __init__(self, name: str, levers: Levers | None, settings: Settings, context):
        self.name = name
        self.connection, child = context.Pipe()
        # not a daemon: a daemon may not start children, and the variants' DataLoaders do with --workers;
        # main() kills what is left if it fails
        self.process = context.Process(target=serve_variant, args=(child, levers, settings))
        self.process.start()
        self.samples, self.steps, self.data_seconds, self.compute_seconds = 0, 0, 0.0, 0.0

    def receive(self, expected: str):
        kind, value = self.connection.recv()
        if kind == "error":
            raise RuntimeError(f"variant {self.name!r} failed:\n{value}")
        assert kind == expected, (kind, expected)
        return value

    def step(self, measure: bool) -> None:
        self.connection.send("step")
        samples, data_seconds, compute_seconds = self.receive("step")
        if measure:
            self.samples += samples
            self.steps += 1
            self.data_seconds += data_seconds
            self.compute_seconds += compute_seconds

    def finish(self) -> tuple[float, str]:
        self.connection.send("stop")
        peak = self.receive("peak")
        self.process.join()
        total = self.data_seconds + self.compute_seconds
        rate = self.samples / total
        print(f"{self.name:34s} {rate:9.2f} {total / self.steps:8.2f} {100 * self.data_seconds / total:9.1f}%   {peak}")
        return rate, peak


def run_side_by_side(processes: list[VariantProcess], args: argparse.Namespace,
                     text_source: Path | None) -> dict[str, float]:
    """Alternates the variants' steps, prints the table, returns samples/s by variant name."""
    threads = {process.receive("ready") for process in processes}
    for step in range(args.steps + 1):
        for process in processes:
            process.step(measure=step > 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads_text = "/".join(map(str, sorted(threads)))
    kwargs_text = f" ({args.image_model_kwargs})" if args.image_model_kwargs else ""
    print(f"device: {device}, {args.image_model}{kwargs_text} at {args.image_size} px + "
          f"{text_source or 'bert-mini shape'}, "
          f"batch {args.batch_size}, {args.steps} measured steps each after 1 warm-up, threads {threads_text}, "
          f"one process per variant")
    print(f"{'variant':34s} {'samples/s':>9s} {'s/step':>8s} {'data wait':>10s}   peak memory")
    return {process.name: process.finish()[0] for process in processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="take the towers from this YAML (random init)")
    parser.add_argument("--image-model", default=None, help="timm name (default convnext_tiny, or the config's)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default 224, or the config's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant (after 1 warm-up step)")
    parser.add_argument("--workers", type=int, default=0)
    lever_names = [lever.name for lever in dataclasses.fields(Levers)]
    parser.add_argument("--without", action="append", default=[], choices=lever_names, metavar="LEVER",
                        help=f"also run liteclip's defaults minus this lever (repeatable): {', '.join(lever_names)}")
    parser.add_argument("--no-open-clip", action="store_true", help="leave out the open_clip variant")
    args = parser.parse_args()
    text_source, args.image_model_kwargs = None, {}
    if args.config:
        from liteclip.config import load_config

        config = load_config(args.config)
        args.image_model = args.image_model or config.model.image.name.split(".")[0]
        args.image_size = args.image_size or config.model.image.image_size
        args.image_model_kwargs = dict(config.model.image.model_kwargs)
        if Path(config.model.text.name).is_dir():
            text_source = Path(config.model.text.name)
    args.image_model = args.image_model or "convnext_tiny"
    args.image_size = args.image_size or 224

    with tempfile.TemporaryDirectory() as tmp:
        text_dir = text_source or write_text_shape(Path(tmp) / "bert_mini_shape")
        settings = Settings(str(text_dir), args.image_model, args.image_size, args.batch_size, args.steps,
                            args.workers, args.image_model_kwargs)
        variants = [("reference", REFERENCE), ("liteclip", DEFAULTS)]
        variants += [(f"liteclip without {name}", dataclasses.replace(DEFAULTS, **{name: False}))
                     for name in args.without]
        if args.no_open_clip:
            pass
        elif args.image_model_kwargs:
            print("open_clip: skipped, as its timm tower is built by name alone and the config sets "
                  f"model.image.model_kwargs={args.image_model_kwargs}")
        elif open_clip_installed():
            variants.append(("open_clip", None))
        else:
            print("open_clip: not installed, skipped (pip install open-clip-torch for the side-by-side)")
        context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no inherited allocator state
        processes: list[VariantProcess] = []
        try:
            for name, levers in variants:  # one at a time, so that a failed start still kills the ones before it
                processes.append(VariantProcess(name, levers, settings, context))
            rates = run_side_by_side(processes, args, text_source)
        finally:
            for process in processes:  # after a failure the others would wait for their next step forever
                process.process.kill()
    if "open_clip" in rates:
        print(f"speedup_vs_open_clip={rates['liteclip'] / rates['open_clip']:.3f}")
    print(f"speedup_vs_reference={rates['liteclip'] / rates['reference']:.3f}")


if __name__ == "__main__":
    main()
