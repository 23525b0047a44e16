"""Weighted search queries, the same on the command line and in the web page (rclip's query arithmetic):

    golden retriever                         one text
    2:golden retriever + ./pool.jpg - grass  twice the text, plus an image, minus a text

Terms are joined by " + " or " - " (spaces around the sign); each may start with a weight and a colon. A term that
names an existing image file (by its path, or one ending in an image suffix that starts with ./ ../ / or ~/) is an
image; anything else is text. The query's embedding is the weighted sum of the terms' normalised embeddings,
normalised again (liteclip.pipeline.ImageSearch.query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from liteclip.data.image_folder import IMAGE_SUFFIXES
from liteclip.errors import InputError

TERM_SEPARATOR = re.compile(r"\s+([+-])\s+")
WEIGHT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*:\s*(.+)$", re.DOTALL)


@dataclass(frozen=True)
class QueryTerm:
    weight: float
    text: str | None = None  # a text term
    image: Path | None = None  # or an image file


def looks_like_image(term: str) -> bool:
    path = Path(term).expanduser()
    if path.is_file():
        return path.suffix.lower() in IMAGE_SUFFIXES
    return term.startswith(("./", "../", "/", "~/")) and path.suffix.lower() in IMAGE_SUFFIXES


def parse_query(query: str) -> list[QueryTerm]:
    """The terms of a weighted query, in order; a query without signs is one text term of weight 1."""
    if not query or not query.strip():
        raise InputError("the query is empty; type some text, an image path, or terms joined by + and -")
    pieces = TERM_SEPARATOR.split(" " + query.strip() + " ")
    signs, bodies = ["+"] + pieces[1::2], pieces[0::2]
    terms = []
    for sign, body in zip(signs, bodies):
        body = body.strip()
        if not body:
            raise InputError(f"query {query!r}: a + or - has no term after it; write `a + b - c`")
        weight = 1.0
        match = WEIGHT.match(body)
        if match:
            weight, body = float(match[1]), match[2].strip()
        weight = -weight if sign == "-" else weight
        if looks_like_image(body):
            path = Path(body).expanduser()
            if not path.is_file():
                raise InputError(f"query {query!r}: the image {body} does not exist")
            terms.append(QueryTerm(weight, image=path))
        else:
            terms.append(QueryTerm(weight, text=body))
    if all(term.weight == 0 for term in terms):
        raise InputError(f"query {query!r}: every term has weight 0")
    return terms
