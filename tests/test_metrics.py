import pytest
import torch

from liteclip.metrics import retrieval_recall, zero_shot_accuracy


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
