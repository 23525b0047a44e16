"""An exponential moving average of the weights (Polyak averaging; `train.ema_decay`), evaluated and exported in
place of the raw weights when on.

    ema = 0.999 * ema + 0.001 * weights       after every optimiser step

Built on torch's own AveragedModel. As there, the average starts at the weights after the first step. Floating
point buffers (BatchNorm statistics) are averaged the same way; integer buffers (counters, position ids) are copied.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage(nn.Module):
    """The averaged copy of a model; `module` is that copy (a CLIP, for the trainer)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Folds the model's current weights into the average (call after each optimiser step)."""
        first = int(self.averaged.n_averaged) == 0
        before = [buffer.clone() for buffer in self.module.buffers()]  # AveragedModel copies the live ones over
        self.averaged.update_parameters(model)
        for averaged, previous, live in zip(self.module.buffers(), before, model.buffers()):
            if averaged.is_floating_point() and not first:
                averaged.copy_(previous.lerp_(live, 1.0 - self.decay))
