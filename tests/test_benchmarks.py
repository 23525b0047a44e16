"""The benchmark scripts run end to end on tiny settings and print figures in their documented form (their numbers
are for benchmarks/README.md, not for assertions)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_module(*argv: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO / "benchmarks").glob("[a-z]*.py")))
def test_every_benchmark_runs_by_its_path_as_well_as_with_dash_m(script, tmp_path):
    """`python benchmarks/x.py` is what people try first; the other tests here run each with -m."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")


def test_train_throughput_prints_every_variant_and_ends_with_the_speedup():
    lines = run_module("benchmarks.train_throughput", "--image-model", "test_convnext3", "--image-size", "32",
                       "--batch-size", "4", "--steps", "1", "--without", "keep_cpu_memory",
                       "--workers", "1")  # each variant's process starts a loader worker of its own
    row = re.compile(r"(?P<name>\S.*?)\s{2,}(?P<rate>[\d.]+)\s+(?P<step>[\d.]+)\s+(?P<wait>[\d.]+)%"
                     r"\s+[\d.]+ GiB (RSS|GPU)")
    rows = {m["name"]: m for m in map(row.fullmatch, lines) if m}
    assert set(rows) == {"reference", "liteclip", "liteclip without keep_cpu_memory", "open_clip"}
    assert all(float(m["rate"]) > 0 and float(m["step"]) > 0 for m in rows.values())
    assert re.fullmatch(r"speedup_vs_open_clip=\d+\.\d{3}", lines[-2])
    assert re.fullmatch(r"speedup_vs_reference=\d+\.\d{3}", lines[-1])
    assert float(lines[-1].split("=")[1]) > 0


def test_train_throughput_builds_the_configs_tower_with_its_timm_keyword_arguments(tiny_text_dir):
    from benchmarks.train_throughput import DEFAULTS, REFERENCE, Settings, Variant

    settings = Settings(str(tiny_text_dir), "test_convnext3", 32, 4, 1, 0, {"dims": [8, 16, 24, 40]})
    for levers in (REFERENCE, DEFAULTS):
        variant = Variant(levers, settings, torch.device("cpu"))
        assert variant.model.image_encoder.num_features == 40  # test_convnext3's own: 128


def test_image_tower_reports_throughput_and_fraction_of_peak():
    lines = run_module("benchmarks.image_tower", "--model", "test_convnext3", "--image-size", "32", "--batch-size",
                       "4", "--repeats", "1")
    figures = [line for line in lines if line.startswith(("inference", "training"))]
    assert len(figures) == 2
    for line in figures:
        # a GPU of known kind adds "% of vendor peak" after the three
        rate, tflops, fraction = (float(x) for x in re.findall(r"([\d.e+-]+)\s?(?:images/s|TFLOP/s|% of)", line)[:3])
        assert rate > 0 and tflops > 0 and fraction > 0


def test_demo_ablation_prints_a_row_per_variant(tmp_path):
    tiny = ["data.demo_num_images=40", "data.demo_image_size=32", "data.batch_size=8", "data.num_workers=0",
            "model.image.name=test_convnext3", "model.image.model_kwargs={}", "model.image.image_size=32",
            "train.epochs=1", "train.max_steps=2"]
    lines = run_module("benchmarks.demo_ablation", "--variants", "clip", "siglip", "--out", str(tmp_path), "--set",
                       *tiny)
    table = [line for line in lines if line.startswith("| ") and not line.startswith(("| variant", "| ---"))]
    assert [row.split(" | ")[0] for row in table] == ["| clip", "| siglip"]
    for row in table:
        cells = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
        assert len(cells) == 4 and all(0 <= value <= 100 for value in cells[:3]) and cells[3] > 0


def test_inference_reports_predict_memory_for_each_list_length():
    lines = run_module("benchmarks.inference", "--skip-latency", "--predict-counts", "10", "30", "--image-size", "32",
                       "--batch-size", "4")
    rows = [re.fullmatch(r"predict over\s+([\d,]+) images: peak RSS\s+([\d.]+) GiB,\s+(-?[\d.]+) MiB above the "
                         r"loaded model,\s+([\d.]+) images/s", line) for line in lines if line.startswith("predict over")]
    assert [int(m[1]) for m in rows] == [10, 30]
    assert all(float(m[2]) > 0 and float(m[4]) > 0 for m in rows)
    assert re.fullmatch(r"memory_growth_largest_vs_smallest_mib=-?\d+\.\d", lines[-1])


