"""Segment in the model's space, write on the input's grid.

A network was trained at one voxel spacing and orientation; scans arrive in
their scanner's.  The image is taken into model space first (an exact axis
permutation and flip, then linear resampling, as MONAI's ``Orientationd`` and
``Spacingd`` do: :mod:`storage.resample`), the sliding window runs there with
the usual exact stitching (:class:`segmentation.stitching.StitchPlan`), and the
stitched probabilities come back onto the input's grid chunk by chunk, where
the argmax is taken (``invert="probabilities"``, nnU-Net's and most bundles'
order), or come back by nearest neighbour (``invert="labels"``: the argmax of
the nearest model voxel, as ``Invertd`` with ``nearest_interp=True``).  Each
input-grid chunk is a pointwise function of a bounded model-space region, so
the labels do not depend on either chunking, and memory stays bounded by
chunk and window sizes.  Where only labels are wanted (no probabilities
output), they come from :func:`storage.resample.argmax_to_input`: the same
labels, voxel for voxel, with the probabilities interpolated only near label
boundaries (the argmax of a blend of vectors that all share one clear winner
is that winner), and, for ``invert="labels"``, the argmax taken on the
coarser model grid before the nearest-neighbour gather.
:class:`ModelSpacePlan` offers the pipeline the same interface as a
:class:`StitchPlan` whose output grid is the input's.

Rasters take the same plan with another way back (:class:`WayBack`): a
:class:`storage.wayback.RasterWayBack` warps the probabilities as GDAL does
(bilinear where the input is finer than the model, average where coarser; per
axis weights in one CRS, :mod:`storage.separable`) and takes the argmax per
input chunk, interpolating only near label boundaries when no probabilities
are written; a volume's :class:`storage.grids.GridMapping`
is wrapped in :class:`VolumeWayBack`, which calls exactly what it always did.
The input grid's valid mask (rasters) marks the labels written as nodata.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Literal, Protocol, Sequence

import dask.array as da
import numpy as np
from dask.delayed import Delayed

from segmentation.chunkwrites import chunk_boxes, chunk_writes, draining, group_writes, label_dtype, label_nodata
from segmentation.stitching import StitchPlan
from storage.grids import GridMapping
from storage.resample import argmax_to_input, model_region, to_input

Invert = Literal["probabilities", "labels"]


class WayBack(Protocol):
    """How model-grid probabilities reach the input's grid; ``mode`` is "bilinear" (interpolate, with the
    mapping's own kernel) or "nearest"."""

    # whether input pixels no valid model pixel reaches come back with no probabilities (all 0): nodata labels
    leaves_unreached: bool

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def probabilities(self, probs: da.Array, chunks: Sequence[int], mode: str) -> da.Array: ...

    def labels(self, probs: da.Array, chunks: Sequence[int], mode: str, dtype: Any,
               empty: int = 0, grouped: bool = False) -> da.Array: ...

    def region(self, box: Sequence[tuple[int, int]], mode: str) -> tuple[tuple[int, int], ...]: ...


class VolumeWayBack:
    """A volume's way back: :mod:`storage.resample`'s inverse of MONAI's Orientationd + Spacingd."""

    leaves_unreached = False  # a volume's labels are nodata only where its mask says so

    def __init__(self, mapping: GridMapping) -> None:
        self.mapping = mapping

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.mapping.input_shape)

    def probabilities(self, probs: da.Array, chunks: Sequence[int], mode: str) -> da.Array:
        return to_input(probs, self.mapping, chunks=list(chunks), mode=mode)  # type: ignore[arg-type]

    def labels(self, probs: da.Array, chunks: Sequence[int], mode: str, dtype: Any, empty: int = 0,
               grouped: bool = False) -> da.Array:
        """``empty`` is not used: a volume's labels are nodata only where its mask says so, as they always were
        (its full path, ``to_input`` then the argmax, would give class 0 where it interpolates nothing);
        nor is ``grouped``: the chunks are always ``chunks``."""
        return argmax_to_input(probs, self.mapping, chunks=list(chunks), mode=mode,  # type: ignore[arg-type]
                               dtype=dtype)

    def region(self, box: Sequence[tuple[int, int]], mode: str) -> tuple[tuple[int, int], ...]:
        return model_region(self.mapping, box, mode)  # type: ignore[arg-type]


