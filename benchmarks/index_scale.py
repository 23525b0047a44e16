"""What an index costs as the photo library grows: 10k, 100k and 1M rows with a stand-in encoder, so that the
encoder's own cost does not hide the index's.

    python -m benchmarks.index_scale [--rows 10000 100000 1000000] [--dim 512] [--work DIR]
    python -m benchmarks.index_scale --encode-model model --photos DIR   # real encoding, photos per second

Each library is a folder of N files of a few bytes (1,000 to a folder, named .jpg). The stand-in encoder reads and
hashes each file, as the real one does, and returns a precomputed unit embedding (drawn around 4,096 centres, so
that neighbours exist as they do among photos); its time is the "encoding" time, and everything else `index` does
(listing, stat, hashing, deduplicating, appending, writing the file) is the overhead. Each phase runs in a fresh
process, so peak memory is that phase's own:

- index: a fresh index of N files; then an update (1% of the files deleted, 1% added); then, as the page does while
  `serve --folder` indexes, rankings from another thread while a fresh index of the library runs;
- load and query: the load time, 200 queries (an indexed row plus noise) through ImageSearch's ranking, p50 and
  p99, and the float16 scan's recall@10 against exact float32 search; then an approximate FAISS IVF index built over
  the same rows for comparison (nlist = 4 sqrt(N), nprobe raised until recall@10 >= 0.95), with its build time,
  latency and recall.

The overhead is also given as a fraction of what encoding N photos takes at a given rate (--encode-rate, photos a
second; by default the demo tower's, measured with --encode-model). Memory is the peak resident set of the phase's
process above what it had before the phase, against the float32 embedding matrix (N x D x 4 bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PER_FOLDER = 1000
CENTRES = 4096


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM to the current resident set
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def file_path(folder: Path, number: int) -> Path:
    return folder / f"{number // PER_FOLDER:05d}" / f"{number:08d}.jpg"


def make_library(folder: Path, numbers: range) -> None:
    for number in numbers:
        path = file_path(folder, number)
        if number % PER_FOLDER == 0 or not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%d" % number)


def embeddings_of(numbers: np.ndarray, dim: int) -> np.ndarray:
    """The stand-in's unit embeddings: each file's centre plus noise, a pure function of its number."""
    centres = np.random.default_rng(0).standard_normal((CENTRES, dim), dtype=np.float32)
    noise = np.random.default_rng(int(numbers[0]) + 1).standard_normal((len(numbers), dim), dtype=np.float32)
    vectors = centres[numbers % CENTRES] + 0.6 * noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def stand_in_encoder(dim: int, spent: list[float]):
    import torch

    from liteclip.embedding import EncodedImages

    def encode(model, paths, batch_size, device, progress=None, **kwargs):
        started = time.perf_counter()
        hashes = []
        for path in paths:
            with open(path, "rb") as file:
                hashes.append(hashlib.sha256(file.read()).hexdigest())
        numbers = np.array([int(Path(path).stem) for path in paths])
        embeds = torch.from_numpy(embeddings_of(numbers, dim))
        if progress is not None:
            progress.update(len(paths))
        spent.append(time.perf_counter() - started)
        return EncodedImages(embeds, list(range(len(paths))), [], hashes)

    return encode


def stand_in_search(dim: int, spent: list[float]):
    from liteclip.search import image_search
    from liteclip.search.image_search import ImageSearch

    image_search.encode_decodable_image_files = stand_in_encoder(dim, spent)
    search = ImageSearch(SimpleNamespace(model=None, device="cpu", model_dir=None))
    search._fingerprint = "stand-in-encoder"
    return search


# ------------------------------------------------------------------------------------------------ the phases


def phase_index(work: Path, rows: int, dim: int) -> dict:
    folder, index_path = work / "library", work / "library.index"
    spent: list[float] = []
    search = stand_in_search(dim, spent)
    reset_peak()
    before = rss_mb()
    started = time.perf_counter()
    search.index(folder, index_path, show_progress=False)
    total = time.perf_counter() - started
    figures = {"index_s": total, "encode_s": sum(spent), "index_peak_mb": peak_rss_mb() - before,
               "index_bytes": index_path.stat().st_size}
    # an update: 1% deleted, 1% added
    changed = max(1, rows // 100)
    for number in range(changed):
        file_path(folder, number * 97 % rows).unlink(missing_ok=True)
    make_library(folder, range(rows, rows + changed))
    spent.clear()
    reset_peak()
    before = rss_mb()
    started = time.perf_counter()
    fresh = stand_in_search(dim, spent)
    fresh.index(folder, index_path, show_progress=False)
    figures.update(update_s=time.perf_counter() - started, update_encode_s=sum(spent),
                   update_peak_mb=peak_rss_mb() - before, rows_after_update=len(fresh))
    figures.update(queries_while_indexing(folder, work / "again.index", dim))
    return figures


def queries_while_indexing(folder: Path, index_path: Path, dim: int) -> dict:
    """What the page sees while `serve --folder` indexes: a ranking every 20 ms from another thread, timed."""
    import threading

    import torch

    search = stand_in_search(dim, [])
    worker = threading.Thread(target=search.index, args=(folder, index_path), kwargs={"show_progress": False})
    worker.start()
    times = []
    while worker.is_alive():
        if len(search):
            query = torch.nn.functional.normalize(torch.randn(dim), dim=0)
            started = time.perf_counter()
            search._rank(query, 10)
            times.append(1000 * (time.perf_counter() - started))
        time.sleep(0.02)
    worker.join()
    if not times:
        return {}
    return {"busy_queries": len(times), "busy_p50_ms": float(np.percentile(times, 50)),
            "busy_p99_ms": float(np.percentile(times, 99)), "busy_max_ms": max(times)}


def phase_query(work: Path, rows: int, dim: int, queries: int) -> dict:
    import torch

    from liteclip.search import store
    from liteclip.search.image_search import nearest

    index_path = work / "library.index"
    search = stand_in_search(dim, [])
    reset_peak()
    before = rss_mb()
    started = time.perf_counter()
    search.load(index_path)
    figures = {"load_s": time.perf_counter() - started, "load_peak_mb": peak_rss_mb() - before, "rows": len(search)}
    view = search.view
    rng = np.random.default_rng(1)
    picks = rng.integers(0, view.count, queries)
    targets = view.matrix[picks].float() + 0.05 * torch.randn(queries, view.matrix.shape[1])
    targets = torch.nn.functional.normalize(targets, dim=-1)
    times = []
    for query in targets:
        started = time.perf_counter()
        search._rank(query, 10)  # what `search` and the page run: the scan, the top 10, each hit's file checked
        times.append(1000 * (time.perf_counter() - started))
    figures.update(exact_p50_ms=float(np.percentile(times, 50)), exact_p99_ms=float(np.percentile(times, 99)))

    # float32 truth, from the file itself
    index_file = store.IndexFile.open(index_path)
    truth = np.empty((view.count, view.matrix.shape[1]), np.float32)
    start = 0
    for _, chunk in index_file.chunks():
        truth[start:start + len(chunk.sha256)] = chunk.embeddings
        start += len(chunk.sha256)
    index_file.close()
    exact = [set(torch.from_numpy(truth @ query.numpy()).topk(10).indices.tolist()) for query in targets]
    scanned = [{row for row, _ in nearest(view, query, 10)} for query in targets]
    figures["float16_recall_at_10"] = float(np.mean([len(a & b) / 10 for a, b in zip(exact, scanned)]))
    figures.update(approximate(truth, targets.numpy(), exact))
    return figures


def approximate(truth: np.ndarray, queries: np.ndarray, exact: list[set]) -> dict:
    try:
        import faiss
    except ImportError:
        return {}
    nlist = int(4 * np.sqrt(len(truth)))
    started = time.perf_counter()
    quantizer = faiss.IndexFlatIP(truth.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, truth.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    sample = truth[np.random.default_rng(2).choice(len(truth), min(len(truth), 64 * nlist), replace=False)]
    ivf.train(sample)
    ivf.add(truth)
    built = time.perf_counter() - started
    figures = {"ivf_nlist": nlist, "ivf_build_s": built}
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        times, found = [], []
        for query in queries:
            started = time.perf_counter()
            _, rows = ivf.search(query[None], 10)
            times.append(1000 * (time.perf_counter() - started))
            found.append(set(rows[0].tolist()))
        recall = float(np.mean([len(a & b) / 10 for a, b in zip(exact, found)]))
        figures.update(ivf_nprobe=nprobe, ivf_recall_at_10=recall, ivf_p50_ms=float(np.percentile(times, 50)),
                       ivf_p99_ms=float(np.percentile(times, 99)))
        if recall >= 0.95:
            break
    return figures


# --------------------------------------------------------------------------------------------- real encoding


def encode_rate(model_dir: str, photos: Path, count: int, workers: int) -> tuple[float, str]:
    """Photos a second that `liteclip index` encodes with a real model, on the first `count` photos of a folder."""
    from liteclip import ImageSearch, ZeroShotPipeline
    from liteclip.data.image_folder import list_images

    pipeline = ZeroShotPipeline(model_dir, device="cpu")
    files = list_images(photos)[:count]
    started = time.perf_counter()
    ImageSearch(pipeline).index(files, show_progress=False, num_workers=workers)
    rate = len(files) / (time.perf_counter() - started)
    config = pipeline.model.config.image
    return rate, f"{config.name} at {pipeline.model.data_config['input_size'][-1]} px"


def run_phase(phase: str, work: Path, rows: int, dim: int, queries: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.index_scale", "--phase", phase, "--work", str(work),
               "--rows", str(rows), "--dim", str(dim), "--queries", str(queries)]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {phase} phase at {rows} rows failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None, help="where to make the libraries (default: a temp dir)")
    parser.add_argument("--encode-rate", type=float, default=None,
                        help="photos a second to compare the overhead with (default: measured with --encode-model)")
    parser.add_argument("--encode-model", default=None, help="a model folder whose encoding rate to measure")
    parser.add_argument("--photos", type=Path, default=None, help="photos to measure --encode-model on")
    parser.add_argument("--encode-count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="decode workers for the real encoding")
    parser.add_argument("--phase", choices=["index", "query"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:  # a child process: one phase, its figures as the last line
        rows = args.rows[0]
        figures = (phase_index(args.work, rows, args.dim) if args.phase == "index"
                   else phase_query(args.work, rows, args.dim, args.queries))
        print(json.dumps(figures))
        return

    import torch

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate = args.encode_rate
    if args.encode_model:
        if args.photos is None:
            raise SystemExit("--encode-model needs --photos DIR (a folder of photos to encode)")
        rate, what = encode_rate(args.encode_model, args.photos, args.encode_count, args.workers)
        print(f"real encoding: {rate:.1f} photos/s with {what} ({args.encode_count} photos of {args.photos}, "
              f"{args.workers} decode workers)")
    for rows in args.rows:
        work = Path(tempfile.mkdtemp(prefix=f"liteclip-index-{rows}-", dir=args.work))
        try:
            started = time.perf_counter()
            make_library(work / "library", range(rows))
            made = time.perf_counter() - started
            figures = run_phase("index", work, rows, args.dim, args.queries)
            figures.update(run_phase("query", work, rows, args.dim, args.queries))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report(rows, args.dim, made, figures, rate)


def report(rows: int, dim: int, made: float, f: dict, rate: float | None) -> None:
    matrix_mb = rows * dim * 4 / 2**20
    overhead = f["index_s"] - f["encode_s"]
    print(f"\n{rows:,} rows of {dim} (float32 matrix {matrix_mb:,.0f} MiB; library made in {made:.0f} s)")
    print(f"  index:  {f['index_s']:.1f} s, of which stand-in encoding {f['encode_s']:.1f} s: overhead "
          f"{overhead:.1f} s = {1e3 * overhead / rows:.3f} ms a photo")
    if rate:
        print(f"          overhead / encoding at {rate:.0f} photos/s: {100 * overhead / (rows / rate):.1f}%")
    print(f"          peak memory {f['index_peak_mb']:,.0f} MiB = {f['index_peak_mb'] / matrix_mb:.2f}x the matrix; "
          f"on disk {f['index_bytes'] / 2**20:,.0f} MiB")
    update_overhead = f["update_s"] - f["update_encode_s"]
    print(f"  update (1% deleted, 1% added): {f['update_s']:.1f} s, overhead {update_overhead:.1f} s, peak memory "
          f"{f['update_peak_mb']:,.0f} MiB = {f['update_peak_mb'] / matrix_mb:.2f}x; {f['rows_after_update']:,} rows")
    if "busy_queries" in f:
        print(f"  queries while a fresh index of the library runs in another thread ({f['busy_queries']}): p50 "
              f"{f['busy_p50_ms']:.1f} ms, p99 {f['busy_p99_ms']:.1f} ms, max {f['busy_max_ms']:.1f} ms")
    print(f"  load:   {f['load_s']:.2f} s, peak memory {f['load_peak_mb']:,.0f} MiB = "
          f"{f['load_peak_mb'] / matrix_mb:.2f}x the matrix")
    print(f"  query (float16 scan, top 10): p50 {f['exact_p50_ms']:.1f} ms, p99 {f['exact_p99_ms']:.1f} ms; "
          f"recall@10 against float32 {f['float16_recall_at_10']:.3f}")
    if "ivf_nprobe" in f:
        print(f"  FAISS IVF-Flat (nlist {f['ivf_nlist']}, built in {f['ivf_build_s']:.1f} s), nprobe "
              f"{f['ivf_nprobe']}: p50 {f['ivf_p50_ms']:.2f} ms, p99 {f['ivf_p99_ms']:.2f} ms, recall@10 "
              f"{f['ivf_recall_at_10']:.3f}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
