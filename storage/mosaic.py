"""Many raster tiles as one seamless image: a GDAL VRT mosaic, ingested as any raster.

``segflow segment tiles/*.tif --mosaic NAME`` hands the tiles here as one
:class:`MosaicRef`.  Its plan (:func:`plan_mosaic`) opens every tile's header
first and refuses a bad tile with one line naming it (not a GeoTIFF/VRT, a
volume, another band count, band names or scales, no CRS; a tile that opens
but whose pixels cannot be read is named when the copy fails): the whole
mosaic fails, since a hole would be silent.  The grid is that of the first
north-up tile in the mosaic's CRS (its pixel size and pixel phase; when every
tile is warped, GDAL's suggested pixel size for the finest tile, square, at
whole multiples of it).  A tile on that grid (same CRS and pixel size,
north-up, a whole-pixel offset) is placed as it is, pixel for pixel.  Any
other tile is *warped* onto the grid, but only when a target CRS was given
(``--crs``): without it, tiles in different CRSs (all listed), with another
pixel size, rotated, or offset by a fraction of a pixel are refused in one
line.  A warped tile is a GDAL ``WarpedVRT`` serialised as VRT: bilinear with a
constant kernel scale (:func:`warp_scale`), an exact transformer, and a Byte
alpha band for its footprint, so it is warped block by block as the ingest
reads, never materialised whole, and each pixel's value depends on that pixel
alone (two chunkings give identical labels).  Overlap rule: a tile placed as
it is wins over a warped one (its pixels are not resampled); among equals the
tile named first wins; a tile's own nodata never covers a neighbour's data.
The mosaic VRT carries an alpha band, the union of the tiles' valid masks, so
pixels no tile covers (held as 0) are nodata and their labels too.  The
mosaic's identity (:meth:`MosaicRef.sha256`) is its tiles' content: their
sha256 in order, the target CRS and these rules' version, never the paths; so
the ingest reuse and the resume of an interrupted run never take a tile for
the mosaic or the mosaic for a tile.  ``--split-by-tile`` cuts one label COG
per tile from the seamless labels (:mod:`storage.tilecuts`).

The plan (tiles checked and placed, the identity) lives in
:mod:`storage.mosaic_plan`, the VRT it is read through in
:mod:`storage.mosaic_vrt`; this module ingests the mosaic and checks a run's
tiles, and exports all of their public names.
"""

from __future__ import annotations

import glob
import shutil
import uuid
from os import PathLike
from pathlib import Path
from typing import Any

import rasterio

from storage.errors import CorruptInputError, InputError, InvalidInputError, SegflowError
from storage.inputfiles import stem_of
from storage.mosaic_plan import (RESAMPLING, RULES_VERSION, MosaicPlan, MosaicRef, Placement, Tile, parse_crs,
                                 plan_mosaic, read_tile)
from storage.mosaic_vrt import warp_scale, write_mosaic_vrt

MOSAIC_ATTR = "mosaic"
"""The image store attribute describing a mosaic: its tiles, their sha256 and where each landed."""


# ----------------------------------------------------------------------------- ingest


