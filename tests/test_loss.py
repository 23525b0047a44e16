import logging
import math

import pytest
import torch
import torch.nn.functional as F

from liteclip import clip_loss


def naive_clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Independent reference: explicit log-softmax over rows (image->text) and over columns (text->image)."""
    n = logits.shape[0]
    log_probs_rows = logits - logits.logsumexp(dim=1, keepdim=True)
    log_probs_cols = logits - logits.logsumexp(dim=0, keepdim=True)
    image_to_text = -sum(log_probs_rows[i, i] for i in range(n)) / n
    text_to_image = -sum(log_probs_cols[i, i] for i in range(n)) / n
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_naive_reference(n):
    torch.manual_seed(n)
    logits = torch.randn(n, n, dtype=torch.float64) * 5  # not symmetric: a dropped direction would show
    torch.testing.assert_close(clip_loss(logits), naive_clip_loss(logits), atol=1e-6, rtol=0)


def test_matches_transformers_clip_loss():
    from transformers.models.clip import modeling_clip  # a core dependency: never a reason to skip
    hf_loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    torch.manual_seed(0)
    for n in (2, 5, 16):
        logits = torch.randn(n, n, dtype=torch.float64) * 3
        # transformers takes the text-major similarity; the loss is symmetric in the two directions
        torch.testing.assert_close(clip_loss(logits), hf_loss(logits.t()), atol=1e-6, rtol=0)


def test_each_direction_counts():
    logits = torch.zeros(3, 3)
    logits[0, 1] = logits[0, 2] = 10.0  # one row hurt, two columns hurt: the directions disagree
    row_only = F.cross_entropy(logits, torch.arange(3))
    col_only = F.cross_entropy(logits.t(), torch.arange(3))
    assert abs(row_only - col_only) > 1.0
    torch.testing.assert_close(clip_loss(logits), (row_only + col_only) / 2)


def test_shifted_labels_would_differ():
    torch.manual_seed(1)
    logits = torch.randn(6, 6) + 8 * torch.eye(6)
    shifted = F.cross_entropy(logits, torch.arange(6).roll(1))
    assert clip_loss(logits) < 0.1 * shifted


def test_aligned_embeddings_with_large_scale_give_near_zero_loss():
    embeds = F.normalize(torch.randn(16, 32, dtype=torch.float64), dim=-1)
    # random 32-d unit vectors have off-diagonal cosine well below 1; a scale of 100 makes the diagonal dominate
    embeds = F.normalize(torch.eye(16, 32, dtype=torch.float64) + 0.01 * embeds, dim=-1)
    assert clip_loss(100.0 * embeds @ embeds.t()) < 1e-3
    assert clip_loss(1.0 * embeds @ embeds.t()) > 1.0  # ignoring the scale would leave the loss high


def test_independent_random_embeddings_give_about_log_n():
    torch.manual_seed(0)
    n = 256
    image_embeds = F.normalize(torch.randn(n, 512), dim=-1)
    text_embeds = F.normalize(torch.randn(n, 512), dim=-1)
    loss = clip_loss(image_embeds @ text_embeds.t())  # scale 1: logits near 0
    assert abs(loss.item() - math.log(n)) < 0.05


# ------------------------------------------------------------------------------------------------------ SigLIP


def naive_siglip_loss(image_embeds, text_embeds, scale, bias):
    """Independent reference written out pair by pair: -log sigmoid(z * (t * <x_i, y_j> + b)), z = +1 only when
    i == j, summed over all pairs and divided by the batch size."""
    n = image_embeds.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image_embeds[i], text_embeds[j]) + bias
            total = total - math.log(1.0 / (1.0 + math.exp(-z * float(logit))))
    return total / n


@pytest.mark.parametrize("n", [1, 4, 9])
def test_siglip_matches_a_naive_pairwise_reference(n):
    from liteclip.loss import siglip_loss

    torch.manual_seed(n)
    image_embeds = F.normalize(torch.randn(n, 16, dtype=torch.float64), dim=-1)
    text_embeds = F.normalize(torch.randn(n, 16, dtype=torch.float64), dim=-1)
    scale, bias = 10.0, -10.0  # the paper's initial temperature and bias
    logits = scale * image_embeds @ text_embeds.t() + bias
    assert siglip_loss(logits).item() == pytest.approx(naive_siglip_loss(image_embeds, text_embeds, scale, bias),
                                                       abs=1e-6)


def test_siglip_would_catch_an_ignored_bias_or_labels_off_the_diagonal():
    from liteclip.loss import siglip_loss

    torch.manual_seed(0)
    image_embeds = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    text_embeds = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    expected = naive_siglip_loss(image_embeds, text_embeds, 10.0, -10.0)
    without_bias = siglip_loss(10.0 * image_embeds @ text_embeds.t())
    shifted_labels = siglip_loss((10.0 * image_embeds @ text_embeds.t() - 10.0).roll(1, dims=1))
    assert abs(without_bias.item() - expected) > 1.0 and abs(shifted_labels.item() - expected) > 1e-3


def test_the_siglip_bias_is_in_the_models_logits_and_gets_a_gradient(tiny_config):
    import dataclasses

    from liteclip import build_model
    from liteclip.loss import siglip_loss

    config = dataclasses.replace(tiny_config.model, logit_scale_init=math.log(10), logit_bias_init=-10.0)
    model = build_model(config).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = model.tokenizer(["a cat", "a dog", "a photo of a human baby"], padding=True, return_tensors="pt")
    out = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    expected = naive_siglip_loss(out.image_embeds.detach().double(), out.text_embeds.detach().double(), 10.0, -10.0)
    loss = siglip_loss(out.logits_per_image)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    loss.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0  # no idle parameter under DDP
    assert model.logit_scale.grad.abs() > 0


def test_siglip_alone_takes_the_papers_initialisation_and_an_explicit_value_wins(tmp_path, caplog):
    from liteclip.config import load_config

    with caplog.at_level(logging.INFO, logger="liteclip.config"):
        paper = load_config(None, ["loss.name=siglip"]).model
    assert (paper.logit_scale_init, paper.logit_bias_init) == pytest.approx((math.log(10), -10.0))
    assert "paper's initialisation" in caplog.text  # the choice is logged
    scale_given = load_config(None, ["loss.name=siglip", "model.logit_scale_init=1.5"]).model
    assert (scale_given.logit_scale_init, scale_given.logit_bias_init) == pytest.approx((1.5, -10.0))
    recipe = tmp_path / "lit.yaml"  # big_vision's LiT init written in a file: both values as given
    recipe.write_text("loss: {name: siglip}\nmodel: {logit_scale_init: 2.302585, logit_bias_init: -2.71}\n")
    lit = load_config(recipe).model
    assert (lit.logit_scale_init, lit.logit_bias_init) == pytest.approx((2.302585, -2.71))
    clip = load_config(None).model  # the CLIP loss keeps its own temperature and no bias
    assert (clip.logit_scale_init, clip.logit_bias_init) == (pytest.approx(math.log(1 / 0.07)), None)


# ------------------------------------------------------------------------- two captions of one image (issue 28)


def naive_masked_losses(logits, exclude):
    """Both losses written out pair by pair, leaving the excluded pairs out of every sum."""
    n = len(logits)
    rows = -sum(logits[i][i] - math.log(sum(math.exp(logits[i][j]) for j in range(n) if not exclude[i][j]))
                for i in range(n)) / n
    cols = -sum(logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(n) if not exclude[j][i]))
                for i in range(n)) / n
    sigmoid = sum(math.log(1 + math.exp(-(1.0 if i == j else -1.0) * logits[i][j]))
                  for i in range(n) for j in range(n) if not exclude[i][j]) / n
    return (rows + cols) / 2, sigmoid


def test_excluded_pairs_leave_both_losses_and_get_no_gradient():
    from liteclip.loss import siglip_loss

    torch.manual_seed(0)
    logits = (torch.randn(6, 6, dtype=torch.float64) * 4).requires_grad_()
    image_of = torch.tensor([0, 0, 1, 2, 2, 2])  # samples 0-1 and 3-5 are captions of one image each
    exclude = (image_of[:, None] == image_of[None, :]) & ~torch.eye(6, dtype=torch.bool)
    clip_reference, siglip_reference = naive_masked_losses(logits.detach().tolist(), exclude.tolist())
    assert clip_loss(logits, exclude).item() == pytest.approx(clip_reference, abs=1e-9)
    assert siglip_loss(logits, exclude).item() == pytest.approx(siglip_reference, abs=1e-9)
    assert clip_loss(logits, exclude).item() != pytest.approx(clip_loss(logits).item(), abs=1e-3)
    for loss in (clip_loss, siglip_loss):
        logits.grad = None
        loss(logits, exclude).backward()
        assert logits.grad[exclude].abs().max() == 0 and logits.grad[~exclude].abs().min() > 0
