"""The training data's grid against the card's model space: a model learns where ``segment`` will show it inputs.

``segment`` takes each input to the card's model space (its spacing or ground sample distance, orientation and
CRS: :func:`flows.modelspace.card_mapping`) before the network sees it.  Training had read its cases on their
own grids, so a card saying 20 m trained on 10 m tiles and then segmented every tile at 20 m, and a card saying
nothing left ``segment`` to run 20 m scenes through a network that had only seen 10 m ones, both without a
word.  Now:

- a case off the card's grid is taken there before training, by the functions ``segment`` uses, into the
  run's work folder: a volume by :func:`storage.resample.to_model` (MONAI's ``Orientationd`` + ``Spacingd``,
  the card's interpolation; :func:`volume_in_model_space`), a raster by :func:`storage.warp.warp` (the card's
  GDAL kernel; :func:`raster_in_model_space`); labels by nearest neighbour.  A Decathlon dataset's scans of
  many voxel sizes train at the card's one, as nnU-Net's plans do;
- a card that declares no spacing gets the training data's, when every case has a geometry and they all share
  one pixel or voxel size in metres or millimetres (:func:`with_training_spacing`), so ``segment`` takes inputs
  of other sizes to the one the network learned.  Cases of mixed sizes record none.

Pictures (VOC, Cityscapes, COCO) have no geometry: neither rule applies to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segmentation.card import MODEL_SPACE_VERSION, RASTER_MODEL_SPACE_VERSION, ModelCard
from storage.errors import IncompatibleInputError, InvalidInputError
from storage.geometry import RasterGeometry, VolumeGeometry


@dataclass(frozen=True)
class CaseGrid:
    """Where a training case's pixels lie: its geometry (None for a picture) and spatial shape."""

    name: str
    geometry: Any
    shape: tuple[int, ...]


def _mapping(card: ModelCard, geometry: Any, image: Any, name: str | None) -> Any:
    """The case's map to the card's model grid (None: it is on it), a grid that has none refused naming the case."""
    from flows.modelspace import card_mapping

    try:
        return card_mapping(card, geometry, tuple(int(n) for n in image.shape[1:]))
    except InvalidInputError as exc:
        raise IncompatibleInputError(name, f"{exc.problem} (model {card.name!r}'s model space)") from None


def in_model_space(card: ModelCard, geometry: Any, image: Any, labels: Any, valid: Any, work: Path, ignore: int,
                   name: str | None = None) -> tuple[Any, Any, Any] | None:
    """(image, labels, valid mask or None) of a case on the card's model grid, as zarr arrays under ``work``;
    None when the case is on it already, or has no geometry (a picture)."""
    if isinstance(geometry, VolumeGeometry):
        return volume_in_model_space(card, geometry, image, labels, work, name)
    if isinstance(geometry, RasterGeometry):
        return raster_in_model_space(card, geometry, image, labels, valid, work, ignore, name)
    return None


VOLUME_CHUNK = 64  # the resampled copy's chunk edge: patches read a few chunks each


def volume_in_model_space(card: ModelCard, geometry: Any, image: Any, labels: Any, work: Path,
                          name: str | None = None) -> tuple[Any, Any, None] | None:
    """(image, labels, None: no mask) of a volume case on the card's model grid, stored as zarr arrays under
    ``work``; None when the case is on it already, or is no volume.  ``image`` is (C, K, J, I), ``labels``
    (K, J, I), as ingest stores them."""
    import dask.array as da
    import zarr

    from storage.grids import GridMapping
    from storage.layout import ARRAY_CONFIG
    from storage.resample import to_model

    mapping = _mapping(card, geometry, image, name) if isinstance(geometry, VolumeGeometry) else None
    if not isinstance(mapping, GridMapping):
        return None
    shape = tuple(int(n) for n in image.shape[1:])
    chunks = tuple(min(VOLUME_CHUNK, n) for n in shape)
    img = da.from_array(image, chunks=(int(image.shape[0]), *chunks)).astype(np.float32)
    lab = da.from_array(labels, chunks=chunks)[None].astype(np.float32)
    moved = to_model(img, mapping, chunks=VOLUME_CHUNK, mode=card.input.interpolation)
    moved_labels = to_model(lab, mapping, chunks=VOLUME_CHUNK, mode="nearest")[0].astype(np.dtype(labels.dtype))
    work.mkdir(parents=True, exist_ok=True)
    out_chunks = tuple(min(VOLUME_CHUNK, n) for n in moved.shape[1:])
    image_out = zarr.create_array(str(work / "model-image"), shape=moved.shape, dtype="float32",
                                  chunks=(int(moved.shape[0]), *out_chunks), config=ARRAY_CONFIG)
    labels_out = zarr.create_array(str(work / "model-labels"), shape=moved_labels.shape, dtype=moved_labels.dtype,
                                   chunks=out_chunks, config=ARRAY_CONFIG)
    da.store([moved.rechunk(image_out.chunks), moved_labels.rechunk(labels_out.chunks)], [image_out, labels_out],
             lock=False, scheduler="threads")
    return image_out, labels_out, None  # every model voxel has a value (MONAI's border padding): no mask


RASTER_CHUNK = 512


