"""Does graph rewriting speed up the CPU forward pass? Eager vs BatchNorm folding vs TorchScript vs torch.compile.

    .venv/bin/python benchmarks/compile_modes.py [--dims 2] [--batch 8] [--record compile-2d]

Times the demo-sized U-Net on one batch of windows, fp32 and bf16 autocast,
channels-last, after warm-up; compile time is reported separately.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

from segmentation.netprep import fold_batch_norm  # noqa: E402
from segmentation.models import create  # noqa: E402


def bench(fn, x, reps: int) -> float:  # noqa: ANN001
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        t = time.perf_counter()
        for _ in range(reps):
            fn(x)
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, default=2, choices=[2, 3])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-inductor", action="store_true")
    report.add_argument(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = args.dims
    roi = (256, 256) if d == 2 else (64, 64, 64)
    fmt = torch.channels_last if d == 2 else torch.channels_last_3d
    net = create("unet", spatial_dims=d, in_channels=3, out_channels=5, channels=[16, 32, 64, 128],
                 strides=[2, 2, 2], num_res_units=1).eval().to(memory_format=fmt)
    x = torch.rand((args.batch, 3, *roi)).contiguous(memory_format=fmt)
    lines = [f"{d}D MONAI U-Net (16, 32, 64, 128), batch {args.batch} × {'×'.join(map(str, roi))}, channels-last, "
             f"{torch.get_num_threads()} torch threads; the forward pass alone, after warm-up.", "",
             "| mode | precision | ms per batch | vs eager | compile s |", "|---|---|---|---|---|"]

    def out(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    print("\n".join(lines))

    folded = fold_batch_norm(net, x).to(memory_format=fmt)
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(net)).to(memory_format=fmt)  # Conv+BN pairs only: what segflow did before 2026-12-04
    for precision in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else torch.no_grad
        eager = bench(lambda t, ctx=ctx: _run(net, t, ctx), x, args.reps)
        out(f"| eager | {precision} | {eager * 1e3:.1f} | 1.00× | – |")
        s = bench(lambda t, ctx=ctx: _run(fused, t, ctx), x, args.reps)
        out(f"| torch.fx `fuse` alone: BatchNorm folded after plain convolutions | {precision} | {s * 1e3:.1f} | "
            f"{eager / s:.2f}× | – |")
        s = bench(lambda t, ctx=ctx: _run(folded, t, ctx), x, args.reps)
        out(f"| BatchNorm folded after plain and transposed convolutions, eval Dropout dropped (segflow's default) "
            f"| {precision} | {s * 1e3:.1f} | {eager / s:.2f}× | – |")
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx():
            frozen = torch.jit.freeze(torch.jit.trace(net, x))
            frozen = torch.jit.optimize_for_inference(frozen)
        c = time.perf_counter() - t0
        s = bench(lambda t, f=frozen, ctx=ctx: _run(f, t, ctx), x, args.reps)
        out(f"| TorchScript trace + freeze + optimize_for_inference | {precision} | {s * 1e3:.1f} | "
            f"{eager / s:.2f}× | {c:.1f} |")
        if not args.no_inductor:
            compiled = torch.compile(net)
            t0 = time.perf_counter()
            _run(compiled, x, ctx)
            c = time.perf_counter() - t0
            s = bench(lambda t, f=compiled, ctx=ctx: _run(f, t, ctx), x, args.reps)
            out(f"| torch.compile (inductor) | {precision} | {s * 1e3:.1f} | {eager / s:.2f}× | {c:.1f} |")
    if args.record:
        report.record(args.record, "\n".join(lines))
    return 0


def _run(fn, x, ctx):  # noqa: ANN001, ANN202
    with torch.inference_mode(), ctx():
        return fn(x)


if __name__ == "__main__":
    sys.exit(main())
