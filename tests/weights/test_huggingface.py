"""Hugging Face CLIP checkpoints in liteclip, checked against transformers.CLIPModel on the same inputs."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liteclip import CLIP, ZeroShotPipeline, build_model, clip_loss
from liteclip.config import ModelConfig

SENTENCES = ["a photo of a cat", "a photo of a dog", "a diagram", "two red circles on a table", "a boy jumping"]


def write_tiny_hf_clip(directory):
    """A random CLIPModel, a CLIP-style tokenizer (start/end-of-text, padded with end-of-text) and its processor."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>"] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<unk>").save_pretrained(str(directory))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="module")
def inputs(hf_dir):
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(hf_dir))(SENTENCES[:4], padding=True, return_tensors="pt")
    assert (tokens["attention_mask"] == 0).any()  # padded, with the end-of-text token as padding
    torch.manual_seed(1)
    return torch.randn(4, 3, 30, 30), tokens["input_ids"], tokens["attention_mask"]


def reference(hf_dir, inputs):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(hf_dir).eval()
    pixels, input_ids, attention_mask = inputs
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, return_loss=True)
    return out


def test_equivalence_with_transformers_clip(hf_dir, inputs):
    expected = reference(hf_dir, inputs)
    model = CLIP.from_pretrained(hf_dir).eval()
    pixels, input_ids, attention_mask = inputs
    with torch.no_grad():
        out = model(pixels, input_ids, attention_mask)
    torch.testing.assert_close(out.image_embeds, F.normalize(expected.image_embeds, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, F.normalize(expected.text_embeds, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_loss(out.logits_per_image), expected.loss, atol=1e-5, rtol=1e-5)


def test_the_equivalence_test_would_catch_a_wrong_pooling_or_a_missing_projection(hf_dir, inputs):
    expected = F.normalize(reference(hf_dir, inputs).text_embeds, dim=-1)
    model = CLIP.from_pretrained(hf_dir).eval()
    _, input_ids, attention_mask = inputs
    with torch.no_grad():
        hidden = model.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        mean_pooled = F.normalize(model.text_projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        unprojected = model.text_encoder(input_ids, attention_mask)
    assert (mean_pooled - expected).abs().max() > 1e-2
    assert unprojected.shape[-1] != expected.shape[-1] or (F.normalize(unprojected, dim=-1) - expected).abs().max() > 1e-2


def test_text_tower_is_causal(hf_dir, inputs):
    model = CLIP.from_pretrained(hf_dir).eval()
    _, input_ids, attention_mask = inputs
    changed = input_ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % model.text_encoder.model.config.vocab_size
    with torch.no_grad():
        before = model.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        after = model.text_encoder.model(input_ids=changed, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(before[0, :3], after[0, :3])  # earlier positions cannot see a later token
    assert (before[0, 3:] - after[0, 3:]).abs().max() > 1e-4


def test_preprocessing_comes_with_the_checkpoint(hf_dir):
    model = CLIP.from_pretrained(hf_dir)
    assert model.data_config["input_size"] == (3, 30, 30)
    assert model.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert model.data_config["interpolation"] == "bicubic"


def test_saved_again_in_liteclip_format_and_used_by_the_pipeline(hf_dir, inputs, tmp_path):
    model = CLIP.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "converted")
    reloaded = CLIP.from_pretrained(tmp_path / "converted").eval()
    pixels, input_ids, attention_mask = inputs
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels, input_ids, attention_mask).logits_per_image,
                                   model.eval()(pixels, input_ids, attention_mask).logits_per_image)
    pipeline = ZeroShotPipeline(hf_dir)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    result = pipeline.predict(image, ["a photo of a cat", "a photo of a dog"])
    assert sum(p for _, p in result) == pytest.approx(1.0, abs=1e-5)


def test_build_model_from_init_from_keeps_locks(hf_dir):
    config = ModelConfig(init_from=str(hf_dir))
    config = dataclasses.replace(config, image=dataclasses.replace(config.image, tune="locked"))
    model = build_model(config)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.config.projection.kind == "linear" and model.config.text.pooling == "eos"


# ------------------------------------------------------------------------------------- SigLIP and SigLIP 2 (issue 29)


def write_tiny_siglip(directory, version: int = 1):
    """A random SiglipModel (or Siglip2Model), a word-level tokenizer that ends each text with </s> and pads with
    <pad>, and a processor that squashes images to 32 x 32."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    words = sorted({w for s in SENTENCES + ["two dogs playing in the snow", "a red square"] for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=12, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(version)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # the paper's starting point, not transformers' zeros: the bias must be taken over
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("siglip"))


def siglip_inputs():
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    return images, ["a photo of a dog", "a boy jumping", "two dogs playing in the snow", "a red square"]


def test_siglip_predictions_are_transformers_sigmoid_of_logits_per_image(siglip_dir):
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    images, labels = siglip_inputs()
    reference = SiglipModel.from_pretrained(siglip_dir).eval()
    tokens = AutoTokenizer.from_pretrained(siglip_dir)(labels, padding="max_length", max_length=12,
                                                       return_tensors="pt")
    pixels = SiglipImageProcessor.from_pretrained(siglip_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = reference(input_ids=tokens["input_ids"], pixel_values=pixels)
    pipeline = ZeroShotPipeline(str(siglip_dir), device="cpu")
    assert pipeline.probabilities == "sigmoid"
    torch.testing.assert_close(torch.stack([pipeline.preprocess(image) for image in images]), pixels,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(pipeline.encode_images(images), F.normalize(output.image_embeds, dim=-1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(pipeline.encode_labels(labels), F.normalize(output.text_embeds, dim=-1),
                               atol=1e-5, rtol=0)
    expected = output.logits_per_image.sigmoid()
    for row, predictions in zip(expected, pipeline.predict(images, labels)):
        assert [dict(predictions)[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-4)
    assert abs(sum(dict(pipeline.predict(images[0], labels)).values()) - 1) > 1e-3  # not a softmax


def test_a_siglip_model_saved_again_loads_bit_identical_and_pads_as_trained(siglip_dir, tmp_path):
    model = CLIP.from_pretrained(str(siglip_dir))
    model.save_pretrained(tmp_path / "saved")
    loaded = CLIP.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    assert loaded.config.text.padding == "max_length" and loaded.logit_bias.item() == pytest.approx(-2.5)
    assert [len(ids) for ids in loaded.tokenizer(["a dog", "two dogs playing in the snow"])["input_ids"]] == [12, 12]


@pytest.mark.parametrize("tune", [["model.image.tune=locked", "train.cache_image_features=true"],
                                  ["model.image.tune=full", "train.cache_image_features=false", "model.text.tune=lora",
                                   "model.text.lora.rank=4", "model.text.lora.targets=[q_proj, v_proj]"]])
def test_a_siglip_fine_tune_takes_the_sigmoid_loss_and_its_loss_falls(siglip_dir, tune, tmp_path):
    import csv

    from PIL import Image

    from liteclip.config import load_config
    from liteclip.train.loop import fit

    rng = np.random.default_rng(5)
    rows = []
    for i, sentence in enumerate(SENTENCES * 4):  # a block of its own colour on grey: photos a random tower tells apart
        pixels = np.full((32, 32, 3), 128, dtype=np.uint8)
        pixels[8:24, 8:24] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", f"{sentence} {['dog', 'cat', 'boy', 'diagram'][i % 4]}"))
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *rows])
    config = load_config("configs/finetune_siglip.yaml", [
        f"model.init_from={siglip_dir}", "data.dataset=csv", f"data.root={tmp_path}", "data.captions_file=captions.csv",
        "data.batch_size=5", "data.num_workers=0", "data.val_fraction=0.25", "data.test_fraction=0.25",
        "optim.lr=3e-3", "optim.tower_lr=3e-3", "optim.warmup_steps=0", "train.epochs=15", "train.log_every=1",
        f"train.output_dir={tmp_path / 'run'}", f"train.model_dir={tmp_path / 'model'}", *tune])
    assert config.loss.name == "siglip"
    fit(config, show_progress=False)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert CLIP.from_pretrained(tmp_path / "model").config.text.padding == "max_length"


def test_a_siglip2_naflex_checkpoint_is_refused_naming_what_works_instead(tmp_path):
    from transformers import Siglip2Config

    from liteclip.errors import ConfigError

    Siglip2Config().save_pretrained(tmp_path / "naflex")
    with pytest.raises(ConfigError, match="NaFlex.*siglip2-base-patch16-224.*open_clip:ViT-B-16-SigLIP2"):
        CLIP.from_pretrained(str(tmp_path / "naflex"))
