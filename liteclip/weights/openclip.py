"""open_clip checkpoints as liteclip models: `model.init_from: open_clip:ARCH[@TAG_OR_FILE]`.

open_clip itself builds the towers and loads the weights, so every architecture it knows (ViTs, timm towers, Hugging
Face text towers, SigLIP in open_clip) works with no copy of its code. liteclip wraps them thinly: the image tower is
open_clip's `visual`, the text tower is the rest of the model calling its own `encode_text`, both already projected
into the shared space (liteclip's heads are `identity`), and the checkpoint's temperature and bias become liteclip's.
Its tokenizer (padded to the context length, as open_clip pads) and its preprocessing come along.

A saved liteclip model keeps the architecture in `open_clip_config.json`, the layout open_clip's own `local-dir:`
reads, and its weights under liteclip's names in model.safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from liteclip.config import ImageEncoderConfig, ModelConfig, ProjectionConfig, TextEncoderConfig
from liteclip.weights.huggingface import ConvertedCLIP
from liteclip.errors import ConfigError, ModelLoadError

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"  # open_clip's own name for it (local-dir: models)
TOKENIZER_FILE = "open_clip_tokenizer.json"


def is_open_clip(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"open_clip:ViT-B-32@laion2b_s34b_b79k" -> ("ViT-B-32", "laion2b_s34b_b79k"); the part after @ is a
    pretrained tag or a weights file, and may be left out (open_clip's `local-dir:` and `hf-hub:` names carry their
    own weights)."""
    architecture, _, pretrained = spec[len(PREFIX):].partition("@")
    if not architecture:
        raise ConfigError(f"model.init_from={spec!r} names no architecture; write open_clip:ARCH@TAG or "
                          f"open_clip:ARCH@/path/to/weights (open_clip.list_models() lists the architectures)")
    return architecture, pretrained or None


class OpenClipTokenizer:
    """open_clip's tokenizer behind the calls liteclip makes of a Hugging Face one. Every text is padded to the
    context length, as open_clip pads (its text towers pool at the end-of-text token, or at a fixed position)."""

    padding_side = "right"

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = 0  # open_clip pads token ids with 0

    def __call__(self, texts: str | Sequence[str], truncation: bool = True, max_length: int | None = None,
                 padding: Any = None, return_tensors: str | None = None) -> dict[str, Any]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = self.tokenizer(texts, context_length=self.context_length).long()  # (B, context length)
        attention_mask = torch.ones_like(input_ids)  # open_clip's towers take no mask: every position is seen
        if return_tensors == "pt":
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist()}

    def save_pretrained(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps({"context_length": self.context_length}))


