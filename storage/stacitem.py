"""A STAC item as input: the bands a model needs, picked from the item's assets and stacked on one grid.

Satellite scenes come as catalogues describe them: a STAC item whose assets
are one file per band, at 10, 20 and 60 m for Sentinel-2.  The item is read
with pystac; each wanted band (``--bands`` or the card's channel names) is
matched to an asset's ``eo:bands`` name or common name (STAC 1.0), ``bands``
(STAC 1.1) or the asset's key, through :func:`storage.bands.aliases`.  The
assets used are stacked lazily on the grid of the finest of them by a GDAL VRT
written in the work folder: one band per wanted band, in the model's order,
each coarser asset resampled by GDAL as pixels are read (with the card's
``input.resampling``, bilinear unless it names another kernel), with the
scale and offset of ``raster:bands`` (else the asset's own).  The VRT is then
ingested like any raster, chunk by chunk: no stacked GeoTIFF is written, the
only copy is the zarr store every input gets.  Asset hrefs go to GDAL as they are (local paths, ``/vsis3/``,
``/vsicurl/``; ``s3://`` and ``https://`` are mapped to those); relative ones
are resolved against the item file's folder, else its self link.  The item's
id, sanitised, names the outputs; the store records the item's id, self href
and each asset's href and checksum.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from storage.bands import BandRequest, aliases
from storage.errors import (CorruptInputError, IncompatibleInputError, InputError, InvalidInputError,
                            SegflowError, UnsupportedFormatError)
from storage.geometry import SourceInfo, StacAssetInfo, StacItemInfo
from storage.hashing import sha256_input
from storage.ingest import ITEM_SUFFIXES
from storage.layout import ImageStore
from storage.remote import is_url, parent_of, resolve

NAME_MAX = 80
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RASTER_TYPES = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-hdf")
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
_NOT_DATA_ROLES = {"thumbnail", "overview", "metadata"}
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64"}


def is_item_path(path: str | PathLike[str]) -> bool:
    """Whether an input names a STAC item (by its name: ``.json``)."""
    return str(path).lower().endswith(ITEM_SUFFIXES)


def sanitised(name: str) -> str:
    """A name read from inside a file made safe as a file name: [A-Za-z0-9._-], no leading dot, <= 80."""
    safe = _SAFE.sub("_", name).strip("._-")[:NAME_MAX].strip("._-")
    return safe or "item"


def item_stem(path: str | PathLike[str]) -> str | None:
    """The output stem of a local STAC item file: its id, sanitised; None when it is no readable item."""
    if not is_item_path(path):
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ident = doc.get("id") if isinstance(doc, dict) and doc.get("type") == "Feature" else None
    return sanitised(ident) if isinstance(ident, str) and ident.strip() else None


# --------------------------------------------------------------------------- reading the item


@dataclass
class _Band:
    """One band an asset offers."""

    asset: str
    index: int  # 1-based, in the asset
    name: str | None = None
    common_name: str | None = None
    scale: float | None = None  # raster:bands
    offset: float | None = None
    nodata: float | None = None

    def label(self) -> str:
        return self.name or self.common_name or (self.asset if self.index == 1 else f"{self.asset}:{self.index}")

    def shown(self) -> str:
        names = "/".join(dict.fromkeys(n for n in (self.name, self.common_name) if n)) or "(unnamed)"
        return f"{names} [asset {self.asset}{'' if self.index == 1 else f' band {self.index}'}]"


@dataclass
class _Asset:
    key: str
    href: str  # absolute
    gdal: str  # what GDAL opens
    media_type: str
    roles: list[str]
    fields: dict[str, Any]
    bands: list[_Band] = field(default_factory=list)
    described: bool = True  # the item describes its bands (else they come from GDAL)

    @property
    def local(self) -> Path | None:
        return None if self.gdal.startswith("/vsi") else Path(self.gdal)


@dataclass
class ItemPlan:
    """What an item gives a run: the bands picked, in the model's order, and from which assets."""

    path: Path
    id: str
    self_href: str | None
    sha256: str
    picked: list[_Band]
    assets: dict[str, _Asset]
    resampling: str = "bilinear"  # for coarser bands, onto the finest band's grid (the card's kernel)

    @property
    def names(self) -> list[str]:
        return [b.label() for b in self.picked]

    def used_assets(self) -> list[_Asset]:
        return [self.assets[k] for k in dict.fromkeys(b.asset for b in self.picked)]