def raster_in_model_space(card: ModelCard, geometry: Any, image: Any, labels: Any, valid: Any, work: Path,
                          ignore: int, name: str | None = None) -> tuple[Any, Any, Any] | None:
    """(image, labels, valid) of a raster case on the card's model grid (its GSD and CRS), as zarr arrays under
    ``work``; None when the case is on it already, or is no raster.  The image is warped by the card's kernel
    (:mod:`storage.warp`, which segment's windows use: bilinear refining, average coarsening), the labels by
    nearest neighbour; model pixels no valid input pixel reaches are invalid, and their labels ``ignore``."""
    import dask.array as da
    import zarr

    from storage.layout import ARRAY_CONFIG
    from storage.rastergrid import RasterMapping
    from storage.warp import valid_on, warp

    mapping = _mapping(card, geometry, image, name) if isinstance(geometry, RasterGeometry) else None
    if not isinstance(mapping, RasterMapping):
        return None
    shape = tuple(int(n) for n in image.shape[1:])
    chunks = tuple(min(RASTER_CHUNK, n) for n in shape)
    img = image if isinstance(image, da.Array) else da.from_array(image, chunks=(int(image.shape[0]), *chunks))
    mask = None if valid is None else da.from_array(valid, chunks=chunks)
    lab = da.from_array(labels, chunks=chunks)[None].astype(np.float32)
    moved = warp(img.astype(np.float32), mapping.input, mapping.model, mapping.forward, mapping.scale, RASTER_CHUNK,
                 valid=mask, dtype=np.float32)
    moved_labels = warp(lab, mapping.input, mapping.model, "nearest", mapping.scale, RASTER_CHUNK, valid=mask,
                        dtype=np.float32)[0]
    ones = da.ones(shape, dtype=np.uint8, chunks=chunks) if mask is None else mask.astype(np.uint8)
    model_valid = valid_on(ones, mapping, RASTER_CHUNK)
    moved_labels = da.where(model_valid, moved_labels, ignore).astype(np.dtype(labels.dtype))
    work.mkdir(parents=True, exist_ok=True)
    out_chunks = tuple(min(RASTER_CHUNK, n) for n in moved.shape[1:])
    outs = [zarr.create_array(str(work / f"model-{what}"), shape=arr.shape, dtype=arr.dtype,
                              chunks=((int(arr.shape[0]),) if arr.ndim == 3 else ()) + out_chunks,
                              config=ARRAY_CONFIG)
            for what, arr in (("image", moved), ("labels", moved_labels), ("valid", model_valid))]
    da.store([a.rechunk(o.chunks) for a, o in zip((moved, moved_labels, model_valid), outs)], outs, lock=False,
             scheduler="threads")
    return outs[0], outs[1], outs[2]


def with_training_spacing(card: ModelCard, grids: Sequence[CaseGrid]) -> tuple[ModelCard, str | None]:
    """The card with the training data's pixel or voxel size as ``input.spacing`` when it declares none and
    every case shares one; and a line saying so (or why none was recorded), None when nothing applies."""
    from flows.modelspace import card_mapping

    spec = card.input
    raster = spec.spatial_dims == 2
    version = RASTER_MODEL_SPACE_VERSION if raster else MODEL_SPACE_VERSION
    if spec.spacing is not None or spec.crs is not None or spec.orientation is not None or \
            card.card_version < version or not grids or any(g.geometry is None for g in grids):
        return card, None
    first = grids[0].geometry
    if raster and isinstance(first, RasterGeometry):
        from storage.header import linear_unit_metres

        crs = first.rasterio_crs()
        if crs is not None and crs.is_geographic:  # degrees: no one size in metres to record
            return card, None
        # the card's spacing is in metres: a CRS in feet (a US State Plane) had its feet recorded as metres, and
        # then "differed" from its own training cases
        metres = (linear_unit_metres(crs) or 1.0) if crs is not None else 1.0
        spacing, unit = [abs(float(first.transform[4])) * metres, abs(float(first.transform[0])) * metres], "m"
    elif not raster and isinstance(first, VolumeGeometry):
        norms = np.linalg.norm(np.asarray(first.affine_mm(), dtype=np.float64)[:3, :3], axis=0)
        spacing, unit = [float(v) for v in norms[::-1]], "mm"
    else:
        return card, None
    candidate = card.model_copy(update={"input": spec.model_copy(update={"spacing": spacing,
                                                                        "spacing_unit": unit})})
    try:
        differ = [g.name for g in grids if card_mapping(candidate, g.geometry, g.shape) is not None]
    except InvalidInputError:  # no geotransform, a sheared grid: no size to learn at
        return card, None
    if differ:
        return card, (f"note: the training cases differ in pixel or voxel size ({differ[0]} is not "
                      f"{_size(spacing, unit)}), so the card records none: segment runs inputs on their own grids")
    return candidate, (f"note: the card declared no spacing; it records the training data's, "
                       f"{_size(spacing, unit)} (input.spacing): segment resamples inputs of other sizes to it")


def _size(spacing: Sequence[float], unit: str) -> str:
    return " x ".join(f"{v:.6g}" for v in spacing) + f" {unit}"
