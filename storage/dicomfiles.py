"""DICOM files on disk: what each one is, and which volumes they form.

A DICOM "image" arrives as a folder of files (one slice each, or one enhanced
multi-frame file holding many frames), a DICOMDIR, or a list of files.  One
header pass (no pixels, cached while a file is unchanged) learns what each file
is; files that are not images (a DICOMDIR, a README, a Philips DIRFILE, SR, SEG,
RTSTRUCT) are skipped, while an image file cut short joins its series so that
the series is refused naming it.  Image files are grouped by SeriesInstanceUID,
and an enhanced multi-frame object is split by frame type and non-spatial dimension
index (magnitude and phase at the same positions are two volumes): each volume
is one :class:`SeriesRef`, the unit segflow segments, named safely after its
series.  Reading a volume is :mod:`storage.dicom`'s business; what one file
holds (the header pass, its frames, its parsed values) is :mod:`storage.dicomobject`'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from storage.dicomobject import (BARE_GROUPS, DicomObject, Frame, class_name, fmt_numbers, frame_name, scan_file,
                                 syntax_name, unreadable, why)
from storage.errors import CorruptInputError, InputError, InvalidInputError, SegflowError, UnsupportedFormatError
from storage.hashing import sha256_input
from storage.inputfiles import check_readable_file

__all__ = ["DicomObject", "Frame", "SeriesRef", "class_name", "damaged_files", "find_series", "fmt_numbers",
           "frame_name",
           "is_dicom_input", "join_split_series", "scan_file", "shared_instance", "syntax_name", "volume_label", "walk",
           "why"]

DICOMDIR_NAME = "DICOMDIR"
NAME_MAX = 80
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- the public unit


@dataclass(frozen=True)
class SeriesRef:
    """One volume of a DICOM series found on disk: the unit segflow segments."""

    root: Path  # the folder (or DICOMDIR's folder, or common parent of listed files) it came from
    series_instance_uid: str
    files: tuple[Path, ...]  # the image files of this volume (any order)
    name: str  # output stem, [A-Za-z0-9._-] only, <= 80 characters, unique per volume
    description: str | None
    volume: str | None = None  # key of one volume of a split enhanced multi-frame object, else None
    # byte-identical copies of files in ``files`` (same SOPInstanceUID: a folder merged twice), read once
    copies: tuple[Path, ...] = field(default=(), compare=False)
    listed: bool = field(default=False, compare=False)  # its files were named one by one, not as a folder

    @property
    def display(self) -> str:
        """How messages name the volume: the folder (the file, for a one-file series) and UIDs, never patient names.
        Files named one by one from several folders are named themselves: their common folder (``/data``) is no
        input the user gave, and a good file refused with a damaged copy of it went unnamed."""
        where: Any = self.files[0] if len(self.files) == 1 else self.root
        if self.listed and len({f.parent for f in self.files}) > 1:
            where = ", ".join(map(str, self.files[:2])) + (f" and {len(self.files) - 2} more file(s)"
                                                           if len(self.files) > 2 else "")
        return f"{where} [series {self.series_instance_uid}{' ' + self.volume if self.volume else ''}]"

    def sha256(self) -> str:
        """Content identity: sha256 over the files' sha256s in path order (plus the volume key).

        The volume key is part of it because two volumes split from one file
        have the same files yet are different inputs to a content-keyed batch.
        """
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(sha256_input(path).encode("ascii"))
            digest.update(b"\n")
        if self.volume:
            digest.update(f"volume:{self.volume}".encode("utf-8"))
        return digest.hexdigest()


# --------------------------------------------------------------------------- finding series


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """A directory holding DICOM files, a DICOMDIR, or a DICOM file (with the DICM preamble, or a bare dataset)."""
    path = Path(path)
    if path.is_dir():
        return any(_is_dicom_file(p) for p in walk(path))
    return path.is_file() and (path.name.upper() == DICOMDIR_NAME or _is_dicom_file(path))


def _is_dicom_file(path: Path) -> bool:
    """The DICM preamble, else a dataset without it that the header pass accepts (see dicomobject)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if head[:2] not in BARE_GROUPS:  # cheap: TIFF, gzip, NIfTI and text never start so
        return False
    try:
        return scan_file(path) is not None
    except (InputError, OSError):
        return False


