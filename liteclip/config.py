"""Typed configuration: frozen dataclasses loaded strictly from YAML.

Every YAML key maps onto a dataclass field. An unknown key is an error that names the key, the file and the
closest valid spelling (timm's argparse-from-YAML accepts typos silently; we don't). Values are type-checked, and
dotted command-line overrides (`--set optim.lr=1e-4`) apply on top before validation.

This module imports nothing from the rest of the package but its error types: every other room reads its own
section from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from liteclip.errors import ConfigError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on a tower, from the peft library: only they (and the heads) train."""

    rank: int = 8
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0
    # module names (or name suffixes) to adapt; empty: peft's own choice for a Hugging Face tower (query and value
    # projections); a timm tower needs names, e.g. [mlp.fc1, mlp.fc2] for ConvNeXt
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageEncoderConfig:
    name: str = "convnext_tiny"  # any timm model name, optionally with a pretrained tag: "convnext_tiny.fb_in1k"
    # hf: a Hugging Face vision model (its pooler output), e.g. CLIP's ViT; open_clip: an open_clip model's own image
    # tower (set by model.init_from: open_clip:...)
    source: Literal["timm", "hf", "open_clip"] = "timm"
    pretrained: bool = True  # load timm's pretrained weights (needs the hub or its cache)
    weights_file: str | None = None  # local .safetensors/.pth for users who downloaded weights by hand
    tune: Literal["full", "locked", "lora"] = "full"  # locked: frozen (LiT), eval mode; lora: adapters only
    lora: LoraConfig = field(default_factory=LoraConfig)
    image_size: int | None = None  # override the tower's own input size (timm data config)
    mean: tuple[float, float, float] | None = None  # override the tower's normalisation mean
    std: tuple[float, float, float] | None = None  # override the tower's normalisation std
    crop_pct: float | None = None  # override the evaluation center-crop fraction (1.0: keep the whole image)
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and GPU
    # more keyword arguments for timm.create_model, as timm's train.py --model-kwargs takes them: drop_path_rate,
    # or an architecture's own (a ResNet's channels and stem_width); saved with the model, so it loads the same
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def locked(self) -> bool:
        return self.tune == "locked"


@dataclass(frozen=True)
class TextEncoderConfig:
    name: str = "google/bert_uncased_L-4_H-256_A-4"  # Hugging Face hub name or local directory (bert-mini)
    source: Literal["hf", "open_clip"] = "hf"  # open_clip: an open_clip model's text tower (model.init_from)
    pretrained: bool = True  # false: same architecture from its config, random init
    # mean: attention-masked mean (liteCLIP); eos: last real token; pooler: the tower's own pooled output (SigLIP)
    pooling: Literal["mean", "cls", "eos", "pooler"] = "mean"
    # longest: a batch is padded to its longest caption, pads masked out; max_length: every caption padded to
    # max_length and the pads seen, as checkpoints trained that way need (SigLIP)
    padding: Literal["longest", "max_length"] = "longest"
    max_length: int = 128  # captions are truncated here; batches are padded only to their longest caption
    # on a CPU a batch's captions are sorted by length and encoded in this many groups, each padded to its own
    # longest: the same embeddings with fewer pad tokens computed (1: one padded batch; a GPU batch stays whole)
    length_groups: int = 4
    tune: Literal["full", "locked", "lora"] = "full"  # locked: frozen, eval mode; lora: adapters only
    lora: LoraConfig = field(default_factory=LoraConfig)
    trust_remote_code: bool = False  # never on by default: it runs code downloaded with the model

    @property
    def locked(self) -> bool:
        return self.tune == "locked"


@dataclass(frozen=True)
class ProjectionConfig:
    kind: Literal["residual", "residual_mlp", "linear", "identity"] = "residual"  # see ProjectionHead
    dim: int = 256  # shared embedding size
    dropout: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    logit_scale_init: float = math.log(1 / 0.07)  # the paper's initial temperature 0.07
    logit_scale_max: float = math.log(100.0)  # the paper clips the scale at 100
    learn_logit_scale: bool = True  # false: fixed temperature (the Simple-CLIP recipe uses 1.0)
    # a learned bias added to every logit; null: none (CLIP, whose softmax would ignore it). With loss.name: siglip
    # and neither set, both take the SigLIP paper's values (SIGLIP_INIT); a value given explicitly wins
    logit_bias_init: float | None = None
    # start from a Hugging Face CLIP checkpoint (hub name or directory, e.g. openai/clip-vit-base-patch32): its towers,
    # linear heads, temperature, tokenizer and preprocessing replace image/text/projection above, except the
    # towers' `tune` settings and learn_logit_scale, which still apply
    init_from: str | None = None


