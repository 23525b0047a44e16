"""Training throughput: the liteCLIP reference setup against liteclip's defaults, side by side on the same batches.

    python -m benchmarks.train_throughput                                  # convnext_tiny + bert-mini shape, 224 px, batch 32
    python -m benchmarks.train_throughput --config configs/demo.yaml --batch-size 64
    python -m benchmarks.train_throughput --batch-size 16 --steps 4 --image-size 160

With --config, the image tower (name, input size) comes from the config, and so does the text tower when it is a
local directory; a hub text tower is replaced by a random one of bert-mini's shape (no downloads here).

(a) reference, as liteCLIP trains: fp32, captions padded to 128 tokens, NCHW, tokenisation per sample in
    __getitem__, one `.item()` per step.
(b) liteclip defaults: dynamic padding in the collate function, channels_last, bf16 autocast where the hardware has
    it (CUDA), the loss read back only every log interval, fused AdamW on CUDA.

Steps alternate a, b, a, b so that a noisy shared machine slows both alike. Random init: weights do not change the
cost. The text tower is built offline with bert-mini's shape (4 layers, 256 wide, 30,522-token vocabulary).
Prints per-variant samples/s, the share of time spent waiting for data, peak memory, and as its last line
`speedup_vs_reference=<float>`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from liteclip.config import config_from_dict
from liteclip.data.captions import CaptionCollator
from liteclip.data.demo import write_text_tower
from liteclip.loss import clip_loss
from liteclip.model import build_model
from liteclip.optim import build_optimizer

WORDS = ("a man in a red shirt is climbing a rock wall while two dogs run across the green grass near the water "
         "and a child in a blue jacket jumps off a wooden bench at the park").split()


def write_bert_mini_shape(directory: Path) -> Path:
    """A random text tower with bert-mini's shape (4 layers, 256 wide, 30,522 tokens, 512 positions), offline."""
    from transformers import AutoConfig

    write_text_tower(directory, WORDS, hidden_size=256, num_layers=4, num_heads=4)
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


def build(text_dir: Path, image_model: str, image_size: int, channels_last: bool, device: torch.device):
    config = config_from_dict({"model": {
        "image": {"name": image_model, "pretrained": False, "image_size": image_size, "channels_last": channels_last},
        "text": {"name": str(text_dir), "pretrained": False, "max_length": 128}}})
    torch.manual_seed(0)
    model = build_model(config.model).to(device).train()
    return model, build_optimizer(model, config.optim, device.type)


class Variant:
    def __init__(self, name: str, model, optimizer, loader, device, autocast_dtype, read_every: int):
        self.name, self.model, self.optimizer, self.device = name, model, optimizer, device
        self.iterator = iter(loader)
        self.autocast_dtype, self.read_every = autocast_dtype, read_every
        self.samples = self.steps = self.measured_steps = 0
        self.data_seconds = self.compute_seconds = 0.0
        self.pending = torch.zeros((), device=device)

    def step(self, measure: bool) -> None:
        start = time.perf_counter()
        batch = next(self.iterator)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "image_index"}
        loaded = time.perf_counter()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
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
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the timing needs the work finished; training itself does not wait here
        end = time.perf_counter()
        if measure:
            self.measured_steps += 1
            self.samples += len(batch["input_ids"])
            self.data_seconds += loaded - start
            self.compute_seconds += end - loaded

    def report(self) -> float:
        total = self.data_seconds + self.compute_seconds
        rate = self.samples / total
        print(f"{self.name:10s} {rate:8.2f} samples/s   {total / self.measured_steps:6.2f} s/step   "
              f"data wait {100 * self.data_seconds / total:5.1f}%")
        return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="take the towers from this YAML (random init)")
    parser.add_argument("--image-model", default=None, help="timm name (default convnext_tiny, or the config's)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default 224, or the config's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant (after 1 warm-up step)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    text_source = None
    if args.config:
        from liteclip.config import load_config

        config = load_config(args.config)
        args.image_model = args.image_model or config.model.image.name.split(".")[0]
        args.image_size = args.image_size or config.model.image.image_size
        if Path(config.model.text.name).is_dir():
            text_source = Path(config.model.text.name)
    args.image_model = args.image_model or "convnext_tiny"
    args.image_size = args.image_size or 224
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    with tempfile.TemporaryDirectory() as tmp:
        text_dir = text_source or write_bert_mini_shape(Path(tmp) / "bert_mini_shape")

        count = args.batch_size * (args.steps + 1)
        torch.manual_seed(0)
        images = torch.randn(count, 3, args.image_size, args.image_size)
        texts = captions(count)
        reference_model, reference_optimizer = build(text_dir, args.image_model, args.image_size, False, device)
        default_model, default_optimizer = build(text_dir, args.image_model, args.image_size, True, device)
        tokenizer = default_model.tokenizer
        # liteCLIP pads to 128; a tower with fewer positions (the demo's 64) is padded to its limit instead
        max_length = min(128, default_model.text_encoder.model.config.max_position_embeddings)
        common = {"batch_size": args.batch_size, "shuffle": False, "num_workers": args.workers,
                  "pin_memory": device.type == "cuda"}
        reference = Variant("reference", reference_model, reference_optimizer,
                            DataLoader(ReferenceDataset(images, texts, tokenizer, max_length), **common), device, None, 1)
        default = Variant("liteclip", default_model, default_optimizer,
                          DataLoader(DefaultDataset(images, texts), collate_fn=CaptionCollator(tokenizer, max_length),
                                     **common), device, torch.bfloat16 if bf16 else None, 50)
        for step in range(args.steps + 1):
            for variant in (reference, default):
                variant.step(measure=step > 0)

    text_name = text_source or "bert-mini shape"
    print(f"device: {device}, {args.image_model} at {args.image_size} px + {text_name}, batch {args.batch_size}, "
          f"{args.steps} measured steps each, threads {torch.get_num_threads()}")
    reference_rate = reference.report()
    default_rate = default.report()
    if device.type == "cuda":
        print(f"peak GPU memory (both models): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak resident memory (process, both models): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"speedup_vs_reference={default_rate / reference_rate:.3f}")


if __name__ == "__main__":
    main()
