"""The training data's grid against the card's model space: a model learns where ``segment`` will show it inputs.

``segment`` takes each input to the card's model space (its spacing or ground sample distance, orientation and
CRS: :func:`flows.modelspace.card_mapping`) before the network sees it.  Training read its cases on their own
grids, so a card saying 20 m trained on 10 m tiles and then segmented every tile at 20 m, and a card saying
nothing left ``segment`` to run 20 m scenes through a network that had only seen 10 m ones, both without a
word.  Until training resamples its cases itself, two rules:

- a case whose grid is not the card's model grid is refused, in one line naming it, before any step
  (:func:`check_grids`);
- a card that declares no spacing gets the training data's, when every case has a geometry and they all share
  one pixel or voxel size in metres or millimetres (:func:`with_training_spacing`), so ``segment`` takes inputs
  of other sizes to the one the network learned, as nnU-Net's plans do.  Cases of mixed sizes record none.

Pictures (VOC, Cityscapes, COCO) have no geometry: neither rule applies to them.

Volumes are the exception to the first rule: a Decathlon or nnU-Net dataset's scans come at many voxel sizes,
and its model's card names one (as nnU-Net's plans do).  A volume off the card's grid is taken there before
training (:func:`volume_in_model_space`), exactly as ``segment`` takes its inputs (:func:`storage.resample.to_model`:
MONAI's ``Orientationd`` + ``Spacingd``, the card's interpolation for the image, nearest neighbour for the
labels), written once into the training run's work folder and sampled from there.
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


def check_grids(card: ModelCard, grids: Sequence[CaseGrid]) -> None:
    """Refuse the first raster ``segment`` would not show the network as it is (its grid is not the model's);
    volumes are resampled (:func:`volume_in_model_space`) and are not refused for it."""
    from flows.modelspace import card_mapping

    for grid in grids:
        if grid.geometry is None or isinstance(grid.geometry, VolumeGeometry):
            continue
        try:
            mapping = card_mapping(card, grid.geometry, grid.shape)
        except InvalidInputError as exc:
            raise IncompatibleInputError(grid.name, f"{exc.problem} (model {card.name!r}'s model space)") from None
        if mapping is None:
            continue
        raise IncompatibleInputError(grid.name, f"is on {_grid_words(grid)}, and model {card.name!r} works on "
                                                f"{_card_words(card)}: segment would show the network this "
                                                "case's inputs resampled, and training does not resample; "
                                                "resample the images and labels to the card's grid (labels by "
                                                "nearest neighbour), or train with a card without "
                                                "input.spacing/orientation/crs")


VOLUME_CHUNK = 64  # the resampled copy's chunk edge: patches read a few chunks each


def volume_in_model_space(card: ModelCard, geometry: Any, image: Any, labels: Any, work: Path,
                          name: str | None = None) -> tuple[Any, Any, Any] | None:
    """(image, labels, mapping) of a volume case on the card's model grid, stored as zarr arrays under
    ``work``; None when the case is on it already, or is no volume.  ``image`` is (C, K, J, I), ``labels``
    (K, J, I), as ingest stores them."""
    import dask.array as da
    import zarr

    from flows.modelspace import card_mapping
    from storage.grids import GridMapping
    from storage.layout import ARRAY_CONFIG
    from storage.resample import to_model

    if not isinstance(geometry, VolumeGeometry):
        return None
    shape = tuple(int(n) for n in image.shape[1:])
    try:
        mapping = card_mapping(card, geometry, shape)
    except InvalidInputError as exc:
        raise IncompatibleInputError(name, f"{exc.problem} (model {card.name!r}'s model space)") from None
    if not isinstance(mapping, GridMapping):
        return None
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
    return image_out, labels_out, mapping


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
        spacing, unit = [abs(float(first.transform[4])), abs(float(first.transform[0]))], "m"
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


def _grid_words(grid: CaseGrid) -> str:
    geometry = grid.geometry
    if isinstance(geometry, RasterGeometry):
        a, e = float(geometry.transform[0]), float(geometry.transform[4])
        crs = f"EPSG:{geometry.epsg}" if geometry.epsg else "its CRS" if geometry.crs_wkt else "no CRS"
        return f"pixels of {abs(a):g} x {abs(e):g} units of {crs}"
    if isinstance(geometry, VolumeGeometry):
        import nibabel as nib

        affine = np.asarray(geometry.affine_mm(), dtype=np.float64)
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        return (f"{' x '.join(f'{v:.3g}' for v in norms)} mm voxels in "
                f"{''.join(nib.orientations.aff2axcodes(affine))}")
    return "its own grid"


def _card_words(card: ModelCard) -> str:
    spec = card.input
    parts = []
    if spec.spacing is not None:
        unit = spec.spacing_unit or ("m" if spec.spatial_dims == 2 else "mm")
        values = spec.spacing if spec.spatial_dims == 2 else spec.spacing[::-1]  # a volume's in (i, j, k) order
        parts.append(" x ".join(f"{v:g}" for v in values) + f" {unit}")
    if spec.orientation is not None:
        parts.append(spec.orientation)
    if spec.crs is not None:
        parts.append(f"CRS {spec.crs}")
    return ", ".join(parts) or "its own grid"
