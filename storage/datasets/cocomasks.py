"""COCO instance annotations as masks: polygons and RLE (uncompressed or compressed) checked, then decoded.

pycocotools decodes what it is given without checking it: a compressed RLE
string whose runs do not add up to the image leaves the mask's tail as
whatever memory held (short) or writes past it (long), and a polygon list left
unwrapped draws nothing.  Each annotation is checked here against its image
before pycocotools sees it, so a bad one is one line naming its JSON, and
:func:`paint` lays one image's masks into its semantic map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as coco_mask

from storage.datasets.base import IGNORE
from storage.errors import InvalidInputError

__all__ = ["Shape", "compressed_counts", "draws", "paint"]


class Shape(NamedTuple):
    """One instance annotation, kept as the JSON gave it until its image is read."""

    ann_id: Any
    value: int
    crowd: bool
    segmentation: Any


def paint(shapes: list[Shape], height: int, width: int, source: Path) -> np.ndarray:
    """The semantic map of one image's shapes: larger shapes first, so smaller ones stay visible on top."""
    labels = np.zeros((height, width), dtype=np.uint8)
    masks = []
    for order, shape in enumerate(shapes):
        mask = _decode(shape, height, width, source)
        masks.append((-int(mask.sum()), order, mask, IGNORE if shape.crowd else shape.value))
    for _, _, mask, value in sorted(masks, key=lambda m: (m[0], m[1])):
        labels[mask] = value
    return labels


def draws(segmentation: Any) -> bool:
    """Whether a segmentation may paint pixels: a polygon of three points or more, or an RLE (checked when
    decoded); ``[]``, what box-only exports write, paints none."""
    if isinstance(segmentation, dict):
        return True
    # a flat list of numbers (a polygon left unwrapped) is refused when it is decoded, saying so
    return any(not isinstance(p, list) or len(p) >= 6 for p in segmentation)


def compressed_counts(text: bytes) -> list[int] | None:
    """The run lengths a compressed COCO RLE string holds (pycocotools' own reading of it, ``rleFrString``: 5
    bits a character from '0', a continuation bit, a sign bit on the last, each run after the second a
    difference from the run two before); None for a character outside the code.  pycocotools trusts these to
    add up to the mask's size, and does not check."""
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None  # a run cut off inside its continuation
            c = text[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _decode(shape: Shape, height: int, width: int, source: Path) -> np.ndarray:
    """One annotation's (H, W) bool mask from its polygons or RLE (uncompressed or compressed).

    A polygon of fewer than three points covers no pixel and is skipped (the COCO releases hold a few)."""
    seg, where = shape.segmentation, f"annotation {shape.ann_id}"
    try:
        if isinstance(seg, list):
            if any(not isinstance(p, list) for p in seg):  # [x1, y1, ...] for [[x1, y1, ...]]: it drew nothing
                raise InvalidInputError(source, f"{where}: segmentation is not a list of polygons (each a list "
                                                "[x1, y1, x2, y2, ...]); a flat list of numbers is one polygon "
                                                "left unwrapped")
            if any(len(p) % 2 for p in seg):
                raise InvalidInputError(source, f"{where}: a polygon has an odd number of coordinates")
            polygons = [[float(v) for v in p] for p in seg if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        else:
            size, counts = seg.get("size"), seg.get("counts")
            if list(size or ()) != [height, width]:
                raise InvalidInputError(source, f"{where}: RLE size {size} is not its image's [{height}, {width}]")
            if isinstance(counts, list):
                if sum(counts) != height * width or any(not isinstance(c, int) or c < 0 for c in counts):
                    raise InvalidInputError(source, f"{where}: RLE counts do not cover its {height}x{width} image")
                rle = coco_mask.frPyObjects(seg, height, width)
            elif isinstance(counts, (str, bytes)):
                text = counts.encode("ascii") if isinstance(counts, str) else counts
                runs = compressed_counts(text)
                if runs is None or sum(runs) != height * width or any(c < 0 for c in runs):
                    # pycocotools writes runs past the mask's end, or leaves its tail as whatever memory held
                    raise InvalidInputError(source, f"{where}: RLE counts do not cover its {height}x{width} image")
                rle = {"size": [height, width], "counts": text}
            else:
                raise InvalidInputError(source, f"{where}: RLE counts are neither a list nor a string")
        mask = coco_mask.decode(rle)
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        raise InvalidInputError(source, f"{where}: segmentation cannot be decoded ({err})") from None
    if mask.shape[:2] != (height, width):
        raise InvalidInputError(source, f"{where}: segmentation is not its image's {height}x{width}")
    return mask.astype(bool)
