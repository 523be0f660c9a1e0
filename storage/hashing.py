"""Content hashes: the identity of inputs, weights and outputs in provenance."""

from __future__ import annotations

import hashlib
import os
from os import PathLike
from pathlib import Path

_BLOCK = 1 << 20
_KNOWN: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime ns) -> sha256
_KNOWN_MAX = 1024


def sha256_file(path: str | PathLike[str]) -> str:
    """Stream a file through sha256 so that hashing never loads it whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_input(path: str | PathLike[str]) -> str:
    """:func:`sha256_file` of an input, read once per process while the file is unchanged.

    A nightly step hashes an input to key it, ingest hashes it for provenance,
    and a resumed run checks its earlier ingest against it: for a large scene
    that was three full reads.  The digest is remembered by the file's identity
    (device, inode, size, modification time).  Verification never uses this: it
    must read what is on disk now.
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _KNOWN.get(key)
    if digest is None:
        digest = sha256_file(path)
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.pop(next(iter(_KNOWN)))
        _KNOWN[key] = digest
    return digest


def sha256_tree(path: str | PathLike[str]) -> str:
    """Hash a directory (a zarr store) as the sorted list of (relative path, file hash)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(sha256_file(file).encode())
        digest.update(b"\n")
    return digest.hexdigest()
