"""Label rasters to polygons, band by band, merged exactly across band borders.

A label raster can be far larger than memory, so it is read in row bands of
``chunk`` rows and each band is vectorised on its own.  A region cut by a band
border would then come out as several polygons; to give exactly what
vectorising the whole raster at once gives (``rasterio.features.shapes``:
4-connectivity, polygons along pixel edges), every band is first split into
4-connected components per class, and a component whose first row touches a
same-class component in the previous band's last row is joined to it
(union-find).  A group is unioned into one polygon as soon as none of its
parts touches the current band's last row, so only the regions still open at
the band border are held, however many bands they span.  Vectorising and
unioning happen in pixel coordinates, where every vertex is an exact integer,
and the affine transform is applied once at the end, so pieces always meet
without slivers.  The file is written under a temporary name and renamed.

Optional simplification (``simplify``, a tolerance in CRS units) runs after
the merge, on the finished polygons, so it cannot depend on the band size:
GEOS coverage simplification (Visvalingam-Whyatt on the edges shared between
polygons, each shared edge simplified once for both sides) keeps neighbours
sharing their borders, with no gaps or overlaps.  It needs an edge-matched
coverage, which pixel outlines are not (a straight edge of one polygon passes
the corner where two others meet), so every outline is first given a vertex at
each pixel edge; the outer boundary of the coverage (the raster's edge, nodata
and classes left out) is not simplified, so the union of all polygons is
exactly that of the pixel outlines.  Collinear vertices are dropped afterwards.
``area_ha`` stays the exact pixel area of each region (pixels x pixel area):
the statistic must not depend on a drawing tolerance.  Memory: every polygon
is held until the file is written (with or without simplification); while
simplifying, outlines hold one vertex per pixel edge of region boundary, about
16 bytes per boundary pixel edge plus GEOS's copy of the coverage.  Polygons
are written in a canonical order (by their lowest-left vertex, then class), so
the file does not depend on the band size either.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio.errors
import pyogrio.raw
import rasterio.features
import scipy.ndimage as ndi
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine
from shapely.geometry import shape

from storage.classes import LabelClass
from storage.errors import ExportError, InvalidInputError
from storage.header import linear_unit_metres, on_the_earth, pixel_hectares

Driver = Literal["GPKG", "Parquet", "GeoJSON"]
_SUFFIX = {"GPKG": ".gpkg", "Parquet": ".parquet", "GeoJSON": ".geojson"}
_FOUR = ndi.generate_binary_structure(2, 1)  # 4-connectivity, as rasterio.features.shapes(connectivity=4)


class _Groups:
    """Union-find over component ids, each root holding its class and its polygon pieces."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.pending: dict[int, tuple[int, list[shapely.Polygon]]] = {}

    def add(self, gid: int, value: int, piece: shapely.Polygon) -> None:
        self.parent[gid] = gid
        self.pending[gid] = (value, [piece])

    def find(self, gid: int) -> int:
        root = gid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[gid] != root:  # path compression
            self.parent[gid], gid = root, self.parent[gid]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        va, pa_ = self.pending.pop(ra)
        vb, pb = self.pending[rb]
        assert va == vb, "only same-class components are joined"
        pb.extend(pa_)
        self.parent[ra] = rb

    def close_all_but(self, open_roots: set[int]) -> list[tuple[int, shapely.Geometry]]:
        """Union and hand out every group that can no longer grow; forget their ids."""
        done = []
        for root in [r for r in self.pending if r not in open_roots]:
            value, pieces = self.pending.pop(root)
            if len(pieces) == 1:
                geom = pieces[0]
            else:  # drop the vertices left on band borders, as a whole-raster run has none there
                geom = shapely.simplify(shapely.unary_union(pieces), 0.0, preserve_topology=True)
            done.append((value, geom))
        if not self.pending:  # nothing open: the id table can be dropped wholesale
            self.parent.clear()
        return done


