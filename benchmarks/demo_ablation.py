"""The demo main job under each training recipe liteclip offers, one after another, with one table at the end.

    python -m benchmarks.demo_ablation                    # every variant, the full demo recipe (1.5 min each, AMX)
    python -m benchmarks.demo_ablation --set train.epochs=10       # the weight average needs the longer schedule
    python -m benchmarks.demo_ablation --variants clip siglip --set train.epochs=4

Each variant is `python train.py --config configs/demo.yaml --set ...` in its own run and model directory under
--out; the demo data is generated once and shared. Prints seen and held-out zero-shot top-1, test mean recall and
wall time per variant. Run it alone: two trainings at once on 2 cores are several times slower each.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SIGLIP = ["loss.name=siglip", "model.logit_scale_init=2.302585", "model.logit_bias_init=-10"]
VARIANTS: dict[str, list[str]] = {
    "clip": [],
    "siglip": SIGLIP,
    "clip+ema": ["train.ema_decay=0.99"],  # 259 steps in the demo: a 0.999 average would lag most of the run
    "siglip+ema": SIGLIP + ["train.ema_decay=0.99"],
    "clip, lora text tower": ["model.text.tune=lora", "model.text.lora.rank=16", "model.text.lora.alpha=32"],
    # about a quarter of the image tower's FLOPs (17.2 against 61.1 GFLOP a step): for CPUs slower than the demo's
    "clip, half-width tower": ["model.image.model_kwargs={channels: [32, 64, 128, 256], stem_width: 16}"],
}


def run_variant(name: str, extra: list[str], out: Path, common: list[str]) -> dict[str, str]:
    slug = name.replace(" ", "").replace(",", "_").replace("+", "_")
    command = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"), "--no-progress",
               "--set", f"data.root={out / 'demo'}", f"model.text.name={out / 'demo' / 'text_encoder'}",
               f"train.output_dir={out / slug / 'run'}", f"train.model_dir={out / slug / 'model'}", *common, *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    with open(out / slug / "run" / "final_metrics.csv", newline="") as handle:
        metrics = {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)}
    return {"variant": name, "seen_top1": f"{metrics['zero_shot_seen_top1']:.1f}",
            "held_out_top1": f"{metrics['zero_shot_held_out_top1']:.1f}",
            "test_mean_recall": f"{metrics['test_mean_recall']:.1f}", "wall_s": f"{seconds:.0f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name], out, args.set))
        print("  ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    print("\n| variant | seen zero-shot top-1 % | held-out top-1 % | test mean recall % | wall time s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['seen_top1']} | {row['held_out_top1']} | {row['test_mean_recall']} | "
              f"{row['wall_s']} |")


if __name__ == "__main__":
    main()
