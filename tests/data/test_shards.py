"""Webdataset shards: the shard command, the stream's split across ranks and workers, bad samples, resume, and
training from shards (one process, and two processes under gloo)."""

import copy
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from liteclip import build_model
from liteclip.train.run_directory import load_checkpoint
from liteclip.cli import main
from liteclip.data import build_dataloaders, build_datasets, load_splits
from liteclip.data.captions import CaptionCollator, CaptionedImage
from liteclip.data.shards import ShardStream, expand_shards, write_shards
from liteclip.errors import DataError
from liteclip.train.preemption import StepCheckpoints, TrainingStopped
from liteclip.train.loop import contrastive_step, fit
from tests.conftest import draw_image
from tests.train.test_loop import FP32, grads_of, join_cpu_process_group, read_rows, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def png_bytes(color, size=24):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_numbered_shards(directory, count, per_shard, broken=()):
    """Shards written with webdataset's own TarWriter in img2dataset's layout (jpg/png + txt + json); caption i is
    "sample i", so every sample can be told apart. `broken` maps a sample number to what is wrong with it."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(0, count, per_shard):
        with wds.TarWriter(str(directory / f"s-{shard // per_shard:04d}.tar")) as writer:
            for i in range(shard, min(shard + per_shard, count)):
                sample = {"__key__": f"{i:06d}", "png": png_bytes((i * 5 % 255, 80, 160)), "txt": f"sample {i}",
                          "json": json.dumps({"caption": f"sample {i}", "width": 24, "height": 24})}
                problem = dict(broken).get(i)
                if problem == "undecodable":
                    sample["png"] = b"\x89PNG not really"
                elif problem == "no caption":
                    del sample["txt"], sample["json"]
                elif problem == "no image":
                    del sample["png"]
                writer.write(sample)
    pattern = f"{directory}/s-{{0000..{(count - 1) // per_shard:04d}}}.tar"
    return pattern


def identity(pixels, seed=None):
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def captions_of_epoch(stream, num_workers=0, batch_size=4):
    """The captions of one epoch of a stream through a DataLoader, batch by batch, with each batch's position."""
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=lambda samples: samples)
    return [([s["caption"] for s in batch], batch[-1]["stream_position"]) for batch in loader]


def test_every_reader_of_every_rank_reads_its_own_shards_and_together_they_read_the_epoch_once(tmp_path):
    urls = expand_shards(write_numbered_shards(tmp_path, 48, 6))
    assert len(urls) == 8
    seen = []
    for rank in range(2):
        stream = ShardStream(urls, 48, 4, identity, shuffle_buffer=5, seed=3, rank=rank, world_size=2)
        batches = captions_of_epoch(stream, num_workers=2)
        assert len(batches) == len(stream) // 4 == 6  # 48 samples / (2 ranks x batch 4)
        seen += [caption for captions, _ in batches for caption in captions]
    assert sorted(seen) == sorted(f"sample {i}" for i in range(48))  # disjoint, and their union is the epoch
    stream.set_epoch(1)
    again = [c for captions, _ in captions_of_epoch(stream, num_workers=2) for c in captions]
    assert set(again) != set(seen[24:])  # another epoch, another shard order


def test_a_reader_with_too_few_samples_takes_another_pass_so_every_rank_makes_the_same_steps(tmp_path):
    urls = expand_shards(write_numbered_shards(tmp_path, 20, 5))
    stream = ShardStream(urls, 64, 4, identity, shuffle_buffer=3, seed=0, rank=0, world_size=1)
    captions = [c for batch, _ in captions_of_epoch(stream) for c in batch]
    assert len(captions) == 64 and set(captions) == {f"sample {i}" for i in range(20)}


def test_fewer_shards_than_readers_is_an_error_naming_both_counts(tmp_path):
    urls = expand_shards(write_numbered_shards(tmp_path, 8, 4))
    stream = ShardStream(urls, 8, 2, identity, world_size=2)
    with pytest.raises(DataError, match=r"2 shard\(s\) for 4 readers .*data.num_workers"):
        captions_of_epoch(stream, num_workers=2)


def test_missing_shards_are_named(tmp_path):
    write_numbered_shards(tmp_path, 8, 4)
    with pytest.raises(DataError, match=r"data.shards: 1 of 3 shards do not exist, first .*s-0002.tar"):
        expand_shards(f"{tmp_path}/s-{{0000..0002}}.tar")


