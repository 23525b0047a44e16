"""The built-in demo dataset: procedurally drawn coloured shapes with paraphrased captions, fully offline.

Deterministic from a seed. Written in the Kaggle Flickr8K layout (Images/ + captions.txt, plus the split files of the
original layout), so the demo runs exactly the code path real data takes. Some colour-shape combinations never
appear in training or validation images; they are listed in held_out.json so zero-shot generalisation to unseen
combinations can be measured on the test split.

Because the demo must run with no network, it also writes a small text tower of its own (`text_encoder/`: a BERT
config and a WordPiece tokenizer trained on the demo captions); configs/demo.yaml points the text tower there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from liteclip.files import ordinary_mode
from liteclip.data.captions import LabelledImage, ZeroShotTask
from liteclip.data.flickr8k import SPLIT_FILES

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (140, 50, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
# never drawn in train/val images; every shape and every colour still appears in training in other combinations
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "star"),
                                         ("green", "square"))
SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where}", "a {color} {shape} {where}", "a {color} {shape}",
    "a picture of a {size} {color} {shape}", "one {color} {shape} {where} on a plain background",
)
PAIR_TEMPLATES = (
    "two shapes: a {color1} {shape1} {relation} a {color2} {shape2}", "a {color1} {shape1} and a {color2} {shape2}",
    "a {color1} {shape1} {relation} a {color2} {shape2}", "a picture of a {color2} {shape2} and a {color1} {shape1}",
)
MARKER = "demo.json"  # written last: its presence means the dataset is complete


@dataclass(frozen=True)
class DrawnObject:
    color: str
    shape: str
    size: str  # "small" | "large"
    center: tuple[int, int]
    radius: int


def seen_combinations() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]


def all_combinations() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def class_prompt(color: str, shape: str) -> str:
    """The label text zero-shot evaluation uses for one colour-shape class."""
    return with_articles(f"a {color} {shape}")


def with_articles(text: str) -> str:
    """'a orange' -> 'an orange'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def zero_shot_items(root: str | Path, split: str = "test") -> list[LabelledImage]:
    """The single-object images of a split, labelled with their colour-shape class (an index into
    all_combinations()) and grouped into "seen" and "held_out" combinations."""
    root = Path(root)
    annotations = json.loads((root / "annotations.json").read_text())
    classes = all_combinations()
    items = []
    for name in (root / SPLIT_FILES[split]).read_text().split():
        objects = annotations[name]
        if len(objects) == 1:
            combo = (objects[0][0], objects[0][1])
            group = "held_out" if combo in HELD_OUT else "seen"
            items.append(LabelledImage(root / "Images" / name, classes.index(combo), group))
    return items


def zero_shot_task(root: str | Path, split: str = "test") -> ZeroShotTask:
    """Zero-shot classification of a split's single-object images among all 24 colour-shape labels."""
    labels = [class_prompt(color, shape) for color, shape in all_combinations()]
    return ZeroShotTask(labels, zero_shot_items(root, split))


def ensure_demo_data(root: str | Path, num_images: int = 3000, image_size: int = 96, seed: int = 0) -> Path:
    """Generates the demo dataset into `root` unless an identical one is already there.

    Writes into a temporary sibling folder and swaps it in, so an interrupted generation leaves nothing half-made.
    Regenerating with other settings replaces only the files the generator wrote (listed in demo.json): anything
    else under `root` (a feature cache, a user's notes) moves over to the new dataset.
    """
    root = Path(root)
    settings = {"num_images": num_images, "image_size": image_size, "seed": seed, "version": 1}
    marker = root / MARKER
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded is not None and {key: recorded.get(key) for key in settings} == settings:
        return root
    if root.exists() and any(root.iterdir()) and recorded is None:
        raise FileExistsError(f"{root} exists and is not a liteclip demo dataset; choose another data.root")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    previous = root.with_name(f".{root.name}.previous")
    try:
        _generate(staging, num_images, image_size, seed)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        staging.chmod(ordinary_mode(directory=True))  # mkdtemp made the folder private
        (staging / MARKER).write_text(json.dumps({**settings, "files": files}))
        if root.exists():
            owned = set(recorded.get("files", ())) if "files" in recorded else None
            _move_foreign_files(root, staging, owned)
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(root, previous)
        os.replace(staging, root)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("generated %d demo images in %s", num_images, root)
    return root


