"""Datasets and data loaders, built from the data section of a config.

    splits = load_splits(cfg.data)                                  # {"train", "val", "test"} -> [CaptionedImage]
    loaders = build_dataloaders(cfg.data, tokenizer, max_length, data_config)
    task = zero_shot_task(cfg.data, "test")                          # ZeroShotTask, or None without class labels

This package is where dataset kinds are named; everything above it (the trainer, the evaluators) reads the contracts
in captions.py and never asks which dataset it has.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from liteclip.config import DataConfig
from liteclip.data import demo
from liteclip.data.captions import (BadRowPolicy, CaptionCollator, CaptionedImage, DataError, ImageCaptionDataset,
                                    SeededSampler, ZeroShotTask, read_caption_csv)
from liteclip.data.flickr8k import read_flickr8k
from liteclip.data.shards import ShardStream, expand_shards, extract_shards
from liteclip.data.transforms import build_transforms, decode_side

__all__ = ["CaptionCollator", "CaptionedImage", "DataError", "ImageCaptionDataset", "ZeroShotTask", "build_dataloaders",
           "build_datasets", "load_splits", "prepare_dataset", "set_data_epoch", "zero_shot_task"]


def prepare_dataset(config: DataConfig, generate: bool = True) -> Path:
    """Makes sure the dataset is on disk and returns its root; the demo data is generated on first use unless
    `generate` is off (evaluation never writes data: a missing demo set is then an error)."""
    root = Path(config.root)
    if config.dataset == "demo":
        if not generate:  # read as it is: a demo folder made with other settings is never regenerated here
            if not (root / demo.MARKER).is_file():
                raise DataError(f"data.root={root} holds no demo data (looked in {root.resolve()}); evaluation does "
                                f"not generate it. Run from the directory the model was trained in, or set "
                                f"data.root.")
            return root
        return demo.ensure_demo_data(root, config.demo_num_images, config.demo_image_size, config.demo_seed)
    if not root.is_dir():
        hint = (f"`python -m liteclip.data download flickr8k --root {root}` fetches it" if config.dataset == "flickr8k"
                else "point data.root at the folder your captions file's image paths are relative to")
        raise DataError(f"data.root={root} does not exist; {hint}")
    return root


def load_splits(config: DataConfig, policy: BadRowPolicy | None = None,
                generate: bool = True) -> dict[str, list[CaptionedImage]]:
    """Reads the configured dataset into image-level train/val/test splits (generate: see prepare_dataset)."""
    if config.dataset == "webdataset":
        return stream_splits(config, policy, generate)
    root = prepare_dataset(config, generate)
    policy = policy or BadRowPolicy(config.on_bad_row)
    if config.dataset == "csv":
        if not config.captions_file:
            raise DataError("data.captions_file must name the CSV/TSV file when data.dataset is csv")
        splits = read_caption_csv(root / config.captions_file, root, config.image_column, config.caption_column,
                                  config.split_column, config.val_fraction, config.test_fraction, config.split_seed,
                                  policy, config.encoding)
        policy.summarise()
    else:
        splits = read_flickr8k(root, config.captions_file, config.val_fraction, config.test_fraction,
                               config.split_seed, policy, config.encoding)
    if not splits["train"]:
        raise DataError(f"{root}: the training split is empty")
    if config.max_train_samples is not None:
        splits["train"] = splits["train"][:config.max_train_samples]
    return splits


def stream_splits(config: DataConfig, policy: BadRowPolicy | None = None,
                  generate: bool = True) -> dict[str, list[CaptionedImage]]:
    """The evaluation splits of a run that trains from shards (the training split streams; see ShardStream): the
    val/test splits of data.eval_dataset, or the images of data.val_shards / test_shards, unpacked once."""
    if config.eval_dataset is not None:
        splits = load_splits(dataclasses.replace(config, dataset=config.eval_dataset), policy, generate)
        return {"train": [], "val": splits["val"], "test": splits["test"]}
    cache = Path(config.root) / ".liteclip_cache"
    return {"train": [],
            "val": extract_shards(config.val_shards, cache, "data.val_shards") if config.val_shards else [],
            "test": extract_shards(config.test_shards, cache, "data.test_shards") if config.test_shards else []}


def zero_shot_task(config: DataConfig, split: str = "test") -> ZeroShotTask | None:
    """The dataset's own zero-shot classification task on a split, if it has class labels (the demo does)."""
    if config.dataset == "demo" or config.eval_dataset == "demo":
        return demo.zero_shot_task(config.root, split)
    return None


