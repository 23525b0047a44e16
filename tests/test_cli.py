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
    # the web page's weighted queries, and nothing but paths for xargs
    query = f"2:{tmp_path / 'photos' / '3.png'}"  # an image term: that image comes first
    assert main(["search", query, "--index", str(index), "--model-dir", str(model_dir), "--paths"]) == 0
    paths = capsys.readouterr().out.split()
    assert paths[0] == str((tmp_path / "photos" / "3.png").resolve()) and len(paths) == 4 and all(
        Path(path).is_file() for path in paths)


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
    from liteclip.cli import build_parser

    commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    assert {"train", "predict", "index", "search", "serve", "eval-zeroshot", "eval-retrieval", "export",
            "data"} <= set(commands)
    for command in commands:  # every command the parser has, a new one included
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


def test_predict_takes_folders_and_index_still_takes_the_older_no_faiss_flag(model_dir, tmp_path, capsys):
    for i in range(3):
        draw_image(tmp_path / "photos" / "sub" / f"{i}.png", (80 * i, 10, 10))
    draw_image(tmp_path / "single.png", (5, 5, 5))
    assert main(["predict", str(tmp_path / "photos"), str(tmp_path / "single.png"), "--labels", "a", "b",
                 "--model-dir", str(model_dir), "--batch-size", "2", "--json"]) == 0
    predicted = [entry["image"] for entry in json.loads(capsys.readouterr().out)]
    assert predicted == [str(tmp_path / "photos" / "sub" / f"{i}.png") for i in range(3)] + [
        str(tmp_path / "single.png")]
    assert main(["index", str(tmp_path / "photos"), "--index", str(tmp_path / "p.index"), "--model-dir",
                 str(model_dir), "--no-faiss"]) == 0  # an older script's flag: there is no FAISS copy now
    assert (tmp_path / "p.index").is_file() and not (tmp_path / "p.index.faiss").exists()


# ------------------------------------------------------------------------- messy command lines (issue 26)


def test_eval_retrieval_applies_set_to_the_models_own_config_without_config(model_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    assert main(["eval-retrieval", "--model-dir", str(model_dir), "--device", "cpu", "--set", "data.dataset=csv",
                 f"data.root={missing}", "data.captions_file=c.csv"]) == 2
    assert f"data.root={missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("started_as, resume", [
    ("/home/me/.venv/bin/liteclip", "liteclip train --config c.yaml --resume auto"),
    ("train.py", "python train.py --config c.yaml --resume auto"),
    ("/site-packages/liteclip/__main__.py", "python -m liteclip train --config c.yaml --resume auto"),
])
def test_an_interrupted_run_prints_the_command_that_was_run_to_resume(started_as, resume, tmp_path, capsys,
                                                                      monkeypatch):
    import liteclip.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    (tmp_path / "c.yaml").write_text("train:\n  epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(liteclip.train.loop, "fit", interrupted)
    monkeypatch.setattr("sys.argv", [started_as])
    assert main(["train", "--config", "c.yaml"]) == 130
    assert f"resume: {resume}" in capsys.readouterr().err


def test_predict_on_a_folder_without_images_names_the_folder(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--labels", "a", "b", "--model-dir", str(model_dir)]) == 2
    assert f"{tmp_path / 'empty'}: no image files in this folder" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--device", "gpu0"], "device 'gpu0' is not a device torch knows"),
    (["--template", "a {} and {}"], "template 'a {} and {}' cannot take a label (IndexError"),
    (["--template", 'json {"k": {}}'], "cannot take a label (KeyError"),
    (["--template", "no placeholder"], "has no place for the label"),
    (["--labels", "a", ""], "every label must be a non-empty text"),
])
def test_bad_inference_arguments_are_one_line_errors(model_dir, tmp_path, capsys, extra, message):
    image = draw_image(tmp_path / "x.png", (0, 0, 200))
    labels = [] if "--labels" in extra else ["--labels", "a", "b"]
    assert main(["predict", str(image), *labels, "--model-dir", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_negative_worker_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "x.png", "--labels", "a", "b", "--num-workers", "-1"])
    assert exit_info.value.code == 2 and "-1 must be 0 (decode in this process) or more" in capsys.readouterr().err


def test_an_index_path_naming_an_image_is_refused_and_the_image_kept(model_dir, tmp_path, capsys):
    photo = draw_image(tmp_path / "photos" / "0.png", (1, 2, 3))
    before = photo.read_bytes()
    assert main(["index", str(tmp_path / "photos"), "--index", str(photo), "--model-dir", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "names an image file" in err and "delete" not in err
    assert photo.read_bytes() == before
    assert main(["search", "x", "--index", str(photo), "--model-dir", str(model_dir)]) == 2
    assert "is an image file, not an index" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["65536", "0", "99999999", "http"])
def test_a_port_outside_1_to_65535_is_a_usage_error_not_a_traceback(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--port" in err and "Traceback" not in err