def ingest_mosaic(ref: MosaicRef, store_path: str | PathLike[str], *, chunk: int | None = None) -> Any:
    """The mosaic as an image store: planned (every tile checked), written as VRT, copied chunk by chunk.

    The store's source is the mosaic (its identity, the tiles' total size,
    format ``mosaic``); its ``mosaic`` attribute lists the tiles, their sha256
    and windows.  The VRT files live in a hidden folder beside the store only
    while it is copied.
    """
    from storage.geotiff import ingest_geotiff
    from storage.geometry import SourceInfo

    store_path = Path(store_path)
    plan = plan_mosaic(ref)
    hashes = ref.tile_sha256s()
    source = SourceInfo(path=ref.display, sha256=ref.sha256(hashes), size=ref.size(), format="mosaic")
    # an interrupted ingest's VRT files (the name escaped: "[2024]" is a character class to glob)
    for stale in store_path.parent.glob(glob.escape(f".{store_path.name}.vrt-") + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    # absolute, as the errors of the ingest name its VRT: a relative --out had that VRT reported, not the tile
    folder = store_path.absolute().parent / f".{store_path.name}.vrt-{uuid.uuid4().hex[:8]}"
    try:
        vrt = write_mosaic_vrt(plan, folder)
        try:
            store = ingest_geotiff(vrt, store_path, source=source, **({"chunk": chunk} if chunk else {}))
        except SegflowError as exc:  # about the VRT: name the tile that cannot be read, else the mosaic
            if exc.path is not None and Path(exc.path).absolute().is_relative_to(folder):
                _raise_for_unreadable_tile(plan)
                raise type(exc)(ref.display, exc.problem.replace(str(vrt), ref.display)) from None
            raise
        try:
            store.group.attrs[MOSAIC_ATTR] = plan.describe({Path(t).absolute(): h for t, h in zip(ref.tiles, hashes)})
        except BaseException:
            shutil.rmtree(store_path, ignore_errors=True)
            raise
        return store
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _raise_for_unreadable_tile(plan: MosaicPlan) -> None:
    """After a failed copy: read each tile block by block and raise naming the first one that fails (a truncated
    or damaged file opens fine and only fails when its pixels are read).  Returns when every tile reads."""
    from storage.rasteropen import GDAL_ERRORS, describe_window, gdal_message

    for placement in plan.placements:
        tile = placement.tile
        with rasterio.open(tile.path) as src:
            for _, window in src.block_windows(1):
                try:
                    src.read(tile.bands, window=window)
                except GDAL_ERRORS as exc:
                    raise CorruptInputError(tile.path, f"cannot read pixels ({describe_window(window)}): "
                                                       f"{gdal_message(exc)}") from None


def is_mosaic_store(store: Any, ref: MosaicRef) -> bool:
    """Whether an image store is a complete ingest of exactly this mosaic (same tiles' content, CRS, rules)."""
    return (store.meta.source.format == "mosaic" and MOSAIC_ATTR in store.group.attrs
            and store.meta.source.sha256 == ref.sha256())


# ----------------------------------------------------------------------------- the run's inputs and outputs


def mosaic_ref(name: str, inputs: list[str], crs: str | None = None, split_by_tile: bool = False) -> MosaicRef:
    """The run's inputs as one mosaic named ``name``; refused in one line before any work.

    A URL among the tiles is refused (tiles are read in place, from local
    files); with ``split_by_tile`` two tiles of the same stem, or a tile named
    like the mosaic, are refused since their outputs would collide.
    """
    from storage.remote import is_url

    label = MosaicRef(name, tuple(inputs), crs).display
    for item in inputs:
        if is_url(item):
            raise InputError(item, "is a URL; a mosaic's tiles must be local files")
    if crs is not None:
        try:
            parse_crs(crs)
        except ValueError as exc:
            raise InvalidInputError(label, str(exc)) from None
    tiles = tuple(str(Path(p).absolute()) for p in inputs)
    if len(set(tiles)) != len(tiles):
        twice = next(t for t in tiles if tiles.count(t) > 1)
        raise InvalidInputError(twice, f"is named twice among the tiles of {label}")
    if split_by_tile:
        stems: dict[str, str] = {}
        for tile in tiles:
            stem = stem_of(tile)
            if stem == name:
                raise InvalidInputError(tile, f"is named like the mosaic {name!r}; --split-by-tile writes each "
                                              f"tile's labels as <tile stem>.tif, so choose another --mosaic name")
            if stem in stems:
                raise InvalidInputError(tile, f"has the stem {stem!r} of another tile ({stems[stem]}); "
                                              f"--split-by-tile names each output after its tile")
            stems[stem] = tile
    return MosaicRef(name, tiles, crs)


__all__ = ["MOSAIC_ATTR", "RESAMPLING", "RULES_VERSION", "MosaicPlan", "MosaicRef", "Placement", "Tile",
           "ingest_mosaic", "is_mosaic_store", "mosaic_ref", "parse_crs", "plan_mosaic", "read_tile", "warp_scale",
           "write_mosaic_vrt"]
