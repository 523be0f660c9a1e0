"""Ingest dispatch: pick the reader from the file's name and first bytes."""

from __future__ import annotations

import stat
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from storage.errors import CorruptInputError, InputError, UnsupportedFormatError
from storage.layout import ImageStore

if TYPE_CHECKING:
    from storage.bands import BandRequest
    from storage.dicomfiles import SeriesRef

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
ITEM_SUFFIXES = (".json",)  # a STAC item: its assets are stacked into one raster (storage.stacitem)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")


def kind_of(path: str | PathLike[str]) -> str:
    """'raster' or 'volume'; raises for anything else, naming the file."""
    name = Path(path).name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(RASTER_SUFFIXES + ITEM_SUFFIXES):
        return "raster"
    raise UnsupportedFormatError(path, "unsupported file type (expected .tif, .tiff, .vrt, .nii, .nii.gz, .hdr "
                                       "or a STAC item .json)")


def stem_of(path: str | PathLike[str]) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".tiff", ".tif", ".vrt", ".nii", ".hdr", ".img", ".zarr"):
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
        raise InputError(path, f"is a broken symbolic link (to {path.readlink()})")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InputError(path, "is a directory, expected a file")
    if not stat.S_ISREG(mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise InputError(path, f"is {what}, not a regular file; segflow reads files only")
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    if not head:
        raise CorruptInputError(path, "file is empty (0 bytes)")
    return head


def check_content_matches_name(path: Path, kind: str, head: bytes) -> None:
    """A NIfTI named .tif (or a TIFF named .nii) gets told so, rather than 'cannot be read'."""
    found = content_kind(head)
    name = path.name.lower()
    if kind == "raster" and found == "nifti":
        raise UnsupportedFormatError(path, "is a NIfTI volume but is named like a GeoTIFF; rename it .nii")
    if kind == "raster" and found == "gzip":
        raise UnsupportedFormatError(path, "is gzip-compressed but is named like a GeoTIFF (a .nii.gz volume?)")
    if kind == "volume" and found == "tiff":
        raise UnsupportedFormatError(path, "is a TIFF image but is named like a NIfTI volume; rename it .tif")
    if kind == "volume" and found == "gzip" and not name.endswith(".gz"):
        raise UnsupportedFormatError(path, "is gzip-compressed but not named .gz; rename it .nii.gz")


def ingest(path: "str | PathLike[str] | SeriesRef", store_path: str | PathLike[str], *,
           chunk: int | None = None, bands: "BandRequest | None" = None, origin: str | None = None) -> ImageStore:
    """Copy a GeoTIFF/VRT, a NIfTI, one DICOM series or a STAC item's bands into a zarr image store, chunk by chunk.

    ``bands`` says which bands a STAC item's assets must give (other inputs
    keep all their bands; the model's are picked after ingest).  ``origin``:
    the URL a STAC item file was downloaded from (its relative hrefs are beside it).
    """
    from storage.dicom import SeriesRef, ingest_dicom

    if isinstance(path, SeriesRef):
        return ingest_dicom(path, store_path, **({"chunk": chunk} if chunk else {}))
    from storage.mosaic import MosaicRef, ingest_mosaic

    if isinstance(path, MosaicRef):  # many raster tiles as one seamless image
        return ingest_mosaic(path, store_path, chunk=chunk)
    path = Path(path)
    head = check_readable_file(path)
    kind = kind_of(path)
    check_content_matches_name(path, kind, head)
    if path.name.lower().endswith(ITEM_SUFFIXES):
        from storage.stacitem import ingest_item

        return ingest_item(path, store_path, chunk=chunk, bands=bands, origin=origin)
    if kind == "raster":
        from storage.geotiff import ingest_geotiff

        return ingest_geotiff(path, store_path, **({"chunk": chunk} if chunk else {}))
    from storage.nifti import ingest_nifti

    return ingest_nifti(path, store_path, **({"chunk": chunk} if chunk else {}))
