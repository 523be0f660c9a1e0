"""Photographs (PNG, JPEG) as image stores, decoded as training decodes them.

A model trained on Pascal VOC, Cityscapes or COCO learnt from pictures that
:func:`storage.datasets.pictures.read_rgb` decoded with Pillow: RGB, a grey
picture's channel repeated, an alpha channel dropped.  GDAL decodes the same
JPEG with its own libjpeg and chroma upsampling; on a small VOC-like picture
the two differed by up to 44 grey levels at colour edges, so a picture read
by GDAL would not be the picture the network learnt from.  Here the picture
is decoded by that same function and stored as a raster without a CRS, on
its pixel grid (GDAL's identity transform), with the bands named red, green,
blue.  A picture is held in memory once while it is stored (photographs are
small: 12 MP is 36 MB).
"""

from __future__ import annotations

import shutil
from os import PathLike
from pathlib import Path

from storage.datasets.pictures import read_rgb
from storage.errors import InputError
from storage.geometry import RasterGeometry, SourceInfo
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete

CHANNELS = ["red", "green", "blue"]


def ingest_picture(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int = 1024) -> ImageStore:
    """Copy a PNG or JPEG into a zarr image store as (3, H, W) uint8 RGB."""
    path = Path(path).absolute()
    pixels = read_rgb(path)  # one-line errors naming the file: not a picture, not 8-bit, damaged
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"  # its name says which (a TIFF so named is refused)
    try:
        source = SourceInfo(path=str(path), sha256=sha256_input(path), size=path.stat().st_size, format=fmt)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    _, height, width = pixels.shape
    geometry = RasterGeometry(width=width, height=height, transform=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), dtype="uint8",
                              band_descriptions=list(CHANNELS), bands=[1, 2, 3])
    meta = StoreMeta(source=source, geometry=geometry, channel_names=list(CHANNELS), spatial_dims=2)
    store = create_image_store(store_path, meta=meta, shape=pixels.shape, dtype="uint8",
                               chunks=(3, min(chunk, height), min(chunk, width)), with_mask=False)
    try:
        store.image[...] = pixels
        mark_complete(store.group)
    except BaseException:
        shutil.rmtree(store_path, ignore_errors=True)
        raise
    return store


__all__ = ["CHANNELS", "ingest_picture"]
