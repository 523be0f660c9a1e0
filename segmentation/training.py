"""The engine behind ``segflow train``: arrays in, a trained network and its provenance out.

No file I/O happens here (the CLI reads inputs into numpy/zarr arrays and
writes the model directory), so the same engine trains from a GeoTIFF, a
NIfTI or a zarr store. Inputs are only ever read patch by patch, and pixels
go through :func:`segmentation.normalize.resolve`, the very normaliser
inference uses, so a model sees the same numbers in training and in use.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.card import ModelCard
from segmentation.modeldir import LoadedModel, build_module, save_model
from segmentation.normalize import Normalizer, resolve, statistics_for
from storage.errors import ConfigError, IncompatibleInputError, InvalidInputError

Precision = Literal["exact", "fast"]

# Coordinates kept per class for foreground-centred sampling: plenty for
# variety, bounded so indexing a huge label map costs bounded memory.
_INDEX_CAP = 20_000
_BLOCK_ELEMENTS = 1 << 22  # labels are scanned in slabs of about this many pixels
_IGNORE = -1  # what every sample's ignore_index (and padding) becomes inside a batch


@dataclass
class TrainingSample:
    """One training image and its label map, as array-likes sliced patch by patch.

    ``image`` is (C, *spatial) and ``labels`` (*spatial), numpy or zarr (or
    anything sliceable with a ``shape``). Label pixels equal to
    ``ignore_index`` (e.g. 255 where the image has no data) add no loss.
    ``stats`` = (mean, std) per channel for ``image_zscore`` cards; if None
    they are computed over the whole image, as inference does for an image
    without a mask.
    """

    image: Any
    labels: Any
    stats: tuple[list[float], list[float]] | None = None
    ignore_index: int | None = 255


@dataclass
class TrainingResult:
    module: nn.Module  # eval mode, on the CPU, float32
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    sample: TrainingSample
    normalizer: Normalizer
    spatial: tuple[int, ...]
    # class value -> (n, ndim) int array of pixel coordinates (a bounded random subset)
    where: dict[int, np.ndarray]


def _class_index(labels: Any, num_classes: int, ignore: int | None,
                 rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Random coordinates of each class, found by scanning the labels in slabs.

    Scanning slab by slab keeps memory bounded for zarr-backed label maps;
    each slab contributes in proportion to its pixel count, so the kept
    coordinates are a near-uniform sample of the class.
    """
    shape = tuple(labels.shape)
    row = int(np.prod(shape[1:], dtype=np.int64)) or 1
    step = max(1, _BLOCK_ELEMENTS // row)
    chunks = getattr(labels, "chunks", None)
    if chunks is not None and isinstance(chunks[0], int):
        step = max(chunks[0], (step // chunks[0]) * chunks[0])
    parts: dict[int, list[np.ndarray]] = {}
    weights: dict[int, list[np.ndarray]] = {}
    for start in range(0, shape[0], step):
        block = np.asarray(labels[start:start + step])
        flat = block.ravel()
        counted = flat if ignore is None else flat[flat != ignore]
        if counted.size and (counted.min() < 0 or counted.max() >= num_classes):
            raise InvalidInputError(None, f"labels hold values outside 0..{num_classes - 1}"
                                    + ("" if ignore is None else f" and the ignore value {ignore}"))
        for c in np.unique(counted):
            idx = np.flatnonzero(flat == c)
            keep = idx if idx.size <= _INDEX_CAP else rng.choice(idx, _INDEX_CAP, replace=False)
            coords = np.stack(np.unravel_index(keep, block.shape), 1)
            coords[:, 0] += start
            parts.setdefault(int(c), []).append(coords)
            weights.setdefault(int(c), []).append(np.full(len(keep), idx.size / len(keep)))
    where: dict[int, np.ndarray] = {}
    for c, blocks in parts.items():
        coords, w = np.concatenate(blocks), np.concatenate(weights[c])
        if len(coords) > _INDEX_CAP:
            coords = coords[rng.choice(len(coords), _INDEX_CAP, replace=False, p=w / w.sum())]
        where[c] = coords
    return where


def _prepare(card: ModelCard, sample: TrainingSample, rng: np.random.Generator) -> _Prepared:
    image_shape, label_shape = tuple(sample.image.shape), tuple(sample.labels.shape)
    dims = card.input.spatial_dims
    if len(image_shape) != dims + 1 or image_shape[0] != card.input.channels:
        raise IncompatibleInputError(None, f"image shape {image_shape} is not "
                                           f"({card.input.channels} channels, {dims} spatial axes)")
    if label_shape != image_shape[1:]:
        raise IncompatibleInputError(None, f"labels shape {label_shape} differs from the image's "
                                           f"spatial shape {image_shape[1:]}")
    stats = sample.stats
    if stats is None:
        stats = statistics_for(card.input.normalization, sample.image)
    normalizer = resolve(card.input.normalization, card.input.channels, stats)
    where = _class_index(sample.labels, card.num_classes, sample.ignore_index, rng)
    return _Prepared(sample, normalizer, label_shape, where)


def _read_patch(prep: _Prepared, origin: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Slice one patch: normalised image, int64 labels with ignored pixels (and padding) as -1."""
    stop = [min(o + p, s) for o, p, s in zip(origin, patch, prep.spatial)]
    region = tuple(slice(o, e) for o, e in zip(origin, stop))
    image = prep.normalizer(np.asarray(prep.sample.image[(slice(None),) + region]))
    raw = np.asarray(prep.sample.labels[region])
    labels = raw.astype(np.int64)
    if prep.sample.ignore_index is not None:
        labels[raw == prep.sample.ignore_index] = _IGNORE
    short = [(0, p - (e - o)) for o, e, p in zip(origin, stop, patch)]
    if any(after for _, after in short):
        image = np.pad(image, [(0, 0)] + short)
        labels = np.pad(labels, short, constant_values=_IGNORE)
    return image, labels


def _sample_batch(preps: Sequence[_Prepared], patch: Sequence[int], batch_size: int, oversample: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random patches, a fraction centred on a pixel of a random foreground class, randomly flipped."""
    images, labels = [], []
    for _ in range(batch_size):
        prep = preps[rng.integers(len(preps))]
        fg = [c for c in prep.where if c != 0]
        high = [max(s - p, 0) for s, p in zip(prep.spatial, patch)]
        if fg and rng.random() < oversample:
            coords = prep.where[fg[rng.integers(len(fg))]]
            centre = coords[rng.integers(len(coords))]
            # jitter so the class is not always exactly at the patch centre
            origin = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, h))
                      for c, p, h in zip(centre, patch, high)]
        else:
            origin = [int(rng.integers(0, h + 1)) for h in high]
        img, lab = _read_patch(prep, origin, patch)
        for axis in range(lab.ndim):
            if rng.random() < 0.5:
                img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
        if lab.ndim == 2 and patch[0] == patch[1] and rng.random() < 0.5:
            img, lab = img.transpose(0, 2, 1), lab.T  # 2-D scenes have no preferred orientation
        images.append(np.ascontiguousarray(img))
        labels.append(np.ascontiguousarray(lab))
    return np.stack(images), np.stack(labels)


class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy where pixels labelled ``ignore`` contribute nothing.

    ``DiceCELoss(to_onehot_y=True, softmax=True)`` has no ignore index in every
    MONAI version, and masking its logits would be wrong (softmax of a zeroed
    logit is uniform, not absent). So: cross-entropy averaged over valid
    pixels; softmax first, then probabilities and one-hot truth multiplied by
    the valid mask before MONAI's Dice (batch-wise, so rare classes count).
    """

    def __init__(self, num_classes: int, ignore: int = _IGNORE) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.num_classes = num_classes
        self.ignore = ignore
        self.dice = DiceLoss(include_background=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = target != self.ignore
        safe = torch.where(valid, target, torch.zeros_like(target))
        ce = F.cross_entropy(logits, safe, reduction="none")
        ce = (ce * valid).sum() / valid.sum().clamp(min=1)
        mask = valid.unsqueeze(1).to(logits.dtype)
        onehot = F.one_hot(safe, self.num_classes).movedim(-1, 1).to(logits.dtype)
        dice = self.dice(torch.softmax(logits, 1) * mask, onehot * mask)
        return ce + dice


def _autocast(device: torch.device, precision: Precision) -> tuple[contextlib.AbstractContextManager, bool]:
    """The autocast context for this device and precision, and whether fp16 loss scaling is needed."""
    if precision == "exact":
        return contextlib.nullcontext(), False
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype == torch.float16
    return torch.autocast("cpu", dtype=torch.bfloat16), False


def _memory_format(spatial_dims: int) -> torch.memory_format:
    # Measured on this project's 2-core AMX CPU (U-Net, bf16): channels-last is
    # clearly faster for 2-D convolutions and no faster for 3-D ones.
    return torch.channels_last if spatial_dims == 2 else torch.contiguous_format


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The loss curve as at most ``points`` [step, mean loss of the interval] pairs."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[int(b), round(float(np.mean(losses[a:b])), 5)] for a, b in zip(edges[:-1], edges[1:])]


def train(card: ModelCard, samples: Sequence[TrainingSample], *, steps: int, batch_size: int,
          patch: Sequence[int] | None = None, lr: float = 2e-3, seed: int = 0,
          precision: Precision = "fast", log: Callable[[dict], None] | None = None,
          oversample: float = 0.5) -> TrainingResult:
    """Train the card's architecture from scratch on patches of ``samples``.

    AdamW with a one-cycle schedule (short budgets converge fastest with a
    warm-up then cosine decay), masked Dice + CE, random flips, and
    ``oversample`` of the patches centred on a random foreground class so rare
    classes (roads, lesions) are seen often. ``precision="fast"`` trains under
    bf16 autocast (about 3x faster than fp32 on AMX CPUs), fp32 otherwise.
    ``log`` receives {step, steps, loss, lr, seconds} about 20 times per run.
    """
    if steps < 1 or batch_size < 1:
        raise ConfigError(None, "steps and batch_size must be positive")
    if not samples:
        raise ConfigError(None, "no training samples")
    patch = tuple(int(p) for p in (patch if patch is not None else card.inference.roi))
    if len(patch) != card.input.spatial_dims:
        raise ConfigError(None, f"patch {patch} does not have {card.input.spatial_dims} axes")
    start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preps = [_prepare(card, s, rng) for s in samples]

    fmt = _memory_format(card.input.spatial_dims)
    module = build_module(card).to(device).to(memory_format=fmt)
    module.train()
    loss_fn = MaskedDiceCELoss(card.num_classes, _IGNORE)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1, div_factor=10.0, final_div_factor=100.0)
    autocast, scale = _autocast(device, precision)
    scaler = torch.amp.GradScaler("cuda") if scale else None
    every = max(1, steps // 20)
    losses: list[float] = []
    for step in range(1, steps + 1):
        x, y = _sample_batch(preps, patch, batch_size, oversample, rng)
        x = torch.from_numpy(x).to(device).contiguous(memory_format=fmt)
        y = torch.from_numpy(y).to(device)
        with autocast:
            logits = module(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % every == 0 or step == steps):
            log({"step": step, "steps": steps, "loss": losses[-1], "lr": schedule.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - start, 2)})
        if not math.isfinite(losses[-1]):
            raise ConfigError(None, f"training diverged at step {step} (loss {losses[-1]}); try a lower lr")

    module = module.to("cpu").float().to(memory_format=torch.contiguous_format).eval()
    tail = losses[-max(1, steps // 10):]
    import monai

    provenance = {
        "steps": steps, "batch_size": batch_size, "patch": list(patch), "lr": lr, "seed": seed,
        "precision": precision, "device": device.type, "threads": torch.get_num_threads(),
        "optimizer": "AdamW(weight_decay=1e-4)", "schedule": "one-cycle",
        "loss": "dice+cross-entropy, ignore pixels masked", "oversample": oversample,
        "ignore_index": sorted({s.ignore_index for s in samples if s.ignore_index is not None}),
        "final_loss": round(float(np.mean(tail)), 5), "loss_curve": _curve(losses),
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu_start, 2), "num_samples": len(samples),
        "sample_shapes": [list(s.image.shape) for s in samples],
        "torch_version": torch.__version__, "monai_version": monai.__version__,
    }
    return TrainingResult(module=module, provenance=provenance)


def save_trained(path: str | PathLike[str], card: ModelCard, result: TrainingResult) -> LoadedModel:
    """Write a model directory whose card carries the training provenance of its weights."""
    return save_model(path, card.model_copy(update={"training": result.provenance}), result.module)
