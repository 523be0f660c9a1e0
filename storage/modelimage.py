"""The input image in model space, stored once per run beside the ingested copy.

Every window task reads its region plus up to one ROI past it, so a lazily
resampled image would be interpolated up to 2^d times over.  Writing a
volume's model-space image once (chunk by chunk, from
:func:`storage.resample.to_model`) makes resampling one pass, lets
whole-image statistics (z-score, percentiles) read it cheaply, and lets an
interrupted run reuse it.  Its geometry is a :class:`VolumeGeometry` like any
ingested input's, so a label map can be written in model space too
(``--model-space keep``).  A raster is different: its warp reads only the
pixels its taps name, so the windows warp their own regions on read
(:mod:`storage.modelview`) and only the model grid's valid mask is stored
here (:func:`model_mask`): the model grid may reach past the input's
footprint (a rotated CRS change, a partial last pixel).
"""

from __future__ import annotations

import base64
import shutil
from functools import partial
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import nibabel as nib
import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header

from storage.geometry import RasterGeometry, VolumeGeometry
from storage.grids import GridMapping
from storage.layout import (ARRAY_CONFIG, ImageStore, StoreMeta, create_image_store, identity_digest,
                            is_complete, mark_complete, open_image_store)
from storage.resample import to_model
from storage.rastergrid import RasterMapping

MAPPING_ATTR = "segflow_model_space"


def model_geometry(geometry: VolumeGeometry, mapping: GridMapping) -> VolumeGeometry:
    """The input's geometry moved to the model grid: its header, with the model's shape and affine."""
    cls = Nifti2Header if geometry.nifti_version == 2 else Nifti1Header
    hdr = cls(binaryblock=base64.b64decode(geometry.header_b64), check=False)
    k, j, i = mapping.model_shape
    affine = np.asarray(mapping.model_affine, dtype=np.float64)
    hdr.set_data_shape((i, j, k))
    hdr.set_data_dtype(np.float32)
    hdr.set_slope_inter(1.0, 0.0)
    qcode = int(geometry.qform_code) or 1
    scode = int(geometry.sform_code) or 1
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    hdr.set_xyzt_units("mm", hdr.get_xyzt_units()[1])  # the model grid is in mm (storage.geometry.affine_mm)
    zooms = [float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))]
    return geometry.model_copy(update={
        "shape": [i, j, k], "affine": affine.tolist(), "qform": affine.tolist(), "sform": affine.tolist(),
        "qform_code": qcode, "sform_code": scode, "zooms": zooms, "orientation": list(nib.aff2axcodes(affine)),
        "header_b64": base64.b64encode(hdr.binaryblock).decode("ascii"), "dtype": "float32"})


def model_image(store: ImageStore, mapping: GridMapping, path: str | PathLike[str], *, chunk: int,
                interpolation: str, compute: Callable[[Any], Any]) -> tuple[ImageStore, bool]:
    """The model-space image store at ``path`` (and whether an earlier complete one was reused).

    ``compute`` runs the dask writes (a distributed client's, so the workers
    resample in parallel).  The store is reused only when complete and made
    from the same input content with the same mapping and interpolation.
    """
    path = Path(path)
    key = identity_digest({"input_sha256": store.meta.source.sha256, "mapping": mapping.to_json(),
                           "interpolation": interpolation, "chunk": chunk})
    if is_complete(path):
        try:
            found = open_image_store(path)
            if found.group.attrs.get(MAPPING_ATTR, {}).get("key") == key:
                return found, True
        except Exception:  # noqa: BLE001 - an unreadable leftover is simply rebuilt
            pass
    shutil.rmtree(path, ignore_errors=True)
    geometry = store.meta.geometry
    assert isinstance(geometry, VolumeGeometry)
    meta = StoreMeta(source=store.meta.source, geometry=model_geometry(geometry, mapping),
                     channel_names=store.meta.channel_names, spatial_dims=3)
    src = da.from_zarr(store.image)
    moved = to_model(src, mapping, chunks=chunk, mode=interpolation)  # type: ignore[arg-type]
    chunks = (1,) + tuple(min(chunk, n) for n in moved.shape[1:])
    out = create_image_store(path, meta=meta, shape=tuple(moved.shape), dtype="float32", chunks=chunks,
                             with_mask=False)
    out.group.attrs[MAPPING_ATTR] = {"key": key, "mapping": mapping.to_json(), "interpolation": interpolation}
    compute(da.store(moved.rechunk(chunks).astype(np.float32), out.image, lock=False, compute=False))
    mark_complete(out.group)
    return open_image_store(path), False


