"""Distillation from a frozen CLIP teacher (`distill.teacher`), with the teacher's outputs cached once.

The teacher (a liteclip model directory or a Hugging Face CLIP checkpoint) embeds every training image and every
caption once; the embeddings are kept in `data.root/.liteclip_cache/` as safetensors, keyed by the teacher's weights,
its preprocessing and the exact files and captions, as the locked-tower features are (MobileCLIP's reinforced
datasets cache teacher outputs the same way). A step then costs no teacher forward: each sample carries its
teacher embeddings, and the loss adds

    weight * (KL(teacher || student) over each image's row + KL over each caption's column) / 2

of the in-batch similarity distributions at `distill.temperature` to the contrastive loss. The teacher sees each
image through its evaluation transform, not the student's augmentation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from liteclip.files import atomic_write_bytes, digest_tensors
from liteclip.data.captions import CaptionedImage, caption_offsets
from liteclip.embedding import encode_image_files, encode_texts
from liteclip.model import CLIP
from liteclip.precision import Precision

logger = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmax over each row (image -> captions) and each column (caption ->
    images) of the (N, N) logit matrices, averaged over rows, then over the two directions."""
    student, teacher = student_logits / temperature, teacher_logits / temperature
    image_to_text = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                             reduction="batchmean")
    text_to_image = F.kl_div(F.log_softmax(student.t(), dim=1), F.log_softmax(teacher.t(), dim=1), log_target=True,
                             reduction="batchmean")
    return (image_to_text + text_to_image) / 2


@dataclass(frozen=True)
class DistillTerm:
    """The distillation term of a step: its weight, temperature and the teacher's logit scale."""

    weight: float
    temperature: float
    teacher_scale: float

    def __call__(self, student_logits: torch.Tensor, teacher_image_embeds: torch.Tensor,
                 teacher_text_embeds: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher_scale * teacher_image_embeds @ teacher_text_embeds.t()  # (N, N)
        return self.weight * distillation_loss(student_logits, teacher_logits, self.temperature)


@dataclass
class TeacherEmbeddings:
    image_embeds: torch.Tensor  # (N_images, D_teacher), normalised, in the split's image order
    text_embeds: torch.Tensor  # (N_captions, D_teacher), every caption of every image, in that order
    caption_offsets: list[int]  # image i's captions start at row caption_offsets[i] of text_embeds
    scale: float  # the teacher's logit scale


def teacher_cache_key(teacher: CLIP, images: list[CaptionedImage]) -> str:
    """The teacher's weights and preprocessing, and every file (path, size, mtime) and caption."""
    digest = hashlib.sha256(json.dumps(teacher.data_config, sort_keys=True, default=str).encode())
    digest_tensors(digest, teacher.state_dict())
    for image in images:
        stat = image.image_path.stat()
        digest.update(json.dumps([str(image.image_path), stat.st_size, stat.st_mtime_ns, image.captions]).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def teacher_embeddings(teacher_name: str, images: list[CaptionedImage], cache_dir: Path, device: torch.device,
                       precision: Precision, num_workers: int = 0,
                       trust_remote_code: bool = False) -> TeacherEmbeddings:
    """The teacher's embeddings of a split, computed once and then read from cache_dir (a teacher folder that
    carries code of its own loads only with trust_remote_code: distill.trust_remote_code)."""
    teacher = CLIP.from_pretrained(teacher_name, device=device, trust_remote_code=trust_remote_code)
    offsets = caption_offsets(images)
    path = cache_dir / f"teacher_{teacher_cache_key(teacher, images)}.safetensors"
    if path.is_file():
        logger.info("teacher embeddings from cache %s", path)
        tensors = load_file(str(path))
    else:
        tensors = {
            "image_embeds": encode_image_files(teacher, [image.image_path for image in images], 64, device,
                                               precision.autocast, show_progress=True, num_workers=num_workers),
            "text_embeds": encode_texts(teacher, [c for image in images for c in image.captions], 256, device,
                                        precision.autocast),
            "scale": teacher.scale().detach().float().reshape(1),
        }
        tensors = {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}
        atomic_write_bytes(path, save(tensors))
        logger.info("cached teacher embeddings of %d images in %s", len(images), path)
    return TeacherEmbeddings(tensors["image_embeds"], tensors["text_embeds"], offsets, float(tensors["scale"]))


class WithTeacherEmbeddings(torch.utils.data.Dataset):
    """A training dataset whose samples also carry the teacher's embeddings of their image and caption."""

    def __init__(self, dataset: Any, teacher: TeacherEmbeddings):
        self.dataset = dataset
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        sample = self.dataset[key]
        image_index = sample["image_index"]
        sample["teacher_image_embeds"] = self.teacher.image_embeds[image_index]
        sample["teacher_text_embeds"] = self.teacher.text_embeds[self.teacher.caption_offsets[image_index]
                                                                 + sample["caption_index"]]
        return sample

    @property
    def images(self) -> list[CaptionedImage]:
        return self.dataset.images
