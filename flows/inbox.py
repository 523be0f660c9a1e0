"""What a nightly run is given: the inputs of an inbox folder or of a manifest, local or under a URL.

A run starts from a list of paths; which files of an inbox count as inputs
(hidden entries, Analyze pairs, DICOM folders, STAC items among other JSON
files) and how a CSV or JSON manifest names them is a question of its own,
answered before the flow starts any task, so it lives here rather than in
``flows/nightly.py``.
"""

from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path
from typing import Any

from storage import jsontext
from storage.channelfiles import case_of
from storage.dicomfiles import is_dicom_input
from storage.errors import ConfigError, InputError
from storage.inputfiles import PICTURE_SUFFIXES, kind_of, stem_of
from storage.remote import is_url
from storage.stacassets import asset_urls, local_asset_files
from storage.stacitem import is_item_path, looks_like_item

ITEM_READ_MAX = 64 * 2**20  # a .json file larger than this is no STAC item an inbox holds: not read, ignored


_SYSTEM_TREES = (Path("/"), Path("/proc"), Path("/sys"), Path("/dev"))


def _walks_out(entry: Path, inbox: Path) -> bool:
    """A link to a folder that holds the inbox itself (``inbox/root -> /``) or a system tree: walking it for
    DICOM files read the whole file system (32 s, then a failure in /proc).  Such an entry is ignored; a link to
    a study folder elsewhere is followed as before."""
    if not entry.is_symlink():
        return False
    try:
        target, box = entry.resolve(strict=True), inbox.resolve(strict=True)
    except (OSError, RuntimeError):  # a loop of links
        return True
    system = target == Path("/") or any(t == target or t in target.parents for t in _SYSTEM_TREES[1:])
    return system or target == box or target in box.parents


def check_inbox(folder: str | Path) -> Path:
    """A local inbox that is a folder (``nightly`` before it lists it, ``schedule`` before it registers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(folder, "inbox is not a directory")
    try:  # one the run may not list (mode 000, another user's) had given two tracebacks and no report
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as exc:
        raise ConfigError(folder, f"cannot list the inbox: {exc.strerror or exc}") from None
    return folder


def list_inbox(folder: str | Path) -> tuple[list[str], list[str]]:
    """(inputs, ignored): the inbox's files and DICOM folders segflow reads, sorted; hidden entries skipped,
    other files and folders ignored.

    An Analyze/NIfTI pair is one input, read through its ``.hdr``.  A sub-folder holding DICOM files (at
    any depth), a DICOMDIR and a file with the DICOM preamble are listed as they are; :func:`flows.inputs.expand`
    turns them into series.  A ``.json`` file is an input when it is a STAC item (a Feature with
    ``stac_version``), else ignored; the files beside it that its assets name are ignored (the item reads them).  A URL prefix lists its objects (DICOM is read from local folders only).
    """
    if is_url(str(folder)):
        return _list_inbox_url(str(folder))
    folder = check_inbox(folder)
    inputs, ignored = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            (inputs if not _walks_out(p, folder) and _is_dicom(p) else ignored).append(str(p))
            continue
        if not p.is_file():  # a broken symbolic link, a FIFO: named like an input, it fails saying why
            try:
                kind_of(p)
            except InputError:
                ignored.append(str(p))
            else:
                inputs.append(str(p))
            continue
        try:
            kind_of(p)
        except InputError:
            (inputs if _is_dicom(p) else ignored).append(str(p))
            continue
        if p.name.lower().endswith(PICTURE_SUFFIXES):  # a delivery's thumbnail or preview: named in a manifest
            ignored.append(str(p))
            continue
        if is_item_path(p):  # a STAC item is an input; other JSON (a manifest, a report) is not
            (inputs if _is_item_file(p) else ignored).append(str(p))
            continue
        if p.name.lower().endswith(".img") and p.with_suffix(".hdr").exists():
            continue
        inputs.append(str(p))
    return _items_band_files_aside(inputs, ignored)


def _items_band_files_aside(inputs: list[str], ignored: list[str]) -> tuple[list[str], list[str]]:
    """A STAC item delivered with its band files beside it (hrefs relative to the item, as catalogues deliver
    them) is one input: the files its assets name are listed among the ignored, not segmented one by one (each
    had failed as a 1-band raster no model takes, and the run exited 1 every night)."""
    named: set[Path] = set()
    for p in inputs:
        if is_item_path(p):
            named |= local_asset_files(p)
    if not named:
        return inputs, ignored
    assets = [p for p in inputs if _resolved(p) in named and not is_item_path(p)]
    return [p for p in inputs if p not in assets], sorted(ignored + assets)


def claimed_by_items(inputs: list[str], ignored: list[str]) -> dict[str, str]:
    """Which STAC item of ``inputs`` names each of the ``ignored`` files as its band file, for the report: a
    scene set aside because an item names it is said to be (an item dropped beside another delivery's scene,
    naming it, had hidden it among the "not inputs" without a word)."""
    claimed: dict[str, str] = {}
    for item in (p for p in inputs if is_item_path(p)):
        named = local_asset_files(item)
        for p in ignored:
            if p not in claimed and _resolved(p) in named:
                claimed[p] = item
    return claimed


def _resolved(path: str) -> Path | None:
    """The file a path names; None for a link in a loop (an input that fails on its own, saying so)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # Python 3.11-12 raise RuntimeError for a loop, 3.13 OSError
        return None


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom_input(path)
    except OSError:
        return False


