"""Content hashes: the identity of inputs, weights and outputs in provenance."""

from __future__ import annotations

import hashlib
from os import PathLike
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: str | PathLike[str]) -> str:
    """Stream a file through sha256 so that hashing never loads it whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


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