# ------------------------------------------------------------------------------------------------------------ loss


@dataclass(frozen=True)
class LossConfig:
    # clip: symmetric cross-entropy (Radford et al. 2021); siglip: pairwise sigmoid (Zhai et al. 2023), which adds a
    # learned bias to the logits (model.logit_bias_init, the paper's init unless set)
    name: Literal["clip", "siglip"] = "clip"
    # two captions of one image in a batch (data.train_captions: all) are not each other's negatives: such pairs
    # are left out of the loss (liteclip.loss). false: every off-diagonal pair is a negative, as liteCLIP trained
    mask_same_image: bool = True


@dataclass(frozen=True)
class DistillConfig:
    # a frozen CLIP teacher: a liteclip model directory or a Hugging Face CLIP checkpoint; its embeddings of the
    # training set are computed once and cached (liteclip.train.distill); null: no distillation
    teacher: str | None = None
    weight: float = 1.0  # the KL term's weight next to the contrastive loss
    temperature: float = 1.0  # both similarity distributions are softened by it
    trust_remote_code: bool = False  # let a teacher folder that carries Python code of its own run it


# ------------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["demo", "flickr8k", "csv", "webdataset"] = "demo"
    root: str = "data/demo"  # dataset folder; for csv the folder image paths are relative to
    captions_file: str | None = None  # csv: the CSV/TSV file (relative to root); flickr8k: override the auto-detection
    image_column: str = "image"  # csv: column holding the image path
    caption_column: str = "caption"  # csv: column holding the caption
    split_column: str | None = None  # csv: optional column with train/val/test
    encoding: str = "utf-8"  # text encoding of the captions file (e.g. latin-1, cp1252; a UTF-8 BOM is accepted)
    val_fraction: float = 0.1  # used only when the dataset ships no split files; split is by image
    test_fraction: float = 0.1
    split_seed: int = 0
    train_captions: Literal["one", "all"] = "one"  # one: each image once per epoch with a random caption
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop bad rows, count and report them
    batch_size: int = 64
    eval_batch_size: int | None = None  # defaults to batch_size
    num_workers: int = 2
    max_train_samples: int | None = None  # cap for quick experiments
    # every training and validation image stays in memory once decoded, so later epochs skip the file and its
    # decoding: for small datasets decoded in the training process (num_workers: 0; a worker keeps its own copy,
    # for as long as it lives), at the decoded size (3000 images at 64 px: 37 MB)
    keep_decoded_images: bool = False
    augment: bool = True  # random resized crop + light colour jitter on the training split
    horizontal_flip: bool = False  # off: captions say "left" and "right"
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop area range
    # webdataset: training streams from tar shards (liteclip.data.shards); evaluation reads val_shards/test_shards,
    # or the val/test splits of eval_dataset read from root as usual
    shards: str | None = None  # brace pattern, e.g. data/cc/train-{000000..000099}.tar, or URLs webdataset opens
    epoch_samples: int | None = None  # samples in one training epoch, over all ranks (a stream has no length)
    shuffle_buffer: int = 1000  # samples each reader shuffles among (besides a new shard order every epoch)
    val_shards: str | None = None
    test_shards: str | None = None
    eval_dataset: Literal["demo", "flickr8k", "csv"] | None = None  # val/test from this dataset kind instead
    # built-in demo data (generated into `root` on first use)
    demo_num_images: int = 3000
    demo_image_size: int = 96
    demo_seed: int = 0

    @property
    def evaluation_batch_size(self) -> int:
        """eval_batch_size, or batch_size where it is not set."""
        return self.eval_batch_size or self.batch_size


# ----------------------------------------------------------------------------------------------------------- optim


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 5e-4  # heads and temperature
    tower_lr: float | None = None  # pretrained towers; None: same as lr
    weight_decay: float = 0.1  # never applied to biases, norms or logit_scale
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    grad_clip: float | None = 1.0  # max gradient norm; None: off
    # layer-wise lr decay for both towers (e.g. 0.75): the top layer at tower_lr, each below at this times the
    # one above (BEiT; liteclip.train.optim.layer_scales says how layers are found); null: one rate per tower
    layer_decay: float | None = None