def _is_item_file(path: Path) -> bool:
    try:
        return path.stat().st_size <= ITEM_READ_MAX and looks_like_item(path.read_bytes())
    except OSError:
        return False


def _item_bytes(url: str) -> bytes | None:
    """The object's bytes when it is a STAC item; None otherwise, or when it cannot be read."""
    from storage import remote

    try:
        data = remote.read_bytes(url)
    except Exception:  # noqa: BLE001 - each filesystem raises its own types; unreadable: not listed as an item
        return None
    return data if looks_like_item(data) else None


def _list_inbox_url(url: str) -> tuple[list[str], list[str]]:
    """:func:`list_inbox` of a URL prefix: the objects directly under it."""
    from storage import remote

    try:
        files = remote.list_files(url)
    except FileNotFoundError:
        raise ConfigError(url, "inbox not found (no such bucket or prefix)") from None
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
        raise ConfigError(url, f"cannot list the inbox: {type(exc).__name__}: {exc}") from exc
    names = {remote.name_of(f) for f in files}
    inputs, ignored = [], []
    named: set[tuple[str, str]] = set()  # the objects the inbox's items read (their band files)
    for f in files:
        name = remote.name_of(f)
        if name.startswith("."):
            continue
        try:
            kind_of(name)
        except InputError:
            ignored.append(f)
            continue
        if name.lower().endswith(PICTURE_SUFFIXES):  # as in a local inbox: thumbnails are no inputs
            ignored.append(f)
            continue
        if is_item_path(name):
            data = _item_bytes(f)
            if data is None:
                ignored.append(f)
                continue
            inputs.append(f)
            named |= {remote.object_key(u) for u in asset_urls(f, data)}
            continue
        if name.lower().endswith(".img") and (stem_of(name) + ".hdr") in names:
            continue
        inputs.append(f)
    assets = [f for f in inputs if not is_item_path(f) and remote.object_key(f) in named]
    return [f for f in inputs if f not in assets], sorted(ignored + assets)


