"""Ingest dispatch: pick the reader from the file's name and first bytes."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from storage.inputfiles import (ITEM_SUFFIXES, PICTURE_SUFFIXES, check_content_matches_name, check_readable_file,
                                kind_of)
from storage.layout import ImageStore

if TYPE_CHECKING:
    from storage.bands import BandRequest
    from storage.dicomfiles import SeriesRef


def ingest(path: "str | PathLike[str] | SeriesRef", store_path: str | PathLike[str], *,
           chunk: int | None = None, bands: "BandRequest | None" = None, origin: str | None = None) -> ImageStore:
    """Copy a GeoTIFF/VRT, a NIfTI (or a case's channel files), one DICOM series or a STAC item's bands into a zarr
    image store, chunk by chunk.

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
    from storage.channelfiles import ChannelFiles, ingest_channel_files

    if isinstance(path, ChannelFiles):  # nnU-Net's one NIfTI file per channel of a case
        return ingest_channel_files(path, store_path, **({"chunk": chunk} if chunk else {}))
    path = Path(path)
    head = check_readable_file(path)
    kind = kind_of(path)
    check_content_matches_name(path, kind, head)
    if path.name.lower().endswith(ITEM_SUFFIXES):
        from storage.stacitem import ingest_item

        return ingest_item(path, store_path, chunk=chunk, bands=bands, origin=origin)
    if path.name.lower().endswith(PICTURE_SUFFIXES):  # decoded as training decodes it (storage.photo)
        from storage.photo import ingest_picture

        return ingest_picture(path, store_path, **({"chunk": chunk} if chunk else {}))
    if kind == "raster":
        from storage.geotiff import ingest_geotiff

        return ingest_geotiff(path, store_path, **({"chunk": chunk} if chunk else {}))
    from storage.nifti import ingest_nifti

    return ingest_nifti(path, store_path, **({"chunk": chunk} if chunk else {}))


__all__ = ["ingest"]
