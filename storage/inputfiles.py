"""What an input file is, before any reader opens it: its kind by name and by first bytes, its stem, and
whether it can be read at all.

The format readers (GeoTIFF, NIfTI, DICOM, STAC items, mosaics), the label
readers and the flows all ask these questions; keeping them here, away from
:mod:`storage.ingest`'s dispatch to those readers, lets each import them
without importing the others, and without zarr or numpy (the CLI's start).
"""

from __future__ import annotations

import errno
import os
import stat
from os import PathLike
from pathlib import Path

from storage.errors import CorruptInputError, InputError, UnsafeInputError, UnsupportedFormatError
from storage.sources import lies_under

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")  # photographs (VOC, Cityscapes, COCO; nnU-Net 2-D .bmp):
# rasters without a CRS
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", *PICTURE_SUFFIXES)
ITEM_SUFFIXES = (".json",)  # a STAC item: its assets are stacked into one raster (storage.stacitem)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # DICOM files need no suffix; these say a file was meant to be one


def kind_of(path: str | PathLike[str]) -> str:
    """'raster' or 'volume'; raises for anything else, naming the file."""
    name = Path(path).name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(RASTER_SUFFIXES + ITEM_SUFFIXES):
        return "raster"
    if name.endswith(DICOM_SUFFIXES):  # DICOM files are found by their content first: this one was not readable
        raise CorruptInputError(path, "is not a readable DICOM file (neither the DICM preamble nor a DICOM data set "
                                      "at its start): damaged, cut short or not DICOM")
    raise UnsupportedFormatError(path, "unsupported file type (expected .tif, .tiff, .vrt, .png, .jpg, .bmp, "
                                       ".nii, .nii.gz, .hdr, a STAC item .json, or DICOM files or a folder of them)")


def stem_of(path: str | PathLike[str]) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".hdr.gz", ".img.gz", ".tiff", ".tif", ".vrt", ".nii", ".hdr", ".img", ".zarr",
                   *PICTURE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_GZIP_MAGIC = b"\x1f\x8b"


def content_kind(head: bytes) -> str | None:
    """What the first 352 bytes say a file is: 'tiff', 'nifti', 'gzip', or None (unknown)."""
    if head.startswith(_TIFF_MAGIC):
        return "tiff"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    return None


def check_readable_file(path: Path) -> bytes:
    """Refuse what is not a readable regular file, before a reader blocks on it or misnames the problem.

    A FIFO or a device would make ``open`` wait for a writer (or read
    forever), so only regular files go on. Returns the file's first bytes.
    """
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python 3.11-12 raise this for a loop, 3.13 OSError(ELOOP)
            raise InputError(path, f"is a symbolic link in a loop (to {path.readlink()})") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(path, f"is a symbolic link in a loop (to {path.readlink()})") from None
        raise InputError(path, f"is a broken symbolic link (to {path.readlink()})")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    check_utf8_name(path)
    if stat.S_ISDIR(mode):  # (a folder of DICOM files is an input of its own, found before this)
        if (path / "zarr.json").is_file():
            raise InputError(path, "is a directory, expected a file: a zarr store; give the image it was ingested "
                                   "from (`segflow info` describes the store)")
        raise InputError(path, "is a folder holding no DICOM files (a folder is an input when it holds a DICOM "
                               "series); for a folder of images give its files (FOLDER/*.tif), or take it as "
                               "`segflow nightly --inbox FOLDER`")
    if not stat.S_ISREG(mode):
        raise InputError(path, f"is {_not_regular(mode)}, not a regular file; segflow reads files only")
    for companion in _companions(path):  # an Analyze header's image: a FIFO there had hung the run
        problem = regular_file_problem(companion)  # (missing or unreadable: the reader says so)
        if problem is not None:
            raise InputError(path, f"its image file {companion.name} {problem}; segflow reads files only")
        if companion.exists() and not lies_under(companion, [Path(os.path.realpath(path)).parent]):
            raise UnsafeInputError(path, f"its image file {companion.name} links to a file outside the header's "
                                         "folder, and an image file is read as raw bytes (as a VRT's raw band "
                                         "is); copy the file beside its header")
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    if not head:
        raise CorruptInputError(path, "file is empty (0 bytes)")
    return head


