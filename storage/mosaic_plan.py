"""The tile index of a mosaic: which tiles, their identity, and where each lands on one grid.

Checking a mosaic's tiles and placing them (:func:`plan_mosaic`) reads
headers only and is the part every caller needs first: ``segflow segment``
refuses a bad tile in one line before any pixel is read, and the identity
(:meth:`MosaicRef.sha256`) decides ingest reuse and resume.  It is kept apart
from the VRT that stitches the pixels (:mod:`storage.mosaic_vrt`) and from the
ingest (:mod:`storage.mosaic`, whose docstring states the grid, placement and
overlap rules).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, transform_bounds

from storage.errors import CorruptInputError, IncompatibleInputError, InvalidInputError, UnsupportedFormatError
from storage.hashing import sha256_input
from storage.inputfiles import check_content_matches_name, check_readable_file, kind_of
from storage.rasteropen import GDAL_ERRORS, gdal_message, image_bands, image_dtype, open_raster

RULES_VERSION = 1
"""Bumped whenever the grid, placement or overlap rules change: part of every mosaic's identity."""
RESAMPLING = "bilinear"
_PIXEL_TOLERANCE = 1e-4  # of a pixel: closer than this to a whole-pixel offset counts as on the grid
_SIZE_TOLERANCE = 1e-9  # relative: pixel sizes closer than this are equal


@dataclass(frozen=True)
class MosaicRef:
    """All raster tiles of a run, named ``name``, as one input (the flows hand it around as a path)."""

    name: str
    tiles: tuple[str, ...]
    crs: str | None = None

    @property
    def display(self) -> str:
        """How messages and the provenance name the mosaic."""
        return f"mosaic {self.name} ({len(self.tiles)} tile{'s' if len(self.tiles) != 1 else ''})"

    def tile_sha256s(self) -> list[str]:
        """Each tile's sha256, in order: read once per ingest, then shared by the identity and the provenance."""
        return [sha256_input(t) for t in self.tiles]

    def sha256(self, tile_sha256s: list[str] | None = None) -> str:
        """The mosaic's identity: its tiles' content in order, the target CRS and the rules' version."""
        doc = {"rules": RULES_VERSION, "crs": self.crs, "resampling": RESAMPLING,
               "tiles": self.tile_sha256s() if tile_sha256s is None else tile_sha256s}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def size(self) -> int:
        return sum(Path(t).stat().st_size for t in self.tiles)


def parse_crs(text: str) -> CRS:
    """The ``--crs`` value as a CRS; a one-line ValueError for one GDAL does not know."""
    import pyproj

    try:  # PROJ's own check first: GDAL's would also print "ERROR 1: PROJ: ..." on the terminal, before our line
        pyproj.CRS.from_user_input(text)
        crs = CRS.from_user_input(text)
    except (CRSError, pyproj.exceptions.CRSError) as exc:
        raise ValueError(f"--crs {text!r} is not a CRS GDAL knows ({exc})") from None
    if not crs.is_projected and not crs.is_geographic:
        raise ValueError(f"--crs {text!r} is neither projected nor geographic")
    return crs


# ----------------------------------------------------------------------------- the plan


@dataclass
class Tile:
    """One tile's header, as the plan needs it."""

    path: Path
    crs: CRS
    transform: Affine
    width: int
    height: int
    bands: list[int]  # 1-based image bands (alpha dropped)
    dtype: str
    descriptions: list[str | None]
    scales: list[float]
    offsets: list[float]
    units: list[str]

    @property
    def north_up(self) -> bool:
        t = self.transform
        return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        return array_bounds(self.height, self.width, self.transform)  # west, south, east, north


@dataclass
class Placement:
    """Where a tile lands on the mosaic's grid: a pixel window, and whether it is warped there."""

    tile: Tile
    col: int
    row: int
    width: int
    height: int
    warped: bool

    def describe(self, sha256: str) -> dict[str, Any]:
        window = {"col": self.col, "row": self.row, "width": self.width, "height": self.height}
        return {"path": str(self.tile.path), "sha256": sha256, "crs": crs_name(self.tile.crs),
                "transform": list(self.tile.transform)[:6], "warped": self.warped, "window": window}


