"""Photographs (PNG, JPEG) as image stores, decoded as training decodes them.

A model trained on Pascal VOC, Cityscapes or COCO learnt from pictures that
:func:`storage.datasets.pictures.read_rgb` decoded with Pillow: RGB, a grey
picture's channel repeated, an alpha channel dropped; one trained on
nnU-Net's 2-D pictures learnt a grey picture as one channel, at its own depth
(8 or 16 bits).  GDAL decodes the same
JPEG with its own libjpeg and chroma upsampling; on a small VOC-like picture
the two differed by up to 44 grey levels at colour edges, so a picture read
by GDAL would not be the picture the network learnt from.  Here the picture
is decoded by that same function and stored as a raster without a CRS, on
its pixel grid (GDAL's identity transform): a grey picture as one band
named grey, at its depth, any other as red, green, blue (uint8).  A network
that takes three channels gets a grey picture's band three times, as its
training decoded it (:func:`flows.routing.chosen_bands`).  A picture is held
in memory once while it is stored (photographs are small: 12 MP is 36 MB).
"""

from __future__ import annotations

import shutil
from os import PathLike
from pathlib import Path

from storage.bands import GREY
from storage.datasets.pictures import read_native
from storage.errors import InputError, InvalidInputError
from storage.geometry import RasterGeometry, SourceInfo
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete

CHANNELS = ["red", "green", "blue"]


def channels_of(count: int) -> list[str]:
    """The band names of a picture of ``count`` channels as :func:`ingest_picture` stores it."""
    return [GREY] if count == 1 else list(CHANNELS)


def ingest_picture(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int = 1024,
                   labels: bool = False) -> ImageStore:
    """Copy a PNG or JPEG into a zarr image store: (1, H, W) grey at its own depth, else (3, H, W) uint8 RGB.

    ``labels``: a PNG of label values, (1, H, W) uint8, a palette PNG's indices (VOC's), never their colours (as
    a photograph it had become three bands, and ``train --labels`` refused it as no label map)."""
    path = Path(path).absolute()
    pixels = None
    if labels:
        from storage.datasets.pictures import read_indices

        try:
            pixels = read_indices(path)[None]
        except InvalidInputError:  # no palette or 8-bit grey: a 16-bit grey one is values too; RGB is refused later
            pixels = None
    if pixels is None:
        pixels = read_native(path)  # one-line errors naming the file: not a picture, damaged
    # its name says which (a TIFF so named is refused)
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "JPEG")
    try:
        source = SourceInfo(path=str(path), sha256=sha256_input(path), size=path.stat().st_size, format=fmt)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    count, height, width = pixels.shape
    names, dtype = (["labels"] if labels and count == 1 else channels_of(count)), str(pixels.dtype)
    geometry = RasterGeometry(width=width, height=height, transform=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), dtype=dtype,
                              band_descriptions=list(names), bands=list(range(1, count + 1)))
    meta = StoreMeta(source=source, geometry=geometry, channel_names=list(names), spatial_dims=2)
    store = create_image_store(store_path, meta=meta, shape=pixels.shape, dtype=dtype,
                               chunks=(count, min(chunk, height), min(chunk, width)), with_mask=False)
    try:
        store.image[...] = pixels
        mark_complete(store.group)
    except BaseException:
        shutil.rmtree(store_path, ignore_errors=True)
        raise
    return store


__all__ = ["CHANNELS", "channels_of", "ingest_picture"]
