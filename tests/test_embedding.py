"""Batched embedding: texts batched by length come back in the caller's order, equal to one-by-one encoding; image
files go through their DataLoader once, a caller's own loader included."""

import pytest
import torch
from torch.utils.data import DataLoader

from liteclip import build_model
from liteclip.embedding import encode_decodable_image_files, encode_texts, image_file_loader, pad_token_ids
from tests.conftest import SENTENCES, draw_image


def test_texts_batched_by_length_come_back_in_order_with_less_padding(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config.model).eval()
    texts = [SENTENCES[i % len(SENTENCES)] * (1 + i % 3) for i in range(13)]  # lengths all over the place
    one_by_one = torch.cat([encode_texts(model, [text]) for text in texts])
    padded_tokens = []
    real = model.encode_text
    model.encode_text = lambda ids, mask: padded_tokens.append(ids.numel()) or real(ids, mask)
    batched = encode_texts(model, texts, batch_size=4)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    lengths = [len(model.tokenizer(text, truncation=True, max_length=16)["input_ids"]) for text in texts]
    in_given_order = sum(len(texts[s:s + 4]) * max(lengths[s:s + 4]) for s in range(0, len(texts), 4))
    assert sum(padded_tokens) < in_given_order


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_texts_are_tokenised_once_and_padded_as_the_tokenizer_pads_them(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config.model).eval()
    texts = [SENTENCES[i % len(SENTENCES)] * (1 + i % 3) for i in range(9)]
    expected = torch.cat([encode_texts(model, [text]) for text in texts])
    model.tokenizer = CountingTokenizer(model.tokenizer)
    torch.testing.assert_close(encode_texts(model, texts, batch_size=4), expected, atol=1e-5, rtol=1e-4)
    assert model.tokenizer.calls == 1  # lengths and batches from the same token ids
    tokenizer = model.tokenizer.tokenizer
    for side in ("right", "left"):
        tokenizer.padding_side = side
        reference = tokenizer(texts, padding="longest", return_tensors="pt")
        ids, mask = pad_token_ids(tokenizer(texts)["input_ids"], tokenizer.pad_token_id, side)
        assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])


def test_texts_in_many_batches_enter_one_autocast_context(tiny_config):
    # autocast keeps the weights it cast until its outermost context exits: one context casts them once
    model = build_model(tiny_config.model).eval()
    entered = []

    def counting_autocast():
        entered.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    embeds = encode_texts(model, [SENTENCES[i % len(SENTENCES)] for i in range(10)], batch_size=3,
                          autocast=counting_autocast)
    assert embeds.shape == (10, model.config.projection.dim) and embeds.dtype == torch.float32
    assert len(entered) == 1  # four batches


def test_image_files_are_read_in_one_pass_of_the_loader_and_a_callers_loader_gives_the_same(tiny_config, tmp_path,
                                                                                               monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config.model).eval()
    paths = [draw_image(tmp_path / f"{i}.png", (40 * i, 255 - 40 * i, 90)) for i in range(5)]
    iterations = []
    real_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda loader: iterations.append(loader) or real_iter(loader))
    fresh = encode_decodable_image_files(model, paths, batch_size=2, num_workers=1, show_progress=True)
    assert len(iterations) == 1  # a second pass would start the workers twice

    kept = image_file_loader(paths, model.data_config, batch_size=2, num_workers=1, persistent_workers=True)
    for _ in range(2):  # as the trainer evaluates every epoch, with the same workers
        again = encode_decodable_image_files(model, paths, loader=kept)
        torch.testing.assert_close(again.embeds, fresh.embeds)
        assert again.kept == fresh.kept == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="4 images for 5 paths"):
        encode_decodable_image_files(model, paths, loader=image_file_loader(paths[:4], model.data_config))


def test_without_a_device_texts_and_images_are_encoded_where_the_model_is(tiny_config, tmp_path):
    # a ZeroShotPipeline on "auto" puts its model on a GPU where there is one, and evaluate_zero_shot(pipeline.model,
    # task) must follow it there. The meta device stands in for a GPU; its towers cannot run (BERT reads its mask's
    # values), so they are replaced by stand-ins that note where their inputs arrived
    model = build_model(tiny_config.model).eval().to("meta")
    dim, arrived = tiny_config.model.projection.dim, []

    def stand_in(inputs: torch.Tensor, *rest) -> torch.Tensor:
        arrived.append(inputs.device.type)
        return torch.zeros(len(inputs), dim, device=inputs.device)

    model.encode_text = model.encode_image = stand_in
    texts = encode_texts(model, SENTENCES[:3])
    paths = [draw_image(tmp_path / f"{i}.png", (40 * i, 90, 200)) for i in range(3)]
    images = encode_decodable_image_files(model, paths, batch_size=2)
    assert arrived == ["meta"] * 3  # one text batch, two image batches
    assert texts.device.type == "meta" and texts.shape == (3, dim)
    assert images.embeds.device.type == "meta" and images.kept == [0, 1, 2]
