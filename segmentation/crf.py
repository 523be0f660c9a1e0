"""DeepLab-style CRF post-processing, truncated so that it runs chunk by chunk.

DeepLab refines a network's class probabilities with the fully connected CRF
of Krähenbühl & Koltun: mean-field inference with a Potts pairwise term made
of two Gaussian kernels,

    k(i, j) = w_bilateral · exp(-|p_i - p_j|² / 2θα² - |I_i - I_j|² / 2θβ²)   (appearance)
            + w_spatial   · exp(-|p_i - p_j|² / 2θγ²)                          (smoothness)

and each iteration ``Q_i(l) ∝ exp(-U_i(l) - Σ_l' μ(l, l') Σ_{j≠i} k(i, j) Q_j(l'))``
with the unary ``U = -log p``.  *Fully* connected means every pixel talks to
every other one, which no out-of-core scheme can honour: one iteration would
need the whole image.  So, as ConvCRF does, the kernel is truncated to a box
of ``radius`` pixels (voxels) per axis around each pixel.  Then one iteration
at a pixel reads only pixels within ``radius``, ``iterations`` iterations read
only pixels within ``iterations · radius``, and a chunk grown by that halo
yields exactly the whole-image result in its interior (:func:`crf_halo`,
:func:`crf_dask`).

Choices, and why:

- Both kernels share the one box and one loop over the box's offsets.  The
  spatial kernel is a single number per offset, so it costs one addition per
  pixel and offset on top of the bilateral kernel, and both kernels truncate
  alike, so they share one halo.  (A separable convolution would be cheaper
  for the spatial term alone; with the bilateral loop already paid for, it
  would not be.)
- Each unordered pair of pixels is visited once: k(i, j) = k(j, i), so the
  weight of offset ``o`` serves both directions.  That halves the ``exp``
  calls, the dominant cost after the message accumulation.
- Kernels are *not* normalised (no division by Σ k).  A pixel outside the
  image, or masked as no-data, simply contributes nothing to the sums;
  the same pixel therefore gets the same message whether it sits at a chunk
  edge (inside the halo) or in the middle of the image, which is what makes
  the chunked result equal the whole-image one.  A normalised kernel would
  also be exact (the normaliser is local too) but would make border pixels
  weigh their few neighbours more, and Krähenbühl & Koltun's own updates are
  unnormalised sums.
- Kernel weights are either cached across iterations (one map per half
  offset, when they fit in ``cache_bytes``) or recomputed each iteration, so
  memory stays a bounded multiple of the block, never of the image.
- Pixels outside ``valid_mask`` neither send nor receive messages and come
  back exactly as given (the stitched probabilities are zero there).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial

import dask.array as da
import numpy as np
import torch
from dask.base import tokenize
from pydantic import BaseModel, ConfigDict, Field, field_validator

PerAxis = float | tuple[float, ...]


class CRFParams(BaseModel):
    """Parameters of the truncated dense CRF (symbols as in Krähenbühl & Koltun, 2011).

    Distances are in pixels (voxels) of the array as given; a scalar applies
    to every spatial axis, a tuple gives one value per axis (for anisotropic
    voxels, e.g. ``theta_alpha=(2.0, 3.0, 3.0)`` for 1.5 mm slices of 1 mm
    pixels).  Intensities are in the units of the *normalised* image the
    model sees, so ``theta_beta`` carries over between images of one model.

    Defaults were picked on the demo models with held-out inputs of seed 7
    (``benchmarks/crf_effect.py`` reports seed 202, which played no part):
    a small box (radius 3, θα 3) that keeps thin structures such as 4-6 px
    roads, and θβ = 0.35, where both tasks sit on a plateau; the lesion task
    lost Dice from θβ ≈ 0.7 upwards (intensity edges stop stopping messages).
    The bilateral kernel carries the gain; smoothness alone did little.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(5, ge=0, description="mean-field iterations; 0 returns the probabilities unchanged")
    radius: int | tuple[int, ...] = Field(3, description="truncation: the kernels reach this many pixels per axis")
    w_spatial: float = Field(1.0, ge=0.0, description="w2: weight of the smoothness kernel")
    theta_gamma: PerAxis = Field(1.0, description="θγ: smoothness kernel's spatial std, pixels")
    w_bilateral: float = Field(2.0, ge=0.0, description="w1: weight of the appearance (bilateral) kernel")
    theta_alpha: PerAxis = Field(3.0, description="θα: appearance kernel's spatial std, pixels")
    theta_beta: float = Field(0.35, gt=0.0, description="θβ: appearance kernel's intensity std, normalised units")
    compatibility: tuple[tuple[float, ...], ...] | None = Field(
        None, description="μ(l, l'): None is Potts ([l ≠ l']); else a classes × classes matrix")
    prob_floor: float = Field(1e-6, gt=0.0, lt=1.0, description="probabilities are clipped here before -log")

    @field_validator("radius")
    @classmethod
    def _radius_positive(cls, v: int | tuple[int, ...]) -> int | tuple[int, ...]:
        if any(r < 1 for r in (v if isinstance(v, tuple) else (v,))):
            raise ValueError("radius must be at least 1 pixel on every axis")
        return v

    @field_validator("theta_gamma", "theta_alpha")
    @classmethod
    def _sigma_positive(cls, v: PerAxis) -> PerAxis:
        if any(s <= 0 for s in (v if isinstance(v, tuple) else (v,))):
            raise ValueError("kernel widths must be positive")
        return v

    def per_axis(self, name: str, ndim: int) -> tuple[float, ...]:
        """``radius``, ``theta_gamma`` or ``theta_alpha`` spelled out for ``ndim`` spatial axes."""
        value = getattr(self, name)
        if isinstance(value, tuple):
            if len(value) != ndim:
                raise ValueError(f"{name} has {len(value)} values for {ndim} spatial axes")
            return value
        return (value,) * ndim


