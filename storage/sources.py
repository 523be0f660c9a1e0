"""Paths an input file names for GDAL to open (a VRT's sources, a STAC item's assets), checked before any is.

A VRT or a STAC item holds no pixels: it names the files that do, and GDAL
opens whatever it names.  A file dropped into an inbox could so make segflow
read any raster on the host (another project's scan) and write it out again
as a quicklook, read any file's bytes as pixels (``VRTRawRasterBand`` over
``/etc/passwd``), block on ``/vsistdin/``, or make requests to the cloud's
metadata address.  These are names read from inside files, so they are
checked as data before GDAL sees them:

- always refused: GDAL's special handlers that read no file (``/vsistdin/``,
  ``/vsimem/``, ``/vsisubfile/``, ...), a raw band's file outside the VRT's
  own folder (raw bands read any bytes), link-local hosts (169.254.0.0/16,
  ``fe80::``: the metadata services, in any way an address can be written:
  ``http://2852039166/`` is 169.254.169.254 to the resolver), AWS's IPv6
  metadata address, and Python pixel functions (code).  A host *name* that
  resolves to one is not caught (DNS can change between a check and the
  request): block the metadata service from the workers' network;
- with ``roots`` (``nightly`` on an inbox: the inbox and the folders the
  operator allows with ``--source-root``): every local file must lie under
  one of them, after links are resolved.  ``segment`` passes no roots: its
  user names the files at the terminal, and a VRT of tiles elsewhere is how
  GDAL users work.

Nested VRTs are followed (at most :data:`MAX_DEPTH` deep).  Remote sources
(``/vsicurl/``, ``/vsis3/``, URLs) are allowed, as remote inputs are.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlparse

from storage.errors import UnsafeInputError

__all__ = ["MAX_DEPTH", "NamedSource", "check_own_files", "check_sources", "lies_under", "source_problem",
           "vrt_sources"]

MAX_DEPTH = 8  # VRTs within VRTs
MAX_VRT_BYTES = 64 << 20  # a VRT is a small XML file; a larger one is not read into memory to be checked

_REMOTE = ("/vsicurl/", "/vsicurl_streaming/", "/vsis3/", "/vsis3_streaming/", "/vsigs/", "/vsigs_streaming/",
           "/vsiaz/", "/vsiaz_streaming/", "/vsiadls/", "/vsioss/", "/vsioss_streaming/", "/vsiswift/",
           "/vsiswift_streaming/", "/vsiwebhdfs/", "/vsihdfs/")
_ARCHIVES = ("/vsizip/", "/vsigzip/", "/vsitar/", "/vsi7z/", "/vsirar/")  # a path inside: the archive is checked
_URL_SCHEMES = ("http", "https", "s3", "gs", "az", "ftp")
_METADATA_NAMES = {"metadata.google.internal", "metadata", "instance-data"}
_METADATA_ADDRESSES = {ipaddress.ip_address("fd00:ec2::254")}  # AWS's IPv6 instance metadata (not link-local)


@dataclass(frozen=True)
class NamedSource:
    """A path or URL a file names, as GDAL would open it; ``raw``: a ``VRTRawRasterBand``'s file (any bytes)."""

    href: str
    named_by: Path
    raw: bool = False


def _local(href: str, folder: Path) -> Path:
    path = Path(href)
    return path if path.is_absolute() else folder / path


