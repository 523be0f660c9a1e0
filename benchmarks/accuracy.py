"""Accuracy on real labelled data, through ``segflow train`` and ``segflow evaluate``, on a spatial hold-out.

    .venv/bin/python benchmarks/accuracy.py [--only mni152 nuclei2d buildings brain-lesion] [--record accuracy]

Each image in ``../shared/data/labelled`` (see its README) is cut in two along
one axis.  The test part is written to its own files and never reaches
training, not even through checkpoint selection: the training part is written
to files too, and ``segflow train --holdout`` validates (picks the best
checkpoint) on a strip of the training part only.  Then ``segflow segment``
runs the trained model on the test part's image and ``segflow evaluate``
scores its labels against the test part's truth.  Every step is the CLI a
user types, as a subprocess; training seconds are the wall time of
``segflow train``.

- mni152: the ICBM152 2009a T1 template; labels grey matter (GM probability
  map > 0.5) and white matter (WM > 0.5).  Trained on the anterior half,
  tested on the posterior half (not the other hemisphere: the template is
  symmetric).
- nuclei2d: fluorescence nuclei; labels = instance mask > 0.  Left half /
  right half.
- buildings: a 0.5 m panchromatic scene; labels = the GeoJSON footprints,
  rasterised by segflow (storage.datasets.geolabels.rasterise) on the image
  grid.  Left half / right half.
- brain-lesion: an MR volume with a lesion (0.25 % of voxels).  Cut along
  the A-P axis (j), where the cut crosses the lesion: a cut along L-R would
  leave the lesion entirely in one part.

Baselines are the simple ones ``../shared/data/README.md`` quotes (computed
there on the whole image, for orientation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "labelled"
DOC = ROOT / "docs" / "accuracy.md"


@dataclass
class Run:
    """One dataset's experiment: how to make its files, its card, its budget and what the issue asks."""

    name: str
    prepare: Callable[[Path], dict[str, Path]]  # work -> train_image, train_labels, test_image, test_truth
    card: dict[str, Any]
    steps: int
    batch_size: int
    lr: float
    holdout: str  # inside the training part: where the validation strip lies
    goal: dict[str, float] = field(default_factory=dict)  # class name -> Dice the issue asks for
    baseline: str = ""
    cut: str = ""
    precision: str = "fast"  # bf16 autocast; "exact" where bf16 diverged (brain-lesion, at step 17 and 103)
    intensity: float = 0.0  # segflow train --augment-intensity: the share of patches given random contrast etc.
    spatial: float = 0.0  # segflow train --augment-spatial: the share of patches turned and zoomed at random
    seed: int | None = None  # segflow train --seed (None: its default)


def _unet(spatial_dims: int, channels: list[int], classes: list[tuple[str, tuple[int, int, int]]],
          roi: list[int], normalization: dict[str, Any], name: str, batch: int = 4,
          norm: str = "instance") -> dict[str, Any]:
    strides = [2] * (len(channels) - 1)
    card: dict[str, Any] = {
        "name": name, "architecture": {"name": "unet", "kwargs": {"channels": channels, "strides": strides,
                                                                  "num_res_units": 1, "norm": norm}},
        "input": {"spatial_dims": spatial_dims, "channels": 1, "normalization": normalization},
        "classes": [{"value": v, "name": n, "color": list(c)} for v, (n, c) in enumerate(classes)],
        "inference": {"roi": roi, "overlap": 0.25, "batch_size": batch}}
    return card


# --- files ----------------------------------------------------------------------------------------------------


