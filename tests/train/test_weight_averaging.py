"""WiSE-FT, model soups, a saved model as a start, layer-wise lr decay and retention sets, on tiny models."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from liteclip import CLIP, build_model
from liteclip.cli import main
from liteclip.config import load_config, parse_retention_set
from liteclip.errors import ConfigError, InputError
from liteclip.train.loop import fit
from liteclip.train.optim import param_groups
from liteclip.train.weight_averaging import average, greedy_soup, interpolate
from tests.train.test_loop import REPO, repo_root, tiny_config  # noqa: F401 (repo_root: the autouse fixture)


@pytest.fixture
def start_and_finetuned(tmp_path):
    """A tiny model and a copy of it moved as fine-tuning would move it: every weight changed."""
    config = tiny_config(tmp_path)
    from liteclip.data import load_splits

    load_splits(config.data)  # the demo data and its text tower
    torch.manual_seed(0)
    start = build_model(config.model).eval()
    finetuned = copy.deepcopy(start)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return config, start, finetuned


def embeddings(model: CLIP):
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    tokens = model.tokenizer(["a red circle", "two blue squares on the left"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens["input_ids"], tokens["attention_mask"])


def test_alpha_0_is_the_start_1_the_finetuned_model_and_between_the_weighted_average(start_and_finetuned):
    _, start, finetuned = start_and_finetuned
    at_start, kept = interpolate(start, finetuned, 0.0)
    assert kept == []
    for ours, theirs in zip(embeddings(at_start), embeddings(start)):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(embeddings(interpolate(start, finetuned, 1.0)[0]), embeddings(finetuned)):
        assert torch.equal(ours, theirs)
    between, _ = interpolate(start, finetuned, 0.3)
    start_state, finetuned_state = start.state_dict(), finetuned.state_dict()
    for name, tensor in between.state_dict().items():
        if tensor.is_floating_point():
            by_hand = 0.7 * start_state[name].double() + 0.3 * finetuned_state[name].double()
            torch.testing.assert_close(tensor.double(), by_hand, atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(embeddings(between)[0], embeddings(start)[0])


def test_heads_the_start_lacks_keep_their_finetuned_values_and_any_other_mismatch_is_refused(start_and_finetuned):
    _, start, finetuned = start_and_finetuned
    headless = copy.deepcopy(start)
    headless.image_projection = torch.nn.Identity()  # towers without a head: the fine-tuning added one
    merged, kept = interpolate(headless, finetuned, 0.5)
    assert kept and all(name.startswith("image_projection.") for name in kept)
    for name in kept:
        assert torch.equal(merged.state_dict()[name], finetuned.state_dict()[name])
    reshaped = copy.deepcopy(start)
    reshaped.logit_scale = torch.nn.Parameter(torch.zeros(2))  # a weight of another shape: not this model's start
    with pytest.raises(ConfigError, match=r"logit_scale \(\(2,\) in the start"):
        interpolate(reshaped, finetuned, 0.5)
    other_tower = copy.deepcopy(start)
    other_tower.image_encoder = torch.nn.Linear(2, 2)  # another image tower altogether
    with pytest.raises(ConfigError, match="does not start from this model"):
        interpolate(other_tower, finetuned, 0.0)
    with pytest.raises(ConfigError, match="between 0"):
        interpolate(start, finetuned, 1.5)


def test_a_soup_of_one_model_is_that_model_and_of_two_their_mean(start_and_finetuned):
    _, start, finetuned = start_and_finetuned
    alone = average([finetuned])
    for name, tensor in alone.state_dict().items():
        assert torch.equal(tensor, finetuned.state_dict()[name])
    soup = average([start, finetuned])
    for name, tensor in soup.state_dict().items():
        if tensor.is_floating_point():
            by_hand = (start.state_dict()[name].double() + finetuned.state_dict()[name].double()) / 2
            torch.testing.assert_close(tensor.double(), by_hand, atol=1e-6, rtol=1e-6)
    other = copy.deepcopy(start)
    other.image_projection = torch.nn.Linear(3, 5)
    with pytest.raises(ConfigError, match="image_projection"):
        average([start, other])


def test_the_greedy_soup_adds_a_model_only_when_the_average_scores_no_worse(start_and_finetuned):
    _, start, finetuned = start_and_finetuned
    worse = copy.deepcopy(finetuned)
    with torch.no_grad():
        for parameter in worse.parameters():
            parameter.mul_(-1)

    def score(model):  # closeness to the start's weights, as a stand-in validation score
        return -sum(float((a - b).abs().sum()) for a, b in zip(model.state_dict().values(),
                                                                start.state_dict().values()))

    models = [worse, start, finetuned]
    soup, chosen = greedy_soup(models, [score(m) for m in models], score)
    assert chosen[0] == 1  # the best on its own comes first
    assert 0 not in chosen  # averaging the negated model in would score worse
    assert score(soup) >= score(start)


def test_model_init_from_a_liteclip_folder_starts_from_its_weights_with_the_configs_tune_settings(tmp_path):
    config = tiny_config(tmp_path, "train.max_steps=2", "train.epochs=1")
    fit(config, show_progress=False)
    saved = CLIP.from_pretrained(config.train.model_dir)
    further = tiny_config(tmp_path / "further", f"model.init_from={config.train.model_dir}",
                          "model.text.tune=locked", "train.max_steps=2", "train.epochs=1",
                          f"data.root={config.data.root}", f"model.text.name={config.model.text.name}")
    model = build_model(further.model)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert any(p.requires_grad for p in model.image_encoder.parameters())
    assert model.data_config == saved.data_config
    fit(further, show_progress=False)  # and the run trains on from it
    assert (tmp_path / "further" / "model" / "model.safetensors").is_file()


def bert_layer(name: str, layers: int) -> int:
    """The layer of a BERT parameter by its name, written out here: embeddings 0, encoder.layer.N N + 1, the rest
    (the pooler) the top."""
    if name.startswith("embeddings."):
        return 0
    if name.startswith("encoder.layer."):
        return int(name.split(".")[2]) + 1
    return layers + 1


def test_layer_decay_gives_each_layer_the_rate_computed_here_and_timm_towers_timms_own_scales(tmp_path):
    import timm.optim

    config = tiny_config(tmp_path, "optim.layer_decay=0.5", "optim.tower_lr=1e-3", "optim.lr=2e-3")
    from liteclip.data import load_splits

    load_splits(config.data)
    model = build_model(config.model)
    groups = param_groups(model, config.optim)
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    text = model.text_encoder.model
    layers = text.config.num_hidden_layers
    top = max(bert_layer(name, layers) for name, _ in text.named_parameters())  # the layer at the tower's rate
    for name, parameter in text.named_parameters():
        expected = 1e-3 * 0.5 ** (top - bert_layer(name, layers))
        assert lr_of[id(parameter)] == pytest.approx(expected), name
    theirs = timm.optim.param_groups_layer_decay(model.image_encoder.model, layer_decay=0.5)
    timm_scale = {id(p): group["lr_scale"] for group in theirs for p in group["params"]}
    for name, parameter in model.image_encoder.model.named_parameters():
        assert lr_of[id(parameter)] == pytest.approx(1e-3 * timm_scale[id(parameter)]), name
    assert {lr_of[id(p)] for p in model.image_projection.parameters()} == {2e-3}  # the heads keep optim.lr
    assert len({lr_of[id(p)] for p in text.parameters()}) == top + 1


def draw_class_folder(root, classes=("red", "blue"), per_class=4):
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((40, 36 + i, 3), colours[name], dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_retention_sets_are_scored_before_the_first_step_and_with_every_validation(tmp_path):
    colours = draw_class_folder(tmp_path / "colours")
    config = tiny_config(tmp_path, f"train.retention=[zeroshot:{colours}, demo:{tmp_path / 'demo'}@test]",
                         "train.precision=fp32")
    from liteclip.data import load_splits
    from liteclip.evaluation import evaluate_retention, retention_task

    load_splits(config.data)
    torch.manual_seed(config.train.seed)  # the model the run starts from, as build_training seeds and builds it
    start = build_model(config.model).eval()
    sets = {spec: retention_task(spec) for spec in map(parse_retention_set, config.train.retention)}
    figures = evaluate_retention(start, sets)
    fit(config, show_progress=False)
    with open(tmp_path / "run" / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = ["retention_zeroshot_colours", "retention_demo_demo_test"]
    assert rows[0]["epoch"] == "0" and rows[0]["step"] == "0"  # the starting model's row
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    for row in rows:
        for name in names:
            assert 0.0 <= float(row[name]) <= 100.0
    for name in names:  # the first row is the starting model's, scored before any step
        assert float(rows[0][name]) == pytest.approx(figures[name], abs=1e-3)
    assert rows[0]["train_loss"] == ""


@given(spec=st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_a_retention_spec_is_a_set_or_one_line_naming_it(spec):
    try:
        parsed = parse_retention_set(spec)
    except ConfigError as error:
        assert "\n" not in str(error) and "train.retention" in str(error)
        return
    assert parsed.kind in ("zeroshot", "flickr8k", "csv", "demo") and parsed.name.startswith("retention_")
    assert parsed.split in ("train", "val", "test")


def test_wise_ft_and_average_commands_write_model_folders_and_score_alphas(start_and_finetuned, tmp_path, capsys):
    config, start, finetuned = start_and_finetuned
    colours = draw_class_folder(tmp_path / "colours")
    start.save_pretrained(tmp_path / "start")
    finetuned.save_pretrained(tmp_path / "finetuned", full_config=config)
    scoring = tmp_path / "scoring.yaml"
    scoring.write_text(load_config(None, [f"data.root={config.data.root}", "data.dataset=demo",
                                          f"train.retention=[zeroshot:{colours}]"]).to_yaml())
    assert main(["wise-ft", str(tmp_path / "start"), str(tmp_path / "finetuned"), "--alpha", "0", "0.5", "1",
                 "--out", str(tmp_path / "wise"), "--config", str(scoring), "--plot", str(tmp_path / "wise.png"),
                 "--pick", "retention", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["alpha"] for row in report["alphas"]] == [0.0, 0.5, 1.0]
    best = max(report["alphas"], key=lambda row: row["retention_zeroshot_colours"])
    assert report["alpha"] == best["alpha"] and (tmp_path / "wise.png").stat().st_size > 1000
    written = CLIP.from_pretrained(tmp_path / "wise")
    expected, _ = interpolate(start, finetuned, report["alpha"])
    for ours, theirs in zip(embeddings(written), embeddings(expected)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert main(["wise-ft", str(tmp_path / "start"), str(tmp_path / "finetuned"), "--alpha", "0.5",
                 "--out", str(tmp_path / "wise"), "--plot", str(tmp_path / "wise.png")]) == 2  # a file of its own
    before = sorted(p.name for p in (tmp_path / "start").iterdir())
    for plot, pick in ((tmp_path / "start" / "plot.png", "balanced"), (tmp_path / "plot.txt", "balanced"),
                       (tmp_path / "new.png", "retention")):  # inside an input; not a PNG; nothing to rank by
        config = ["--config", str(scoring), "--set", "train.retention=[]"] if pick == "retention" else []
        assert main(["wise-ft", str(tmp_path / "start"), str(tmp_path / "finetuned"), "--alpha", "0", "1",
                     "--out", str(tmp_path / "refused"), "--plot", str(plot), "--pick", pick, *config]) == 2
    assert sorted(p.name for p in (tmp_path / "start").iterdir()) == before and not (tmp_path / "refused").exists()
    assert main(["average", str(tmp_path / "start"), str(tmp_path / "finetuned"), "--out",
                 str(tmp_path / "soup")]) == 0
    soup = CLIP.from_pretrained(tmp_path / "soup")
    for ours, theirs in zip(embeddings(soup), embeddings(interpolate(start, finetuned, 0.5)[0])):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert main(["average", str(tmp_path / "start"), "--out", str(tmp_path / "start")]) == 2  # never over an input


def test_a_run_never_exports_into_the_model_it_starts_from_and_says_which_model_keys_it_ignores(tmp_path, caplog):
    config = tiny_config(tmp_path, "train.max_steps=1", "train.epochs=1")
    fit(config, show_progress=False)
    start = tmp_path / "model"
    weights = (start / "model.safetensors").read_bytes()
    for target in (f"train.model_dir={start}", f"train.output_dir={start / 'run'}"):
        again = tiny_config(tmp_path / "again", f"model.init_from={start}", target, "train.max_steps=1",
                            "train.epochs=1", f"data.root={config.data.root}",
                            f"model.text.name={config.model.text.name}")
        with pytest.raises((ConfigError, InputError), match="init_from|own input"):
            fit(again, show_progress=False)
    assert (start / "model.safetensors").read_bytes() == weights and not (start / "run").exists()
    wider = tiny_config(tmp_path / "wider", f"model.init_from={start}", "model.projection.dim=16",
                        f"data.root={config.data.root}", f"model.text.name={config.model.text.name}")
    with caplog.at_level("WARNING"):
        model = build_model(wider.model)
    assert model.config.projection.dim == 32  # the folder's
    assert "model.projection.dim" in caplog.text


def test_a_damaged_preprocessor_config_is_one_line_naming_the_file(tmp_path):
    from liteclip.errors import ModelLoadError

    model_dir = tmp_path / "model"
    config = tiny_config(tmp_path, "train.max_steps=1", "train.epochs=1")
    fit(config, show_progress=False)
    for text in ("{not json", "[1, 2, 3]"):
        (model_dir / "preprocessor_config.json").write_text(text)
        with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
            CLIP.from_pretrained(model_dir)


def test_wise_ft_from_the_config_interpolates_the_best_model_with_the_runs_own_starting_weights(tmp_path):
    config = tiny_config(tmp_path, "train.wise_ft_alphas=[0.0]", "train.precision=fp32", "train.max_steps=3",
                         "train.epochs=1")
    from liteclip.data import load_splits

    load_splits(config.data)
    torch.manual_seed(config.train.seed)  # the run's start: build_training's seed and build
    start = build_model(config.model).eval()
    fit(config, show_progress=False)
    written = CLIP.from_pretrained(f"{config.train.model_dir}-wise-ft")
    for name, tensor in start.state_dict().items():  # alpha 0: the start's weights exactly
        assert torch.equal(written.state_dict()[name], tensor), name
    trained = CLIP.from_pretrained(config.train.model_dir)
    assert not torch.equal(trained.state_dict()["logit_scale"], start.state_dict()["logit_scale"]) or any(
        not torch.equal(trained.state_dict()[n], t) for n, t in start.state_dict().items())
    with pytest.raises(ConfigError, match="wise_ft_alphas"):
        tiny_config(tmp_path, "train.wise_ft_alphas=[1.5]")
