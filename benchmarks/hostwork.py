"""Host work per window: what segflow's stitching spends outside the network's forward pass, step by step.

    .venv/bin/python benchmarks/hostwork.py [--size 4096] [--precision fast] [--device cpu|cuda] [--record hostwork]
    .venv/bin/python benchmarks/hostwork.py --dims 3 [--size 256] [--precision fast]

Issue 12 asks for this profile until GPU figures exist: the seconds per window
that are not the forward pass.  The same U-Net, image and windows as
``predict_vs_monai.py`` (random weights, 3 uint8 bands in a zarr store; 2D:
ROI 256², batch 8, chunks 1024²; 3D: ROI 96³, batch 2, chunks 128³), run on dask's *synchronous* scheduler in one
thread, so every step's time is its own and they add up to the wall time.
Each step is timed by wrapping the function that does it (no profiler
overhead); a step nested in another is subtracted from its parent.  One run
warms up, the next is timed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)
_stack: list[str] = []


def _timed(name: str, fn: Callable) -> Callable:
    """``fn`` with its own time (its callees' wrapped steps excluded) added to SPENT[name]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stack.append(name)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t
            _stack.pop()
            SPENT[name] += spent
            if _stack:
                SPENT[_stack[-1]] -= spent

    return wrapper


@contextmanager
def patched(targets: list[tuple[Any, str, str]]) -> Iterator[None]:
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    for obj, attr, name in targets:
        setattr(obj, attr, _timed(name, getattr(obj, attr)))
    try:
        yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)


STEPS = [
    ("forward", "the network's forward pass (the raw path's cost)"),
    ("softmax", "softmax into a float32 class-major buffer, weight folded in (the raw path does this too)"),
    ("accumulate", "the rest of a region's windows: stacking, Σ w·p into the region's sums, sums back"),
    ("read", "reading the region from the zarr store"),
    ("normalise", "normalising the region into float32"),
    ("evaluate", "the rest of an evaluate task: buffers, mask, pieces for the neighbours"),
    ("sums", "adding the pieces into the chunk's Σ w·p"),
    ("finalise", "finalise: rebuilding Σ w and dividing by it (`exact`; `fast` labels skip it)"),
    ("argmax", "argmax over the classes"),
    ("write", "the rest of writing a chunk: nodata, the label store, the histogram"),
    ("other", "everything else: dask's graph and scheduling, the wall time not in a step above"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, choices=[2, 3], default=2)
    ap.add_argument("--size", type=int, default=None, help="the image's side (default 4096 in 2D, 256 in 3D)")
    ap.add_argument("--precision", choices=["exact", "fast"], default="fast")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    report.add_argument(ap)
    args = ap.parse_args()
    dims = args.dims
    size = args.size or (4096 if dims == 2 else 256)
    # predict_vs_monai.py's shapes for each case
    roi, batch, chunk = ((256,) * 2, 8, 1024) if dims == 2 else ((96,) * 3, 2, 128)

    import dask
    import zarr

    import segmentation.inference as inference
    import segmentation.chunkwrites as chunkwrites
    import segmentation.devicesums as devicesums
    import segmentation.stitching as stitching
    from segmentation import build_plan
    from segmentation.models import create
    from segmentation.normalize import Normalizer
    from segmentation.regions import RegionReader

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = create("unet", spatial_dims=dims, in_channels=3, out_channels=5, channels=[16, 32, 64, 128],
                 strides=[2, 2, 2], num_res_units=1).eval()
    stored = np.random.default_rng(0).integers(0, 256, (3,) + (size,) * dims, dtype=np.uint8)
    tmp = tempfile.TemporaryDirectory()
    store = zarr.create_array(f"{tmp.name}/image.zarr", shape=stored.shape, dtype="uint8", chunks=(3,) + (chunk,) * dims)
    store[...] = stored
    labels = zarr.create_array(f"{tmp.name}/labels.zarr", shape=stored.shape[1:], dtype="uint8",
                               chunks=(chunk,) * dims)

    def run() -> float:
        plan = build_plan(store, net, roi=roi, overlap=0.25, chunks=chunk, precision=args.precision,
                          batch_size=batch, device=args.device, num_classes=5,
                          normalizer=Normalizer((0.0,) * 3, (1 / 255,) * 3))
        writes = plan.writes(labels)
        t = time.perf_counter()
        with dask.config.set(scheduler="synchronous"):
            dask.compute(*writes)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run()  # warm-up: oneDNN/cuDNN kernel choice, the prepared network
    targets = [
        (inference.WindowPredictor, "_logits", "forward"),
        (inference, "exp_and_scale", "softmax"),
        (inference.WindowPredictor, "accumulate", "accumulate"),
        (inference.WindowPredictor, "accumulate_stored", "accumulate"),  # device-resident regions (GPU workers)
        (RegionReader, "read", "read"),
        (Normalizer, "__call__", "normalise"),
        (Normalizer, "apply_torch", "normalise"),
        (devicesums, "labels", "argmax"),
        (stitching, "_evaluate", "evaluate"),
        (stitching, "_sums", "sums"),
        (stitching, "_finalise", "finalise"),
        (stitching, "_undivided_labels", "finalise"),
        (chunkwrites, "argmax0", "argmax"),
        (chunkwrites, "_write", "write"),
    ]
    SPENT.clear()
    with patched(targets):
        wall = run()
    windows = len(build_plan(store, net, roi=roi, overlap=0.25, chunks=chunk, batch_size=batch,
                             num_classes=5, normalizer=Normalizer((0.0,) * 3, (1 / 255,) * 3)).grid)
    SPENT["other"] = wall - sum(v for k, v in SPENT.items() if k != "other")
    host = wall - SPENT["forward"] - SPENT["softmax"]
    power = "²" if dims == 2 else "³"
    lines = [
        f"Image {size}{power}×3 uint8 in a zarr store (chunks {chunk}{power}), MONAI U-Net (16, 32, 64, 128), "
        f"5 classes, random weights, ROI {roi[0]}{power}, overlap 0.25, Gaussian blending, batch {batch}, "
        f"{windows} windows, "
        f"`{args.precision}` on {args.device}; dask's synchronous scheduler, one thread (torch too), so the steps "
        "add up to the wall time. Each step's own time (nested steps subtracted).", "",
        "| step | s | ms per window | share |", "|---|---|---|---|"]
    for key, label in STEPS:
        s = SPENT.get(key, 0.0)
        lines.append(f"| {label} | {s:.2f} | {1000 * s / windows:.2f} | {100 * s / wall:.0f} % |")
    lines += [f"| **total** (wall) | **{wall:.2f}** | **{1000 * wall / windows:.2f}** | 100 % |", "",
              f"- Host work outside the forward pass and its softmax: **{1000 * host / windows:.2f} ms per "
              f"window**, {100 * host / wall:.0f} % of the wall time; so this path runs at "
              f"{(SPENT['forward'] + SPENT['softmax']) / wall:.2f}× the forward pass and softmax alone."]
    body = "\n".join(lines)
    report.publish(body, args.record)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