def crf_halo(params: CRFParams, ndim: int) -> tuple[int, ...]:
    """Pixels per spatial axis a chunk needs around it for an exact result: iterations × radius.

    Iteration t at a pixel reads Q^(t-1) and the image within ``radius`` of
    it, and Q^0 is pixel-local, so Q^t depends on nothing farther than
    t · radius; a block grown by ``iterations · radius`` therefore computes
    its core exactly as the whole image would.
    """
    return tuple(int(r) * params.iterations for r in params.per_axis("radius", ndim))


def _offsets(radius: Sequence[int]) -> list[tuple[int, ...]]:
    """One offset of every ± pair in the box (the first non-zero component positive)."""
    out = []
    for o in itertools.product(*(range(-r, r + 1) for r in radius)):
        first = next((v for v in o if v), 0)
        if first > 0:
            out.append(o)
    return out


def _pair_slices(offset: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices (a, b) such that a[k] and b[k] = a[k] + offset are the pixel pairs inside ``shape``."""
    sa, sb = [], []
    for o, n in zip(offset, shape):
        if abs(o) >= n:
            return None
        sa.append(slice(max(0, -o), n - max(0, o)))
        sb.append(slice(max(0, o), n - max(0, -o)))
    return tuple(sa), tuple(sb)


def mean_field(probs: np.ndarray, image: np.ndarray, params: CRFParams,
               valid_mask: np.ndarray | None = None, *, cache_bytes: int = 256 << 20) -> np.ndarray:
    """Refine (C, *spatial) class probabilities by truncated dense-CRF mean field.

    ``image`` is (Cin, *spatial), normalised as the model saw it.  Returns
    float32 probabilities of the same shape, summing to 1 at every valid
    pixel; pixels where ``valid_mask`` is False are returned as given.
    Memory is a few copies of the block, plus up to ``cache_bytes`` of kernel
    weights kept across iterations (recomputed when they would not fit;
    the result is the same either way).
    """
    probs = np.asarray(probs)
    image = np.asarray(image)
    if not np.isfinite(image).all():  # NaN or inf pixels (nodata): 0, as the network saw them.  A NaN in the
        # bilateral kernel's weights had made every valid pixel within the halo NaN, then labelled class 0
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    spatial = probs.shape[1:]
    ndim = len(spatial)
    if ndim not in (2, 3):
        raise ValueError(f"probs must be (C, *spatial) with 2 or 3 spatial axes, got {probs.shape}")
    if image.shape[1:] != spatial:
        raise ValueError(f"image {image.shape} and probabilities {probs.shape} differ in spatial shape")
    if valid_mask is not None and tuple(valid_mask.shape) != spatial:
        raise ValueError(f"mask {valid_mask.shape} differs from the spatial shape {spatial}")
    if params.iterations == 0:
        return probs.astype(np.float32, copy=True)
    num_classes = probs.shape[0]
    compat = None
    if params.compatibility is not None:
        compat = torch.tensor(params.compatibility, dtype=torch.float32)
        if compat.shape != (num_classes, num_classes):
            raise ValueError(f"compatibility is {tuple(compat.shape)}, need {num_classes} × {num_classes}")

    radius = tuple(int(r) for r in params.per_axis("radius", ndim))
    gamma = params.per_axis("theta_gamma", ndim)
    alpha = params.per_axis("theta_alpha", ndim)
    w1, w2 = float(params.w_bilateral), float(params.w_spatial)

    p = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    logp = p.clamp(min=params.prob_floor).log_()  # -U
    q = torch.softmax(logp, 0)
    valid = None
    if valid_mask is not None:
        valid = torch.from_numpy(np.ascontiguousarray(valid_mask, dtype=bool))
        if not bool(valid.any()):
            return probs.astype(np.float32, copy=True)
        if bool(valid.all()):
            valid = None
    vf = None if valid is None else valid.to(torch.float32)
    feats = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) / float(params.theta_beta)

    # Offsets with their constant parts: spatial kernel value and bilateral position term.
    pairs = []
    for o in _offsets(radius):
        sl = _pair_slices(o, spatial)
        if sl is None:
            continue
        g = w2 * math.exp(-0.5 * sum((v / s) ** 2 for v, s in zip(o, gamma)))
        a = 0.5 * sum((v / s) ** 2 for v, s in zip(o, alpha))
        pairs.append((sl, g, a))

    def weight(sa: tuple[slice, ...], sb: tuple[slice, ...], g: float, a: float) -> torch.Tensor | float:
        if w1 == 0.0:
            return g
        d = feats[(slice(None),) + sa] - feats[(slice(None),) + sb]
        d = d.square_().sum(0)
        return d.mul_(-0.5).sub_(a).exp_().mul_(w1).add_(g)

    per_map = 4 * math.prod(spatial)
    cache = None
    if w1 != 0.0 and len(pairs) * per_map <= cache_bytes:
        cache = [weight(sa, sb, g, a) for (sa, sb), g, a in pairs]

    for _ in range(params.iterations):
        qv = q if vf is None else q * vf  # masked pixels send nothing
        msg = torch.zeros_like(q)
        for n, ((sa, sb), g, a) in enumerate(pairs):
            k = cache[n] if cache is not None else weight(sa, sb, g, a)
            ia, ib = (slice(None),) + sa, (slice(None),) + sb
            if isinstance(k, float):
                msg[ia].add_(qv[ib], alpha=k)
                msg[ib].add_(qv[ia], alpha=k)
            else:
                msg[ia].addcmul_(qv[ib], k.unsqueeze(0))
                msg[ib].addcmul_(qv[ia], k.unsqueeze(0))
        if compat is None:
            # Potts: Σ_l'≠l m(l') = Σ m - m(l); the Σ m term is the same for every l and cancels.
            logits = logp + msg
        else:
            logits = logp - torch.tensordot(compat, msg, dims=([1], [0]))
        q = torch.softmax(logits, 0)

    out = q.numpy()
    if valid is not None:
        out[:, ~valid.numpy()] = probs.astype(np.float32, copy=False)[:, ~valid.numpy()]
    return out


def _crf_block(probs: np.ndarray, image: np.ndarray, mask: np.ndarray | None, *, params: CRFParams,
               normalizer: Callable[[np.ndarray], np.ndarray] | None, cache_bytes: int) -> np.ndarray:
    if normalizer is not None:
        image = normalizer(image)
    return mean_field(probs, image, params, mask, cache_bytes=cache_bytes)


def crf_dask(probs: da.Array, image: da.Array, params: CRFParams, mask: da.Array | None = None, *,
             normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
             cache_bytes: int = 256 << 20) -> da.Array:
    """Lazy, chunk-wise :func:`mean_field` over (C, *spatial) probabilities; equal to the whole-image result.

    ``probs`` is e.g. ``StitchPlan.probabilities()``; ``image`` the (Cin,
    *spatial) image, either already normalised or raw with the model's
    ``normalizer`` (then normalised block by block inside the task, never
    materialised whole); ``mask`` (*spatial) bool marks valid pixels.

    Each output chunk is computed from the chunk plus :func:`crf_halo` pixels
    of its neighbours (none past the image's edges), via Dask's overlap.
    Where a chunk is thinner than the halo, Dask merges it with a neighbour
    first (the overlap then reaches one neighbour only), and an axis shorter
    than the halo is taken whole; the result is rechunked back to ``probs``'
    chunks.  Memory per task: (chunk + 2·halo)^d × (C + Cin) floats, plus
    the kernel cache.
    """
    # the shapes first: wrapping a numpy image in the probabilities' chunks had failed inside dask instead
    ndim = probs.ndim - 1
    if ndim not in (2, 3) or image.ndim != probs.ndim:
        raise ValueError(f"need probs (C, *spatial) and image (Cin, *spatial), got {probs.shape} and {image.shape}")
    if tuple(image.shape[1:]) != tuple(probs.shape[1:]):
        raise ValueError(f"image {image.shape} and probabilities {probs.shape} differ in spatial shape")
    if mask is not None and tuple(mask.shape) != tuple(probs.shape[1:]):
        raise ValueError(f"mask {mask.shape} differs from the spatial shape {probs.shape[1:]}")
    channels = getattr(normalizer, "shift", None)
    if channels is not None and len(channels) != image.shape[0]:  # else numpy's broadcast error at compute
        raise ValueError(f"image has {image.shape[0]} channels, the normalizer {len(channels)}")
    # numpy arrays as ``predict`` takes them: the image as one chunk per probability chunk, the mask likewise
    probs = probs if isinstance(probs, da.Array) else da.from_array(np.asarray(probs), chunks=probs.shape)
    if not isinstance(image, da.Array):
        image = da.from_array(np.asarray(image), chunks=(image.shape[0], *probs.chunks[1:]))
    if mask is not None and not isinstance(mask, da.Array):
        mask = da.from_array(np.asarray(mask), chunks=probs.chunks[1:])
    if params.iterations == 0:
        return probs.astype(np.float32)
    original = probs.chunks
    spatial = probs.shape[1:]
    halo = list(crf_halo(params, ndim))
    chunks = list(probs.chunks[1:])
    for ax, (h, n) in enumerate(zip(halo, spatial)):
        if h >= n or len(chunks[ax]) == 1:  # the whole axis is one block: nothing to share
            chunks[ax], halo[ax] = (n,), 0
    p = probs.astype(np.float32).rechunk((probs.shape[0],) + tuple(chunks))
    img = image.rechunk((image.shape[0],) + tuple(chunks))
    depth = {0: 0, **{ax + 1: h for ax, h in enumerate(halo)}}
    pg = da.overlap.overlap(p, depth=depth, boundary="none", allow_rechunk=True)
    ig = da.overlap.overlap(img, depth=depth, boundary="none", allow_rechunk=True)
    sp = "".join("xyz"[:ndim])
    fn = partial(_crf_block, params=params, normalizer=normalizer, cache_bytes=cache_bytes)
    token = tokenize(p.name, img.name, None if mask is None else mask.name, params.model_dump_json(),
                     normalizer, cache_bytes)
    args: list = [pg, "c" + sp, ig, "k" + sp]
    if mask is not None:
        m = mask.astype(bool).rechunk(tuple(chunks))
        mg = da.overlap.overlap(m, depth={ax: h for ax, h in enumerate(halo)}, boundary="none",
                                allow_rechunk=True)
        args += [mg, sp]
    else:
        args += [None, None]
    out = da.blockwise(fn, "c" + sp, *args, concatenate=True, dtype=np.float32,
                       name=f"segflow-crf-{token}", meta=np.empty((0,) * probs.ndim, np.float32))
    out = da.overlap.trim_internal(out, depth, boundary="none")
    return out if out.chunks == original else out.rechunk(original)


__all__ = ["CRFParams", "crf_dask", "crf_halo", "mean_field"]
