"""How fast `liteclip serve` answers a query over a large index: draws N distinct small images, indexes them with
a model, starts the app on a local port (uvicorn, in a thread) and times GET /api/search end to end over HTTP,
text encoding and ranking included.

    python -m benchmarks.serve_latency --model-dir model [--images 10000] [--queries 50]

Prints the indexing time and the median / 90th percentile query time in milliseconds. The images go to a temporary
folder (or --folder), never into the repository.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liteclip import ImageSearch, ZeroShotPipeline
from liteclip.search.serve import create_app

QUERIES = ["a red circle", "a blue square on the left", "two shapes: a green star above a yellow triangle",
           "a small purple triangle", "an orange star in the middle"]


def draw_images(folder: Path, count: int, size: int = 48) -> None:
    """`count` distinct pictures: a coloured block on grey, each with its own colour, place and noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{i:06d}.png"
        if path.is_file():
            continue
        pixels = rng.integers(100, 156, (size, size, 3), dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        pixels[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="model")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--folder", type=Path, default=None, help="where to draw the images (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="liteclip-serve-"))
    folder = args.folder or work / "photos"
    draw_images(folder, args.images)
    search = ImageSearch(ZeroShotPipeline(args.model_dir, device="cpu"))
    started = time.perf_counter()
    search.index(folder, work / "photos.index", show_progress=False, num_workers=2)
    print(f"indexed {len(search)} images in {time.perf_counter() - started:.1f} s")
    search.load(work / "photos.index")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(search, work / "photos.index"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    times = []
    for i in range(args.queries + 5):
        query = urllib.parse.quote(QUERIES[i % len(QUERIES)])
        start = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q={query}&k=24") as response:
            response.read()
        if i >= 5:  # the first few warm up the text tower
            times.append(1000 * (time.perf_counter() - start))
    server.should_exit = True
    times.sort()
    print(f"GET /api/search over {len(search)} images, k=24, {len(times)} queries: median "
          f"{statistics.median(times):.1f} ms, 90th percentile {times[int(0.9 * len(times)) - 1]:.1f} ms")


if __name__ == "__main__":
    main()
