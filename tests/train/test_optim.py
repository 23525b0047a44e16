import dataclasses
import math

import pytest

from liteclip import build_model
from liteclip.config import OptimConfig
from liteclip.train.optim import build_optimizer, lr_multiplier, param_groups


def test_warmup_then_cosine_numbers():
    config = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_multiplier(0, 110, config) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, config) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, config) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, config) == pytest.approx(0.5)  # half-way through the decay
    assert lr_multiplier(110, 110, config) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(35, 110, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_cosine_floor_and_constant():
    assert lr_multiplier(100, 100, OptimConfig(warmup_steps=0, min_lr_ratio=0.1)) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=4, schedule="constant")
    assert [lr_multiplier(s, 100, constant) for s in (0, 3, 50, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_param_groups_decay_and_learning_rates(tiny_config):
    model = build_model(tiny_config.model)
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-3, tower_lr=1e-5, weight_decay=0.2))}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "logit_scale" in no_decay
    assert all(model.get_parameter(n).ndim == 1 or n == "logit_scale" for n in no_decay)
    assert "image_projection.projection.bias" in no_decay and "text_projection.layer_norm.weight" in no_decay
    assert groups["tower_decay"]["lr"] == 1e-5 and groups["head_decay"]["lr"] == 1e-3
    assert groups["head_no_decay"]["lr"] == 1e-3  # logit_scale learns at the head rate
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_locked_tower_has_no_optimizer_state(tiny_config):
    config = dataclasses.replace(tiny_config.model, image=dataclasses.replace(tiny_config.model.image, tune="locked"))
    model = build_model(config)
    optimizer = build_optimizer(model, OptimConfig())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.image_encoder.parameters())
    assert any(id(p) in optimized for p in model.text_encoder.parameters())


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_fused_update_on_the_cpu_matches_the_reference_update(tiny_config, name):
    import torch

    config = OptimConfig(name=name, lr=1e-3, weight_decay=0.1)
    torch.manual_seed(0)
    model = build_model(tiny_config.model)
    reference = build_model(tiny_config.model)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, config)
    if torch.__version__ >= "2.4":  # PyTorch's fused CPU kernel arrived in 2.4; before it, foreach
        assert optimizer.defaults["fused"] and type(optimizer).__name__ == {"adamw": "AdamW", "adam": "Adam"}[name]
    # PyTorch's single-tensor loop, the plainest form of the same update
    plain = type(optimizer)(param_groups(reference, config), betas=config.betas, eps=config.eps, foreach=False)
    for step in range(3):
        for module, opt in ((model, optimizer), (reference, plain)):
            torch.manual_seed(step)
            for parameter in module.parameters():
                parameter.grad = torch.randn_like(parameter)
            opt.step()
    for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
