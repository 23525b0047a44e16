"""liteclip models in LAION's CLIP_benchmark: its own loader, evaluators and command line on a liteclip model give
liteclip's own embeddings and figures."""

import importlib
import json

import pytest
import torch
from PIL import Image

from liteclip import ZeroShotPipeline
from liteclip.data.captions import CaptionedImage
from liteclip.data.image_folder import read_image_folder
from liteclip.embedding import encode_texts
from liteclip.evaluation import evaluate_retrieval, evaluate_zero_shot
from tests.conftest import draw_image

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 70, 210), (230, 200, 40), (140, 40, 170), (240, 130, 30),
           (20, 20, 20), (250, 250, 250), (90, 200, 200), (160, 110, 60), (200, 90, 150), (110, 110, 110)]


def test_importing_the_module_registers_liteclip_and_the_loader_gives_liteclips_own_embeddings(model_dir, tmp_path):
    importlib.import_module("liteclip.integrations.clip_benchmark")  # importing it registers the model type
    from clip_benchmark.models import MODEL_TYPES, load_clip

    assert "liteclip" in MODEL_TYPES
    model, transform, tokenizer = load_clip("liteclip", model_name="liteclip", pretrained=str(model_dir),
                                            cache_dir=None, device="cpu")
    pipeline = ZeroShotPipeline(model_dir, device="cpu")
    paths = [draw_image(tmp_path / f"{i}.png", colour, size=37 + 5 * i) for i, colour in enumerate(COLOURS[:4])]
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        theirs = model.encode_image(pixels)
        texts = ["a boy jumping with skateboard", "a dog", "two shapes: a green circle above a red square"]
        their_texts = model.encode_text(tokenizer(texts))
    torch.testing.assert_close(theirs, pipeline.encode_images(paths), atol=1e-5, rtol=0)
    torch.testing.assert_close(their_texts, encode_texts(pipeline.model, texts), atol=1e-5, rtol=0)
    assert torch.allclose(theirs.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_clip_benchmarks_command_line_on_a_drawn_flickr8k_gives_eval_retrievals_figures(model_dir, tmp_path):
    from liteclip.integrations.clip_benchmark import main

    root = tmp_path / "flickr8k"
    words = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "teal", "brown", "pink", "grey"]
    images = []
    for i, (colour, word) in enumerate(zip(COLOURS, words)):
        path = draw_image(root / f"{i:04d}.jpg", colour, size=40)
        images.append(CaptionedImage(path, [f"a {word} square", f"the square is {word}", f"{word} on grey"]))
    lines = ["image,caption"] + [f"{image.image_path.name},{caption}" for image in images for caption in image.captions]
    (root / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")  # what CLIP_benchmark reads
    output = tmp_path / "result.json"
    main(["eval", "--dataset", "flickr8k", "--dataset_root", str(root), "--pretrained", str(model_dir),
          "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--no_amp", "--num_workers", "0",
          "--batch_size", "5", "--output", str(output), "--quiet"])
    theirs = json.loads(output.read_text())["metrics"]
    ours = evaluate_retrieval(ZeroShotPipeline(model_dir, device="cpu").model, images, show_progress=False)
    assert 0 < ours["text_to_image_R@1"] < 100  # a case that tells the rankings apart
    for k in (1, 5, 10):
        assert theirs[f"image_retrieval_recall@{k}"] * 100 == pytest.approx(ours[f"text_to_image_R@{k}"], abs=1e-4)
        assert theirs[f"text_retrieval_recall@{k}"] * 100 == pytest.approx(ours[f"image_to_text_R@{k}"], abs=1e-4)


def test_clip_benchmarks_zero_shot_classifier_gives_eval_zeroshots_accuracy(model_dir, tmp_path):
    importlib.import_module("liteclip.integrations.clip_benchmark")
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.models import load_clip
    from torchvision.datasets import ImageFolder

    classes = ["red", "green", "blue", "yellow"]
    for c, name in enumerate(classes):
        for j in range(4):
            shade = tuple(min(255, value + 12 * j) for value in COLOURS[c])
            draw_image(tmp_path / "folder" / name / f"{j}.png", shade, size=36 + 4 * j)
    model, transform, tokenizer = load_clip("liteclip", model_name="liteclip", pretrained=str(model_dir),
                                            cache_dir=None, device="cpu")
    folder = ImageFolder(str(tmp_path / "folder"), transform=transform)
    loader = torch.utils.data.DataLoader(folder, batch_size=6)
    # CLIP_benchmark's classifier and logits; its own accuracy() calls float() on a 1-element array, which
    # NumPy 2 refuses, so top-1 is counted here from its logits
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, folder.classes, ["a photo of a {c} square.", "a {c} shape"], "cpu", amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    their_top1 = 100 * (logits.argmax(dim=1) == target).float().mean().item()
    task = read_image_folder(tmp_path / "folder", ["a photo of a {} square.", "a {} shape"])
    ours = evaluate_zero_shot(ZeroShotPipeline(model_dir, device="cpu").model, task, show_progress=False)
    assert their_top1 == pytest.approx(ours["top1"], abs=1e-4)


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    from liteclip.errors import InputError
    from liteclip.integrations.clip_benchmark import load_liteclip

    with pytest.raises(InputError, match="not a liteclip model directory"):
        load_liteclip(pretrained=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("pretrained", ["nowhere", "empty"])
def test_the_command_line_given_a_folder_that_is_not_a_model_says_so_in_one_line(tmp_path, capsys, pretrained):
    """Issue 38: CLIP_benchmark's command line given a bad --pretrained printed a traceback."""
    from liteclip.integrations.clip_benchmark import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--dataset", "flickr8k", "--dataset_root", str(tmp_path), "--pretrained",
              str(tmp_path / pretrained), "--task", "zeroshot_retrieval", "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "liteclip clip_benchmark: error:" in err and "Traceback" not in err
