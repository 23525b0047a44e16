"""CLIP: an image tower, a text tower, two projection heads and a learnable temperature.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021). The towers are thin
adapters over timm and Hugging Face transformers (as open_clip's timm_model.py / hf_model.py are), so any model of
either library works by name. Read top to bottom: ImageEncoder, TextEncoder, ProjectionHead, then CLIP.

The model holds no loss: `forward` returns normalised embeddings, logits and the scale; liteclip.loss reads logits.
Building from a config, saving and loading (from_config, save_pretrained, from_pretrained) come from
liteclip.pretrained's mixin, as Hugging Face models get them from PreTrainedModel.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from liteclip.config import ImageEncoderConfig, ModelConfig, ProjectionConfig, TextEncoderConfig
from liteclip.weights.huggingface import clip_data_config
from liteclip.weights.openclip import data_config_of
from liteclip.errors import ConfigError
from liteclip.weights.lora import add_lora
from liteclip.pretrained import PretrainedMixin


# ------------------------------------------------------------------------------------------------- image tower


@contextlib.contextmanager
def timm_load_report():
    """Collects the tensor names timm reports missing while it loads pretrained weights: with the classifier
    removed it loads non-strictly and only logs them, so a file of another architecture would leave the tower at
    random init without an error."""
    missing: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Missing keys ("):
                names = message[len("Missing keys ("):message.index(")")].split(", ")
                missing.extend(name for name in names if not name.endswith("num_batches_tracked"))

    timm_logger = logging.getLogger("timm.models._builder")
    handler, level = Collect(level=logging.INFO), timm_logger.level
    timm_logger.addHandler(handler)
    timm_logger.setLevel(logging.INFO)
    try:
        yield missing
    finally:
        timm_logger.removeHandler(handler)
        timm_logger.setLevel(level)


class ImageEncoder(nn.Module):
    """Any timm model as a pooled-feature extractor (no classifier).

    Exposes `num_features` and `data_config` (timm's input size, mean, std, interpolation, crop_pct), so the data
    pipeline normalises with the tower's own statistics.
    """

    def __init__(self, config: ImageEncoderConfig, hf_config: Any | None = None, open_clip_model: Any = None):
        super().__init__()
        self.config = config
        if config.source == "hf":
            self._init_hf(config, hf_config)
        elif config.source == "open_clip":
            self._init_open_clip(config, open_clip_model)
        else:
            self._init_timm(config)
        if config.tune == "lora":
            self.model = add_lora(self.model, config.lora, "model.image", is_hf=config.source == "hf")

    def _init_timm(self, config: ImageEncoderConfig) -> None:
        """A timm model by name (pooled features, no classifier), and its preprocessing as timm resolves it."""
        kwargs: dict[str, Any] = {"num_classes": 0}
        if config.weights_file:
            # timm loads the file through its pretrained path, which drops the classifier for num_classes=0
            path = Path(config.weights_file)
            if not path.is_file():
                raise FileNotFoundError(f"model.image.weights_file={path} does not exist")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        else:
            kwargs["pretrained"] = config.pretrained
        architecture = config.name.split(".")[0]
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
            raise ConfigError(f"model.image.name={config.name!r} is not a timm model; close names: {close or 'none'} "
                              f"(timm.list_models('*pattern*') lists them all)")
        reserved = sorted(set(config.model_kwargs) & {"num_classes", "pretrained", "pretrained_cfg_overlay"})
        if reserved:
            raise ConfigError(f"model.image.model_kwargs sets {reserved}, which liteclip sets itself (pretrained: "
                              f"model.image.pretrained and weights_file; the classifier is always removed)")
        try:
            with timm_load_report() as missing:
                self.model = timm.create_model(config.name, **config.model_kwargs, **kwargs)
        except TypeError as error:  # the architecture's constructor does not take one of them
            if not config.model_kwargs or "keyword argument" not in str(error):
                raise
            raise ConfigError(f"model.image.model_kwargs={config.model_kwargs}: {config.name} does not take them "
                              f"({error}); see the model's constructor in timm, or set model.image.model_kwargs={{}} "
                              f"when another config's settings came with a different model") from None
        except RuntimeError as error:  # load_state_dict: the file holds another architecture's weights
            if not config.weights_file:
                raise
            detail = " ".join(str(error).split())[:300]
            raise ConfigError(f"model.image.weights_file={config.weights_file} does not fit the timm tower "
                              f"{config.name} ({detail}); set model.image.name to the architecture the file was "
                              f"saved from") from None
        if config.weights_file and missing:  # timm loads without strictness once the classifier is dropped
            raise ConfigError(f"model.image.weights_file={config.weights_file} does not fit the timm tower "
                              f"{config.name}: {len(missing)} of its tensors are not in the file (first: "
                              f"{', '.join(missing[:3])}); set model.image.name to the architecture the file was "
                              f"saved from")
        self.num_features: int = self.model.num_features
        data_config = timm.data.resolve_model_data_config(self.model)
        if config.image_size is not None:
            data_config["input_size"] = (3, config.image_size, config.image_size)
        if config.mean is not None:
            data_config["mean"] = tuple(config.mean)
        if config.std is not None:
            data_config["std"] = tuple(config.std)
        if config.crop_pct is not None:
            data_config["crop_pct"] = config.crop_pct
        data_config["resize_with"] = "pil"  # timm's own evaluation transform resizes PIL images
        self.data_config: dict[str, Any] = data_config

    def _init_hf(self, config: ImageEncoderConfig, hf_config: Any | None) -> None:
        """A Hugging Face vision tower (CLIPVisionModel, ViTModel, ...): pooled output, processor statistics."""
        from transformers import AutoConfig, AutoModel

        # an image tower never runs code shipped with its checkpoint (no option asks for it)
        if hf_config is not None:
            self.model = AutoModel.from_config(hf_config, trust_remote_code=False)
        elif config.pretrained:
            self.model = AutoModel.from_pretrained(config.name, trust_remote_code=False)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(config.name, trust_remote_code=False),
                                               trust_remote_code=False)
        self.num_features = self.model.config.hidden_size
        self.data_config = clip_data_config(getattr(self.model.config, "image_size", 224))

    def _init_open_clip(self, config: ImageEncoderConfig, open_clip_model: Any) -> None:
        """An open_clip model's image tower (`visual`): its output is already in the shared space."""
        if open_clip_model is None:
            raise ConfigError(f"model.image.source=open_clip ({config.name}) is built from an open_clip checkpoint: "
                              f"set model.init_from: open_clip:{config.name}@TAG_OR_FILE")
        self.model = open_clip_model.visual
        self.num_features = int(open_clip_model.liteclip_embed_dim)  # set by liteclip.weights.openclip
        preprocess = getattr(self.model, "preprocess_cfg", None)
        self.data_config = data_config_of(preprocess) if preprocess else clip_data_config(224)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.source == "hf":
            return self.model(pixel_values=pixel_values).pooler_output  # (B, hidden_size)
        return self.model(pixel_values)  # (B, 3, H, W) -> (B, num_features)


# -------------------------------------------------------------------------------------------------- text tower


# transformers' AutoModel maps no class to these text configs; their text towers by name
TEXT_MODEL_CLASSES = {"siglip_text_model": "SiglipTextModel"}


def text_model_from_config(hf_config: Any, trust_remote_code: bool = False) -> nn.Module:
    """A text tower built empty from its transformers config (its weights follow)."""
    import transformers

    class_name = TEXT_MODEL_CLASSES.get(getattr(hf_config, "model_type", ""))
    if class_name is not None:
        return getattr(transformers, class_name)(hf_config)
    return transformers.AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)


