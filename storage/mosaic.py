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
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds

from storage.errors import (CorruptInputError, IncompatibleInputError, InvalidInputError, SegflowError,
                            UnsupportedFormatError)
from storage.hashing import sha256_input

RULES_VERSION = 1
"""Bumped whenever the grid, placement or overlap rules change: part of every mosaic's identity."""
RESAMPLING = "bilinear"
MOSAIC_ATTR = "mosaic"
"""The image store attribute describing a mosaic: its tiles, their sha256 and where each landed."""
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
    try:
        crs = CRS.from_user_input(text)
    except CRSError as exc:
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
        return {"path": str(self.tile.path), "sha256": sha256, "crs": _crs_name(self.tile.crs),
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
        return {"name": self.ref.name, "crs": _crs_name(self.crs), "target_crs": self.ref.crs,
                "transform": list(self.transform)[:6], "width": self.width, "height": self.height,
                "resampling": RESAMPLING if self.any_warped else None, "rules": RULES_VERSION,
                "overlap": "a tile on the mosaic's grid wins over a warped one; among equals the first named",
                "tiles": [p.describe(sha256s[Path(p.tile.path)]) for p in self.placements]}


def _crs_name(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def read_tile(path: str | PathLike[str]) -> Tile:
    """A tile's header; a tile that is no georeferenced GeoTIFF/VRT is refused in one line naming it."""
    from storage.geotiff import _GDAL_ERRORS, _gdal_message, _image_bands, _image_dtype, _open_source
    from storage.ingest import check_content_matches_name, check_readable_file, kind_of

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
    with _open_source(path) as src:
        try:
            bands = _image_bands(src, path)
            dtype = _image_dtype(src, bands, path)
            if src.crs is None:
                raise InvalidInputError(path, "has no CRS; a mosaic's tiles must be georeferenced")
            if src.transform.is_identity:
                raise InvalidInputError(path, "has no geotransform; a mosaic's tiles must be georeferenced")
            return Tile(path=path, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                        bands=bands, dtype=str(dtype), descriptions=[src.descriptions[i - 1] for i in bands],
                        scales=[src.scales[i - 1] for i in bands], offsets=[src.offsets[i - 1] for i in bands],
                        units=[src.units[i - 1] or "" for i in bands])
        except _GDAL_ERRORS as exc:
            raise CorruptInputError(path, f"cannot read raster metadata: {_gdal_message(exc)}") from None


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
        return f"is in {_crs_name(tile.crs)}, the mosaic in {_crs_name(crs)}"
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
            crss.setdefault(_crs_name(tile.crs), []).append(tile)
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
        rx = ry = min(_suggested_size(t, crs) for t in tiles)
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


def _suggested_size(tile: Tile, crs: CRS) -> float:
    west, south, east, north = tile.bounds
    transform, _, _ = calculate_default_transform(tile.crs, crs, tile.width, tile.height, west, south, east, north)
    return min(abs(transform.a), abs(transform.e))


# ----------------------------------------------------------------------------- the VRT


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64"}


def _warped_tile(placement: Placement, plan: MosaicPlan, folder: Path, index: int) -> Path:
    """The tile warped onto its window of the mosaic's grid (nothing is warped yet): a VRTWarpedDataset file with
    an alpha band, wrapped in a plain VRT of the tile's image bands whose per-dataset mask is that alpha.

    GDAL takes an alpha band for the mask only in 2- or 4-band datasets, so
    the wrapper states the mask explicitly, whatever the band count.
    """
    t = plan.transform
    transform = Affine(t.a, 0.0, t.c + placement.col * t.a, 0.0, t.e, t.f + placement.row * t.e)
    warped = folder / f"tile{index}.warped.vrt"
    scale = warp_scale(placement.tile, plan)
    with rasterio.open(placement.tile.path) as src:
        has_alpha = any(ci == ColorInterp.alpha for ci in src.colorinterp)  # then it is warped as the alpha
        with WarpedVRT(src, crs=plan.crs, transform=transform, width=placement.width, height=placement.height,
                       resampling=Resampling.bilinear, add_alpha=not has_alpha, XSCALE=repr(scale),
                       YSCALE=repr(scale)) as vrt:
            rasterio.shutil.copy(vrt, warped, driver="VRT")
    _fix_warped_vrt(warped)
    with rasterio.open(warped) as vrt:
        alpha = next(i for i, ci in zip(vrt.indexes, vrt.colorinterp) if ci == ColorInterp.alpha)
        dtypes = vrt.dtypes
    w, h = placement.width, placement.height
    rect = f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/><DstRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'

    def simple(band: int) -> str:
        return (f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(warped))}</SourceFilename>'
                f'<SourceBand>{band}</SourceBand>{rect}</SimpleSource>')

    lines = [f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}">',
             f'  <SRS>{escape(plan.crs.to_wkt())}</SRS>',
             f'  <GeoTransform>{transform.c!r}, {transform.a!r}, 0.0, {transform.f!r}, 0.0, {transform.e!r}'
             f'</GeoTransform>']
    for k, band in enumerate(placement.tile.bands):
        gdal_type = _GDAL_TYPES[str(np.dtype(dtypes[band - 1]))]
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{k + 1}">{simple(band)}</VRTRasterBand>')
    lines.append(f'  <MaskBand><VRTRasterBand dataType="Byte">{simple(alpha)}</VRTRasterBand></MaskBand>')
    lines.append('</VRTDataset>')
    target = folder / f"tile{index}.vrt"
    target.write_text("\n".join(lines) + "\n")
    return target