def build_datasets(config: DataConfig, data_config: dict[str, Any],
                   splits: dict[str, list[CaptionedImage]] | None = None, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> dict[str, ImageCaptionDataset | ShardStream]:
    """Train/val/test datasets; train draws captions as configured (or streams shards: seed, rank and world_size
    place this process in the stream), evaluation takes each image once."""
    splits = splits if splits is not None else load_splits(config)
    train_tf, eval_tf = build_transforms(data_config, config.augment, config.crop_scale, config.horizontal_flip)
    decode_size = decode_side(data_config)
    if config.dataset == "webdataset":
        train = ShardStream(expand_shards(config.shards), config.epoch_samples, config.batch_size, train_tf,
                            decode_size, config.shuffle_buffer, seed, rank, world_size)
    else:
        # a training image that does not decode is replaced and reported, never fatal: found hours into a run, it
        # would otherwise cost the epoch (`python -m liteclip.data check` finds them all beforehand)
        train = ImageCaptionDataset(splits["train"], train_tf, config.train_captions, decode_size,
                                    skip_undecodable=True, keep_decoded=config.keep_decoded_images)
    return {
        "train": train,
        "val": ImageCaptionDataset(splits["val"], eval_tf, "first", decode_size,
                                   keep_decoded=config.keep_decoded_images),
        "test": ImageCaptionDataset(splits["test"], eval_tf, "first", decode_size),
    }


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: workers leave SIGINT and SIGTERM to the main process (liteclip.train.preemption), which finishes
    its step and stops them itself; a signal sent to the whole process group must not kill a worker first."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)


def build_dataloaders(config: DataConfig, tokenizer: Any, max_length: int, data_config: dict[str, Any],
                      datasets: dict[str, ImageCaptionDataset] | None = None, seed: int = 0, rank: int = 0,
                      world_size: int = 1, pin_memory: bool = False) -> dict[str, DataLoader]:
    """DataLoaders with dynamic padding; under DDP the training split is sharded with a DistributedSampler."""
    datasets = datasets if datasets is not None else build_datasets(config, data_config)
    collate = CaptionCollator(tokenizer, max_length)
    workers = config.num_workers
    # each loader has its own generator for its workers' base seed: drawing it from the global RNG would shift
    # dropout masks depending on how many workers there are and whether they persist
    common = {"collate_fn": collate, "num_workers": workers, "pin_memory": pin_memory,
              "persistent_workers": workers > 0, "worker_init_fn": ignore_stop_signals}
    eval_batch_size = config.evaluation_batch_size
    loaders = {split: DataLoader(datasets[split], batch_size=eval_batch_size, shuffle=False,
                                 generator=torch.Generator().manual_seed(seed), **common) for split in ("val", "test")}
    if isinstance(datasets["train"], ShardStream):
        # workers are started anew each epoch, so each one sees the epoch (and resume position) set_epoch gave
        loaders["train"] = DataLoader(datasets["train"], batch_size=config.batch_size,
                                      **{**common, "persistent_workers": False})
        return loaders
    if world_size > 1:
        order = DistributedSampler(datasets["train"], num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                   drop_last=True)
    else:
        order = RandomSampler(datasets["train"], generator=torch.Generator().manual_seed(seed))
    # every sample carries its own seed, so workers can persist across epochs and a resumed run still replays
    # the exact augmentations and captions (call loader.sampler.set_epoch(epoch) each epoch)
    loaders["train"] = DataLoader(datasets["train"], batch_size=config.batch_size, sampler=SeededSampler(order, seed),
                                  generator=torch.Generator().manual_seed(seed),
                                  drop_last=len(datasets["train"]) > config.batch_size, **common)
    return loaders


def set_data_epoch(loader: DataLoader, epoch: int, consumed_batches: int = 0,
                   stream_shards: dict[str, dict[str, Any]] | None = None) -> None:
    """Sets the training loader's epoch: its data order and every sample's augmentation. A run resumed inside the
    epoch passes the batches already trained on (and, streaming shards, each reader's position) so the epoch goes
    on from there."""
    if isinstance(loader.dataset, ShardStream):
        loader.dataset.set_epoch(epoch, consumed_batches, stream_shards)
    else:
        loader.sampler.set_epoch(epoch, consumed_batches * loader.batch_size)
