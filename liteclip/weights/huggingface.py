"""Foreign weights onto liteclip modules: Hugging Face `transformers` CLIP checkpoints (OpenAI's CLIP and any model
saved in that layout) and SigLIP checkpoints (`SiglipModel`: SigLIP, and SigLIP 2 at fixed resolution). Nothing else
in liteclip does weight surgery (open_clip checkpoints keep open_clip's own modules: liteclip.weights.openclip).

The towers stay the library's own (CLIPVisionModel, CLIPTextModel: causal mask, final layer norm and all); liteclip
adds what is equivalent around them: the vision tower's pooled output, the text tower's end-of-text token (`eos`
pooling: the last attended token, which the CLIP tokenizer makes the end-of-text token), bias-free linear heads and
the learned temperature.

This module builds no model: it reads a checkpoint into a liteclip config and a state dict under liteclip's
parameter names, and liteclip.pretrained builds the CLIP from them, so imports flow one way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from liteclip.config import ImageEncoderConfig, ModelConfig, ProjectionConfig, TextEncoderConfig
from liteclip.errors import ConfigError

logger = logging.getLogger(__name__)


def clip_data_config(size: int) -> dict[str, Any]:
    """OpenAI CLIP's preprocessing as a timm data config: bicubic shorter-side resize to `size`, center crop."""
    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0,
            "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
            "resize_with": "pil"}  # OpenAI's own preprocessing: PIL


HF_CHECKPOINT_TYPES = ("clip", "siglip", "siglip2")  # transformers model types liteclip reads


def is_hf_clip(name_or_dir: str | Path) -> bool:
    """A local transformers CLIP directory, or something shaped like a hub id (namespace/name)."""
    path = Path(name_or_dir)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") in HF_CHECKPOINT_TYPES
    text = str(name_or_dir)
    return not path.exists() and not path.is_absolute() and not text.startswith(".") and text.count("/") == 1


def saved_image_processor(name_or_dir: str, fallback: str) -> Any | None:
    """The checkpoint's own image processor, or None (logged, naming the preprocessing used instead)."""
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name_or_dir, trust_remote_code=False)
    except (OSError, ValueError):
        logger.warning("%s has no image processor config; using %s's preprocessing", name_or_dir, fallback)
        return None


def processor_resizing(processor: Any) -> dict[str, Any]:
    """How a transformers image processor resizes, as data config keys: the backend AutoImageProcessor chose
    (transformers 5 resizes uint8 tensors with torchvision unless asked for PIL; earlier versions' slow processors
    use PIL), its filter, and its crop's rounding (floor, where torchvision's CenterCrop rounds half to even)."""
    backend = getattr(processor, "backend", None) or ("torchvision" if type(processor).__name__.endswith("Fast")
                                                      else "pil")
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}.get(
        int(getattr(processor, "resample", 3) if getattr(processor, "resample", 3) is not None else 3), "bicubic")
    return {"resize_with": "torchvision" if backend == "torchvision" else "pil", "interpolation": resample,
            "crop_rounding": "floor"}


def side_of(sizes: Any, key: str) -> int | None:
    """One side from a processor's size dict (transformers 5 keeps them in a SizeDict object)."""
    value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
    return int(value) if value else None


def image_processor_data_config(name_or_dir: str, image_size: int) -> dict:
    """The checkpoint's own preprocessing (shorter side resized, center crop, mean, std) as a timm data config."""
    data_config = clip_data_config(image_size)
    processor = saved_image_processor(name_or_dir, "OpenAI CLIP")
    if processor is None:
        return data_config
    crop_side = side_of(getattr(processor, "crop_size", None) or {}, "height") or image_size
    shortest = side_of(getattr(processor, "size", None) or {}, "shortest_edge") or crop_side
    data_config.update(input_size=(3, crop_side, crop_side), crop_pct=crop_side / shortest, resize_size=shortest,
                       mean=tuple(processor.image_mean), std=tuple(processor.image_std), **processor_resizing(processor))
    return data_config


@dataclass
class ConvertedCLIP:
    """Everything needed to build a liteclip CLIP that holds a transformers CLIPModel's weights."""

    config: ModelConfig
    text_hf_config: Any  # the towers' own transformers configs: the architecture is rebuilt from them
    vision_hf_config: Any
    tokenizer: Any
    data_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None  # under liteclip's parameter names; None: the towers hold them
    open_clip_model: Any = None  # an open_clip checkpoint: the model open_clip built, weights loaded
    open_clip_config: dict[str, Any] | None = None  # its model and preprocessing configs, saved with the model


def read_hf_clip(name_or_dir: str, base: ModelConfig | None = None) -> ConvertedCLIP:
    """Reads a transformers CLIPModel checkpoint into liteclip's config and parameter names.

    Args:
        name_or_dir: hub name (needs the network or its cache) or a directory written by CLIPModel.save_pretrained.
        base: a model config whose `tune` settings and learn_logit_scale apply on top.
    """
    from transformers import AutoTokenizer, CLIPModel

    source = CLIPModel.from_pretrained(name_or_dir)
    hf_config = source.config
    base = base or ModelConfig()
    config = ModelConfig(
        image=ImageEncoderConfig(name=str(name_or_dir), source="hf", pretrained=False, channels_last=False,
                                 tune=base.image.tune, lora=base.image.lora),
        text=TextEncoderConfig(name=str(name_or_dir), pretrained=False, pooling="eos", tune=base.text.tune,
                               lora=base.text.lora,
                               max_length=hf_config.text_config.max_position_embeddings),
        projection=ProjectionConfig(kind="linear", dim=hf_config.projection_dim, dropout=0.0),
        logit_scale_init=float(source.logit_scale.detach()), logit_scale_max=math.log(100.0),
        learn_logit_scale=base.learn_logit_scale,
    )
    return ConvertedCLIP(config, hf_config.text_config, hf_config.vision_config,
                         AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=False),
                         image_processor_data_config(name_or_dir, hf_config.vision_config.image_size),
                         liteclip_state_dict(source))