def warp_scale(tile: Tile, plan: MosaicPlan) -> float:
    """GDAL's XSCALE/YSCALE for a warped tile: destination pixels per source pixel, capped at 1.

    GDAL otherwise estimates it anew for every warped block, from the block's
    shape, and widens the bilinear kernel accordingly, so a pixel's value would
    depend on the block it falls in.  A constant makes it a function of the
    pixel alone: 1 (plain 2x2 bilinear) for tiles of the mosaic's pixel size
    (within 1 %), less for tiles finer than the grid, whose kernel widens to
    average what each mosaic pixel covers.
    """
    ratio = _suggested_size(tile, plan.crs) / max(plan.transform.a, -plan.transform.e)
    return 1.0 if ratio > 0.99 else float(f"{ratio:.6g}")


def _fix_warped_vrt(vrt: Path) -> None:
    """Two edits of a serialised WarpedVRT, so that it is a function of the pixel alone and masks as it should.

    - Drop the approximate transformer GDAL wraps the warp in: every pixel's
      source position is then computed exactly, so a pixel's value does not
      depend on the block or window it is read in (rasterio cannot build a
      WarpedVRT with ``tolerance=0`` and a given grid, hence the edit).
    - Make its alpha band Byte: GDAL only takes a Byte (or UInt16) alpha band
      for the bands' mask, which the mosaic's ``UseMaskBand`` composites with;
      a Float32 alpha (a float tile's) would let the zeros outside the tile's
      footprint overwrite its neighbour.
    """
    import xml.etree.ElementTree as ET

    tree = ET.parse(vrt)
    for band in tree.getroot().iter("VRTRasterBand"):
        interp = band.find("ColorInterp")
        if interp is not None and (interp.text or "").strip().lower() == "alpha":
            band.set("dataType", "Byte")
    for transformer in tree.getroot().iter("Transformer"):
        approx = transformer.find("ApproxTransformer")
        base = None if approx is None else approx.find("BaseTransformer")
        if approx is not None and base is not None and len(base):
            transformer.remove(approx)
            transformer.append(base[0])
    tree.write(vrt)


def _source(filename: Path, band: str | int, placement: Placement, extra: str) -> str:
    w, h = placement.width, placement.height
    src_w, src_h = (w, h) if placement.warped else (placement.tile.width, placement.tile.height)
    return (f'    <ComplexSource>\n'
            f'      <SourceFilename relativeToVRT="0">{escape(str(filename))}</SourceFilename>\n'
            f'      <SourceBand>{band}</SourceBand>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{src_w}" ySize="{src_h}"/>\n'
            f'      <DstRect xOff="{placement.col}" yOff="{placement.row}" xSize="{w}" ySize="{h}"/>\n'
            f'      {extra}\n'
            f'    </ComplexSource>\n')


