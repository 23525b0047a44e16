import math

import pytest
import torch

from liteclip.metrics import caption_groups_of, retrieval_recall, zero_shot_accuracy


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_recall_with_known_answers():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # captions 0,1 belong to image 0; 2 to image 1; 3 to image 2
    texts = unit([0.9, 0.1, 0], [0, 0.2, 1], [0.1, 1, 0], [1, 0, 0.5])
    owner = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_recall(images, texts, owner, ks=(1, 2))
    # image->text top1: image0 -> text0 (own) hit; image1 -> text2 (own) hit; image2 -> text1 (not own) miss
    assert metrics["image_to_text_R@1"] == pytest.approx(200 / 3)
    # image2 second-best caption is text3 (own) -> hit at 2
    assert metrics["image_to_text_R@2"] == pytest.approx(100.0)
    # text->image top1: t0->i0 hit, t1->i2 miss, t2->i1 hit, t3->i0 miss
    assert metrics["text_to_image_R@1"] == pytest.approx(50.0)
    # top2: t1 -> (i2, i1) miss (own is i0); t3 -> (i0, i2) hit
    assert metrics["text_to_image_R@2"] == pytest.approx(75.0)
    assert metrics["mean_recall"] == pytest.approx((200 / 3 + 100 + 50 + 75) / 4)


def test_recall_perfect_and_reversed():
    embeds = torch.eye(5)
    perfect = retrieval_recall(embeds, embeds, torch.arange(5), ks=(1,))
    assert perfect["image_to_text_R@1"] == perfect["text_to_image_R@1"] == 100.0
    wrong = retrieval_recall(embeds, embeds, torch.arange(5).roll(1), ks=(1,))
    assert wrong["image_to_text_R@1"] == wrong["text_to_image_R@1"] == 0.0


def test_zero_shot_accuracy():
    classes = unit([1, 0], [0, 1], [-1, 0])
    images = unit([1, 0.1], [0.1, 1], [1, 0.2])
    labels = torch.tensor([0, 1, 1])
    result = zero_shot_accuracy(images, classes, labels, ks=(1, 2))
    assert result["top1"] == pytest.approx(200 / 3)
    assert result["top2"] == pytest.approx(100.0)


# ------------------------------------------------------------------------- ties and duplicate texts (issue 27)


def test_a_collapsed_model_scores_no_better_than_chance_in_both_directions_and_zero_shot():
    constant = torch.nn.functional.normalize(torch.ones(100, 8), dim=-1)
    owner = torch.arange(100).repeat_interleave(5)
    metrics = retrieval_recall(constant, constant.repeat_interleave(5, 0), owner)
    for k in (1, 5, 10):
        # chance: K of 100 images for a caption; for an image, its 5 captions among 500 in the top K
        assert metrics[f"text_to_image_R@{k}"] <= 100 * k / 100
        assert metrics[f"image_to_text_R@{k}"] <= 100 * (1 - math.comb(495, k) / math.comb(500, k))
    assert metrics["mean_recall"] == 0.0  # every tie is counted against the model
    classes = torch.nn.functional.normalize(torch.ones(20, 8), dim=-1)
    accuracy = zero_shot_accuracy(constant, classes, torch.arange(100) % 20, ks=(1, 5))
    assert accuracy == {"top1": 0.0, "top5": 0.0}


def pessimistic_rank_by_hand(scores, correct):
    """The rule written out loop by loop: wrong items scoring at least the best correct one."""
    best = max(score for score, ok in zip(scores, correct) if ok)
    return sum(1 for score, ok in zip(scores, correct) if not ok and score >= best)