def lies_under(path: Path, roots: Iterable[Path]) -> bool:
    """Whether ``path``, links resolved, is one of ``roots`` or inside one of them."""
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in (Path(os.path.realpath(r)) for r in roots))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as one means to the resolver (libcurl asks the system's, which takes
    inet_aton's forms: ``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``), an IPv4
    address inside IPv6 (``::ffff:169.254.169.254``) as the IPv4 one; None for a name."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        if not host or not all(c in "0123456789abcdefx." for c in host):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address.packed[:12] == bytes(12) and int(address) > 0xFFFF:  # ::a.b.c.d (deprecated)
            inner = ipaddress.IPv4Address(address.packed[12:])
        return inner or address
    return address


def _host_problem(url: str) -> str | None:
    host = (urlparse(url).hostname or "").lower().rstrip(".")  # "169.254.169.254." is the same host
    if host in _METADATA_NAMES:
        return f"names the metadata service host {host!r}"
    address = _address(host)
    if address is None:
        return None
    if address.is_link_local:
        return f"names the link-local address {host} (a cloud metadata service)"
    if address in _METADATA_ADDRESSES:
        return f"names the metadata service address {host}"
    return None


def source_problem(source: NamedSource, roots: Sequence[Path] | None = None) -> str | None:
    """Why GDAL must not open ``source`` (one clause, naming it); None when it may."""
    href = source.href
    shown = f"its source {href!r}"
    if href.startswith("/vsi"):
        for prefix in _REMOTE:
            if href.startswith(prefix):
                rest = href[len(prefix):]
                if prefix.startswith("/vsicurl") and "://" in rest:
                    problem = _host_problem(rest)
                    return f"{shown} {problem}" if problem else None
                return None
        for prefix in _ARCHIVES:
            if href.startswith(prefix):
                inner = href[len(prefix):]
                if inner.startswith("{"):  # /vsizip/{archive}/member
                    inner = inner[1:].split("}", 1)[0]
                elif not inner.startswith("/vsi"):  # /vsizip//path/a.zip/member: the archive is the .zip part
                    inner = _archive_part(inner)
                return source_problem(NamedSource(inner, source.named_by, source.raw), roots)
        handler = href.split("/", 2)[1] if href.count("/") >= 2 else href
        return f"{shown} uses GDAL's /{handler}/ handler, which reads no file segflow may open"
    if "://" in href:
        scheme = href.split("://", 1)[0].lower()
        if scheme not in _URL_SCHEMES:
            return f"{shown} is a {scheme}:// URL"
        problem = _host_problem(href)
        return f"{shown} {problem}" if problem else None
    path = _local(href, source.named_by.parent)
    if source.raw and not lies_under(path, [source.named_by.parent]):
        return (f"{shown} is a raw band's file outside the VRT's own folder (a raw band reads any file's bytes "
                "as pixels)")
    if roots is not None and not lies_under(path, roots):
        allowed = ", ".join(str(r) for r in roots) or "no local folder (the inbox is a URL)"
        return (f"{shown} lies outside the folders its files may come from ({allowed}); allow its folder with "
                "--source-root")
    return None


def check_own_files(named: str, files: Iterable[Path], roots: Sequence[Path]) -> None:
    """Refuse an inbox's input whose own files (a file, an Analyze pair's image, a series' slices) lie, links
    resolved, outside ``roots``: a link dropped into the inbox had segflow read another project's scan."""
    for path in files:
        if path.exists() and not lies_under(path, roots):  # (a broken link: its reader says so)
            allowed = ", ".join(str(r) for r in roots)
            what = "is a link" if str(path) == str(named) else f"its file {path} is a link"
            raise UnsafeInputError(named, f"{what} to {os.path.realpath(path)}, outside the folders its files may "
                                          f"come from ({allowed}); allow its folder with --source-root; not opened")


def _archive_part(inner: str) -> str:
    """``/data/a.zip/member.tif`` -> ``/data/a.zip``: the first path component that names an archive file."""
    parts = inner.split("/")
    for end in range(1, len(parts) + 1):
        candidate = "/".join(parts[:end])
        if candidate.lower().endswith((".zip", ".gz", ".tar", ".tgz", ".7z", ".rar", ".kmz")):
            return candidate
    return inner


def vrt_sources(path: str | os.PathLike[str], depth: int = 0) -> list[NamedSource]:
    """Every source a VRT names, nested local VRTs' included, in document order.

    Unreadable or malformed XML raises :class:`UnsafeInputError`: GDAL's
    reading of what cannot be checked is not trusted either.
    """
    path = Path(path).absolute()
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_VRT_BYTES + 1)
    except OSError as exc:
        raise UnsafeInputError(path, f"cannot read the VRT to check its sources: {exc.strerror or exc}") from None
    if len(data) > MAX_VRT_BYTES:
        raise UnsafeInputError(path, f"is a VRT over {MAX_VRT_BYTES >> 20} MB; its sources cannot be checked")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:  # a VRT needs neither; entities are how XML bombs expand
        raise UnsafeInputError(path, "is a VRT with a DOCTYPE or entity declarations, which segflow does not read")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise UnsafeInputError(path, f"is not a readable VRT: {exc}") from None
    if any(e.tag == "PixelFunctionCode" or (e.tag == "PixelFunctionLanguage" and (e.text or "").strip().lower()
                                             == "python") for e in root.iter()):
        raise UnsafeInputError(path, "is a VRT holding Python pixel-function code, which segflow does not run "
                                     "(an input file is data, not code)")
    found: list[NamedSource] = []
    for band in root.iter():
        if band.tag == "VRTRasterBand" and band.get("subClass") == "VRTRawRasterBand":
            for name in band.iter("SourceFilename"):
                found.append(_named(name, path, raw=True))
    raw = {s.href for s in found}
    for element in root.iter():
        if element.tag in ("SourceFilename", "SourceDataset"):
            named = _named(element, path, raw=False)
            if named.href not in raw:
                found.append(named)
    for source in list(found):
        if source.href.startswith("/vsi") or "://" in source.href or not source.href.lower().endswith(".vrt"):
            continue
        nested = _local(source.href, path.parent)
        if depth + 1 >= MAX_DEPTH:
            raise UnsafeInputError(path, f"nests VRTs more than {MAX_DEPTH} deep")
        if nested.is_file():  # a missing one is GDAL's to report, naming it
            found.extend(vrt_sources(nested, depth + 1))
    return found


def _named(element: ET.Element, vrt: Path, raw: bool) -> NamedSource:
    text = (element.text or "").strip()
    relative = element.get("relativeToVRT", element.get("relativetoVRT", "0")) == "1"
    if text.startswith("/") or "://" in text:
        return NamedSource(text, vrt, raw)
    # relativeToVRT="0" with a relative name: GDAL opens it from the working directory
    return NamedSource(str((vrt.parent if relative else Path.cwd()) / text), vrt, raw)


def check_sources(named_by: str | os.PathLike[str], sources: Iterable[NamedSource],
                  roots: Sequence[Path] | None = None) -> None:
    """Raise :class:`UnsafeInputError` naming ``named_by`` for the first source GDAL must not open."""
    for source in sources:
        problem = source_problem(source, roots)
        if problem is not None:
            via = "" if source.named_by == Path(named_by).absolute() else f" (in {source.named_by.name})"
            raise UnsafeInputError(named_by, f"{problem}{via}; not opened")
