"""What the optional dense-CRF post-processing does to Dice on the demo tasks.

    .venv/bin/python benchmarks/crf_effect.py --models demo/run-<timestamp>/models [--size 1024] [--record crf]

Generates a held-out scene (``--size``², seed ``--seed``) and phantom (default
96×96×64, same seed), ingests each into a zarr store, runs segflow inference
for class probabilities (the model card's ROI, overlap and blending, exact
precision), then refines them with ``segmentation.crf.crf_dask`` under a few
parameter settings, chunk by chunk on the store's chunk grid.  Prints per-class
Dice (valid truth pixels only) of the argmax before and after, and the CRF's
wall time (2 Dask threads, one torch thread each).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

from segmentation import build_plan, load_model  # noqa: E402
from segmentation.crf import CRFParams, crf_dask, crf_halo  # noqa: E402
from segmentation.metrics import ConfusionAccumulator, mean_dice  # noqa: E402
from segmentation.normalize import image_statistics, resolve  # noqa: E402
from segmentation.chunkwrites import argmax0  # noqa: E402
from storage import samples  # noqa: E402
from storage.ingest import ingest  # noqa: E402
from storage.layout import open_image_store  # noqa: E402

# Parameter settings compared; "default" is CRFParams() as shipped.
SETTINGS: dict[str, CRFParams] = {
    "default": CRFParams(),
    "2 iterations": CRFParams(iterations=2),
    "smoothness only": CRFParams(w_bilateral=0.0),
    "wide appearance": CRFParams(radius=5, theta_alpha=5.0, w_bilateral=3.0),
}


def read_truth(path: Path) -> np.ndarray:
    """The truth label map in the store's spatial layout ((H, W), or (K, J, I) for NIfTI)."""
    if path.name.endswith(".tif"):
        import rasterio

        with rasterio.open(path) as src:
            return src.read(1)
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj).T  # (I, J, K) -> the store's (K, J, I)


def prepare(name: str, models: Path, tmp: Path, seed: int, size: int,
            phantom_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Generate, ingest and segment one held-out input; return what the CRF and the scoring need."""
    model = load_model(models / name)
    if model.card.input.spatial_dims == 2:
        path, truth = samples.make_scene(tmp / f"scene-{seed}.tif", size=(size, size), seed=seed)
        chunk = 512
    else:
        path, truth = samples.make_phantom(tmp / f"phantom-{seed}.nii.gz", shape=phantom_shape, seed=seed)
        chunk = 64
    store = open_image_store(ingest(path, tmp / f"{name}.zarr", chunk=chunk).path)
    image = da.from_array(store.image, chunks=store.image.chunks, asarray=False, lock=False)
    mask = None if store.mask is None else da.from_array(store.mask, chunks=store.mask.chunks, asarray=False,
                                                         lock=False)
    card = model.card
    stats = image_statistics(image, mask) if card.input.normalization.mode == "image_zscore" else None
    normalizer = resolve(card.input.normalization, card.input.channels, stats)
    plan = build_plan(image, model, mask=mask, precision="exact", normalizer=normalizer)
    t = time.perf_counter()
    probs = plan.probabilities().compute()
    seconds = time.perf_counter() - t
    return {"name": name, "card": card, "image": image, "mask": mask, "normalizer": normalizer,
            "probs": probs, "truth": read_truth(truth), "predict_s": seconds, "input": path.name}


def score(probs: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[int, float]:
    acc = ConfusionAccumulator(num_classes, ignore=samples.TRUTH_NODATA)
    acc.update(argmax0(probs, np.dtype(np.uint8)), truth)
    return acc.dice()


def run_crf(job: dict[str, Any], params: CRFParams) -> tuple[np.ndarray, float]:
    probs = da.from_array(job["probs"], chunks=(job["probs"].shape[0],) + job["image"].chunksize[1:])
    out = crf_dask(probs, job["image"], params, job["mask"], normalizer=job["normalizer"])
    t = time.perf_counter()
    result = out.compute()
    return result, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--size", type=int, default=1024, help="scene side, pixels")
    ap.add_argument("--phantom-shape", type=int, nargs=3, default=(96, 96, 64), metavar=("I", "J", "K"))
    ap.add_argument("--seed", type=int, default=202, help="held-out seed (the demo trains on 1-3)")
    report.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dask.config.set(scheduler="threads", num_workers=2)

    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("landcover-2d", "lesion-3d"):
            job = prepare(name, args.models, Path(tmp), args.seed, args.size, tuple(args.phantom_shape))
            card = job["card"]
            classes = [c.name for c in card.classes]
            shape = job["probs"].shape
            lines += ["", (f"**{name}** on {job['input']} {tuple(shape[1:])}, chunks "
                           f"{job['image'].chunksize[1:]} (inference {job['predict_s']:.1f} s)"), "",
                      "| setting | " + " | ".join(classes) + " | mean | CRF s | halo |",
                      "|---" * (len(classes) + 4) + "|"]
            base = score(job["probs"], job["truth"], card.num_classes)
            lines.append("| no CRF | " + " | ".join(f"{base[c]:.4f}" for c in range(card.num_classes))
                         + f" | {mean_dice(base):.4f} | – | – |")
            print("\n".join(lines[-6:]), flush=True)
            for label, params in SETTINGS.items():
                refined, seconds = run_crf(job, params)
                dice = score(refined, job["truth"], card.num_classes)
                cells = []
                for c in range(card.num_classes):
                    delta = dice[c] - base[c]
                    cells.append(f"{dice[c]:.4f} ({'+' if delta >= 0 else '−'}{abs(delta):.4f})"
                                 if not math.isnan(delta) else "nan")
                halo = crf_halo(params, len(shape) - 1)
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_dice(dice):.4f} | {seconds:.2f} "
                             f"| {halo[0]} |")
                print(lines[-1], flush=True)
    settings = [f"- {label}: `{params.model_dump(exclude_defaults=True) or 'CRFParams()'}`"
                for label, params in SETTINGS.items()]
    body = "\n".join(
        [(f"Held-out scene {args.size}² and phantom {'×'.join(map(str, args.phantom_shape))} (seed {args.seed}); "
          "segflow exact inference, then the truncated dense CRF chunk by chunk (2 Dask threads, 1 torch thread "
          "each). Dice of the argmax over valid truth pixels; in brackets the change from no CRF."),
         *lines, "", "Settings (CRFParams fields that differ from the defaults):", *settings])
    if args.record:
        report.record(args.record, body, doc=report.DOC.parent / "models.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
