"""The input image in model space, stored once per run beside the ingested copy.

Every window task reads its region plus up to one ROI past it, so a lazily
resampled image would be interpolated up to 2^d times over.  Writing the
model-space image once (chunk by chunk, from :func:`storage.resample.to_model`)
makes resampling one pass, lets whole-image statistics (z-score, percentiles)
read it cheaply, and lets an interrupted run reuse it.  Its geometry is a
:class:`VolumeGeometry` like any ingested volume's, so a label map can be
written in model space too (``--model-space keep``).
"""

from __future__ import annotations

import base64
import shutil
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import dask.array as da
import nibabel as nib
import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header

from storage.geometry import VolumeGeometry
from storage.grids import GridMapping
from storage.layout import (ImageStore, StoreMeta, create_image_store, identity_digest, is_complete,
                            mark_complete, open_image_store)
from storage.resample import to_model

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


__all__ = ["MAPPING_ATTR", "model_geometry", "model_image"]