def _read(path: Path) -> tuple[dict[str, Any], Any]:
    """The item's JSON and its pystac Item; one-line refusals for what is not a STAC item."""
    import pystac

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UnsupportedFormatError(path, "is not a STAC item: not UTF-8 JSON text") from None
    except json.JSONDecodeError as exc:
        raise UnsupportedFormatError(path, f"is not a STAC item: not JSON ({exc.msg}, line {exc.lineno})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
    if kind != "Feature" or "stac_version" not in doc:
        what = f"a STAC {kind}" if kind in ("Collection", "Catalog") else \
            "a GeoJSON Feature without stac_version" if kind == "Feature" else f"JSON of type {kind!r}"
        raise UnsupportedFormatError(path, f"is not a STAC item ({what}); segflow reads STAC items")
    try:
        item = pystac.Item.from_dict(doc, href=str(path), migrate=False, preserve_dict=True)
    except Exception as exc:  # noqa: BLE001 - pystac raises many types for a malformed item
        raise InvalidInputError(path, f"is not a valid STAC item: {type(exc).__name__}: {exc}") from None
    return doc, item


def _self_href(doc: dict[str, Any]) -> str | None:
    for link in doc.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and isinstance(link.get("href"), str):
            return link["href"]
    return None


def _absolute(href: str, folder: Path, self_href: str | None) -> str:
    """``href`` made absolute: beside the item file when it is there, else against the item's self link."""
    if href.startswith("file://"):
        return urlparse(href).path
    if href.startswith("/") or is_url(href):
        return href
    local = (folder / href).resolve()
    if local.exists() or not is_url(self_href):
        return str(local)
    return resolve(parent_of(self_href), href)  # type: ignore[arg-type]


def _gdal_path(href: str) -> str:
    """What GDAL opens for an absolute href: local paths and /vsi paths as they are, URLs through /vsi."""
    for scheme, vsi in (("s3://", "/vsis3/"), ("gs://", "/vsigs/"), ("az://", "/vsiaz/")):
        if href.startswith(scheme):
            return vsi + href[len(scheme):]
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    return href


def _is_raster(asset: Any, fields: dict[str, Any]) -> bool:
    roles = set(asset.roles or [])
    if roles & _NOT_DATA_ROLES and "data" not in roles:
        return False
    if any(k in fields for k in ("eo:bands", "bands", "raster:bands")):
        return True
    media = (asset.media_type or "").lower()
    return media.startswith(_RASTER_TYPES) or urlparse(asset.href).path.lower().endswith(_RASTER_SUFFIXES)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _described_bands(key: str, fields: dict[str, Any]) -> list[_Band]:
    """The bands the item states for an asset: STAC 1.1 ``bands``, else 1.0 ``eo:bands`` and ``raster:bands``."""
    eo = fields.get("bands") if isinstance(fields.get("bands"), list) else fields.get("eo:bands")
    raster = fields.get("raster:bands")
    eo = eo if isinstance(eo, list) else []
    raster = raster if isinstance(raster, list) else []
    out = []
    for i in range(max(len(eo), len(raster))):
        e = eo[i] if i < len(eo) and isinstance(eo[i], dict) else {}
        r = raster[i] if i < len(raster) and isinstance(raster[i], dict) else {}
        out.append(_Band(asset=key, index=i + 1, name=e.get("name") if isinstance(e.get("name"), str) else None,
                         common_name=_text(e.get("eo:common_name", e.get("common_name"))),
                         scale=_number(r.get("scale", e.get("raster:scale"))),
                         offset=_number(r.get("offset", e.get("raster:offset"))),
                         nodata=_number(r.get("nodata", e.get("nodata")))))
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _assets(path: Path, doc: dict[str, Any], item: Any) -> dict[str, _Asset]:
    """The item's raster assets, in the item's order, with the bands each offers."""
    self_href = _self_href(doc)
    out: dict[str, _Asset] = {}
    for key, asset in item.assets.items():
        fields = dict(asset.extra_fields or {})
        if not _is_raster(asset, fields):
            continue
        href = _absolute(asset.href, path.parent, self_href)
        a = _Asset(key=key, href=href, gdal=_gdal_path(href), media_type=(asset.media_type or ""),
                   roles=list(asset.roles or []), fields=fields)
        a.bands = _described_bands(key, fields)
        if not a.bands:  # the item does not say: one band named by the key until GDAL says otherwise
            a.described = False
            a.bands = [_Band(asset=key, index=1)]
        out[key] = a
    return out


def _names(band: _Band, asset: _Asset) -> set[str]:
    names = {band.name, band.common_name} | ({asset.key} if len(asset.bands) == 1 else set())
    return {"".join(n.split()).lower() for n in names if n}


def _preference(band: _Band, asset: _Asset, order: int) -> tuple:
    """Among assets offering one band: a one-band data asset, as a (cloud-optimized) GeoTIFF, first in the item."""
    media = asset.media_type.lower()
    tiff = media.startswith(("image/tiff", "image/vnd.stac.geotiff")) or asset.href.lower().endswith((".tif", ".tiff"))
    return (len(asset.bands) != 1, "data" not in asset.roles and bool(asset.roles), not tiff, order)


def _offered(assets: dict[str, _Asset]) -> list[_Band]:
    return [b for a in assets.values() for b in a.bands]


def _listing(offered: list[_Band]) -> str:
    return ", ".join(f"{i}:{b.shown()}" for i, b in enumerate(offered, 1))


def _pick(path: Path, ident: str, assets: dict[str, _Asset], request: BandRequest) -> list[_Band]:
    """The bands ``request`` wants, in its order; one refusal listing what the item offers."""
    offered = _offered(assets)
    where = f"item {ident!r}"
    if request.wanted is None:
        if request.channels is None or len(offered) == request.channels:
            return offered
        raise IncompatibleInputError(path, f"{request.model} takes {request.channels} band(s) and its card names "
                                           f"none; {where} offers {len(offered)}: {_listing(offered)}; "
                                           f"choose them with --bands (names or 1-based indices)")
    order = {id(b): n for n, b in enumerate(offered)}
    picked: list[_Band] = []
    missing: list[str] = []
    for w in request.wanted:
        if w.strip().isdigit():
            i = int(w) - 1
            if 0 <= i < len(offered):
                picked.append(offered[i])
            else:
                missing.append(f"band {int(w)}")
            continue
        found = None
        for alias in aliases(w):  # the name itself first, then its other names
            hits = [b for b in offered if alias in _names(b, assets[b.asset])]
            if hits:
                found = min(hits, key=lambda b: _preference(b, assets[b.asset], order[id(b)]))
                break
        if found is None:
            missing.append(w.strip())
        else:
            picked.append(found)
    if missing:
        raise IncompatibleInputError(path, f"{request.model} needs {', '.join(missing)}, which no asset of {where} "
                                           f"offers (it has {len(offered)} band(s): {_listing(offered)}); "
                                           f"{request.hint}")
    if len({id(b) for b in picked}) != len(picked):
        raise IncompatibleInputError(path, f"{request.model}'s bands {list(request.wanted)} name one band of "
                                           f"{where} twice; {request.hint}")
    return picked


def plan_item(path: str | PathLike[str], request: BandRequest | None = None) -> ItemPlan:
    """Read the item and pick its bands for ``request`` (None: all of them); opens only undescribed assets."""
    path = Path(path).absolute()
    request = request or BandRequest()
    doc, item = _read(path)
    assets = _assets(path, doc, item)
    if not assets:
        shown = ", ".join(f"{k} ({a.media_type or 'no type'})" for k, a in item.assets.items()) or "none"
        raise InvalidInputError(path, f"item {item.id!r} has no raster asset segflow can use (assets: {shown})")
    for asset in assets.values():
        if not asset.described:
            asset.bands = _gdal_bands(path, asset)
    return ItemPlan(path=path, id=item.id, self_href=_self_href(doc), sha256=sha256_input(path),
                    picked=_pick(path, item.id, assets, request), assets=assets, resampling=request.resampling)


# --------------------------------------------------------------------------- opening the assets


@dataclass
class _Opened:
    """What GDAL says of one asset: its grid, and each band's type, nodata, scale and offset."""

    width: int
    height: int
    transform: Any
    crs: Any
    dtypes: tuple[str, ...]
    nodata: tuple[float | None, ...]
    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    descriptions: tuple[str | None, ...]
    block: tuple[int, int]


def _open(path: Path, asset: _Asset) -> _Opened:
    import rasterio

    from storage.rasteropen import GDAL_ERRORS, bounded_gdal_cache, gdal_message

    try:
        with bounded_gdal_cache(), rasterio.open(asset.gdal) as src:
            return _Opened(width=src.width, height=src.height, transform=src.transform, crs=src.crs,
                           dtypes=tuple(src.dtypes), nodata=tuple(src.nodatavals),
                           scales=tuple(1.0 if s is None else float(s) for s in src.scales),
                           offsets=tuple(0.0 if o is None else float(o) for o in src.offsets),
                           descriptions=tuple(src.descriptions), block=tuple(src.block_shapes[0]))
    except (*GDAL_ERRORS, OSError) as exc:
        raise InputError(path, f"asset {asset.key!r} ({asset.href}) cannot be opened: {gdal_message(exc)}") from None


def _gdal_bands(path: Path, asset: _Asset) -> list[_Band]:
    """The bands of an asset the item does not describe, named by their GDAL descriptions (else the key)."""
    opened = _open(path, asset)
    return [_Band(asset=asset.key, index=i, name=d or None) for i, d in enumerate(opened.descriptions, 1)]


def _grid(path: Path, ident: str, opened: dict[str, _Opened]) -> str:
    """The key of the asset whose grid the stack takes: the finest; refuses what cannot share one grid."""
    first_key = next(iter(opened))
    crs = opened[first_key].crs
    for key, o in opened.items():
        t = o.transform
        if t.b != 0 or t.d != 0:
            raise IncompatibleInputError(path, f"asset {key!r} of item {ident!r} has a rotated grid; segflow "
                                               "stacks north-up assets only")
        if o.crs != crs:
            raise IncompatibleInputError(path, f"assets {first_key!r} and {key!r} of item {ident!r} are in "
                                               f"different CRSs ({crs} and {o.crs}); warp them to one first")
        if (t.a > 0) != (opened[first_key].transform.a > 0) or (t.e > 0) != (opened[first_key].transform.e > 0):
            raise IncompatibleInputError(path, f"assets {first_key!r} and {key!r} of item {ident!r} have grids "
                                               "of opposite orientation")
    return min(opened, key=lambda k: (abs(opened[k].transform.a) * abs(opened[k].transform.e)))


def _fmt(v: float) -> str:
    return repr(float(v))


def build_vrt(plan: ItemPlan, target: Path) -> tuple[Path, list[StacAssetInfo]]:
    """Write the VRT stacking the picked bands on the finest asset's grid; (its path, the assets used).

    Coarser assets are resampled with the plan's kernel (the card's
    ``input.resampling``; bilinear by default) as the VRT is read (GDAL's own
    resampled RasterIO, the same as ``rasterio``'s ``read(out_shape=...,
    resampling=...)`` of the whole asset).
    """
    used = plan.used_assets()
    opened = {a.key: _open(plan.path, a) for a in used}
    for band in plan.picked:
        if band.index > len(opened[band.asset].dtypes):
            raise InvalidInputError(plan.path, f"asset {band.asset!r} of item {plan.id!r} has "
                                               f"{len(opened[band.asset].dtypes)} band(s); the item describes "
                                               f"band {band.index}")
    grid = opened[_grid(plan.path, plan.id, opened)]
    t = grid.transform
    root = ET.Element("VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height))
    if grid.crs is not None:
        ET.SubElement(root, "SRS").text = grid.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(_fmt(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    for n, band in enumerate(plan.picked, 1):
        o = opened[band.asset]
        dtype = o.dtypes[band.index - 1]
        if dtype not in _GDAL_TYPES:
            raise InvalidInputError(plan.path, f"asset {band.asset!r} of item {plan.id!r} has {dtype} pixels, "
                                               "which cannot be segmented")
        vb = ET.SubElement(root, "VRTRasterBand", dataType=_GDAL_TYPES[dtype], band=str(n))
        ET.SubElement(vb, "Description").text = band.label()
        nodata = band.nodata if band.nodata is not None else o.nodata[band.index - 1]
        if nodata is not None:
            ET.SubElement(vb, "NoDataValue").text = _fmt(nodata)
        scale = band.scale if band.scale is not None else o.scales[band.index - 1]
        offset = band.offset if band.offset is not None else o.offsets[band.index - 1]
        ET.SubElement(vb, "Offset").text = _fmt(offset)
        ET.SubElement(vb, "Scale").text = _fmt(scale)
        same = abs(o.transform.a) == abs(t.a) and abs(o.transform.e) == abs(t.e)
        src = ET.SubElement(vb, "ComplexSource", **({} if same else {"resampling": plan.resampling}))
        ET.SubElement(src, "SourceFilename", relativeToVRT="0").text = plan.assets[band.asset].gdal
        ET.SubElement(src, "SourceBand").text = str(band.index)
        ET.SubElement(src, "SourceProperties", RasterXSize=str(o.width), RasterYSize=str(o.height),
                      DataType=_GDAL_TYPES[dtype], BlockXSize=str(o.block[1]), BlockYSize=str(o.block[0]))
        ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(o.width), ySize=str(o.height))
        x0 = (o.transform.c - t.c) / t.a
        y0 = (o.transform.f - t.f) / t.e
        ET.SubElement(src, "DstRect", xOff=_fmt(x0), yOff=_fmt(y0), xSize=_fmt(o.width * o.transform.a / t.a),
                      ySize=_fmt(o.height * o.transform.e / t.e))
        if nodata is not None:
            ET.SubElement(src, "NODATA").text = _fmt(nodata)
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=False)
    return target, _asset_infos(plan)


def _asset_infos(plan: ItemPlan) -> list[StacAssetInfo]:
    """Each used asset's href and checksum: sha256 of a local file, the item's file:checksum for any."""
    out = []
    for asset in plan.used_assets():
        local = asset.local
        sha = size = None
        if local is not None and local.is_file():
            sha, size = sha256_input(local), local.stat().st_size
        size = size if size is not None else (int(asset.fields["file:size"])
                                              if isinstance(asset.fields.get("file:size"), int) else None)
        checksum = asset.fields.get("file:checksum")
        out.append(StacAssetInfo(key=asset.key, href=asset.href, sha256=sha, size=size,
                                 checksum=checksum if isinstance(checksum, str) else None,
                                 bands=[b.index for b in plan.picked if b.asset == asset.key]))
    return out


def content_sha256(plan: ItemPlan, assets: list[StacAssetInfo]) -> str:
    """The identity of what a run reads from an item: its JSON, the bands picked and each asset's content."""
    doc = {"item": plan.sha256, "channels": [[b.asset, b.index] for b in plan.picked],
           "assets": [[a.key, a.href, a.sha256 or a.checksum, a.size] for a in assets]}
    if plan.resampling != "bilinear":  # (bilinear, the first kernel, keeps the identities it always had)
        doc["resampling"] = plan.resampling
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def reuse_sha256(path: str | PathLike[str], request: BandRequest | None) -> str | None:
    """:func:`content_sha256` of the item now, to check an earlier ingest against; None when it cannot be had."""
    try:
        plan = plan_item(path, request)
        return content_sha256(plan, _asset_infos(plan))
    except (SegflowError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------- ingest


def ingest_item(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int | None = None,
                bands: BandRequest | None = None) -> ImageStore:
    """Stack the item's bands for ``bands`` (None: all) in a VRT beside the store and ingest that, chunk by chunk.

    Errors name the item; the VRT is removed whatever happens.
    """
    from storage.geotiff import ingest_geotiff

    path = Path(path).absolute()
    store_path = Path(store_path)
    plan = plan_item(path, bands)
    vrt = store_path.with_name(store_path.name + ".stack.vrt")
    try:
        vrt, infos = build_vrt(plan, vrt)
        source = SourceInfo(path=str(path), sha256=content_sha256(plan, infos), size=path.stat().st_size,
                            format="STAC item")
        info = StacItemInfo(id=plan.id, self_href=plan.self_href, sha256=plan.sha256, assets=infos)
        try:
            return ingest_geotiff(vrt, store_path, **({"chunk": chunk} if chunk else {}), source=source,
                                  geometry_update={"stac_item": info})
        except SegflowError as exc:
            if exc.path != str(vrt):
                raise
            problem = exc.problem.replace(str(vrt), "the stacked bands")
            cls = CorruptInputError if isinstance(exc, CorruptInputError) else type(exc)
            raise cls(path, f"item {plan.id!r}: {problem}") from None
    finally:
        vrt.unlink(missing_ok=True)


__all__ = ["ITEM_SUFFIXES", "ItemPlan", "build_vrt", "content_sha256", "ingest_item", "is_item_path", "item_stem",
           "plan_item", "reuse_sha256", "sanitised"]
