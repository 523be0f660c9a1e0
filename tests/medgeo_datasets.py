"""Tiny datasets in the Decathlon, nnU-Net v2 and geo (raster + labels) conventions, written into a folder.

Each generator returns what it wrote in the order segflow reads it back: a
volume's arrays as the image store holds them, (C, K, J, I) and (K, J, I),
since ``image[c, k, j, i] = data[i, j, k, c]``; a raster's as (C, H, W) and
(H, W).  Pixel values are small patterns that differ per channel and per
case, so a swapped channel or case shows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyogrio.raw
import rasterio
import shapely
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin

SHAPE = (16, 16, 8)  # nibabel (I, J, K)
SPACING = (1.5, 1.0, 2.5)  # mm along i, j, k
UTM = "EPSG:32633"
GRID = from_origin(500000.0, 4000000.0, 10.0, 10.0)  # 10 m pixels, north-up


def affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    out = np.diag([*spacing, 1.0])
    out[:3, 3] = (-10.0, 20.0, 5.0)
    return out


def write_nifti(path: Path, data: np.ndarray, aff: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine(SPACING) if aff is None else aff), str(path))
    return path


def to_store(data: np.ndarray) -> np.ndarray:
    """nibabel (I, J, K[, C]) -> the store's (C, K, J, I) (or (K, J, I) for a label map)."""
    if data.ndim == 3:
        return np.transpose(data, (2, 1, 0))
    return np.transpose(data, (3, 2, 1, 0))


