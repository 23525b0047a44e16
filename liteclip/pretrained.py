"""Building a CLIP from a config, saving it as a self-contained directory and loading it back.

    model = CLIP.from_config(config.model)         # towers (pretrained or not), heads, tokenizer
    model.save_pretrained("model")                 # config.yaml, model.safetensors, preprocessor_config.json,
                                                   # text_config/, [vision_config/,] tokenizer/
    model = CLIP.from_pretrained("model")          # or a Hugging Face CLIP checkpoint: a directory or a hub name

As Hugging Face's PreTrainedModel does, these come to the model class from a mixin that sits below it, so model.py
holds only nn.Module code and imports flow one way: model -> pretrained -> checkpoint (file I/O) and convert
(foreign weights). The mixin builds through `cls(config, tokenizer=..., text_hf_config=..., image_hf_config=...)`
and never imports the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from liteclip.files import check_replaceable, load_weights, read_safetensors, write_directory
from liteclip.config import Config, ConfigError, ModelConfig, config_from_dict, read_yaml
from liteclip.weights import openclip
from liteclip.weights.huggingface import ConvertedCLIP, FixedLengthTokenizer, is_hf_clip, read_hf_checkpoint
from liteclip.errors import ModelLoadError, NonFiniteError
from liteclip.weights.lora import add_lora, merged_copy

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
TEXT_CONFIG_DIR = "text_config"
VISION_CONFIG_DIR = "vision_config"  # only for Hugging Face image towers; timm towers rebuild from their name
TOKENIZER_DIR = "tokenizer"
OWNED_NAMES = {CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME, TEXT_CONFIG_DIR, TOKENIZER_DIR, VISION_CONFIG_DIR,
               openclip.CONFIG_FILE}
CARD_NAME = "README.md"
# the files any Hugging Face tokenizer is read from: one of them must be in a local text tower's folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
CARD_MARKER = "<!-- written by liteclip's save_pretrained -->"


class PretrainedMixin:
    """from_config / from_pretrained / save_pretrained for liteclip's CLIP (see the module docstring)."""

    @classmethod
    def from_config(cls, config: ModelConfig):
        """Builds the model and its tokenizer from the model section of a config (`init_from`: a HF CLIP)."""
        from transformers import AutoTokenizer

        if openclip.is_open_clip(config.init_from):
            return from_converted(cls, openclip.read_open_clip(config.init_from, base=config))
        if config.init_from and is_model_dir(config.init_from):  # a liteclip model, trained further
            return from_converted(cls, read_model_dir_as_start(cls, config.init_from, base=config))
        if config.init_from:
            return from_converted(cls, read_hf_checkpoint(config.init_from, base=config))
        model = cls(config)  # the towers first: their errors name a wrong model name most clearly
        text_dir = Path(config.text.name)
        if text_dir.is_dir() and not any((text_dir / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build a tokenizer of special tokens alone from the config and read every word as
            # [UNK], without an error
            raise ConfigError(f"model.text.name={text_dir}: the folder holds a text tower but no tokenizer (none of "
                              f"{', '.join(TOKENIZER_FILES)}); put the tokenizer files that came with the model "
                              f"there")
        try:
            model.tokenizer = padded_as_configured(AutoTokenizer.from_pretrained(
                config.text.name, trust_remote_code=config.text.trust_remote_code), config)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.text.name={config.text.name}: the text tower loaded, but no tokenizer could be "
                              f"read from it ({str(error).splitlines()[0][:200]}); put the tokenizer files that came "
                              f"with the model (tokenizer.json or vocab.txt, tokenizer_config.json) in that folder"
                              ) from None
        num_params = sum(p.numel() for p in model.parameters())
        num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("built CLIP %s + %s: %.2fM parameters, %.2fM trainable", config.image.name, config.text.name,
                    num_params / 1e6, num_trainable / 1e6)
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False):
        """Loads a directory written by save_pretrained (offline, no pickle), or a Hugging Face CLIP checkpoint
        (a directory in the transformers layout, or a hub name such as openai/clip-vit-base-patch32), onto
        `device`, in `dtype` if given (torch.bfloat16, torch.float16), in eval mode.

        A folder whose towers or tokenizer come with their own Python code (an `auto_map` in their config) is
        refused unless `trust_remote_code=True` is passed here: what the folder's own files say never decides it.
        """
        if openclip.is_open_clip(str(name_or_dir)):  # "open_clip:ARCH@TAG_OR_FILE"
            converted = openclip.read_open_clip(str(name_or_dir))
            return from_converted(cls, converted).to(device=device, dtype=dtype).eval()
        if not (Path(name_or_dir) / CONFIG_NAME).is_file() and is_hf_clip(name_or_dir):
            try:
                converted = read_hf_checkpoint(str(name_or_dir))
            except OSError as error:
                raise ModelLoadError(
                    f"no liteclip model directory at {name_or_dir}, and no Hugging Face CLIP checkpoint of that "
                    f"name could be loaded ({str(error).splitlines()[0]}). Train one with `python train.py "
                    f"--config configs/demo.yaml`, or check the name and the network.") from None
            return from_converted(cls, converted).to(device=device, dtype=dtype).eval()
        return load_model_dir(cls, name_or_dir, trust_remote_code).to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path, full_config: Config | None = None,
                        metrics: dict[str, float] | None = None) -> Path:
        """Writes config.yaml, model.safetensors, text_config/, tokenizer/ and a model card (README.md, with
        `metrics` filled in) into `directory`, atomically; the directory is a valid Hugging Face Hub repository."""
        return save_model_dir(self, directory, full_config, metrics)


