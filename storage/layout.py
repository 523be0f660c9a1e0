"""The on-disk zarr v3 layout shared by ingest, inference and export.

An image store is a group holding::

    image   (C, *spatial)   the source pixels, chunked and compressed
    mask    (*spatial)      bool, True where the source has valid data (absent: all valid)

and the group attribute ``segflow`` with a :class:`StoreMeta`.  A prediction
store adds ``labels`` (*spatial) and optionally ``probabilities``
(C, *spatial).  The attribute ``segflow_complete`` is written last: a store
without it was interrupted and must not be taken for a finished one.

While a prediction store is partial it also holds a :class:`ChunkJournal`
(``.segflow-journal/``): the identity of the run that writes it and one marker
per finished output chunk, so that a killed run can be resumed chunk by chunk.
The journal is removed when the store is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
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
JOURNAL_DIR = ".segflow-journal"


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
    """An opened image store; arrays are lazily read zarr arrays.

    ``mask_name``: the valid-data mask a run reads, ``mask`` unless the run takes fewer bands than the file holds
    (:func:`storage.bandcover.with_bands_mask`).
    """

    path: Path
    group: zarr.Group
    meta: StoreMeta
    mask_name: str = MASK

    @property
    def image(self) -> zarr.Array:
        if IMAGE not in self.group:  # a prediction store opened as an image: zarr's KeyError said "image" alone
            raise StoreError(self.path, f"holds no image ({', '.join(sorted(self.group.keys())) or 'nothing'}): a "
                                        "prediction store, not an ingested image store")
        return writable(self.group[IMAGE])  # type: ignore[arg-type]

    def __repr__(self) -> str:  # the pydantic dump of its metadata ran to pages
        shape = tuple(self.group[IMAGE].shape) if IMAGE in self.group else "-"
        return f"ImageStore({str(self.path)!r}, {self.meta.kind}, shape {shape})"

    @property
    def mask(self) -> zarr.Array | None:
        return writable(self.group[self.mask_name]) if self.mask_name in self.group else None  # type: ignore[arg-type]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


# Every chunk is stored as written, even one equal to the fill value.  zarr's default compares each chunk it writes
# with the fill value before encoding it, in its one event-loop thread that every writer of a process shares: 64
# writes of a 1024² uint8 label chunk took 0.40 s that way against 0.11 s without the check (this project's CPU).
# A chunk that is all fill value (nodata labels, a scene's empty corner) then costs a few bytes on disk.
ARRAY_CONFIG: dict[str, Any] = {"write_empty_chunks": True}


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` with :data:`ARRAY_CONFIG` (an opened array gets zarr's defaults, which the config does not keep)."""
    return array.with_config(ARRAY_CONFIG)  # type: ignore[arg-type]


def default_compressors() -> Any:
    """What the prediction stores (the outputs a user keeps) are compressed with."""
    return [zarr.codecs.ZstdCodec(level=3)]


def image_compressors() -> Any:
    """What an ingested image and its mask are compressed with: zstd level 1.

    Ingest writes every pixel once and the windows read it about once, and
    the store is usually a work copy removed after the run.  On a 4-band
    uint16 8192² scene (this project's CPU, two runs each) ingest took
    3.7-4.1 s at level 1 against 5.0-6.6 s at level 3, for a store 30 %
    larger (191 against 147 MB); reading it back took the same time.
    """
    return [zarr.codecs.ZstdCodec(level=1)]


