"""The on-disk zarr v3 layout shared by ingest, inference and export.

An image store is a group holding::

    image   (C, *spatial)   the source pixels, chunked and compressed
    mask    (*spatial)      bool, True where the source has valid data (absent: all valid)

and the group attribute ``segflow`` with a :class:`StoreMeta`.  A prediction
store adds ``labels`` (*spatial) and optionally ``probabilities``
(C, *spatial).  The attribute ``segflow_complete`` is written last: a store
without it was interrupted and must not be taken for a finished one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import zarr
from pydantic import BaseModel, ConfigDict, Field

from storage.errors import StoreError
from storage.geometry import Geometry, SourceInfo

FORMAT_VERSION = 1
IMAGE = "image"
MASK = "mask"
LABELS = "labels"
PROBABILITIES = "probabilities"
META_ATTR = "segflow"
COMPLETE_ATTR = "segflow_complete"
PROVENANCE_ATTR = "provenance"


class StoreMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    source: SourceInfo
    geometry: Geometry
    channel_names: list[str] = Field(default_factory=list)
    spatial_dims: int

    @property
    def kind(self) -> str:
        return self.geometry.kind


@dataclass
class ImageStore:
    """An opened image store; arrays are lazily read zarr arrays."""

    path: Path
    group: zarr.Group
    meta: StoreMeta

    @property
    def image(self) -> zarr.Array:
        return self.group[IMAGE]  # type: ignore[return-value]

    @property
    def mask(self) -> zarr.Array | None:
        return self.group[MASK] if MASK in self.group else None  # type: ignore[return-value]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


def default_compressors() -> Any:
    return [zarr.codecs.ZstdCodec(level=3)]


def create_image_store(
    path: str | PathLike[str],
    *,
    meta: StoreMeta,
    shape: tuple[int, ...],
    dtype: str,
    chunks: tuple[int, ...],
    with_mask: bool,
) -> ImageStore:
    """Create (overwriting) an image store whose arrays the ingester then fills chunk by chunk."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(IMAGE, shape=shape, dtype=dtype, chunks=chunks, compressors=default_compressors(),
                       fill_value=0, dimension_names=_dim_names(len(shape)))
    if with_mask:
        group.create_array(MASK, shape=shape[1:], dtype="bool", chunks=chunks[1:],
                           compressors=default_compressors(), fill_value=False,
                           dimension_names=_dim_names(len(shape))[1:])
    group.attrs[META_ATTR] = meta.model_dump(mode="json")
    return ImageStore(path=path, group=group, meta=meta)


def _dim_names(ndim: int) -> list[str]:
    return ["c", "y", "x"] if ndim == 3 else ["c", "z", "y", "x"]


def partial_path(target: str | PathLike[str]) -> Path:
    """Where a store is written before it is moved to ``target``: hidden, beside it, same file system."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def create_prediction_store(target: str | PathLike[str], *, meta: dict[str, Any], spatial_shape: tuple[int, ...],
                            chunks: tuple[int, ...], label_dtype: str, nodata_label: int, classes: list[dict],
                            probabilities_dtype: str | None) -> tuple[zarr.Group, zarr.Array, zarr.Array | None]:
    """Create (overwriting) the hidden partial store of a prediction; ``target`` is where it will be moved."""
    partial = partial_path(target)
    if partial.exists():
        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    names = _dim_names(len(spatial_shape) + 1)
    labels = group.create_array(LABELS, shape=spatial_shape, dtype=label_dtype, chunks=chunks,
                                fill_value=nodata_label, compressors=default_compressors(),
                                dimension_names=names[1:])
    probs = None
    if probabilities_dtype is not None:
        probs = group.create_array(PROBABILITIES, shape=(len(classes),) + spatial_shape, dtype=probabilities_dtype,
                                   chunks=(len(classes),) + chunks, fill_value=0,
                                   compressors=default_compressors(), dimension_names=names)
    group.attrs[META_ATTR] = meta
    group.attrs["classes"] = classes
    group.attrs["nodata_label"] = nodata_label
    return group, labels, probs


def commit_store(target: str | PathLike[str], attrs: dict[str, Any]) -> Path:
    """Add final attributes, mark the partial store complete, then move it into place (the commit point)."""
    target = Path(target)
    partial = partial_path(target)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs.update(attrs)
    mark_complete(group)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def mark_complete(group: zarr.Group) -> None:
    """Written last, after every array chunk: the store's commit point."""
    group.attrs[COMPLETE_ATTR] = True


def is_complete(path: str | PathLike[str]) -> bool:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return False
    return bool(group.attrs.get(COMPLETE_ATTR, False))


def open_image_store(path: str | PathLike[str]) -> ImageStore:
    """Open a finished image store, refusing half-written or foreign ones."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise StoreError(path, f"not a zarr v3 group ({type(exc).__name__})") from None
    if META_ATTR not in group.attrs:
        raise StoreError(path, "not a segflow store (no 'segflow' attribute)")
    if not group.attrs.get(COMPLETE_ATTR, False):
        raise StoreError(path, "store is incomplete (its writer did not finish)")
    meta = StoreMeta.model_validate(group.attrs[META_ATTR])
    return ImageStore(path=path, group=group, meta=meta)