def padded_as_configured(tokenizer: Any, config: ModelConfig) -> Any:
    """The tokenizer, padding every caption to model.text.max_length where the config says so (SigLIP)."""
    return FixedLengthTokenizer(tokenizer, config.text.max_length) if config.text.padding == "max_length" else tokenizer


def from_converted(cls: type, converted: ConvertedCLIP):
    """A model of class `cls` holding the weights of a converted checkpoint (LoRA adapters, if the config asks for
    them, go onto the towers once the checkpoint's weights are in, under their own names)."""
    config = converted.config
    lora_free = {side: dataclasses.replace(tower, tune="full") if tower.tune == "lora" else tower
                 for side, tower in (("image", config.image), ("text", config.text))}
    model = cls(dataclasses.replace(config, **lora_free), tokenizer=converted.tokenizer,
                text_hf_config=converted.text_hf_config, image_hf_config=converted.vision_hf_config,
                open_clip_model=converted.open_clip_model)
    if converted.state_dict is not None:  # an open_clip model arrives with its weights in its towers
        load_weights(model, converted.state_dict, str(config.image.name))
    for side, encoder in (("image", model.image_encoder), ("text", model.text_encoder)):
        tower = getattr(config, side)
        if tower.tune == "lora":
            encoder.model = add_lora(encoder.model, tower.lora, f"model.{side}", is_hf=tower.source == "hf")
        encoder.config = tower
    model.config = config
    model.data_config = converted.data_config or model.data_config
    model.open_clip_config = converted.open_clip_config
    model.name_or_path = str(converted.config.image.name)
    return model


def save_model_dir(model: Any, directory: str | Path, full_config: Config | None = None,
                   metrics: dict[str, float] | None = None) -> Path:
    """Writes a self-contained model directory (checkpoint.write_directory: the files of an earlier save are
    replaced, anything else in the folder is left alone, and a file of the same name liteclip did not write is
    refused). A README.md that liteclip did not write is kept instead of the model card."""
    from safetensors.torch import save_file

    if "lora" in (model.config.image.tune, model.config.text.tune):
        model = merged_copy(model)  # a plain model, loadable without peft
    existing_card = Path(directory) / CARD_NAME
    write_card = not existing_card.is_file() or CARD_MARKER in existing_card.read_text(errors="replace")

    def write_contents(staging: Path) -> None:
        if write_card:
            (staging / CARD_NAME).write_text(model_card(model.config, full_config, metrics))
        config_dict = full_config.to_dict() if full_config is not None else Config(model=model.config).to_dict()
        config_dict["model"] = Config(model=model.config).to_dict()["model"]
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(model.data_config, indent=2))
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        refuse_non_finite(state, "the model to save", "nothing was written; save a checkpoint from before the "
                                                      "divergence")
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "library": "liteclip"})
        if model.config.text.source == "open_clip":
            openclip.write_saved_config(model, staging)
        else:
            model.text_encoder.model.config.save_pretrained(staging / TEXT_CONFIG_DIR)
        if model.config.image.source == "hf":
            model.image_encoder.model.config.save_pretrained(staging / VISION_CONFIG_DIR)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))

    write_directory(directory, write_contents, "the model folder",
                    OWNED_NAMES | ({CARD_NAME} if write_card else set()), owns=written_by_older_liteclip)
    logger.info("saved model to %s", directory)
    return Path(directory)