def test_bad_samples_are_left_out_and_reported_with_the_next_good_one(tmp_path):
    broken = {3: "undecodable", 6: "no caption", 12: "no image"}  # each followed by a good sample in its shard
    urls = expand_shards(write_numbered_shards(tmp_path, 16, 8, broken))
    stream = ShardStream(urls, 13, 13, identity, shuffle_buffer=1)
    (batch,) = torch.utils.data.DataLoader(stream, batch_size=13, collate_fn=lambda samples: samples)
    assert sorted(s["caption"] for s in batch) == sorted(f"sample {i}" for i in range(16) if i not in broken)
    reported = {name.rsplit(":", 1)[1]: reason for s in batch for name, reason in s.get("skipped", ())}
    assert set(reported) == {"000003", "000006", "000012"}
    assert "cannot decode image" in reported["000003"]
    assert "no caption" in reported["000006"] and "no image" in reported["000012"]


def test_shards_without_one_usable_sample_stop_with_an_error_instead_of_looping(tmp_path):
    urls = expand_shards(write_numbered_shards(tmp_path, 4, 2, {i: "no image" for i in range(4)}))
    stream = ShardStream(urls, 4, 2, identity)
    with pytest.raises(DataError, match="without one usable sample"):
        captions_of_epoch(stream, batch_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_makes_exactly_the_remaining_batches_of_the_samples_it_had_not_yielded(tmp_path,
                                                                                             num_workers):
    urls = expand_shards(write_numbered_shards(tmp_path, 96, 6))  # 16 shards of 6
    full = ShardStream(urls, 96, 4, identity, shuffle_buffer=8, seed=1)
    full.set_epoch(2)
    uninterrupted = captions_of_epoch(full, num_workers=num_workers)
    consumed = 9  # the checkpoint was written after 9 batches
    positions = dict(position for _, position in uninterrupted[:consumed])
    resumed = ShardStream(urls, 96, 4, identity, shuffle_buffer=8, seed=1)
    resumed.set_epoch(2, consumed, positions)
    rest = captions_of_epoch(resumed, num_workers=num_workers)
    assert len(rest) == len(uninterrupted) - consumed == 15
    before = [c for captions, _ in uninterrupted[:consumed] for c in captions]
    after = [c for captions, _ in rest for c in captions]
    assert sorted(before + after) == sorted(c for captions, _ in uninterrupted for c in captions)  # none twice


def test_a_resumed_reader_opens_none_of_the_shards_it_had_finished(tmp_path, monkeypatch):
    urls = expand_shards(write_numbered_shards(tmp_path, 60, 5))
    stream = ShardStream(urls, 60, 4, identity, shuffle_buffer=3, seed=2)
    first = captions_of_epoch(stream)
    order = stream.reader_shards(0, 1)
    _, (reader, position) = first[7]  # after 8 batches: 32 of 60 samples yielded
    opened = []
    real = wds.tarfile_samples
    monkeypatch.setattr(wds, "tarfile_samples", lambda src, **kw: real(opened.extend(s["url"] for s in src) or
                                                                       [{"url": s["url"]} for s in src], **kw))
    stream.set_epoch(0, 8, {reader: position})
    captions_of_epoch(stream)
    assert position["next"] >= 3 and opened[0] == order[position["next"]]  # some shards finished, not reopened
    assert not set(opened) & set(order[:position["next"]])


def test_the_shard_command_writes_each_split_of_a_dataset_and_prints_the_config(tmp_path, capsys):
    config = tiny_config(tmp_path)
    splits = load_splits(config.data)  # the demo data of the tiny config, 48 images
    assert main(["data", "shard", str(tmp_path / "demo"), str(tmp_path / "shards"), "--dataset", "demo",
                 "--shard-size", "10"]) == 0
    out = capsys.readouterr().out
    assert f"data.shards: {tmp_path}/shards/train-{{000000..000003}}.tar" in out
    assert f"(data.epoch_samples: {len(splits['train'])})" in out and "data.val_shards:" in out
    for split, images in splits.items():
        shards = sorted((tmp_path / "shards").glob(f"{split}-*.tar"))
        assert len(shards) == (len(images) + 9) // 10
        samples = list(wds.tarfile_samples([{"url": str(url)} for url in shards]))
        assert len(samples) == len(images)
        by_source = {json.loads(s["json"])["source"]: s for s in samples}
        for image in images:
            sample = by_source[image.image_path.name]
            assert sample["png"] == image.image_path.read_bytes()  # the file's bytes, not a re-encoding
            assert sample["txt"].decode() == image.captions[0]
            assert json.loads(sample["json"])["captions"] == image.captions
    assert not list((tmp_path / "shards").glob(".*partial"))


def test_writing_fewer_shards_than_last_time_removes_the_stale_ones(tmp_path):
    images = [CaptionedImage(draw_image(tmp_path / f"{i}.png", (i, 9, 9)), [f"c{i}"]) for i in range(6)]
    write_shards(images, tmp_path / "out", "train", 2)
    pattern, count = write_shards(images, tmp_path / "out", "train", 3)
    assert count == 6 and pattern.endswith("train-{000000..000001}.tar")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]


