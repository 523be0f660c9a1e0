"""JSON from files segflow did not write, parsed so that every failure is a ``json.JSONDecodeError``.

``json.loads`` raises ``RecursionError`` for a document nested deeper than
the interpreter's stack, which is no ``ValueError``: the one-line refusals
around it missed it, and a 200 KB file nested 10⁵ deep in an inbox ended a
whole nightly run with a traceback (as a nested card, manifest, STAC item or
label tag ended ``segment``, ``evaluate`` and ``info``).  :func:`loads` turns
it into the ``JSONDecodeError`` those callers already catch; :func:`read`
also refuses, before reading, a file larger than any such document should
be (a 6 GB ``card.json`` had been read into memory whole).
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["MAX_BYTES", "loads", "read"]

MAX_BYTES = 256 * 1024 * 1024  # a card, item, manifest or dataset table; COCO's largest JSON is about 450 MB


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads``, with a document nested too deeply refused as any malformed one is."""
    try:
        return json.loads(data)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", data if isinstance(data, str) else "", 0) from None


def read(path: str | PathLike[str], limit: int = MAX_BYTES) -> Any:
    """The JSON document in ``path``: :func:`loads` of its text, refused unread when it holds more than ``limit``
    bytes (``JSONDecodeError``); ``OSError`` and ``UnicodeDecodeError`` as reading raises them."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise json.JSONDecodeError(f"{size:,} bytes, more than the {limit:,} such a document may hold", "", 0)
    return loads(path.read_text(encoding="utf-8"))
