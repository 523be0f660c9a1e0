"""segflow fast/exact vs MONAI fp32 on the demo's trained models: speed and label agreement.

    .venv/bin/python benchmarks/agreement.py --models demo/run-<timestamp>/models [--size 2048]

Generates a held-out scene (seed 202, `--size`²) and phantom (seed 202), ingests
each into a zarr store at ingest's default chunking, and runs three paths on the
same model, ROI, overlap and Gaussian blending:
- MONAI `sliding_window_inference` in fp32, on the normalised image in memory;
- segflow exact and segflow fast, over the zarr store on `segflow segment`'s default local cluster
  (threads of this process; `--workers N`: N worker processes, `nightly`'s default is 1).

Every path runs once to warm up (oneDNN's kernel choice, the workers' model
load), then ``--repeat`` times, the paths interleaved; the figure is the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

from flows.cluster import dask_client  # noqa: E402
from segmentation import build_plan, load_model  # noqa: E402
from segmentation.normalize import image_statistics, resolve  # noqa: E402
from storage import samples  # noqa: E402
from storage.ingest import ingest  # noqa: E402
from storage.layout import open_image_store  # noqa: E402


def monai_labels(model, image: np.ndarray, mask) -> np.ndarray:  # noqa: ANN001
    from monai.inferers import sliding_window_inference

    card = model.card
    stats = image_statistics(image, mask) if card.input.normalization.mode == "image_zscore" else None
    x = torch.from_numpy(resolve(card.input.normalization, card.input.channels, stats)(image))[None]
    with torch.inference_mode():
        out = sliding_window_inference(x, card.inference.roi, card.inference.batch_size,
                                       lambda t: torch.softmax(model.module(t), 1), overlap=card.inference.overlap,
                                       mode=card.inference.blend)
    return out[0].argmax(0).numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=0,
                    help="local worker processes (default 0: threads of this process, as `segflow segment`)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each path (median reported)")
    report.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = ["| model | input | windows | MONAI fp32 s | segflow exact s | segflow fast s | exact vs MONAI | "
             "fast vs MONAI | labels exact = MONAI | labels fast = MONAI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    goals = []
    print("\n".join(lines))
    with tempfile.TemporaryDirectory() as tmp, dask_client(None, workers=args.workers) as client:
        tmp = Path(tmp)
        jobs = [("landcover-2d", samples.make_scene(tmp / "scene.tif", size=(args.size, args.size), seed=202)[0], None),
                ("lesion-3d", samples.make_phantom(tmp / "phantom.nii.gz", shape=(192, 192, 128), seed=202)[0], None)]
        for name, path, chunk in jobs:
            model = load_model(args.models / name)
            ingest(path, tmp / f"{name}.zarr", chunk=chunk)
            store = open_image_store(tmp / f"{name}.zarr")
            image = np.asarray(store.image[...])
            mask = None if store.mask is None else np.asarray(store.mask[...])
            ref = monai_labels(model, image, mask)  # warm-up
            plans = {p: build_plan(store.image, model, precision=p, mask=store.mask) for p in ("exact", "fast")}
            labels = {p: client.compute(plan.labels()).result() for p, plan in plans.items()}  # warm-up
            runs: dict[str, list[float]] = {"monai": [], "exact": [], "fast": []}
            for _ in range(args.repeat):  # interleaved: a change in the machine's load hits every path alike
                t = time.perf_counter()
                monai_labels(model, image, mask)
                runs["monai"].append(time.perf_counter() - t)
                for precision, plan in plans.items():
                    t = time.perf_counter()
                    labels[precision] = client.compute(plan.labels()).result()
                    runs[precision].append(time.perf_counter() - t)
            t_monai = statistics.median(runs["monai"])
            times = {p: statistics.median(runs[p]) for p in ("exact", "fast")}
            plan = plans["fast"]
            valid = np.ones(ref.shape, bool) if mask is None else mask
            agree = {p: float(np.mean(labels[p][valid] == ref[valid])) for p in labels}
            lines.append(f"| {name} | {path.name} {tuple(store.image.shape)} | {len(plan.grid)} | {t_monai:.2f} | "
                         f"{times['exact']:.2f} | {times['fast']:.2f} | {t_monai / times['exact']:.2f}× | "
                         f"{t_monai / times['fast']:.2f}× | {agree['exact']:.5f} | {agree['fast']:.5f} |")
            print(lines[-1], flush=True)
            fast, exact = t_monai / times["fast"], t_monai / times["exact"]
            goals.append(f"- {name}: fast vs MONAI {fast:.2f}× (goal ≥ 2.5×: {'met' if fast >= 2.5 else 'missed'}), "
                         f"exact vs MONAI {exact:.2f}× (goal ≥ 1.0×: {'met' if exact >= 1.0 else 'missed'}), "
                         f"fast label agreement {agree['fast']:.5f} "
                         f"(goal ≥ 0.995: {'met' if agree['fast'] >= 0.995 else 'missed'})")
    body = "\n".join(
        [f"Held-out scene {args.size}² and phantom 192×192×128 (seed 202). MONAI gets the normalised image in "
         "memory; segflow reads the ingested zarr store on "
         + (f"a local Dask cluster of {args.workers} worker process(es)" if args.workers else
            "`segflow segment`'s default local Dask cluster (threads of this process)")
         + f". Each path ran once to warm up, then {args.repeat} times interleaved: the median is shown. "
           "Agreement counts valid pixels only.", "",
         *lines, "", *goals])
    if args.record:
        report.record(args.record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