def walk(folder: Path) -> Iterator[Path]:
    """Regular files under a folder, depth first in name order (symbolic links to files included)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                if stat.S_ISREG(path.stat().st_mode):
                    yield path
            except OSError:
                continue


def find_series(paths: Sequence[str | os.PathLike[str]]) -> list[SeriesRef]:
    """The image volumes among folders (recursive), DICOMDIR files and lists of files.

    Files that are not DICOM images (the DICOMDIR itself, a README, SR, SEG or
    RTSTRUCT objects) are skipped. An image file cut short (no Rows/Columns) is
    not skipped: it joins its series (by SeriesInstanceUID; without one, every
    series in its folder), which ingest then refuses naming it, so no series is
    segmented with a slice missing. Loose files given together are sorted
    into series as a folder's are, each series named by the folder its own
    files share (files from two studies had both been named by the folder
    above them, up to ``/``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    groups: list[tuple[Path, list[Path], Path | None]] = []  # (root, files, the folder named when one was)
    loose: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and not path.is_symlink():
            raise InputError(path, "no such file or folder")
        if path.is_dir():
            groups.append((path, list(walk(path)), path))
        elif path.name.upper() == DICOMDIR_NAME:
            groups.append((path.parent, _dicomdir_files(path), path))
        else:
            check_readable_file(path)
            loose.append(path)
    if loose:
        groups.append((_common_parent(loose), loose, None))

    refs: list[SeriesRef] = []
    for root, files, named in groups:
        objects, skipped, damaged = [], [], []
        for path in dict.fromkeys(files):
            obj = scan_file(path)
            if obj is None:
                if named is None:
                    raise UnsupportedFormatError(path, "not a DICOM file")
                obj = unreadable(path)  # a slice file emptied or cut short in a folder: its series is refused
                if obj is None:
                    continue
            if obj.damage is not None:
                damaged.append(obj)
            elif obj.is_image and obj.series_instance_uid:
                objects.append(obj)
            else:
                skipped.append(obj)
        if not objects and damaged:
            raise CorruptInputError(damaged[0].path, str(damaged[0].damage))
        if not objects:
            if named is None and len(files) == 1 and skipped:
                raise UnsupportedFormatError(files[0], f"is a {class_name(skipped[0].sop_class_uid)} object, "
                                                       "not an image; there is nothing to segment")
            where = named if named is not None else root
            raise InputError(where, f"no DICOM image series found ({_count(len(files), 'file')}, "
                                    f"{_count(len(skipped), 'DICOM object')} that are not images)")
        objects, copies = _without_copies(objects)
        found = _with_damaged(_refs_of(root, objects, copies), damaged)
        if named is None:  # loose files: each series is named by the folder its own files share, not all of them
            found = [replace(ref, root=_common_parent(ref.files), listed=True) for ref in found]
        refs.extend(found)
    return sorted(refs, key=lambda r: (str(r.root), r.name, r.series_instance_uid, r.volume or ""))


def join_split_series(parts: Sequence[Sequence[Any]]) -> tuple[list[list[Any]], list[tuple[str, str]]]:
    """The inputs found per command-line argument, with a series split across two folders made whole again.

    Each folder is searched on its own, so that one without images fails alone; a series whose slices sit in
    two folders given together had come out as two inputs, its first half segmented and reported ``ok`` (half
    the volume, half the millilitres) and the second refused as "the same series in two places".  Where one
    volume (SeriesInstanceUID and volume key) comes from several arguments:

    - if one part holds every SOP instance the others hold, it is the series and the others are copies of (part
      of) it: it takes the first part's place, and the others stay, to be refused as the same series twice;
    - otherwise the parts complement each other: their files are read as one list (a byte-identical copy once)
      and become one input in the first part's place.

    Returns (the parts, [(input, one-line error)] for a joined series that cannot be read).  Other items pass.
    """
    out = [list(p) for p in parts]
    places: dict[tuple[str, str | None], list[tuple[int, int]]] = {}
    for i, part in enumerate(out):
        for j, item in enumerate(part):
            if isinstance(item, SeriesRef):
                places.setdefault((item.series_instance_uid, item.volume), []).append((i, j))
    failed: list[tuple[str, str]] = []
    drop: set[tuple[int, int]] = set()
    for key, where in places.items():
        if len({i for i, _ in where}) < 2:
            continue
        refs = [out[i][j] for i, j in where]
        held = [_instances(r) for r in refs]
        union = set().union(*held)
        whole = next((k for k, h in enumerate(held) if h == union), None)
        if whole is not None:
            (i0, j0), (i1, j1) = where[0], where[whole]
            out[i0][j0], out[i1][j1] = refs[whole], refs[0]
            continue
        files = sorted({f for r in refs for f in (*r.files, *r.copies)})
        try:
            joined = [m for m in find_series(files) if (m.series_instance_uid, m.volume) == key]
        except SegflowError as exc:  # a slice cut short: the joined series fails naming it, as a folder's would
            failed.append((refs[0].display, str(exc)))
            drop.update(where)
            continue
        if len(joined) == 1:
            i0, j0 = where[0]
            out[i0][j0] = joined[0]
            drop.update(where[1:])
    return [[x for j, x in enumerate(part) if (i, j) not in drop] for i, part in enumerate(out)], failed


def damaged_files(ref: SeriesRef) -> list[Path]:
    """The files of a volume cut short or unreadable (headers are cached): a copy refused as "the same series in
    two places" names them, or the damage would go unsaid."""
    out = []
    for path in ref.files:
        try:
            obj = scan_file(path) or unreadable(path)
        except (OSError, SegflowError):
            obj = None
        if obj is None or obj.damage is not None:
            out.append(path)
    return out


def _instances(ref: SeriesRef) -> set[str]:
    """The SOPInstanceUIDs a volume's files hold (headers are cached: no file is read twice)."""
    uids = set()
    for path in ref.files:
        try:
            obj = scan_file(path)
        except OSError:
            continue
        if obj is not None and obj.frames and obj.frames[0].sop_instance_uid:
            uids.add(obj.frames[0].sop_instance_uid)
    return uids


def _common_parent(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent.absolute()) for p in files]))


