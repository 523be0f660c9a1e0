"""Validation during training: per-class Dice of the network on images it does not train on.

Each validation region is segmented as inference would segment it: MONAI's
sliding window with the card's ROI, overlap and blending, blending what
``segment`` blends (probabilities, or raw outputs where the card's
``blend_outputs`` says so) averaged over the card's ``flip_tta`` mirrors, under
the same precision as training.  Scores come from one additive confusion matrix over
every region (``segmentation.metrics``), ignore pixels skipped, so a large
region and a small one weigh by their pixels.  A region too large to hold in
memory (more than :data:`IN_MEMORY_PIXELS`) is represented by a fixed,
seeded set of ROI-sized patches instead, the same set at every validation so
scores stay comparable from step to step; the provenance says so.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from segmentation.card import ModelCard
from segmentation.metrics import confusion_matrix, dice_from_confusion, label_range_problem, mean_dice
from segmentation.normalize import Normalizer, resolve, statistics_for, zero_invalid, zero_non_finite
from storage.classes import background_value
from storage.errors import InvalidInputError

if TYPE_CHECKING:
    from segmentation.training import TrainingSample

IN_MEMORY_PIXELS = 64 << 20  # a region up to this many pixels (voxels) is inferred whole
PATCH_PIXELS = 16 << 20  # about this many pixels of seeded patches stand for a larger region
MIN_PATCHES, MAX_PATCHES = 8, 256


@dataclass
class ValidationScore:
    """Dice per class value (NaN for a class absent from truth and prediction) over the pixels counted."""

    dice: dict[int, float]
    pixels: int
    background: int | None = 0  # the class left out of the mean (storage.classes.background_value); None: none

    @property
    def mean_foreground(self) -> float:
        """Mean Dice over the classes that are not background: all of them when no class is named background."""
        return mean_dice(self.dice, exclude=() if self.background is None else (self.background,))

    @property
    def score(self) -> float:
        """What the best checkpoint maximises: mean foreground Dice; 1 when no foreground exists or is found."""
        value = self.mean_foreground
        return 1.0 if math.isnan(value) else value


@dataclass
class _Region:
    sample: "TrainingSample"
    normalizer: Normalizer
    boxes: list[tuple[slice, ...]]  # the whole region, or the seeded patches standing for it
    method: str


def _patches(spatial: tuple[int, ...], roi: Sequence[int], rng: np.random.Generator) -> list[tuple[slice, ...]]:
    size = [min(r, s) for r, s in zip(roi, spatial)]
    count = int(np.clip(math.ceil(PATCH_PIXELS / math.prod(size)), MIN_PATCHES, MAX_PATCHES))
    boxes = []
    for _ in range(count):
        origin = [int(rng.integers(0, s - p + 1)) for s, p in zip(spatial, size)]
        boxes.append(tuple(slice(o, o + p) for o, p in zip(origin, size)))
    return boxes


class Validator:
    """The validation regions of one training run, prepared once and scored at every validation."""

    def __init__(self, card: ModelCard, samples: Sequence["TrainingSample"], *, seed: int,
                 in_memory_pixels: int = IN_MEMORY_PIXELS) -> None:
        self.card = card
        rng = np.random.default_rng([seed, 7919])  # its own stream: validating never moves training's RNG
        self.regions: list[_Region] = []
        for sample in samples:
            spatial = tuple(int(s) for s in sample.labels.shape)
            stats = sample.stats if sample.stats is not None else statistics_for(card.input.normalization,
                                                                                  sample.image)
            normalizer = resolve(card.input.normalization, card.input.channels, stats)
            if math.prod(spatial) <= in_memory_pixels:
                boxes, method = [tuple(slice(0, s) for s in spatial)], "sliding_window"
            else:
                boxes, method = _patches(spatial, card.inference.roi, rng), "seeded_patches"
            self.regions.append(_Region(sample, normalizer, boxes, method))

    def describe(self) -> list[dict[str, Any]]:
        """Per region: its shape, how it is scored and how many pixels that reads."""
        out = []
        for r in self.regions:
            entry: dict[str, Any] = {"shape": [int(s) for s in r.sample.labels.shape], "method": r.method}
            if r.method == "seeded_patches":
                entry["patches"] = len(r.boxes)
                entry["patch"] = [b.stop - b.start for b in r.boxes[0]]
            entry["pixels"] = int(sum(math.prod(b.stop - b.start for b in box) for box in r.boxes))
            out.append(entry)
        return out

    @torch.no_grad()
    def __call__(self, module: nn.Module, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> ValidationScore:
        """Score ``module`` (left in the mode it came in) on every region."""
        from monai.inferers import sliding_window_inference

        inf = self.card.inference
        was_training = module.training
        module.eval()

        axes = [a + 2 for a in inf.flip_tta]  # as segment mirrors: every non-empty subset of the card's axes
        flips = [dims for k in range(1, len(axes) + 1) for dims in itertools.combinations(axes, k)]

        def run(x: torch.Tensor) -> torch.Tensor:
            with autocast if autocast is not None else contextlib.nullcontext():  # training's precision
                out = module(x.contiguous(memory_format=memory_format))
            if isinstance(out, (tuple, list)):  # deep-supervision nets: the first head is the output
                out = out[0]
            return out.float()  # blended in float32, as inference blends

        def predictor(x: torch.Tensor) -> torch.Tensor:
            """What segment blends: the card's blend_outputs, averaged over its flips (the validation scores
            had blended raw outputs whatever the card said: 12 of 4096 pixels from what segment labels)."""
            outputs = [run(x)] + [torch.flip(run(torch.flip(x, dims)), dims) for dims in flips]
            if inf.blend_outputs == "probabilities":
                outputs = [torch.softmax(o, dim=1) for o in outputs]
            return torch.stack(outputs).mean(0) if len(outputs) > 1 else outputs[0]

        n = self.card.num_classes
        matrix = np.zeros((n, n), np.int64)
        try:
            for region in self.regions:
                ignore = region.sample.ignore_index
                for box in region.boxes:
                    image = zero_non_finite(region.normalizer(np.asarray(region.sample.image[(slice(None),) + box])))
                    zero_invalid(image, region.sample.valid, box)
                    truth = np.asarray(region.sample.labels[box])
                    blended = sliding_window_inference(
                        torch.from_numpy(image)[None], list(inf.roi), inf.batch_size, predictor,
                        overlap=inf.overlap, mode=inf.blend, sigma_scale=inf.sigma_scale,
                        sw_device=device, device=torch.device("cpu"))
                    pred = blended[0].argmax(0).numpy()
                    if problem := label_range_problem(truth, n, ignore):
                        raise InvalidInputError(region.sample.name, f"validation part {problem}")
                    matrix += confusion_matrix(pred, truth, n, ignore)
        finally:
            module.train(was_training)
        return ValidationScore(dice_from_confusion(matrix), int(matrix.sum()),
                               background_value({c.value: c.name for c in self.card.classes}))
