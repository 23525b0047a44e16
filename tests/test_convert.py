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
