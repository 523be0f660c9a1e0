"""What ``--compile`` gives a whole ``predict`` run, and what it costs the first time.

    .venv/bin/python benchmarks/compile_predict.py [--size 3072] [--repeats 2] [--record compile-predict]

A random 3-band image (float32, in memory), the demo-sized MONAI U-Net
(16, 32, 64, 128) with 5 classes and random weights, ROI 256², overlap 0.25,
batch 8, chunks 1024², on dask's threaded scheduler (one task at a time, 2 torch
threads), eager and compiled side by side in one process, ``exact`` and
``fast``.  The compile cache starts empty (a temporary folder), so the first
compiled run pays tracing, code generation and the C++ build; the next ones
load the kernels.  The fastest of the later runs is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the first, per mode")
    report.add_argument(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SEGFLOW_COMPILE_CACHE"] = cache
        import torch
        from monai.networks.nets import UNet

        import segmentation

        torch.manual_seed(0)
        net = UNet(spatial_dims=2, in_channels=3, out_channels=5, channels=(16, 32, 64, 128),
                   strides=(2, 2, 2)).eval()
        image = np.random.default_rng(0).random((3, args.size, args.size), dtype=np.float32)

        def run(precision: str, compile: bool) -> tuple[float, np.ndarray]:
            t = time.perf_counter()
            labels = segmentation.predict(image, net, roi=(256, 256), overlap=0.25, chunks=1024, batch_size=8,
                                          precision=precision, compile=compile,
                                          probabilities=False).compute(scheduler="threads", num_workers=1)
            return time.perf_counter() - t, labels

        rows = ["| precision | eager s | compiled s (first run, compiling) | compiled s (cached) | compiled vs eager "
                "| labels equal |", "|---|---|---|---|---|---|"]
        notes = []
        for precision in ("exact", "fast"):
            run(precision, False)  # warm-up: the eager network's first batch
            first, compiled_labels = run(precision, True)
            eager, compiled = [], []
            for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
                t, eager_labels = run(precision, False)
                eager.append(t)
                compiled.append(run(precision, True)[0])
            e, c = min(eager), min(compiled)
            agree = float((compiled_labels == eager_labels).mean())
            rows.append(f"| {precision} | {e:.2f} | {first:.1f} | {c:.2f} | **{e / c:.2f}×** | {agree:.6f} |")
            print(rows[-1], flush=True)
            notes.append(f"- {precision}: compiled windows run at {e / c:.2f}× eager once compiled; the first "
                         f"run on a machine costs {first - c:.0f} s more.")
    intro = (f"{args.size}²×3 float32 in memory, MONAI U-Net (16, 32, 64, 128), 5 classes, random weights, ROI "
             "256², overlap 0.25, batch 8, chunks 1024², dask threaded scheduler with one task at a time (2 torch "
             f"threads); eager and compiled interleaved in one process, best of {args.repeats}. The compile cache "
             "starts empty.")
    body = "\n".join([intro, "", *rows, "", *notes])
    print("\n".join(notes))
    if args.record:
        report.record(args.record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
