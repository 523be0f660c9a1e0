"""Pixel normalisation shared by training and inference, so both see the same numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segmentation.card import Normalization


@dataclass(frozen=True)
class Normalizer:
    """Per-channel affine map ``(x - shift) * factor``, then optional clipping.

    Resolved once per image (``image_zscore`` needs the image's statistics), then
    applied to each window independently; that keeps per-window work free of
    any global state, which the chunk-invariant stitching relies on.
    """

    shift: tuple[float, ...]
    factor: tuple[float, ...]
    clip: tuple[float, float] | None = None
    nonzero: bool = False  # voxels equal to 0 stay 0 (MONAI NormalizeIntensity(nonzero=True))

    def finite_for(self, dtype: np.dtype) -> bool:
        """Whether every value of an integer ``dtype`` normalises to a finite float32 (so no NaN/Inf pass is needed)."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "biu":
            return False
        info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
        largest = (max(abs(int(info.min)), int(info.max)) + max(abs(s) for s in self.shift)) * \
            max(abs(f) for f in self.factor)
        return largest < float(np.finfo(np.float32).max) / 2

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a (C, *spatial) block to float32, into ``out`` when given (no temporary copy)."""
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        zeros = (x == 0) if self.nonzero else None
        # cast and shift in one pass; the arithmetic is float32 whatever the stored dtype
        # a float raster's nodata (e.g. -3.4e38) overflows to inf here, silently: non-finite values become 0 later
        # (zero_non_finite), and numpy's RuntimeWarning reached the terminal
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(x, np.asarray(self.shift, dtype=np.float32).reshape(shape), out=out, dtype=np.float32)
            out *= np.asarray(self.factor, dtype=np.float32).reshape(shape)
        if self.clip is not None:
            np.clip(out, self.clip[0], self.clip[1], out=out)
        if zeros is not None:
            out[zeros] = 0.0
        return out

    def apply_torch(self, x: Any, out: Any) -> Any:
        """:meth:`__call__` in torch, on whatever device ``x`` (the stored values, any real dtype) is on, into the
        float32 tensor ``out``: the same float32 operations in the same order, so the values are bit for bit
        those of the numpy path (``tests/test_device_resident.py``).  A GPU worker normalises there, and only
        the stored dtype crosses the bus."""
        import torch

        shape = (-1,) + (1,) * (x.ndim - 1)
        zeros = (x == 0) if self.nonzero else None
        out.copy_(x)  # the cast to float32, rounding once as numpy's does
        out.sub_(torch.tensor(self.shift, dtype=torch.float32, device=out.device).reshape(shape))
        out.mul_(torch.tensor(self.factor, dtype=torch.float32, device=out.device).reshape(shape))
        if self.clip is not None:
            out.clamp_(self.clip[0], self.clip[1])
        if zeros is not None:
            out.masked_fill_(zeros, 0.0)
        return out


def _per_channel(values: list[float] | None, channels: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) != channels:
        raise ValueError(f"normalisation lists {len(values)} values for {channels} channels")
    return tuple(float(v) for v in values)


def zero_non_finite(x: np.ndarray) -> np.ndarray:
    """``x`` (normalised, float) with NaN and ±Inf set to 0, in place: a float raster's nodata would spread through
    every convolution into valid pixels' outputs, so the network sees 0 there instead, a per-pixel rule that
    chunking cannot change, in the sliding window and in training alike.  Checked first: ``np.nan_to_num``'s
    three masks took 8.2 ms for a 4 × 1280² float32 region, the check 1.2 ms."""
    if not np.isfinite(x).all():
        np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def zero_invalid(x: np.ndarray, valid: Any, region: tuple[slice, ...]) -> np.ndarray:
    """``x`` (normalised, channels first) with the pixels ``valid[region]`` calls invalid set to 0, in place: what
    the sliding window shows the network where a mask says the input has no data (:mod:`segmentation.stitching`),
    so a model trains on what it will see.  ``valid`` None: every pixel is valid."""
    if valid is not None:
        v = np.asarray(valid[region], dtype=bool)
        if not v.all():
            x[:, ~v] = 0.0
    return x


def resolve(norm: Normalization, channels: int, stats: Any = None) -> Normalizer:
    """Turn a card's normalisation into numbers.

    ``stats`` is what :func:`statistics_for` measured on the image: (mean, std)
    for image_zscore, the (lower, upper) percentile values for percentile.
    """
    if norm.mode == "none":
        return Normalizer((0.0,) * channels, (1.0,) * channels, norm.clip)
    if norm.mode == "scale":
        return Normalizer(_per_channel(norm.offset, channels, 0.0),
                          _per_channel(norm.scale, channels, 1.0), norm.clip)
    if norm.mode == "zscore":
        std = _per_channel(norm.std, channels, 1.0)
        return Normalizer(_per_channel(norm.mean, channels, 0.0), tuple(1.0 / s for s in std), norm.clip,
                          norm.nonzero)
    if stats is None:
        raise ValueError(f"{norm.mode} normalisation needs the image's statistics")
    if norm.mode == "percentile":
        return _percentile_scaling(norm, channels, *stats)
    mean, std = stats
    # MONAI divides by 1 where the standard deviation is 0
    return Normalizer(tuple(float(m) for m in mean),
                      tuple(1.0 / float(s) if float(s) > 0 else 1.0 for s in std), norm.clip, norm.nonzero)


def _percentile_scaling(norm: Normalization, channels: int, a_min: float, a_max: float) -> Normalizer:
    """MONAI's ScaleIntensityRangePercentiles once the percentiles are known: (x - a_min)/(a_max - a_min) ..."""
    b_min, b_max = float(norm.b_min), float(norm.b_max)  # type: ignore[arg-type]
    if norm.relative:
        lower, upper = float(norm.lower), float(norm.upper)  # type: ignore[arg-type]
        b_min, b_max = (b_max - b_min) * lower / 100.0 + b_min, (b_max - b_min) * upper / 100.0 + b_min
    if a_max == a_min:  # MONAI warns and only shifts: x - a_min (+ b_min when given)
        return Normalizer((a_min - b_min,) * channels, (1.0,) * channels, norm.clip)
    scale = (b_max - b_min) / (a_max - a_min)
    return Normalizer((a_min - b_min / scale,) * channels, (scale,) * channels, norm.clip)


def statistics_for(norm: Normalization, image: Any, mask: Any = None) -> Any:
    """What :func:`resolve` needs measured on the whole image for ``norm`` (None when nothing is)."""
    if norm.mode == "image_zscore":
        return image_statistics(image, mask, nonzero=norm.nonzero)
    if norm.mode == "percentile":
        return tuple(image_percentiles(image, [float(norm.lower), float(norm.upper)], mask))  # type: ignore[arg-type]
    return None


def _as_dask(image: Any) -> Any:
    import dask.array as da

    return image if isinstance(image, da.Array) else da.from_array(image, chunks=(1,) + tuple(
        getattr(image, "chunks", image.shape)[1:]))


def image_statistics(image, mask=None, *, nonzero: bool = False) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Per-channel mean and std over valid pixels, as a chunked dask reduction (out-of-core).

    ``image`` is a (C, *spatial) numpy, zarr or dask array; ``mask`` is a
    (*spatial) boolean array or None.  With ``nonzero`` only voxels that are
    not 0 count (per channel), as MONAI's ``NormalizeIntensity(nonzero=True)``.
    """
    import dask.array as da

    img = _as_dask(image)
    x = img.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    # a pixel counts where it is valid, finite (a masked-out pixel often holds NaN or an infinity: multiplied by
    # a 0 weight it gave NaN, and every statistic with it) and, with ``nonzero``, not 0, channel by channel
    valid = da.isfinite(x)
    if mask is not None:
        mm = mask if isinstance(mask, da.Array) else da.from_array(mask, chunks=img.chunksize[1:])
        valid = valid & mm.rechunk(img.chunks[1:]).astype(bool)[None]
    if nonzero:
        valid = valid & (img != 0)
    v = da.where(valid, x, 0.0)
    n, s1, s2 = da.compute(valid.sum(axis=axes), v.sum(axis=axes), (v * v).sum(axis=axes))
    n = np.maximum(n.astype(np.float64), 1.0)
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return [float(m) for m in mean], [float(sd) for sd in np.sqrt(var)]


_BINS = 4096
_COLLECT = 1 << 21  # values gathered in memory at most, per wanted rank, to finish a percentile exactly


def image_percentiles(image: Any, qs: list[float], mask: Any = None) -> list[float]:
    """``np.percentile(valid values, qs)`` (linear interpolation) over all channels, exactly and out of core.

    Each wanted rank is narrowed down by histogram passes over the chunks (one
    pass usually leaves a few thousand candidates), which are then gathered
    and sorted: a handful of reads of the image, never the image in memory.
    NaN and infinities count as not valid, as masked pixels do.
    """
    import dask
    import dask.array as da

    img = _as_dask(image)
    blocks = img.to_delayed().ravel()
    masks = None
    if mask is not None:
        dm = mask if isinstance(mask, da.Array) else da.from_array(mask, chunks=img.chunksize[1:])
        masks = dm.rechunk(img.chunks[1:]).to_delayed().ravel()
        channel_blocks = img.numblocks[0]
        masks = [masks[i // channel_blocks] for i in range(len(blocks))] if channel_blocks > 1 else list(masks)

    def values(block: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        b = np.asarray(block, dtype=np.float64)
        b = b.ravel() if valid is None else b[:, np.asarray(valid, dtype=bool)].ravel()
        return b if np.dtype(block.dtype).kind not in "fc" else b[np.isfinite(b)]

    def each(fn: Any) -> list[Any]:
        tasks = [dask.delayed(lambda b, m: fn(values(b, m)))(b, None if masks is None else masks[i])
                 for i, b in enumerate(blocks)]
        return list(dask.compute(*tasks))

    stats = each(lambda v: (v.size, v.min() if v.size else np.inf, v.max() if v.size else -np.inf))
    n = sum(s[0] for s in stats)
    if n == 0:
        raise ValueError("no valid voxel to take percentiles of")
    lo, hi = min(s[1] for s in stats), max(s[2] for s in stats)
    ranks = sorted({int(np.floor(q / 100.0 * (n - 1))) for q in qs} | {int(np.ceil(q / 100.0 * (n - 1))) for q in qs})
    found = {r: _kth(each, r, lo, hi) for r in ranks}
    out = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        a, b = found[int(np.floor(pos))], found[int(np.ceil(pos))]
        out.append(float(a + (b - a) * (pos - np.floor(pos))))
    return out


def _kth(each: Any, k: int, lo: float, hi: float) -> float:
    """The k-th smallest value (0-based) of everything ``each`` visits, all of it within [lo, hi]."""
    below = 0
    while True:
        if lo == hi:
            return lo
        edges = np.linspace(lo, hi, _BINS + 1)

        def hist(v: np.ndarray, lo: float = lo, hi: float = hi, edges: np.ndarray = edges) -> np.ndarray:
            inside = v[(v >= lo) & (v <= hi)]
            return np.bincount(np.clip(np.searchsorted(edges, inside, "right") - 1, 0, _BINS - 1),
                               minlength=_BINS)

        counts = np.sum(each(hist), axis=0)
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, k - below, "right"))
        below += int(cum[b - 1]) if b else 0
        lo_b, hi_b = float(edges[b]), float(edges[b + 1])
        last = b == _BINS - 1
        if counts[b] <= _COLLECT or lo_b == hi_b:
            def pick(v: np.ndarray, lo_b: float = lo_b, hi_b: float = hi_b, last: bool = last) -> np.ndarray:
                return v[(v >= lo_b) & ((v <= hi_b) if last else (v < hi_b))]

            got = np.sort(np.concatenate(each(pick)))
            return float(got[k - below])
        lo, hi = lo_b, (hi_b if last else float(np.nextafter(hi_b, -np.inf)))


def dtype_problem(card: Any, stored: Any) -> str | None:
    """Why values of dtype ``stored`` may not be what the card's fixed normalisation was made for, said after "is
    stored as"; None when they may be.  Floats for a card of integers (or the other way round): most often
    reflectances (0-1) fed to a model of digital numbers (0-10000), which labelled a demo scene 97 % 'water' without
    a word; integers of another width (an 8-bit export of a 16-bit scene).  int16 against uint16, as CT and MR come,
    is the same range of values and is not said, and a normalisation by the image's own statistics absorbs any
    linear change of units.  The pipeline's note and ``predict``'s warning (flows.modelspace, segmentation.predict)."""
    spec = card.input
    if spec.dtype is None or spec.normalization.mode in ("image_zscore", "percentile"):
        return None
    try:
        wanted, stored = np.dtype(spec.dtype), np.dtype(stored)
    except TypeError:
        return None
    if (wanted.kind == "f") != (stored.kind == "f"):
        return (f"{stored.name}, and the normalisation of model {card.name!r} was made for {wanted.name} values: if "
                "these are other units (reflectance rather than digital numbers), its labels are meaningless")
    if wanted.kind in "iu" and stored.kind in "iu" and wanted.itemsize != stored.itemsize:
        return (f"{stored.name} (up to {np.iinfo(stored).max}), and the normalisation of model {card.name!r} was "
                f"made for {wanted.name} values (up to {np.iinfo(wanted).max}): if these values were rescaled (an "
                "8-bit export of a 16-bit image), its labels are meaningless")
    return None
