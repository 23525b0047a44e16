"""Weighted queries: terms, signs, weights, and which terms are images."""

from pathlib import Path

import pytest

from liteclip.errors import InputError
from hypothesis import given, settings, strategies as st

from liteclip.search.query import QueryTerm, parse_query, parse_web_query
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
                                            ("dog - ./missing.png", "does not exist"), ("0:dog", "weight 0"),
                                            ("9" * 400 + ":dog", "too large"), ("- ", "no term")])
def test_bad_queries_say_what_is_wrong(query, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        parse_query(query)


def test_a_leading_sign_belongs_to_the_first_term():
    assert parse_query("- grass") == [QueryTerm(-1.0, text="grass")]
    assert parse_query("- 2:grass + dog") == [QueryTerm(-2.0, text="grass"), QueryTerm(1.0, text="dog")]
    assert parse_query("+ dog") == [QueryTerm(1.0, text="dog")]


@pytest.mark.parametrize("term", ["/" + "x" * 300 + "/a.jpg", "a" * 300, "a\0b.jpg", "~nobody_here/x.jpg",
                                  "./" + "é" * 200 + ".png"])
def test_terms_the_file_system_cannot_look_up_are_not_errors_of_the_file_system(term, tmp_path, monkeypatch):
    """Issue 38: a sentence over 255 bytes between two slashes was `OSError: File name too long` (HTTP 500)."""
    monkeypatch.chdir(tmp_path)
    term = term.replace("\\0", "\0")
    try:
        terms = parse_query(term)
    except InputError as error:
        assert "does not exist" in str(error)
    else:
        assert terms == [QueryTerm(1.0, text=term)]


def test_the_web_parser_takes_indexed_ids_and_refuses_anything_shaped_like_a_file():
    assert parse_web_query("2:dog + id:3FA9c1d2e4b5a6f7 - grass") == [
        QueryTerm(2.0, text="dog"), QueryTerm(1.0, indexed="3fa9c1d2e4b5a6f7"), QueryTerm(-1.0, text="grass")]
    assert parse_web_query("a well-lit room+kitchen") == [QueryTerm(1.0, text="a well-lit room+kitchen")]
    for term in ("./pool.jpg", "/etc/passwd", "~/x", "pool.JPG", "../a", "file:///etc/passwd", "C.png?x=1"):
        with pytest.raises(InputError, match="never opens files"):
            parse_web_query(f"dog + {term}")


PIECES = list("ab .:/+-~\\0123456789é\0\n\t") + ["id:", ".jpg", " + ", " - ", "9" * 400, "x" * 260, "0123abcd"]
QUERY_TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join) | st.text(max_size=300)


@settings(max_examples=300, deadline=None)
@given(query=QUERY_TEXT)
def test_no_query_gives_anything_but_terms_or_a_one_line_input_error(query):
    for parse in (parse_query, parse_web_query):
        try:
            terms = parse(query)
        except InputError as error:
            assert "\n" not in str(error)  # one line, the query quoted
            continue
        assert terms and all(isinstance(term.weight, float) and term.weight == term.weight for term in terms)
        assert all((term.text is None) + (term.image is None) + (term.indexed is None) == 2 for term in terms)
        if parse is parse_web_query:
            assert all(term.image is None for term in terms)  # the web parser never yields a file
