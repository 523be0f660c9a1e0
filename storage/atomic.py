"""Small text outputs written whole or not at all.

A reader (a viewer, ``verify``, a rerun deciding what is done) must never see
half a file: each one is written under a hidden temporary name beside its
destination, flushed to disk, and renamed into place.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from storage.errors import ExportError


def write_bytes_atomically(out: Path, data: bytes, what: str) -> Path:
    """Write ``data`` to ``out`` under a temporary name, then rename it into place; a failure raises
    ExportError naming the file and leaves nothing behind."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(out, f"cannot write the {what}: {exc.strerror or type(exc).__name__}") from None
    return out


# the temporary names segflow's writers give an output N before renaming it into place: .N.<hex>.tmp[.ext],
# .N.<hex>.tiled.tif, .N.<hex>.cog.tif (storage.geotiff, vectors, nifti, dicomseg, provenance, this module)
_TEMPORARY = re.compile(r"\.[0-9a-f]{8,32}\.(tmp|tiled\.tif|cog\.tif)(\.[A-Za-z0-9]+)?$")


def leftover_temporaries(folder: Path, stem: str) -> list[Path]:
    """Temporary files of the outputs named ``<stem>.*`` in ``folder``: what a killed run was writing.  Nothing
    removes them otherwise, and each kill adds one (an unfinished COG is 90 KB to gigabytes)."""
    prefix = f".{stem}."
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(prefix) and _TEMPORARY.search(p.name) and p.is_file())


def write_text_atomically(out: Path, text: str, what: str) -> Path:
    """:func:`write_bytes_atomically` of ``text`` as UTF-8, its line ends as they are.

    A file name that is no UTF-8 reaches Python as lone surrogates, which UTF-8 cannot encode: a report naming
    such an input had ended the run with a traceback.  They are written as ``\\udcff`` (in JSON, the escape that
    reads back as the same name)."""
    return write_bytes_atomically(out, text.encode("utf-8", errors="backslashreplace"), what)


__all__ = ["leftover_temporaries", "write_bytes_atomically", "write_text_atomically"]


def check_output_folder(folder: Path) -> None:
    """Refuse a file where an output folder goes, without creating anything (a run that fails its checks leaves
    no folder behind)."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise ExportError(folder, "cannot create the output folder: a file of that name is in the way")
        nearest = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    except PermissionError as exc:  # a parent this user may not enter: a traceback from the first stat
        raise ExportError(folder, f"cannot reach the output folder: {exc.strerror}") from None
    # what the run would meet later, after its cluster started, as a lock or work file it cannot make
    if not nearest.is_dir():
        raise ExportError(folder, f"cannot create the output folder: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        what = "write in the output folder" if nearest == folder else f"create the output folder in {nearest}"
        raise ExportError(folder, f"cannot {what}: {_denied_why(nearest)}")


def _denied_why(folder: Path) -> str:
    """A read-only mount said as such (it had been "permission denied", sending an operator to owners and
    modes), else permission denied."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def make_output_folder(folder: Path) -> Path:
    """Create an output folder (and its parents); a file in the way or a read-only parent is one ExportError
    naming it, not an OSError traceback out of a command."""
    folder = Path(folder)
    check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(folder, f"cannot create the output folder: {exc.strerror or exc}") from None
    return folder
