import pytest
from hypothesis import given, settings, strategies as st

from liteclip.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    config = load_config()
    assert config == Config()


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "optim.lerning_rate" in message and str(path) in message


def test_misspelled_key_gets_closest_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(write(tmp_path, "data:\n  batch_sise: 8\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(write(tmp_path, "modle:\n  image: {}\n"))


def test_renamed_key_points_to_new_name(tmp_path):
    with pytest.raises(ConfigError, match="renamed to 'optim.lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"))


@pytest.mark.parametrize("text, fragment", [
    ("data:\n  batch_size: eight\n", "data.batch_size must be int"),
    ("data:\n  batch_size: 0\n", "data.batch_size=0 must be > 0"),
    ("optim:\n  lr: -1.0\n", "optim.lr=-1.0 must be > 0"),
    ("model:\n  text:\n    pooling: maen\n", "did you mean 'mean'"),
    ("model:\n  image:\n    pretrained: 1\n", "model.image.pretrained must be bool"),
    ("optim:\n  betas: [0.9]\n", "optim.betas must be a list of 2"),
    ("model:\n  image:\n    model_kwargs: [16, 32]\n", "model.image.model_kwargs must be a mapping of names to values"),
    ("model:\n  image:\n    source: hf\n    model_kwargs: {drop_path_rate: 0.1}\n",
     "model.image.model_kwargs=.*is for timm towers"),
])
def test_values_are_checked(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_overrides_apply_on_top(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n")
    config = load_config(path, ["optim.lr=1e-4", "model.image.name=resnet50", "optim.betas=[0.8, 0.9]"])
    assert config.optim.lr == 1e-4
    assert config.model.image.name == "resnet50"
    assert config.optim.betas == (0.8, 0.9)


def test_bad_override_format():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])


def test_yaml_round_trip():
    config = load_config(None, ["optim.lr=0.003", "model.projection.dim=64",
                                "model.image.model_kwargs={stem_width: 16, channels: [32, 64]}"])
    assert config.model.image.model_kwargs == {"stem_width": 16, "channels": [32, 64]}
    path_text = config.to_yaml()
    import yaml

    from liteclip.config import config_from_dict
    assert config_from_dict(yaml.safe_load(path_text)) == config


@pytest.mark.parametrize("override, key", [
    ("train.eval_every=0", "train.eval_every"), ("data.max_train_samples=0", "data.max_train_samples"),
    ("data.crop_scale=[0.9, 0.5]", "data.crop_scale"), ("data.crop_scale=[0.0, 1.0]", "data.crop_scale"),
    ("data.crop_scale=[0.5, 1.5]", "data.crop_scale"), ("model.image.image_size=0", "model.image.image_size"),
    ("optim.grad_clip=0", "optim.grad_clip"), ("data.demo_num_images=5", "data.demo_num_images"),
    ("data.eval_batch_size=0", "data.eval_batch_size"), ("train.max_steps=0", "train.max_steps"),
    ("model.text.length_groups=0", "model.text.length_groups"),
    ("model.image.model_kwargs={stem_width:16}", "model.image.model_kwargs"),
])
def test_values_that_would_crash_later_fail_when_the_config_loads(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*must be"):
        load_config(None, [override])


def test_the_old_locked_key_is_read_as_tune_locked_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  image:\n    locked: true\n  text:\n    locked: false\n")
    with caplog.at_level("WARNING"):
        config = load_config(path)
    assert config.model.image.tune == "locked" and config.model.image.locked
    assert config.model.text.tune == "full" and not config.model.text.locked
    assert "model.image.locked is now model.image.tune" in caplog.text
    with pytest.raises(ConfigError, match="model.image.locked must be true or false"):
        load_config(None, ["model.image.locked=sometimes"])


# ------------------------------------------------------------------------- messy configs (issue 26)


@pytest.mark.parametrize("override, key", [
    ("optim.min_lr_ratio=-5", "optim.min_lr_ratio"), ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.betas=[1.5, 0.9]", "optim.betas"), ("optim.betas=[0.9, -0.1]", "optim.betas"),
    ("optim.eps=-1", "optim.eps"), ("optim.eps=0", "optim.eps"),
    ("model.image.lora.rank=0", "model.image.lora.rank"), ("model.text.lora.rank=0", "model.text.lora.rank"),
    ("model.text.lora.alpha=0", "model.text.lora.alpha"), ("model.text.lora.dropout=1", "model.text.lora.dropout"),
])
def test_optimiser_and_adapter_ranges_are_checked_with_the_key_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "=.*must be"):
        load_config(None, [override])


def test_a_deprecated_boolean_key_given_a_list_is_a_config_error_not_a_type_error():
    with pytest.raises(ConfigError, match=r"model.image.locked must be true or false, got \[1\]"):
        load_config(None, ["model.image.locked=[1]"])


def test_an_override_fills_an_empty_section(tmp_path):
    config = load_config(write(tmp_path, "model:\ntrain:\n  epochs: 2\n"), ["model.projection.dim=64"])
    assert config.model.projection.dim == 64 and config.train.epochs == 2


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: .*key 'epochs' appears twice in one section \(lines 2 and 4\)"):
        load_config(write(tmp_path, "train:\n  epochs: 3\n  seed: 1\n  epochs: 5\n"))
    # the same key in two sections is no repeat
    assert load_config(write(tmp_path, "train:\n  seed: 3\ndata:\n  split_seed: 3\n")).train.seed == 3


def test_a_utf16_config_is_read_and_a_binary_one_is_a_config_error(tmp_path):
    path = tmp_path / "windows.yaml"
    path.write_bytes("optim:\n  lr: 1.0e-4\n".encode("utf-16"))  # with its byte-order mark, as Notepad writes it
    assert load_config(path).optim.lr == 1e-4
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"windows.yaml: not UTF-8 text"):
        load_config(path)


