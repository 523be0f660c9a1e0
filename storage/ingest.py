"""Ingest dispatch: pick the reader from the file's name and first bytes."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from storage.errors import InputError, UnsupportedFormatError
from storage.layout import ImageStore

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")


def kind_of(path: str | PathLike[str]) -> str:
    """'raster' or 'volume'; raises for anything else, naming the file."""
    name = Path(path).name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    raise UnsupportedFormatError(path, "unsupported file type (expected .tif, .tiff, .vrt, .nii, .nii.gz or .hdr)")


def stem_of(path: str | PathLike[str]) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".tiff", ".tif", ".vrt", ".nii", ".hdr", ".img", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def ingest(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int | None = None) -> ImageStore:
    """Copy a GeoTIFF/VRT or NIfTI into a zarr image store, chunk by chunk."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")
    kind = kind_of(path)
    if kind == "raster":
        from storage.geotiff import ingest_geotiff

        return ingest_geotiff(path, store_path, **({"chunk": chunk} if chunk else {}))
    from storage.nifti import ingest_nifti

    return ingest_nifti(path, store_path, **({"chunk": chunk} if chunk else {}))