def read_hf_checkpoint(name_or_dir: str, base: ModelConfig | None = None) -> ConvertedCLIP:
    """A transformers CLIP or SigLIP checkpoint (by its config's model_type) as liteclip's config and weights."""
    from transformers import AutoConfig

    path = Path(name_or_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        what = ("a liteclip model folder without its model.safetensors: copy the folder again, or save the model "
                "again" if (path / "config.yaml").is_file()
                else "a folder without the config.json of a Hugging Face model or the config.yaml and "
                     "model.safetensors of a liteclip model")
        raise ConfigError(f"model.init_from={name_or_dir!r} is {what}")
    try:
        model_type = AutoConfig.from_pretrained(name_or_dir, trust_remote_code=False).model_type
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.init_from={name_or_dir!r} could not be read as a Hugging Face checkpoint "
                          f"({str(error).splitlines()[0][:200]})") from None
    if model_type not in HF_CHECKPOINT_TYPES:
        raise ConfigError(f"model.init_from={name_or_dir!r} is a {model_type!r} model, not a CLIP or SigLIP "
                          f"checkpoint ({', '.join(sorted(HF_CHECKPOINT_TYPES))}); name a checkpoint of one of those, "
                          f"or set the towers by model.image.name and model.text.name")
    if model_type == "siglip2":
        raise ConfigError(f"{name_or_dir} is a SigLIP 2 NaFlex checkpoint (Siglip2Model), whose image tower takes "
                          f"patches at each image's own resolution; liteclip feeds fixed-size images. Use a "
                          f"fixed-resolution SigLIP 2 checkpoint (google/siglip2-base-patch16-224 and its kin are "
                          f"SiglipModel), or open_clip's: open_clip:ViT-B-16-SigLIP2@webli")
    if model_type == "siglip":
        return read_hf_siglip(name_or_dir, base)
    return read_hf_clip(name_or_dir, base)


class FixedLengthTokenizer:
    """A Hugging Face tokenizer that pads every text to `max_length`: checkpoints trained that way (SigLIP pools the
    last position) read the same positions whatever a caption's length. Everything else is the tokenizer's own."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, texts: Any, **kwargs: Any) -> Any:
        kwargs.update(padding="max_length", truncation=True, max_length=self.max_length)
        return self.tokenizer(texts, **kwargs)

    def save_pretrained(self, directory: str) -> Any:
        return self.tokenizer.save_pretrained(directory)


def siglip_data_config(name_or_dir: str, image_size: int) -> dict[str, Any]:
    """SigLIP's preprocessing: the whole image resized to a square (no crop), mean and std 0.5 unless saved."""
    data_config = {"input_size": (3, image_size, image_size), "interpolation": "bicubic", "crop_pct": 1.0,
                   "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash", "resize_with": "pil"}
    processor = saved_image_processor(name_or_dir, "SigLIP")
    if processor is None:
        return data_config
    data_config.update(mean=tuple(processor.image_mean), std=tuple(processor.image_std),
                       **processor_resizing(processor))
    return data_config


def read_hf_siglip(name_or_dir: str, base: ModelConfig | None = None) -> ConvertedCLIP:
    """A transformers SiglipModel (SigLIP, or SigLIP 2 at a fixed resolution): its vision tower (attention-pooled),
    its text tower (the last position through its head), its temperature and bias, and its tokenizer padded to the
    length it was trained at."""
    from transformers import AutoModel, AutoTokenizer

    source = AutoModel.from_pretrained(name_or_dir)
    hf_config = source.config
    base = base or ModelConfig()
    max_length = hf_config.text_config.max_position_embeddings
    scale = float(source.logit_scale.detach())
    config = ModelConfig(
        image=ImageEncoderConfig(name=str(name_or_dir), source="hf", pretrained=False, channels_last=False,
                                 tune=base.image.tune, lora=base.image.lora),
        text=TextEncoderConfig(name=str(name_or_dir), pretrained=False, pooling="pooler", padding="max_length",
                               tune=base.text.tune, lora=base.text.lora, max_length=max_length),
        projection=ProjectionConfig(kind="identity", dim=hf_config.vision_config.hidden_size, dropout=0.0),
        logit_scale_init=scale, logit_scale_max=max(math.log(100.0), scale), learn_logit_scale=base.learn_logit_scale,
        logit_bias_init=float(source.logit_bias.detach()),
    )
    state = {"logit_scale": source.logit_scale.detach().reshape(()),
             "logit_bias": source.logit_bias.detach().reshape(())}
    for prefix, tower in (("image_encoder.model.", source.vision_model), ("text_encoder.model.", source.text_model)):
        state.update({prefix + name: tensor for name, tensor in tower.state_dict().items()})
    tokenizer = FixedLengthTokenizer(AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=False), max_length)
    return ConvertedCLIP(config, hf_config.text_config, hf_config.vision_config, tokenizer,
                         siglip_data_config(name_or_dir, hf_config.vision_config.image_size), state)


def liteclip_state_dict(source: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPModel's tensors under the names of liteclip's CLIP with transformers towers and linear heads."""
    state = {"logit_scale": source.logit_scale.detach(),
             "image_projection.projection.weight": source.visual_projection.weight.detach(),
             "text_projection.projection.weight": source.text_projection.weight.detach()}
    for prefix, tower in (("image_encoder.model.", source.vision_model), ("text_encoder.model.", source.text_model)):
        state.update({prefix + name: tensor for name, tensor in tower.state_dict().items()})
    return state
