"""Low-rank adapters on a tower (`model.text.tune: lora`, `model.image.tune: lora`), with the peft library's LoRA
(Hu et al. 2021): the tower's own weights are frozen, and small rank-r updates beside its chosen layers train with
the projection heads. save_pretrained merges the adapters into the weights, so a saved model is a plain one that
loads and predicts without peft.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from liteclip.config import LoraConfig
from liteclip.errors import ConfigError


def add_lora(tower: nn.Module, config: LoraConfig, key: str, is_hf: bool) -> nn.Module:
    """The tower with adapters injected (peft's LoraModel: same forward, base weights frozen).

    Args:
        key: the config key, for messages ("model.text").
        is_hf: a transformers model, for which peft knows the layers to adapt when config.targets is empty.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:
        raise ConfigError(f"{key}.tune: lora needs the peft library: pip install 'liteclip[lora]'") from None
    if not config.targets and not is_hf:
        raise ConfigError(f"{key}.lora.targets must name the layers to adapt in a timm tower, e.g. "
                          f"[mlp.fc1, mlp.fc2] for ConvNeXt")
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.targets) or None, bias="none")
    if is_hf and not config.targets:
        model_type = getattr(getattr(tower, "config", None), "model_type", None)
        peft_config = _with_default_targets(peft_config, model_type, key)
    try:
        return LoraModel(tower, peft_config, "default")
    except ValueError as error:  # peft names the targets it could not find
        raise ConfigError(f"{key}.lora.targets={list(config.targets)}: {error}") from None


def _with_default_targets(peft_config: Any, model_type: str | None, key: str) -> Any:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type or "")
    if not targets:
        raise ConfigError(f"peft has no default LoRA layers for a {model_type!r} tower; set {key}.lora.targets")
    peft_config.target_modules = set(targets)
    return peft_config


def merged_copy(model: Any) -> Any:
    """A copy of a CLIP whose LoRA towers have their adapters merged in: plain towers, configs saying tune: full."""
    merged = copy.deepcopy(model)
    for encoder, part in ((merged.image_encoder, "image"), (merged.text_encoder, "text")):
        if getattr(encoder.config, "tune", "full") == "lora":
            encoder.model = encoder.model.merge_and_unload()
            encoder.config = dataclasses.replace(encoder.config, tune="full")
            merged.config = dataclasses.replace(merged.config, **{part: encoder.config})
    return merged