def _components(band: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Local 4-connected component ids (0 = no polygon) and each id's class value."""
    ids = np.zeros(band.shape, dtype=np.int32)
    value_of: dict[int, int] = {}
    count = 0
    for value in np.unique(band):
        if value not in wanted:
            continue
        lab, n = ndi.label(band == value, structure=_FOUR)
        if n:
            hit = lab > 0
            ids[hit] = lab[hit] + count
            value_of.update({count + k: int(value) for k in range(1, n + 1)})
            count += n
    return ids, value_of


def _area_factor(crs: Any, where: str, transform: Affine, shape: tuple[int, int]) -> tuple[CRS, float]:
    """The CRS and the factor from shapely area (CRS units²) to hectares; a geographic CRS has no such factor,
    nor one far from equal-area over the grid (:func:`storage.header.pixel_hectares`: Web Mercator at 52° N)."""
    if crs is None:
        raise InvalidInputError(where, "polygon areas in hectares need a projected CRS, and the labels have none")
    try:
        crs = CRS.from_user_input(crs)
    except (CRSError, TypeError, ValueError):
        raise InvalidInputError(where, f"the CRS {str(crs)[:60]!r} is not one GDAL understands") from None
    metres = linear_unit_metres(crs)
    if metres is None:
        what = "is geographic (degrees)" if crs.is_geographic else "has no linear unit"
        raise InvalidInputError(where, f"polygon areas in hectares need a projected CRS (this one {what})")
    _, why = pixel_hectares(transform, crs, shape)
    if why is not None:
        raise InvalidInputError(where, f"polygon areas in hectares need an area-true CRS: {why}")
    return crs, metres * metres / 1e4


def _tmp_name(out: Path, driver: str) -> Path:
    return out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp{_SUFFIX[driver]}"


def _write_parquet(tmp: Path, wkb: np.ndarray, columns: dict[str, np.ndarray], crs: CRS, bbox: list[float]) -> None:
    """GeoParquet 1.1 (WKB geometry, PROJJSON CRS): this GDAL build has no Parquet driver, so pyarrow writes it."""
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": crs.to_dict(projjson=True),
                **({"bbox": bbox} if bbox else {}),
            }
        },
    }
    table = pa.table(
        {
            "class": pa.array(columns["class"], pa.int32()),
            "name": pa.array(columns["name"], pa.string()),
            "area_ha": pa.array(columns["area_ha"], pa.float64()),
            "geometry": pa.array(list(wkb), pa.binary()),
        }
    ).replace_schema_metadata({"geo": json.dumps(geo)})
    pq.write_table(table, tmp)


