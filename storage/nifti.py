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
import warnings
import zlib
from contextlib import ExitStack, nullcontext
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.nifti1 import Nifti1Extension, Nifti1Header, Nifti1Pair
from nibabel.nifti2 import Nifti2Header
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from storage.classes import LabelClass, label_dtype, slicer_color_table
from storage.errors import (
    CorruptInputError,
    ExportError,
    InputError,
    InvalidInputError,
    StoreError,
    UnsupportedFormatError,
)
from storage.geometry import SourceInfo, VolumeGeometry
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete

__all__ = ["ingest_nifti", "write_label_nifti", "NIFTI_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")
INTENT_LABEL = 1002
LABEL_DESCRIPTION = "segflow labels"
COMMENT_CODE = 6  # NIfTI "comment" extension: free text, which viewers leave alone
_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, ValueError, zlib.error)
_EXPORT_SLAB_BYTES = 64 << 20  # slab size when the label array has no chunk grid to follow
_DEFLATE_MAX_RATIO = 1032  # the most deflate can expand: a bound on a .gz file's uncompressed size


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
    store = Path(store_path)
    _check_path(src)
    created = False
    try:
        with ExitStack() as stack:
            img = _open(src, stack)
            geometry, channels, read = _describe(src, img)
            _check_data_size(src, img)
            shape = (channels, *reversed(_spatial(geometry.shape)))
            chunks = (1, *(min(chunk, n) for n in shape[1:]))
            meta = StoreMeta(
                source=SourceInfo(path=str(src.resolve()), sha256=sha256_input(src), size=src.stat().st_size,
                                  format=f"NIfTI-{geometry.nifti_version}"),
                geometry=geometry,
                channel_names=[f"channel{c}" for c in range(channels)],
                spatial_dims=3,
            )
            created = True
            try:
                out = create_image_store(store, meta=meta, shape=shape, dtype=geometry.dtype, chunks=chunks,
                                         with_mask=False)
                _copy_slabs(src, read, out, np.dtype(geometry.dtype))
                mark_complete(out.group)
            except OSError as exc:  # reading errors were already turned into InputErrors
                raise StoreError(store, f"cannot write the image store: {_why(exc)}") from None
            return out
    except BaseException:
        if created:
            shutil.rmtree(store, ignore_errors=True)
        raise


def _check_path(src: Path) -> None:
    if not src.exists():
        raise InputError(src, "file not found")
    if src.is_dir():
        raise InputError(src, "is a directory, not a NIfTI file")
    if not src.name.lower().endswith(NIFTI_SUFFIXES):
        raise UnsupportedFormatError(src, f"not a NIfTI file name (expected one of {', '.join(NIFTI_SUFFIXES)})")


