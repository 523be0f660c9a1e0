"""A STAC item read and checked, and the bands a run wants picked from its assets.

Before anything is stacked, an item must be read (pystac; one-line refusals for
what is not a STAC item), its raster assets found with hrefs GDAL can open
(relative ones resolved against where the item was read from: beside the
item file, or beside the URL a staged copy came from, else against its self
link), the
bands each asset offers learnt (from ``bands``/``eo:bands``/``raster:bands``,
else from GDAL for assets the item does not describe), and the wanted bands
matched to them in the model's order.  This module does that and hands back an
:class:`ItemPlan`; :mod:`storage.stacitem` stacks the plan's bands on one grid
and ingests them, opening the same assets through :func:`open_asset`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from storage import jsontext
from storage.bands import BandRequest, band_meanings, locate, same_band_once
from storage.errors import IncompatibleInputError, InputError, InvalidInputError, UnsupportedFormatError
from storage.hashing import sha256_input
from storage.inputfiles import regular_file_problem
from storage.remote import is_url, parent_of, resolve
from storage.sources import NamedSource, check_sources, vrt_sources

__all__ = ["ItemPlan", "OpenedAsset", "asset_urls", "item_sources", "local_asset_files", "open_asset", "plan_item"]

_RASTER_TYPES = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-hdf")
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
_NOT_DATA_ROLES = {"thumbnail", "overview", "metadata"}


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
    # a relative href not found beside the item file, read from beside the item's self link instead
    missing_local: str | None = None

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
    datetime: str | None = None  # when the scene was taken (the item's datetime, else its start_datetime)

    @property
    def names(self) -> list[str]:
        return [b.label() for b in self.picked]

    def used_assets(self) -> list[_Asset]:
        return [self.assets[k] for k in dict.fromkeys(b.asset for b in self.picked)]


def _read(path: Path, data: bytes | None = None) -> tuple[dict[str, Any], Any]:
    """The item's JSON (from ``path``, or its bytes ``data`` already read) and its pystac Item; one-line refusals
    for what is not a STAC item."""
    import pystac

    try:
        doc = jsontext.read(path) if data is None else jsontext.loads(data)
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
    if not isinstance(item.id, str):  # pystac keeps whatever the JSON holds; the id names outputs and provenance
        raise InvalidInputError(path, f"is not a valid STAC item: its id is {type(item.id).__name__} "
                                      f"{str(item.id)[:40]!r}, not a string")
    return doc, item


def _self_href(doc: dict[str, Any]) -> str | None:
    for link in doc.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and isinstance(link.get("href"), str):
            return link["href"]
    return None


def _absolute(href: str, folder: Path, self_href: str | None, origin: str | None = None) -> str:
    """``href`` made absolute: beside the URL the item was downloaded from (``origin``), else beside the item
    file when it is there, else against the item's self link.

    A staged copy of a remote item sits alone in a scratch folder, so its
    relative hrefs mean what they meant beside the object it was read from.
    """
    if href.startswith("file://"):
        return unquote(urlparse(href).path)  # a file URI is percent-encoded (Path.as_uri: a space is %20)
    if href.startswith("/") or is_url(href):
        return href
    if origin is not None:
        return resolve(parent_of(origin), href)
    local = _beside(folder, href)
    if local.exists() or self_href is None:
        return str(local)
    if self_href.startswith("file://"):  # the self link as a file URI, or a local path: beside it on this machine
        self_href = unquote(urlparse(self_href).path)
    if is_url(self_href):
        return resolve(parent_of(self_href), href)
    if not self_href.startswith("/"):
        return str(local)  # a relative self link says nothing of where the item came from
    return str(_beside(Path(self_href).parent, href))


def _beside(folder: Path, href: str) -> Path:
    """A relative ``href`` in ``folder``: as written, else as the URI reference's decoded path where only that
    exists (STAC's hrefs are URIs: ``red%20band.tif``)."""
    local = (folder / href).resolve()
    if not local.exists() and unquote(href) != href:
        decoded = (folder / unquote(href)).resolve()
        return decoded if decoded.exists() else local
    return local


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


class _NotANumber(ValueError):
    """A band field that must be a number holds something else: the item is wrong, not silent."""


_NODATA_WORDS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}  # the raster extension's