def _nifti_parts(image: Path, labels: np.ndarray, work: Path, axis: int, cut: int,
                 train_first: bool) -> dict[str, Path]:
    """Image and label NIfTIs of both parts along voxel ``axis`` (i=0, j=1, k=2), with their own affines."""
    import nibabel as nib

    img = nib.load(str(image))
    lab = nib.Nifti1Image(labels.astype(np.uint8), img.affine)
    lab.set_qform(img.affine, 1)
    lab.set_sform(img.affine, 1)
    first = tuple(slice(0, cut) if a == axis else slice(None) for a in range(3))
    last = tuple(slice(cut, None) if a == axis else slice(None) for a in range(3))
    train, test = (first, last) if train_first else (last, first)
    out = {}
    for part, box in (("train", train), ("test", test)):
        nib.save(img.slicer[box], str(work / f"{part}-image.nii.gz"))
        nib.save(lab.slicer[box], str(work / f"{part}-labels.nii.gz"))
        out[f"{part}_image"] = work / f"{part}-image.nii.gz"
        out[f"{part}_labels"] = work / f"{part}-labels.nii.gz"
    out["test_truth"] = out.pop("test_labels")
    return out


def _raster_parts(image: Path, labels: np.ndarray, work: Path, cut: int) -> dict[str, Path]:
    """Left (train) and right (test) parts of a single-band raster and its labels, as GeoTIFFs on the same grid."""
    from rasterio.windows import Window

    out = {}
    with _quiet_open(image) as src:
        width, height = src.width, src.height
        for part, win in (("train", Window(0, 0, cut, height)), ("test", Window(cut, 0, width - cut, height))):
            profile = {"driver": "GTiff", "width": int(win.width), "height": int(win.height), "count": 1,
                       "transform": src.window_transform(win), "crs": src.crs}
            with _quiet_write(work / f"{part}-image.tif", dtype=src.dtypes[0], nodata=src.nodata,
                              **profile) as dst:
                dst.write(src.read(1, window=win), 1)
            with _quiet_write(work / f"{part}-labels.tif", dtype="uint8", **profile) as dst:
                dst.write(labels[:, int(win.col_off):int(win.col_off + win.width)].astype(np.uint8), 1)
            out[f"{part}_image"] = work / f"{part}-image.tif"
            out[f"{part}_labels"] = work / f"{part}-labels.tif"
    out["test_truth"] = out.pop("test_labels")
    return out


def _quiet_open(path: Path) -> Any:
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raster without georeferencing is expected here
        return rasterio.open(path)


def _quiet_write(path: Path, **profile: Any) -> Any:
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same: an identity-like transform and no CRS (nuclei2d)
        return rasterio.open(path, "w", **profile)