# ----------------------------------------------------------------------------------------------------------- train


RETENTION_KINDS = ("zeroshot", "flickr8k", "csv", "demo")


@dataclass(frozen=True)
class RetentionSet:
    """An evaluation set a fine-tuning run must not get worse on (train.retention), from its spec:

        zeroshot:FOLDER        FOLDER/<class name>/*.jpg, classified zero-shot ("a photo of a {}.") -> top-1 %
        flickr8k:ROOT[@split]  a Flickr8K folder's val split (or the split named), as a retrieval set -> mean recall
        csv:FILE[@split]       a captions CSV or TSV (image, caption[, split]) -> mean recall
        demo:ROOT[@split]      a demo data folder -> mean recall
    """

    kind: str
    path: Path
    split: str = "val"

    @property
    def name(self) -> str:
        """The column it is logged under: retention_<kind>_<folder or file name>[_<split>]."""
        stem = "".join(c if c.isalnum() else "_" for c in (self.path.stem if self.kind == "csv" else self.path.name))
        suffix = "" if self.kind == "zeroshot" or self.split == "val" else f"_{self.split}"
        return f"retention_{self.kind}_{stem or 'root'}{suffix}"

    @property
    def metric(self) -> str:
        return "top1" if self.kind == "zeroshot" else "mean_recall"


