"""The search wing: ImageSearch over an indexed folder (image_search), the index on disk (store), weighted queries
(query), and the local web page with its JSON API (serve, web/). It uses the library (pipeline, embedding, data) and
is used by the command line; nothing in the library imports it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ImageSearch":  # imported on first use, so the package stays light to import
        from liteclip.search.image_search import ImageSearch

        return ImageSearch
    raise AttributeError(f"module 'liteclip.search' has no attribute {name!r}")