# ------------------------------------------------------------- numbers a model cannot train with (issue 38)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=1e309", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.weight_decay=.inf", "optim.weight_decay"), ("distill.weight=.inf", "distill.weight"),
    ("optim.lr=-.inf", "optim.lr"), ("optim.tower_lr=inf", "optim.tower_lr"),
    ("model.image.model_kwargs={drop_rate: .nan}", "model.image.model_kwargs.drop_rate"),
    ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]"), ("optim.lr=" + "1" * 400, "optim.lr"),
])
def test_every_non_finite_number_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("optim.", r"optim\.") + r"=.* is not a finite number"):
        load_config(None, [override])


def test_a_yaml_alias_bomb_is_refused_quickly_without_printing_its_expansion(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]  # 10^8 values expanded
    path = write(tmp_path, "model:\n  image:\n    model_kwargs:\n" + "".join(f"      {line}\n" for line in lines))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 10,000 values") as error:
        load_config(path)
    assert time.perf_counter() - started < 5 and len(str(error.value)) < 500


def test_a_long_value_in_an_error_is_cut_short():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.epochs=[" + ", ".join(["12345"] * 2000) + "]"])
    assert "train.epochs must be int" in str(error.value) and len(str(error.value)) < 300


def dotted_keys(cls=Config, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            keys += dotted_keys(hints[item.name], f"{prefix}{item.name}.")
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


VALUE_TEXT = st.one_of(
    st.sampled_from([".inf", "-.inf", ".nan", "1e309", "-1", "0", "1e-4", "true", "null", "[]", "{}", "[1, 2]",
                     "{a: 1}", "&a [*a]", "'", "\"", "{", "[", "a: b: c", "!!python/object:os.system", "~", "1" * 400,
                     "0x10", "1_000", "2026-12-07", "yes", "é", "\t", "- a"]),
    st.text(max_size=40), st.integers(-10**20, 10**20).map(str), st.floats().map(repr))


@settings(max_examples=1500, deadline=None)
@given(key=st.sampled_from(dotted_keys()) | st.text(max_size=20), value=VALUE_TEXT)
def test_no_set_value_gives_anything_but_a_config_or_a_one_line_config_error(key, value):
    import math

    try:
        config = load_config(None, [f"{key}={value}"])
    except ConfigError as error:
        assert "Traceback" not in str(error) and len(str(error)) < 2000
        return
    sections = (config.optim, config.train, config.distill, config.model)
    floats = [v for section in sections for v in vars(section).values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in floats)


def test_yaml_base_60_numbers_stay_text_and_deep_nesting_is_one_line(tmp_path):
    """Review of issue 38: `train.epochs=1:30` became 90 (YAML 1.1), and 3000 nested brackets a RecursionError."""
    with pytest.raises(ConfigError, match="train.epochs must be int, got '1:30'"):
        load_config(None, ["train.epochs=1:30"])
    assert load_config(None, ["train.epochs=0x10"]).train.epochs == 16  # other YAML numbers as they were
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(ConfigError, match="too deep"):
        load_config(None, [f"model.image.model_kwargs={deep}"])
    with pytest.raises(ConfigError, match="too deep"):
        load_config(write(tmp_path, f"model:\n  image:\n    model_kwargs: {{a: {deep}}}\n"))
    with pytest.raises(ConfigError, match="more than 32 deep"):
        load_config(None, ["model.image.model_kwargs={a: " + "[" * 40 + "]" * 40 + "}"])
    with pytest.raises(ConfigError, match="model.projection.dim=100000000000 must be between 1 and 65536"):
        load_config(None, ["model.projection.dim=100000000000"])


@pytest.mark.parametrize("needs_a_list", ["train.cache_image_features=true", "distill.teacher=some/teacher"])
def test_a_stream_with_what_needs_a_list_of_training_images_is_refused_when_the_config_loads(needs_a_list):
    """It was refused only after the model and the data were built (issue 40's detours)."""
    stream = ["data.dataset=webdataset", "data.shards=x/train-{000000..000001}.tar", "data.epoch_samples=100"]
    with pytest.raises(ConfigError, match="data.dataset='webdataset' cannot be used with train.cache_image_features"):
        load_config(None, [*stream, needs_a_list])
