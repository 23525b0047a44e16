"""Retrieval recall and zero-shot accuracy, computed from the embeddings of a whole split (never per batch).

Image -> text (`image_to_text_R@K`): a hit at K if any of the image's correct captions ranks in the top K; the
field's text retrieval, CLIP_benchmark's `text_retrieval_recall@K`.
Text -> image (`text_to_image_R@K`): a hit at K if any of the caption's correct images ranks in the top K; image
retrieval, CLIP_benchmark's `image_retrieval_recall@K`. Every figure liteclip prints uses these names.

Ties never count in the model's favour: an item's rank is the number of wrong items that score at least as high as
the best correct one (a pessimistic rank), so a model whose embeddings have collapsed to one point ranks every
correct item last and scores 0, not 100. Without ties this is the usual rank, and the figures equal CLIP_benchmark's.

A caption text that several images share (templated captions: "a red circle in the middle") is correct for each of
them, so identical texts never compete with each other: pass each caption's text group (`caption_groups`, equal ids
for equal texts; caption_groups_of makes them). CLIP_benchmark counts every caption as its own item instead, and
with duplicate texts its image -> text figures are lower by that rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

from liteclip.errors import NonFiniteError


def caption_groups_of(captions: Sequence[str]) -> torch.Tensor:
    """(N_txt,) one id per distinct caption text, equal for equal texts."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(caption, len(ids)) for caption in captions], dtype=torch.long)


def require_finite(**embeddings: torch.Tensor) -> None:
    """Raises NonFiniteError if any embedding holds NaN or infinity: a NaN scores neither above nor below anything,
    so every rank would be 0 and a diverged model would score 100."""
    for name, values in embeddings.items():
        bad = int((~torch.isfinite(values)).any(dim=-1).sum()) if values.numel() else 0
        if bad:
            raise NonFiniteError(f"{bad} of {len(values)} {name.replace('_', ' ')} are not finite (NaN or "
                                 f"infinity): the model's weights have diverged, so it cannot be scored. Use a "
                                 f"checkpoint from before the divergence, or lower optim.lr")


def pessimistic_ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """(N,) for each row of (N, M) scores, how many wrong columns score at least as high as its best correct one."""
    best_correct = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values  # (N, 1)
    return ((scores >= best_correct) & ~correct).sum(dim=1)


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10),
                     caption_groups: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@K in both directions, multi-caption aware, ties counted against the model (see the module docstring).

    Args:
        image_embeds: (N_img, D) L2-normalised.
        text_embeds: (N_txt, D) L2-normalised.
        text_to_image: (N_txt,) index of each caption's image.
        ks: the K values.
        caption_groups: (N_txt,) equal ids for equal caption texts (caption_groups_of); a caption is then correct
            for every image that has its text. None: every caption is its own text.

    Returns:
        {"image_to_text_R@1": ..., "text_to_image_R@1": ..., ..., "mean_recall": mean of all of them}, in percent.
    """
    require_finite(image_embeddings=image_embeds, text_embeddings=text_embeds)
    similarity = image_embeds.float() @ text_embeds.float().t()  # (N_img, N_txt)
    num_images, num_texts = similarity.shape
    text_to_image = text_to_image.to(similarity.device)
    groups = (torch.arange(num_texts, device=similarity.device) if caption_groups is None
              else caption_groups.to(similarity.device))
    has_text = torch.zeros(num_images, int(groups.max()) + 1, dtype=torch.bool, device=similarity.device)
    has_text[text_to_image, groups] = True  # (N_img, N_groups): image i has a caption of text g
    correct = has_text[:, groups]  # (N_img, N_txt)
    image_rank = pessimistic_ranks(similarity, correct)  # (N_img,)
    text_rank = pessimistic_ranks(similarity.t(), correct.t())  # (N_txt,)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (image_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = 100.0 * (text_rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def zero_shot_ranks(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) each image's pessimistic rank of its true class: the other classes scoring at least as high."""
    require_finite(image_embeddings=image_embeds, class_embeddings=class_embeds)
    scores = image_embeds.float() @ class_embeds.float().t()  # (N, C)
    labels = labels.to(scores.device)
    correct = torch.zeros_like(scores, dtype=torch.bool)
    correct[torch.arange(len(labels), device=scores.device), labels] = True
    return pessimistic_ranks(scores, correct)


def zero_shot_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy (percent) of classifying images by their nearest class embedding; a tie with a wrong class
    is a miss (zero_shot_ranks), so a constant model scores 0 rather than chance or better.

    Args:
        image_embeds: (N, D) L2-normalised.
        class_embeds: (C, D) L2-normalised, one per class.
        labels: (N,) true class index per image.
    """
    ranks = zero_shot_ranks(image_embeds, class_embeds, labels)
    return {f"top{k}": 100.0 * (ranks < k).float().mean().item() for k in ks}