def refuse_non_finite(weights: dict[str, torch.Tensor], where: str, advice: str) -> None:
    """Raises NonFiniteError if any floating-point tensor holds NaN or infinity (a diverged model)."""
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]}); {advice}")


def check_model_folder(directory: str | Path) -> None:
    """Raises InputError, before any work, if saving a model into `directory` would be refused (save_model_dir)."""
    check_replaceable(Path(directory), OWNED_NAMES, "the model folder", owns=written_by_older_liteclip)


def written_by_older_liteclip(directory: Path, name: str) -> bool:
    """Whether `name` in `directory` is a file of a model folder an older liteclip saved, before folders carried a
    manifest of what liteclip wrote: its card (marked), or one of its own files in a folder whose weights say
    liteclip saved them and whose config.yaml describes a liteclip model. (Only asked where there is no manifest.)"""
    if name == CARD_NAME:
        return CARD_MARKER in (directory / name).read_text(errors="replace")
    if name not in OWNED_NAMES or not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        return False
    try:
        _, metadata = read_safetensors(directory / WEIGHTS_NAME, "weights", names=())
        read_model_config(directory)
    except (ModelLoadError, OSError):
        return False
    return metadata.get("library") == "liteclip"


def model_card(model_config: ModelConfig, full_config: Config | None = None,
               metrics: dict[str, float] | None = None) -> str:
    """A Hugging Face model card: front matter the Hub reads (library, tags, pipeline, license, datasets, metrics),
    then the recipe and the results."""
    data = full_config.data if full_config is not None else None
    front = {"library_name": "liteclip", "pipeline_tag": "zero-shot-image-classification",
             "tags": ["clip", "liteclip", "zero-shot-image-classification", "image-text-retrieval"],
             "license": "other",  # the weights inherit the terms of the data and of any pretrained tower
             "base_model": [name for name, pretrained in ((model_config.image.name, model_config.image.pretrained),
                                                          (model_config.text.name, model_config.text.pretrained))
                            if pretrained and "/" in name] or None,
             "datasets": [data.dataset] if data is not None and data.dataset != "demo" else None,
             "metrics": sorted(metrics) if metrics else None}
    front = {key: value for key, value in front.items() if value is not None}
    image_kwargs = "".join(f", {key}={value}" for key, value in model_config.image.model_kwargs.items())
    recipe = [("image tower", f"{model_config.image.name} ({model_config.image.source}{image_kwargs}"
                              f"{', pretrained' if model_config.image.pretrained else ''}"
                              f"{', locked' if model_config.image.locked else ''})"),
              ("text tower", f"{model_config.text.name} ({model_config.text.pooling} pooling)"),
              ("projection", f"{model_config.projection.kind}, {model_config.projection.dim} dimensions"),
              ("loss", "symmetric contrastive loss (CLIP, Radford et al. 2021), learned temperature")]
    if full_config is not None:
        recipe += [("data", f"{data.dataset} ({data.root})"),
                   ("training", f"{full_config.train.epochs} epochs, batch {data.batch_size}, {full_config.optim.name} "
                                f"lr {full_config.optim.lr:g}, precision {full_config.train.precision}")]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", CARD_MARKER, "",
             f"# liteclip CLIP: {model_config.image.name} + {model_config.text.name}", "",
             "A CLIP model (image and text towers trained so matching image-caption pairs have high cosine "
             "similarity) trained with [liteclip](https://pypi.org/project/liteclip/).", "",
             "| | |", "| --- | --- |", *[f"| {key} | {value} |" for key, value in recipe], ""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "| --- | --- |",
                  *[f"| {key} | {value:.4g} |" for key, value in metrics.items()], ""]
    lines += ["## Use", "", "```python", "from liteclip import ZeroShotPipeline", "",
              'pipeline = ZeroShotPipeline("path/to/this/folder")',
              'pipeline.predict("photo.jpg", ["a photo of a dog", "a photo of a cat"])', "```", "",
              "License: set the `license` field to what the training data and any pretrained tower allow.", ""]
    return "\n".join(lines)


