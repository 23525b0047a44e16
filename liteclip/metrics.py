"""Retrieval recall and zero-shot accuracy, computed from the embeddings of a whole split (never per batch).

Image -> text: a hit at K if any of the image's captions ranks in the top K.
Text -> image: a hit at K if the caption's own image ranks in the top K.
"""

from __future__ import annotations

import torch


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in both directions, multi-caption aware.

    Args:
        image_embeds: (N_img, D) L2-normalised.
        text_embeds: (N_txt, D) L2-normalised.
        text_to_image: (N_txt,) index of each caption's image.
        ks: the K values.

    Returns:
        {"image_to_text_R@1": ..., "text_to_image_R@1": ..., ..., "mean_recall": mean of all of them}, in percent.
    """
    similarity = image_embeds.float() @ text_embeds.float().t()  # (N_img, N_txt)
    num_images = similarity.shape[0]
    text_to_image = text_to_image.to(similarity.device)
    # rank of the best-ranked correct caption for each image
    owns = text_to_image.unsqueeze(0) == torch.arange(num_images, device=similarity.device).unsqueeze(1)
    best_correct = similarity.masked_fill(~owns, float("-inf")).max(dim=1).values  # (N_img,)
    image_rank = (similarity > best_correct.unsqueeze(1)).sum(dim=1)  # captions strictly better than the best hit
    # rank of each caption's own image
    own_score = similarity[text_to_image, torch.arange(similarity.shape[1], device=similarity.device)]  # (N_txt,)
    text_rank = (similarity > own_score.unsqueeze(0)).sum(dim=0)  # images strictly better than its own
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (image_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = 100.0 * (text_rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def zero_shot_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy (percent) of classifying images by their nearest class embedding.

    Args:
        image_embeds: (N, D) L2-normalised.
        class_embeds: (C, D) L2-normalised, one per class.
        labels: (N,) true class index per image.
    """
    scores = image_embeds.float() @ class_embeds.float().t()  # (N, C)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, K)
    hits = top == labels.to(top.device).unsqueeze(1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
