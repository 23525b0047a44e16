"""liteclip: a small, clear, trainable CLIP."""

from liteclip.config import Config, load_config
from liteclip.loss import clip_loss
from liteclip.model import CLIP, build_model

__version__ = "0.1.0"

__all__ = ["CLIP", "Config", "build_model", "clip_loss", "load_config", "__version__"]