def read_model_config(directory: str | Path) -> Config:
    """The resolved config stored in a model directory (the data section says what it was trained on)."""
    path = Path(directory) / CONFIG_NAME
    raw = read_yaml(path, ModelLoadError)
    if raw is not None and not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: the top level must be a mapping of sections (model, data, ...), got {raw!r}")
    try:
        return config_from_dict(raw or {}, str(path))
    except ConfigError as error:
        raise ModelLoadError(f"{path} does not describe a liteclip model this version can build: {error}") from None


def remote_code_in(directory: str | Path) -> list[str]:
    """What in a model directory would make transformers import Python code shipped with it: every `auto_map`
    entry of the towers' and the tokenizer's configs, as "file: Auto class -> module.Class"."""
    directory = Path(directory)
    found = []
    # an open_clip model's Hugging Face text tower may live in a folder its open_clip_config.json names
    folders = [directory / sub for sub in (TEXT_CONFIG_DIR, VISION_CONFIG_DIR, TOKENIZER_DIR)]
    folders += [Path(name) for name in openclip.hf_folders_named(directory)]
    for folder in folders:
        sub = folder.name if folder.parent == directory else str(folder)
        for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
            path = folder / name
            if not path.is_file():
                continue
            try:
                auto_map = json.loads(path.read_text()).get("auto_map")
            except (ValueError, AttributeError):
                continue  # not a JSON object: transformers' own loading names the file
            if isinstance(auto_map, dict):
                found += [f"{sub}/{name}: {key} -> {value}" for key, value in auto_map.items()]
            elif auto_map:
                found.append(f"{sub}/{name}: auto_map {auto_map}")
    return found


def refuse_remote_code(directory: str | Path, trust_remote_code: bool) -> None:
    """Raises ModelLoadError when the directory carries code of its own and the caller did not allow it."""
    found = remote_code_in(directory)
    if found and not trust_remote_code:
        raise ModelLoadError(
            f"{directory} asks to run Python code that it carries ({'; '.join(found)}), and liteclip never runs a "
            f"model folder's code on the folder's own say-so. If you trust where it came from, allow it: "
            f"CLIP.from_pretrained(..., trust_remote_code=True), ZeroShotPipeline(..., trust_remote_code=True), "
            f"`--trust-remote-code` on the command line, or distill.trust_remote_code: true for a teacher.")


def is_model_dir(path: str | Path) -> bool:
    """A folder written by save_pretrained (its config.yaml and model.safetensors)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def read_model_dir_as_start(cls: type, directory: str | Path, base: ModelConfig) -> ConvertedCLIP:
    """A saved liteclip model as the start of a run (model.init_from: DIR): its architecture, weights, tokenizer,
    preprocessing and temperature, with `base`'s tune settings (locked, LoRA) and learn_logit_scale on top. The
    rest of `base`'s model section is the folder's, as for any checkpoint init_from names."""
    model = load_model_dir(cls, directory)
    saved = model.config
    ignored = ignored_model_keys(base, saved)
    if ignored:
        logger.warning("model.init_from=%s: the model is the folder's; these model keys of the config differ from "
                       "it and are not used: %s", directory, ", ".join(ignored))
    config = dataclasses.replace(
        saved, learn_logit_scale=base.learn_logit_scale, init_from=str(directory),
        image=dataclasses.replace(saved.image, tune=base.image.tune, lora=base.image.lora),
        text=dataclasses.replace(saved.text, tune=base.text.tune, lora=base.text.lora))
    open_clip_model = None
    if saved.text.source == "open_clip":  # a fresh open_clip model to hold the weights
        open_clip_model, _, _ = openclip.read_saved(Path(directory))
    text_hf_config = model.text_encoder.model.config if saved.text.source == "hf" else None
    vision_hf_config = model.image_encoder.model.config if saved.image.source == "hf" else None
    return ConvertedCLIP(config, text_hf_config, vision_hf_config, model.tokenizer, model.data_config,
                         {name: tensor.detach() for name, tensor in model.state_dict().items()},
                         open_clip_model=open_clip_model, open_clip_config=model.open_clip_config)


# what a config may still choose for a model it starts from a folder: how each tower trains, and the temperature
CHOSEN_FOR_A_START = {"tune", "lora", "learn_logit_scale", "init_from", "pretrained", "weights_file", "name",
                      "trust_remote_code"}


def ignored_model_keys(base: ModelConfig, saved: ModelConfig) -> list[str]:
    """model.* keys whose value in `base` differs from the saved model's (they cannot apply to a saved model)."""
    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if dataclasses.is_dataclass(value):
            return {key: item for field in dataclasses.fields(value) if field.name not in CHOSEN_FOR_A_START
                    for key, item in flat(getattr(value, field.name), f"{prefix}{field.name}.").items()}
        return {prefix.rstrip("."): value}

    ours, theirs = flat(base, "model."), flat(saved, "model.")
    return [key for key in ours if key in theirs and ours[key] != theirs[key] and ours[key] is not None]


