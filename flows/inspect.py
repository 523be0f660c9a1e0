"""``segflow info`` and ``segflow model inspect``: what a segflow artefact or a model is, checked as a run would.

``info`` describes a store, an output, a provenance record or a model
directory as JSON.  For a label output (a GeoTIFF with its class table, a
NIfTI with its colour table) it adds the classes with their pixels or voxels
and their area in hectares or volume in millilitres (:func:`label_table`): from
the run's own count in the sidecar provenance when the sidecar is the
output's, else counted from the file chunk by chunk, so a large output never
sits in memory.  ``model inspect`` loads the model exactly as ``segment`` does
(:func:`inspect_model`): a card that reads but whose weights ``segment`` would
refuse (a pickle checkpoint, a truncated file) is an error, not a card printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from storage import jsontext
from storage.classes import LABEL_TABLE_HEADER, table_names
from storage.errors import CorruptInputError, InputError, StoreError, UnsupportedFormatError
from storage.rasteropen import open_raster, without_crs_ok

if TYPE_CHECKING:
    from segmentation import LoadedModel

COUNT_ROWS = 1024  # GeoTIFF rows counted at a time


def _zarr(path: Path) -> dict[str, Any]:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        # its arrays' zarr.json files are read here: a data type or codec zarr does not know raised past this
        arrays = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
                  for name, a in group.arrays()}
    except Exception as exc:  # zarr raises several types for a damaged zarr.json  # noqa: BLE001
        raise StoreError(path, f"not a readable zarr v3 group ({type(exc).__name__}: {exc})") from None
    return {"type": "zarr store", "path": str(path), "arrays": arrays, "attributes": dict(group.attrs)}


def _geotiff(path: Path) -> dict[str, Any]:
    from storage.probe import check_blocks

    with without_crs_ok(), open_raster(path) as src:
        # a file cut short had been shown as sound, and one cut inside its header with no CRS and an identity
        # transform (its GeoTIFF keys past the cut): refused as `segment` refuses it, from the block table
        check_blocks(src, path)
        tags = src.tags()
        info: dict[str, Any] = {
            "type": "GeoTIFF", "path": str(path), "width": src.width, "height": src.height, "count": src.count,
            "dtype": src.dtypes[0], "crs": src.crs.to_string() if src.crs else None,
            "transform": list(src.transform)[:6], "nodata": src.nodata,
            "overviews": src.overviews(1), "block_shapes": src.block_shapes[:1],
        }
    for key in ("CLASSES", "SEGFLOW_PROVENANCE"):
        if key in tags:
            try:
                info[key.lower()] = jsontext.loads(tags.pop(key))
            except ValueError as exc:  # a foreign or damaged tag: shown as it is, not a traceback
                info[key.lower()] = {"unreadable": f"not JSON ({getattr(exc, 'msg', exc)})"}
    info["tags"] = tags
    return info


def _load_nifti(path: Path) -> Any:
    """The NIfTI image (data not read), without nibabel's header notes on the terminal."""
    import nibabel as nib

    from storage.niftiopen import NIFTI_READ_ERRORS, error_text, quietly

    try:
        with quietly():
            return nib.load(str(path))
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(path, f"cannot read the NIfTI header: {error_text(exc)}") from None


def _nifti(path: Path) -> dict[str, Any]:
    import nibabel as nib

    img = _load_nifti(path)
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
            info["provenance"] = jsontext.loads(text.rstrip("\0"))
        except ValueError:
            info.setdefault("extensions", []).append(text.rstrip("\0"))
    return info


def _classes_from_color_table(texts: list[str]) -> list[dict[str, Any]] | None:
    """A NIfTI output's classes from the label table segflow embeds (names as the card has them)."""
    for text in texts:
        if text.startswith(LABEL_TABLE_HEADER):
            return [{"value": v, "name": n} for v, n in sorted(table_names(text).items())]
    return None


def _recorded_counts(path: Path) -> dict[str, Any] | None:
    """The run's label histogram from the output's sidecar, when the sidecar names this very file as an output.

    A tile cut from a mosaic has no sidecar of its own (its stem differs), so
    the mosaic's whole-image histogram is never taken for it.  The file must
    still be the one the sidecar hashed: an edited label map's counts are its
    own, counted from it (they were the run's, stale).
    """
    from storage.provenance import sha256_output, sidecar_path

    sidecar = sidecar_path(path)
    try:
        record = jsontext.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    counts = (record.get("statistics") or {}).get("label_pixels") if isinstance(record, dict) else None
    outputs = record.get("outputs") or {}
    if not isinstance(counts, dict) or path.name not in outputs:
        return None
    try:
        if sha256_output(path) != outputs[path.name]:
            return None
    except OSError:
        return None
    return {"label_pixels": counts, "source": str(sidecar)}


