"""Pixel normalisation shared by training and inference, so both see the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise a (C, *spatial) block to float32, into ``out`` when given (no temporary copy)."""
        if out is None:
            out = np.empty(x.shape, dtype=np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        # cast and shift in one pass; the arithmetic is float32 whatever the stored dtype
        np.subtract(x, np.asarray(self.shift, dtype=np.float32).reshape(shape), out=out, dtype=np.float32)
        out *= np.asarray(self.factor, dtype=np.float32).reshape(shape)
        if self.clip is not None:
            np.clip(out, self.clip[0], self.clip[1], out=out)
        return out


def _per_channel(values: list[float] | None, channels: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) != channels:
        raise ValueError(f"normalisation lists {len(values)} values for {channels} channels")
    return tuple(float(v) for v in values)


def resolve(norm: Normalization, channels: int,
            stats: tuple[list[float], list[float]] | None = None) -> Normalizer:
    """Turn a card's normalisation into numbers; ``stats`` = (mean, std) for image_zscore."""
    if norm.mode == "none":
        return Normalizer((0.0,) * channels, (1.0,) * channels, norm.clip)
    if norm.mode == "scale":
        return Normalizer(_per_channel(norm.offset, channels, 0.0),
                          _per_channel(norm.scale, channels, 1.0), norm.clip)
    if norm.mode == "zscore":
        std = _per_channel(norm.std, channels, 1.0)
        return Normalizer(_per_channel(norm.mean, channels, 0.0), tuple(1.0 / s for s in std), norm.clip)
    if stats is None:
        raise ValueError("image_zscore normalisation needs the image's statistics")
    mean, std = stats
    return Normalizer(tuple(float(m) for m in mean),
                      tuple(1.0 / max(float(s), 1e-6) for s in std), norm.clip)


def image_statistics(image, mask=None) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Per-channel mean and std over valid pixels, as a chunked dask reduction (out-of-core).

    ``image`` is a (C, *spatial) numpy, zarr or dask array; ``mask`` is a
    (*spatial) boolean array or None.
    """
    import dask.array as da

    img = image if isinstance(image, da.Array) else da.from_array(image, chunks=(1,) + tuple(
        getattr(image, "chunks", image.shape)[1:]))
    x = img.astype(np.float64)
    if mask is not None:
        m = mask if isinstance(mask, da.Array) else da.from_array(mask, chunks=img.chunksize[1:])
        m = m.rechunk(img.chunks[1:]).astype(np.float64)
        n = m.sum()
        s1 = (x * m).sum(axis=tuple(range(1, x.ndim)))
        s2 = (x * x * m).sum(axis=tuple(range(1, x.ndim)))
    else:
        n = float(np.prod(img.shape[1:]))
        s1 = x.sum(axis=tuple(range(1, x.ndim)))
        s2 = (x * x).sum(axis=tuple(range(1, x.ndim)))
    n, s1, s2 = da.compute(n, s1, s2) if isinstance(n, da.Array) else (n, *da.compute(s1, s2))
    n = max(float(n), 1.0)
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return [float(v) for v in mean], [float(v) for v in np.sqrt(var)]
