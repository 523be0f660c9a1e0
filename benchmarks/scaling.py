"""Worker layouts side by side: 1 process × 2 threads vs 2 processes × 1 thread (vs 1 × 1).

    .venv/bin/python benchmarks/scaling.py [--size 4096] [--record scaling]

Each layout runs ``predict_vs_monai.py --only-segflow`` in its own process (a
fresh LocalCluster, a warm-up run, then exact and fast), one after the other
in this one command, so the figures are comparable.  torch gets
cores ÷ (workers × threads) intra-op threads in every layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

LAYOUTS = [(1, 2), (2, 1), (1, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--roi", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1024)
    report.add_argument(ap)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers, threads in LAYOUTS:
            out = Path(tmp) / f"{workers}x{threads}.json"
            subprocess.run([sys.executable, str(HERE / "predict_vs_monai.py"), "--size", str(args.size),
                            "--roi", str(args.roi), "--batch", str(args.batch), "--chunk", str(args.chunk),
                            "--only-segflow", "--workers", str(workers), "--threads-per-worker", str(threads),
                            "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            r = json.loads(out.read_text())
            rows.append((workers, threads, r["rows"]["segflow exact"], r["rows"]["segflow fast"], r["windows"]))
    cores = os.cpu_count() or 1
    base_e, base_f = rows[0][2], rows[0][3]
    lines = [f"2D {args.size}² × 3, U-Net (16, 32, 64, 128), ROI {args.roi}², batch {args.batch}, chunks "
             f"{args.chunk}², {rows[0][4]} windows, {cores} cores.", "",
             "| layout | torch threads per task | exact s | fast s | exact vs 1×2 | fast vs 1×2 |",
             "|---|---|---|---|---|---|"]
    for workers, threads, e, f, _ in rows:
        lines.append(f"| {workers} worker process(es) × {threads} thread(s) | {max(1, cores // (workers * threads))} "
                     f"| {e:.2f} | {f:.2f} | {base_e / e:.2f}× | {base_f / f:.2f}× |")
    body = "\n".join(lines)
    report.publish(body, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
