"""`segflow segment --gpus` end to end, against the same command on one CUDA device and on the CPU.

    python benchmarks/gpu_segment.py [--size 4096] [--record gpu-segment]

Issue 12 asks that ``--gpus`` (dask-cuda: one worker per GPU, window tasks
pinned there) run end to end on a GPU machine.  This makes the demo's scene
(``storage.samples.make_scene``, 4-band uint16) at ``--size``², the demo's
land-cover U-Net with random weights, and runs ``python -m flows segment``
three ways, each in a fresh process: ``--gpus``; ``--device cuda`` on the
default local cluster; ``--device cpu`` (skipped with ``--no-cpu``).  It
reports wall and compute seconds (the provenance's statistics) and how many
labels the GPU runs share with each other and with the CPU's (fp32 on every
device; cuDNN and the CPU may still break a near-tie differently).  Without a
CUDA device, or without dask-cuda, it says so and exits 0 (nothing to
measure).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def run(scene: Path, model: Path, out: Path, *extra: str) -> dict:
    """One `segflow segment` in a fresh process: wall seconds, the provenance's statistics, the labels."""
    import rasterio

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(scene), "--model", str(model), "--out",
                           str(out), "--no-zarr", *extra], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"segflow segment {' '.join(extra)} failed (rc {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    stats = json.loads((out / f"{scene.stem}.provenance.json").read_text())["statistics"]
    with rasterio.open(out / f"{scene.stem}.tif") as src:
        labels = src.read(1)
    return {"wall": wall, "stats": stats, "labels": labels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU run (slow on a big scene)")
    report.add_argument(ap)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device on this machine")
        return 0
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        print("skipped: dask-cuda is not installed (--gpus needs it)")
        return 0
    from segmentation.demo_cards import landcover_card
    from segmentation.modeldir import build_module, save_model
    from storage.samples import make_scene

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scene, _ = make_scene(folder / "scene.tif", size=(args.size, args.size), seed=7)
        card = landcover_card().model_copy(update={"name": "landcover-2d-random"})
        torch.manual_seed(0)
        model = save_model(folder / "model", card, build_module(card)).path
        ways = {"`--gpus` (dask-cuda, one worker per GPU)": ("--gpus", "--device", "cuda"),
                "`--device cuda` (default local cluster)": ("--device", "cuda")}
        if not args.no_cpu:
            ways["`--device cpu`"] = ("--device", "cpu")
        results = {name: run(scene, model, folder / f"out{i}", *extra) for i, (name, extra) in enumerate(ways.items())}
    names = list(results)
    gpus = results[names[0]]["labels"]
    lines = [f"Scene {args.size}² × 4 uint16 (the demo's generator), the demo's land-cover U-Net (ROI 128²) with "
             f"random weights, fp32 (`exact`), `segflow segment --no-zarr`, one fresh process per way; "
             f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name()}.", "",
             "| way | wall s | compute s (provenance) | inference s | windows | labels equal to `--gpus`'s |",
             "|---|---|---|---|---|---|"]
    for name in names:
        r = results[name]
        s = r["stats"]
        lines.append(f"| {name} | {r['wall']:.1f} | {s.get('total_seconds', float('nan')):.2f} | "
                     f"{s.get('inference_seconds', float('nan')):.2f} | {s.get('windows_evaluated', '-')} | "
                     f"{np.mean(r['labels'] == gpus):.6f} |")
    report.publish("\n".join(lines), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
