"""Peak resident memory of a whole `segflow segment` run (client + Dask workers) against image size.

    .venv/bin/python benchmarks/memory.py [--sizes 8192 16384 32768] [--workers 2]
    .venv/bin/python benchmarks/memory.py --api [--sizes 8192 16384 32768] [--probabilities]

``--api`` measures the Python API instead, as a new user would call it (issue
12): ``segmentation.predict(da.from_zarr(z).astype("float32") / 255, net,
roi=(256, 256), overlap=0.25, precision="fast", probabilities=False)`` with
``.to_zarr(...)`` on dask's default (threaded) scheduler, one process per size,
over a 3-band uint8 zarr store (chunks 1024²) and a random-weight MONAI U-Net
(8, 16, 32).  With ``--probabilities`` the same call keeps ``predict``'s
default, ``probabilities=True``, and writes the float32 probabilities.

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


def make_zarr(path: Path, size: int) -> None:
    import zarr

    tile = np.random.default_rng(0).integers(1, 255, (3, 1024, 1024), dtype=np.uint8)
    z = zarr.create_array(str(path), shape=(3, size, size), chunks=(3, 1024, 1024), dtype="uint8", overwrite=True)
    for y in range(0, size, 1024):
        for x in range(0, size, 1024):
            z[:, y:y + 1024, x:x + 1024] = np.roll(tile, (x + y) // 1024, axis=2)


def api_child(size: int, image: Path, out: Path, probabilities: bool = False) -> None:
    """The user's call, in this process (the parent samples its RSS)."""
    import dask.array as da
    import torch
    import zarr
    from monai.networks.nets import UNet

    import segmentation

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=CLASSES, channels=(8, 16, 32), strides=(2, 2)).eval()
    z = zarr.open_array(str(image), mode="r")
    t = time.perf_counter()
    segmentation.predict(da.from_zarr(z).astype("float32") / 255, net, roi=(256, 256), overlap=0.25,
                         precision="fast", probabilities=probabilities).to_zarr(str(out), overwrite=True)
    print(f"seconds {time.perf_counter() - t:.1f}")


def api_main(sizes: list[int], record: str | None, probabilities: bool = False) -> int:
    lines = ["| image | peak RSS (GB) | predict + to_zarr s |", "|---|---|---|"]
    print("\n".join(lines), flush=True)
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            image, out = Path(tmp) / f"img{size}.zarr", Path(tmp) / f"out{size}.zarr"
            make_zarr(image, size)
            rc, text, wall, peak, _ = run_sampled([sys.executable, str(Path(__file__).resolve()), "--api-child",
                                                   str(size), str(image), str(out)]
                                                  + (["--probabilities"] if probabilities else []))
            if rc != 0:
                raise SystemExit(f"the API run failed for {size}:\n{text}")
            seconds = float(text.strip().splitlines()[-1].split()[-1])
            peaks.append((size, peak / 1e9))
            lines.append(f"| {size}×{size}×3 uint8 | {peak / 1e9:.2f} | {seconds:.0f} |")
            print(lines[-1], flush=True)
            for p in (image, out):
                import shutil

                shutil.rmtree(p, ignore_errors=True)
    notes = ["`segmentation.predict(da.from_zarr(z).astype(\"float32\") / 255, net, roi=(256, 256), overlap=0.25, "
             f"precision=\"fast\", probabilities={probabilities}).to_zarr(...)` on dask's default threaded "
             "scheduler, one process per size; MONAI U-Net (8, 16, 32), random weights, 4 classes; the zarr store's "
             "chunks are 1024². RSS is the process's, sampled every 0.2 s."
             + (" The output is the float32 probabilities (16 bytes a pixel), the API's default." if probabilities
                else ""), "", *lines, ""]
    (lo, p_lo), (hi, p_hi) = peaks[0], peaks[-1]
    if len(peaks) > 1:
        notes.append(f"- The image grows {(hi / lo) ** 2:.0f}× from {lo}² to {hi}²; peak memory grows "
                     f"{p_hi / p_lo:.2f}×.")
    notes.append(f"- Peak at {hi}²: **{p_hi:.2f} GB** (goal ≤ 2.5 GB: "
                 f"{'met' if p_hi <= 2.5 else 'missed by %.2f GB' % (p_hi - 2.5)}).")
    if record:
        report.record(record, "\n".join(notes))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: segflow's)")
    ap.add_argument("--api", action="store_true", help="the Python API on dask's default scheduler")
    ap.add_argument("--probabilities", action="store_true",
                    help="with --api: probabilities=True (the API's default) instead of labels")
    ap.add_argument("--api-child", nargs=3, metavar=("SIZE", "IMAGE", "OUT"), help=argparse.SUPPRESS)
    report.add_argument(ap)
    args = ap.parse_args()
    if args.api_child:
        api_child(int(args.api_child[0]), Path(args.api_child[1]), Path(args.api_child[2]), args.probabilities)
        return 0
    if args.api:
        return api_main(args.sizes, args.record, args.probabilities)
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
             "(CLI client, Dask nanny and workers, and Prefect's temporary server when the run uses one: since issue 12 a one-off run without a Prefect API does not). \"MONAI would hold\" is the input "
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