def _raster_counts(path: Path) -> Iterator[np.ndarray]:
    from rasterio.windows import Window

    from storage.rasteropen import GDAL_ERRORS, describe_window, gdal_message

    with without_crs_ok(), open_raster(path) as src:
        for row in range(0, src.height, COUNT_ROWS):
            window = Window(0, row, src.width, min(COUNT_ROWS, src.height - row))
            try:
                block = src.read(1, window=window)
            except GDAL_ERRORS as exc:
                raise CorruptInputError(path, f"cannot read {describe_window(window)} to count its labels: "
                                              f"{gdal_message(exc)}") from None
            yield block


def _volume_counts(path: Path) -> Iterator[np.ndarray]:
    from storage.niftiopen import NIFTI_READ_ERRORS, error_text

    img = _load_nifti(path)
    depth = img.shape[2] if len(img.shape) > 2 else 1
    plane = int(np.prod(img.shape[:2]))
    step = max(1, (64 << 20) // max(plane * img.get_data_dtype().itemsize, 1))  # about 64 MB a slab
    for k in range(0, depth, step):  # in file order, so a gzip stream is read once, forwards
        try:
            block = np.asarray(img.dataobj[:, :, k:k + step] if len(img.shape) > 2 else img.dataobj)
        except NIFTI_READ_ERRORS as exc:
            raise CorruptInputError(path, f"cannot read planes {k}-{min(depth, k + step) - 1} to count its labels: "
                                          f"{error_text(exc)}") from None
        yield block


def counted(blocks: Iterator[np.ndarray]) -> dict[str, int]:
    """A label histogram over ``blocks`` (non-negative integer labels), one block at a time."""
    total = np.zeros(0, dtype=np.int64)
    for block in blocks:
        counts = np.bincount(np.asarray(block, dtype=np.int64).ravel())
        if counts.size > total.size:
            counts[:total.size] += total
            total = counts
        else:
            total[:counts.size] += counts
    return {str(v): int(n) for v, n in enumerate(total) if n}


def label_table(path: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """A label output's classes with their pixel or voxel counts and their area (ha) or volume (mL).

    None when the file is not a segflow label output (no class table in it).
    The cell size is the one the nightly report uses (:mod:`storage.probe`):
    none, with the reason, for a raster in degrees or without a CRS.
    """
    from flows.report import label_measures
    from storage.header import pixel_hectares, voxel_millilitres

    raster = info.get("type") == "GeoTIFF"
    classes = info.get("classes") if raster else _classes_from_color_table(info.get("extensions") or [])
    if not isinstance(classes, list) or not classes:
        return None
    if raster:
        import rasterio

        with without_crs_ok(), rasterio.open(path) as src:
            cell, note = pixel_hectares(src.transform, src.crs, (src.height, src.width))
        unit = "ha"
    else:
        img = _load_nifti(path)
        cell, note = voxel_millilitres(img.affine, img.header.get_xyzt_units()[0])
        unit = "mL"
    statistics = _recorded_counts(path)
    if statistics is None:
        statistics = {"label_pixels": counted(_raster_counts(path) if raster else _volume_counts(path)),
                      "source": "the file itself, counted chunk by chunk"}
    return {"measure": "area_ha" if unit == "ha" else "volume_ml", "unit": unit, "cell_size": cell,
            "note": note, "source": statistics["source"],
            "rows": label_measures(statistics, classes, cell, unit)}


def inspect_model(path: str | Path, *, trust_bundle: bool = False) -> "LoadedModel":
    """The model at ``path`` loaded as ``segment`` loads it (card, weights read, hashed and fitted to the
    network), so that ``model inspect`` refuses what ``segment`` refuses, in the same words (a directory whose
    only weights are a pickle checkpoint is told how to make it usable)."""
    from segmentation import models
    from segmentation.modeldir import load_model
    from storage.errors import ModelError

    loaded = load_model(path, trust_bundle=trust_bundle)
    try:  # a card whose own window the network cannot take: segment refuses it, so inspect does
        models.check_roi(loaded.module, list(loaded.card.inference.roi), loaded.card.architecture.name)
    except ModelError as exc:
        raise ModelError(path, f"its card's inference.roi: {exc.problem}") from None
    return loaded


def model_stac(path: str | Path, *, trust_bundle: bool = False) -> dict[str, Any]:
    """``segflow model inspect --stac``: the model as a STAC item with the MLM extension, weights as its asset."""
    from segmentation.mlm import model_item
    from segmentation.modeldir import load_model

    return model_item(load_model(path, trust_bundle=trust_bundle))


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_symlink() and not path.exists():  # "no such file" hid a dangling link or a loop
        from storage.inputfiles import check_readable_file

        check_readable_file(path)
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
        try:
            return jsontext.read(path)
        except (OSError, ValueError) as exc:
            raise CorruptInputError(path, f"is not readable JSON: {exc}") from None
    if name.endswith((".tif", ".tiff")):
        return _with_label_table(path, _geotiff(path))
    if name.endswith((".nii", ".nii.gz")):
        return _with_label_table(path, _nifti(path))
    if name.endswith((".gpkg", ".geojson", ".parquet")):
        return _with_sidecar(path, _polygons(path))
    if name.endswith(".dcm"):
        return _with_sidecar(path, _dicom_seg(path))
    if name.endswith(".png"):
        return _with_sidecar(path, _picture(path))
    raise UnsupportedFormatError(path, "not a segflow artefact (zarr, GeoTIFF, NIfTI, polygons, DICOM SEG, "
                                       "quicklook PNG, JSON or model directory)")


def _with_sidecar(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The provenance sidecar that lists an extra output (polygons, SEG, picture), as ``verify`` finds it."""
    from storage.provenance import sidecar_for

    sidecar = sidecar_for(path)
    return {**info, "provenance_sidecar": str(sidecar) if sidecar.is_file() else None}


def _polygons(path: Path) -> dict[str, Any]:
    """A label layer segflow wrote (``--vector``): CRS, polygons, and each class's count and hectares."""
    import pyogrio

    try:
        if path.name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["class", "name", "area_ha"])
            columns = {k: table.column(k).to_pylist() for k in ("class", "name", "area_ha")}
            geo = json.loads((pq.read_metadata(path).metadata or {}).get(b"geo", b"{}"))
            crs = ((geo.get("columns") or {}).get(geo.get("primary_column", "geometry")) or {}).get("crs")
            if crs is not None:  # PROJJSON, as GeoParquet stores it: said as the other layers say it
                from pyproj import CRS

                crs = CRS.from_user_input(crs).to_string()
            info: dict[str, Any] = {"crs": crs, "features": table.num_rows}
        else:
            meta = pyogrio.read_info(path)
            _, _, _, fields = pyogrio.raw.read(path, read_geometry=False, columns=["class", "name", "area_ha"])
            columns = dict(zip(("class", "name", "area_ha"), (f.tolist() for f in fields)))
            info = {"crs": meta.get("crs"), "features": int(meta.get("features") or 0)}
    except Exception as exc:  # noqa: BLE001 - pyogrio, pyarrow and GDAL each raise their own kinds
        raise CorruptInputError(path, f"is not a readable polygon layer with the columns class, name and area_ha "
                                      f"({' '.join(str(exc).split())[:200]})") from None
    classes: dict[int, dict[str, Any]] = {}
    for value, label, area in zip(columns["class"], columns["name"], columns["area_ha"]):
        row = classes.setdefault(int(value), {"value": int(value), "name": label, "polygons": 0, "area_ha": 0.0})
        row["polygons"] += 1
        row["area_ha"] += float(area)
    for row in classes.values():
        row["area_ha"] = round(row["area_ha"], 6)  # sums of float areas: no 136.89000000000001
    return {"type": "polygons", "path": str(path), **info, "classes": [classes[v] for v in sorted(classes)]}


def _dicom_seg(path: Path) -> dict[str, Any]:
    """A DICOM SEG segflow wrote: its series, the series it segments, and its segments."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a file that is not DICOM
        raise CorruptInputError(path, f"is not readable DICOM ({' '.join(str(exc).split())[:200]})") from None
    if getattr(ds, "Modality", None) != "SEG":
        raise UnsupportedFormatError(path, f"is DICOM of modality {getattr(ds, 'Modality', '?')}, not a "
                                           "segmentation (SEG)")
    referenced = [str(s.SeriesInstanceUID) for s in getattr(ds, "ReferencedSeriesSequence", [])
                  if "SeriesInstanceUID" in s]
    return {"type": "DICOM SEG", "path": str(path), "segmentation_type": str(ds.get("SegmentationType", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")), "referenced_series": referenced,
            "frames": int(ds.get("NumberOfFrames", 0) or 0),
            "segments": [{"number": int(s.SegmentNumber), "label": str(s.get("SegmentLabel", "")),
                          "algorithm": str(s.get("SegmentAlgorithmName", ""))}
                         for s in getattr(ds, "SegmentSequence", [])]}


def _picture(path: Path) -> dict[str, Any]:
    """A quicklook: its size (the labels it shows are in the label map's provenance)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return {"type": "PNG", "path": str(path), "width": img.width, "height": img.height, "mode": img.mode}
    except (OSError, UnidentifiedImageError) as exc:
        raise CorruptInputError(path, f"is not a readable PNG ({exc})") from None


def _with_label_table(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    table = label_table(path, info)
    if table is not None:
        info["label_table"] = table
    return info
