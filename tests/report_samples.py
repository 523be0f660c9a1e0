"""A generated run for the HTML report and artifact tests: a raster and a volume done with real outputs and
quicklooks, a failed input whose name and error carry markup, a skipped one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import rasterio
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter

from storage.classes import LabelClass
from flows.htmlreport import quicklook_path
from storage.quicklook import raster_quicklook, volume_quicklook

EVIL_ERROR = "bad<1>&.tif: cannot read <script>alert('owned')</script> (TIFF directory)"
LAND = [("water", (30, 90, 200)), ("forest", (20, 110, 40)), ("cropland", (230, 200, 80)), ("built-up", (200, 40, 40))]
HEAD = [("background", (0, 0, 0)), ("tissue", (200, 170, 150)), ("lesion", (230, 30, 30))]


# --------------------------------------------------------------------------- fixture generators


@dataclass
class SampleRun:
    report: dict
    quicklooks: dict[str, Path]
    out: Path  # the run's output folder
    html: Path  # where the page goes: OUT/reports/<stamp>.html, as nightly would put it


def write_card(folder: Path, name: str, dims: int, channels: list[str], classes: list, spacing: list) -> Path:
    """A model directory's card.json (the page reads cards as plain JSON; no weights needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    card = {"card_version": 4, "name": name, "description": f"Test {name} model.",
            "architecture": {"name": "unet", "kwargs": {}},
            "input": {"spatial_dims": dims, "channels": len(channels), "channel_names": channels,
                      "spacing": spacing, "spacing_unit": "m" if dims == 2 else "mm"},
            "classes": [{"value": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(classes)]}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def write_scene(image: Path, labels: Path, seed: int = 1) -> np.ndarray:
    """A 4-class land-cover label COG (10 m, EPSG:32633, nodata 255 in one corner) and its RGB image."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(200, 260)), 12)
    lab = np.digitize(field, np.quantile(field, [0.12, 0.55, 0.93])).astype(np.uint8)
    lab[:20, :30] = 255
    colours = np.array([c for _, c in LAND] + [(0, 0, 0)] * 252, dtype=np.float64)
    rgb = np.clip(colours[lab].transpose(2, 0, 1) * 0.8 + rng.normal(0, 12, (3, *lab.shape)) + 20, 1, 255)
    transform = from_origin(500000, 6000000, 10, 10)
    profile = dict(driver="GTiff", width=lab.shape[1], height=lab.shape[0], crs="EPSG:32633", transform=transform)
    with rasterio.open(image, "w", count=3, dtype="uint8", nodata=0, **profile) as dst:
        dst.write(rgb.astype(np.uint8))
    with rasterio.open(labels, "w", count=1, dtype="uint8", nodata=255, **profile) as dst:
        dst.write(lab, 1)
    return lab


def write_head(image: Path, labels: Path) -> np.ndarray:
    """A 48x48x36 ellipsoid 'head' (tissue) with a spherical lesion, 1.5 x 1.5 x 2 mm voxels, and its intensities."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in (48, 48, 36)), indexing="ij")
    lab = np.zeros((48, 48, 36), np.uint8)
    lab[((i - 24) / 20) ** 2 + ((j - 24) / 22) ** 2 + ((k - 18) / 16) ** 2 <= 1] = 1
    lab[(i - 30) ** 2 + (j - 20) ** 2 + (k - 20) ** 2 <= 16] = 2
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    img = (lab.astype(np.float64) * 300 + np.random.default_rng(2).normal(100, 20, lab.shape)).astype(np.int16)
    nib.save(nib.Nifti1Image(img, affine), image)
    nib.save(nib.Nifti1Image(lab, affine), labels)
    return lab


def sidecar(output: Path, model: Path, name: str) -> Path:
    path = output.with_name(f"{output.name.split('.')[0]}.provenance.json")
    path.write_text(json.dumps({"schema": "segflow.provenance/1", "model": {"name": name, "path": str(model),
                                                                           "weights_sha256": "ab" * 32}}))
    return path


def measured(lab: np.ndarray, classes: list, cell: float, key: str) -> list[dict]:
    return [{"value": v, "name": n, "count": int((lab == v).sum()), key: int((lab == v).sum()) * cell}
            for v, (n, _) in enumerate(classes)]


