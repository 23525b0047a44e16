import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from liteclip import CLIP, build_model
from liteclip.errors import ConfigError, ModelLoadError
from liteclip.config import ProjectionConfig
from liteclip.model import ProjectionHead


def tokenize(model, texts):
    batch = model.tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config.model).eval()


def test_forward_shapes_and_normalised_embeddings(model):
    pixels = torch.randn(3, 3, 32, 32)
    input_ids, attention_mask = tokenize(model, ["a red circle", "a blue square on the left", "a cat"])
    out = model(pixels, input_ids, attention_mask)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 32)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    expected = math.exp(math.log(1 / 0.07)) * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.t())


def test_logit_scale_is_clamped_at_100(model):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_data_config_follows_overrides(model):
    assert model.data_config["input_size"] == (3, 32, 32)
    assert len(model.data_config["mean"]) == 3


def test_mean_pooling_ignores_padding(model):
    short_ids, short_mask = tokenize(model, ["a red circle"])
    padded_ids, padded_mask = tokenize(model, ["a red circle", "two shapes: a green circle above a red square"])
    assert padded_mask[0].sum() < padded_mask.shape[1]  # the first caption really is padded
    with torch.no_grad():
        alone = model.text_encoder(short_ids, short_mask)
        in_batch = model.text_encoder(padded_ids, padded_mask)[:1]
        hidden = model.text_encoder.model(input_ids=short_ids, attention_mask=short_mask).last_hidden_state
    torch.testing.assert_close(alone, hidden.mean(dim=1))  # independent: plain mean over the real tokens
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "eos"])
def test_a_batch_encoded_in_length_groups_gives_each_captions_own_embedding_and_the_same_gradients(tiny_config,
                                                                                                   pooling):
    text = dataclasses.replace(tiny_config.model.text, pooling=pooling)
    grouped = build_model(dataclasses.replace(tiny_config.model, text=dataclasses.replace(text, length_groups=3)))
    whole = build_model(dataclasses.replace(tiny_config.model, text=dataclasses.replace(text, length_groups=1)))
    whole.load_state_dict(grouped.state_dict())
    captions = ["dog", "a cat", "a large blue square in the middle of the picture", "red", "two circles",
                "a green triangle on the left", "a small yellow star above a large purple circle"]
    input_ids, attention_mask = tokenize(grouped, captions)
    by_length = torch.argsort(attention_mask.sum(dim=1))
    assert not torch.equal(by_length[by_length], torch.arange(len(captions)))  # putting them back needs the inverse
    embeds = grouped.text_encoder(input_ids, attention_mask)
    with torch.no_grad():  # the reference: each caption encoded alone, with no padding at all
        alone = torch.cat([whole.text_encoder(*tokenize(whole, [caption])) for caption in captions])
    torch.testing.assert_close(embeds.detach(), alone, atol=1e-5, rtol=1e-5)
    embeds.square().sum().backward()
    whole.text_encoder(input_ids, attention_mask).square().sum().backward()
    for (name, a), (_, b) in zip(grouped.text_encoder.named_parameters(), whole.text_encoder.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_traced_text_tower_encodes_batches_whole_so_the_trace_fits_any_batch(tiny_config):
    """ONNX export traces the tower; a trace of the grouped path would replay one batch's grouping on every batch."""
    text = dataclasses.replace(tiny_config.model.text, length_groups=2)
    model = build_model(dataclasses.replace(tiny_config.model, text=text)).eval()
    traced_on = tokenize(model, ["a cat", "a large blue square in the middle", "red", "two circles on the left"])
    other = tokenize(model, ["a small yellow star above a large purple circle", "dog", "a green triangle"])
    with torch.no_grad():
        traced = torch.jit.trace(model.text_encoder, traced_on, check_trace=False)
        torch.testing.assert_close(traced(*other), model.text_encoder(*other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "eos"])
def test_token_poolings(tiny_config, pooling):
    config = dataclasses.replace(tiny_config.model, text=dataclasses.replace(tiny_config.model.text, pooling=pooling))
    model = build_model(config).eval()
    input_ids, attention_mask = tokenize(model, ["a red circle", "a large blue square in the middle"])
    with torch.no_grad():
        pooled = model.text_encoder(input_ids, attention_mask)
        hidden = model.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    lengths = attention_mask.sum(dim=1).tolist()
    positions = [0, 0] if pooling == "cls" else [n - 1 for n in lengths]
    expected = torch.stack([hidden[i, p] for i, p in enumerate(positions)])
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("kind", ["residual", "residual_mlp", "linear"])
def test_projection_heads(kind):
    torch.manual_seed(0)
    head = ProjectionHead(20, ProjectionConfig(kind=kind, dim=8, dropout=0.0)).eval()
    features = torch.randn(4, 20)
    projected = head.projection(features)
    if kind == "linear":
        expected = features @ head.projection.weight.t()
    else:
        hidden = F.gelu(projected)
        if kind == "residual_mlp":
            hidden = head.fc(hidden)
        expected = F.layer_norm(hidden + projected, (8,), head.layer_norm.weight, head.layer_norm.bias)
    torch.testing.assert_close(head(features), expected)


def test_locked_towers_get_no_gradients(tiny_config):
    config = dataclasses.replace(
        tiny_config.model,
        image=dataclasses.replace(tiny_config.model.image, tune="locked"),
        text=dataclasses.replace(tiny_config.model.text, tune="locked"))
    model = build_model(config).train()
    assert not model.image_encoder.training and not model.text_encoder.training
    input_ids, attention_mask = tokenize(model, ["a red circle", "a cat"])
    out = model(torch.randn(2, 3, 32, 32), input_ids, attention_mask)
    out.logits_per_image.sum().backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.image_projection.projection.weight.grad is not None


def test_save_and_load_round_trip_offline(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"config.yaml", "model.safetensors", "tokenizer"}
    loaded = CLIP.from_pretrained(tmp_path / "saved")
    pixels = torch.randn(2, 3, 32, 32)
    captions = ["a small red circle on the left", "a cat"]
    ids, mask = tokenize(model, captions)
    loaded_ids, loaded_mask = tokenize(loaded, captions)
    assert torch.equal(ids, loaded_ids) and torch.equal(mask, loaded_mask)
    with torch.no_grad():
        expected, actual = model(pixels, ids, mask), loaded(pixels, loaded_ids, loaded_mask)
    assert torch.equal(expected.logits_per_image, actual.logits_per_image)
    assert torch.equal(expected.image_embeds, actual.image_embeds)
    assert loaded.data_config == model.data_config


def test_saving_again_replaces_the_directory(model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("my notes")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == "my notes"  # not liteclip's to delete
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.save_pretrained(tmp_path / "m")
    assert CLIP.from_pretrained(tmp_path / "m").logit_scale.item() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers
    assert (tmp_path / "m" / "README.md").read_text() == "my notes"
    assert (tmp_path / "m").stat().st_mode & 0o055  # readable by others, like any directory the user makes


def test_mismatched_weights_name_the_tensors(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["image_projection.projection.weight"] = torch.zeros(7, 7)
    del state["text_projection.layer_norm.bias"]
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError) as error:
        CLIP.from_pretrained(tmp_path / "m")
    message = str(error.value)
    assert "image_projection.projection.weight" in message and "(7, 7)" in message
    assert "missing: text_projection.layer_norm.bias" in message


def test_missing_model_directory_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelLoadError, match="train.py --config configs/demo.yaml"):
        CLIP.from_pretrained(tmp_path / "nothing")


def test_local_weights_file_for_the_image_tower(tiny_config, tmp_path):
    import timm

    source = timm.create_model("test_convnext3", pretrained=False)  # with a classifier, as downloaded files have
    save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    config = dataclasses.replace(tiny_config.model, image=dataclasses.replace(
        tiny_config.model.image, weights_file=str(tmp_path / "tiny.safetensors")))
    model = build_model(config)
    torch.testing.assert_close(model.image_encoder.model.stem[0].weight, source.stem[0].weight)


def test_timm_keyword_arguments_shape_the_tower_and_are_saved_with_the_model(tiny_config, tmp_path):
    image = dataclasses.replace(tiny_config.model.image, model_kwargs={"dims": [8, 16, 24, 40]})
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config.model, image=image)).eval()
    assert model.image_encoder.num_features == 40  # test_convnext3's own last width is 128
    model.save_pretrained(tmp_path / "narrow")
    loaded = CLIP.from_pretrained(tmp_path / "narrow")  # rebuilt from config.yaml: the same narrow tower
    assert loaded.config.image.model_kwargs == {"dims": [8, 16, 24, 40]}
    card = (tmp_path / "narrow" / "README.md").read_text()
    assert "| image tower | test_convnext3 (timm, dims=[8, 16, 24, 40]) |" in card
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)


