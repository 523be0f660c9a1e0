"""A raster as its model sees it, warped region by region when read: model space with no store in between.

Writing the warped image to a model-space store and reading it back for the
windows cost more than the warp itself (float32 written and decoded once per
model pixel).  A :class:`WarpedImage` is an array-like on the model grid
whose every read warps just the requested region from the input store: the
bands the model takes, warped with the mapping's kernel, then put in the
card's units, in that order, so its values are bit for bit those of the
store it replaces (a warp's values do not depend on the window,
:mod:`storage.warp`).  The stitching's evaluate tasks read their regions from
it themselves, so the input is read where the windows need it, as whole
model chunks (its ``chunks``) through the run's chunk cache
(:mod:`storage.chunkcache`): each chunk is warped once and dropped after
the last region that reads it, so no more of the model-space image exists
than the band of chunks between regions read and regions to come.  The
model grid's valid mask is small and cheap (a warp of the input's mask,
:func:`storage.warp.validity_kernel`) and is stored.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from storage.rastergrid import RasterMapping
from storage.warp import warp_region


class _Bands:
    """The chosen channels of a (C, H, W) zarr array, read as (c, h, w) regions (what a warp task reads)."""

    def __init__(self, array: Any, bands: Sequence[int] | None) -> None:
        self.array = array
        n = array.shape[0]
        picked = list(range(n)) if bands is None else [int(b) for b in bands]
        contiguous = picked == list(range(picked[0], picked[0] + len(picked))) if picked else True
        self.key: Any = slice(picked[0], picked[-1] + 1) if contiguous and picked else picked
        self.shape = (len(picked), *array.shape[1:])
        self.chunks = (len(picked), *array.chunks[1:])  # a task reads by bands of whole chunk rows (storage.warp)
        self.dtype = array.dtype

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        _, rows, cols = key
        if isinstance(self.key, slice):
            return np.asarray(self.array[self.key, rows, cols])
        return np.asarray(self.array.oindex[self.key, rows, cols])


class WarpedImage:
    """(C, H, W) float32 on the model grid, computed from the input store region by region on each read.

    ``bands``: the input channels the model takes, in its order (None: all).
    ``units``: per-band (scales, offsets) applied after the warp as
    :func:`storage.bands.apply_units` applies them (float64, then float32),
    or None.  ``valid``: the input store's mask.  Slicing takes any
    (channels, rows, cols) of slices with step 1; :class:`segmentation.regions.RegionReader`
    and ``dask.array.from_array`` both read it that way.
    """

    reads_regions = True  # segmentation.predict.build_plan: read by the evaluate tasks themselves

    def __init__(self, source: Any, mapping: RasterMapping, *, valid: Any = None, bands: Sequence[int] | None = None,
                 units: tuple[Sequence[float], Sequence[float]] | None = None,
                 chunks: tuple[int, int] | None = None) -> None:
        self.source = _Bands(source, bands)
        self.valid = valid
        self.mapping = mapping
        self.bands = None if bands is None else tuple(int(b) for b in bands)
        self.units = None if units is None else (
            np.asarray(units[0], dtype=np.float64).reshape(-1, 1, 1),
            np.asarray(units[1], dtype=np.float64).reshape(-1, 1, 1))
        self.shape = (self.source.shape[0], *mapping.model_shape)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)
        self.chunks = (self.shape[0], *(chunks or (1024, 1024)))
        self._token = (str(getattr(source, "store", "")), getattr(source, "path", ""), source.shape, self.bands,
                       None if valid is None else getattr(valid, "path", id(valid)), mapping.to_json(),
                       None if units is None else [list(map(float, u)) for u in units])

    def __dask_tokenize__(self) -> Any:
        return ("segflow-warped-image", self._token)

    def read_region(self, box: Sequence[tuple[int, int]]) -> np.ndarray:
        m = self.mapping
        out = warp_region(self.source, self.valid, m.input, m.model, m.forward, m.scale, box)
        if self.units is not None:
            out = (out.astype(np.float64) * self.units[0] + self.units[1]).astype(np.float32)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        spans = []
        for k, n in zip(key[1:], self.shape[1:]):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise IndexError(f"a warped image is read by (channels, rows, cols) slices, not {key!r}")
            lo, hi, _ = k.indices(n)
            spans.append((lo, max(lo, hi)))
        if any(hi == lo for lo, hi in spans):
            return np.zeros((self.shape[0], *(hi - lo for lo, hi in spans)), dtype=np.float32)[key[0]]
        return self.read_region(spans)[key[0]]


__all__ = ["WarpedImage"]