def parse_retention_set(spec: str) -> RetentionSet:
    """A RetentionSet from its spec (see RetentionSet); a spec of another shape is a ConfigError naming it."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in RETENTION_KINDS or not rest.strip():
        raise ConfigError(f"train.retention: {_shown(spec)} is not a retention set; write zeroshot:FOLDER, "
                          f"flickr8k:ROOT, csv:FILE or demo:ROOT (a dataset may end in @train, @val or @test)")
    path, split = rest, "val"
    head, at, tail = rest.rpartition("@")
    if kind != "zeroshot" and at and head and tail in ("train", "val", "test"):  # else an @ in a folder's name
        path, split = head, tail
    return RetentionSet(kind, Path(path).expanduser(), split)



@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where supported, fp16 on older GPUs
    output_dir: str = "runs/demo"  # checkpoints, metrics.csv, config.yaml
    model_dir: str = "model"  # best model exported here with save_pretrained; ZeroShotPipeline() loads it
    accum_steps: int = 1  # >1: gradient caching over accum_steps sub-batches (negatives span all of them)
    log_every: int = 10  # steps between loss read-backs (each one is a host-device sync)
    eval_every: int = 1  # epochs between evaluations
    # minutes between checkpoints written inside an epoch (a crash then costs minutes, not the epoch); null: only
    # at the end of each epoch. SIGTERM and SIGINT always write one and stop (liteclip.train.preemption)
    checkpoint_every_minutes: float | None = 15.0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # exponential moving average of the weights, updated after every optimiser step and used for evaluation, the
    # best checkpoint and the exported model (e.g. 0.999; null: off)
    ema_decay: float | None = None
    ema_evaluate_raw: bool = False  # with ema_decay: also evaluate the raw weights (raw_* columns in epochs.csv)
    compile: bool = False  # torch.compile both towers; whatever dynamo cannot compile runs eagerly instead
    cache_image_features: bool = False  # locked image tower: compute its features once and keep them on disk
    # with cache_image_features: 1 caches each training image once through the evaluation transform (no
    # augmentation); K > 1 caches K augmented views of it, and every epoch each sample takes one of them at random
    # (MobileCLIP's stored augmentations), so a locked tower trains with augmentation at cached cost
    cached_views: int = 1
    # CPU: keep memory freed by one step for the next instead of faulting it back in (glibc, liteclip.runtime):
    # page faults on every step's fresh activations cost more than the memory kept (benchmarks/README.md measures it)
    keep_cpu_memory: bool = True
    zero_shot_eval: bool = True  # datasets that define zero-shot labels (the demo): accuracy on the test split
    # evaluation sets the run must not get worse on (RetentionSet: zeroshot:FOLDER, flickr8k:ROOT, csv:FILE,
    # demo:ROOT), evaluated before the first step and with every validation, as retention_* columns
    retention: tuple[str, ...] = ()
    # WiSE-FT at the end of the run: the best model interpolated with the run's own starting weights at each alpha
    # (0: the start, 1: the best model), scored on val and train.retention, the best by their mean (--pick
    # balanced) saved to train.model_dir + "-wise-ft"; empty: off
    wise_ft_alphas: tuple[float, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys renamed since earlier configs: old dotted key -> new dotted key.
RENAMED_KEYS: dict[str, str] = {
    "train.lr": "optim.lr",
    "train.batch_size": "data.batch_size",
    "model.image.model_name": "model.image.name",
    "model.text.model_name": "model.text.name",
    "model.projection.projection_dim": "model.projection.dim",
    "model.temperature": "model.logit_scale_init",
}
# Keys still read, under their new name, with a warning: old dotted key -> (new key, old value -> new value).
DEPRECATED_KEYS: dict[str, tuple[str, dict[Any, Any]]] = {
    "model.image.locked": ("tune", {True: "locked", False: "full"}),
    "model.text.locked": ("tune", {True: "locked", False: "full"}),
}


# --------------------------------------------------------------------------------------------------------- loading


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/, installed with liteclip


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file as given, or else a config shipped with liteclip by its name ("demo", "demo.yaml", or
    "configs/demo.yaml" from outside the repository)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if len(path.parts) <= 2 and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist; the configs shipped with liteclip, usable by name "
                      f"(--config demo): {', '.join(names) or 'none found'}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config strictly and applies dotted overrides.

    Args:
        path: YAML file, or the name of a shipped config ("demo", "liteclip", ...); None gives the defaults.
        overrides: `key.sub=value` strings; values are parsed as YAML (`1e-4`, `true`, `[1, 2]`).

    Returns:
        The validated, frozen Config.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = read_yaml(path, ConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, optim, train)")
        raw = loaded or {}
    for override in overrides or []:
        _apply_override(raw, override)
    return config_from_dict(raw, source)


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error instead of the last one
    silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (lines {seen[key]} and {line}); "
                                f"keep one", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1's numbers minus its base-60 ones, so `1:30` stays the text it looks like (YAML 1.1 reads it as 90; YAML
# 1.2 dropped the rule); hex, octal, binary and underscores stay as YAML 1.1 has them
YAML_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
YAML_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in entries if tag not in NUMBER_TAGS]
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver(NUMBER_TAGS[0], YAML_INT, list("-+0123456789"))
StrictLoader.add_implicit_resolver(NUMBER_TAGS[1], YAML_FLOAT, list("-+0123456789."))


def read_yaml(path: Path, error_type: type[Exception]) -> Any:
    """A YAML file's data, read strictly (StrictLoader); text that is not UTF-8 or not YAML is `error_type`."""
    data = path.read_bytes()
    try:
        # YAML allows UTF-16 with a byte-order mark (Windows editors write it); anything else must be UTF-8
        text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8-sig")
        return yaml.load(text, Loader=StrictLoader)
    except RecursionError:
        raise error_type(f"{path}: nests lists or mappings too deep to read; a config needs a handful of "
                         f"levels") from None
    except UnicodeDecodeError as error:
        raise error_type(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                         f"save it as UTF-8, the encoding YAML configs use") from None
    except yaml.YAMLError as error:
        raise error_type(f"{path}: not valid YAML: {error}") from None


MAX_CONFIG_VALUES = 10_000  # a config has a few hundred; YAML aliases nested in aliases can make billions
MAX_CONFIG_DEPTH = 32  # sections, lists and mappings inside one another (a config goes five deep)