def raster_model_geometry(geometry: RasterGeometry, mapping: RasterMapping) -> RasterGeometry:
    """The input's raster geometry moved to the model grid: its CRS, transform and size; float32, a mask."""
    from rasterio.crs import CRS
    from rasterio.enums import WktVersion

    crs = CRS.from_user_input(mapping.model.crs) if mapping.model.crs else None
    return geometry.model_copy(update={
        "width": mapping.model.width, "height": mapping.model.height, "transform": mapping.model.transform,
        "crs_wkt": crs.to_wkt(version=WktVersion.WKT2_2019) if crs is not None else None,
        "epsg": crs.to_epsg() if crs is not None else None, "nodata": None, "dtype": "float32",
        "mask_source": "mask"})


def _reuse(path: Path, key: str) -> ImageStore | None:
    if is_complete(path):
        try:
            found = open_image_store(path)
            if found.group.attrs.get(MAPPING_ATTR, {}).get("key") == key:
                return found
        except Exception:  # noqa: BLE001 - an unreadable leftover is simply rebuilt
            pass
    return None


def model_mask(store: ImageStore, mapping: RasterMapping, work: str | PathLike[str], chunk: int, *,
               compute: Callable[[Any], Any]) -> Any:
    """The model grid's valid mask for a raster (a zarr array in ``work``), or None when every model pixel is
    valid.  A model pixel is valid where GDAL's warp gives it a value (:func:`storage.warp.validity_kernel`:
    some valid input pixel it covers when coarsening, the one under its centre otherwise).  Each task writes its
    chunk and says whether it is all valid; the mask is kept only when one is not.  Cheap next to the image: one
    byte a model pixel, and nothing of the image is read.
    """
    import zarr

    from storage.warp import separable_axes, valid_on, validity_kernel

    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = mapping.model_shape
    kernel = validity_kernel(mapping.forward)
    axes = separable_axes(mapping.input, mapping.model, kernel, mapping.scale)
    if store.mask is None and axes is not None and all(
            a.taps(kernel, 0, n).inside.all() for a, n in zip(axes, shape)):
        return None  # every model pixel reaches an input pixel (validity_kernel's taps), and every one is valid
    chunks = tuple(min(chunk, n) for n in shape)
    if store.mask is None:
        ones = da.ones(mapping.input_shape, dtype=np.uint8, chunks=tuple(store.image.chunks[1:]))
    else:
        ones = da.from_zarr(store.mask).astype(np.uint8)
    valid = valid_on(ones, mapping, chunks)
    target = zarr.create_array(str(work / "valid"), shape=shape, chunks=chunks, dtype=bool, fill_value=False,
                               config=ARRAY_CONFIG)
    flags = valid.map_blocks(partial(_write_mask, target), dtype=bool, chunks=(1, 1))
    if bool(compute(flags.all())):
        shutil.rmtree(work / "valid")
        return None
    return target


def _write_mask(target: Any, block: np.ndarray, block_info: Any = None) -> np.ndarray:
    (y0, y1), (x0, x1) = block_info[0]["array-location"]
    target[y0:y1, x0:x1] = block
    return np.array([[bool(block.all())]])


__all__ = ["MAPPING_ATTR", "model_geometry", "model_image", "model_mask", "raster_model_geometry"]