def stream_overrides(tmp_path, pattern, *extra):
    return ("data.dataset=webdataset", f"data.shards={pattern}", "data.shuffle_buffer=8", *extra)


def test_training_streams_from_shards_the_shard_command_wrote_and_evaluates_on_the_demo(tmp_path):
    load_splits(tiny_config(tmp_path).data)
    main(["data", "shard", str(tmp_path / "demo"), str(tmp_path / "shards"), "--dataset", "demo", "--shard-size", "5",
          "--split", "train"])
    config = tiny_config(tmp_path, *stream_overrides(tmp_path, f"{tmp_path}/shards/train-{{000000..000007}}.tar",
                                                     "data.epoch_samples=32", "data.eval_dataset=demo",
                                                     "data.num_workers=2"))
    final = fit(config, show_progress=False)
    steps = [int(r["step"]) for r in read_rows(tmp_path / "run" / "metrics.csv")]
    assert steps == list(range(1, 9))  # 32 samples / batch 8 = 4 steps per epoch, 2 epochs
    assert {"test_mean_recall", "zero_shot_top1", "zero_shot_held_out_top1"} <= set(final)
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_training_from_img2dataset_style_shards_with_evaluation_shards_and_broken_samples(tmp_path, caplog):
    load_splits(tiny_config(tmp_path).data)  # the tiny text tower lives in the demo folder
    broken = {2: "undecodable", 5: "no caption", 7: "no image"}  # reported with the good sample after them
    train = write_numbered_shards(tmp_path / "train", 43, 10, broken)  # 40 good samples: the epoch reads them all
    val = write_numbered_shards(tmp_path / "val", 8, 8)
    config = tiny_config(tmp_path, *stream_overrides(tmp_path, train, "data.epoch_samples=40",
                                                     f"data.val_shards={val}", f"data.test_shards={val}",
                                                     "train.epochs=1", "data.shuffle_buffer=1"))
    with caplog.at_level("WARNING"):
        final = fit(config, show_progress=False)
    epoch = read_rows(tmp_path / "run" / "epochs.csv")[0]
    assert int(epoch["skipped_images"]) == 3
    for number in ("000002", "000005", "000007"):
        assert caplog.text.count(f"s-0000.tar:{number}") == 1  # each bad sample named once
    assert "mean_recall" in epoch and "test_mean_recall" in final
    unpacked = list((tmp_path / "demo" / ".liteclip_cache").glob("shards_*/captions.json"))
    assert len(unpacked) == 1 and len(json.loads(unpacked[0].read_text())) == 8  # val and test share the shards