def create_image_store(
    path: str | PathLike[str],
    *,
    meta: StoreMeta,
    shape: tuple[int, ...],
    dtype: str,
    chunks: tuple[int, ...],
    with_mask: bool,
) -> ImageStore:
    """Create (overwriting) an image store whose arrays the ingester then fills chunk by chunk.

    Only a zarr store is replaced: a file or a folder of other things at ``path`` is refused (``ingest(scan,
    "~/Documents")`` would have removed the folder; a file raised ``NotADirectoryError``)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        raise StoreError(path, "a file is in the way of the image store; give a new folder name")
    if path.is_dir():
        if any(path.iterdir()) and not (path / "zarr.json").is_file():
            raise StoreError(path, "is a folder that is not a zarr store; segflow replaces only its own stores")
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(IMAGE, shape=shape, dtype=dtype, chunks=chunks, compressors=image_compressors(),
                       fill_value=0, dimension_names=_dim_names(len(shape)), config=ARRAY_CONFIG)
    if with_mask:
        group.create_array(MASK, shape=shape[1:], dtype="bool", chunks=chunks[1:],
                           compressors=image_compressors(), fill_value=False,
                           dimension_names=_dim_names(len(shape))[1:], config=ARRAY_CONFIG)
    group.attrs[META_ATTR] = meta.model_dump(mode="json")
    return ImageStore(path=path, group=group, meta=meta)


def _dim_names(ndim: int) -> list[str]:
    return ["c", "y", "x"] if ndim == 3 else ["c", "z", "y", "x"]


def partial_path(target: str | PathLike[str], identity: str | None = None) -> Path:
    """Where a store is written before it is moved to ``target``: hidden, beside it, same file system.

    With a run ``identity`` the name carries its first 16 hex digits, so a
    run never writes into another run's store: a task of an abandoned run
    that is still finishing on a shared Dask cluster can only touch its own.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.{identity[:16]}.partial" if identity else f".{target.name}.partial")


