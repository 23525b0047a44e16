"""Optimiser and learning-rate schedule.

Parameter groups chosen on purpose (as nanoGPT's configure_optimizers and timm's param_groups_weight_decay do): no
weight decay on biases, norm weights or the temperature; one learning rate for the pretrained towers and another for
the freshly initialised heads. Locked parameters are left out entirely, so they carry no optimiser state.

The schedule is a pure function of the step (nanoGPT's get_lr): nothing to step, nothing to forget to step, and
resuming needs only the step counter.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

from liteclip.config import OptimConfig
from liteclip.errors import ConfigError

logger = logging.getLogger(__name__)


# a block of a transformer or CNN tower outside timm: BERT's encoder.layer.N, CLIP's encoder.layers.N, GPT's h.N,
# open_clip's transformer.resblocks.N, blocks.N
BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks|resblocks)\.(\d+)\.")
# what comes before the first block: embeddings, a patch or convolution stem, open_clip's ln_pre
STEM = re.compile(r"embed|stem|conv1\.|ln_pre|patch|class_embedding|positional_embedding")


def layer_scales(tower: nn.Module, decay: float) -> dict[str, float]:
    """{parameter name: lr scale} for layer-wise lr decay (BEiT's; timm's param_groups_layer_decay): the layer
    nearest the output trains at the tower's rate, each one below it at `decay` times the one above. A timm model
    is split into layers by its own group_matcher, as timm splits it; any other by name: the stem is layer 0,
    block N is layer N + 1, and everything after the last block (final norm, pooler, projection) one layer above
    it (where there is nothing after it, the last block is the top layer)."""
    names = [name for name, _ in tower.named_parameters()]
    if hasattr(tower, "group_matcher") and hasattr(tower, "default_cfg"):  # a timm model
        from timm.models import group_parameters

        layer = group_parameters(tower, tower.group_matcher(coarse=False), reverse=True)
    else:
        blocks = {name: int(match.group(1)) + 1 for name in names if (match := BLOCK.search(name))}
        top = max(blocks.values(), default=0) + 1
        layer = {name: blocks.get(name, 0 if STEM.search(name) else top) for name in names}
    highest = max(layer.values(), default=0)
    return {name: decay ** (highest - layer.get(name, highest)) for name in names}


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """(tower | head) x (decay | no decay), trainable parameters only; with optim.layer_decay, a tower group per
    layer at its own rate."""
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    tower_lr = config.tower_lr if config.tower_lr is not None else config.lr
    scales: dict[str, float] = {}
    if config.layer_decay is not None:
        for prefix in ("image_encoder.model", "text_encoder.model"):
            tower = model.get_submodule(prefix)
            scales.update({f"{prefix}.{name}": scale
                           for name, scale in layer_scales(tower, config.layer_decay).items()})
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_tower = name.startswith(("image_encoder.", "text_encoder."))
        # 1-D tensors are biases and norm scales: decaying them only fights the normalisation
        decays = param.ndim >= 2 and name not in no_decay_names
        scale = scales.get(name, 1.0) if in_tower else 1.0
        groups.setdefault((in_tower, decays, scale), []).append(param)
    result = []
    for (in_tower, decays, scale), params in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                       -item[0][2])):
        name = f"{'tower' if in_tower else 'head'}_{'decay' if decays else 'no_decay'}"
        result.append({"params": params, "lr": (tower_lr * scale) if in_tower else config.lr,
                       "weight_decay": config.weight_decay if decays else 0.0,
                       "name": name if scale == 1.0 else f"{name}_x{scale:.3g}"})
        result[-1]["base_lr"] = result[-1]["lr"]
    for group in result:
        logger.info("param group %-16s %4d tensors %10d parameters lr %.2e wd %.2g", group["name"],
                    len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"], group["weight_decay"])
    return result


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam, as liteCLIP used) over the parameter groups, with PyTorch's fused kernel where it has one."""
    groups = param_groups(model, config)
    if not groups:
        raise ConfigError("nothing to train: every parameter is locked (model.image.tune and model.text.tune)")
    # plain Adam folds weight decay into the gradient (L2), as liteCLIP's torch.optim.Adam did
    optimizer_class = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    kwargs = {"betas": config.betas, "eps": config.eps}
    try:
        # one pass over each tensor for the whole update (CUDA, and CPUs from torch 2.4). On a CPU, foreach loops
        # over the tensors op by op, and the update of a text tower's large word embeddings shows it
        # (benchmarks/README.md has the step times)
        return optimizer_class(groups, fused=True, **kwargs)
    except RuntimeError:  # a device (or torch) without the fused kernel
        return optimizer_class(groups, foreach=True, **kwargs)


def lr_multiplier(step: int, total_steps: int, config: OptimConfig) -> float:
    """The factor on each group's base lr at optimiser step `step` (0-based): linear warmup, then cosine or flat."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
