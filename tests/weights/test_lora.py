"""LoRA towers through peft: only adapters and heads train, merging changes no embedding, and a saved model needs
no peft."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from liteclip import CLIP, build_model
from liteclip.config import LoraConfig
from liteclip.train.optim import build_optimizer


def lora_model(tiny_config, image_targets=()):
    text = dataclasses.replace(tiny_config.model.text, tune="lora", lora=LoraConfig(rank=4, alpha=8.0))
    image = tiny_config.model.image
    if image_targets:
        image = dataclasses.replace(image, tune="lora", lora=LoraConfig(rank=2, alpha=4.0, targets=image_targets))
    torch.manual_seed(0)
    return build_model(dataclasses.replace(tiny_config.model, text=text, image=image))


def inputs(model):
    tokens = model.tokenizer(["a red circle", "a photo of a dog", "a cat"], padding=True, return_tensors="pt")
    return torch.randn(3, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"]


def test_only_adapters_and_heads_train_and_the_optimiser_holds_nothing_else(tiny_config):
    model = lora_model(tiny_config, image_targets=("mlp.fc1", "mlp.fc2"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or not name.startswith(("image_encoder.", "text_encoder."))
                             for name in trainable)
    assert any("text_encoder" in n and "lora_" in n for n in trainable)
    assert any("image_encoder" in n and "lora_" in n for n in trainable)
    optimizer = build_optimizer(model, tiny_config.optim)
    out = model(*inputs(model))
    out.logits_per_image.sum().backward()
    optimizer.step()
    state_ids = {id(p) for p in optimizer.state}
    frozen_ids = {id(p) for p in model.parameters() if not p.requires_grad}
    assert state_ids and not state_ids & frozen_ids
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_merged_and_unmerged_models_give_the_same_embeddings(tiny_config, tmp_path, monkeypatch):
    model = lora_model(tiny_config, image_targets=("mlp.fc1",)).eval()
    with torch.no_grad():  # adapters start as zero updates: make them matter before comparing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            if name.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6 and would hide the image adapters
                param.fill_(1.0)
    pixels, ids, mask = inputs(model)
    with torch.no_grad():
        unmerged = model(pixels, ids, mask)
        without_adapters = merged_copy_without_adapters(model)(pixels, ids, mask)
    model.save_pretrained(tmp_path / "merged")
    monkeypatch.setitem(sys.modules, "peft", None)  # the saved model must load and run without peft
    loaded = CLIP.from_pretrained(tmp_path / "merged")
    assert loaded.config.text.tune == "full" and loaded.config.image.tune == "full"
    with torch.no_grad():
        merged = loaded(pixels, ids, mask)
    torch.testing.assert_close(merged.image_embeds, unmerged.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.text_embeds, unmerged.text_embeds, atol=1e-5, rtol=0)
    # the adapters do change the embeddings, so the equality above is not the base weights meeting themselves
    assert (merged.text_embeds - without_adapters.text_embeds).abs().max() > 1e-3
    assert (merged.image_embeds - without_adapters.image_embeds).abs().max() > 1e-3


def merged_copy_without_adapters(model):
    """The same model with every adapter's update set to zero."""
    import copy

    bare = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in bare.named_parameters():
            if "lora_B" in name:
                param.zero_()
    return bare


def test_a_timm_tower_needs_named_targets(tiny_config):
    from liteclip.errors import ConfigError

    image = dataclasses.replace(tiny_config.model.image, tune="lora")
    with pytest.raises(ConfigError, match="model.image.lora.targets must name the layers"):
        build_model(dataclasses.replace(tiny_config.model, image=image))


def test_a_run_with_a_lora_text_tower_trains_only_adapters_and_exports_a_plain_model(tmp_path, monkeypatch):

    from liteclip.train.run_directory import load_checkpoint
    from liteclip.train.loop import fit
    from tests.train.test_loop import tiny_config as run_config

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    fit(run_config(tmp_path, "model.text.tune=lora", "model.text.lora.rank=4", "train.epochs=1", "train.max_steps=3"),
        show_progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    exported = CLIP.from_pretrained(tmp_path / "model")
    assert exported.config.text.tune == "full" and not any("lora_" in name for name in exported.state_dict())
    assert any("lora_" in name for name in last["model"])  # the training checkpoint keeps the adapters to resume
    base = [name for name in last["model"] if name.startswith("text_encoder.") and "lora_" not in name
            and name.endswith("query.base_layer.weight")]
    assert base  # peft keeps the frozen weight beside its adapters