class TextEncoder(nn.Module):
    """Any Hugging Face AutoModel as a sentence encoder with a chosen pooling.

    Poolings: `mean` (attention-masked mean over tokens, liteCLIP's choice), `cls` (the first token, BERT-style),
    `eos` (the last real token, for causally-masked towers where only it has seen the whole caption).
    """

    def __init__(self, config: TextEncoderConfig, hf_config: Any | None = None, open_clip_model: Any = None):
        super().__init__()
        self.config = config
        if config.source == "open_clip":
            self._init_open_clip(config, open_clip_model)
        else:
            self._init_hf(config, hf_config)
        if config.tune == "lora":
            self.model = add_lora(self.model, config.lora, "model.text", is_hf=config.source == "hf")

    def _init_open_clip(self, config: TextEncoderConfig, open_clip_model: Any) -> None:
        """An open_clip model's text side (everything but `visual`, which the image tower holds), run through its
        own encode_text: the pooling and projection are the checkpoint's."""
        if open_clip_model is None:
            raise ConfigError(f"model.text.source=open_clip ({config.name}) is built from an open_clip checkpoint: "
                              f"set model.init_from: open_clip:{config.name}@TAG_OR_FILE")
        open_clip_model.visual = None  # held by the image tower; one owner per parameter
        for name in ("logit_scale", "logit_bias"):  # the CLIP model holds the temperature and bias
            if isinstance(getattr(open_clip_model, name, None), nn.Parameter):
                delattr(open_clip_model, name)
                setattr(open_clip_model, name, None)
        self.model = open_clip_model
        self.num_features = int(open_clip_model.liteclip_embed_dim)

    def _init_hf(self, config: TextEncoderConfig, hf_config: Any | None) -> None:
        """A Hugging Face AutoModel, pretrained or from its config; a BERT pooler is dropped (never used)."""
        from transformers import AutoConfig, AutoModel

        remote = config.trust_remote_code
        try:
            if hf_config is not None:  # rebuilding a saved model: architecture from the saved config, weights follow
                self.model = text_model_from_config(hf_config, remote)
            elif config.pretrained:
                self.model = AutoModel.from_pretrained(config.name, trust_remote_code=remote)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(config.name, trust_remote_code=remote),
                                                   trust_remote_code=remote)
        except OSError as error:
            raise ConfigError(f"model.text.name={config.name!r} is neither a local model directory nor a Hugging Face "
                             f"model that could be fetched ({str(error).splitlines()[0]}). Check the spelling, or "
                             f"download it once with network access and point model.text.name at the folder.") from None
        if config.pooling not in ("mean", "cls", "eos", "pooler"):
            raise ConfigError(f"model.text.pooling={config.pooling!r} must be one of mean, cls, eos, pooler")
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and config.max_length > positions:
            # caught here, at build time: otherwise the first caption that long fails deep inside the tower
            raise ConfigError(f"model.text.max_length={config.max_length} exceeds the {positions} positions of the "
                              f"text tower {config.name}; set model.text.max_length <= {positions}")
        if getattr(self.model, "pooler", None) is not None and config.pooling != "pooler":
            # BERT-style poolers are never used by these poolings; left in, their parameters would get no
            # gradient, and DDP would wait for them forever instead of averaging the other gradients
            self.model.pooler = None
        # a tower's own pooled output may be projected (SigLIP's text head outputs projection_size features)
        hidden_size = self.model.config.hidden_size
        self.num_features: int = (getattr(self.model.config, "projection_size", None) or hidden_size
                                  if config.pooling == "pooler" else hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.source == "open_clip":
            return self.model.encode_text(input_ids)  # (B, L) -> (B, embed_dim), projected; open_clip takes no mask
        # trained on captions padded to a fixed length, a tower sees its pads (SigLIP)
        if self.config.padding == "max_length":
            return self._encode(input_ids, attention_mask, seen=None)
        groups = self.config.length_groups
        # an ONNX trace would freeze one batch's grouping into the graph: traced, a batch stays whole
        if (input_ids.device.type == "cpu" and groups > 1 and input_ids.shape[0] >= 2 * groups
                and not torch.jit.is_tracing()):
            return self._encode_by_length(input_ids, attention_mask, groups)
        return self._encode(input_ids, attention_mask, seen=attention_mask)

    def _encode_by_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int) -> torch.Tensor:
        """The batch sorted by caption length and encoded in `groups` groups, each cut to its own longest caption:
        a caption attends only to its own tokens, so the embeddings are those of the whole padded batch, and the
        tower computes far fewer pad tokens when one long caption would pad the rest (compute grows with tokens on
        a CPU). Captions padded on the left are grouped but not cut."""
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths)
        embeds = []
        for rows in order.tensor_split(groups):
            ids, mask = input_ids[rows], attention_mask[rows]
            longest = int(lengths[rows].max())
            if not mask[:, longest:].any():  # right-padded: everything past the longest caption is padding
                ids, mask = ids[:, :longest], mask[:, :longest]
            embeds.append(self._encode(ids, mask, seen=mask))
        return torch.cat(embeds)[torch.argsort(order)]  # back in the batch's order

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                seen: torch.Tensor | None) -> torch.Tensor:
        """The tower's output pooled as config.pooling says; `seen` is the mask the tower itself gets."""
        outputs = self.model(input_ids=input_ids, attention_mask=seen)
        if self.config.pooling == "pooler":
            return outputs.pooler_output  # (B, F): the tower's own pooling (and head)
        hidden = outputs.last_hidden_state  # (B, L, H)
        if self.config.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        if self.config.pooling == "eos":
            last = attention_mask.sum(dim=1) - 1  # index of the last real token, (B,)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)


