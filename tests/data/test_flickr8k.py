import json

import pytest

from liteclip.data.captions import BadRowPolicy, DataError
from liteclip.data.flickr8k import read_flickr8k
from tests.data.conftest import CAPTIONS_PER_IMAGE, caption_for, image_names, write_original


def names_of(split):
    return {image.image_path.name for image in split}


def assert_disjoint_cover(splits, expected_names):
    seen = [names_of(splits[s]) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(expected_names)


def test_kaggle_layout_counts_and_seeded_image_split(kaggle_root):
    splits = read_flickr8k(kaggle_root, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 4, 2]
    assert_disjoint_cover(splits, image_names(20))
    image = splits["train"][0]
    assert image.captions == [caption_for(image.image_path.name, j) for j in range(CAPTIONS_PER_IMAGE)]
    again = read_flickr8k(kaggle_root, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert names_of(again["val"]) == names_of(splits["val"])
    other_seed = read_flickr8k(kaggle_root, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert names_of(other_seed["val"]) != names_of(splits["val"])


def test_original_layout_uses_official_split_files(original_root):
    splits = read_flickr8k(original_root)
    names = image_names(20)
    assert [image.image_path.name for image in splits["train"]] == names[:14]
    assert names_of(splits["val"]) == set(names[14:17])
    assert names_of(splits["test"]) == set(names[17:])
    assert all(len(image.captions) == CAPTIONS_PER_IMAGE for split in splits.values() for image in split)


def test_original_layout_without_split_files_splits_by_image(tmp_path):
    root = write_original(tmp_path / "f", with_splits=False)
    splits = read_flickr8k(root, val_fraction=0.25, test_fraction=0.25)
    assert_disjoint_cover(splits, image_names(20))


def test_karpathy_split_file_wins(original_root):
    names = image_names(20)
    entries = [{"filename": n, "split": "test" if i < 5 else "restval" if i < 8 else "train" if i < 17 else "val"}
               for i, n in enumerate(names)]
    (original_root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    splits = read_flickr8k(original_root)
    assert names_of(splits["test"]) == set(names[:5])
    assert names_of(splits["train"]) == set(names[5:17])  # restval joins train
    assert names_of(splits["val"]) == set(names[17:])


def test_split_file_naming_unknown_image_is_reported(original_root):
    split_file = original_root / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    split_file.write_text(split_file.read_text() + "9999_ghost.jpg\n")
    with pytest.raises(DataError, match="Flickr_8k.testImages.txt:4: split test names unknown image '9999_ghost.jpg'"):
        read_flickr8k(original_root)
    policy = BadRowPolicy("skip")
    splits = read_flickr8k(original_root, policy=policy)
    assert len(splits["test"]) == 3 and len(policy.rows) == 1


def test_missing_root_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="liteclip.data download flickr8k"):
        read_flickr8k(tmp_path / "absent")


def test_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="neither Flickr8K layout"):
        read_flickr8k(tmp_path / "x")
