"""``segflow info`` and ``segflow model inspect --stac``: JSON descriptions of segflow artefacts and models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.errors import InputError, UnsupportedFormatError


def _zarr(path: Path) -> dict[str, Any]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    arrays = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
              for name, a in group.arrays()}
    return {"type": "zarr store", "path": str(path), "arrays": arrays, "attributes": dict(group.attrs)}


def _geotiff(path: Path) -> dict[str, Any]:
    import rasterio

    with rasterio.open(path) as src:
        tags = src.tags()
        info: dict[str, Any] = {
            "type": "GeoTIFF", "path": str(path), "width": src.width, "height": src.height, "count": src.count,
            "dtype": src.dtypes[0], "crs": src.crs.to_string() if src.crs else None,
            "transform": list(src.transform)[:6], "nodata": src.nodata,
            "overviews": src.overviews(1), "block_shapes": src.block_shapes[:1],
        }
    for key in ("CLASSES", "SEGFLOW_PROVENANCE"):
        if key in tags:
            info[key.lower()] = json.loads(tags.pop(key))
    info["tags"] = tags
    return info


def _nifti(path: Path) -> dict[str, Any]:
    import nibabel as nib

    img = nib.load(str(path))
    hdr = img.header
    info: dict[str, Any] = {
        "type": f"NIfTI-{2 if isinstance(hdr, nib.Nifti2Header) else 1}", "path": str(path),
        "shape": list(img.shape), "dtype": str(hdr.get_data_dtype()), "zooms": [float(z) for z in hdr.get_zooms()],
        "affine": img.affine.tolist(), "orientation": list(nib.aff2axcodes(img.affine)),
        "qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"]),
        "intent": hdr.get_intent()[0],
    }
    for ext in getattr(hdr, "extensions", []):
        text = ext.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        try:
            info["provenance"] = json.loads(text.rstrip("\0"))
        except ValueError:
            info.setdefault("extensions", []).append(text.rstrip("\0"))
    return info


def model_stac(path: str | Path, *, trust_bundle: bool = False) -> dict[str, Any]:
    """``segflow model inspect --stac``: the model as a STAC item with the MLM extension, weights as its asset."""
    from segmentation.mlm import model_item
    from segmentation.modeldir import load_model

    return model_item(load_model(path, trust_bundle=trust_bundle))


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if (path / "card.json").is_file():
            from segmentation.modeldir import read_card

            return {"type": "model directory", "path": str(path), "card": read_card(path).model_dump(mode="json")}
        if (path / "zarr.json").is_file():
            return _zarr(path)
        raise UnsupportedFormatError(path, "directory is neither a zarr store nor a model directory")
    if name.endswith(".json"):
        return json.loads(path.read_text())
    if name.endswith((".tif", ".tiff")):
        return _geotiff(path)
    if name.endswith((".nii", ".nii.gz")):
        return _nifti(path)
    raise UnsupportedFormatError(path, "not a segflow artefact (zarr, GeoTIFF, NIfTI, JSON or model directory)")
