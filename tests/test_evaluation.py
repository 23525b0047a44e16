"""The evaluators the trainer and `liteclip eval-*` share, on a tiny model saved to a temporary directory."""

import numpy as np
import pytest
import torch
from PIL import Image

from liteclip.data.captions import CaptionedImage, LabelledImage, ZeroShotTask
from liteclip.data.image_folder import read_image_folder
from liteclip.evaluation import evaluate_retrieval, evaluate_zero_shot
from liteclip.pipeline import ZeroShotPipeline
from tests.conftest import draw_image


@pytest.fixture
def images(tmp_path):
    return [draw_image(tmp_path / "examples" / f"{name}.jpg", color)
            for name, color in (("cat", (200, 30, 30)), ("dog", (30, 200, 30)), ("baby", (30, 30, 200)),
                                ("sky", (90, 90, 250)), ("sun", (250, 250, 20)))]


def test_zero_shot_evaluation_on_an_image_folder(model_dir, tmp_path):
    for name, color in (("red_thing", (220, 20, 20)), ("green_thing", (20, 220, 20)), ("blue_thing", (20, 20, 220))):
        for i in range(3):
            draw_image(tmp_path / "folder" / name / f"{i}.png", color)
    pipeline = ZeroShotPipeline(model_dir)
    task = read_image_folder(tmp_path / "folder", ["a photo of a {}."])
    result = evaluate_zero_shot(pipeline.model, task, show_progress=False)
    assert set(result["per_class"]) == {"red thing", "green thing", "blue thing"}
    assert all(v["count"] == 3 for v in result["per_class"].values())
    mean_per_class = sum(v["top1"] for v in result["per_class"].values()) / 3
    assert result["top1"] == pytest.approx(mean_per_class)  # balanced classes
    assert result["top3"] == pytest.approx(100.0)


def test_retrieval_evaluation_runs_on_a_split(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    split = [CaptionedImage(p, [f"a {p.stem}", f"the {p.stem}"]) for p in images]
    metrics = evaluate_retrieval(pipeline.model, split, show_progress=False)
    assert metrics["image_to_text_R@10"] == 100.0 and 0 <= metrics["text_to_image_R@1"] <= 100


def embed_one_by_one(pipeline, paths, texts):
    """Image and text embeddings computed here, one transform and one tokenizer call, without liteclip.embedding."""
    with torch.no_grad():
        pixels = torch.stack([pipeline.transform(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
        tokens = pipeline.model.tokenizer(texts, padding=True, return_tensors="pt")
        return (pipeline.model.encode_image(pixels),
                pipeline.model.encode_text(tokens["input_ids"], tokens["attention_mask"]))


def naive_pair_loss(logits):
    """The symmetric cross-entropy written out: each row's own column, each column's own row."""
    rows = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(len(logits))]
    columns = [-(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(len(logits))]
    return (torch.stack(rows).mean() + torch.stack(columns).mean()) / 2


def test_the_validation_loss_is_the_contrastive_loss_of_first_captions_in_batches(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir, device="cpu")  # CPU arithmetic on both sides: the sums agree to 1e-5
    split = [CaptionedImage(p, [f"a {p.stem}", f"the {p.stem} again"]) for p in images]
    metrics = evaluate_retrieval(pipeline.model, split, batch_size=2, show_progress=False)
    image_embeds, text_embeds = embed_one_by_one(pipeline, images, [f"a {p.stem}" for p in images])
    logits = pipeline.model.logit_scale.exp().detach() * image_embeds @ text_embeds.t()
    # batches of 2 over 5 images: (0, 1), (2, 3); the lone fifth image has no negative and is left out
    expected = (naive_pair_loss(logits[:2, :2]) + naive_pair_loss(logits[2:4, 2:4])) / 2
    assert metrics["loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_zero_shot_groups_and_chance(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir, device="cpu")  # embed_one_by_one's tensors are on the CPU
    labels = ["a photo of a cat", "a photo of a dog", "the photo of a human baby"]
    items = [LabelledImage(images[0], 0, "seen"), LabelledImage(images[1], 1, "seen"),
             LabelledImage(images[2], 2, "held_out")]
    result = evaluate_zero_shot(pipeline.model, ZeroShotTask(labels, items), show_progress=False)
    image_embeds, class_embeds = embed_one_by_one(pipeline, images[:3], labels)
    predicted = (image_embeds @ class_embeds.t()).argmax(1)
    correct = (predicted == torch.tensor([0, 1, 2])).float()
    assert result["per_group"]["seen"]["count"] == 2 and result["per_group"]["held_out"]["count"] == 1
    assert result["per_group"]["seen"]["top1"] == pytest.approx(100 * correct[:2].mean().item())
    assert result["per_group"]["held_out"]["top1"] == pytest.approx(100 * correct[2].item())
    assert result["top1"] == pytest.approx(100 * correct.mean().item())
    assert result["chance"] == pytest.approx(100 / 3)


def test_an_image_folder_needs_two_classes(tmp_path):
    draw_image(tmp_path / "only" / "one" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match="at least two class folders"):
        read_image_folder(tmp_path / "only")


def test_an_image_that_does_not_decode_is_left_out_of_the_evaluation_with_a_warning(model_dir, images, tmp_path,
                                                                                    caplog):
    pipeline = ZeroShotPipeline(model_dir)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    split = [CaptionedImage(p, [f"a {p.stem}"]) for p in images]
    with caplog.at_level("WARNING"):
        with_broken = evaluate_retrieval(pipeline.model, split + [CaptionedImage(broken, ["a broken file"])],
                                         show_progress=False)
    assert "broken.jpg" in caplog.text
    assert with_broken == evaluate_retrieval(pipeline.model, split, show_progress=False)
    task = ZeroShotTask(["a cat", "a dog"], [LabelledImage(images[0], 0), LabelledImage(broken, 1)])
    assert evaluate_zero_shot(pipeline.model, task, show_progress=False)["per_class"].keys() == {"a cat"}
