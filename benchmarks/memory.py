"""Peak resident memory of a whole `segflow segment` run (client + Dask workers) against image size.

    .venv/bin/python benchmarks/memory.py [--sizes 8192 16384 32768] [--workers 2]

For each size it generates a 3-band uint8 GeoTIFF (tiled, random pixels),
writes a small random-weight U-Net model directory, runs `segflow segment` in a
subprocess, and samples the RSS of that process and all its children (the
Dask nanny and worker processes) every 0.2 s. It prints the peak beside what
MONAI's `sliding_window_inference` would need to hold for the same image: the
input as float32, a (classes, H, W) float32 output buffer and a (1, H, W)
count map.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

CLASSES = 4


def make_raster(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(1, 255, (3, 1024, 1024), dtype=np.uint8)  # repeated: generation stays fast
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), nodata=0, tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="YES") as dst:
        for y in range(0, size, 1024):
            for x in range(0, size, 1024):
                dst.write(np.roll(tile, (x + y) // 1024, axis=2), window=Window(x, y, 1024, 1024))


def make_model(path: Path) -> None:
    import torch

    from segmentation.card import ModelCard
    from segmentation.modeldir import build_module, save_model

    card = ModelCard.model_validate({
        "name": "memory-bench", "architecture": {"name": "unet", "kwargs": {
            "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0}},
        "input": {"spatial_dims": 2, "channels": 3, "normalization": {"mode": "scale", "scale": [1 / 255]}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(CLASSES)],
        "inference": {"roi": [256, 256], "overlap": 0.25, "batch_size": 8}})
    torch.manual_seed(0)
    save_model(path, card, build_module(card))


def role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "prefect" in cmd and "server" in cmd:
        return "prefect server"
    if "multiprocessing" in cmd or "spawn" in cmd:
        return "dask worker"
    if "flows" in cmd:
        return "client"
    return "other"


def tree_rss(proc: psutil.Process) -> tuple[int, dict[str, int]]:
    """Total RSS of the tree, and the largest single process of each role."""
    total, roles = 0, {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
            kind = role(p)
        except psutil.Error:
            continue
        total += rss
        roles[kind] = max(roles.get(kind, 0), rss)
    return total, roles


def run_sampled(cmd: list[str]) -> tuple[int, str, float, int, dict[str, int]]:
    """Run ``cmd`` from the repository root, sampling the RSS of its process tree every 0.2 s.

    Returns (exit code, combined output, wall seconds, peak RSS in bytes, the largest process of each kind
    at that peak).
    """
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    ps = psutil.Process(proc.pid)
    peak, at_peak = 0, {}
    while proc.poll() is None:
        total, roles = tree_rss(ps)
        if total > peak:
            peak, at_peak = total, roles
        time.sleep(0.2)
    wall = time.perf_counter() - t
    return proc.returncode, proc.stdout.read() if proc.stdout else "", wall, peak, at_peak


def run(size: int, workers: int | None, tmp: Path, model: Path) -> dict:
    src = tmp / f"in{size}.tif"
    t = time.perf_counter()
    make_raster(src, size)
    gen = time.perf_counter() - t
    cmd = [sys.executable, "-m", "flows", "segment", str(src), "--model", str(model), "--out", str(tmp / "out"),
           "--precision", "fast", "--no-zarr"] + (["--workers", str(workers)] if workers else [])
    t = time.perf_counter()
    rc, out, _, peak, at_peak = run_sampled(cmd)
    if rc != 0:
        raise SystemExit(f"segflow failed for {size}:\n{out}")
    monai = size * size * (3 + CLASSES + 1) * 4
    src.unlink()
    return {"size": size, "peak_gb": peak / 1e9, "roles": {k: round(v / 1e9, 2) for k, v in at_peak.items()}, "monai_gb": monai / 1e9, "seconds": time.perf_counter() - t,
            "generate_s": gen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: segflow's)")
    report.add_argument(ap)
    args = ap.parse_args()
    lines = ["| image | peak RSS, whole process tree (GB) | largest process of each kind at that peak (GB) "
             "| MONAI would hold (GB) | segment wall s |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model)
        for size in args.sizes:
            r = run(size, args.workers, Path(tmp), model)
            roles = ", ".join(f"{k} {v}" for k, v in sorted(r["roles"].items()))
            lines.append(f"| {size}×{size}×3 uint8 | {r['peak_gb']:.2f} | {roles} | {r['monai_gb']:.1f} | "
                         f"{r['seconds']:.0f} |")
            print(lines[-1], flush=True)
            results.append(r)
    first, last = results[0], results[-1]
    layout = f"{args.workers} worker processes" if args.workers else "segflow's default cluster"
    notes = [f"`segflow segment --precision fast --no-zarr` with {layout}; small U-Net (8, 16, 32), "
             f"{CLASSES} classes, ROI 256², chunks 1024². RSS is sampled every 0.2 s over the whole process tree "
             "(CLI client, Dask nanny and workers, Prefect's temporary server). \"MONAI would hold\" is the input "
             "as float32 plus (classes + 1) float32 image-sized buffers.", "", *lines, ""]
    if len(results) > 1:
        growth = (last["size"] / first["size"]) ** 2
        notes.append(f"- The image grows {growth:.0f}× from {first['size']}² to {last['size']}²; peak memory grows "
                     f"{last['peak_gb'] / first['peak_gb']:.2f}×.")
    notes.append(f"- Peak at {last['size']}²: **{last['peak_gb']:.2f} GB** (goal ≤ 2.5 GB: "
                 f"{'met' if last['peak_gb'] <= 2.5 else 'missed by %.2f GB' % (last['peak_gb'] - 2.5)}); "
                 f"MONAI would hold {last['monai_gb']:.1f} GB.")
    body = "\n".join(notes)
    if args.record:
        report.record(args.record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
