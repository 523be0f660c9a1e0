"""Read what an input is from its header alone, without ingesting it.

A nightly batch routes each input to the model that fits it (2-D raster or
3-D volume, and its channel count) and reports label areas or volumes; both
need only the header: the kind, the image channels, the grid and the size of
one pixel or voxel.  Reading a header costs milliseconds whatever the file's
size.  The same readers and the same one-line errors as ingest are used, so a
file probe refuses is a file ingest would refuse; a GeoTIFF whose image
blocks run past the end of the file (a copy or upload cut short) is refused
here too, from its directory's block offsets and sizes, so a file that cannot
be read never passes for one no model fits.  A DICOM series (a
:class:`storage.dicom.SeriesRef`, or a folder, DICOMDIR or file holding exactly
one series) is probed by :func:`storage.dicom.probe_dicom`, which reads the
headers of all its files and runs every geometry check ingest runs, so a series
with a missing slice is refused here, before a model is even loaded.
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from storage.errors import CorruptInputError, InputError
from storage.header import Header, on_the_earth, pixel_hectares, voxel_millilitres
from storage.inputfiles import PICTURE_SUFFIXES, check_content_matches_name, check_readable_file, kind_of

if TYPE_CHECKING:
    from storage.channelfiles import ChannelFiles
    from storage.dicomfiles import SeriesRef

def probe(path: Union[str, PathLike[str], "SeriesRef"]) -> Header:
    """The header of a GeoTIFF/VRT or NIfTI file, or of one DICOM series; raises an ``InputError`` naming it.

    A DICOM path (folder, DICOMDIR or file with the DICM preamble) must hold
    exactly one series: a folder of several is expanded into its series first
    (:func:`storage.dicom.find_series`), because each is its own input.
    """
    from storage.dicom import SeriesRef, find_series, is_dicom_input, probe_dicom  # storage.dicom imports this module

    if isinstance(path, SeriesRef):
        return probe_dicom(path)
    from storage.channelfiles import ChannelFiles

    if isinstance(path, ChannelFiles):
        return _probe_channel_files(path)
    path = Path(path)
    if path.exists() and _is_dicom(path, is_dicom_input):
        refs = find_series([path])
        if len(refs) != 1:
            raise InputError(path, f"holds {len(refs)} DICOM image volumes; probe each series "
                                   "(storage.dicom.find_series) as its own input")
        return probe_dicom(refs[0])
    # ingest's own checks, in its order and words: a FIFO is refused before anything opens it (that would block)
    head = check_readable_file(path)
    kind = kind_of(path)
    check_content_matches_name(path, kind, head)  # a NIfTI named .tif is told so, as ingest tells it
    if path.name.lower().endswith(PICTURE_SUFFIXES):
        return _probe_picture(path)
    return _probe_raster(path) if kind == "raster" else _probe_volume(path)


def _probe_picture(path: Path) -> Header:
    """A photograph as :mod:`storage.photo` ingests it: one grey channel, or red, green, blue."""
    from PIL import Image, UnidentifiedImageError

    from storage.datasets.pictures import picture_channels
    from storage.errors import UnsupportedFormatError
    from storage.photo import channels_of

    try:
        with Image.open(path) as picture:
            (width, height), names = picture.size, channels_of(picture_channels(picture.mode))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UnsupportedFormatError(path, f"is not a readable PNG, JPEG or BMP picture ({exc})") from None
    return Header(path=str(path), kind="raster", spatial_dims=2, channels=len(names), shape=(height, width),
                  cell_size=None, cell_unit="ha", cell_note="a picture: no CRS",
                  bands=tuple(range(1, len(names) + 1)), band_descriptions=tuple(names), on_the_earth=False)


def _probe_channel_files(ref: "ChannelFiles") -> Header:
    """A case's nnU-Net channel files: the first file's grid, one channel per file (each file's own checks first,
    naming it)."""
    import dataclasses

    import nibabel

    from storage.channelfiles import Grid, check_grid

    headers = [probe(path) for path in ref.files]
    check_grid(ref, [(path, Grid(list(header.shape), nibabel.load(path).affine), header.channels)
                     for path, header in zip(ref.files, headers)])
    return dataclasses.replace(headers[0], path=ref.display, channels=len(ref.files), case=ref.case)


def _is_dicom(path: Path, is_dicom_input) -> bool:  # noqa: ANN001 - storage.dicom.is_dicom_input
    """A DICOM input by content: a NIfTI or GeoTIFF name always goes to its own reader."""
    if path.is_file():
        try:
            kind_of(path)
            return False
        except InputError:
            pass
    try:
        return is_dicom_input(path)
    except OSError:
        return False


def _probe_raster(path: Path) -> Header:
    from storage.rasteropen import gdal_env, image_bands, open_raster

    with gdal_env():
        src = open_raster(path)
        try:
            bands = image_bands(src, path)
            check_blocks(src, path)
            size, note = pixel_hectares(src.transform, src.crs, (src.height, src.width))
            return Header(path=str(path), kind="raster", spatial_dims=2, channels=len(bands),
                          shape=(src.height, src.width), cell_size=size, cell_unit="ha", cell_note=note,
                          bands=tuple(bands), band_descriptions=tuple(src.descriptions[i - 1] for i in bands),
                          on_the_earth=on_the_earth(src.crs))
        finally:
            src.close()


def check_blocks(src, path: Path) -> None:  # noqa: ANN001 - an open rasterio dataset
    """Refuse a GeoTIFF whose image blocks (tiles or strips) end past the end of the file.

    The directory lists every block's offset and byte count, so a file cut
    short (an interrupted copy or upload) shows from its header, the way a
    truncated NIfTI or DICOM file does, without decoding a pixel.  GDAL reads
    the offsets lazily (about 3 µs a block: 12 ms for 4096 tiles).  A block
    with offset 0 is sparse (never written) and is read as nodata, not an
    error.  VRTs are skipped: their pixels live in other files.
    """
    if src.driver == "VRT":
        _check_vrt_sources(src, path)
        return
    if src.driver != "GTiff":
        return
    try:
        size = path.stat().st_size
        height, width = src.block_shapes[0]
        rows, cols = -(-src.height // height), -(-src.width // width)
        interleaved = src.tags(ns="IMAGE_STRUCTURE").get("INTERLEAVE", "PIXEL").upper() == "PIXEL"
        end = 0
        for band in (1,) if interleaved else src.indexes:
            for row in range(rows):
                for col in range(cols):
                    offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                    if offset and int(offset) > 0:
                        count = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
                        end = max(end, int(offset) + int(count or 0))
    except Exception:  # noqa: BLE001 - GDAL/rasterio raise several types; the pixel read reports what is wrong
        return
    if end > size:
        raise CorruptInputError(path, f"data is truncated: its image blocks end at byte {end} but {path.name} "
                                      f"has {size} bytes")


def _check_vrt_sources(src, path: Path) -> None:  # noqa: ANN001 - an open rasterio dataset
    """Refuse a VRT one of whose local source files is gone: GDAL opens the VRT without them and fails only at the
    first pixel read, after the run has started.  Remote sources (``/vsi...``) are left to that read."""
    for name in src.files[1:]:
        if not name.startswith("/vsi") and not Path(name).exists():
            shown = os.path.relpath(name, path.parent) if os.path.isabs(name) else name
            raise CorruptInputError(path, f"its source file {shown} is missing")


def _probe_volume(path: Path) -> Header:
    from storage.niftiopen import check_data_size, check_nifti_path, describe_nifti, open_nifti, spatial_ijk

    check_nifti_path(path)
    with ExitStack() as stack:
        img = open_nifti(path, stack)
        geometry, channels, _ = describe_nifti(path, img)
        check_data_size(path, img)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            space_unit = img.header.get_xyzt_units()[0]
    size, note = voxel_millilitres(np.asarray(geometry.affine), space_unit)
    return Header(path=str(path), kind="volume", spatial_dims=3, channels=channels,
                  shape=tuple(spatial_ijk(geometry.shape)), cell_size=size, cell_unit="mL", cell_note=note)


__all__ = ["check_blocks", "probe"]
