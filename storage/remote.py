"""Inputs and outputs named by fsspec URLs (``s3://bucket/key``, ``gs://``, ``file://``, ``memory://``...).

segflow's readers and writers work on local files only (rasterio/GDAL,
nibabel and zarr's ``LocalStore`` each need random access and atomic
renames).  A URL is therefore *staged*: an input is downloaded, block by
block, to a local file before it is ingested, and outputs are written locally
and uploaded once complete (:mod:`flows.staging`).  This module holds the
plain transfer helpers; it knows nothing of the pipeline.

The filesystem and its credentials come from fsspec's standard
configuration: for ``s3://`` that is s3fs, which reads the usual AWS settings
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/config``, instance roles) including the endpoint of an
S3-compatible server (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``), and
fsspec's own config (``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

BLOCK = 8 << 20  # bytes per read while streaming: memory stays bounded whatever the object's size
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_url(path: str | PathLike[str] | None) -> bool:
    """True for ``scheme://...`` with a scheme of two or more letters (so ``C:\\`` is a path)."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def protocol(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def protocol_problem(url: str) -> str | None:
    """Why no fsspec filesystem serves this URL's scheme (unknown, or its package is not installed), or None;
    cheap (nothing is contacted), so an output URL is checked before any work."""
    import fsspec

    scheme = protocol(url)
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        return f"unknown URL scheme {scheme!r} (segflow reads and writes through fsspec: s3://, http://, ...)"
    except ImportError as exc:
        return f"the {scheme}:// scheme needs a package that is not installed: {' '.join(str(exc).split())}"
    return None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL, configured from the standard places."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def join(url: str, *parts: str) -> str:
    """``url/part/part``: URLs always use '/' whatever the local OS."""
    out = url.rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def resolve(base: str, relative: str) -> str:
    """``relative`` (``a.tif``, ``../in/a.tif``) taken relative to the URL prefix ``base``, '..' folded."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"


def object_key(url: str) -> tuple[str, str]:
    """(scheme, path) naming one object whichever way its URL was spelt: fsspec lists ``memory:///b/k`` where an
    item's href resolves to ``memory://b/k``."""
    return protocol(url), filesystem(url)[1]


def name_of(url: str) -> str:
    """The last component of a URL (its file name)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def _refresh(fs: Any, path: str) -> None:
    # s3fs and others cache listings: another client may have changed the prefix since
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - a filesystem without a cache
        pass


def kind(url: str) -> str | None:
    """'file', 'directory' (a prefix), or None when nothing is there.

    Other failures (no network, denied) raise: fsspec's ``exists``/``isfile``
    return False for them, which would make a flaky connection look like a
    missing object.
    """
    fs, path = filesystem(url)
    _refresh(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return "directory" if info.get("type") == "directory" else "file"


def exists(url: str) -> bool:
    return kind(url) is not None


def isdir(url: str) -> bool:
    return kind(url) == "directory"


def isfile(url: str) -> bool:
    return kind(url) == "file"


def list_files(url: str) -> list[str]:
    """The files directly under a URL prefix (not recursive), as full URLs, sorted."""
    fs, path = filesystem(url)
    _refresh(fs, path)
    entries = fs.ls(path, detail=True)
    files = [e["name"] for e in entries if e.get("type") == "file"]
    return sorted(_with_protocol(fs, url, p) for p in files)


def _with_protocol(fs: Any, like: str, path: str) -> str:
    """``path`` as a URL of ``like``'s scheme (fsspec paths carry none)."""
    return fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else f"{protocol(like)}://{path}"


class LocalWriteError(OSError):
    """The local side of a transfer failed (disk full, permission denied), not the remote one."""


def download(url: str, target: str | PathLike[str], block: int = BLOCK) -> Path:
    """Stream an object to a local file, ``block`` bytes at a time; the file appears whole or not at all.

    A failure to write locally raises :class:`LocalWriteError`; one reading the object, what fsspec raised.
    """
    fs, path = filesystem(url)
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise LocalWriteError(exc.errno, exc.strerror or str(exc), str(target)) from exc
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=block) as src:
            while chunk := src.read(block):
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise LocalWriteError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def download_tree(url: str, target: str | PathLike[str]) -> Path:
    """Every file under a URL prefix (a zarr store), to the same relative paths under ``target``."""
    for rel, file_url in tree_files(url):
        download(file_url, Path(target) / rel)
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(target)


def tree_files(url: str) -> list[tuple[str, str]]:
    """(relative path, URL) of every file under a prefix, sorted by relative path."""
    fs, path = filesystem(url)
    _refresh(fs, path)
    root = path.rstrip("/")
    out = []
    for p in fs.find(root):
        rel = p[len(root):].lstrip("/")
        if rel:
            out.append((rel, _with_protocol(fs, url, p)))
    return sorted(out)


def upload(local: str | PathLike[str], url: str) -> None:
    """Copy a local file to a URL (s3fs streams it in parts: memory stays bounded)."""
    fs, path = filesystem(url)
    fs.put_file(str(local), path)


def upload_tree(local: str | PathLike[str], url: str) -> list[str]:
    """Copy every file under a local directory (a zarr store) to the same relative keys; the URLs written."""
    root = Path(local)
    written = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(url, file.relative_to(root).as_posix())
        upload(file, target)
        written.append(target)
    return written


def remove(url: str) -> None:
    """Delete an object, or every object under a prefix; nothing there is not an error."""
    fs, path = filesystem(url)
    _refresh(fs, path)
    try:
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        elif fs.exists(path):
            fs.rm(path)
    except FileNotFoundError:
        pass
    _refresh(fs, path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def sha256_url(url: str, block: int = BLOCK) -> str:
    """An object's sha256, streamed (as :func:`storage.hashing.sha256_file` does for a local file)."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=block) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