def sample_run(root: Path) -> SampleRun:
    """A nightly report of four inputs (done raster, done volume, failed, skipped) with real outputs."""
    inbox, out, models = root / "inbox", root / "out", root / "models"
    for folder in (inbox, out / "reports"):
        folder.mkdir(parents=True, exist_ok=True)
    land = write_card(models / "landcover-2d", "landcover-2d", 2, ["red", "green", "blue"], LAND, [10.0, 10.0])
    head = write_card(models / "lesion-3d", "lesion-3d", 3, ["t1"], HEAD, [1.5, 1.5, 2.0])
    scene = write_scene(inbox / "scene-a.tif", out / "scene-a.tif")
    volume = write_head(inbox / "head-b.nii.gz", out / "head-b.nii.gz")
    earlier = write_scene(inbox / "scene-c.tif", out / "scene-c.tif", seed=3)
    quicklooks = {
        str(inbox / "scene-a.tif"): raster_quicklook(
            out / "scene-a.tif", quicklook_path(out / "scene-a.tif"), image_path=inbox / "scene-a.tif",
            classes=[LabelClass(value=i, name=n, color=c) for i, (n, c) in enumerate(LAND)]).path,
        str(inbox / "head-b.nii.gz"): volume_quicklook(
            out / "head-b.nii.gz", quicklook_path(out / "head-b.nii.gz"), image_path=inbox / "head-b.nii.gz",
            classes=[LabelClass(value=i, name=n, color=c) for i, (n, c) in enumerate(HEAD)]).path}
    done = dict(status="done", attempts=1, windows={"evaluated": 12, "skipped": 3, "total": 15})
    inputs = [
        {**done, "input": str(inbox / "scene-a.tif"), "kind": "raster", "model": "landcover-2d",
         "model_path": str(land), "seconds": 4.213, "measure": "area_ha", "cell_size": 0.01,
         "timings": {"ingest_seconds": 0.41, "inference_seconds": 3.2, "export_seconds": 0.3, "total_seconds": 3.91},
         "labels": measured(scene, LAND, 0.01, "area_ha"),
         "outputs": [str(out / "scene-a.tif"), str(sidecar(out / "scene-a.tif", land, "landcover-2d"))]},
        {**done, "input": str(inbox / "head-b.nii.gz"), "kind": "volume", "model": "lesion-3d",
         "model_path": str(head), "seconds": 1.52, "measure": "volume_ml", "cell_size": 0.0045,
         "timings": {"ingest_seconds": 0.05, "inference_seconds": 1.1, "export_seconds": 0.02, "total_seconds": 1.2},
         "labels": measured(volume, HEAD, 0.0045, "volume_ml"),
         "outputs": [str(out / "head-b.nii.gz"), str(sidecar(out / "head-b.nii.gz", head, "lesion-3d"))]},
        {"input": str(inbox / "bad<1>&.tif"), "status": "failed", "attempts": 1, "error": EVIL_ERROR,
         "seconds": 0.02, "labels": [], "outputs": [], "timings": {}, "windows": {}},
        {**done, "status": "skipped", "input": str(inbox / "scene-c.tif"), "kind": "raster",
         "model": "landcover-2d", "model_path": str(land), "seconds": 0.31, "measure": "area_ha", "cell_size": 0.01,
         "note": "same input, model and parameters done 2026-12-01T03:00:12Z", "timings": {},
         "labels": measured(earlier, LAND, 0.01, "area_ha"),
         "outputs": [str(out / "scene-c.tif"), str(sidecar(out / "scene-c.tif", land, "landcover-2d"))]},
    ]
    report = {"schema": "segflow.nightly-report/1",
              "run": {"flow_run_id": None, "flow_run_name": "amber-heron", "started": "2026-12-02T03:00:05Z",
                      "finished": "2026-12-02T03:00:14Z", "seconds": 9.4, "state": "Failed",
                      "summary": "1 of 4 inputs failed; 2 done; 1 skipped", "inbox": "/data/inbox",
                      "manifest": None, "out_dir": str(out),
                      "models": [{"path": str(land), "name": "landcover-2d", "spatial_dims": 2, "channels": 3,
                                  "weights_sha256": "61c74dc5b102" * 5},
                                 {"path": str(head), "name": "lesion-3d", "spatial_dims": 3, "channels": 1,
                                  "weights_sha256": "b0ee97bd907d" * 5}],
                      "counts": {"done": 2, "skipped": 1, "failed": 1, "no-model": 0}},
              "inputs": inputs}
    return SampleRun(report, quicklooks, out, out / "reports" / "20261202T030014Z.html")
