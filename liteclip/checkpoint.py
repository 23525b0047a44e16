"""Everything liteclip writes to or reads from disk for a model: the atomic write, the self-contained model
directory (config.yaml + model.safetensors + text_config/ + tokenizer/), and training checkpoints.

Writes go to a temporary file that is flushed, fsynced and renamed over the target (timm's checkpoint_saver does the
same), so a crash at any moment leaves either the old file or the new one, never a truncated one. Reads never
unpickle: model weights are safetensors, training checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from liteclip.config import Config, ConfigError, config_from_dict
from liteclip.model import CLIP

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
TEXT_CONFIG_DIR = "text_config"
VISION_CONFIG_DIR = "vision_config"  # only for Hugging Face image towers; timm towers rebuild from their name
TOKENIZER_DIR = "tokenizer"
OWNED_NAMES = {CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME, TEXT_CONFIG_DIR, TOKENIZER_DIR, VISION_CONFIG_DIR}


class ModelLoadError(RuntimeError):
    """A model directory or checkpoint that cannot be loaded; the message says why and what to do."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # the rename itself must reach the disk too, or a power cut can undo it
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ model directory


def save_model_dir(model: CLIP, directory: str | Path, full_config: Config | None = None) -> Path:
    """Writes a self-contained model directory; replaces an existing one only once the new one is complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config_dict = full_config.to_dict() if full_config is not None else Config(model=model.config).to_dict()
        config_dict["model"] = Config(model=model.config).to_dict()["model"]
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(model.data_config, indent=2))
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "library": "liteclip"})
        model.text_encoder.model.config.save_pretrained(staging / TEXT_CONFIG_DIR)
        if model.config.image.source == "hf":
            model.image_encoder.model.config.save_pretrained(staging / VISION_CONFIG_DIR)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        # mkdtemp makes the folder private (0700); a saved model gets the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        previous = directory.with_name(f".{directory.name}.previous")
        if directory.exists():
            for entry in directory.iterdir():  # files liteclip does not write (a README, notes) stay
                if entry.name not in OWNED_NAMES:
                    os.replace(entry, staging / entry.name)
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
        _fsync_directory(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved model to %s", directory)
    return directory


def read_model_config(directory: str | Path) -> Config:
    """The resolved config stored in a model directory."""
    path = Path(directory) / CONFIG_NAME
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))
    except ConfigError as error:
        raise ModelLoadError(f"{path} does not describe a liteclip model this version can build: {error}") from None


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> CLIP:
    """Rebuilds a CLIP from a directory written by save_model_dir, offline and without pickle."""
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ModelLoadError(
            f"no liteclip model in {directory.resolve()} (it needs {CONFIG_NAME} and {WEIGHTS_NAME}). Train one with "
            f"`python train.py --config configs/demo.yaml`, which writes ./model, or put a directory written by "
            f"CLIP.save_pretrained there.")
    config = read_model_config(directory).model
    # the weights come from the directory, so the towers are built empty and never touch the network
    config = dataclasses.replace(
        config,
        image=dataclasses.replace(config.image, pretrained=False, weights_file=None),
        text=dataclasses.replace(config.text, pretrained=False, name=str(directory / TEXT_CONFIG_DIR)),
    )
    text_hf_config = AutoConfig.from_pretrained(directory / TEXT_CONFIG_DIR)
    image_hf_config = None
    if config.image.source == "hf":
        image_hf_config = AutoConfig.from_pretrained(directory / VISION_CONFIG_DIR)
    tokenizer = None
    if (directory / TOKENIZER_DIR).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
    model = CLIP(config, tokenizer=tokenizer, text_hf_config=text_hf_config, image_hf_config=image_hf_config)
    if (directory / PREPROCESSOR_NAME).is_file():
        saved = json.loads((directory / PREPROCESSOR_NAME).read_text())
        model.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    load_weights(model, load_file(str(directory / WEIGHTS_NAME)), str(directory / WEIGHTS_NAME))
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{name}: file {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
                  for name in sorted(set(state) & set(expected)) if state[name].shape != expected[name].shape]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not fit the model its config describes:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise ModelLoadError("\n".join(lines))
    model.load_state_dict(state)


# -------------------------------------------------------------------------------------- training checkpoints


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes a training checkpoint (tensors, numbers, strings, dicts and lists only) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's own errors are many and deep; the cause is what matters
        raise ModelLoadError(
            f"refused to load {path}: it is not a plain-tensor checkpoint that loads with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). liteclip never unpickles arbitrary "
            f"objects; re-export the weights as safetensors.") from None