def _dicomdir_files(dicomdir: Path) -> list[Path]:
    """The files a DICOMDIR references, relative to its folder (never outside it)."""
    try:
        ds = pydicom.dcmread(dicomdir, force=False)
    except InvalidDicomError:
        raise UnsupportedFormatError(dicomdir, "is named DICOMDIR but is not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise CorruptInputError(dicomdir, f"cannot read the DICOMDIR: {why(exc)}") from None
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        if any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
            raise InvalidInputError(dicomdir, f"references a file outside its folder: {'/'.join(parts)!r}")
        path = dicomdir.parent.joinpath(*parts)
        if not path.is_file():
            # media file IDs are upper case; file systems may have kept the case as written
            raise InputError(dicomdir, f"references a missing file {'/'.join(parts)}")
        files.append(path)
    return files


def _without_copies(objects: list[DicomObject]) -> tuple[list[DicomObject], dict[Path, Path]]:
    """The objects with every byte-identical copy of another (same SOPInstanceUID, same bytes) left out, and
    each copy's original.  dcm2niix removes such duplicates; segflow refused the series ("two slices at the same
    position").  Two files with one SOPInstanceUID and different bytes both stay, and are refused there."""
    by_uid: dict[str, list[DicomObject]] = {}
    for obj in objects:
        uid = obj.frames[0].sop_instance_uid if obj.frames else ""  # every frame of an object has the object's
        if uid:
            by_uid.setdefault(uid, []).append(obj)
    copies: dict[Path, Path] = {}
    for same in by_uid.values():
        if len(same) < 2:
            continue
        first, *others = sorted(same, key=lambda o: (len(o.path.parts), str(o.path)))
        for other in others:
            if other.path.stat().st_size == first.path.stat().st_size and \
                    sha256_input(other.path) == sha256_input(first.path):
                copies[other.path] = first.path
    return [o for o in objects if o.path not in copies], copies


def shared_instance(objects: Sequence[DicomObject]) -> str | None:
    """Two files of a series claiming one SOPInstanceUID with different contents (byte-identical copies were left
    out by :func:`find_series`): one is not the instance it says it is, and a DICOM SEG cannot reference both
    (highdicom refused it only after the whole series was segmented)."""
    seen: dict[str, Path] = {}
    for obj in objects:
        uid = obj.frames[0].sop_instance_uid if obj.frames else ""
        if uid and uid in seen:
            return (f"{seen[uid].name} and {obj.path.name} share one SOPInstanceUID ({uid}) but differ: one of "
                    "them is not the instance it claims to be")
        seen.setdefault(uid, obj.path)
    return None


def _refs_of(root: Path, objects: list[DicomObject], copies: dict[Path, Path] | None = None) -> list[SeriesRef]:
    by_series: dict[str, list[DicomObject]] = {}
    for obj in objects:
        by_series.setdefault(obj.series_instance_uid or "", []).append(obj)
    refs = []
    for uid, members in by_series.items():
        first = members[0]
        by_key: dict[tuple[str, ...], set[Path]] = {}
        for obj in members:
            for frame in obj.frames:
                by_key.setdefault(frame.key, set()).add(obj.path)
        for key, files in by_key.items():
            volume = volume_label(key) if len(by_key) > 1 else None
            refs.append(SeriesRef(
                root=root, series_instance_uid=uid, files=tuple(sorted(files)),
                name=_name(first.series_number, first.series_description, uid, volume),
                description=first.series_description, volume=volume,
                copies=tuple(sorted(c for c, original in (copies or {}).items() if original in files)),
            ))
    return refs


def _with_damaged(refs: list[SeriesRef], damaged: list[DicomObject]) -> list[SeriesRef]:
    """Each damaged image file joins the refs of its series, or (no series UID left in it, or one cut short inside
    its value, which no readable file has) of its folder's: with a cut UID it had been an input of its own, and
    its series segmented one slice short."""
    known = {ref.series_instance_uid for ref in refs}
    out = []
    for ref in refs:
        extra = [o.path for o in damaged
                 if o.series_instance_uid == ref.series_instance_uid
                 or (o.series_instance_uid not in known and any(f.parent == o.path.parent for f in ref.files))]
        out.append(replace(ref, files=tuple(sorted(set(ref.files) | set(extra)))) if extra else ref)
    orphans = [o for o in damaged if not any(o.path in r.files for r in out)]
    for obj in orphans:  # its series has no readable file here: the damaged file is an input that fails alone
        out.append(SeriesRef(root=obj.path.parent, series_instance_uid=obj.series_instance_uid or "unknown",
                             files=(obj.path,), name=_name(None, None, str(obj.path), None), description=None))
    return out


def volume_label(key: tuple[str, ...]) -> str:
    return ",".join(key) if key else "untyped"


def _name(number: int | None, description: str | None, uid: str, volume: str | None) -> str:
    """series-<number>-<description>[-<volume>]-<8 hex>: a file stem safe on any file system."""
    digest = hashlib.sha1((uid + (f"/{volume}" if volume else "")).encode("utf-8")).hexdigest()[:8]
    head = "series" if number is None else f"series-{number}"
    words = [_SAFE.sub("_", w).strip("._-") for w in (description or "", volume or "")]
    middle = "-".join(w for w in words if w)
    room = NAME_MAX - len(head) - len(digest) - 2
    middle = middle[:max(room - 1, 0)].rstrip("._-")
    return "-".join(p for p in (head, middle, digest) if p)


# --------------------------------------------------------------------------- small helpers


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
