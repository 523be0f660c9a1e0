"""Opening a NIfTI file and validating its header, with every way it can fail said in one line naming the file.

Ingest and probe both read a NIfTI header; they share these readers so that a
file probe refuses is a file ingest would refuse, in the same words, and probe
learns a volume's geometry and channels without reading a voxel.
"""

from __future__ import annotations

import base64
import warnings
import zlib
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.imageglobals import logger as nibabel_logger
from nibabel.nifti1 import Nifti1Pair
from nibabel.nifti2 import Nifti2Header
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from storage.errors import CorruptInputError, InputError, InvalidInputError, UnsupportedFormatError
from storage.geometry import VolumeGeometry, voxel_axes_problem
from storage.libquiet import quietly as library_quietly

__all__ = ["NIFTI_READ_ERRORS", "NIFTI_SUFFIXES", "check_data_size", "check_nifti_path", "describe_nifti", "error_text",
           "open_nifti", "quietly", "spatial_ijk"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")
"""File names read as NIfTI: single files and .hdr/.img pairs, gzipped or not."""

NIFTI_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, ValueError, zlib.error)
"""What nibabel raises for a damaged header or voxel data: caught to turn into a one-line error."""


def check_nifti_path(src: Path) -> None:
    """Refuse a missing file, a directory or a name that is not NIfTI's before anything opens it."""
    if not src.exists():
        raise InputError(src, "file not found")
    if src.is_dir():
        raise InputError(src, "is a directory, not a NIfTI file")
    if not src.name.lower().endswith(NIFTI_SUFFIXES):
        raise UnsupportedFormatError(src, f"not a NIfTI file name (expected one of {', '.join(NIFTI_SUFFIXES)})")


def quietly() -> AbstractContextManager[None]:
    """No warnings, and none of nibabel's header notes ("pixdim[1,2,3] should be non-zero; setting 0 dims to 1"),
    which it logs as warnings, printed to stderr in front of segflow's lines; what they fix is checked here.
    nibabel raises at its error_level, 40: errors still raise."""
    return library_quietly(nibabel_logger.name)


def open_nifti(src: Path, stack: ExitStack) -> Nifti1Pair:
    """Load the header, then reopen the data through handles we own and close.

    With open file objects nibabel's proxy reuses the handle for every slab
    instead of reopening (and for gzip, re-decompressing from the start).

    nibabel silently sets a voxel size of 0 in ``pixdim`` to 1 mm.  That only
    matters where the affine is built from ``pixdim`` (no sform): there it
    would be a made-up spacing, so such a file is refused.
    """
    try:
        with quietly():
            sniffed = nib.load(src, mmap=False)
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(src, f"cannot read the NIfTI header: {error_text(exc)}") from None
    if not isinstance(sniffed, Nifti1Pair):  # Nifti1Image, Nifti2Image and the .hdr/.img pairs
        raise UnsupportedFormatError(src, f"is {type(sniffed).__name__}, not NIfTI-1 or NIfTI-2")
    klass = type(sniffed)
    file_map = klass.filespec_to_file_map(src)
    for role, holder in file_map.items():
        try:
            holder.fileobj = stack.enter_context(ImageOpener(holder.filename, "rb"))
        except OSError as exc:
            what = "data" if role == "image" else role
            raise CorruptInputError(src, f"cannot open its {what} file {holder.filename}: {error_text(exc)}") from None
    try:
        with quietly():
            img = klass.from_file_map(file_map, mmap=False)
            raw = None
            if int(img.header["sform_code"]) == 0:  # the affine comes from pixdim: read it as written, unfixed
                with ImageOpener(file_map["header" if "header" in file_map else "image"].filename, "rb") as f:
                    raw = klass.header_class.from_fileobj(f, check=False)
    except NIFTI_READ_ERRORS as exc:
        raise CorruptInputError(src, f"cannot read the NIfTI header: {error_text(exc)}") from None
    sizes = None if raw is None else np.asarray(raw["pixdim"][1:1 + min(3, len(img.shape))], dtype=np.float64)
    if sizes is not None and np.any(sizes == 0):
        raise InvalidInputError(src, f"has a voxel size of 0 (pixdim {', '.join(f'{x:g}' for x in sizes)}) and no "
                                     "sform, so its spacing is unknown")
    return img


DEFLATE_MAX_RATIO = 1032  # the most deflate can expand: a bound on a .gz file's uncompressed size


def check_data_size(src: Path, img: Nifti1Pair) -> None:
    """Refuse an uncompressed file too short for its declared dims before reading anything (the header check of
    ``segment`` and ingest both run it, so such a file fails before a cluster starts)."""
    data_file = Path(img.file_map["image"].fileobj.name)
    expected = int(img.dataobj.offset) + int(np.prod(img.shape, dtype=np.int64)) * img.header.get_data_dtype().itemsize
    actual = data_file.stat().st_size
    if data_file.name.lower().endswith(".gz"):
        # The uncompressed size is unknown until read, but deflate never expands more than 1032:1, so a
        # header declaring more than that is refused before a slab buffer of its size is allocated.
        if expected > actual * DEFLATE_MAX_RATIO:
            raise CorruptInputError(src, f"header declares {tuple(img.shape)} ({expected} bytes) but "
                                         f"{data_file.name} has {actual} compressed bytes, which cannot hold "
                                         f"more than {actual * DEFLATE_MAX_RATIO}")
        return
    if actual < expected:
        raise CorruptInputError(src, f"data is truncated: header declares {tuple(img.shape)} "
                                     f"({expected} bytes with offset) but {data_file.name} has {actual} bytes")


def spatial_ijk(shape: list[int]) -> tuple[int, int, int]:
    """(I, J, K) of a source shape; a 2-D image is one slice thick."""
    i, j, *rest = shape
    return i, j, (rest[0] if rest else 1)


def describe_nifti(src: Path, img: Nifti1Pair) -> tuple[VolumeGeometry, int, Any]:
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
    problem = voxel_axes_problem(affine[:3, :3], hdr.get_xyzt_units()[0])
    if problem is not None:
        raise InvalidInputError(src, problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qform = np.asarray(_qform(hdr), dtype=np.float64)
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


def _qform(hdr: Any) -> np.ndarray:
    """The qform, whose quaternion's w = 0 (a 180-degree rotation) may come out as -8e-16 from float64 rounding:
    NIfTI-2's threshold for that is float64's epsilon, so nibabel raised "w2 should be positive" and a valid
    oblique scan was refused.  NIfTI-1's float32 threshold reads it as the 180-degree turn it is."""
    try:
        return hdr.get_qform(coded=False)
    except ValueError:
        lenient = hdr.copy()
        lenient.quaternion_threshold = np.finfo(np.float32).eps * 3
        return lenient.get_qform(coded=False)


def error_text(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line error: an OSError's reason alone (the path is named already)."""
    if isinstance(exc, OSError) and exc.strerror:  # the file name is already in the message
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
