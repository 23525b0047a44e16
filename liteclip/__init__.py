"""liteclip: a small, clear, trainable CLIP.

The public API. What needs torch is imported on first use, so `import liteclip` (and `liteclip --help`) stays fast.
"""

from __future__ import annotations

from typing import Any

from liteclip.config import Config, load_config
from liteclip.errors import LiteclipError

__version__ = "0.1.0"

__all__ = ["CLIP", "Config", "ImageSearch", "LiteclipError", "ZeroShotPipeline", "build_model", "clip_loss",
           "load_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("CLIP", "build_model"):
        from liteclip import model

        return getattr(model, name)
    if name == "clip_loss":
        from liteclip import loss

        return loss.clip_loss
    if name == "ZeroShotPipeline":
        from liteclip.pipeline import ZeroShotPipeline

        return ZeroShotPipeline
    if name == "ImageSearch":
        from liteclip.search.image_search import ImageSearch

        return ImageSearch
    raise AttributeError(f"module 'liteclip' has no attribute {name!r}")
