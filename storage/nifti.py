"""NIfTI-1/NIfTI-2 in and out, one z-slab at a time.

Ingest turns a file of nibabel shape (I, J, K[, T]) into a zarr ``image`` of
shape (C, K, J, I): ``image[c, k, j, i] = data[i, j, k, c]``.  That layout makes
the zarr's C-order equal the file's voxel order (i fastest), so both directions
stream slab by slab and a volume is never held in memory whole.

Export rebuilds the output header from the input's raw header bytes, so qform,
sform, their codes, units and orientation come back exactly; only the fields
that describe a label map (dtype, intent, scaling, calibration) are replaced.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import uuid
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from nibabel.nifti1 import Nifti1Extension, Nifti1Header
from nibabel.nifti2 import Nifti2Header

from storage.classes import LabelClass, label_dtype, slicer_color_table
from storage.errors import CorruptInputError, ExportError, InvalidInputError, StoreError
from storage.geometry import SourceInfo, VolumeGeometry
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete
from storage.niftiopen import (
    NIFTI_READ_ERRORS,
    NIFTI_SUFFIXES,
    check_data_size,
    check_nifti_path,
    describe_nifti,
    error_text,
    open_nifti,
    spatial_ijk,
)

__all__ = ["OpenedVolume", "ingest_nifti", "open_volume", "write_label_nifti", "write_volume_store",
           "NIFTI_SUFFIXES"]

INTENT_LABEL = 1002
LABEL_DESCRIPTION = "segflow labels"
COMMENT_CODE = 6  # NIfTI "comment" extension: free text, which viewers leave alone
_EXPORT_SLAB_BYTES = 64 << 20  # slab size when the label array has no chunk grid to follow


# --------------------------------------------------------------------------- ingest


def ingest_nifti(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int = 128) -> ImageStore:
    """Copy a NIfTI volume into a new image store, slab by slab along k.

    Channels are chunked one at a time and slabs follow the z chunk grid, so
    each zarr chunk is written whole exactly once and a 4-D ``.nii.gz`` is read
    strictly forwards (gzip cannot seek back cheaply).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    src = Path(path)
    with ExitStack() as stack:
        volume = open_volume(src, stack)
        geometry = volume.geometry
        meta = StoreMeta(
            source=SourceInfo(path=str(src.resolve()), sha256=sha256_input(src), size=src.stat().st_size,
                              format=f"NIfTI-{geometry.nifti_version}"),
            geometry=geometry,
            channel_names=[f"channel{c}" for c in range(volume.channels)],
            spatial_dims=3,
        )
        return write_volume_store(store_path, meta, [volume], np.dtype(geometry.dtype), chunk)


@dataclass(frozen=True)
class OpenedVolume:
    """A NIfTI file opened for ingest: its checked header's geometry and channel count, and its slab reader."""

    path: Path
    img: Any
    geometry: VolumeGeometry
    channels: int
    read: Any


def open_volume(path: Path, stack: ExitStack) -> OpenedVolume:
    """Open and check one NIfTI file (name, header, data size) for :func:`write_volume_store`."""
    check_nifti_path(path)
    img = open_nifti(path, stack)
    geometry, channels, read = describe_nifti(path, img)
    check_data_size(path, img)
    return OpenedVolume(path, img, geometry, channels, read)