def count_values(value: Any, budget: int) -> tuple[int, int]:
    """(how many values `value` holds, counting every shared (aliased) part each time it appears, and how deep it
    nests), counting no further than `budget` values."""
    count, depth, stack = 0, 0, [(value, 1)]
    while stack and count <= budget:
        item, level = stack.pop()
        count, depth = count + 1, max(depth, level)
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in (*item.keys(), *item.values()))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, level + 1) for child in item)
    return count, depth


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Builds a Config from nested plain data, with the same strict checks as load_config."""
    count, depth = count_values(raw, MAX_CONFIG_VALUES)
    if count > MAX_CONFIG_VALUES:
        raise ConfigError(f"{source}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases, *name, "
                          f"repeated inside one another); a config needs a few hundred: write the values out")
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{source}: nests lists or mappings more than {MAX_CONFIG_DEPTH} deep; a config needs a "
                          f"handful of levels")
    config = _build(Config, raw, prefix="", source=source)
    config = with_siglip_init(config, raw)
    validate(config, source)
    return config


# the SigLIP paper's initialisation (Zhai et al. 2023, section 3.2): temperature t = 10 (log t = log 10), bias -10,
# so the loss starts near the all-negative pairs' value; open_clip's SigLIP configs start there too
SIGLIP_INIT = {"logit_scale_init": math.log(10.0), "logit_bias_init": -10.0}


def with_siglip_init(config: Config, raw: dict[str, Any]) -> Config:
    """With loss.name: siglip and no logit bias given, the paper's initialisation: the bias, and the temperature
    unless `raw` sets model.logit_scale_init itself (an explicit value always wins)."""
    if config.loss.name != "siglip" or config.model.logit_bias_init is not None:
        return config
    given = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    updates = {key: value for key, value in SIGLIP_INIT.items() if given.get(key) is None}
    logger.info("loss.name: siglip with the paper's initialisation: %s",
                ", ".join(f"model.{key}={value:.6g}" for key, value in updates.items()))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **updates))


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.load(value_text, Loader=StrictLoader)
    except yaml.YAMLError:
        value = value_text
    except RecursionError:
        raise ConfigError(f"override {key.strip()}=...: the value nests lists or mappings too deep to read") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # an empty section in the YAML (`model:`) is an empty mapping
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {_shown(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if dotted in DEPRECATED_KEYS:
            key, (new_key, values) = DEPRECATED_KEYS[dotted][0], DEPRECATED_KEYS[dotted]
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {dotted} must be true or false, got {_shown(value)}")
            logger.warning("%s: %s is now %s%s; read as %s: %s", source, dotted, prefix, new_key, new_key,
                           values[value])
            dotted, value = f"{prefix}{key}", values[value]
        if key not in fields:
            raise ConfigError(_unknown_key_message(dotted, key, fields, source))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{dotted}.", source)
        else:
            kwargs[key] = _check_type(value, hint, dotted, source)
    return cls(**kwargs)


def _shown(value: Any) -> str:
    """A value as a message shows it: repr, cut short (a long list or string is elided with ...)."""
    shortener = reprlib.Repr()
    shortener.maxstring, shortener.maxother, shortener.maxlevel = 120, 120, 3
    return shortener.repr(value)


def _unknown_key_message(dotted: str, key: str, fields: dict, source: str) -> str:
    if dotted in RENAMED_KEYS:
        return f"{source}: key {dotted!r} was renamed to {RENAMED_KEYS[dotted]!r}; please update the config"
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(fields)}"
    return f"{source}: unknown key {dotted!r}{hint}"


def _check_type(value: Any, hint: Any, dotted: str, source: str) -> Any:
    """Returns value coerced to hint (int->float, list->tuple), or raises naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, option, dotted, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: {dotted}={_shown(value)} is not one of {list(args)}{suggestion}")
        return value
    if origin is dict:  # dict[str, Any]: keyword arguments, passed on as they are
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{source}: {dotted} must be a mapping of names to values, got {_shown(value)}")
        non_finite = non_finite_numbers(value, dotted)
        if non_finite:
            key, number = non_finite[0]
            raise ConfigError(f"{source}: {key}={number!r} is not a finite number; give an ordinary value")
        return dict(value)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {dotted} must be a list, got {_shown(value)}")
        return tuple(_check_type(v, args[0], f"{dotted}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {dotted} must be a list of {len(args)} values, got {_shown(value)}")
        return tuple(_check_type(v, a, f"{dotted}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:  # PyYAML reads "1e-4" (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, int) and abs(number) > 1e300:  # float() of a 400-digit integer overflows
            number = math.inf if number > 0 else -math.inf
        if isinstance(number, (int, float)):
            # .inf, 1e309 and .nan would train a NaN model (an infinite lr is NaN weights one step later)
            if not math.isfinite(number):
                raise ConfigError(f"{source}: {dotted}={_shown(value)} is not a finite number; give an ordinary "
                                  f"value such as 1e-4")
            return float(number)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{source}: {dotted} must be {getattr(hint, '__name__', hint)}, got {_shown(value)}")


def non_finite_numbers(value: Any, dotted: str) -> list[tuple[str, float]]:
    """(key, number) for every NaN or infinite float inside nested mappings and lists."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(dotted, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in non_finite_numbers(item, f"{dotted}.{key}")]
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in non_finite_numbers(item, f"{dotted}[{i}]")]
    return []


def validate(config: Config, source: str = "<config>") -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (config.data.batch_size > 0, "data.batch_size", config.data.batch_size, "must be > 0"),
        (config.data.num_workers >= 0, "data.num_workers", config.data.num_workers, "must be >= 0"),
        (config.optim.lr > 0, "optim.lr", config.optim.lr, "must be > 0"),
        (config.optim.tower_lr is None or config.optim.tower_lr > 0, "optim.tower_lr", config.optim.tower_lr,
         "must be > 0 (lock the tower to freeze it)"),
        (config.optim.weight_decay >= 0, "optim.weight_decay", config.optim.weight_decay, "must be >= 0"),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps", config.optim.warmup_steps, "must be >= 0"),
        (config.train.epochs > 0, "train.epochs", config.train.epochs, "must be > 0"),
        (config.train.accum_steps >= 1, "train.accum_steps", config.train.accum_steps, "must be >= 1"),
        (config.train.log_every >= 1, "train.log_every", config.train.log_every, "must be >= 1"),
        (config.train.eval_every >= 1, "train.eval_every", config.train.eval_every, "must be >= 1 (epochs)"),
        (config.train.ema_decay is None or 0 < config.train.ema_decay < 1, "train.ema_decay", config.train.ema_decay,
         "must be in (0, 1), e.g. 0.999, or null for no average"),
        (config.train.checkpoint_every_minutes is None or config.train.checkpoint_every_minutes > 0,
         "train.checkpoint_every_minutes", config.train.checkpoint_every_minutes, "must be > 0, or null for none"),
        (config.train.max_steps is None or config.train.max_steps > 0, "train.max_steps", config.train.max_steps,
         "must be > 0, or null for no limit"),
        (config.optim.grad_clip is None or config.optim.grad_clip > 0, "optim.grad_clip", config.optim.grad_clip,
         "must be > 0, or null for no clipping"),
        (config.data.eval_batch_size is None or config.data.eval_batch_size > 0, "data.eval_batch_size",
         config.data.eval_batch_size, "must be > 0, or null for data.batch_size"),
        (config.data.max_train_samples is None or config.data.max_train_samples > 0, "data.max_train_samples",
         config.data.max_train_samples, "must be > 0, or null for all"),
        (0 < config.data.crop_scale[0] <= config.data.crop_scale[1] <= 1, "data.crop_scale", config.data.crop_scale,
         "must be [min, max] with 0 < min <= max <= 1 (fractions of the image area)"),
        (config.model.image.image_size is None or config.model.image.image_size > 0, "model.image.image_size",
         config.model.image.image_size, "must be > 0 pixels, or null for the tower's own size"),
        (config.data.demo_num_images >= 20, "data.demo_num_images", config.data.demo_num_images,
         "must be >= 20 (a tenth each goes to validation and test)"),
        (16 <= config.data.demo_image_size <= 4096, "data.demo_image_size", config.data.demo_image_size,
         "must be between 16 and 4096"),
        (0 <= config.model.projection.dropout < 1, "model.projection.dropout", config.model.projection.dropout,
         "must be in [0, 1)"),
        (0 < config.model.projection.dim <= 65536, "model.projection.dim", config.model.projection.dim,
         "must be between 1 and 65536"),
        (config.model.text.max_length > 1, "model.text.max_length", config.model.text.max_length, "must be > 1"),
        (config.model.text.length_groups >= 1, "model.text.length_groups", config.model.text.length_groups,
         "must be >= 1 (1: each batch encoded whole)"),
        (0 <= config.data.val_fraction < 1 and 0 <= config.data.test_fraction < 1
         and config.data.val_fraction + config.data.test_fraction < 1,
         "data.val_fraction/test_fraction", (config.data.val_fraction, config.data.test_fraction),
         "must be fractions that leave some training images"),
    ]
    checks += [*_stream_checks(config), *_optimiser_checks(config.optim), *_adapter_and_cache_checks(config),
               *_tower_and_teacher_checks(config)]
    for ok, key, value, rule in checks:
        if not ok:
            raise ConfigError(f"{source}: {key}={_shown(value)} {rule}")
    for alpha in config.train.wise_ft_alphas:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{source}: train.wise_ft_alphas has {alpha}; each alpha is between 0 (the start) and "
                              f"1 (the fine-tuned model)")
    names = [parse_retention_set(spec).name for spec in config.train.retention]  # each spec's shape, at load
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: train.retention names two sets that would be logged under one column "
                          f"({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give each its own "
                          f"folder or file name")


def _tower_and_teacher_checks(config: Config) -> list[tuple[bool, str, Any, str]]:
    """Tower arguments only where timm reads them, and written as YAML reads them; the teacher's ranges."""
    kwargs = config.model.image.model_kwargs
    return [
        (config.model.image.source == "timm" or not kwargs, "model.image.model_kwargs", kwargs,
         "is for timm towers; a Hugging Face tower's architecture comes from its config.json"),
        # YAML reads {stem_width:16} (no space after the colon) as one key with no value, which timm drops unread
        (all(str(key).isidentifier() and value is not None for key, value in kwargs.items()),
         "model.image.model_kwargs", kwargs,
         "must be argument names with values, written {name: value} with a space after each colon"),
        (config.distill.weight >= 0, "distill.weight", config.distill.weight, "must be >= 0"),
        (config.distill.temperature > 0, "distill.temperature", config.distill.temperature, "must be > 0"),
    ]


def _optimiser_checks(optim: OptimConfig) -> list[tuple[bool, str, Any, str]]:
    """Adam's own ranges (torch.optim checks some of them only at the first step, with a traceback)."""
    return [
        (0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", optim.min_lr_ratio,
         "must be in [0, 1]: the cosine floor as a fraction of the peak lr"),
        (all(0 <= beta < 1 for beta in optim.betas), "optim.betas", list(optim.betas),
         "must be two values in [0, 1), e.g. [0.9, 0.98]"),
        (optim.eps > 0, "optim.eps", optim.eps, "must be > 0, e.g. 1e-6"),
        (optim.layer_decay is None or 0 < optim.layer_decay <= 1, "optim.layer_decay", optim.layer_decay,
         "must be in (0, 1], e.g. 0.75, or null for one rate per tower"),
    ]


def _adapter_and_cache_checks(config: Config) -> list[tuple[bool, str, Any, str]]:
    """LoRA's ranges on each tower, and cached views only where features are cached."""
    checks = []
    for tower in ("image", "text"):
        lora = getattr(config.model, tower).lora
        checks += [(lora.rank >= 1, f"model.{tower}.lora.rank", lora.rank, "must be >= 1 (e.g. 8)"),
                   (lora.alpha > 0, f"model.{tower}.lora.alpha", lora.alpha, "must be > 0 (e.g. 2 * rank)"),
                   (0 <= lora.dropout < 1, f"model.{tower}.lora.dropout", lora.dropout, "must be in [0, 1)")]
    views = config.train.cached_views
    checks += [(views >= 1, "train.cached_views", views, "must be >= 1 (1: no augmentation)"),
               (views == 1 or config.train.cache_image_features, "train.cached_views", views,
                "needs train.cache_image_features: true (and a locked image tower)")]
    return checks


def _stream_checks(config: Config) -> list[tuple[bool, str, Any, str]]:
    """What data.dataset: webdataset needs: shards, a stated epoch length, and evaluation data from one place."""
    data = config.data
    stream = data.dataset == "webdataset"
    eval_from_shards = data.val_shards is not None or data.test_shards is not None
    return [
        (not stream or bool(data.shards), "data.shards", data.shards,
         "must name the training shards for data.dataset: webdataset, e.g. data/cc/train-{000000..000099}.tar"),
        (not stream or (data.epoch_samples or 0) > 0, "data.epoch_samples", data.epoch_samples,
         "must be > 0 for data.dataset: webdataset (a stream has no length; the shard command prints the count)"),
        (data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer, "must be >= 1 (1: no shuffling)"),
        (stream or (data.shards is None and not eval_from_shards and data.eval_dataset is None),
         "data.dataset", data.dataset, "must be webdataset to use data.shards, val_shards, test_shards or "
         "eval_dataset"),
        (not (eval_from_shards and data.eval_dataset), "data.eval_dataset", data.eval_dataset,
         "and data.val_shards/test_shards are two sources for evaluation: set one of them"),
        # both run over the list of training images before the first step; a stream has no such list
        (not (stream and (config.train.cache_image_features or config.distill.teacher)), "data.dataset",
         data.dataset, "cannot be used with train.cache_image_features or distill.teacher yet: they need a list of "
                       "training images (use data.dataset: csv or flickr8k)"),
    ]


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
