"""The symmetric contrastive loss, written from the CLIP paper's pseudocode (Radford et al. 2021, Figure 3):

    logits = np.dot(I_e, T_e.T) * np.exp(t)
    labels = np.arange(n)
    loss_i = cross_entropy_loss(logits, labels, axis=0)
    loss_t = cross_entropy_loss(logits, labels, axis=1)
    loss   = (loss_i + loss_t) / 2

Across processes the embeddings are gathered first (liteclip.distributed.all_gather_with_grad) and this same
function runs on the global logits, so N processes of batch B optimise exactly the loss of one batch of N*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over an image-text similarity matrix.

    Args:
        logits_per_image: (N, N) scaled similarities; row i is image i against every caption, and caption i is the
            one that belongs to image i.

    Returns:
        Scalar: the mean of the image->text and text->image cross-entropies.
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)  # the diagonal matches
    loss_image_to_text = F.cross_entropy(logits_per_image, labels)  # each image picks its caption among N
    loss_text_to_image = F.cross_entropy(logits_per_image.t(), labels)  # each caption picks its image among N
    return (loss_image_to_text + loss_text_to_image) / 2
