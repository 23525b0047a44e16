import json
from pathlib import Path

import pytest

from liteclip.cli import main
from tests.conftest import draw_image

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def test_predict_table_and_json(model_dir, tmp_path, capsys):
    image = draw_image(tmp_path / "x.png", (200, 0, 0))
    labels = ["a red circle", "a blue square", "a cat"]
    assert main(["predict", str(image), "--labels", *labels, "--model-dir", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    predictions = data[0]["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(labels)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(image), "--labels", *labels, "--model-dir", str(model_dir), "--top-k", "2"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["image", "label", "probability"] and len(table) == 3


def test_index_then_search(model_dir, tmp_path, capsys):
    for i in range(4):
        draw_image(tmp_path / "photos" / f"{i}.png", (60 * i, 50, 50))
    index = tmp_path / "photos.index"
    assert main(["index", str(tmp_path / "photos"), "--index", str(index), "--model-dir", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["search", "a red circle", "--index", str(index), "--model-dir", str(model_dir), "--json",
                 "--top-k", "2"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]


@pytest.mark.parametrize("argv, message", [
    (["predict", "nope.jpg", "--labels", "a", "b"], "no liteclip model"),
    (["search", "x", "--index", "missing.index"], "no liteclip model"),
    (["train", "--config", "configs/nope.yaml"], "does not exist"),
    (["train", "--config", str(DEMO_CONFIG), "--set", "optim.lrr=1"], "did you mean 'lr'"),
])
def test_errors_are_one_line_not_tracebacks(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_with_one_label_is_refused(model_dir, tmp_path, capsys):
    image = draw_image(tmp_path / "x.png", (0, 0, 200))
    assert main(["predict", str(image), "--labels", "only", "--model-dir", str(model_dir)]) == 2
    assert "at least 2 labels" in capsys.readouterr().err


def test_help_for_every_command(capsys):
    for command in ("train", "predict", "index", "search", "eval-zeroshot", "eval-retrieval", "data"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: liteclip " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["search", "a cat", "--top-k", "0"], "0 must be at least 1"),
    (["predict", "x.png", "--labels", "a", "b", "--top-k", "-2"], "-2 must be at least 1"),
])
def test_bad_counts_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_cuda_device_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA, GPU or not
    image = draw_image(tmp_path / "x.png", (0, 0, 200))
    assert main(["predict", str(image), "--labels", "a", "b", "--model-dir", str(model_dir), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err


def test_predict_takes_folders_and_index_can_skip_the_faiss_copy(model_dir, tmp_path, capsys):
    for i in range(3):
        draw_image(tmp_path / "photos" / "sub" / f"{i}.png", (80 * i, 10, 10))
    draw_image(tmp_path / "single.png", (5, 5, 5))
    assert main(["predict", str(tmp_path / "photos"), str(tmp_path / "single.png"), "--labels", "a", "b",
                 "--model-dir", str(model_dir), "--batch-size", "2", "--json"]) == 0
    predicted = [entry["image"] for entry in json.loads(capsys.readouterr().out)]
    assert predicted == [str(tmp_path / "photos" / "sub" / f"{i}.png") for i in range(3)] + [
        str(tmp_path / "single.png")]
    assert main(["index", str(tmp_path / "photos"), "--index", str(tmp_path / "p.index"), "--model-dir",
                 str(model_dir), "--no-faiss"]) == 0
    assert (tmp_path / "p.index").is_file() and not (tmp_path / "p.index.faiss").exists()
