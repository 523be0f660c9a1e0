"""A STAC item as input: the bands a model needs, picked from the item's assets and stacked on one grid.

Satellite scenes come as catalogues describe them: a STAC item whose assets
are one file per band, at 10, 20 and 60 m for Sentinel-2.  The item is read
with pystac; each wanted band (``--bands`` or the card's channel names) is
matched to an asset's ``eo:bands`` name or common name (STAC 1.0), ``bands``
(STAC 1.1) or the asset's key, through :func:`storage.bands.locate`.  The
assets used are stacked lazily on the grid of the finest of them by a GDAL VRT
written in the work folder: one band per wanted band, in the model's order,
each coarser asset resampled by GDAL as pixels are read (with the card's
``input.resampling``, bilinear unless it names another kernel), with the
scale and offset of ``raster:bands`` (else the asset's own).  The VRT is then
ingested like any raster, chunk by chunk: no stacked GeoTIFF is written, the
only copy is the zarr store every input gets.  Asset hrefs go to GDAL as they are (local paths, ``/vsis3/``,
``/vsicurl/``; ``s3://`` and ``https://`` are mapped to those); relative ones
are resolved against where the item was read from (its folder, or for a
downloaded copy the URL it came from: ``origin``), else its self link.  The item's
id, sanitised, names the outputs; the store records the item's id, self href
and each asset's href and checksum.  Reading the item and picking its bands is
:mod:`storage.stacassets`'s part; stacking the picked bands and ingesting them is this module's, and so is
:func:`probe_item`: what a nightly run needs to route an item to a model and key its outputs (the header of
the stack a model would get, and the content identity of what it would read) before anything is ingested.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from os import PathLike
from pathlib import Path

from storage import jsontext
from storage.bandcover import BandCover
from storage.bands import BandRequest
from storage.errors import CorruptInputError, IncompatibleInputError, InvalidInputError, SegflowError
from storage.geometry import SourceInfo, StacAssetInfo, StacItemInfo
from storage.hashing import sha256_input
from storage.header import Header, pixel_hectares
from storage.inputfiles import ITEM_SUFFIXES, stem_of
from storage.layout import ImageStore
from storage.stacassets import ItemPlan, OpenedAsset, open_asset, plan_item

NAME_MAX = 80
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64"}


def is_item_path(path: str | PathLike[str]) -> bool:
    """Whether an input names a STAC item (by its name: ``.json``)."""
    return str(path).lower().endswith(ITEM_SUFFIXES)


# names Windows (and SMB shares) refuse as a file's stem whatever its extension: CON.tif cannot be made there
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def sanitised(name: str, fallback: str = "item") -> str:
    """A name read from inside a file made safe as a file name: [A-Za-z0-9._-], no leading dot, <= 80, and no
    name Windows reserves (``CON`` becomes ``CON_``); ``fallback`` when nothing is left."""
    safe = _SAFE.sub("_", name).strip("._-")[:NAME_MAX].strip("._-")
    if safe.split(".", 1)[0].upper() in _RESERVED:
        safe = safe.split(".", 1)[0] + "_" + safe[len(safe.split(".", 1)[0]):]
    return safe or fallback


def looks_like_item(text: bytes | str) -> bool:
    """Whether a JSON document is a STAC item (a Feature with ``stac_version``): how an inbox tells an item
    from other JSON files (a manifest, a report) that are not inputs."""
    try:
        doc = jsontext.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("type") == "Feature" and "stac_version" in doc


def item_stem(path: str | PathLike[str]) -> str | None:
    """The output stem of a local STAC item file: its id, sanitised; None when it is no readable item.

    An id of which nothing is left (``日本語のシーン``, ``..``) gives the file's
    own stem: every such item was named ``item``, and renaming one of two that
    clashed, as the clash's message says, changed nothing.
    """
    named = _named(path)
    return None if named is None else named[0]


def named_by_id(path: str | PathLike[str]) -> bool:
    """Whether a local item's outputs are named after its id (renaming the file then does not rename them)."""
    named = _named(path)
    return named is not None and named[1]


def _named(path: str | PathLike[str]) -> tuple[str, bool] | None:
    """(the output stem, whether it comes from the id) of a local item file; None when it is no readable item."""
    if not is_item_path(path):
        return None
    try:
        doc = jsontext.read(path)
    except (OSError, ValueError):
        return None
    ident = doc.get("id") if isinstance(doc, dict) and doc.get("type") == "Feature" else None
    if not isinstance(ident, str) or not ident.strip():
        return None
    from_id = sanitised(ident, fallback="")
    return (from_id, True) if from_id else (stem_of(path), False)


# --------------------------------------------------------------------------- stacking the assets


def _grid(path: Path, ident: str, opened: dict[str, OpenedAsset]) -> str:
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


def _opened(plan: ItemPlan) -> tuple[dict[str, OpenedAsset], OpenedAsset]:
    """The assets the plan uses, opened (headers only), and the one whose grid the stack takes."""
    opened = {a.key: open_asset(plan.path, a) for a in plan.used_assets()}
    return opened, opened[_grid(plan.path, plan.id, opened)]


def _fmt(v: float) -> str:
    return repr(float(v))