def _open(src: Path, stack: ExitStack) -> Nifti1Pair:
    """Load the header, then reopen the data through handles we own and close.

    With open file objects nibabel's proxy reuses the handle for every slab
    instead of reopening (and for gzip, re-decompressing from the start).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sniffed = nib.load(src, mmap=False)
    except _READ_ERRORS as exc:
        raise CorruptInputError(src, f"cannot read the NIfTI header: {_why(exc)}") from None
    if not isinstance(sniffed, Nifti1Pair):  # Nifti1Image, Nifti2Image and the .hdr/.img pairs
        raise UnsupportedFormatError(src, f"is {type(sniffed).__name__}, not NIfTI-1 or NIfTI-2")
    klass = type(sniffed)
    file_map = klass.filespec_to_file_map(src)
    for role, holder in file_map.items():
        try:
            holder.fileobj = stack.enter_context(ImageOpener(holder.filename, "rb"))
        except OSError as exc:
            what = "data" if role == "image" else role
            raise CorruptInputError(src, f"cannot open its {what} file {holder.filename}: {_why(exc)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return klass.from_file_map(file_map, mmap=False)
    except _READ_ERRORS as exc:
        raise CorruptInputError(src, f"cannot read the NIfTI header: {_why(exc)}") from None


def _spatial(shape: list[int]) -> tuple[int, int, int]:
    """(I, J, K) of a source shape; a 2-D image is one slice thick."""
    i, j, *rest = shape
    return i, j, (rest[0] if rest else 1)


def _describe(src: Path, img: Nifti1Pair) -> tuple[VolumeGeometry, int, Any]:
    """Validate the header and return the geometry, channel count and a slab reader."""
    hdr = img.header
    shape = [int(n) for n in img.shape]
    if len(shape) < 2:
        raise InvalidInputError(src, f"has {len(shape)} dimension(s); need at least 2")
    if any(n == 0 for n in shape):
        raise InvalidInputError(src, f"has a zero-size dimension {tuple(shape)}")
    if len(shape) == 5 and shape[3] == 1:  # NIfTI keeps vectors on dim 5 with dim 4 = 1
        channels = shape[4]

        def read(c: int, k0: int, k1: int) -> np.ndarray:
            return np.asanyarray(img.dataobj[:, :, k0:k1, 0, c])
    elif len(shape) == 4:
        channels = shape[3]

        def read(c: int, k0: int, k1: int) -> np.ndarray:
            return np.asanyarray(img.dataobj[:, :, k0:k1, c])
    elif len(shape) <= 3:
        channels = 1

        def read(c: int, k0: int, k1: int) -> np.ndarray:
            slab = np.asanyarray(img.dataobj[:, :, k0:k1]) if len(shape) == 3 else np.asanyarray(img.dataobj)
            return slab.reshape(slab.shape[0], slab.shape[1], -1)
    else:
        raise InvalidInputError(src, f"has shape {tuple(shape)}; only 3-D, 4-D or 5-D with dim4 = 1 are supported")

    disk = np.dtype(hdr.get_data_dtype())
    if disk.kind not in "biuf" or disk.fields is not None or (disk.kind == "f" and disk.itemsize > 8):
        raise InvalidInputError(src, f"has data type {disk} (complex, RGB or long double); cannot be segmented")
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise InvalidInputError(src, f"has non-finite scaling scl_slope={slope} scl_inter={inter}")
    if slope == 1.0 and inter == 0.0:
        stored = disk.newbyteorder("=")
    else:  # the proxy scales to float: keep float32 unless the file already held float64
        stored = np.dtype("float64") if disk == np.dtype("float64") else np.dtype("float32")
    if stored.kind == "b":
        stored = np.dtype("uint8")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError(src, "has a singular or non-finite affine (no valid voxel-to-world mapping)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qform = np.asarray(hdr.get_qform(coded=False), dtype=np.float64)
        sform = np.asarray(hdr.get_sform(coded=False), dtype=np.float64)
    geometry = VolumeGeometry(
        shape=shape,
        affine=affine.tolist(),
        qform=qform.tolist(),
        sform=sform.tolist(),
        qform_code=int(hdr["qform_code"]),
        sform_code=int(hdr["sform_code"]),
        zooms=[float(z) for z in hdr.get_zooms()],
        orientation=list(nib.aff2axcodes(affine)),
        nifti_version=2 if isinstance(hdr, Nifti2Header) else 1,
        header_b64=base64.b64encode(hdr.binaryblock).decode("ascii"),
        dtype=stored.name,
    )
    return geometry, channels, read


def _check_data_size(src: Path, img: Nifti1Pair) -> None:
    """Refuse an uncompressed file too short for its declared dims before reading anything."""
    data_file = Path(img.file_map["image"].fileobj.name)
    expected = int(img.dataobj.offset) + int(np.prod(img.shape, dtype=np.int64)) * img.header.get_data_dtype().itemsize
    actual = data_file.stat().st_size
    if data_file.name.lower().endswith(".gz"):
        # The uncompressed size is unknown until read, but deflate never expands more than 1032:1, so a
        # header declaring more than that is refused before a slab buffer of its size is allocated.
        if expected > actual * _DEFLATE_MAX_RATIO:
            raise CorruptInputError(src, f"header declares {tuple(img.shape)} ({expected} bytes) but "
                                         f"{data_file.name} has {actual} compressed bytes, which cannot hold "
                                         f"more than {actual * _DEFLATE_MAX_RATIO}")
        return
    if actual < expected:
        raise CorruptInputError(src, f"data is truncated: header declares {tuple(img.shape)} "
                                     f"({expected} bytes with offset) but {data_file.name} has {actual} bytes")


def _copy_slabs(src: Path, read: Any, out: ImageStore, stored: np.dtype) -> None:
    """Write every (channel, z-chunk) slab; count non-finite voxels and refuse them at the end."""
    image = out.image
    channels, depth = image.shape[0], image.shape[1]
    step = image.chunks[1]
    bad = 0
    for c in range(channels):
        for k0 in range(0, depth, step):
            k1 = min(k0 + step, depth)
            try:
                slab = read(c, k0, k1)
            except _READ_ERRORS as exc:
                raise CorruptInputError(src, f"cannot read voxel data (channel {c}, slices {k0}-{k1 - 1}): "
                                             f"{_why(exc)}") from None
            if slab.dtype.kind == "f":
                n = slab.size - int(np.count_nonzero(np.isfinite(slab)))
                if n:
                    bad += n
            if not bad:  # once refused, only keep counting
                image[c, k0:k1] = slab.T.astype(stored, copy=False)
    if bad:
        raise InvalidInputError(src, f"contains {bad} NaN/Inf voxels")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # the file name is already in the message
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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
    i, j, k = _spatial(geometry.shape)
    if tuple(labels.shape) != (k, j, i):
        raise ExportError(out, f"labels have shape {tuple(labels.shape)} but the input grid is (z, y, x) = {(k, j, i)}")
    if np.dtype(labels.dtype).kind not in "biu":
        raise ExportError(out, f"labels must be integers, got {labels.dtype}")
    hdr = _label_header(geometry, (i, j, k), classes, provenance)
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
        raise ExportError(out, f"cannot write: {exc.strerror or _why(exc)}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _label_header(
    geometry: VolumeGeometry, shape: tuple[int, int, int], classes: list[LabelClass], provenance: dict[str, Any] | None
) -> Nifti1Header:
    """The input's own header, with only the fields that make it a label map changed."""
    cls = Nifti2Header if geometry.nifti_version == 2 else Nifti1Header
    hdr = cls(binaryblock=base64.b64decode(geometry.header_b64), check=False)
    hdr["magic"] = cls()["magic"]  # single-file magic even when the input was an .hdr/.img pair
    hdr.set_data_shape(shape)
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


def _slabs(labels: Any, plane_bytes: int) -> Iterator[np.ndarray]:
    """Read z-slabs following the array's own chunk grid when it has one."""
    depth = labels.shape[0]
    chunks = getattr(labels, "chunks", None)
    step = int(chunks[0]) if chunks else max(1, _EXPORT_SLAB_BYTES // max(plane_bytes, 1))
    for k0 in range(0, depth, step):
        yield np.asarray(labels[k0:min(k0 + step, depth)])


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