def partial_paths(target: str | PathLike[str]) -> list[Path]:
    """Every partial store of ``target`` on disk, whichever run left it."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".partial"))


def create_prediction_store(target: str | PathLike[str], *, meta: dict[str, Any], spatial_shape: tuple[int, ...],
                            chunks: tuple[int, ...], label_dtype: str, nodata_label: int, classes: list[dict],
                            probabilities_dtype: str | None,
                            identity: str | None = None) -> tuple[zarr.Group, zarr.Array, zarr.Array | None]:
    """Create (overwriting) the hidden partial store of a prediction; ``target`` is where it will be moved."""
    partial = partial_path(target, identity)
    if partial.exists():
        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    names = _dim_names(len(spatial_shape) + 1)
    labels = group.create_array(LABELS, shape=spatial_shape, dtype=label_dtype, chunks=chunks,
                                fill_value=nodata_label, compressors=default_compressors(),
                                dimension_names=names[1:], config=ARRAY_CONFIG)
    probs = None
    if probabilities_dtype is not None:
        probs = group.create_array(PROBABILITIES, shape=(len(classes),) + spatial_shape, dtype=probabilities_dtype,
                                   chunks=(len(classes),) + chunks, fill_value=0,
                                   compressors=default_compressors(), dimension_names=names, config=ARRAY_CONFIG)
    group.attrs[META_ATTR] = meta
    group.attrs["classes"] = classes
    group.attrs["nodata_label"] = nodata_label
    return group, labels, probs


def commit_store(target: str | PathLike[str], attrs: dict[str, Any], identity: str | None = None) -> Path:
    """Add final attributes, mark the partial store complete, then move it into place (the commit point)."""
    target = Path(target)
    partial = partial_path(target, identity)
    # the journal goes first: a store killed between here and the rename is recomputed, never half-trusted
    shutil.rmtree(partial / JOURNAL_DIR, ignore_errors=True)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs.update(attrs)
    mark_complete(group)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def identity_digest(parts: dict[str, Any]) -> str:
    """sha256 of a canonical JSON document: the identity of a run (input, weights, parameters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(document, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


ChunkIndex = tuple[int, ...]


class ChunkJournal:
    """Which output chunks of a partial prediction store are finished, and for which run.

    Zarr cannot say "not computed yet": a chunk equal to the fill value (all
    nodata) is never written.  So each whole-chunk write records a marker
    (``done/<i.j[.k]>.json``, with the chunk's label histogram) after its data
    is stored, from the Dask task that wrote it.  A marker is an atomic rename
    of a small file, so a kill leaves either no marker (the chunk is rewritten,
    identically) or a marker for a chunk whose data is on disk.  ``identity``
    (input sha256 + weights sha256 + parameters) is kept beside the markers: a
    run with another identity never trusts them.  The object is small and
    picklable, so it travels to the workers as the write tasks' callback.
    """

    def __init__(self, store: str | PathLike[str], identity: str) -> None:
        self.root = Path(store) / JOURNAL_DIR
        self.identity = identity

    @property
    def _identity_file(self) -> Path:
        return self.root / "identity.json"

    def start(self, parts: dict[str, Any]) -> None:
        """Write the run's identity; until then the partial store is nobody's and is never resumed."""
        (self.root / "done").mkdir(parents=True, exist_ok=True)
        _write_json_atomically(self._identity_file, {"identity": self.identity, "parts": parts})

    def recorded_identity(self) -> str | None:
        try:
            return json.loads(self._identity_file.read_text()).get("identity")
        except (OSError, ValueError, AttributeError):
            return None

    def record(self, index: ChunkIndex, result: dict[str, Any]) -> None:
        """Called after the chunk's data is written (its label histogram rides along for statistics)."""
        marker = self.root / "done" / (".".join(map(str, index)) + ".json")
        histogram = {str(k): int(v) for k, v in result.get("histogram", {}).items()}
        _write_json_atomically(marker, {"identity": self.identity, "index": list(index), "histogram": histogram})

    __call__ = record

    def done(self) -> dict[ChunkIndex, dict[int, int]]:
        """The finished chunks of this identity and their label histograms (unreadable markers are ignored)."""
        out: dict[ChunkIndex, dict[int, int]] = {}
        folder = self.root / "done"
        if self.recorded_identity() != self.identity or not folder.is_dir():
            return out
        for marker in folder.glob("*.json"):
            try:
                doc = json.loads(marker.read_text())
                if doc["identity"] == self.identity:
                    out[tuple(int(i) for i in doc["index"])] = {int(k): int(v) for k, v in doc["histogram"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a marker is only trusted whole; the chunk is then simply rewritten
        return out


def reopen_prediction_store(target: str | PathLike[str], identity: str, *, spatial_shape: tuple[int, ...],
                            chunks: tuple[int, ...], label_dtype: str, probabilities_dtype: str | None,
                            num_classes: int) -> tuple[zarr.Group, zarr.Array, zarr.Array | None] | None:
    """The partial store of an interrupted run with the same identity, or None when there is none to resume.

    Beyond the identity, the arrays must have exactly the shapes, chunks and
    dtypes this run would create; anything else is not resumed.
    """
    partial = partial_path(target, identity)
    if not partial.is_dir() or ChunkJournal(partial, identity).recorded_identity() != identity:
        return None
    _remove_interrupted_writes(partial)
    try:
        group = zarr.open_group(str(partial), mode="r+")
        if group.attrs.get(COMPLETE_ATTR, False):
            return None
        labels = writable(group[LABELS])  # type: ignore[arg-type]
        probs = writable(group[PROBABILITIES]) if PROBABILITIES in group else None  # type: ignore[arg-type]
    except Exception:  # zarr raises several types for a damaged store: then it is not resumable
        return None
    if (tuple(labels.shape), tuple(labels.chunks), str(labels.dtype)) != (tuple(spatial_shape), tuple(chunks),
                                                                          label_dtype):
        return None
    if (probs is None) != (probabilities_dtype is None):
        return None
    if probs is not None and (tuple(probs.shape), tuple(probs.chunks), str(probs.dtype)) != (
            (num_classes,) + tuple(spatial_shape), (num_classes,) + tuple(chunks), probabilities_dtype):
        return None
    return group, labels, probs  # type: ignore[return-value]


# zarr's local store writes each chunk to "<name>.<32 hex>.partial" and renames it into place
_INTERRUPTED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove_interrupted_writes(store: Path) -> None:
    """Delete the temporary files of chunk writes a killed run left in a store: never data (the rename into
    place is what writes a chunk), and a resumed store must hold exactly what an uninterrupted one does."""
    for path in store.rglob("*.partial"):
        if path.is_file() and _INTERRUPTED_WRITE.search(path.name):
            path.unlink(missing_ok=True)


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