def build_vrt(plan: ItemPlan, target: Path) -> tuple[Path, list[StacAssetInfo], list[BandCover]]:
    """Write the VRT stacking the picked bands on the finest asset's grid; (its path, the assets used, where each
    band has data: :mod:`storage.bandcover`, since GDAL's own mask of the stack calls a pixel valid where any band
    is, and a band with no nodata reads 0 past its file's edge).

    Coarser assets are resampled with the plan's kernel (the card's
    ``input.resampling``; bilinear by default) as the VRT is read (GDAL's own
    resampled RasterIO, the same as ``rasterio``'s ``read(out_shape=...,
    resampling=...)`` of the whole asset).
    """
    opened, grid = _opened(plan)
    for band in plan.picked:
        if band.index > len(opened[band.asset].dtypes):
            raise InvalidInputError(plan.path, f"asset {band.asset!r} of item {plan.id!r} has "
                                               f"{len(opened[band.asset].dtypes)} band(s); the item describes "
                                               f"band {band.index}")
    t = grid.transform
    root = ET.Element("VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height))
    if grid.crs is not None:
        ET.SubElement(root, "SRS").text = grid.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(_fmt(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    covers = []
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
        width, height = o.width * o.transform.a / t.a, o.height * o.transform.e / t.e
        ET.SubElement(src, "DstRect", xOff=_fmt(x0), yOff=_fmt(y0), xSize=_fmt(width), ySize=_fmt(height))
        if nodata is not None:
            ET.SubElement(src, "NODATA").text = _fmt(nodata)
        covers.append(BandCover(x0, y0, width, height, None if nodata is None else float(nodata)))
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=False)
    return target, _asset_infos(plan), covers


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


def reuse_sha256(path: str | PathLike[str], request: BandRequest | None, origin: str | None = None) -> str | None:
    """:func:`content_sha256` of the item now, to check an earlier ingest against; None when it cannot be had."""
    try:
        plan = plan_item(path, request, origin=origin)
        return content_sha256(plan, _asset_infos(plan))
    except (SegflowError, OSError, ValueError):
        return None


def probe_item(path: str | PathLike[str], request: BandRequest | None,
               origin: str | None = None) -> tuple[Header, str]:
    """(the header of the stack ``request`` would ingest, :func:`content_sha256` of what it would read).

    Opens the assets used (their headers only), so a band the item lacks or an
    asset that does not open is refused here, as ingest would refuse it.
    ``IncompatibleInputError`` means this request does not fit the item.
    """
    path = Path(path).absolute()
    plan = plan_item(path, request, origin=origin)
    _, grid = _opened(plan)
    size, note = pixel_hectares(grid.transform, grid.crs, (grid.height, grid.width))
    n = len(plan.picked)
    header = Header(path=str(path), kind="raster", spatial_dims=2, channels=n, shape=(grid.height, grid.width),
                    cell_size=size, cell_unit="ha", cell_note=note, bands=tuple(range(1, n + 1)),
                    band_descriptions=tuple(plan.names))
    return header, content_sha256(plan, _asset_infos(plan))


# --------------------------------------------------------------------------- ingest


def ingest_item(path: str | PathLike[str], store_path: str | PathLike[str], *, chunk: int | None = None,
                bands: BandRequest | None = None, origin: str | None = None) -> ImageStore:
    """Stack the item's bands for ``bands`` (None: all) in a VRT beside the store and ingest that, chunk by chunk.

    Errors name the item; the VRT is removed whatever happens.  ``origin``: the
    URL ``path`` was downloaded from.
    """
    from storage.geotiff import ingest_geotiff

    path = Path(path).absolute()
    store_path = Path(store_path)
    plan = plan_item(path, bands, origin=origin)
    # absolute, as the errors of the ingest name it: a relative --out had the VRT's path, not the item's, reported
    vrt = store_path.absolute().with_name(store_path.name + ".stack.vrt")
    try:
        vrt, infos, covers = build_vrt(plan, vrt)
        source = SourceInfo(path=str(path), sha256=content_sha256(plan, infos), size=path.stat().st_size,
                            format="STAC item")
        info = StacItemInfo(id=plan.id, self_href=plan.self_href, sha256=plan.sha256, assets=infos,
                            datetime=plan.datetime)
        try:
            return ingest_geotiff(vrt, store_path, **({"chunk": chunk} if chunk else {}), source=source,
                                  geometry_update={"stac_item": info}, covers=covers)
        except SegflowError as exc:
            if exc.path is None or Path(exc.path).absolute() != vrt:
                raise
            if isinstance(exc, CorruptInputError):
                _raise_for_unreadable_asset(plan)
            problem = exc.problem.replace(str(vrt), "the stacked bands")
            cls = CorruptInputError if isinstance(exc, CorruptInputError) else type(exc)
            raise cls(path, f"item {plan.id!r}: {problem}") from None
    finally:
        vrt.unlink(missing_ok=True)


def _raise_for_unreadable_asset(plan: ItemPlan) -> None:
    """After a failed copy of the stack: read the picked bands of each local asset block by block and raise
    naming the first asset that fails (a damaged COG opens fine and fails when its pixels are read).  Returns when
    each reads (or is remote: not read twice over the network), leaving the stack's own error to be said."""
    import rasterio

    from storage.rasteropen import GDAL_ERRORS, describe_window, gdal_env, gdal_message

    for asset in plan.used_assets():
        if asset.local is None:
            continue
        bands = list(dict.fromkeys(b.index for b in plan.picked if b.asset == asset.key))
        where = "cannot be opened"
        try:
            with gdal_env(), rasterio.open(asset.gdal) as src:
                for _, window in src.block_windows(1):
                    where = f"cannot read pixels ({describe_window(window)})"
                    src.read(bands, window=window)
        except (*GDAL_ERRORS, OSError) as exc:
            raise CorruptInputError(plan.path, f"item {plan.id!r}: asset {asset.key!r} ({asset.href}): {where}: "
                                               f"{gdal_message(exc)}") from None


__all__ = ["ITEM_SUFFIXES", "ItemPlan", "build_vrt", "content_sha256", "ingest_item", "is_item_path", "item_stem",
           "named_by_id", "looks_like_item", "plan_item", "probe_item", "reuse_sha256", "sanitised"]