def check_utf8_name(path: str | PathLike[str]) -> None:
    """A name whose bytes are no UTF-8 (a file named in another encoding, which the file system keeps as it is):
    GDAL and zarr cannot take it, and it ended in a traceback wherever one reached them."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(path, "its name is not valid UTF-8 (a file named in another encoding), which GDAL "
                               "cannot open: rename it") from None


def regular_file_problem(path: str | Path) -> str | None:
    """Why a file another file names (a STAC asset) is no regular file, which a reader would block on; None when
    it is one, or cannot be looked at (its reader then says why)."""
    try:
        mode = Path(path).stat().st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else f"is {_not_regular(mode)}, not a regular file"


MAX_SAMPLES_PER_BYTE = 10_000  # DEFLATE and gzip stop near 1,032 to 1; real imagery stays far below either


def expansion_problem(shape: tuple[int, ...], channels: int, files: list[Path]) -> str | None:
    """Why files that hold their own pixels declare far more than they can: a sparse GeoTIFF (tiles left out)
    or a crafted DICOM of 20000² slices in a few KB, which would run for days or allocate gigabytes before
    failing; None for what real compression gives.  A VRT or STAC item holds no pixels and is not asked."""
    try:
        stored = sum(_stored_bytes(f) for f in files)
    except OSError:
        return None  # its reader says why it cannot be read
    samples = max(1, channels)
    for n in shape:
        samples *= int(n)
    if stored <= 0 or samples <= MAX_SAMPLES_PER_BYTE * stored:
        return None
    size = " x ".join(str(int(n)) for n in shape) + (f" x {channels} channels" if channels > 1 else "")
    tiff = bool(files) and files[0].suffix.lower() in (".tif", ".tiff")
    how = "its pixels out, e.g. with gdal_translate" if tiff else "it out again with its pixels stored"
    return (f"declares {size} ({samples:,} samples) in {_bytes(stored)} on disk, {samples // stored:,} samples a "
            f"byte where no compression of a real image gives more than about 1,000: a sparse or forged file, "
            f"refused (if it is real, write {how})")


def _stored_bytes(path: Path) -> int:
    """The bytes a file holds on disk: a sparse file (holes never written, ``truncate -s 4T``) has a size its
    blocks do not hold, and had passed as a 4 TiB NIfTI.  Where a file system reports no blocks (some network and
    FUSE ones), its size."""
    st = path.stat()
    blocks = getattr(st, "st_blocks", 0) * 512
    return min(st.st_size, blocks) if blocks > 0 else st.st_size


def _bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} GB"


def _not_regular(mode: int) -> str:
    return "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode) else \
        "not a regular file"


def _companions(path: Path) -> list[Path]:
    """The image files an Analyze header (``scan.hdr``) is read with."""
    name = path.name
    for header, images in ((".hdr.gz", (".img.gz", ".img")), (".hdr", (".img", ".img.gz"))):
        if name.lower().endswith(header):
            stem = name[:-len(header)]
            return [path.with_name(stem + s) for s in images] + [path.with_name(stem + s.upper()) for s in images]
    return []


def check_content_matches_name(path: Path, kind: str, head: bytes) -> None:
    """A NIfTI named .tif (or a TIFF named .nii) gets told so, rather than 'cannot be read'."""
    found = content_kind(head)
    name = path.name.lower()
    if name.endswith(PICTURE_SUFFIXES) and found == "tiff":  # a GeoTIFF saved as .jpg: the picture reader said
        raise UnsupportedFormatError(path, "is a TIFF image but is named like a picture (.png, .jpg, .bmp); rename it "
                                           ".tif")  # "not a readable PNG or JPEG picture", nothing of why
    if kind == "raster" and found == "nifti":
        raise UnsupportedFormatError(path, "is a NIfTI volume but is named like a GeoTIFF; rename it .nii")
    if kind == "raster" and found == "gzip":
        raise UnsupportedFormatError(path, "is gzip-compressed but is named like a GeoTIFF (a .nii.gz volume?)")
    if kind == "volume" and found == "tiff":
        raise UnsupportedFormatError(path, "is a TIFF image but is named like a NIfTI volume; rename it .tif")
    if kind == "volume" and found == "gzip" and not name.endswith(".gz"):
        raise UnsupportedFormatError(path, "is gzip-compressed but not named .gz; rename it .nii.gz")



def same_file(a: str | PathLike[str], b: str | PathLike[str]) -> bool:
    """Whether two paths name one existing file (links followed); False when either is missing (the usual case for
    an output not written yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

__all__ = ["ITEM_SUFFIXES", "PICTURE_SUFFIXES", "RASTER_SUFFIXES", "VOLUME_SUFFIXES", "check_content_matches_name",
           "check_readable_file", "check_utf8_name", "content_kind", "expansion_problem", "kind_of", "regular_file_problem", "same_file",
           "stem_of"]
