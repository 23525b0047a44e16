"""Foreign weights onto liteclip modules: Hugging Face `transformers` CLIP checkpoints (OpenAI's CLIP and any model
saved in that layout). Nothing else in liteclip does weight surgery.

The towers stay the library's own (CLIPVisionModel, CLIPTextModel: causal mask, final layer norm and all); liteclip
adds what is equivalent around them: the vision tower's pooled output, the text tower's end-of-text token (`eos`
pooling: the last attended token, which the CLIP tokenizer makes the end-of-text token), bias-free linear heads and
the learned temperature.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from liteclip.config import ImageEncoderConfig, ModelConfig, ProjectionConfig, TextEncoderConfig
from liteclip.model import CLIP, clip_data_config

logger = logging.getLogger(__name__)


def is_hf_clip(name_or_dir: str | Path) -> bool:
    """A local transformers CLIP directory, or something shaped like a hub id (namespace/name)."""
    path = Path(name_or_dir)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"
    text = str(name_or_dir)
    return not path.exists() and not path.is_absolute() and not text.startswith(".") and text.count("/") == 1


def image_processor_data_config(name_or_dir: str, image_size: int) -> dict:
    """The checkpoint's own preprocessing (shorter side resized, center crop, mean, std) as a timm data config."""
    data_config = clip_data_config(image_size)
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError):
        logger.warning("%s has no image processor config; using OpenAI CLIP's preprocessing", name_or_dir)
        return data_config
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    crop_side = crop.get("height", image_size)
    shortest = size.get("shortest_edge", crop_side)
    data_config.update(input_size=(3, crop_side, crop_side), crop_pct=crop_side / shortest,
                       mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    return data_config


def load_hf_clip(name_or_dir: str, base: ModelConfig | None = None) -> CLIP:
    """A liteclip CLIP holding the weights of a transformers CLIPModel checkpoint.

    Args:
        name_or_dir: hub name (needs the network or its cache) or a directory written by CLIPModel.save_pretrained.
        base: a model config whose `locked` flags and learn_logit_scale apply on top.
    """
    from transformers import AutoTokenizer, CLIPModel

    source = CLIPModel.from_pretrained(name_or_dir)
    hf_config = source.config
    base = base or ModelConfig()
    config = ModelConfig(
        image=ImageEncoderConfig(name=str(name_or_dir), source="hf", pretrained=False, channels_last=False,
                                 locked=base.image.locked),
        text=TextEncoderConfig(name=str(name_or_dir), pretrained=False, pooling="eos", locked=base.text.locked,
                               max_length=hf_config.text_config.max_position_embeddings),
        projection=ProjectionConfig(kind="linear", dim=hf_config.projection_dim, dropout=0.0),
        logit_scale_init=float(source.logit_scale.detach()), logit_scale_max=math.log(100.0),
        learn_logit_scale=base.learn_logit_scale,
    )
    model = CLIP(config, tokenizer=AutoTokenizer.from_pretrained(name_or_dir),
                 text_hf_config=hf_config.text_config, image_hf_config=hf_config.vision_config)
    with torch.no_grad():
        model.image_encoder.model.load_state_dict(source.vision_model.state_dict())
        model.text_encoder.model.load_state_dict(source.text_model.state_dict())
        model.image_projection.projection.weight.copy_(source.visual_projection.weight)
        model.text_projection.projection.weight.copy_(source.text_projection.weight)
        model.logit_scale.copy_(source.logit_scale)
    model.data_config = image_processor_data_config(name_or_dir, hf_config.vision_config.image_size)
    return model