def data_config_of(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocessing (its `preprocess_cfg`) as the timm-style data config liteclip's transforms read."""
    size = preprocess_cfg["size"]
    side = size if isinstance(size, int) else size[-1]
    return {"input_size": (3, side, side), "interpolation": preprocess_cfg.get("interpolation", "bicubic"),
            "crop_pct": 1.0, "mean": tuple(preprocess_cfg["mean"]), "std": tuple(preprocess_cfg["std"]),
            "resize_mode": preprocess_cfg.get("resize_mode", "shortest"),
            "fill": preprocess_cfg.get("fill_color", 0), "resize_with": "pil"}  # torchvision on PIL images


def create(architecture: str, pretrained: str | None) -> torch.nn.Module:
    """open_clip.create_model, with its errors as one clear line naming the architecture or the weights. A spec
    that names no weights is refused: open_clip would build the model with random weights and only warn."""
    import open_clip

    if pretrained is None and not architecture.startswith(("local-dir:", "hf-hub:")):
        if architecture not in open_clip.list_models():
            raise unknown_architecture(architecture)
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise ConfigError(f"open_clip:{architecture} names no weights, so the model would be random; write "
                          f"open_clip:{architecture}@TAG (its tags: {tags or 'none'}) or "
                          f"open_clip:{architecture}@/path/to/weights")
    try:
        return open_clip.create_model(architecture, pretrained=pretrained)
    except RuntimeError as error:
        message = str(error)
        if "not found in built-ins" in message:
            raise unknown_architecture(architecture) from None
        if "not a known tag" in message:
            tags = open_clip.list_pretrained_tags_by_model(architecture)
            raise ConfigError(f"model.init_from: {pretrained!r} is neither a pretrained tag of {architecture} "
                              f"(its tags: {tags or 'none'}) nor a file") from None
        if "Failed to download" in message:
            raise ConfigError(f"model.init_from: the weights of {architecture}@{pretrained} could not be fetched "
                              f"(no network, or not in the cache); download them once and write "
                              f"open_clip:{architecture}@/path/to/open_clip_model.safetensors") from None
        if "state_dict" in message or "size mismatch" in message or "Missing key" in message:
            detail = " ".join(message.split())[:300]
            raise ConfigError(f"model.init_from: the weights in {pretrained} do not fit the open_clip architecture "
                              f"{architecture} ({detail}); name the architecture they were saved from") from None
        refuse_unreadable_weights(architecture, pretrained, error)
        raise
    except Exception as error:  # a file that is no checkpoint: open_clip's loaders raise many kinds
        refuse_unreadable_weights(architecture, pretrained, error)
        raise


def unknown_architecture(architecture: str) -> ConfigError:
    import open_clip

    close = difflib.get_close_matches(architecture, open_clip.list_models(), n=5, cutoff=0.5)
    return ConfigError(f"model.init_from: open_clip knows no architecture {architecture!r}; close names: "
                       f"{close or 'none'} (open_clip.list_models() lists them)")


def hf_folders_named(directory: Path) -> list[str]:
    """The local folders a saved open_clip model's config names as its Hugging Face text tower or tokenizer (open_clip
    loads them with transformers, which would run code they carry)."""
    try:
        text_config = json.loads((directory / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    names = [text_config.get(key) for key in ("hf_model_name", "hf_tokenizer_name")]
    return sorted({name for name in names if isinstance(name, str) and Path(name).is_dir()})


def refuse_unreadable_weights(architecture: str, pretrained: str | None, error: Exception) -> None:
    """A ConfigError naming the file, when `pretrained` is a file open_clip could not read as weights (a pickle
    that needs code to load, text, a truncated download)."""
    if pretrained is None or not Path(pretrained).expanduser().is_file():
        return
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    raise ConfigError(f"open_clip:{architecture}@{pretrained}: the file is not a checkpoint that loads without "
                      f"running code (safetensors, or a plain tensor checkpoint torch.load reads with "
                      f"weights_only=True); {reason}") from None


def model_config_of(architecture: str) -> dict[str, Any]:
    """The architecture's open_clip model config, as saved beside the weights (local-dir: reads it back)."""
    import open_clip

    schema, _, identifier = architecture.partition(":")
    if schema == "local-dir":
        return json.loads((Path(identifier) / CONFIG_FILE).read_text())["model_cfg"]
    config = open_clip.get_model_config(architecture)
    if config is None:
        raise ConfigError(f"model.init_from: open_clip has no config for {architecture!r} to save with the model")
    return copy.deepcopy(config)


def tokenizer_for(architecture: str, context_length: int) -> OpenClipTokenizer:
    import open_clip

    return OpenClipTokenizer(open_clip.get_tokenizer(architecture, context_length=context_length), context_length)


def read_open_clip(spec: str, base: ModelConfig | None = None) -> ConvertedCLIP:
    """An open_clip checkpoint as liteclip's config and towers (weights loaded by open_clip itself).

    Args:
        spec: "open_clip:ARCH@TAG", "open_clip:ARCH@/path/weights", or "open_clip:local-dir:/path" / "hf-hub:...".
        base: a model config whose `tune` settings (locked, LoRA) and learn_logit_scale apply on top.
    """
    architecture, pretrained = parse_spec(spec)
    base = base or ModelConfig()
    source = create(architecture, pretrained)
    model_config = model_config_of(architecture)
    source.liteclip_embed_dim = int(model_config["embed_dim"])  # what the towers output, read by liteclip.model
    context_length = int(model_config["text_cfg"].get("context_length", 77))
    bias = getattr(source, "logit_bias", None)
    scale = float(source.logit_scale.detach())
    config = ModelConfig(
        image=ImageEncoderConfig(name=architecture, source="open_clip", pretrained=False, channels_last=False,
                                 tune=base.image.tune, lora=base.image.lora),
        text=TextEncoderConfig(name=architecture, source="open_clip", pretrained=False, tune=base.text.tune,
                               lora=base.text.lora, max_length=context_length),
        projection=ProjectionConfig(kind="identity", dim=int(model_config["embed_dim"]), dropout=0.0),
        logit_scale_init=scale, logit_scale_max=max(math.log(100.0), scale),
        learn_logit_scale=base.learn_logit_scale,
        logit_bias_init=float(bias.detach()) if bias is not None else None,
        init_from=spec,
    )
    preprocess = getattr(source.visual, "preprocess_cfg", None) or {}
    # the data config is left to the image tower, which reads the same preprocess_cfg (liteclip.model)
    return ConvertedCLIP(config, None, None, tokenizer_for(architecture, context_length), {}, None,
                         open_clip_model=source, open_clip_config={"model_cfg": model_config,
                                                                   "preprocess_cfg": preprocess})


def write_saved_config(model: Any, directory: Path) -> None:
    """open_clip_config.json beside a saved liteclip model: the architecture open_clip rebuilds it from."""
    (directory / CONFIG_FILE).write_text(json.dumps(model.open_clip_config, indent=2, default=list))


@contextlib.contextmanager
def quiet_random_init_warning():
    """open_clip warns on the root logger that a model it builds without weights is randomly initialised; a saved
    liteclip model loads its own weights right after, so the warning would only mislead."""
    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def read_saved(directory: Path) -> tuple[torch.nn.Module, OpenClipTokenizer, dict[str, Any]]:
    """The empty open_clip model, tokenizer and saved config of a liteclip model directory (weights follow)."""
    import open_clip

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} holds an open_clip model but no {CONFIG_FILE}; save it again with "
                             f"save_pretrained")
    saved = json.loads(path.read_text())
    with quiet_random_init_warning():  # the weights come from model.safetensors next
        source = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    source.liteclip_embed_dim = int(saved["model_cfg"]["embed_dim"])
    context_length = int(saved["model_cfg"]["text_cfg"].get("context_length", 77))
    tokenizer = OpenClipTokenizer(open_clip.get_tokenizer(f"local-dir:{directory}", context_length=context_length),
                                  context_length)
    return source, tokenizer, saved