def read_manifest(path: str | Path) -> list[str]:
    """The inputs a manifest lists: CSV with a ``path`` column, or JSON (a list of paths, of {"path": ...}
    objects, or an object with an "inputs" or "paths" list). Relative paths are relative to the manifest, and
    local paths are normalised (``./``, ``..``); a CSV row whose path starts with ``#`` is a comment.
    Entries may be URLs; the manifest itself may be one (its relative entries are then URLs beside it)."""
    url = str(path) if is_url(str(path)) else None
    path = Path(path)
    if url is not None:
        from storage import remote

        try:
            text = remote.read_bytes(url).decode("utf-8-sig")
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
            raise ConfigError(url, f"cannot read manifest: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(path, f"cannot read manifest: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".csv":
        lines = text.splitlines()
        try:  # Excel writes ';' where the decimal mark is a comma, and tab-separated files are CSV to users too
            dialect: Any = csv.Sniffer().sniff(lines[0], delimiters=",;\t") if lines else csv.excel
        except csv.Error:  # one column: nothing to tell the delimiter by
            dialect = csv.excel
        reader = csv.DictReader(lines, dialect=dialect)
        fields = [f for f in (reader.fieldnames or []) if f]
        column = next((c for c in fields if c.strip().lower() == "path"), None)
        if column is None:  # (a header alone is a manifest of nothing: an empty night)
            raise ConfigError(url or path, f"CSV manifest needs a 'path' column (its header: "
                                           f"{', '.join(repr(f) for f in fields) or 'none'})")
        items: list[Any] = [r[column] for r in reader
                            if not (isinstance(r[column], str) and r[column].lstrip().startswith("#"))]  # comments
    elif path.suffix.lower() == ".json":
        try:
            data = jsontext.loads(text)
        except ValueError as exc:
            raise ConfigError(url or path, f"manifest is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data = data.get("inputs", data.get("paths"))
        if not isinstance(data, list):
            raise ConfigError(url or path, "JSON manifest must be a list of paths or an object with an 'inputs' list")
        items = [d.get("path") if isinstance(d, dict) else d for d in data]
    else:
        raise ConfigError(url or path, "manifest must be a .csv or .json file")
    if not all(isinstance(i, str) for i in items):
        raise ConfigError(url or path, "every manifest entry must be a path string")
    out = []
    for item in (i.strip() for i in items):
        if item and (is_url(item) or url is not None):
            from storage import remote

            out.append(item if is_url(item) or item.startswith("/") else remote.resolve(remote.parent_of(url), item))
        elif item:
            p = Path(item).expanduser()
            # one spelling per file: ./a.tif, data/../a.tif and a.tif are one input, not three whose outputs clash
            out.append(os.path.normpath(p if p.is_absolute() else path.parent / p))
    return out


def still_arriving(paths: list[str], settle_seconds: float, now: float | None = None) -> dict[str, float]:
    """The local inbox entries changed less than ``settle_seconds`` ago, with how many seconds ago.

    A transfer tool that preallocates a file and fills it in order leaves a file of the full size whose tail
    reads as zeros (an uncompressed GeoTIFF opens and is segmented as such), and a DICOM folder fills slice by
    slice; only their age tells them from a finished delivery.  A folder's age is that of its newest entry at
    any depth; a ``.hdr``'s is its ``.img``'s too.  URLs are not checked.  A case's nnU-Net channel file waits
    while another of the case's files arrives: alone it would have been segmented as a one-channel input.
    """
    if settle_seconds <= 0:
        return {}
    now = time.time() if now is None else now
    arriving: dict[str, float] = {}
    for path in paths:
        if is_url(path):
            continue
        newest = _newest_change(Path(path))
        if newest is not None and now - newest < settle_seconds:
            arriving[path] = round(max(0.0, now - newest), 1)
    cases = {case: arriving[path] for path in arriving if (case := case_of(path)) is not None}
    cases.update({case: age for case, age in _hidden_channel_files(paths, now).items()
                  if case not in cases and age < settle_seconds})
    for path in paths:
        if path not in arriving and case_of(path) in cases:
            arriving[path] = cases[case_of(path)]
    return arriving


_HIDDEN_CHANNEL = re.compile(r"^\.(?P<case>.+)_\d{4}\.nii(?:\.gz)?(?:\..*)?$", re.IGNORECASE)


def _hidden_channel_files(paths: list[str], now: float) -> dict[tuple[str, str], float]:
    """Cases with a channel file still being copied under a hidden name (rsync's ``.x_0001.nii.gz.Ab12Cd``,
    the delivery docs/nightly.md advises), with its age: the case's finished files wait for it, or its ``_0000``
    went in alone as a one-channel input.  One older than ``--settle`` (a copy given up) holds nothing."""
    found: dict[tuple[str, str], float] = {}
    for folder in {Path(p).parent for p in paths if case_of(p) is not None}:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _HIDDEN_CHANNEL.match(entry.name)
            if match is not None:
                try:
                    age = round(max(0.0, now - entry.stat().st_mtime), 1)
                except OSError:
                    continue
                found[(str(folder.resolve()), match["case"])] = age
    return found


def _newest_change(path: Path) -> float | None:
    """The latest mtime of the entry (and of a folder's contents; a ``.hdr``'s ``.img``), None if gone.

    Not the ctime: a finished file renamed into the inbox (the delivery docs/nightly.md advises) has a new ctime
    and is complete."""
    try:
        stat = path.stat()
    except OSError:
        return None
    newest = stat.st_mtime
    extra: list[Path] = []
    if path.is_dir():
        extra = list(path.rglob("*"))
    elif path.suffix.lower() == ".hdr":
        extra = [path.with_suffix(".img"), path.with_suffix(".IMG")]
    for p in extra:
        try:
            st = p.stat()
        except OSError:
            continue
        newest = max(newest, st.st_mtime)
    return newest

