import csv

import numpy as np
import pytest
import torch

from liteclip.data.captions import (BadRowPolicy, CaptionCollator, CaptionedImage, DataError, ImageCaptionDataset,
                                    read_caption_csv)
from liteclip.data.flickr8k import read_flickr8k
from tests.conftest import draw_image


def write_csv(path, rows, header=("path", "text", "split"), delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def csv_root(tmp_path):
    root = tmp_path / "own"
    for i in range(6):
        draw_image(root / "img" / f"{i}.png", (40 * i, 0, 0))
    return root


def read(root, csv_name, split_column="split", policy=None, **kw):
    return read_caption_csv(root / csv_name, root, "path", "text", split_column, 0.2, 0.2, 0, policy or BadRowPolicy(),
                            **kw)


def test_csv_with_split_column(csv_root):
    rows = [(f"img/{i}.png", f"a caption {i}", "train" if i < 4 else "validation" if i == 4 else "test")
            for i in range(6)]
    rows.append(("img/0.png", "another caption for 0", "train"))
    write_csv(csv_root / "caps.csv", rows)
    splits = read(csv_root, "caps.csv")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert splits["train"][0].captions == ["a caption 0", "another caption for 0"]


def test_tsv_without_split_column_is_split_by_image(csv_root):
    rows = [(f"img/{i}.png", f"caption {i}.{j}", "") for i in range(6) for j in range(3)]
    write_csv(csv_root / "caps.tsv", rows, delimiter="\t")
    splits = read(csv_root, "caps.tsv", split_column=None)
    names = [{im.image_path.name for im in splits[s]} for s in ("train", "val", "test")]
    assert sum(len(n) for n in names) == 6 and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert all(len(im.captions) == 3 for s in splits.values() for im in s)


@pytest.mark.parametrize("row, reason", [
    (("img/missing.png", "a caption", "train"), "missing image"),
    (("img/0.png", "   ", "train"), "empty or non-text caption"),
    (("../outside.png", "a caption", "train"), "escapes the image root"),
    (("img/1.png", "a caption", "holdout"), "is not train, val or test"),
])
def test_bad_rows_name_file_line_and_reason(csv_root, row, reason):
    (csv_root.parent / "outside.png").write_bytes(b"not read")
    write_csv(csv_root / "caps.csv", [("img/2.png", "fine", "train"), row])
    with pytest.raises(DataError, match=rf"caps.csv:3: .*{reason}"):
        read(csv_root, "caps.csv")
    policy = BadRowPolicy("skip")
    splits = read(csv_root, "caps.csv", policy=policy)
    assert len(policy.rows) == 1 and reason in policy.rows[0].reason
    assert [im.image_path.name for im in splits["train"]] == ["2.png"]


def test_missing_columns_are_named(csv_root):
    write_csv(csv_root / "caps.csv", [("img/0.png", "x")], header=("file", "text"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['path', 'split'\]; the header has \['file', 'text'\]"):
        read(csv_root, "caps.csv")


def test_one_caption_per_image_per_epoch_vs_all_pairs(kaggle_root):
    images = read_flickr8k(kaggle_root, val_fraction=0.0, test_fraction=0.0)["train"]
    identity = lambda pixels: torch.from_numpy(pixels.copy())
    one = ImageCaptionDataset(images, identity, "one")
    every = ImageCaptionDataset(images, identity, "all")
    assert len(one) == 20 and len(every) == 100
    torch.manual_seed(0)
    drawn = {one[0]["caption"] for _ in range(40)}
    assert len(drawn) > 1 and drawn <= set(images[0].captions)  # random, and always one of its own captions
    assert [every[i]["caption"] for i in range(5)] == images[0].captions
    first = ImageCaptionDataset(images, identity, "first")
    assert {first[3]["caption"] for _ in range(5)} == {images[3].captions[0]}
    assert one[0]["pixel_values"].shape == (40, 40, 3)


def test_undecodable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    dataset = ImageCaptionDataset([CaptionedImage(bad, ["x"])], lambda p: p, "first")
    with pytest.raises(DataError, match="bad.jpg: cannot decode image"):
        dataset[0]


def test_collate_pads_to_the_longest_caption(tiny_text_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_text_dir))
    collate = CaptionCollator(tokenizer, max_length=8)
    samples = [{"pixel_values": torch.zeros(3, 4, 4), "caption": c, "image_index": i}
               for i, c in enumerate(["a cat", "a small red circle on the left"])]
    batch = collate(samples)
    lengths = [len(tokenizer(c)["input_ids"]) for c in ("a cat", "a small red circle on the left")]
    assert batch["input_ids"].shape == (2, min(max(lengths), 8))
    assert batch["attention_mask"][0].sum().item() == lengths[0]
    assert batch["attention_mask"][1].sum().item() == min(lengths[1], 8)  # truncated at max_length
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["image_index"].tolist() == [0, 1]
    short = collate(samples[:1])
    assert short["input_ids"].shape == (1, lengths[0])  # dynamic: not padded to max_length


def test_loader_with_workers(kaggle_root, tiny_text_dir):
    from transformers import AutoTokenizer

    from liteclip.config import DataConfig
    from liteclip.data import build_dataloaders

    config = DataConfig(dataset="flickr8k", root=str(kaggle_root), batch_size=4, num_workers=2)
    data_config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
                   "interpolation": "bilinear"}
    loaders = build_dataloaders(config, AutoTokenizer.from_pretrained(str(tiny_text_dir)), 16, data_config)
    batches = list(loaders["train"])
    assert len(batches) == 4 and batches[0]["pixel_values"].shape == (4, 3, 32, 32)
    indices = torch.cat([b["image_index"] for b in batches]).tolist()
    assert len(set(indices)) == 16  # drop_last over 16 training images; no image twice in an epoch
    assert np.isfinite(batches[0]["pixel_values"].numpy()).all()


def test_missing_data_root_is_named(tmp_path):
    from liteclip.config import DataConfig
    from liteclip.data import load_splits

    with pytest.raises(DataError, match=r"data.root=.*nowhere does not exist; `python -m liteclip.data download"):
        load_splits(DataConfig(dataset="flickr8k", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="data.root=.*nowhere does not exist; point data.root"):
        load_splits(DataConfig(dataset="csv", root=str(tmp_path / "nowhere"), captions_file="c.csv"))


def test_seeded_sampler_gives_every_sample_its_own_seed_per_epoch():
    from torch.utils.data import DistributedSampler

    from liteclip.data.captions import SeededSampler

    dataset = list(range(10))
    ranks = [SeededSampler(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0), 7)
             for r in range(2)]
    seeds = [dict(iter(sampler)) for sampler in ranks]
    assert not set(seeds[0]) & set(seeds[1])  # DDP shards stay disjoint
    assert len(set(seeds[0].values()) | set(seeds[1].values())) == 10  # no two samples share a seed
    epoch0 = dict(iter(ranks[0]))
    ranks[0].set_epoch(1)
    epoch1 = dict(iter(ranks[0]))
    assert epoch0 == seeds[0] and epoch1 != epoch0


def test_captions_that_are_not_utf8_name_file_and_line_and_an_encoding_reads_them(tmp_path):
    draw_image(tmp_path / "a.jpg", (1, 2, 3))
    draw_image(tmp_path / "b.jpg", (4, 5, 6))
    (tmp_path / "c.csv").write_bytes("image,caption\na.jpg,a red square\nb.jpg,un caf\u00e9 noir\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"c\.csv:3: not valid utf-8 text .*data\.encoding"):
        read_caption_csv(tmp_path / "c.csv", tmp_path, "image", "caption", None, 0.0, 0.0, 0, BadRowPolicy())
    splits = read_caption_csv(tmp_path / "c.csv", tmp_path, "image", "caption", None, 0.0, 0.0, 0, BadRowPolicy(),
                              encoding="latin-1")
    assert sorted(c for image in splits["train"] for c in image.captions) == ["a red square", "un caf\u00e9 noir"]


def test_flickr8k_captions_in_another_encoding(kaggle_root):
    captions = kaggle_root / "captions.txt"
    captions.write_bytes(captions.read_text().replace("caption 0 of", "caption 0 \u00f6f", 1).encode("cp1252"))
    with pytest.raises(DataError, match=r"captions\.txt:\d+: not valid utf-8"):
        read_flickr8k(kaggle_root)
    splits = read_flickr8k(kaggle_root, encoding="cp1252")
    assert any("\u00f6f" in c for split in splits.values() for image in split for c in image.captions)


def test_a_training_sample_that_does_not_decode_is_replaced_by_the_next_and_reported(tmp_path):
    images = [CaptionedImage(draw_image(tmp_path / f"{i}.png", (40 * i, 50, 60)), [f"caption {i}"]) for i in range(3)]
    (tmp_path / "1.png").write_bytes(b"broken")
    transform = lambda array: torch.from_numpy(array.astype(np.float32))  # noqa: E731
    dataset = ImageCaptionDataset(images, transform, "first", skip_undecodable=True)
    sample = dataset[1]
    assert sample["image_index"] == 2 and sample["caption"] == "caption 2"
    assert sample["skipped"] == [(str(tmp_path / "1.png"), sample["skipped"][0][1])]
    assert "cannot decode" in sample["skipped"][0][1] and "skipped" not in dataset[0]
    with pytest.raises(DataError, match="1.png: cannot decode"):
        ImageCaptionDataset(images, transform, "first")[1]


def test_kept_decoded_images_are_read_from_disk_once_and_give_the_same_augmented_samples(tmp_path, monkeypatch):
    from liteclip.data import captions as captions_module
    from liteclip.data.transforms import train_transform

    images = [CaptionedImage(draw_image(tmp_path / f"{i}.png", (40 * i, 50, 60)), [f"caption {i}"]) for i in range(3)]
    transform = train_transform({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    reads = []
    load_image = captions_module.load_image
    monkeypatch.setattr(captions_module, "load_image", lambda *args: reads.append(args[0]) or load_image(*args))
    kept = ImageCaptionDataset(images, transform, "first", keep_decoded=True)
    plain = ImageCaptionDataset(images, transform, "first")
    for epoch in range(2):
        for index in range(3):
            key = (index, 1000 * epoch + index)  # the sampler's per-sample seed: other crops every epoch
            torch.testing.assert_close(kept[key]["pixel_values"], plain[key]["pixel_values"])
    assert reads.count(images[0].image_path) == 1 + 2  # kept: the first epoch only; plain: both epochs
    assert not kept.decoded[0].flags.writeable  # a transform writing in place would change every later epoch


# ------------------------------------------------------------------------- messy captions files (issue 26)


def test_an_unquoted_comma_in_the_last_column_stays_part_of_the_caption(csv_root):
    (csv_root / "caps.csv").write_text("path,text\nimg/0.png,an orange circle in the middle, with a comma\n"
                                       "img/1.png,\"a quoted, caption\"\n")
    splits = read_caption_csv(csv_root / "caps.csv", csv_root, "path", "text", None, 0, 0, 0, BadRowPolicy())
    captions = {im.image_path.name: im.captions for im in splits["train"]}
    assert captions == {"0.png": ["an orange circle in the middle, with a comma"], "1.png": ["a quoted, caption"]}


def test_extra_fields_before_the_last_column_are_a_bad_row_with_its_line(csv_root):
    # the caption is not the last column, so the extra field could belong to either: reported, not guessed
    write_csv(csv_root / "caps.csv", [("img/2.png", "fine", "train")])
    with open(csv_root / "caps.csv", "a") as handle:
        handle.write("img/0.png,an orange circle, with a comma,train\n")
    with pytest.raises(DataError, match=r"caps.csv:3: 4 fields where the header has 3; quote captions"):
        read(csv_root, "caps.csv")


def test_line_numbers_count_lines_not_records_after_a_quoted_newline(csv_root):
    (csv_root / "caps.csv").write_text('path,text,split\nimg/0.png,"a caption\nover two lines",train\n'
                                       "img/missing.png,a caption,train\n")
    with pytest.raises(DataError, match=r"caps.csv:4: missing image"):
        read(csv_root, "caps.csv")


def test_a_folder_named_like_an_image_is_called_a_folder(csv_root):
    (csv_root / "img" / "folder.png").mkdir()
    write_csv(csv_root / "caps.csv", [("img/folder.png", "a caption", "train")])
    with pytest.raises(DataError, match=r"caps.csv:2: .*folder.png is a folder, not an image file"):
        read(csv_root, "caps.csv")


def test_an_image_root_that_is_a_symlink_and_images_linked_in_from_elsewhere_are_read(csv_root, tmp_path):
    (tmp_path / "linked_root").symlink_to(csv_root, target_is_directory=True)
    elsewhere = draw_image(tmp_path / "library" / "photo.png", (0, 200, 0))
    (csv_root / "img" / "linked.png").symlink_to(elsewhere)
    write_csv(csv_root / "caps.csv", [("img/0.png", "zero", "train"), ("img/linked.png", "linked", "train")])
    root = tmp_path / "linked_root"
    splits = read_caption_csv(root / "caps.csv", root, "path", "text", "split", 0, 0, 0, BadRowPolicy())
    assert [im.captions for im in splits["train"]] == [["zero"], ["linked"]]
    write_csv(csv_root / "caps.csv", [("img/../../library/photo.png", "escapes", "train")])
    with pytest.raises(DataError, match="escapes the image root"):
        read_caption_csv(root / "caps.csv", root, "path", "text", "split", 0, 0, 0, BadRowPolicy())


def test_a_csv_with_a_header_and_no_rows_is_a_bad_file(csv_root):
    write_csv(csv_root / "caps.csv", [])
    with pytest.raises(DataError, match=r"caps.csv:1: no caption rows below the header"):
        read(csv_root, "caps.csv")


def test_one_image_written_three_ways_is_one_image_in_one_split(csv_root):
    """Issue 38: `img/a.jpg`, `./img/a.jpg` and `img//a.jpg` were three images, split across train and val."""
    rows = [(f"img/{i}.png", f"caption {i}") for i in range(6)]
    rows += [("./img/0.png", "a second caption of 0"), ("img//0.png", "a third caption of 0")]
    write_csv(csv_root / "caps.csv", rows, header=("path", "text"))
    splits = read(csv_root, "caps.csv", split_column=None)
    images = [image for split in splits.values() for image in split]
    assert len(images) == 6
    zero = [image for image in images if image.image_path.name == "0.png"]
    assert len(zero) == 1 and sorted(zero[0].captions) == ["a second caption of 0", "a third caption of 0",
                                                           "caption 0"]
    rows = [(f"img/{i}.png", f"caption {i}", "train") for i in range(6)] + [("./img/0.png", "again", "test")]
    write_csv(csv_root / "split.csv", rows)
    splits = read(csv_root, "split.csv")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 0, 0]  # the first split named wins, once


def test_an_unclosed_quote_or_a_huge_field_is_one_error_at_its_line(csv_root):
    (csv_root / "caps.csv").write_text("path,text\nimg/0.png,fine\nimg/1.png,\"" + "x" * 200_000 + "\nimg/2.png,ok\n")
    with pytest.raises(DataError, match=r"caps.csv:3: the record starting here cannot be read .*never closed"):
        read(csv_root, "caps.csv", split_column=None)


def test_an_image_name_the_file_system_cannot_look_up_is_a_bad_row_not_a_crash(csv_root):
    rows = [(f"img/{i}.png", f"caption {i}") for i in range(6)] + [("x" * 5000 + ".png", "a long name")]
    write_csv(csv_root / "caps.csv", rows, header=("path", "text"))
    policy = BadRowPolicy("collect")
    splits = read(csv_root, "caps.csv", split_column=None, policy=policy)
    assert sum(map(len, splits.values())) == 6
    assert [row.line for row in policy.rows] == [8]
    assert "cannot be looked up (File name too long)" in policy.rows[0].reason


def test_a_quote_left_open_that_swallows_the_rows_after_it_is_a_bad_row_not_one_long_caption(csv_root):
    """Review of issue 38: an unclosed quote silently swallowed the rows after it into one caption."""
    (csv_root / "caps.csv").write_text('path,text\nimg/3.png,"a caption\nover two lines"\nimg/0.png,"a red square\n'
                                       'img/1.png,a green square\nimg/2.png,a blue square\n')
    policy = BadRowPolicy("collect")
    splits = read(csv_root, "caps.csv", split_column=None, policy=policy)
    images = {image.image_path.name: image.captions for split in splits.values() for image in split}
    assert [row.line for row in policy.rows] == [4]
    assert "never closed and swallows the 2 line(s)" in policy.rows[0].reason
    assert images == {"3.png": ["a caption\nover two lines"]}  # a caption over two lines is still a caption
