"""Forward throughput of every registered architecture: 2D 512², 3D 128³, fp32 and bf16.

    .venv/bin/python benchmarks/model_throughput.py [--arch unet fcn] [--record model-throughput]

Each network is built with its registry defaults (4 input channels, 5 classes
in 2D; 1 channel, 3 classes in 3D), prepared as segflow's workers prepare it
(eval, BatchNorm folded where traceable, channels-last), and timed on one
batch of 1 after warm-up: fp32, and bf16 autocast (segflow's ``fast`` on a
CPU with bf16 instructions; on one without, ``fast`` runs fp32: the bf16 column
shows what emulated bf16 would cost). Throughput is input pixels (voxels) per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from segmentation import models  # noqa: E402
from segmentation.netprep import fold_batch_norm  # noqa: E402


def bench(net: torch.nn.Module, x: torch.Tensor, bf16: bool, reps: int) -> float:
    def once() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x)
    once()
    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=None, help="default: every registered name")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--reps", type=int, default=3)
    report.add_argument(ap)
    args = ap.parse_args()
    names = args.arch or models.names()
    lines = [f"Batch of 1, {torch.get_num_threads()} torch threads, the network as segflow's workers prepare it.",
             "", "| architecture | input | parameters | fp32 ms | fp32 Mpx/s | bf16 ms | bf16 Mpx/s | bf16 speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        for dims in args.dims:
            cin, classes, size = (4, 5, 512) if dims == 2 else (1, 3, 128)
            torch.manual_seed(0)
            try:
                net = models.create(name, spatial_dims=dims, in_channels=cin, out_channels=classes).eval()
            except Exception as exc:  # noqa: BLE001 - report, do not hide, what cannot be built
                lines.append(f"| {name} | {dims}D | – | cannot build: {exc} | | | | |")
                print(lines[-1], flush=True)
                continue
            params = sum(p.numel() for p in net.parameters())
            fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
            x = torch.rand((1, cin) + (size,) * dims).contiguous(memory_format=fmt)
            prepared = fold_batch_norm(net, x).to(memory_format=fmt)
            fp32 = bench(prepared, x, False, args.reps)
            bf16 = bench(prepared, x, True, args.reps)
            mpx = size ** dims / 1e6
            lines.append(f"| {name} | {dims}D {'×'.join([str(size)] * dims)} | {params / 1e6:.2f} M | "
                         f"{fp32 * 1e3:.0f} | {mpx / fp32:.2f} | {bf16 * 1e3:.0f} | {mpx / bf16:.2f} | "
                         f"{fp32 / bf16:.2f}× |")
            print(lines[-1], flush=True)
    if args.record:
        report.record(args.record, "\n".join(lines), doc=report.DOC.parent / "models.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