@dataclass
class MosaicPlan:
    """The mosaic's grid and each tile's place on it."""

    ref: MosaicRef
    crs: CRS
    transform: Affine
    width: int
    height: int
    dtype: str
    placements: list[Placement] = field(default_factory=list)

    @property
    def any_warped(self) -> bool:
        return any(p.warped for p in self.placements)

    def describe(self, sha256s: dict[Path, str]) -> dict[str, Any]:
        """The store attribute and provenance entry: the grid, the rules, every tile with its sha256 (by path)."""
        return {"name": self.ref.name, "crs": crs_name(self.crs), "target_crs": self.ref.crs,
                "transform": list(self.transform)[:6], "width": self.width, "height": self.height,
                "resampling": RESAMPLING if self.any_warped else None, "rules": RULES_VERSION,
                "overlap": "a tile on the mosaic's grid wins over a warped one; among equals the first named",
                "tiles": [p.describe(sha256s[Path(p.tile.path)]) for p in self.placements]}


def crs_name(crs: CRS) -> str:
    """How messages and the store attribute name a CRS: ``EPSG:n``, else its WKT."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def read_tile(path: str | PathLike[str]) -> Tile:
    """A tile's header; a tile that is no georeferenced GeoTIFF/VRT is refused in one line naming it."""
    path = Path(path).absolute()
    head = check_readable_file(path)
    try:
        kind = kind_of(path)
    except UnsupportedFormatError:
        raise UnsupportedFormatError(path, "is not a GeoTIFF or VRT; a mosaic is made of raster tiles only") from None
    if kind != "raster" or path.name.lower().endswith(".json"):
        what = "a STAC item" if kind == "raster" else "a volume"
        raise UnsupportedFormatError(path, f"is {what}, not a raster tile; a mosaic is made of GeoTIFF/VRT tiles only")
    check_content_matches_name(path, kind, head)
    with open_raster(path) as src:
        try:
            bands = image_bands(src, path)
            dtype = image_dtype(src, bands, path)
            if src.crs is None:
                raise InvalidInputError(path, "has no CRS; a mosaic's tiles must be georeferenced")
            if src.transform.is_identity:
                raise InvalidInputError(path, "has no geotransform; a mosaic's tiles must be georeferenced")
            return Tile(path=path, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                        bands=bands, dtype=str(dtype), descriptions=[src.descriptions[i - 1] for i in bands],
                        scales=[src.scales[i - 1] for i in bands], offsets=[src.offsets[i - 1] for i in bands],
                        units=[src.units[i - 1] or "" for i in bands])
        except GDAL_ERRORS as exc:
            raise CorruptInputError(path, f"cannot read raster metadata: {gdal_message(exc)}") from None


def _check_same_bands(first: Tile, tile: Tile) -> None:
    if len(tile.bands) != len(first.bands):
        raise IncompatibleInputError(tile.path, f"has {len(tile.bands)} band(s), the mosaic's first tile "
                                                f"{first.path.name} has {len(first.bands)}; every tile needs the "
                                                f"same bands")
    named = [(a, b) for a, b in zip(first.descriptions, tile.descriptions) if a and b]
    if any(a != b for a, b in named):
        raise IncompatibleInputError(tile.path, f"its bands are {', '.join(map(str, tile.descriptions))}, the first "
                                                f"tile {first.path.name}'s are "
                                                f"{', '.join(map(str, first.descriptions))}; every tile needs the "
                                                f"same bands in the same order")
    if (np.dtype(tile.dtype).kind == "f") != (np.dtype(first.dtype).kind == "f"):  # reflectance beside DN, often
        raise IncompatibleInputError(tile.path, f"its pixels are {tile.dtype}, the first tile {first.path.name}'s "
                                                f"{first.dtype}: integers beside floats are most often other units "
                                                "(digital numbers and reflectance); a mosaic's pixels must mean the "
                                                "same everywhere (convert the tiles to one type first)")
    if tile.scales != first.scales or tile.offsets != first.offsets:
        raise IncompatibleInputError(tile.path, f"its band scales/offsets {tile.scales}/{tile.offsets} differ from "
                                                f"the first tile {first.path.name}'s {first.scales}/{first.offsets}; "
                                                f"a mosaic's pixels must mean the same everywhere")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _SIZE_TOLERANCE * max(abs(a), abs(b))


def _whole(v: float) -> bool:
    return abs(v - round(v)) <= _PIXEL_TOLERANCE


