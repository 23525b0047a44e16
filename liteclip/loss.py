"""The contrastive losses over an image-text similarity matrix.

CLIP's symmetric cross-entropy, written from the paper's pseudocode (Radford et al. 2021, Figure 3):

    logits = np.dot(I_e, T_e.T) * np.exp(t)
    labels = np.arange(n)
    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    loss   = (loss_i + loss_t) / 2

SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Algorithm 1),
where every image-text pair is its own binary decision and the logits carry a learned bias:

    logits = dot(zimg, ztxt.T) * t + b
    labels = 2 * eye(n) - ones(n)      # +1 on the diagonal, -1 elsewhere
    loss   = -sum(log_sigmoid(labels * logits)) / n

Both take `exclude`, an (N, N) boolean mask of pairs that are neither positives nor negatives: two captions of one
image in a batch (data.train_captions: all) would otherwise push a caption away from its own image. Excluded pairs
leave the softmax's denominators (CLIP) or the sum (SigLIP); the diagonal is never excluded.

Across processes the embeddings are gathered first (liteclip.distributed.all_gather_with_grad) and the same
function runs on the global logits, so N processes of batch B optimise exactly the loss of one batch of N*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(logits_per_image: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over an image-text similarity matrix.

    Args:
        logits_per_image: (N, N) scaled similarities; row i is image i against every caption, and caption i is the
            one that belongs to image i.
        exclude: (N, N) bool, pairs left out of both softmaxes (see the module docstring); None: none.

    Returns:
        Scalar: the mean of the image->text and text->image cross-entropies.
    """
    if exclude is not None:
        logits_per_image = logits_per_image.masked_fill(exclude, float("-inf"))
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)  # the diagonal matches
    loss_image_to_text = F.cross_entropy(logits_per_image, labels)  # each image picks its caption among N
    loss_text_to_image = F.cross_entropy(logits_per_image.t(), labels)  # each caption picks its image among N
    return (loss_image_to_text + loss_text_to_image) / 2


def siglip_loss(logits_per_image: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise sigmoid loss over an image-text logit matrix (scaled similarities plus the learned bias).

    Args:
        logits_per_image: (N, N) logits; pair (i, i) matches, every other pair does not.
        exclude: (N, N) bool, pairs left out of the sum (see the module docstring); None: none.

    Returns:
        Scalar: the summed negative log-likelihood of every pair's label, divided by N (the paper's normalisation).
    """
    num_pairs = logits_per_image.shape[0]
    labels = 2 * torch.eye(num_pairs, device=logits_per_image.device, dtype=logits_per_image.dtype) - 1  # +1 / -1
    terms = -F.logsigmoid(labels * logits_per_image)  # (N, N)
    if exclude is not None:
        terms = terms.masked_fill(exclude, 0.0)
    return terms.sum() / num_pairs


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}