def prepare_mni(work: Path) -> dict[str, Path]:
    import nibabel as nib

    d = DATA / "mni152"
    gm = np.asarray(nib.load(str(d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
    wm = np.asarray(nib.load(str(d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
    half = 0.5 * float(np.iinfo(gm.dtype).max) if gm.dtype.kind in "ui" else 0.5  # uint8 maps: 255 = 1
    labels = np.zeros(gm.shape, np.uint8)
    labels[gm > half] = 1
    labels[wm > half] = 2
    image = d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    # RAS: j grows to anterior; train on the anterior half (j >= cut), test on the posterior one
    return _nifti_parts(image, labels, work, axis=1, cut=gm.shape[1] // 2, train_first=False)


def prepare_nuclei(work: Path) -> dict[str, Path]:
    d = DATA / "nuclei2d"
    with _quiet_open(d / "mask2d.tif") as src:
        labels = (src.read(1) > 0).astype(np.uint8)
    return _raster_parts(d / "img2d.tif", labels, work, cut=labels.shape[1] // 2)


def prepare_buildings(work: Path) -> dict[str, Path]:
    import rasterio

    from storage.datasets.geolabels import rasterise
    from storage.ingest import ingest

    d = DATA / "buildings"
    store = ingest(d / "sample_geotiff.tif", work / "scene.image.zarr")
    burned = rasterise(d / "geotiff_labels.geojson", store, work / "footprints.tif")
    with rasterio.open(burned) as src:
        labels = (src.read(1) > 0).astype(np.uint8)
    return _raster_parts(d / "sample_geotiff.tif", labels, work, cut=labels.shape[1] // 2)


def prepare_lesion(work: Path) -> dict[str, Path]:
    import nibabel as nib

    d = DATA / "brain-lesion"
    labels = (np.asarray(nib.load(str(d / "brain1_label.nii.gz")).dataobj) > 0).astype(np.uint8)
    return _nifti_parts(d / "brain1_image.nii.gz", labels, work, axis=1, cut=labels.shape[1] // 2,
                        train_first=True)


RUNS = {
    "mni152": Run(
        "mni152", prepare_mni,
        _unet(3, [16, 32, 64], [("background", (0, 0, 0)), ("grey matter", (200, 120, 120)),
                                  ("white matter", (240, 240, 200))], [32, 32, 32],
              {"mode": "scale", "scale": [1 / 255]}, "mni152-gm-wm"),
        steps=5000, batch_size=4, lr=3e-3, holdout="x:0.8", goal={"grey matter": 0.95, "white matter": 0.95},
        baseline="Otsu inside the brain: GM 0.91, WM 0.88", cut="train: anterior half (j >= 116); test: posterior"),
    "nuclei2d": Run(
        "nuclei2d", prepare_nuclei,
        _unet(2, [16, 32, 64, 128], [("background", (0, 0, 0)), ("nucleus", (60, 200, 255))], [128, 128],
              {"mode": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0}, "nuclei2d",
              batch=8),
        steps=2000, batch_size=8, lr=3e-3, holdout="x:0.8", goal={"nucleus": 0.92},
        baseline="Otsu vs mask > 0: 0.835", cut="train: left half (columns < 256); test: right half"),
    "buildings": Run(
        "buildings", prepare_buildings,
        _unet(2, [16, 32, 64, 128], [("background", (0, 0, 0)), ("building", (230, 60, 40))], [128, 128],
              {"mode": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0}, "buildings",
              batch=8, norm="batch"),
        steps=3000, batch_size=8, lr=3e-3, holdout="x:0.8", goal={"building": 0.6}, spatial=0.5,
        baseline="Otsu: 0.19", cut="train: left half (columns < 450); test: right half"),
    "brain-lesion": Run(
        "brain-lesion", prepare_lesion,
        _unet(3, [16, 32, 64, 128], [("background", (0, 0, 0)), ("lesion", (230, 40, 40))], [16, 64, 64],
              {"mode": "image_zscore"}, "brain-lesion"),
        steps=2000, batch_size=4, lr=1e-3, holdout="y:0.8", goal={}, precision="exact",
        baseline="the lesion is 0.25 % of voxels", cut="train: j < 128; test: j >= 128 (the cut crosses the lesion)"),
}


def _cli(*args: str) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"segflow {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def run(spec: Run, work: Path) -> dict[str, Any]:
    files = spec.prepare(work)
    card = work / "card.json"
    card.write_text(json.dumps(spec.card))
    model = work / "model"
    train_s, _ = _cli("train", "--card", str(card), "--image", str(files["train_image"]), "--labels",
                      str(files["train_labels"]), "--out", str(model), "--steps", str(spec.steps), "--batch-size",
                      str(spec.batch_size), "--lr", str(spec.lr), "--holdout", spec.holdout, "--precision",
                      spec.precision, "--augment-intensity", str(spec.intensity),
                      "--augment-spatial", str(spec.spatial), *(() if spec.seed is None else ("--seed", str(spec.seed))))
    out = work / "out"
    segment_s, _ = _cli("segment", str(files["test_image"]), "--model", str(model), "--out", str(out), "--no-zarr")
    name = files["test_image"].name
    prediction = out / name
    scores = work / "scores"
    _cli("evaluate", str(prediction), "--truth", str(files["test_truth"]), "--out", str(scores), "--classes",
         str(model))
    report_doc = json.loads((scores / "evaluation.json").read_text())
    trained = json.loads((model / "card.json").read_text())
    return {"train_s": train_s, "segment_s": segment_s, "evaluation": report_doc,
            "validation": trained.get("training", {}).get("validation", {}),
            "markdown": (scores / "evaluation.md").read_text()}


def _classes(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result["evaluation"]["cases"][0]["classes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    ap.add_argument("--steps", type=int, default=None, help="override every run's steps")
    ap.add_argument("--roi", type=int, nargs="+", default=None, help="override the runs' ROI (training patch)")
    ap.add_argument("--augment-intensity", type=float, default=None, help="override the runs' intensity share")
    ap.add_argument("--augment-spatial", type=float, default=None, help="override the runs' rotation/zoom share")
    ap.add_argument("--seed", type=int, default=None, help="segflow train's --seed (default: its own)")
    ap.add_argument("--normalization", type=json.loads, default=None,
                    help="override the runs' card normalisation, as JSON (e.g. '{\"mode\": \"scale\", ...}')")
    report.add_argument(ap, "docs/accuracy.md, in the blocks KEY-<data>")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the shared real-data folder)")
        return 0
    head = ["| data | cut | training (wall) | class | Dice | IoU | HD95 | goal | simple baseline |",
            "|---|---|---|---|---|---|---|---|---|"]
    keep = None if args.keep is None else tempfile.mkdtemp(dir=args.keep)  # --keep: the files stay
    with (tempfile.TemporaryDirectory() if keep is None else contextlib.nullcontext(keep)) as tmp:
        for name in args.only:
            spec = RUNS[name]
            if args.steps is not None:
                spec.steps = args.steps
            if args.roi is not None:
                spec.card["inference"]["roi"] = list(args.roi)
            if args.augment_intensity is not None:
                spec.intensity = args.augment_intensity
            if args.augment_spatial is not None:
                spec.spatial = args.augment_spatial
            spec.seed = args.seed
            if args.normalization is not None:
                spec.card["input"]["normalization"] = args.normalization
            work = Path(tmp) / name
            work.mkdir()
            print(f"# {name}: training {spec.steps} steps ...", flush=True)
            try:
                result = run(spec, work)
            except SystemExit as failed:  # one dataset's failure is reported; the others still run
                print(failed, flush=True)
                if args.record:
                    report.record(f"{args.record}-{name}", f"Failed: {str(failed).strip().splitlines()[-1]}",
                                  doc=DOC)
                continue
            rows = []
            unit = result["evaluation"]["cases"][0].get("distance_unit", "")
            for c in _classes(result):
                if c.get("value", 0) == 0:
                    continue
                goal = spec.goal.get(c["name"])
                dice, iou, hd = c.get("dice"), c.get("iou"), c.get("hd95")
                verdict = "report" if goal is None else (
                    f"≥ {goal}: {'met' if dice is not None and dice >= goal else 'missed'}")
                cells = ["-" if dice is None else f"{dice:.3f}", "-" if iou is None else f"{iou:.3f}",
                         "-" if hd is None else f"{hd:.2f} {unit}"]
                rows.append(f"| {name} | {spec.cut} | {result['train_s'] / 60:.1f} min | {c['name']} | "
                            + " | ".join(cells) + f" | {verdict} | {spec.baseline} |")
            best = result["validation"].get("best", {})
            note = (f"{spec.steps} steps × batch {spec.batch_size} ({spec.precision}), "
                    f"ROI {spec.card['inference']['roi']}, {spec.card['architecture']['kwargs']['channels']} U-Net "
                    f"({spec.card['architecture']['kwargs']['norm']} norm)"
                    + (f", `--augment-intensity {spec.intensity:g}`" if spec.intensity else "")
                    + (f", `--augment-spatial {spec.spatial:g}`" if spec.spatial else "")
                    + "; flips and transposes; checkpoint chosen on the training "
                    f"part's `--holdout {spec.holdout}` strip (best at step {best.get('step')}); segmenting the "
                    f"test part took {result['segment_s']:.0f} s.")
            text = "\n".join([*head, *rows, "", note, "", "<details><summary>segflow evaluate's table</summary>",
                              "", result["markdown"].strip(), "", "</details>"])
            print(text, flush=True)
            if args.record:
                report.record(f"{args.record}-{name}", text, doc=DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