def _off_grid(tile: Tile, crs: CRS, rx: float, ry: float, x0: float, y0: float) -> str | None:
    """Why a tile cannot be placed as it is on the grid (None: it can)."""
    t = tile.transform
    if tile.crs != crs:
        return f"is in {crs_name(tile.crs)}, the mosaic in {crs_name(crs)}"
    if not tile.north_up:
        return "is not north-up (its geotransform is rotated or flipped)"
    if not (_close(t.a, rx) and _close(-t.e, ry)):
        return f"its pixel size is {t.a:g} x {-t.e:g}, the mosaic's {rx:g} x {ry:g}"
    dx, dy = (t.c - x0) / rx, (y0 - t.f) / ry
    if not (_whole(dx) and _whole(dy)):
        return (f"its grid is offset from the mosaic's by a fraction of a pixel "
                f"({dx - math.floor(dx):.3f}, {dy - math.floor(dy):.3f})")
    return None


def plan_mosaic(ref: MosaicRef) -> MosaicPlan:
    """Check every tile and place it on one grid; one-line refusals name the tile (or list the CRSs)."""
    if not ref.tiles:
        raise InvalidInputError(ref.display, "has no raster tiles")
    tiles = [read_tile(p) for p in ref.tiles]
    first = tiles[0]
    for tile in tiles[1:]:
        _check_same_bands(first, tile)
    if ref.crs is None:
        crss: dict[str, list[Tile]] = {}
        for tile in tiles:
            crss.setdefault(crs_name(tile.crs), []).append(tile)
        if len(_distinct(t.crs for t in tiles)) > 1:
            listed = "; ".join(f"{name}: {', '.join(t.path.name for t in group)}" for name, group in crss.items())
            raise IncompatibleInputError(ref.display, f"its tiles are in {len(crss)} CRSs ({listed}); give "
                                                      f"--crs EPSG:n to warp them into one ({RESAMPLING})")
        crs = first.crs
    else:
        crs = parse_crs(ref.crs)
    anchor = next((t for t in tiles if t.crs == crs and t.north_up), None)
    if anchor is not None:
        rx, ry, x0, y0 = anchor.transform.a, -anchor.transform.e, anchor.transform.c, anchor.transform.f
    else:  # every tile warped: GDAL's suggested pixel size for the finest tile, square, at whole multiples
        rx = ry = min(suggested_size(t, crs) for t in tiles)
        x0 = y0 = 0.0
    boxes = []
    for tile in tiles:
        why = _off_grid(tile, crs, rx, ry, x0, y0)
        if why is not None and ref.crs is None:
            raise IncompatibleInputError(tile.path, f"{why}; give --crs EPSG:n to resample the tiles onto one "
                                                    f"grid ({RESAMPLING})")
        if why is None:
            t = tile.transform
            col, row = round((t.c - x0) / rx), round((y0 - t.f) / ry)
            boxes.append((tile, col, row, col + tile.width, row + tile.height, False))
        else:
            west, south, east, north = transform_bounds(tile.crs, crs, *tile.bounds, densify_pts=21)
            tol = _PIXEL_TOLERANCE
            col0, col1 = math.floor((west - x0) / rx + tol), math.ceil((east - x0) / rx - tol)
            row0, row1 = math.floor((y0 - north) / ry + tol), math.ceil((y0 - south) / ry - tol)
            boxes.append((tile, col0, row0, col1, row1, True))
    cmin, rmin = min(b[1] for b in boxes), min(b[2] for b in boxes)
    cmax, rmax = max(b[3] for b in boxes), max(b[4] for b in boxes)
    transform = Affine(rx, 0.0, x0 + cmin * rx, 0.0, -ry, y0 - rmin * ry)
    dtype = str(np.result_type(*[np.dtype(t.dtype) for t in tiles]))
    plan = MosaicPlan(ref=ref, crs=crs, transform=transform, width=cmax - cmin, height=rmax - rmin, dtype=dtype)
    for tile, c0, r0, c1, r1, warped in boxes:
        plan.placements.append(Placement(tile, c0 - cmin, r0 - rmin, c1 - c0, r1 - r0, warped))
    return plan


def _distinct(items: Any) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def suggested_size(tile: Tile, crs: CRS) -> float:
    """GDAL's suggested pixel size for the tile warped into ``crs``: the finer of its two axes."""
    west, south, east, north = tile.bounds
    transform, _, _ = calculate_default_transform(tile.crs, crs, tile.width, tile.height, west, south, east, north)
    return min(abs(transform.a), abs(transform.e))