def test_planted_ties_give_the_pessimistic_rank_computed_by_hand():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # caption 0 (image 0) ties with caption 1 (image 1) on image 0; caption 2 (image 2) ties with both images 0 and 1
    texts = unit([1, 1, 0], [1, 1, 0], [1, 1, 5], [0, 0, 1])
    owner = torch.tensor([0, 1, 2, 2])
    similarity = (images @ texts.t()).tolist()
    image_ranks = [pessimistic_rank_by_hand(similarity[i], [owner[t] == i for t in range(4)]) for i in range(3)]
    text_ranks = [pessimistic_rank_by_hand([similarity[i][t] for i in range(3)], [owner[t] == i for i in range(3)])
                  for t in range(4)]
    assert image_ranks == [1, 1, 0] and text_ranks == [1, 1, 0, 0]  # the plant is what the test says it is
    metrics = retrieval_recall(images, texts, owner, ks=(1, 2))
    assert metrics["image_to_text_R@1"] == pytest.approx(100 / 3) and metrics["image_to_text_R@2"] == 100.0
    assert metrics["text_to_image_R@1"] == pytest.approx(50.0) and metrics["text_to_image_R@2"] == 100.0
    # zero-shot: image 0 ties between classes 0 and 1, so top-1 misses whichever class is true
    classes = unit([1, 1, 0], [1, 1, 0], [0, 0, 1])
    assert zero_shot_accuracy(images[:1], classes, torch.tensor([0]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}
    assert zero_shot_accuracy(images[:1], classes, torch.tensor([1]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def clip_benchmark_recall(image_embeds, text_embeds, captions_per_image):
    """CLIP_benchmark's own retrieval evaluator, handed these embeddings through a model that looks them up."""
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    class Lookup(torch.nn.Module):
        def encode_image(self, indices):
            return image_embeds[indices]

        def encode_text(self, indices):
            return text_embeds[indices]

    batches, start = [], 0
    for first in range(0, len(image_embeds), 7):
        indices = torch.arange(first, min(first + 7, len(image_embeds)))
        texts = [[str(start + sum(captions_per_image[:i]) - sum(captions_per_image[:first]) + j)
                  for j in range(captions_per_image[i])] for i in indices.tolist()]
        start += sum(captions_per_image[i] for i in indices.tolist())
        batches.append((indices, texts))
    result = evaluate(Lookup(), batches, lambda texts: torch.tensor([int(t) for t in texts]), "cpu", amp=False,
                      recall_k_list=[1, 5, 10])
    return {f"{'text_to_image' if name.startswith('image_retrieval') else 'image_to_text'}_R@{name.split('@')[1]}":
            100 * value for name, value in result.items()}


def test_on_unique_captions_the_figures_equal_clip_benchmarks():
    generator = torch.Generator().manual_seed(0)
    captions_per_image = [5] * 30 + [3, 1, 4]  # Flickr's five, and a few images with fewer
    images = torch.nn.functional.normalize(torch.randn(33, 16, generator=generator), dim=-1)
    owner = torch.repeat_interleave(torch.arange(33), torch.tensor(captions_per_image))
    texts = torch.nn.functional.normalize(images[owner] + 1.2 * torch.randn(len(owner), 16, generator=generator),
                                          dim=-1)
    ours = retrieval_recall(images, texts, owner)
    theirs = clip_benchmark_recall(images, texts, captions_per_image)
    assert 0 < ours["text_to_image_R@1"] < 100 and 0 < ours["image_to_text_R@1"] < 100  # not a trivial case
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_a_caption_text_several_images_share_counts_for_each_where_clip_benchmark_counts_each_caption_once():
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    # templated captions: images 0-3 are all "a red circle", each also has a text of its own
    captions = ["a red circle", "image 0", "a red circle", "image 1", "a red circle", "image 2", "a red circle",
                "image 3", "a blue square", "image 4"]
    owner = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    generator = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    by_text = {text: torch.randn(8, generator=generator) for text in dict.fromkeys(captions)}
    texts = torch.nn.functional.normalize(torch.stack([by_text[c] for c in captions]), dim=-1)
    ours = retrieval_recall(images, texts, owner, ks=(1, 2), caption_groups=caption_groups_of(captions))
    # the rule pinned: a caption is correct for an image when the image has a caption of the same text
    shares_text = torch.tensor([[captions[t] in [captions[u] for u in range(10) if owner[u] == i]
                                 for t in range(10)] for i in range(5)])
    for k in (1, 2):
        image_hits = recall_at_k(images @ texts.t(), shares_text, k) > 0
        text_hits = recall_at_k(texts @ images.t(), shares_text.t(), k) > 0
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(100 * image_hits.float().mean().item(), abs=1e-6)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(100 * text_hits.float().mean().item(), abs=1e-6)
    # every caption its own item instead (CLIP_benchmark's rule): "a red circle" of image 0 ranks images 1-3 as
    # wrong, so text -> image R@1 can only fall
    own = retrieval_recall(images, texts, owner, ks=(1, 2))
    assert own["text_to_image_R@1"] <= ours["text_to_image_R@1"]
    assert own["text_to_image_R@1"] < 100 and ours["text_to_image_R@2"] >= own["text_to_image_R@2"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_an_error_never_a_perfect_score(bad):
    """Issue 38: a NaN scores neither above nor below anything, so every pessimistic rank was 0 and recall 100."""
    from liteclip.errors import NonFiniteError

    images = unit([1.0, 0.0], [0.0, 1.0], [0.6, 0.8])
    texts = images.clone()
    texts[1, 0] = bad
    with pytest.raises(NonFiniteError, match="1 of 3 text embeddings are not finite"):
        retrieval_recall(images, texts, torch.arange(3))
    with pytest.raises(NonFiniteError, match="image embeddings"):
        retrieval_recall(texts, images, torch.arange(3))
    with pytest.raises(NonFiniteError, match="class embeddings"):
        zero_shot_accuracy(images, texts, torch.arange(3))