def test_data_throughput_compares_shards_with_loose_files():
    lines = run_module("benchmarks.data_throughput", "--num-images", "8", "--image-size", "32", "--prepared-size",
                       "48")
    rates = {line.split(":")[0]: float(line.split(":")[1].split()[0]) for line in lines if "per worker" in line}
    assert len(rates) == 4 and all(rate > 0 for rate in rates.values())
    assert re.fullmatch(r"shards_vs_files=\d+\.\d\d", lines[-1])


def test_locked_tower_epoch_times_the_epoch_and_its_evaluation(tmp_path):
    captions = tmp_path / "captions.txt"  # Flickr8K's own layout: a header, then image,caption rows
    captions.write_text("image,caption\n" + "".join(f"{i}.jpg,a dog runs {'far ' * (i % 9)}on the grass .\n"
                                                    for i in range(30)))
    lines = run_module("benchmarks.locked_tower_epoch", "--pairs", "64", "--eval-images", "8", "--batch-size", "16",
                       "--text-shape", "minilm-l3", "--image-model", "test_convnext3", "--captions", str(captions),
                       "--length-groups", "2")
    assert "minilm-l3 shape (3 layers, 384 wide)" in lines[0]
    assert f"captions {captions}, length groups 2" in lines[0]
    from benchmarks.locked_tower_epoch import caption_texts

    texts = caption_texts(captions, 40)  # the caption column alone, every one of them, then repeated
    assert set(texts) == {f"a dog runs {'far ' * (i % 9)}on the grass ." for i in range(30)}
    train, evaluation, recall = (float(x) for x in re.findall(
        r"train ([\d.]+) s .*evaluation ([\d.]+) s \(mean recall ([\d.]+)", lines[1])[0])
    assert train > 0 and evaluation >= 0 and 0 <= recall <= 100  # 8 images evaluate in a few milliseconds
    assert re.fullmatch(r"epoch_seconds=\d+\.\d", lines[-1])


def test_kernels_reports_the_fp32_peaks_each_workload_and_auto_precision():
    lines = run_module("benchmarks.kernels", "--repeats", "1", "--scale", "1")
    speedups = [float(m[1]) for m in (re.search(r"speedup=(\d+\.\d\d)$", line) for line in lines) if m]
    assert len(speedups) == 3 and all(value > 0 for value in speedups)  # the matmul, the MLP block, the conv
    assert lines[0].startswith("CPU: ")
    assert re.fullmatch(r"fp32_matmul_gflops=\d+", lines[1]) and re.fullmatch(r"fp32_conv_gflops=\d+", lines[2])
    assert int(lines[1].split("=")[1]) > 0 and int(lines[2].split("=")[1]) > 0
    assert re.fullmatch(r"auto_precision=(bf16|fp32)", lines[-1])


def test_demo_phases_times_every_phase_and_projects_the_run():
    lines = run_module("benchmarks.demo_phases", "--epochs", "2", "--set", "data.demo_num_images=40",
                       "data.batch_size=8", "model.image.image_size=32", "data.demo_image_size=32", "train.epochs=3",
                       "train.precision=fp32")
    phases = dict(re.fullmatch(r"(.+?)\s{2,}(-?[\d.]+)", line).groups() for line in lines[2:11])
    assert list(phases) == ["data generation (once)", "decode + augment + collate (an epoch)",
                            "forward (towers + loss) (an epoch)", "backward (an epoch)", "optimiser (an epoch)",
                            "evaluation after the epoch (an epoch)", "test + zero-shot evaluation",
                            "first epoch beyond a later one", "export (save_pretrained)"]
    seconds = {name: float(value) for name, value in phases.items()}
    assert all(value > 0 for name, value in seconds.items() if name != "first epoch beyond a later one")
    assert re.search(r"of the fp32 matmul peak", lines[-2])
    per_epoch = sum(value for name, value in seconds.items() if name.endswith("(an epoch)"))
    once = sum(value for name, value in seconds.items() if not name.endswith("(an epoch)"))
    projected = float(re.fullmatch(r"projected_run_s=([\d.]+)", lines[-1])[1])
    assert projected == pytest.approx(once + 3 * per_epoch, abs=0.2)  # rounding of the printed phases