def test_a_stream_run_stopped_inside_an_epoch_resumes_with_the_steps_it_had_left(tmp_path, monkeypatch):
    load_splits(tiny_config(tmp_path).data)
    shards = write_numbered_shards(tmp_path / "train", 48, 6)
    overrides = stream_overrides(tmp_path, shards, "data.epoch_samples=48", "data.eval_dataset=demo",
                                 "data.num_workers=2")
    real_check = StepCheckpoints.check
    steps = {"n": 0}

    def stop_after_step_4(self):
        steps["n"] += 1
        return (True, True) if steps["n"] == 4 else real_check(self)

    monkeypatch.setattr(StepCheckpoints, "check", stop_after_step_4)
    with pytest.raises(TrainingStopped):
        fit(tiny_config(tmp_path, *overrides), show_progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["epoch_step"] == 4 and set(checkpoint["stream_shards"]) == {"0:0", "0:1"}
    assert all(position["next"] >= 0 for position in checkpoint["stream_shards"].values())
    monkeypatch.setattr(StepCheckpoints, "check", real_check)
    epochs_set = []
    real_set_epoch = ShardStream.set_epoch
    monkeypatch.setattr(ShardStream, "set_epoch", lambda self, *args: epochs_set.append(copy.deepcopy(args)) or
                        real_set_epoch(self, *args))
    fit(tiny_config(tmp_path, *overrides), resume="auto", show_progress=False)
    assert epochs_set == [(0, 4, checkpoint["stream_shards"]), (1, 0, {})]  # the stream goes on where it stood
    steps = [int(r["step"]) for r in read_rows(tmp_path / "run" / "metrics.csv")]
    assert steps == list(range(1, 13))  # 6 steps per epoch, 2 epochs: none missing, none repeated
    assert [int(r["epoch"]) for r in read_rows(tmp_path / "run" / "epochs.csv")] == [1, 2]


# ------------------------------------------------------------------------------------------ two processes


def _stream_ddp_worker(rank, world_size, port, config_path, out_dir):
    from liteclip import distributed

    config, model = join_cpu_process_group(rank, world_size, port, config_path)
    datasets = build_datasets(config.data, model.data_config, load_splits(config.data), 0, rank, world_size)
    loader = build_dataloaders(config.data, model.tokenizer, 16, model.data_config, datasets, 0, rank,
                               world_size)["train"]
    collate = loader.collate_fn  # keeps each batch's caption texts too, to check what each rank saw
    loader.collate_fn = lambda samples: {**collate(samples), "captions": [s["caption"] for s in samples]}
    batches = list(loader)
    first = {k: batches[0][k] for k in ("pixel_values", "input_ids", "attention_mask")}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss = contrastive_step(ddp, [first], FP32, None)
    captions = [caption for batch in batches for caption in batch["captions"]]
    torch.save({"loss": loss, "grads": grads_of(model), "first": first, "captions": captions},
               Path(out_dir) / f"rank{rank}.pt")
    distributed.cleanup()


def test_two_processes_stream_disjoint_halves_of_the_epoch_and_match_one_process_with_both_batches(tmp_path):
    load_splits(tiny_config(tmp_path).data)
    shards = write_numbered_shards(tmp_path / "train", 32, 4)
    config = tiny_config(tmp_path, *stream_overrides(tmp_path, shards, "data.epoch_samples=32",
                                                     "data.eval_dataset=demo", "data.batch_size=4"))
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    mp.spawn(_stream_ddp_worker, args=(2, 29700 + os.getpid() % 200, str(tmp_path / "config.yaml"), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    seen = [set(r["captions"]) for r in ranks]
    assert all(len(r["captions"]) == 16 for r in ranks)  # 32 samples / 2 ranks, 4 batches of 4 each
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {f"sample {i}" for i in range(32)}

    length = max(r["first"]["input_ids"].shape[1] for r in ranks)
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))
    both = {k: torch.cat([r["first"][k] if k == "pixel_values" else pad(r["first"][k]) for r in ranks])
            for k in ranks[0]["first"]}
    torch.manual_seed(0)
    reference = build_model(config.model).eval()
    loss = contrastive_step(reference, [both], FP32, None)
    torch.testing.assert_close(ranks[0]["loss"], loss, atol=1e-5, rtol=1e-5)
    expected = grads_of(reference)
    for rank in ranks:
        assert rank["grads"].keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(rank["grads"][name], expected[name], atol=2e-5, rtol=1e-3, msg=name)


def test_collator_keeps_the_latest_stream_position(tiny_text_dir):
    from transformers import AutoTokenizer

    collate = CaptionCollator(AutoTokenizer.from_pretrained(tiny_text_dir), 16)
    samples = [{"pixel_values": torch.zeros(3, 2, 2), "caption": "a", "image_index": -1,
               } for _ in range(2)]
    samples[-1]["stream_position"] = ("0:1", {"next": 4, "emitted": {}})
    assert collate(samples)["stream_position"] == ("0:1", {"next": 4, "emitted": {}})


def test_tar_written_by_the_shard_command_is_a_plain_tar(tmp_path):
    images = [CaptionedImage(draw_image(tmp_path / "a.png", (1, 2, 3)), ["one", "two"])]
    pattern, _ = write_shards(images, tmp_path / "out", "val", 4)
    with tarfile.open(pattern) as archive:
        assert sorted(archive.getnames()) == ["000000000.json", "000000000.png", "000000000.txt"]


def test_data_check_names_every_sample_training_would_skip_and_every_empty_shard(tmp_path, capsys):
    broken = {2: "undecodable", 5: "no caption", 13: "no image"}
    pattern = write_numbered_shards(tmp_path / "train", 20, 10, broken)
    with wds.TarWriter(str(tmp_path / "train" / "s-0002.tar")):
        pass  # a shard that holds nothing
    assert main(["data", "check", pattern.replace("0001}", "0002}")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    first, second, empty = (f"{tmp_path / 'train' / name}: " for name in ("s-0000.tar", "s-0001.tar", "s-0002.tar"))
    assert lines[:-1] == [first + "sample 000002: image does not decode: cannot decode image (not a format PIL "
                                  "recognises)",
                          first + "sample 000005: no caption (a txt file, or json 'caption' / 'captions')",
                          second + "sample 000013: no image (jpg, jpeg, png, webp) in the sample",
                          empty + "no samples in the shard"]
    assert lines[-1].startswith("4 bad row(s)")
    assert main(["data", "check", write_numbered_shards(tmp_path / "clean", 12, 6)]) == 0
    assert "no problems found" in capsys.readouterr().out