def volume(case: int, channel: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A channel's voxels: distinct per case and channel, int16."""
    return (np.arange(np.prod(shape)).reshape(shape) % 97 + 1000 * channel + 100 * case).astype(np.int16)


def label_volume(case: int, values: list[int], shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A label map using every value of ``values`` in slabs along i, shifted per case."""
    i = (np.arange(shape[0]) + case) % len(values)
    out = np.asarray(values, dtype=np.uint8)[i][:, None, None]
    return np.broadcast_to(out, shape).copy()


def nnunet_dataset(root: Path, *, cases: tuple[str, ...] = ("liver_001", "liver_002"),
                   channels: tuple[str, ...] = ("T1", "T2"), labels: dict[str, Any] | None = None,
                   name: str = "Dataset042_Tiny", label_values: list[int] | None = None) -> dict[str, dict]:
    """An nnU-Net v2 raw dataset: ``<case>_<XXXX>.nii.gz`` per channel, ``labelsTr/<case>.nii.gz``."""
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    values = label_values or sorted(v for v in labels.values() if isinstance(v, int))
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
           "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(doc, indent=2))
    expected = {}
    for n, case in enumerate(cases):
        chans = [volume(n, c) for c in range(len(channels))]
        for c, data in enumerate(chans):
            write_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", data)
        lab = label_volume(n, values)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", lab)
        expected[case] = {"image": np.stack([to_store(d) for d in chans]), "labels": to_store(lab)}
    return expected


def msd_dataset(root: Path, *, cases: tuple[str, ...] = ("BRATS_001", "BRATS_002"),
                modalities: tuple[str, ...] = ("FLAIR", "T1w"), labels: dict[int, str] | None = None,
                four_d: bool = True, name: str = "BrainTumour") -> dict[str, dict]:
    """An original Decathlon task: dataset.json lists ``training``; one (4-D when several modalities) NIfTI
    per case, channels on the fourth axis; a macOS ``._`` fork beside each file, as in the MSD archives."""
    labels = labels or {0: "background", 1: "edema", 2: "enhancing tumour"}
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "description": "tiny", "tensorImageSize": "4D" if four_d else "3D",
           "modality": {str(i): m for i, m in enumerate(modalities)},
           "labels": {str(k): v for k, v in labels.items()}, "numTraining": len(cases), "numTest": 0,
           "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
           "test": []}
    (root / "dataset.json").write_text(json.dumps(doc, indent=2))
    expected = {}
    for n, case in enumerate(cases):
        chans = [volume(n, c) for c in range(len(modalities))]
        data = np.stack(chans, axis=-1) if four_d else chans[0]
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", data)
        lab = label_volume(n, sorted(labels))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", lab)
        for folder in ("imagesTr", "labelsTr"):
            (root / folder / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
        expected[case] = {"image": np.stack([to_store(d) for d in chans]), "labels": to_store(lab)}
    return expected


# --------------------------------------------------------------------------- geo


def write_geotiff(path: Path, data: np.ndarray, *, crs: str | None = UTM, transform: Affine | None = GRID,
                  nodata: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    data = data[None] if data.ndim == 2 else data
    profile: dict[str, Any] = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1],
                               "count": data.shape[0], "dtype": str(data.dtype), "nodata": nodata}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a label raster without CRS is meant
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def raster_image(case: int = 0, bands: int = 2, size: int = 64) -> np.ndarray:
    """(bands, size, size) uint16, distinct per band and case, never 0 (0 is nodata where declared)."""
    base = np.arange(size * size, dtype=np.uint16).reshape(size, size) % 251 + 1
    return np.stack([base + 300 * b + 1000 * case for b in range(bands)]).astype(np.uint16)


def raster_labels(case: int = 0, values: tuple[int, ...] = (0, 3, 7), size: int = 64) -> np.ndarray:
    """(size, size) uint8 using every value of ``values`` in bands of columns, shifted per case."""
    cols = (np.arange(size) // 8 + case) % len(values)
    return np.broadcast_to(np.asarray(values, dtype=np.uint8)[cols][None, :], (size, size)).copy()


def pixel_box(row0: int, col0: int, row1: int, col1: int, transform: Affine = GRID) -> shapely.Polygon:
    """The polygon covering pixels [row0, row1) x [col0, col1) exactly, in the grid's CRS."""
    x0, y0 = transform * (col0, row0)
    x1, y1 = transform * (col1, row1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def write_vector(path: Path, geoms: list[Any], fields: dict[str, list[Any]] | None = None,
                 crs: str = UTM) -> Path:
    """A GeoJSON or GeoPackage layer (by suffix) of ``geoms`` with ``fields``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or {}
    driver = "GPKG" if path.suffix.lower() == ".gpkg" else "GeoJSON"
    pyogrio.raw.write(path, geometry=shapely.to_wkb(np.asarray(geoms, dtype=object)),
                      field_data=[np.asarray(v) for v in fields.values()], fields=list(fields), crs=crs,
                      geometry_type="Polygon", driver=driver)
    return path


def geo_raster_dataset(root: Path, *, stems: tuple[str, ...] = ("tile_a", "tile_b"),
                       values: tuple[int, ...] = (0, 3, 7), label_crs: bool = False,
                       nodata: int | None = None) -> dict[str, dict]:
    """images/<stem>.tif (2 bands, EPSG:32633) with labels/<stem>.tif on the same grid (no CRS unless
    ``label_crs``); with ``nodata`` the image's top-left 4x4 pixels are nodata."""
    expected = {}
    for n, stem in enumerate(stems):
        image = raster_image(n)
        if nodata is not None:
            image[:, :4, :4] = nodata
        write_geotiff(root / "images" / f"{stem}.tif", image, nodata=nodata)
        lab = raster_labels(n, values)
        write_geotiff(root / "labels" / f"{stem}.tif", lab, crs=UTM if label_crs else None,
                      transform=GRID if label_crs else None)
        expected[stem] = {"image": image, "labels": lab}
    return expected


def geo_vector_dataset(root: Path, boxes: list[tuple[int, int, int, int]], fields: dict[str, list[Any]] | None,
                       *, stem: str = "scene", suffix: str = ".geojson", crs: str = UTM) -> Path:
    """images/<stem>.tif (64x64, EPSG:32633) with labels/<stem><suffix>: one polygon per pixel box,
    its coordinates transformed to ``crs`` (corners only, so the box comes back exactly)."""
    write_geotiff(root / "images" / f"{stem}.tif", raster_image(0))
    geoms = [pixel_box(*b) for b in boxes]
    if crs != UTM:
        from rasterio.warp import transform_geom
        from shapely.geometry import mapping, shape

        geoms = [shape(transform_geom(UTM, crs, mapping(g))) for g in geoms]
    return write_vector(root / "labels" / f"{stem}{suffix}", geoms, fields, crs)