def load_model_dir(cls: type, directory: str | Path, trust_remote_code: bool = False):
    """Rebuilds a model of class `cls` from a directory written by save_model_dir, offline and without pickle.
    Code shipped in the directory runs only with trust_remote_code=True (model.text.trust_remote_code as saved in
    its config.yaml is ignored: the caller decides)."""
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ModelLoadError(
            f"no liteclip model in {directory.resolve()} (it needs {CONFIG_NAME} and {WEIGHTS_NAME}). Train one with "
            f"`python train.py --config configs/demo.yaml`, which writes ./model, or put a directory written by "
            f"CLIP.save_pretrained there.")
    config = trained_config = read_model_config(directory).model
    refuse_remote_code(directory, trust_remote_code)
    # the weights come from the directory, so the towers are built empty and never touch the network
    if config.text.source == "open_clip":  # open_clip rebuilds the architecture from open_clip_config.json
        source, tokenizer, saved = openclip.read_saved(directory)
        model = cls(config, tokenizer=tokenizer, open_clip_model=source)
        model.open_clip_config = saved
    else:
        config = dataclasses.replace(
            config,
            image=dataclasses.replace(config.image, pretrained=False, weights_file=None),
            text=dataclasses.replace(config.text, pretrained=False, name=str(directory / TEXT_CONFIG_DIR),
                                     trust_remote_code=trust_remote_code),
        )
        text_hf_config = AutoConfig.from_pretrained(directory / TEXT_CONFIG_DIR, trust_remote_code=trust_remote_code)
        image_hf_config = None
        if config.image.source == "hf":
            image_hf_config = AutoConfig.from_pretrained(directory / VISION_CONFIG_DIR,
                                                         trust_remote_code=trust_remote_code)
        tokenizer = None
        if (directory / TOKENIZER_DIR).is_dir():
            tokenizer = padded_as_configured(AutoTokenizer.from_pretrained(
                str(directory / TOKENIZER_DIR), trust_remote_code=trust_remote_code), config)
        model = cls(config, tokenizer=tokenizer, text_hf_config=text_hf_config, image_hf_config=image_hf_config)
    if (directory / PREPROCESSOR_NAME).is_file():
        try:
            saved = json.loads((directory / PREPROCESSOR_NAME).read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{directory / PREPROCESSOR_NAME} is not JSON ({str(error)[:120]}); copy the model "
                                 f"folder again") from None
        if not isinstance(saved, dict):
            raise ModelLoadError(f"{directory / PREPROCESSOR_NAME} must hold a mapping of preprocessing keys "
                                 f"(input_size, mean, std, ...), not a {type(saved).__name__}; copy the model "
                                 f"folder again")
        model.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        # saved before liteclip recorded its resize: OpenCV's, which the model was trained and evaluated with
        # (liteclip.data.transforms.LEGACY_RESIZER)
        model.data_config.setdefault("resize_with", "opencv")
    weights, _ = read_safetensors(directory / WEIGHTS_NAME, "the model's weights: copy the model directory again, "
                                                           "or export it again from a training checkpoint")
    refuse_non_finite(weights, f"{directory / WEIGHTS_NAME}",
                      "it was saved from a run that diverged; export the model again from an earlier checkpoint")
    load_weights(model, weights, str(directory / WEIGHTS_NAME))
    model.name_or_path = str(directory)  # where it came from (Hugging Face's name): exports refuse to write there
    model.trained_config = trained_config  # the towers' names as trained, before they were pointed at the folder
    return model
