"""Batched embedding: texts batched by length come back in the caller's order, equal to one-by-one encoding."""

import torch

from liteclip import build_model
from liteclip.embedding import encode_texts
from tests.conftest import SENTENCES


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