def test_timm_keyword_arguments_liteclip_sets_itself_or_the_tower_does_not_take_are_refused(tiny_config):
    image = dataclasses.replace(tiny_config.model.image, model_kwargs={"pretrained": True})
    with pytest.raises(ConfigError, match=r"model.image.model_kwargs sets \['pretrained'\]"):
        build_model(dataclasses.replace(tiny_config.model, image=image))
    image = dataclasses.replace(tiny_config.model.image, model_kwargs={"stem_width": 16})  # a ResNet's, not ConvNeXt's
    with pytest.raises(ConfigError, match=r"model.image.model_kwargs=\{'stem_width': 16\}: test_convnext3 does not "
                                          r"take them \(.*stem_width.*\); .* or set model.image.model_kwargs=\{\}"):
        build_model(dataclasses.replace(tiny_config.model, image=image))


def test_unknown_timm_name_suggests_close_ones(tiny_config):
    config = dataclasses.replace(tiny_config.model, image=dataclasses.replace(tiny_config.model.image,
                                                                              name="convnext_atoo"))
    with pytest.raises(ValueError, match=r"model.image.name='convnext_atoo' is not a timm model; close names: \['convnext_atto'"):
        build_model(config)


def test_unknown_text_model_is_named(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config.model, text=dataclasses.replace(tiny_config.model.text,
                                                                             name=str(tmp_path / "no_such_bert")))
    with pytest.raises(ValueError, match="model.text.name=.*no_such_bert.* is neither a local model directory"):
        build_model(config)