def write_polygons(
    labels: Any,
    transform: Affine,
    crs: Any,
    out_path: Path,
    *,
    classes: list[LabelClass],
    nodata: int | None,
    chunk: int = 1024,
    driver: Driver = "GPKG",
    simplify: float | None = None,
    changed: datetime | None = None,
) -> dict[str, Any]:
    """Vectorise a (H, W) label raster into one polygon per 4-connected region per class.

    ``labels`` is anything sliceable by rows (a zarr array, numpy); it is read
    ``chunk`` rows at a time, never whole.  Only values listed in ``classes``
    become polygons, so nodata and unlisted values (e.g. a background the
    caller left out) produce none.  Columns: ``class`` (value), ``name``,
    ``area_ha``.  Returns ``{"polygons": n, "area_ha": {name: total}}`` with
    every listed class present, 0.0 where it has no polygon.  ``simplify``
    (CRS units; None or 0: exact pixel outlines) simplifies shared borders
    once for both neighbours; ``area_ha`` stays the exact pixel area.
    ``changed``: a GeoPackage's ``gpkg_contents.last_change``, else the time of
    writing (the only bytes by which two writes of the same labels differed).
    """
    out_path = Path(out_path)
    if driver not in _SUFFIX:
        raise ExportError(out_path, f"unknown vector format {driver!r}; use one of {', '.join(_SUFFIX)}")
    shape_ = tuple(getattr(labels, "shape", ()))
    if len(shape_) != 2:
        raise InvalidInputError(out_path, f"a label raster must be 2-D (H, W), got shape {shape_}")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise InvalidInputError(out_path, f"label rasters hold integers, got {labels.dtype}")
    if chunk < 1:
        raise InvalidInputError(out_path, f"chunk must be at least one row, got {chunk}")
    if simplify is not None and not (np.isfinite(simplify) and simplify >= 0):
        raise InvalidInputError(out_path, f"the simplification tolerance must be a finite number >= 0, got {simplify}")
    crs, to_ha = _area_factor(crs, str(out_path), transform, shape_)
    if driver == "GeoJSON" and not on_the_earth(crs):
        raise InvalidInputError(out_path, "GeoJSON (RFC 7946) is in longitude and latitude, and this CRS has no "
                                          "place on the Earth (a local grid): write gpkg or parquet instead")
    names = {c.value: c.name for c in classes}
    wanted = np.array(sorted(v for v in names if v != nodata))

    height, _ = shape_
    groups = _Groups()
    done: list[tuple[int, shapely.Geometry]] = []
    prev_bottom: np.ndarray | None = None  # global ids along the previous band's last row
    next_id = 1
    for r0 in range(0, height, chunk):
        band = np.asarray(labels[r0 : r0 + chunk])
        local, value_of = _components(band, wanted)
        if value_of:
            found = list(rasterio.features.shapes(local, mask=local > 0, connectivity=4))
            pieces = [shape(geom) for geom, _ in found]  # band pixel coordinates, then shifted down by r0
            pieces = shapely.transform(np.array(pieces, dtype=object), lambda xy, r0=r0: xy + (0.0, float(r0)))
            for piece, (_, lid) in zip(pieces, found):
                groups.add(next_id - 1 + int(lid), value_of[int(lid)], piece)
        glob = np.where(local > 0, local.astype(np.int64) + (next_id - 1), 0)
        next_id += len(value_of)
        if prev_bottom is not None:
            top = glob[0]
            touching = (prev_bottom > 0) & (top > 0)
            for a, b in set(zip(prev_bottom[touching].tolist(), top[touching].tolist())):
                if groups.pending[groups.find(a)][0] == groups.pending[groups.find(b)][0]:
                    groups.union(a, b)
        last = r0 + band.shape[0] >= height
        prev_bottom = None if last else glob[-1]
        open_roots = set() if last else {groups.find(g) for g in np.unique(glob[-1]).tolist() if g > 0}
        done.extend(groups.close_all_but(open_roots))

    values = np.array([v for v, _ in done], dtype=np.int32)
    pixel_geoms = np.array([g for _, g in done], dtype=object)
    del done
    noded = driver == "GeoJSON"  # reprojected vertex by vertex: every meeting point a vertex of each side
    if (simplify or noded) and len(pixel_geoms):  # one vertex per pixel edge: an edge-matched coverage
        pixel_geoms = shapely.normalize(shapely.transform(shapely.segmentize(pixel_geoms, 1.0), np.rint))
    order = _canonical_order(pixel_geoms, values)
    pixel_geoms, values = pixel_geoms[order], values[order]
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    matrix = np.array([[a, d], [b, e]])
    geoms = shapely.transform(pixel_geoms, lambda xy: xy @ matrix + (c, f)) if len(values) else pixel_geoms
    del pixel_geoms
    areas = shapely.area(geoms) * to_ha if len(values) else np.array([], dtype=np.float64)  # exact pixel areas
    if simplify and len(values):
        geoms = _simplify_coverage(geoms, float(simplify), out_path, drop_collinear=not noded)
    if noded and len(values):
        geoms = _drop_collinear_keeping_nodes(geoms)
    cols = {
        "class": values,
        "name": np.array([names[int(v)] for v in values], dtype=object),
        "area_ha": np.asarray(areas, dtype=np.float64),
    }
    _write(out_path, driver, geoms, cols, crs, changed)
    totals = {names[v]: 0.0 for v in wanted.tolist()}
    for v, area in zip(values.tolist(), cols["area_ha"].tolist()):
        totals[names[v]] += area
    return {"polygons": len(values), "area_ha": totals}