def _number(value: Any, field: str, *, words: dict[str, float] | None = None) -> float | None:
    """A band's scale, offset or nodata.  Anything but a number (or, for nodata, the raster extension's "nan",
    "inf", "-inf") is refused: a scale left out of one band would feed the model bands in different units."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if words and isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise _NotANumber(f"{field} is {str(value)[:40]!r}, not a number")


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
                         scale=_number(r.get("scale", e.get("raster:scale")), f"band {i + 1}'s scale"),
                         offset=_number(r.get("offset", e.get("raster:offset")), f"band {i + 1}'s offset"),
                         nodata=_number(r.get("nodata", e.get("nodata")), f"band {i + 1}'s nodata",
                                        words=_NODATA_WORDS)))
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _assets(path: Path, doc: dict[str, Any], item: Any, origin: str | None = None) -> dict[str, _Asset]:
    """The item's raster assets, in the item's order, with the bands each offers."""
    self_href = _self_href(doc)
    out: dict[str, _Asset] = {}
    for key, asset in item.assets.items():
        fields = dict(asset.extra_fields or {})
        if not _is_raster(asset, fields):
            continue
        href = _absolute(asset.href, path.parent, self_href, origin)
        relative = not (asset.href.startswith(("/", "file://")) or is_url(asset.href))
        beside = str(_beside(path.parent, asset.href)) if relative and origin is None else href
        a = _Asset(key=key, href=href, gdal=_gdal_path(href), media_type=(asset.media_type or ""),
                   roles=list(asset.roles or []), fields=fields, missing_local=beside if href != beside else None)
        try:
            a.bands = _described_bands(key, fields)
        except _NotANumber as exc:
            raise InvalidInputError(path, f"asset {key!r}: {exc}") from None
        if not a.bands:  # the item does not say: one band named by the key until GDAL says otherwise
            a.described = False
            a.bands = [_Band(asset=key, index=1)]
        out[key] = a
    return out


def _sources(path: Path, assets: dict[str, _Asset]) -> list[NamedSource]:
    """What GDAL would open for the assets: each asset, and the sources of a local VRT asset."""
    found: list[NamedSource] = []
    for asset in assets.values():
        found.append(NamedSource(asset.gdal, path))
        if asset.local is not None and asset.local.suffix.lower() == ".vrt" and asset.local.is_file():
            found.extend(vrt_sources(asset.local))
    return found


def item_sources(path: str | PathLike[str], origin: str | None = None) -> list[NamedSource]:
    """What GDAL would open for the item's raster assets (:mod:`storage.sources` checks them); empty for an
    item that cannot be read (its own run says why)."""
    path = Path(path).absolute()
    try:
        doc, item = _read(path)
        return _sources(path, _assets(path, doc, item, origin if origin is not None and is_url(origin) else None))
    except (InputError, OSError, RuntimeError):
        return []


def local_asset_files(path: str | PathLike[str]) -> set[Path]:
    """The local files an item's raster assets name, resolved; empty for an item that cannot be read (its own
    run says why).  An inbox delivered as a catalogue delivers it, the band files beside the item, holds one
    input: the item (:func:`flows.inbox.list_inbox`)."""
    path = Path(path)
    try:
        doc, item = _read(path)
        assets = _assets(path, doc, item)
        return {a.local.resolve() for a in assets.values() if a.local is not None}
    except (InputError, OSError, RuntimeError):  # RuntimeError: a link in a loop (Python 3.11-12)
        return set()


def asset_urls(url: str, data: bytes) -> set[str]:
    """The URLs the item read from ``url`` (its bytes ``data``) names for its raster assets, relative hrefs
    resolved beside it: :func:`local_asset_files` for an inbox that is a URL prefix.  Empty for an item that
    cannot be read (its own run says why)."""
    path = Path(url.split("://", 1)[-1])  # for messages only: hrefs resolve beside ``url`` (the origin)
    try:
        doc, item = _read(path, data)
        assets = _assets(path, doc, item, origin=url)
    except InputError:
        return set()
    return {a.href for a in assets.values() if is_url(a.href)}


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
    if request.from_user and request.channels is not None and len(request.wanted) != request.channels:
        # it had been refused only at the windows, as "the input has 3"
        raise IncompatibleInputError(path, f"{request.model} takes {request.channels} band(s), --bands chose "
                                           f"{len(request.wanted)} ({where} offers {len(offered)}: "
                                           f"{_listing(offered)})")
    order = {id(b): n for n, b in enumerate(offered)}
    names = [sorted(_names(b, assets[b.asset])) for b in offered]
    meanings = band_meanings(names)
    labels = [b.shown() for b in offered]
    picked: list[_Band] = []
    missing: list[str] = []
    unsure: list[str] = []
    doubts: dict[str, None] = {}
    for w in request.wanted:
        if w.strip().isdigit():
            i = int(w) - 1
            if 0 <= i < len(offered):
                picked.append(offered[i])
            else:
                missing.append(f"band {int(w)}")
            continue
        found = locate(w, names, context=request.wanted, meanings=meanings, labels=labels)
        if found.doubts:  # band ids without common names that several sensors read differently
            unsure.append(w.strip())
            doubts.update(dict.fromkeys(found.doubts))
        if not found.hits:
            missing.append(w.strip())
        else:  # several assets may carry one band ("red" and "visual"): the preferred one
            picked.append(min((offered[i] for i in found.hits),
                              key=lambda b: _preference(b, assets[b.asset], order[id(b)])))
    if missing:
        raise IncompatibleInputError(path, f"{request.model} needs {', '.join(missing)}, which no asset of {where} "
                                           f"offers (it has {len(offered)} band(s): {_listing(offered)}); "
                                           f"{request.hint}")
    if unsure:
        raise IncompatibleInputError(path, f"{request.model} needs {', '.join(unsure)}, but the band ids of {where} "
                                           f"fit more than one sensor, which number their bands differently "
                                           f"({'; '.join(doubts)}), so which band is meant is not known; "
                                           f"{request.hint}")
    # as for a GeoTIFF: a band asked for again by the same token is meant, by two different names it is not
    same_band_once(list(request.wanted), [id(b) for b in picked], where=path, model=request.model,
                   hint=request.hint, shown=[f"band {b.label()!r} of {where}" for b in picked])
    return picked


def plan_item(path: str | PathLike[str], request: BandRequest | None = None, *,
              origin: str | None = None) -> ItemPlan:
    """Read the item and pick its bands for ``request`` (None: all of them); opens only undescribed assets.

    ``origin``: the URL ``path`` is a downloaded copy of (its relative hrefs are resolved beside it).
    """
    path = Path(path).absolute()
    request = request or BandRequest()
    doc, item = _read(path)
    assets = _assets(path, doc, item, origin if origin is not None and is_url(origin) else None)
    if not assets:
        shown = ", ".join(f"{k} ({a.media_type or 'no type'})" for k, a in item.assets.items()) or "none"
        raise InvalidInputError(path, f"item {item.id!r} has no raster asset segflow can use (assets: {shown})")
    check_sources(path, _sources(path, assets))  # before GDAL opens any (storage.sources)
    for asset in assets.values():
        if not asset.described:
            asset.bands = _gdal_bands(path, asset)
    when = item.datetime or item.common_metadata.start_datetime
    return ItemPlan(path=path, id=item.id, self_href=_self_href(doc), sha256=sha256_input(path),
                    picked=_pick(path, item.id, assets, request), assets=assets, resampling=request.resampling,
                    datetime=when.isoformat() if when is not None else None)


# --------------------------------------------------------------------------- opening the assets


@dataclass
class OpenedAsset:
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


def open_asset(path: Path, asset: _Asset) -> OpenedAsset:
    """Open one asset of the item at ``path`` with GDAL; a failure is an InputError naming the item."""
    import rasterio

    from storage.rasteropen import GDAL_ERRORS, gdal_env, gdal_message

    problem = None if asset.local is None else regular_file_problem(asset.local)
    if problem is not None:  # a FIFO had blocked the run until killed
        raise InputError(path, f"asset {asset.key!r} ({asset.href}) {problem}; segflow reads files only")
    try:
        with gdal_env(), rasterio.open(asset.gdal) as src:
            return OpenedAsset(width=src.width, height=src.height, transform=src.transform, crs=src.crs,
                                dtypes=tuple(src.dtypes), nodata=tuple(src.nodatavals),
                                scales=tuple(1.0 if s is None else float(s) for s in src.scales),
                                offsets=tuple(0.0 if o is None else float(o) for o in src.offsets),
                                descriptions=tuple(src.descriptions), block=tuple(src.block_shapes[0]))
    except (*GDAL_ERRORS, OSError) as exc:
        if asset.missing_local:  # the user looks for the file beside the item first: say it is not there
            raise InputError(path, f"asset {asset.key!r}: {asset.missing_local} is not beside the item, and the "
                                   f"copy beside its self link ({asset.href}) cannot be opened: "
                                   f"{gdal_message(exc)}") from None
        raise InputError(path, f"asset {asset.key!r} ({asset.href}) cannot be opened: {gdal_message(exc)}") from None


def _gdal_bands(path: Path, asset: _Asset) -> list[_Band]:
    """The bands of an asset the item does not describe, named by their GDAL descriptions (else the key)."""
    opened = open_asset(path, asset)
    return [_Band(asset=asset.key, index=i, name=d or None) for i, d in enumerate(opened.descriptions, 1)]


