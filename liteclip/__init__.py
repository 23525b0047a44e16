"""liteclip: a small, clear, trainable CLIP."""

from liteclip.config import Config, load_config
from liteclip.loss import clip_loss
from liteclip.model import CLIP, build_model

__version__ = "0.1.0"

__all__ = ["CLIP", "Config", "ImageSearch", "ZeroShotPipeline", "build_model", "clip_loss", "load_config",
           "__version__"]


def __getattr__(name: str):
    # the pipeline pulls in the image-decoding stack; import it only when asked for
    if name in ("ZeroShotPipeline", "ImageSearch"):
        from liteclip import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'liteclip' has no attribute {name!r}")
