"""Taking a trained model out of liteclip: ONNX files for onnxruntime and other runtimes, and the image tower as a
plain timm checkpoint.

    liteclip export model --format onnx --out model_onnx
        image_encoder.onnx   pixel_values (B, 3, H, W) float32 -> image_embeds (B, D), L2-normalised
        text_encoder.onnx    input_ids, attention_mask (B, L) int64 -> text_embeds (B, D), L2-normalised
        tokenizer/, preprocessor_config.json (input size, mean, std, interpolation, crop_pct), export.json
    liteclip export model --format timm --out model_timm
        model.safetensors + config.json: timm.create_model(name, pretrained=True,
        pretrained_cfg_overlay={"file": ".../model.safetensors"}, num_classes=0) loads it without liteclip, and so
        does timm.create_model("local-dir:model_timm", pretrained=True, num_classes=0), which also applies the
        tower's model.image.model_kwargs (config.json's model_args) itself

zero_shot_head() turns label prompts into a linear classifier on the image embedding, so image tower, projection
and head together are an ordinary classifier whose top-1 is ZeroShotPipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from liteclip.files import refuse_overlap, write_directory
from liteclip.data.transforms import image_size
from liteclip.embedding import encode_labels
from liteclip.errors import InputError
from liteclip.weights.lora import merged_copy
from liteclip.model import CLIP

ONNX_OPSET = 17  # onnxruntime 1.16 and newer run it; LayerNormalization is a single op from opset 17
MIN_OPSET, MAX_OPSET = 14, 20  # scaled dot-product attention needs 14; torch's TorchScript exporter stops at 20
IMAGE_ONNX, TEXT_ONNX, EXPORT_INFO = "image_encoder.onnx", "text_encoder.onnx", "export.json"
ONNX_NAMES = {IMAGE_ONNX, TEXT_ONNX, EXPORT_INFO, "tokenizer", "preprocessor_config.json"}
TIMM_NAMES = {"model.safetensors", "config.json"}
TIMM_EXPORTED_BY = "liteclip (the image tower of a CLIP model; add a head with zero_shot_head)"


def json_file(path: Path) -> dict:
    """A JSON object from a file, or {} for anything else (missing, unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def older_onnx_export(directory: Path, name: str) -> bool:
    """A file of an ONNX export an older liteclip wrote, before exports carried a manifest: its export.json has the
    fields liteclip writes there."""
    info = json_file(directory / EXPORT_INFO)
    return (name in ONNX_NAMES and info.get("format") == "onnx"
            and {"logit_scale", "embedding_dim", "image_input", "text_inputs"} <= set(info))


def older_timm_export(directory: Path, name: str) -> bool:
    """A file of a timm export an older liteclip wrote: its config.json says liteclip exported it."""
    return name in TIMM_NAMES and json_file(directory / "config.json").get("exported_by") == TIMM_EXPORTED_BY


class ImageEmbedder(nn.Module):
    """pixel_values (B, 3, H, W) -> normalised image embeddings (B, D): image tower and head."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEmbedder(nn.Module):
    """input_ids, attention_mask (B, L) -> normalised text embeddings (B, D): text tower and head."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def refuse_overwriting_source(model: CLIP, out_dir: str | Path, what: str) -> None:
    """An export never writes into (or around) the directory its model was loaded from."""
    source = getattr(model, "name_or_path", None)
    if source is not None and Path(source).is_dir():
        refuse_overlap(out_dir, source, what)


def export_onnx(model: CLIP, out_dir: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Writes the two ONNX files with a dynamic batch axis (and sequence length), the tokenizer and the
    preprocessing beside them; the directory appears complete or not at all."""
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; export a model saved with save_pretrained")
    refuse_overwriting_source(model, out_dir, "the ONNX export")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset {opset} is outside what this export supports ({MIN_OPSET} to {MAX_OPSET}: the "
                         f"attention and normalisation ops of the towers, and torch's TorchScript exporter); "
                         f"the default {ONNX_OPSET} runs on onnxruntime 1.16 and newer")
    model = merged_copy(model).float().cpu().eval()  # LoRA adapters folded in (a plain model is copied as is)
    side = image_size(model.data_config)
    pixels = torch.zeros(2, 3, side, side)
    # two captions of different lengths, so the traced graph has real padding and a masked pooling
    tokens = model.tokenizer(["a photo", "a photo of two shapes side by side"], padding=True, return_tensors="pt")

    def write_contents(staging: Path) -> None:
        # the TorchScript-based exporter: it keeps dynamic axes for these towers and takes a second, where the
        # dynamo-based one takes ten and needs onnxscript
        with torch.no_grad():
            torch.onnx.export(ImageEmbedder(model).eval(), (pixels,), str(staging / IMAGE_ONNX),
                              input_names=["pixel_values"], output_names=["image_embeds"], opset_version=opset,
                              dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                              dynamo=False)
            torch.onnx.export(TextEmbedder(model).eval(), (tokens["input_ids"], tokens["attention_mask"]),
                              str(staging / TEXT_ONNX), input_names=["input_ids", "attention_mask"],
                              output_names=["text_embeds"], opset_version=opset,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"},
                                            "text_embeds": {0: "batch"}},
                              dynamo=False)
        model.tokenizer.save_pretrained(str(staging / "tokenizer"))
        (staging / "preprocessor_config.json").write_text(json.dumps(model.data_config, indent=2))
        (staging / EXPORT_INFO).write_text(json.dumps({
            "format": "onnx", "opset": opset, "logit_scale": model.scale().item(),
            # a SigLIP-style model scores each label on its own: sigmoid(scale * cos + bias), not a softmax
            "logit_bias": model.logit_bias.item() if model.logit_bias is not None else None,
            "probabilities": "sigmoid" if model.logit_bias is not None else "softmax",
            "embedding_dim": model.config.projection.dim, "max_length": model.config.text.max_length,
            "image_input": {"name": "pixel_values", "shape": ["batch", 3, side, side], "dtype": "float32"},
            # what the traced graph takes: a text tower that ignores its mask (SigLIP's) has no attention_mask input
            "text_inputs": {"names": graph_inputs(staging / TEXT_ONNX), "dtype": "int64"},
        }, indent=2))

    return write_directory(out_dir, write_contents, "the ONNX export", ONNX_NAMES, owns=older_onnx_export)


def export_timm(model: CLIP, out_dir: str | Path) -> Path:
    """Writes the image tower as a timm checkpoint (model.safetensors, and config.json in timm's hub layout with
    the tower's preprocessing) that timm loads by architecture name, without liteclip."""
    from safetensors.torch import save_file

    if model.config.image.source != "timm":
        raise InputError(f"the image tower is the Hugging Face model {model.config.image.name}, not a timm model; "
                         f"use --format onnx, or save_pretrained for transformers")
    refuse_overwriting_source(model, out_dir, "the timm export")
    tower = merged_copy(model).image_encoder.model
    architecture = model.config.image.name.split(".")[0]
    data = model.data_config
    timm_config = {"architecture": architecture, "num_classes": 0, "num_features": model.image_encoder.num_features,
                   "pretrained_cfg": {"input_size": list(data["input_size"]), "mean": list(data["mean"]),
                                      "std": list(data["std"]), "interpolation": data.get("interpolation", "bicubic"),
                                      "crop_pct": data.get("crop_pct", 1.0), "num_classes": 0},
                   "exported_by": TIMM_EXPORTED_BY}
    if model.config.image.model_kwargs:  # timm's hub layout: what create_model needs to rebuild this architecture
        timm_config["model_args"] = dict(model.config.image.model_kwargs)

    def write_contents(staging: Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in tower.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(timm_config, indent=2))

    return write_directory(out_dir, write_contents, "the timm export", TIMM_NAMES, owns=older_timm_export)


def graph_inputs(path: Path) -> list[str]:
    """The input names of an ONNX file's graph."""
    import onnx

    return [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]


def zero_shot_head(model: CLIP, labels: Sequence[str], templates: Sequence[str] | None = None) -> nn.Linear:
    """A bias-free linear classifier (D -> C) on normalised image embeddings: row c is label c's embedding
    (averaged over templates) times the model's logit scale, so its logits are ZeroShotPipeline's before softmax."""
    class_embeds = encode_labels(model, labels, templates)  # (C, D), on the model's device
    head = nn.Linear(class_embeds.shape[1], class_embeds.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(model.scale().detach() * class_embeds)
    return head


class ZeroShotClassifier(nn.Module):
    """Image tower, projection, normalisation and a zero_shot_head: pixels (B, 3, H, W) -> logits (B, C)."""

    def __init__(self, model: CLIP, head: nn.Linear):
        super().__init__()
        self.tower = model.image_encoder
        self.projection = model.image_projection
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.projection(self.tower(pixel_values)), dim=-1))