def write_volume_store(store_path: str | PathLike[str], meta: StoreMeta, volumes: Sequence[OpenedVolume],
                       stored: np.dtype, chunk: int, attrs: dict[str, Any] | None = None) -> ImageStore:
    """A new image store holding the volumes' channels one after another (one 4-D file, or a case's channel files:
    :mod:`storage.channelfiles`), each read to the end of its gzip stream; ``attrs`` set before it is marked
    complete.  A failure removes the store."""
    store = Path(store_path)
    shape = (sum(v.channels for v in volumes), *reversed(spatial_ijk(volumes[0].geometry.shape)))
    try:
        out = create_image_store(store, meta=meta, shape=shape, dtype=stored.name,
                                 chunks=(1, *(min(chunk, n) for n in shape[1:])), with_mask=False)
        first = 0
        for volume in volumes:
            _copy_slabs(volume, out, stored, first)
            _check_stream_end(volume.path, volume.img)
            first += volume.channels
        out.group.attrs.update(attrs or {})
        mark_complete(out.group)
        return out
    except BaseException as exc:
        shutil.rmtree(store, ignore_errors=True)
        if isinstance(exc, OSError):  # reading errors were already turned into InputErrors
            raise StoreError(store, f"cannot write the image store: {error_text(exc)}") from None
        raise


def _copy_slabs(volume: OpenedVolume, out: ImageStore, stored: np.dtype, first_channel: int) -> None:
    """Write every (channel, z-chunk) slab of ``volume`` into the store's channels from ``first_channel`` on;
    count non-finite voxels and refuse them at the end."""
    src, read, channels = volume.path, volume.read, volume.channels
    image = out.image
    depth = image.shape[1]
    step = image.chunks[1]
    bad = 0
    for c in range(channels):
        for k0 in range(0, depth, step):
            k1 = min(k0 + step, depth)
            try:
                slab = read(c, k0, k1)
            except NIFTI_READ_ERRORS as exc:
                raise CorruptInputError(src, f"cannot read voxel data (channel {c}, slices {k0}-{k1 - 1}): "
                                             f"{error_text(exc)}") from None
            if slab.dtype.kind == "f":
                n = slab.size - int(np.count_nonzero(np.isfinite(slab)))
                if n:
                    bad += n
            if not bad:  # once refused, only keep counting
                image[first_channel + c, k0:k1] = slab.T.astype(stored, copy=False)
    if bad:
        raise InvalidInputError(src, f"contains {bad} NaN/Inf voxels")


def _check_stream_end(src: Path, img: Any) -> None:
    """Read a ``.nii.gz`` to the end of its gzip stream, where its CRC and length are checked.  The voxels stop
    before the trailer, so a file damaged inside the voxel data (bits flipped in a copy) was read without a word
    and segmented from wrong values; bytes after the stream were never looked at either."""
    holder = img.file_map.get("image")
    fobj = getattr(getattr(holder, "fileobj", None), "fobj", None)
    if not isinstance(fobj, gzip.GzipFile):
        return
    try:
        while fobj.read(1 << 20):
            pass
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(src, f"its gzip stream is damaged ({error_text(exc)}): the voxels read from it "
                                     "cannot be trusted") from None


# --------------------------------------------------------------------------- export