def test_remote_code_is_never_trusted_implicitly(tiny_config, monkeypatch):
    import transformers

    seen = []
    for name in ("from_pretrained", "from_config"):
        original = getattr(transformers.AutoModel, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(transformers.AutoModel, name, spy)
    original_tokenizer = transformers.AutoTokenizer.from_pretrained

    def tokenizer_spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original_tokenizer(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_spy)
    build_model(tiny_config.model)
    assert seen and all(flag is False for flag in seen)


def test_a_max_length_beyond_the_text_towers_positions_fails_at_build_time(tiny_config, tiny_text_dir):
    import json

    positions = json.loads((tiny_text_dir / "config.json").read_text())["max_position_embeddings"]
    too_long = dataclasses.replace(tiny_config.model,
                                   text=dataclasses.replace(tiny_config.model.text, max_length=positions + 1))
    with pytest.raises(ValueError, match=f"model.text.max_length={positions + 1} exceeds the {positions} positions"):
        build_model(too_long)


def test_a_weights_file_of_another_architecture_is_a_config_error_naming_the_file(tmp_path):
    import timm

    from liteclip.config import ImageEncoderConfig
    from liteclip.model import ImageEncoder

    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(other))
    with pytest.raises(ConfigError, match=r"model.image.weights_file=.*resnet.safetensors does not fit the timm "
                                          r"tower test_convnext3: \d+ of its tensors are not in the file"):
        ImageEncoder(ImageEncoderConfig(name="test_convnext3", weights_file=str(other)))