class ModelSpacePlan:
    """A stitched plan on the model's grid whose writes land on the input's grid.

    ``mapping`` is a volume's :class:`GridMapping` or any :class:`WayBack`;
    ``mask`` the input grid's valid mask (None: every pixel valid).
    """

    def __init__(self, stitch: StitchPlan, mapping: GridMapping | WayBack, *, invert: Invert = "probabilities",
                 chunks: Sequence[int], mask: da.Array | None = None) -> None:
        self.stitch = stitch
        self.mapping = mapping
        self.way_back: WayBack = VolumeWayBack(mapping) if isinstance(mapping, GridMapping) else mapping
        self.invert = invert
        self.num_classes = stitch.num_classes
        self.output_shape = tuple(self.way_back.input_shape)
        self.chunks = tuple(da.core.normalize_chunks(tuple(chunks), self.output_shape))
        self._boxes = chunk_boxes(self.chunks)
        self._mask_blocks = None if mask is None else np.asarray(
            da.asarray(mask).rechunk(self.chunks).to_delayed(), dtype=object)

    @property
    def grid(self) -> Any:  # the window grid (model space): its roi and shape are what the run report names
        return self.stitch.grid

    @property
    def num_windows(self) -> int:
        return self.stitch.num_windows

    @property
    def chunk_indexes(self) -> list[tuple[int, ...]]:
        return list(self._boxes)

    @property
    def _mode(self) -> str:
        return "bilinear" if self.invert == "probabilities" else "nearest"

    def on_input_grid(self, model_probabilities: da.Array | None = None) -> da.Array:
        """(classes, *input grid) probabilities, from the stitched (or refined) model-space ones."""
        probs = self.stitch.probabilities() if model_probabilities is None else model_probabilities
        back = self.way_back.probabilities(probs, [c[0] for c in self.chunks], self._mode)
        assert back.chunks[1:] == self.chunks, (back.chunks, self.chunks)
        return back

    def labels_on_input_grid(self, model_probabilities: da.Array | None = None, grouped: bool = False) -> da.Array:
        """(*input grid) labels, equal to ``labels_of`` of :meth:`on_input_grid` without building all of it;
        ``grouped``: chunked in blocks of the plan's chunks where the way back groups them."""
        probs = self.stitch.probabilities() if model_probabilities is None else model_probabilities
        labels = self.way_back.labels(probs, [c[0] for c in self.chunks], self._mode, label_dtype(self.num_classes),
                                      empty=label_nodata(self.num_classes), grouped=grouped)
        assert grouped or labels.chunks == self.chunks, (labels.chunks, self.chunks)
        return labels

    def probabilities(self) -> da.Array:
        return self.on_input_grid()

    def labels(self) -> da.Array:
        return self.labels_on_input_grid()

    def writes(self, labels_target: Any, probabilities_target: Any = None, probabilities_dtype: str = "float32",
               probabilities: da.Array | None = None, *, only: Sequence[tuple[int, ...]] | None = None,
               on_written: Any = None) -> list[Delayed]:
        """One write per input-grid chunk; ``probabilities`` are refined model-space ones (the CRF's).

        Without a probabilities target only labels are needed: they come from
        the boundary-only interpolation and are written as they are.
        """
        name = f"segflow-write-{self.stitch.token}-{self.invert}-{'crf-' if probabilities is not None else ''}"
        with draining():  # the way back frees the stitched chunks it reads: it runs as soon as it can
            if probabilities_target is None:
                labels = self.labels_on_input_grid(probabilities, grouped=True)
                if labels.chunks != self.chunks:  # blocks of several chunks: each block's task writes its chunks
                    return group_writes(labels, self._boxes, self._mask_blocks, self.num_classes, labels_target,
                                        name=name, only=only, on_written=on_written)
                blocks = labels.to_delayed()
            else:
                blocks = self.on_input_grid(probabilities).rechunk({0: -1}).to_delayed()[0]
        return chunk_writes({idx: blocks[idx] for idx in self._boxes}, self._boxes, self._mask_blocks, self.num_classes,
                            labels_target, probabilities_target, probabilities_dtype, name=name,
                            only=only, on_written=on_written,
                            unreached=self.way_back.leaves_unreached)

    def counts(self, only: Sequence[tuple[int, ...]] | None = None) -> Delayed:
        """Window counts of the model-space work the input-grid chunks ``only`` need (all of it when None)."""
        if only is None:
            return self.stitch.counts()
        return self.stitch.counts(only=self.model_chunks_for(only))

    def needed_windows(self, only: Sequence[tuple[int, ...]]) -> int:
        """Model-grid windows that the input-grid chunks ``only`` need evaluated (see :meth:`counts`)."""
        return self.stitch.needed_windows(self.model_chunks_for(only))

    def model_chunks_for(self, only: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The model-space output chunks whose probabilities the input-grid chunks ``only`` read."""
        mode = self._mode
        bounds = [tuple(itertools.accumulate(c, initial=0)) for c in self.stitch.chunks]
        needed: set[tuple[int, ...]] = set()
        for idx in only:
            region = self.way_back.region(self._boxes[tuple(idx)], mode)
            ranges = [range(bisect.bisect_right(b, lo) - 1, bisect.bisect_left(b, hi))
                      for b, (lo, hi) in zip(bounds, region)]
            needed.update(itertools.product(*ranges))
        return sorted(needed)


__all__ = ["Invert", "ModelSpacePlan", "VolumeWayBack", "WayBack"]