def test_flickr8k_trains_liteclip_and_open_clip_on_the_same_towers_and_prints_one_table(tmp_path, tiny_text_dir):
    import timm
    from safetensors.torch import save_file

    from tests.data.conftest import write_kaggle

    root = write_kaggle(tmp_path / "flickr8k", count=20)
    weights = tmp_path / "tower.safetensors"
    save_file(timm.create_model("test_convnext3", num_classes=0).state_dict(), str(weights))
    lines = run_module("benchmarks.flickr8k", "--root", str(root), "--image-tower", "test_convnext3",
                       "--image-weights", str(weights), "--text-tower", str(tiny_text_dir), "--epochs", "1",
                       "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "out"), "--no-progress",
                       "--open-clip-lr", "0.001",
                       "--set", "model.image.image_size=32", "model.text.max_length=16", "optim.warmup_steps=1")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines if line.startswith("| ")}
    assert set(rows) >= {"liteclip", "open_clip, lr 0.001"}  # open_clip at its own rate, named in its row
    for name in ("liteclip", "open_clip, lr 0.001"):
        recalls = [float(cell) for cell in rows[name][:12]]
        assert all(0 <= value <= 100 for value in recalls) and re.match(r" [\d.]+ \(", rows[name][12])


def test_serve_latency_indexes_drawn_images_and_times_queries_over_http(model_dir, tmp_path):
    lines = run_module("benchmarks.serve_latency", "--model-dir", str(model_dir), "--images", "20", "--queries", "3",
                       "--folder", str(tmp_path / "photos"))
    assert re.fullmatch(r"indexed 20 images in [\d.]+ s", lines[-2])
    assert re.fullmatch(r"GET /api/search over 20 images, k=24, 3 queries: median [\d.]+ ms, 90th percentile "
                        r"[\d.]+ ms", lines[-1])


def test_draft_decoding_compares_the_features_of_reduced_and_whole_decodes(tmp_path):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    tower = timm.create_model("test_convnext3", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp_path / "tower.safetensors"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    lines = run_module("benchmarks.draft_decoding", "--images", str(photos), "--count", "3", "--size", "640x480",
                       "--image-tower", "test_convnext3", "--image-weights", str(tmp_path / "tower.safetensors"))
    assert lines[0].startswith("3 photos from")
    measured = [line for line in lines if "feature cosine, draft against whole decode" in line]
    assert [line.split(":")[0] for line in measured] == ["smooth (bicubic), draft x1", "smooth (bicubic), draft x2",
                                                          "sharp (nearest), draft x1", "sharp (nearest), draft x2"]
    for line in measured:
        median = float(re.search(r"median ([\d.]+)", line)[1])
        assert -1.0 <= median <= 1.0 + 1e-6 and re.search(r"\(([\d.]+)x faster\)", line)


def test_index_scale_prints_overhead_memory_load_latency_and_recall(model_dir, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200)).save(photos / f"{i}.jpg")
    lines = run_module("benchmarks.index_scale", "--rows", "3000", "--dim", "16", "--queries", "20", "--work",
                       str(tmp_path), "--encode-model", str(model_dir), "--photos", str(photos), "--encode-count", "6",
                       "--workers", "0")
    text = "\n".join(lines)
    assert re.search(r"real encoding: [\d.]+ photos/s with \S+ at \d+ px", text)
    assert re.search(r"3,000 rows of 16 .*\n  index: +[\d.]+ s, of which stand-in encoding [\d.]+ s: overhead", text)
    assert re.search(r"overhead / encoding at \d+ photos/s: [\d.]+%", text)
    assert re.search(r"update \(1% deleted, 1% added\): .* 3,000 rows", text)  # 30 gone, 30 new
    assert re.search(r"query \(float16 scan, top 10\): p50 [\d.]+ ms, p99 [\d.]+ ms; recall@10 against float32 "
                     r"(0\.9\d\d|1\.000)", text)
    assert re.search(r"FAISS IVF-Flat \(nlist 219, built in [\d.]+ s\), nprobe \d+: .* recall@10 [01]\.\d{3}", text)
    assert not list(tmp_path.glob("liteclip-index-*"))  # the library and its index are removed afterwards