def _canonical_order(geoms: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Polygons by lowest-left vertex (x, then y, in pixels), then class: an order no band size can change.

    Outlines of a pixel coverage never share their lexicographically smallest
    vertex, so the order is total.
    """
    if not len(geoms):
        return np.zeros(0, dtype=np.intp)
    bounds = shapely.bounds(geoms)
    first = shapely.get_point(shapely.get_exterior_ring(shapely.normalize(geoms)), 0)  # normalize starts at the min
    return np.lexsort((values, shapely.get_y(first), shapely.get_x(first), bounds[:, 1], bounds[:, 0]))


def _simplify_coverage(geoms: np.ndarray, tolerance: float, where: Path, drop_collinear: bool = True) -> np.ndarray:
    """GEOS coverage simplification of the shared edges only; the coverage's outer boundary stays exact."""
    simplified = shapely.coverage_simplify(geoms, tolerance, simplify_boundary=False)
    if drop_collinear:  # the pixel-edge vertices left; also nodes on a straight border, which GeoJSON keeps
        simplified = shapely.simplify(simplified, 0.0, preserve_topology=True)
    bad = ~shapely.is_valid(simplified) | (shapely.get_type_id(simplified) != shapely.GeometryType.POLYGON)
    if bad.any():  # not expected for an edge-matched coverage; never write a broken layer
        raise ExportError(where, f"simplifying by {tolerance} made {int(bad.sum())} invalid polygons; "
                                 "use a smaller --simplify tolerance")
    return simplified


def _drop_collinear_keeping_nodes(geoms: np.ndarray) -> np.ndarray:
    """Remove the vertices where no ring of the coverage turns, and keep every other one in every ring.

    GDAL reprojects GeoJSON vertex by vertex, so two rings meet after reprojection only where they share
    vertices: a straight border of one region that two others meet at a point in its middle (a T-junction)
    bends one way on that region's side and another on theirs.  Given a coverage holding a vertex at every
    pixel corner along its edges, a point where any ring turns stays a vertex of each ring through it, and
    only the points straight for all of them go.  Points are compared exactly: each came from the same
    pixel corner through the same affine transform.
    """
    rings, owner = shapely.get_rings(geoms, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    counts = np.bincount(ring_of, minlength=len(rings))
    closing = np.cumsum(counts) - 1  # each ring's repeated first point
    open_ = np.ones(len(coords), dtype=bool)
    open_[closing] = False
    coords, ring_of = coords[open_], ring_of[open_]
    sizes = counts - 1
    start = np.repeat(np.cumsum(sizes) - sizes, sizes)
    pos = np.arange(len(coords)) - start
    size = np.repeat(sizes, sizes)
    before = coords[start + (pos - 1) % size]
    after = coords[start + (pos + 1) % size]
    cross = (coords[:, 0] - before[:, 0]) * (after[:, 1] - coords[:, 1]) - \
        (coords[:, 1] - before[:, 1]) * (after[:, 0] - coords[:, 0])
    _, point = np.unique(coords, axis=0, return_inverse=True)
    turns = np.zeros(int(point.max()) + 1, dtype=bool)
    np.logical_or.at(turns, point.ravel(), cross != 0)
    keep = turns[point.ravel()]
    rebuilt = shapely.linearrings(coords[keep], indices=ring_of[keep])
    return shapely.polygons(rebuilt, indices=owner)


def _write(out: Path, driver: str, geoms: np.ndarray, cols: dict[str, np.ndarray], crs: CRS,
           changed: datetime | None = None) -> None:
    """Write under a temporary name beside ``out`` and rename: a reader never sees half a file."""
    tmp = _tmp_name(out, driver)
    wkb = shapely.to_wkb(geoms) if len(geoms) else np.array([], dtype=object)
    try:
        if driver == "Parquet":
            bounds = shapely.total_bounds(geoms).tolist() if len(geoms) else []
            _write_parquet(tmp, wkb, cols, crs, bounds)
        else:
            pyogrio.raw.write(
                tmp,
                geometry=wkb,
                field_data=[cols["class"], cols["name"], cols["area_ha"]],
                fields=["class", "name", "area_ha"],
                geometry_type="Polygon",
                crs=crs.to_wkt(),
                driver=driver,
                layer=layer_name(out) if driver != "Parquet" else None,  # GeoJSON's "name": else the temporary's
                # RFC 7946: GDAL takes the polygons to WGS84 longitude/latitude (7 decimals, ~1 cm), with exterior
                # rings counter-clockwise, and writes no "crs" member (which the RFC removed)
                **({"layer_options": {"RFC7946": "YES"}} if driver == "GeoJSON" else {}),
            )
            if driver == "GPKG" and changed is not None:
                _set_last_change(tmp, changed)
        os.replace(tmp, out)
    except (OSError, sqlite3.Error, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError,
            pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(out, f"cannot write the {driver} polygons: {str(exc).splitlines()[0][:200]}") from None


def _set_last_change(gpkg: Path, when: datetime) -> None:
    """The GeoPackage's ``last_change`` (ISO 8601 UTC, as the spec writes it), in place of GDAL's "now"."""
    stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    with contextlib.closing(sqlite3.connect(gpkg)) as db, db:
        db.execute("UPDATE gpkg_contents SET last_change = ?", (stamp,))


def layer_name(out: Path) -> str:
    """The polygons' layer name: the output's stem, less what GeoPackage refuses at the start of one (``[2024]
    scene``, ``-x``, ``.x``: "The layer name may not contain special characters", after the whole run)."""
    return re.sub(r"^\W+", "", out.stem) or "labels"


__all__ = ["layer_name", "write_polygons"]
