"""Weighted queries: terms, signs, weights, and which terms are images."""

from pathlib import Path

import pytest

from liteclip.errors import InputError
from liteclip.query import QueryTerm, parse_query
from tests.conftest import draw_image


def test_a_plain_query_is_one_text_term_even_with_a_hyphen_or_a_plus_inside_a_word():
    assert parse_query("a dog on the beach") == [QueryTerm(1.0, text="a dog on the beach")]
    assert parse_query("a well-lit room+kitchen") == [QueryTerm(1.0, text="a well-lit room+kitchen")]


def test_weights_signs_and_image_terms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    draw_image(tmp_path / "pool.jpg", (20, 90, 200))
    terms = parse_query("2:golden retriever + ./pool.jpg - grass - 0.5: a fence")
    assert terms == [QueryTerm(2.0, text="golden retriever"), QueryTerm(1.0, image=Path("pool.jpg")),
                     QueryTerm(-1.0, text="grass"), QueryTerm(-0.5, text="a fence")]
    assert parse_query(f"{tmp_path / 'pool.jpg'}") == [QueryTerm(1.0, image=tmp_path / "pool.jpg")]


@pytest.mark.parametrize("query, message", [("", "empty"), ("   ", "empty"), ("dog + ", "no term"),
                                            ("dog - ./missing.png", "does not exist"), ("0:dog", "weight 0")])
def test_bad_queries_say_what_is_wrong(query, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        parse_query(query)
