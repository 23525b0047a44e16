"""Weighted search queries, the same arithmetic on the command line and in the web page (rclip's query arithmetic):

    golden retriever                         one text
    2:golden retriever + ./pool.jpg - grass  twice the text, plus an image, minus a text        (command line)
    2:golden retriever + id:3fa9c1d2e4b5a6f7 - grass    the same with an indexed image, by id   (web page)

Terms are joined by " + " or " - " (spaces around the sign); a leading sign applies to the first term; each term
may start with a weight and a colon. The query's embedding is the weighted sum of the terms' normalised embeddings,
normalised again (liteclip.search.image_search.ImageSearch.query).

Which terms are images depends on who asks. On the command line (parse_query) a term naming an existing image file
(by its path, or one ending in an image suffix that starts with ./ ../ / or ~/) is that image: the user's own
shell can read those files anyway. A web request never names a file (parse_web_query): an image term is `id:` and
an indexed image's id, and a term shaped like a path or a file name is refused by its shape alone, before any file
is looked at, so no reply can tell a web page whether a file exists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from liteclip.data.image_folder import IMAGE_SUFFIXES
from liteclip.errors import InputError

TERM_SEPARATOR = re.compile(r"\s+([+-])\s+")
LEADING_SIGN = re.compile(r"^([+-])\s+(.*)$", re.DOTALL)
WEIGHT = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*:\s*(.+)$", re.DOTALL)
INDEXED_TERM = re.compile(r"^id:\s*([0-9a-fA-F]{1,64})$")
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\", "\\", "file:")


@dataclass(frozen=True)
class QueryTerm:
    weight: float
    text: str | None = None  # a text term
    image: Path | None = None  # or an image file (command line)
    indexed: str | None = None  # or an indexed image, by its id (web page)


def split_terms(query: str) -> list[tuple[float, str]]:
    """(weight, body) of each term, in order: the syntax alone, no term interpreted and no file looked at."""
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; type some text, an image path, or terms joined by + and -")
    first_sign, text = "+", query.strip()
    leading = LEADING_SIGN.match(text)
    if leading:  # "- grass": the sign belongs to the first term
        first_sign, text = leading[1], leading[2]
    pieces = TERM_SEPARATOR.split(" " + text + " ")
    signs, bodies = [first_sign] + pieces[1::2], pieces[0::2]
    terms = []
    for sign, body in zip(signs, bodies):
        body = body.strip()
        if not body:
            raise InputError(f"query {shown(query)}: a + or - has no term after it; write `a + b - c`")
        weight = 1.0
        match = WEIGHT.match(body)
        if match:
            weight, body = float(match[1]), match[2].strip()
            if not math.isfinite(weight):
                raise InputError(f"query {shown(query)}: the weight {match[1][:20]}... is too large; weights are "
                                 f"ordinary numbers such as 2 or 0.5")
        terms.append((-weight if sign == "-" else weight, body))
    if all(weight == 0 for weight, _ in terms):
        raise InputError(f"query {shown(query)}: every term has weight 0")
    return terms


def parse_query(query: str) -> list[QueryTerm]:
    """The terms of a query typed on the command line: a term naming an image file is that image."""
    terms = []
    for weight, body in split_terms(query):
        if looks_like_image(body):
            path = expanded(body)
            if not is_file(path):
                what = "is not a regular file" if exists(path) else "does not exist"
                raise InputError(f"query {shown(query)}: the image {shown(body)} {what}")
            terms.append(QueryTerm(weight, image=path))
        else:
            terms.append(QueryTerm(weight, text=body))
    return terms


def parse_web_query(query: str) -> list[QueryTerm]:
    """The terms of a query from the web page: `id:HEX` is an indexed image; a path or file name is refused by its
    shape (never opened or looked up); anything else is text."""
    terms = []
    for weight, body in split_terms(query):
        match = INDEXED_TERM.match(body)
        if match:
            terms.append(QueryTerm(weight, indexed=match[1].lower()))
        elif shaped_like_a_path(body):
            raise InputError(f"query {shown(query)}: {shown(body)} looks like a file; the page never opens files "
                             f"by name. Use an indexed image's id (id:..., as \"more like this\" does) or upload "
                             f"the image; file paths work in `liteclip search`")
        else:
            terms.append(QueryTerm(weight, text=body))
    return terms


def shaped_like_a_path(term: str) -> bool:
    """Whether a term looks like a file path or an image file name, judged by its characters alone."""
    return term.startswith(PATH_PREFIXES) or Path(term.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES


def looks_like_image(term: str) -> bool:
    path = expanded(term)
    if is_file(path):
        return path.suffix.lower() in IMAGE_SUFFIXES
    return term.startswith(("./", "../", "/", "~/")) and path.suffix.lower() in IMAGE_SUFFIXES


def expanded(term: str) -> Path:
    """The term as a path, ~ expanded where there is a home to expand it to (`~nobody/x` stays as written)."""
    try:
        return Path(term).expanduser()
    except (RuntimeError, ValueError, KeyError):  # no such user, or a name no user can have (a NUL in it)
        return Path(term)


def is_file(path: Path) -> bool:
    """Path.is_file, false for names the file system cannot even look up (over 255 bytes, a NUL inside)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def shown(text: str, limit: int = 80) -> str:
    """A query as a message quotes it: cut short past `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