def _move_foreign_files(root: Path, staging: Path, owned: set[str] | None) -> None:
    """Moves every file under `root` that the generator did not write into `staging`, at the same place."""
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        generated = name in owned if owned is not None else _legacy_generated(name)
        if not path.is_file() or generated or name == MARKER:
            continue
        target = staging / name
        if target.exists():
            logger.warning("%s has the name of a new demo file; it is replaced", path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _legacy_generated(name: str) -> bool:
    """Demo data written before demo.json listed its files: what the generator names."""
    top = name.split("/")[0]
    return (name.startswith("Images/shape_") or top in ("text_encoder", "captions.txt", "annotations.json",
                                                         "held_out.json") or name in SPLIT_FILES.values())


def _generate(root: Path, num_images: int, image_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "Images").mkdir(parents=True)
    num_test = max(1, num_images // 10)
    num_val = max(1, num_images // 10)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rows: list[tuple[str, str]] = []
    annotations: dict[str, list[list[str]]] = {}
    for index in range(num_images):
        split = "test" if index < num_test else "val" if index < num_test + num_val else "train"
        # test images draw from every combination, so held-out ones are measured; train/val never see them
        combos = all_combinations() if split == "test" else seen_combinations()
        num_objects = 1 if split == "test" or rng.random() < 0.7 else 2
        objects = _place_objects(rng, combos, num_objects, image_size)
        name = f"shape_{index:05d}.png"
        _draw(rng, objects, image_size).save(root / "Images" / name, format="PNG", optimize=False)
        splits[split].append(name)
        annotations[name] = [[obj.color, obj.shape] for obj in objects]
        rows.extend((name, caption) for caption in _captions(rng, objects, image_size))
    with open(root / "captions.txt", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    for split, file_name in SPLIT_FILES.items():
        (root / file_name).write_text("\n".join(splits[split]) + "\n")
    (root / "annotations.json").write_text(json.dumps(annotations))
    (root / "held_out.json").write_text(json.dumps(
        {"held_out": [list(c) for c in HELD_OUT], "seen": [list(c) for c in seen_combinations()]}, indent=1))
    write_text_tower(root / "text_encoder", [caption for _, caption in rows] +
                     [class_prompt(c, s) for c, s in all_combinations()])


def _place_objects(rng: np.random.Generator, combos: list[tuple[str, str]], num_objects: int,
                   image_size: int) -> list[DrawnObject]:
    chosen = [combos[i] for i in rng.choice(len(combos), size=num_objects, replace=False)]
    objects = []
    if num_objects == 1:
        size = "small" if rng.random() < 0.5 else "large"
        radius = int(image_size * (rng.uniform(0.14, 0.19) if size == "small" else rng.uniform(0.23, 0.30)))
        column = rng.integers(0, 3)  # left / middle / right third
        x = int((column + 0.5) * image_size / 3 + rng.uniform(-0.05, 0.05) * image_size)
        x = int(np.clip(x, radius + 1, image_size - radius - 1))
        y = int(rng.uniform(radius + 1, image_size - radius - 1))
        objects.append(DrawnObject(*chosen[0], size, (x, y), radius))
    else:
        vertical = rng.random() < 0.5  # first above second, or first left of second
        for slot, (color, shape) in enumerate(chosen):
            radius = int(image_size * rng.uniform(0.14, 0.2))
            along = int((0.27 + 0.46 * slot) * image_size)
            across = int(rng.uniform(0.3, 0.7) * image_size)
            center = (across, along) if vertical else (along, across)
            size = "small" if radius < image_size * 0.17 else "large"
            objects.append(DrawnObject(color, shape, size, center, radius))
    return objects


def _draw(rng: np.random.Generator, objects: list[DrawnObject], image_size: int) -> Image.Image:
    gray = int(rng.integers(90, 230))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[obj.color])
        x, y, r = obj.center[0], obj.center[1], obj.radius
        if obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        elif obj.shape == "square":
            side = int(r * 0.85)
            draw.rectangle([x - side, y - side, x + side, y + side], fill=color)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + int(0.8 * r)), (x + r, y + int(0.8 * r))], fill=color)
        else:  # five-pointed star
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            draw.polygon([(x + rr * np.cos(a), y - rr * np.sin(a)) for a, rr in zip(angles, radii)], fill=color)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, size=(image_size, image_size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _captions(rng: np.random.Generator, objects: list[DrawnObject], image_size: int) -> list[str]:
    if len(objects) == 1:
        obj = objects[0]
        third = obj.center[0] * 3 // image_size
        where = ("on the left", "in the middle", "on the right")[min(third, 2)]
        texts = [t.format(size=obj.size, color=obj.color, shape=obj.shape, where=where) for t in SINGLE_TEMPLATES]
    else:
        first, second = objects
        vertical = first.center[0] == second.center[0] or abs(first.center[1] - second.center[1]) > abs(
            first.center[0] - second.center[0])
        relation = "above" if vertical else "to the left of"
        texts = [t.format(color1=first.color, shape1=first.shape, color2=second.color, shape2=second.shape,
                          relation=relation) for t in PAIR_TEMPLATES]
        texts.append(f"a {second.color} {second.shape} {'below' if vertical else 'to the right of'} "
                     f"a {first.color} {first.shape}")
    order = rng.permutation(len(texts))
    return [with_articles(texts[i]) for i in order]


def write_text_tower(directory: str | Path, sentences: list[str], hidden_size: int = 128, num_layers: int = 2,
                     num_heads: int = 2, vocab_size: int = 300, max_positions: int = 64) -> Path:
    """Writes a small BERT config and a WordPiece tokenizer for `sentences`, in the Hugging Face layout.

    The vocabulary is built directly (special tokens, single characters and their ## forms, then the most frequent
    words, ties alphabetical) rather than by the tokenizers trainer, whose tie-breaking varies between runs: the same
    sentences must give the same token ids, or the same seed would not give the same model. The result loads with
    AutoTokenizer / AutoConfig from a local path, like a downloaded hub model would.
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, PreTrainedTokenizerFast

    directory = Path(directory)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for sentence in sentences
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = sorted({character for word in counts for character in word})
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    tokens = list(dict.fromkeys(special + characters + [f"##{c}" for c in characters] + words))
    vocab = {token: index for index, token in enumerate(tokens[:max(vocab_size, len(special) + 2 * len(characters))])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_positions)
    fast.save_pretrained(str(directory))
    BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
               num_attention_heads=num_heads, intermediate_size=hidden_size * 4,
               max_position_embeddings=max_positions).save_pretrained(directory)
    return directory