# ---------------------------------------------------------------------------------------------- projection head


class ProjectionHead(nn.Module):
    """Maps a tower's features into the shared embedding space.

    Kinds:
        residual: Linear -> GELU -> Dropout, added back to the projection, then LayerNorm (liteCLIP).
        residual_mlp: Linear -> GELU -> Linear -> Dropout, residual, LayerNorm (the Simple-CLIP recipe).
        linear: one bias-free Linear (OpenAI CLIP).
        identity: none; the tower projects itself (open_clip and SigLIP checkpoints).
    """

    def __init__(self, in_features: int, config: ProjectionConfig):
        super().__init__()
        self.kind = config.kind
        if config.kind == "identity":
            if in_features != config.dim:
                raise ConfigError(f"model.projection.kind=identity needs towers that output model.projection.dim="
                                  f"{config.dim} features; this one outputs {in_features}")
            return
        self.projection = nn.Linear(in_features, config.dim, bias=config.kind != "linear")
        if config.kind != "linear":
            self.fc = nn.Linear(config.dim, config.dim) if config.kind == "residual_mlp" else nn.Identity()
            self.dropout = nn.Dropout(config.dropout)
            self.layer_norm = nn.LayerNorm(config.dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return features  # (B, D)
        projected = self.projection(features)  # (B, F) -> (B, D)
        if self.kind == "linear":
            return projected
        hidden = self.dropout(self.fc(F.gelu(projected)))  # (B, D)
        return self.layer_norm(hidden + projected)  # (B, D)


# ------------------------------------------------------------------------------------------------------- CLIP


@dataclass
class CLIPOutput:
    image_embeds: torch.Tensor  # (B, D), L2-normalised
    text_embeds: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp of the clamped log-scale
    logits_per_image: torch.Tensor  # (B, B) = scale * image_embeds @ text_embeds.T (+ logit_bias)
    logits_per_text: torch.Tensor  # (B, B), its transpose
    logit_bias: torch.Tensor | None = None  # scalar, when the model has one (SigLIP)


class CLIP(PretrainedMixin, nn.Module):
    """Two towers and two heads trained so matching image-caption pairs have high cosine similarity.

    Attributes:
        tokenizer: the text tower's tokenizer (saved with the model by save_pretrained).
        data_config: the image tower's timm data config (input size, mean, std, interpolation, crop_pct).
        name_or_path: the directory or checkpoint name it was loaded from (None when built from a config).
    """

    def __init__(self, config: ModelConfig, tokenizer: Any = None, text_hf_config: Any | None = None,
                 image_hf_config: Any | None = None, open_clip_model: Any = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        # an open_clip checkpoint's model: its image tower goes to one, the rest to the other
        self.image_encoder = ImageEncoder(config.image, hf_config=image_hf_config, open_clip_model=open_clip_model)
        self.text_encoder = TextEncoder(config.text, hf_config=text_hf_config, open_clip_model=open_clip_model)
        self.image_projection = ProjectionHead(self.image_encoder.num_features, config.projection)
        self.text_projection = ProjectionHead(self.text_encoder.num_features, config.projection)
        # log of the inverse temperature, learned in log space as in the paper
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)),
                                        requires_grad=config.learn_logit_scale)
        # SigLIP's bias: with few positives among N*N pairs, it starts the logits well below zero
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.logit_bias_init)))
                           if config.logit_bias_init is not None else None)
        self.data_config = self.image_encoder.data_config
        self.name_or_path: str | None = None
        self.open_clip_config: dict[str, Any] | None = None  # an open_clip checkpoint's architecture, saved with it
        if config.image.channels_last:
            self.image_encoder.to(memory_format=torch.channels_last)
        for tower, locked in ((self.image_encoder, config.image.locked), (self.text_encoder, config.text.locked)):
            if locked:
                tower.requires_grad_(False)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        # locked towers stay in eval mode so their dropout and batch-norm statistics never change
        if self.config.image.locked:
            self.image_encoder.eval()
        if self.config.text.locked:
            self.text_encoder.eval()
        return self

    def scale(self) -> torch.Tensor:
        """The multiplier on cosine similarities: exp(logit_scale), clamped at exp(logit_scale_max)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features before the head, (B, 3, H, W) -> (B, F); cached when the tower is locked."""
        if self.config.image.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.image_encoder(pixel_values)

    def encode_image(self, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised image embeddings (B, D), from pixels or from precomputed tower features."""
        if image_features is None:
            image_features = self.image_features(pixel_values)
        return F.normalize(self.image_projection(image_features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, D) from token ids (B, L) and their attention mask (B, L)."""
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> CLIPOutput:
        image_embeds = self.encode_image(pixel_values, image_features)  # (B, D)
        text_embeds = self.encode_text(input_ids, attention_mask)  # (B, D)
        scale = self.scale()
        logits_per_image = scale * image_embeds @ text_embeds.t()  # (B, B)
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return CLIPOutput(image_embeds, text_embeds, scale, logits_per_image, logits_per_image.t(), self.logit_bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay besides biases and norms."""
        return {"logit_scale", "logit_bias"}


def build_model(config: ModelConfig) -> CLIP:
    """Builds the CLIP model and its tokenizer from the model section of a config (CLIP.from_config)."""
    return CLIP.from_config(config)
