"""``--split-by-tile``: one label COG per tile of a mosaic, cut from its seamless labels.

A mosaic (:mod:`storage.mosaic`) is segmented as one image, so no tile edge
is an image edge; users who file results per tile still want one file per
tile.  Each is a window of the mosaic's labels, read block by block (never
copied whole): on the tile's own grid when the tile was placed as it is, else
on the tile's window of the mosaic grid, in the mosaic's CRS.  Each embeds the
mosaic's provenance, which lists it with its hash.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

from storage.errors import InvalidInputError
from storage.inputfiles import stem_of


def split_outputs(description: dict[str, Any]) -> dict[str, str]:
    """``--split-by-tile``: each tile's path -> the name of the COG cut for it (``<tile stem>.tif``)."""
    return {t["path"]: f"{stem_of(t['path'])}.tif" for t in description["tiles"]}


class _Cut:
    """A window of a 2-D array, read as an array of its own (what the COG writer reads block by block)."""

    def __init__(self, array: Any, row: int, col: int, height: int, width: int) -> None:
        self.array, self.row, self.col = array, row, col
        self.shape = (height, width)
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key: tuple[slice, slice]) -> Any:
        ys, xs = key
        return self.array[self.row + (ys.start or 0): self.row + (self.shape[0] if ys.stop is None else ys.stop),
                          self.col + (xs.start or 0): self.col + (self.shape[1] if xs.stop is None else xs.stop)]


def write_tile_cuts(labels: Any, geometry: Any, description: dict[str, Any], out_dir: str | PathLike[str], *,
                    classes: list[Any], provenance: dict[str, Any] | None, created: list[Path]) -> list[Path]:
    """One label COG per tile, cut from the seamless labels: on the tile's own grid when it was placed as it is,
    else on its window of the mosaic's grid (in the mosaic's CRS).  Each embeds the mosaic's provenance;
    ``created`` collects them as they land."""
    from storage.cogwrite import write_label_cog

    if tuple(labels.shape) != (geometry.height, geometry.width) or \
            not np.allclose(geometry.transform, description["transform"], rtol=1e-12, atol=0):
        raise InvalidInputError(description.get("name"), "--split-by-tile cuts the labels on the mosaic's own grid; "
                                                         "they were written on another (--output-grid model)")
    names = split_outputs(description)
    base = Affine(*geometry.transform)
    written = []
    for tile in description["tiles"]:
        w = tile["window"]
        transform = tile["transform"] if not tile["warped"] else \
            tuple(base * Affine.translation(w["col"], w["row"]))[:6]
        cut = geometry.model_copy(update={"width": w["width"], "height": w["height"], "transform": tuple(transform)})
        path = write_label_cog(_Cut(labels, w["row"], w["col"], w["height"], w["width"]), cut,
                               Path(out_dir) / names[tile["path"]], classes=classes, provenance=provenance)
        created.append(path)
        written.append(path)
    return written
