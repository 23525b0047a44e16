"""The weight average, computed by hand for two steps, and carried through training, checkpoints and export."""

import pytest
import torch
from torch import nn

from liteclip.train.ema import WeightAverage


def test_two_steps_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    weights, running_means = [], []
    for _ in range(2):
        model(torch.randn(8, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        average.update(model)
        weights.append(model[0].weight.detach().clone())
        running_means.append(model[1].running_mean.clone())
    # the first update takes the weights as they are; the second mixes in a tenth of the new ones
    torch.testing.assert_close(average.module[0].weight, 0.9 * weights[0] + 0.1 * weights[1])
    torch.testing.assert_close(average.module[1].running_mean, 0.9 * running_means[0] + 0.1 * running_means[1])
    assert average.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 2  # copied
    assert not torch.equal(average.module[0].weight, model[0].weight)


def test_the_decay_must_be_a_fraction():
    from liteclip.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, ["train.ema_decay=1.0"])