def write_label_nifti(
    labels: Any,
    geometry: VolumeGeometry,
    out_path: str | PathLike[str],
    *,
    classes: list[LabelClass],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Stream a (K, J, I) label map into a NIfTI on exactly the input's grid.

    The file is written under a temporary name and renamed into place, so a
    reader never sees half a label map.
    """
    out = Path(out_path)
    name = out.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise ExportError(out, "label output must end in .nii or .nii.gz")
    i, j, k = spatial_ijk(geometry.shape)
    if tuple(labels.shape) != (k, j, i):
        raise ExportError(out, f"labels have shape {tuple(labels.shape)} but the input grid is (z, y, x) = {(k, j, i)}")
    if np.dtype(labels.dtype).kind not in "biu":
        raise ExportError(out, f"labels must be integers, got {labels.dtype}")
    # a 2-D input gets a 2-D label map (the same bytes: one slice)
    hdr = _label_header(geometry, (i, j) if len(geometry.shape) == 2 else (i, j, k), classes, provenance)
    dtype = hdr.get_data_dtype()  # carries the header's byte order, so the bytes match it
    top = np.iinfo(dtype).max
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as raw:
            # mtime=0: the same labels give byte-identical files, so output hashes are reproducible
            packed = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) \
                if name.endswith(".gz") else nullcontext(raw)
            with packed as fileobj:
                hdr.write_to(fileobj)
                gap = int(hdr.get_data_offset()) - fileobj.tell()
                if gap < 0:
                    raise ExportError(out, "header and extensions overrun the data offset")
                fileobj.write(b"\0" * gap)
                for slab in _slabs(labels, j * i * dtype.itemsize):
                    if slab.size and (slab.min() < 0 or slab.max() > top):
                        raise ExportError(out, f"label values {slab.min()}..{slab.max()} do not fit {dtype.name}")
                    fileobj.write(np.ascontiguousarray(slab, dtype=dtype).tobytes())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except ExportError:
        _unlink(tmp)
        raise
    except OSError as exc:
        _unlink(tmp)
        raise ExportError(out, f"cannot write: {exc.strerror or error_text(exc)}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _label_header(
    geometry: VolumeGeometry, shape: tuple[int, ...], classes: list[LabelClass], provenance: dict[str, Any] | None
) -> Nifti1Header:
    """The input's own header, with only the fields that make it a label map changed."""
    cls = Nifti2Header if geometry.nifti_version == 2 else Nifti1Header
    hdr = cls(binaryblock=base64.b64decode(geometry.header_b64), check=False)
    hdr["magic"] = cls()["magic"]  # single-file magic even when the input was an .hdr/.img pair
    pixdim = hdr["pixdim"].copy()
    hdr.set_data_shape(shape)
    hdr["pixdim"] = pixdim  # nibabel sets pixdim past a 2-D shape to 1: the slice thickness and the qform's with it
    if int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0 and not _finite_qform(hdr):
        # the input's sform gave the grid; its qform (a NaN pixdim) was written on with code 1, so a reader that
        # prefers the qform got NaN geometry: it is marked unused, with the sform's voxel sizes in pixdim
        hdr["qform_code"] = 0
        sizes = np.linalg.norm(hdr.get_sform()[:3, :3], axis=0)
        hdr["pixdim"][1:4] = np.where(np.isfinite(hdr["pixdim"][1:4]), hdr["pixdim"][1:4], sizes)
    hdr.set_data_dtype(np.dtype(label_dtype(classes)))
    hdr.set_slope_inter(1.0, 0.0)
    hdr.set_intent(INTENT_LABEL, (), name=LABEL_DESCRIPTION)
    values = [c.value for c in classes] or [0]
    hdr["cal_min"], hdr["cal_max"] = min(values), max(values)
    hdr["descrip"] = LABEL_DESCRIPTION.encode()
    hdr["aux_file"] = b""
    hdr["vox_offset"] = 0  # recomputed by write_to from the extensions' size
    if provenance is not None:
        text = json.dumps(provenance, sort_keys=True, default=str)
        hdr.extensions.append(Nifti1Extension(COMMENT_CODE, text.encode("utf-8")))
    if classes:
        hdr.extensions.append(Nifti1Extension(COMMENT_CODE, slicer_color_table(classes).encode("utf-8")))
    return hdr


def _finite_qform(hdr: Nifti1Header) -> bool:
    fields = [hdr["pixdim"][:4], hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"], hdr["qoffset_x"],
              hdr["qoffset_y"], hdr["qoffset_z"]]
    return bool(all(np.all(np.isfinite(np.asarray(f, dtype=np.float64))) for f in fields))


def _slabs(labels: Any, plane_bytes: int) -> Iterator[np.ndarray]:
    """Read z-slabs following the array's own chunk grid when it has one."""
    depth = labels.shape[0]
    chunks = getattr(labels, "chunks", None)
    first = chunks[0] if chunks else None
    if isinstance(first, tuple):  # a dask array's chunks are per-axis tuples of block sizes (predict's labels)
        first = max(first) if first else None
    step = int(first) if first else max(1, _EXPORT_SLAB_BYTES // max(plane_bytes, 1))
    for k0 in range(0, depth, step):
        yield np.asarray(labels[k0:min(k0 + step, depth)])


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
