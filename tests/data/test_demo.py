import json

from liteclip.data.demo import HELD_OUT, all_combinations, ensure_demo_data, zero_shot_items
from liteclip.data.flickr8k import read_flickr8k


def test_demo_is_deterministic_and_loads_through_the_flickr8k_reader(tmp_path):
    first = ensure_demo_data(tmp_path / "a", num_images=60, image_size=32, seed=5)
    second = ensure_demo_data(tmp_path / "b", num_images=60, image_size=32, seed=5)
    other = ensure_demo_data(tmp_path / "c", num_images=60, image_size=32, seed=6)
    names = sorted(p.name for p in (first / "Images").iterdir())
    assert len(names) == 60
    assert all((first / "Images" / n).read_bytes() == (second / "Images" / n).read_bytes() for n in names)
    assert (first / "captions.txt").read_text() == (second / "captions.txt").read_text()
    for name in ("tokenizer.json", "config.json"):  # the demo's own text tower is identical too
        assert (first / "text_encoder" / name).read_bytes() == (second / "text_encoder" / name).read_bytes()
    assert (first / "captions.txt").read_text() != (other / "captions.txt").read_text()
    splits = read_flickr8k(first)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [48, 6, 6]
    assert all(len(image.captions) >= 5 for split in splits.values() for image in split)


def test_held_out_combinations_never_in_train_or_val(tmp_path):
    root = ensure_demo_data(tmp_path / "d", num_images=400, image_size=32, seed=0)
    annotations = json.loads((root / "annotations.json").read_text())
    splits = read_flickr8k(root)
    held = {tuple(c) for c in json.loads((root / "held_out.json").read_text())["held_out"]}
    assert held == set(HELD_OUT)
    for split in ("train", "val"):
        for image in splits[split]:
            assert not {tuple(o) for o in annotations[image.image_path.name]} & held
            for caption in image.captions:
                assert not any(f"{c} {s}" in caption for c, s in held)
    items = zero_shot_items(root)
    assert any(item.group == "held_out" for item in items) and any(item.group == "seen" for item in items)
    classes = all_combinations()
    assert all((classes[item.label] in held) == (item.group == "held_out") for item in items)


def test_regeneration_is_skipped_when_settings_match(tmp_path):
    root = ensure_demo_data(tmp_path / "d", num_images=20, image_size=32, seed=0)
    stamp = (root / "captions.txt").stat().st_mtime_ns
    ensure_demo_data(tmp_path / "d", num_images=20, image_size=32, seed=0)
    assert (root / "captions.txt").stat().st_mtime_ns == stamp
    ensure_demo_data(tmp_path / "d", num_images=30, image_size=32, seed=0)
    assert len(list((root / "Images").iterdir())) == 30


def test_regeneration_replaces_only_the_generators_files(tmp_path):
    root = ensure_demo_data(tmp_path / "d", num_images=20, image_size=32, seed=0)
    (root / "NOTES.md").write_text("my notes")
    (root / "Images" / "my_photo.png").write_bytes(b"mine")
    (root / ".liteclip_cache").mkdir()
    (root / ".liteclip_cache" / "features.safetensors").write_bytes(b"cached")
    ensure_demo_data(tmp_path / "d", num_images=30, image_size=32, seed=0)
    assert (root / "NOTES.md").read_text() == "my notes"
    assert (root / "Images" / "my_photo.png").read_bytes() == b"mine"
    assert (root / ".liteclip_cache" / "features.safetensors").read_bytes() == b"cached"
    assert len(list((root / "Images").glob("shape_*.png"))) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or previous copy left


def test_evaluation_never_generates_demo_data(tmp_path, monkeypatch, model_dir, capsys):
    from liteclip.cli import main

    monkeypatch.chdir(tmp_path)  # the model's config says data.root=data/demo, relative to where it trained
    assert main(["eval-retrieval", "--model-dir", str(model_dir)]) == 2
    assert "holds no demo data" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_evaluation_reads_a_demo_folder_made_with_other_settings_as_it_is_and_never_regenerates_it(tmp_path):
    """A retention set or eval-retrieval pointed at a demo folder generated with other settings (48 images at
    32 px, not the defaults) scores that folder and leaves every file as it was."""
    from liteclip.config import DataConfig, parse_retention_set
    from liteclip.data import load_splits
    from liteclip.data.demo import ensure_demo_data
    from liteclip.evaluation import retention_task
    from tests.user_files import assert_user_files_untouched, snapshot

    root = ensure_demo_data(tmp_path / "small", num_images=48, image_size=32)
    before = snapshot(root)
    splits = load_splits(DataConfig(dataset="demo", root=str(root)), generate=False)  # default settings differ
    assert sum(len(split) for split in splits.values()) == 48
    assert len(retention_task(parse_retention_set(f"demo:{root}@test"))) == len(splits["test"])
    assert_user_files_untouched(root, before, exactly=True)