def write_mosaic_vrt(plan: MosaicPlan, folder: str | PathLike[str]) -> Path:
    """``folder/<name>.vrt`` (and a warped VRT per warped tile): the mosaic, nothing of it computed yet.

    Sources are listed so that the later one wins where tiles overlap: warped
    tiles first, then tiles on the grid, each group in reverse of the order named.
    """
    folder = Path(folder).absolute()  # sources are named by absolute paths: the ingest may run elsewhere
    folder.mkdir(parents=True, exist_ok=True)
    order = [p for p in reversed(plan.placements) if p.warped] + [p for p in reversed(plan.placements) if not p.warped]
    files: dict[int, Path] = {}
    for i, p in enumerate(plan.placements):
        files[id(p)] = _warped_tile(p, plan, folder, i) if p.warped else p.tile.path
    first = plan.placements[0].tile
    gdal_type = _GDAL_TYPES[plan.dtype]
    t = plan.transform
    lines = [f'<VRTDataset rasterXSize="{plan.width}" rasterYSize="{plan.height}">',
             f'  <SRS>{escape(plan.crs.to_wkt())}</SRS>',
             f'  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>']
    for k in range(len(first.bands)):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{k + 1}">')
        if first.descriptions[k]:
            lines.append(f'    <Description>{escape(first.descriptions[k] or "")}</Description>')
        if first.units[k]:
            lines.append(f'    <UnitType>{escape(first.units[k])}</UnitType>')
        if first.offsets[k] != 0.0 or first.scales[k] != 1.0:
            lines.append(f'    <Offset>{first.offsets[k]!r}</Offset>\n    <Scale>{first.scales[k]!r}</Scale>')
        for p in order:  # a warped tile's wrapper numbers the image bands 1..n
            source_band = k + 1 if p.warped else p.tile.bands[k]
            lines.append(_source(files[id(p)], source_band, p, "<UseMaskBand>true</UseMaskBand>").rstrip("\n"))
        lines.append('  </VRTRasterBand>')
    lines.append('  <MaskBand>\n  <VRTRasterBand dataType="Byte">')  # valid where any tile is: per-dataset mask
    for p in order:
        lines.append(_source(files[id(p)], "mask,1", p, "<NODATA>0</NODATA>").rstrip("\n"))
    lines.append('  </VRTRasterBand>\n  </MaskBand>')
    lines.append('</VRTDataset>')
    target = folder / f"{plan.ref.name}.vrt"
    target.write_text("\n".join(lines) + "\n")
    return target


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
    for stale in store_path.parent.glob(f".{store_path.name}.vrt-*"):  # an interrupted ingest's VRT files
        shutil.rmtree(stale, ignore_errors=True)
    folder = store_path.parent / f".{store_path.name}.vrt-{uuid.uuid4().hex[:8]}"
    try:
        vrt = write_mosaic_vrt(plan, folder)
        try:
            store = ingest_geotiff(vrt, store_path, source=source, **({"chunk": chunk} if chunk else {}))
        except SegflowError as exc:  # about the VRT: name the tile that cannot be read, else the mosaic
            if exc.path is not None and exc.path.startswith(str(folder)):
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
    from storage.geotiff import _GDAL_ERRORS, _describe, _gdal_message

    for placement in plan.placements:
        tile = placement.tile
        with rasterio.open(tile.path) as src:
            for _, window in src.block_windows(1):
                try:
                    src.read(tile.bands, window=window)
                except _GDAL_ERRORS as exc:
                    raise CorruptInputError(tile.path, f"cannot read pixels ({_describe(window)}): "
                                                       f"{_gdal_message(exc)}") from None


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
    from storage.errors import InputError
    from storage.ingest import stem_of
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
