"""Exact, chunk-invariant overlap-add stitching as a Dask graph.

The window grid is fixed on the whole image (``windows.make_grid``).  Each
window is owned by exactly one output chunk, the one holding its (clipped)
end corner.  Per owner chunk, an *evaluate* task reads the input region its
windows cover (the chunk plus up to one ROI before it), normalises it (pixels
the mask calls invalid, and NaN, become 0, whatever the file holds there), runs
the windows in batches and accumulates Σ w·p over that region; it hands each
overlapped output chunk its piece.  (An owner of more than twice the average
owner's windows runs them as several parts, each such a task:
:func:`segmentation.ownership.owner_parts`.)  Per output chunk, a *finalise* task adds
the pieces (in owner order), divides by Σ w (computed from the grid alone:
it does not depend on the data) and takes the argmax.

So every window is evaluated once, memory per task is bounded by
(chunk + ROI)^d × classes, never by the image, and the sums do not depend on
the chunking beyond float summation order.  A chunk's pieces come from its
own owner and the owners after it (below, right); Dask's ordering of these
graphs runs the owners from the image's last chunk back to its first, so a
chunk is finalised as soon as its own owner ran and only thin strips wait for
the next row.  (Owned by start corners, each chunk's whole piece waited a row
for the owners before it: the API's peak at 16384² went from 1.40 to 1.04
GiB with this alone.)  Past ten chunks along an axis dask's tie-break by key
string would run chunk 10 before chunk 9, and a row of owners' outputs would
wait for the row after it: each chunk's final task takes a rank token of its
row (:mod:`segmentation.ordering`), and labels come in two steps
(:mod:`segmentation.settling`), so only each chunk's border band waits
(docs/performance.md, "Why it grew").
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from segmentation import devicesums
from segmentation.blending import Blend, importance_map
from segmentation.inference import stored_on_device
from segmentation.normalize import zero_non_finite
from segmentation.ordering import STRING_ORDERED, final_task, rank_tokens
from segmentation.ownership import (assemble, kept_windows, make_axis, owner_parts, part_region, weight_sum,
                                    window_counts)
from segmentation.regions import Box, ComputedRegion, RegionReader
from segmentation.settling import divided, settle, settled_box, settled_labels
from segmentation.windows import WindowGrid
from segmentation.chunkwrites import chunk_writes, draining, label_dtype, labels_of, mark_nodata
from storage.chunkcache import CachedChunks, chunks_of, reader_counts, run_limit


def _evaluate(predictor: Any, normalizer: Callable[[np.ndarray], np.ndarray],
              weights: np.ndarray, owned: tuple[tuple[int, ...], ...], region: Box,
              blocks: list[tuple[Box, np.ndarray]], mask_blocks: list[tuple[Box, np.ndarray]] | None,
              targets: list[tuple[tuple[int, ...], Box]], num_classes: int,
              channels: int) -> dict[tuple[int, ...], np.ndarray]:
    """Run the windows one owner chunk owns; return Σw·p pieces per target chunk.

    The predictor accumulates Σ w·p over the region itself, on its own device,
    so a GPU keeps the region's sums in device memory and returns them once.
    """
    roi = weights.shape
    extent = tuple((min(s), max(s) + r) for s, r in zip(owned, roi))
    raw = blocks.read(region) if isinstance(blocks, (RegionReader, ComputedRegion)) else \
        assemble(region, blocks, (channels,), blocks[0][1].dtype)
    shape = (channels,) + tuple(hi - lo for lo, hi in extent)
    inner = tuple(slice(r0 - e0, r1 - e0) for (r0, r1), (e0, _) in zip(region, extent))
    finite = getattr(normalizer, "finite_for", None)
    finite = finite is not None and finite(raw.dtype)
    valid = None if mask_blocks is None else assemble(region, mask_blocks, (), bool)
    windows = [tuple(slice(s - e0, s - e0 + r) for s, (e0, _), r in zip(start, extent, roi))
               for start in kept_windows(owned, region, roi, valid)]
    # NaN or Inf (a float raster's nodata) is seen as 0 (segmentation.normalize.zero_non_finite). Stored integers
    # normalise to finite values (checked against the normaliser's factors), so their regions skip even the check
    # (6 ms per 1024² × 3 region).
    # Pixels the mask calls invalid are seen as 0 too, after normalisation, whatever the file holds there: a
    # nodata value of 0 normalised to -2.2 and 777 or 5000 to other values, and each changed the labels of valid
    # pixels up to 11 pixels away (a NaN gave yet others).
    invalid = None if valid is None or bool(valid.all()) else ~valid
    if getattr(predictor, "regions_on_device", False) and hasattr(normalizer, "apply_torch") and \
            stored_on_device(raw.dtype) and getattr(predictor, "pads_zeros", True):  # a GPU worker: the stored dtype crosses the bus, the sums stay there
        acc = predictor.accumulate_stored(raw, normalizer, inner, shape, finite, windows, weights, num_classes,
                                          invalid=invalid)
    else:
        x = np.zeros(shape, dtype=np.float32)
        normalizer(raw, out=x[(slice(None),) + inner])
        del raw
        if not finite:
            zero_non_finite(x)
        if invalid is not None:
            x[(slice(None),) + inner][:, invalid] = 0.0
        if hasattr(predictor, "fill_outside"):  # past a short axis's edge: the card's padding (zeros by default)
            predictor.fill_outside(x, inner)
        acc = predictor.accumulate(x, windows, weights, num_classes)
        del x

    # the owner's own chunk, when it is most of the region (2-D: 64 % of a 1024² chunk's 1280² region), stays a
    # view of the sums: copying it was most of the task's work outside the network (14 ms of a 1152² x 5
    # region, new memory each time); the halo strips are copied, so the sums live no longer than that piece.
    # Where it is not (3-D: a 128³ chunk is 19 % of its 224³ region), a view would keep 5x its size alive.
    sizes = [int(np.prod([hi - lo for lo, hi in tbox])) for _, tbox in targets]
    largest = int(np.argmax(sizes)) if sizes and 2 * max(sizes) >= int(np.prod(acc.shape[1:])) else -1
    pieces = {}
    for k, (index, tbox) in enumerate(targets):
        sl = tuple(slice(lo - e0, hi - e0) for (lo, hi), (e0, _) in zip(tbox, extent))
        piece = acc[(slice(None),) + sl]
        pieces[index] = piece if k == largest else devicesums.copy(piece)
    return pieces


def _pieces(incoming: list[tuple[Box, Any, Any]]) -> list[tuple[Box, Any]]:
    """A chunk's (box, piece) pairs from its incoming entries: a piece itself (key None), or an owner's whole
    output and the key of the piece in it (:attr:`StitchPlan.whole_outputs`)."""
    return [(box, value if key is None else value[key]) for box, value, key in incoming]


def _one_process() -> bool:
    """Whether a graph built now will run in one process: dask's local schedulers (no distributed client), or
    a distributed cluster of one worker.  A guess made when the graph is built; it only decides how pieces
    reach their chunks, never what is computed."""
    try:
        from distributed import default_client
        client = default_client()
    except (ImportError, ValueError):  # no client: the threaded or synchronous scheduler
        return True
    return len(client.scheduler_info(n_workers=-1).get("workers", {})) == 1


def _sums(box: Box, pieces: list[tuple[Box, np.ndarray]], num_classes: int) -> np.ndarray:
    """Σ w·p over one output chunk: its pieces added in owner order (a fixed summation order); on the pieces'
    device when they are device tensors (:mod:`segmentation.devicesums`)."""
    shape = (num_classes,) + tuple(hi - lo for lo, hi in box)
    acc = devicesums.zeros(shape, pieces) if devicesums.on_device(pieces) else np.zeros(shape, dtype=np.float32)
    for pbox, piece in pieces:
        sl = tuple(slice(p0 - b0, p1 - b0) for (p0, p1), (b0, _) in zip(pbox, box))
        acc[(slice(None),) + sl] += piece
    return acc


def _finalise(box: Box, pieces: list[tuple[Box, Any, Any]], grid: WindowGrid, weights: np.ndarray,
              mask: np.ndarray | None, num_classes: int, logits: bool = False) -> np.ndarray:
    """Probabilities of one output chunk: Σ pieces / Σ w (then a softmax when logits were blended), zero where
    the input has no data."""
    pieces = _pieces(pieces)
    acc = _sums(box, pieces, num_classes)
    if devicesums.on_device(pieces):
        return devicesums.probabilities(acc, weight_sum(box, grid, weights), mask, logits)
    return divided(acc, weight_sum(box, grid, weights), mask, logits)


def _undivided_labels(box: Box, pieces: list[tuple[Box, Any, Any]], mask: np.ndarray | None,
                      num_classes: int) -> np.ndarray:
    """Labels of one output chunk straight from Σ w·p, for ``fast``: Σ w is positive, so dividing by it cannot
    change which class is largest, except where two sums round to one quotient (a near-tie, which bf16 logits
    already decide by chance).  Skips rebuilding Σ w and a pass over every class: measured in
    ``benchmarks/hostwork.py``'s finalise step.  Device-resident pieces: the argmax on the device, and only the
    labels come back."""
    pieces = _pieces(pieces)
    if devicesums.on_device(pieces):
        return mark_nodata(devicesums.labels(_sums(box, pieces, num_classes), label_dtype(num_classes)), mask,
                           num_classes)
    return labels_of(_sums(box, pieces, num_classes), mask, num_classes)


def _sum_counts(*counts: tuple[int, int]) -> dict[str, int]:
    return {"windows_evaluated": sum(c[0] for c in counts), "windows_skipped": sum(c[1] for c in counts)}


class StitchPlan:
    """The Dask graph for one image: build once, then take probabilities, labels or chunk writes."""

    def __init__(self, image: da.Array, predictor: Any, grid: WindowGrid, *,
                 num_classes: int, normalizer: Callable[[np.ndarray], np.ndarray],
                 mask: da.Array | None = None, blend: Blend = "gaussian", sigma_scale: float = 0.125,
                 source: Any = None, one_process: bool | None = None) -> None:
        """``source``: the stored array ``image`` wraps (zarr), or the dask array it is, read by the evaluate
        tasks themselves (:class:`RegionReader`, :class:`ComputedRegion`).  ``one_process``: whether every task
        runs in one process (None: :func:`_one_process` decides), where a chunk takes its own evaluate task's
        whole output instead of a ``getitem`` task for its piece.
        """
        self.whole_outputs = _one_process() if one_process is None else one_process
        self.grid = grid
        self.source = source
        self.predictor = predictor  # what the evaluate tasks run (its device settings apply until computed)
        self.num_classes = num_classes
        self.channels = image.shape[0]
        self.chunks = image.chunks[1:]
        self.image = image.rechunk({0: -1})
        self.mask = None if mask is None else mask.rechunk(self.chunks)
        self.weights = importance_map(grid.roi, blend, sigma_scale)
        self.normalizer = normalizer
        self.axes = [make_axis(st, r, ch, sz) for st, r, ch, sz in zip(grid.starts, grid.roi, self.chunks,
                                                                         grid.shape)]
        # this run's own decoded chunks of a stored source (storage.chunkcache): never another run's
        self.read_token = f"segflow-read-{uuid.uuid4().hex}"
        self.token = tokenize(self.image.name, None if mask is None else self.mask.name,
                              getattr(predictor, "token", None) or id(predictor),
                              getattr(predictor, "batch_size", None), grid, blend, sigma_scale, normalizer,
                              num_classes, self.whole_outputs)  # the chunks' tasks differ with it, under one name
        self._build(predictor, normalizer)

    @property
    def num_windows(self) -> int:
        return len(self.grid)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The spatial shape the writes cover (the image's; a model-space plan's is the input's)."""
        return tuple(self.grid.shape)

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        return tuple(a.nchunks for a in self.axes)

    def box(self, index: tuple[int, ...]) -> Box:
        return tuple(a.chunk(i) for a, i in zip(self.axes, index))

    def _reader_counts(self, regions: Any) -> dict[tuple[int, ...], int] | None:
        """How many evaluate tasks read each chunk of the source, when it is a stored zarr array or an array-like
        that computes what is read (``reads_regions``, a raster warped on read) and has chunks: its reads go
        through the process's chunk cache (:mod:`storage.chunkcache`), so each chunk is decoded (or warped) once
        rather than once per region whose halo reaches it.  None otherwise."""
        source = self.source
        if source is None or isinstance(source, da.Array) or \
                not (hasattr(source, "store") or getattr(source, "reads_regions", False)) or \
                len(getattr(source, "chunks", ())) != len(self.chunks) + 1:
            return None
        return reader_counts(source.chunks, [self._stored_box(r) for r in regions])

    def _stored_box(self, region: Box) -> Box:
        """A region as the stored source's box: every channel, then the region."""
        return ((0, self.source.shape[0]),) + tuple(region)

    def _reader(self, region: Box, counts: dict[tuple[int, ...], int] | None, limit: int | None) -> RegionReader:
        """An evaluate task's reader of the stored source: through the decoded chunks when ``counts`` is given."""
        if counts is None:
            return RegionReader(self.source)
        mine = chunks_of(self.source.chunks, self._stored_box(region))
        return RegionReader(self.source, CachedChunks(self.source, self.read_token, {i: counts[i] for i in mine},
                                                      limit))

    def _build(self, predictor: Any, normalizer: Callable) -> None:
        tok = self.token
        pred = delayed(predictor, name=f"segflow-predictor-{tok}", traverse=False)
        weights = delayed(self.weights, name=f"segflow-weights-{tok}", traverse=False)
        self._weights_task = weights
        image_blocks = self.image.to_delayed()[0]  # drop the single channel block
        mask_blocks = None if self.mask is None else self.mask.to_delayed()
        self._mask_blocks = mask_blocks
        incoming: dict[tuple[int, ...], list[tuple[Box, Delayed]]] = {
            idx: [] for idx in itertools.product(*(range(a.nchunks) for a in self.axes))}
        # per owner, per part: (evaluated, skipped), or a task giving them
        self._count_parts: dict[tuple[int, ...], list[Any]] = {}
        self._sources: dict[tuple[int, ...], list[tuple[int, ...]]] = {idx: [] for idx in incoming}
        source_tasks = dict(self.source.__dask_graph__()) if isinstance(self.source, da.Array) else None
        # each owner's windows as the parts its evaluate tasks run (ownership.owner_parts): one part unless it holds
        # more than twice the average owner's windows
        owned_by = {owner: tuple(a.owned[i] for a, i in zip(self.axes, owner)) for owner in incoming}
        owned_by = {owner: owned for owner, owned in owned_by.items() if all(owned)}
        cap = -(-len(self.grid) // max(len(owned_by), 1))
        parts = [(owner, p, sub, part_region(sub, self.grid.roi, self.grid.shape))
                 for owner, owned in owned_by.items() for p, sub in enumerate(owner_parts(owned, cap))]
        counts = self._reader_counts([region for *_, region in parts])
        limit = None if counts is None else run_limit(self.source)
        for owner, p, owned, region in parts:
            src = list(itertools.product(*(a.chunks_overlapping(lo, hi) for a, (lo, hi) in zip(self.axes, region))))
            if isinstance(self.source, da.Array):
                blocks: Any = ComputedRegion(self.source, region, source_tasks)
            elif self.source is not None:
                blocks = self._reader(region, counts, limit)
            else:
                blocks = [(self.box(s), image_blocks[s]) for s in src]
            mblocks = None if mask_blocks is None else [(self.box(s), mask_blocks[s]) for s in src]
            targets = [(t, tuple((max(lo, b0), min(hi, b1)) for (lo, hi), (b0, b1) in zip(region, self.box(t))))
                       for t in src]
            key = "-".join(map(str, owner)) + (f"-part{p}" if p else "")  # an unsplit owner's keys as before parts
            name = f"segflow_evaluate-{tok}-{key}"
            pieces = delayed(_evaluate, pure=True)(
                pred, normalizer, weights, owned, region, blocks, mblocks, targets,
                self.num_classes, self.channels, dask_key_name=name)
            self._count_parts.setdefault(owner, []).append(
                (int(np.prod([len(o) for o in owned])), 0) if mblocks is None else
                delayed(window_counts, pure=True)(owned, region, tuple(self.grid.roi), mblocks,
                                           dask_key_name=f"segflow_count-{tok}-{key}"))
            for t, tbox in targets:
                # a getitem task per piece lets only the piece travel between processes, and is a scheduler round
                # trip.  In one process nothing travels, and a chunk takes its own owner's whole output: the
                # output then lives until that chunk's tasks, as its own piece did.  Not a neighbour's: it would
                # hold the owner's own piece (a view of its whole region's sums in 2D) until the last neighbour
                # is finalised, a row of regions later
                whole = self.whole_outputs and t == owner
                incoming[t].append((tbox, pieces, t) if whole else (tbox, pieces[t], None))
                self._sources[t].append(owner)
        self._probs: dict[tuple[int, ...], Delayed] = {}
        self._incoming = incoming
        self.blend_logits = bool(getattr(predictor, "blend_logits", False))
        # fast, probabilities blended: labels come from the undivided sums (_undivided_labels)
        self.undivided_labels = getattr(predictor, "precision", None) == "fast" and not self.blend_logits
        # labels in two steps (segmentation.settling) where dask's ordering would keep whole regions' sums waiting:
        # in one process, on the host, past ten chunks along an axis with two or more along the others
        nchunks = self.chunk_grid
        self.settles = self.whole_outputs and \
            not getattr(predictor, "regions_on_device", False) and \
            any(n > STRING_ORDERED and int(np.prod(nchunks)) // n >= 2 for n in nchunks)
        # each chunk's final task ranked by its slice, so that dask runs the slices in index order past ten chunks
        # an axis (segmentation.ordering)
        self._ranks = rank_tokens(tok, nchunks)
        for idx, pieces_in in incoming.items():
            mask = None if mask_blocks is None else mask_blocks[idx]
            with draining():  # keyed as the probabilities array's block (probabilities())
                self._probs[idx] = final_task(
                    self._ranks, idx, _finalise, self.box(idx), pieces_in, self.grid, weights, mask,
                    self.num_classes, self.blend_logits, key=(f"segflow_finalise-{tok}", 0) + idx)

    def _label_blocks(self) -> dict[tuple[int, ...], Delayed]:
        """Delayed labels per output chunk: from the undivided sums in ``fast``, else the argmax of
        :meth:`probabilities`' chunk; keyed as the labels array's blocks (:meth:`labels`)."""
        out = {}
        name = f"segflow_{'labels' if self.undivided_labels else 'argmax'}-{self.token}"
        for idx, pieces_in in self._incoming.items():
            mask = None if self._mask_blocks is None else self._mask_blocks[idx]
            with draining():
                two_steps = self._two_steps(idx, mask, name) if self.settles else None
                if two_steps is not None:
                    out[idx] = two_steps
                elif self.undivided_labels:
                    out[idx] = final_task(self._ranks, idx, _undivided_labels, self.box(idx), pieces_in, mask,
                                          self.num_classes, key=(name,) + idx)
                else:
                    out[idx] = delayed(labels_of, pure=True)(self._probs[idx], mask, self.num_classes,
                                                             dask_key_name=(name,) + idx)
        return out

    def _two_steps(self, idx: tuple[int, ...], mask: Any, name: str) -> Delayed | None:
        """A chunk's labels as :mod:`segmentation.settling`'s two tasks, where the chunk has a settled box; else
        None.  The first task takes the own owner's whole output, so that output is freed once it ran."""
        box = self.box(idx)
        entries = list(zip(self._sources[idx], self._incoming[idx]))
        own = [(tbox, value, key) for owner, (tbox, value, key) in entries if owner == idx and key is not None]
        later = [(owner, tbox, value) for owner, (tbox, value, key) in entries if owner != idx]
        settled = settled_box(idx, box, [(owner, tbox) for owner, tbox, _ in later]) if len(own) == 1 else None
        if settled is None:
            return None
        own_box, output, key = own[0]
        # exact (or blended logits): divided by Σ w, as the probabilities are, before the argmax
        divide = () if self.undivided_labels else (self.grid, self._weights_task, self.blend_logits)
        first = delayed(settle, pure=True)(output, key, own_box, box, settled, mask, self.num_classes, *divide,
                                           dask_key_name=f"segflow_settle-{self.token}-" + "-".join(map(str, idx)))
        return final_task(self._ranks, idx, settled_labels, box, settled, first,
                          [(tbox, value) for _, tbox, value in later], mask, self.num_classes, *divide,
                          key=(name,) + idx)

    def _array(self, blocks: dict[tuple[int, ...], Delayed], leading: tuple[tuple[int, ...], ...],
               dtype: Any) -> da.Array:
        """The per-chunk tasks as one dask array whose blocks are those tasks themselves, keyed (name, *index):
        ``da.from_delayed`` and ``da.block`` would add an alias task per chunk and a tree of concatenations,
        each a scheduler round trip that leaves a worker thread idle (2–5 ms each in a task stream of a 2-D
        8192² ``fast`` run)."""
        merged = HighLevelGraph.merge(*(b.__dask_graph__() for b in blocks.values()))
        layers, deps = dict(merged.layers), {k: set(v) for k, v in merged.dependencies.items()}
        first = next(iter(blocks.values())).key
        annotations = layers[first].annotations  # every block is built alike (draining())
        tasks: dict = {}
        needs: set = set()
        for b in blocks.values():  # each block's one-task layer (named by its key) joins the array's layer
            tasks.update(layers.pop(b.key))
            needs |= deps.pop(b.key)
        layers[first[0]] = MaterializedLayer(tasks, annotations=annotations)
        deps[first[0]] = needs
        return da.Array(HighLevelGraph(layers, deps), first[0], leading + tuple(self.chunks), dtype=dtype)

    @property
    def chunk_indexes(self) -> list[tuple[int, ...]]:
        """Every output chunk, in the (row-major) order :meth:`writes` uses."""
        return list(self._probs)

    def owned_windows(self, index: tuple[int, ...]) -> int:
        """How many grid windows output chunk ``index`` owns: over every chunk they add up to :attr:`num_windows`."""
        return int(np.prod([len(a.owned[i]) for a, i in zip(self.axes, index)]))

    def needed_windows(self, only: Sequence[tuple[int, ...]]) -> int:
        """Grid windows (evaluated or skipped) that writing the chunks ``only`` runs: what :meth:`counts` of
        them will add up to, known before the run, so a resumed run's progress counts what it computes."""
        return sum(self.owned_windows(o) for o in self._owners_of(only))

    def _owners_of(self, only: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The owners whose evaluate tasks writing the chunks ``only`` needs, each once, sorted."""
        return sorted({o for idx in only for o in self._sources[tuple(idx)]})

    def counts(self, only: Sequence[tuple[int, ...]] | None = None) -> Delayed:
        """Delayed {windows_evaluated, windows_skipped}: of the whole image, or of the evaluate tasks that
        the chunks ``only`` lists need.

        A resumed run asks for the chunks it still writes, so the counts say
        what it computed (owners shared with finished chunks are evaluated again).
        """
        owners = list(self._count_parts) if only is None else self._owners_of(only)
        name = f"segflow-counts-{self.token}" + ("" if only is None else "-" + tokenize(owners))
        return delayed(_sum_counts, pure=True)(*(c for o in owners for c in self._count_parts[o]),
                                               dask_key_name=name)

    def probabilities(self) -> da.Array:
        """(classes, *spatial) float32: Σ w·p / Σ w, zero where the input has no data."""
        return self._array(self._probs, ((self.num_classes,),), np.float32)

    def labels(self) -> da.Array:
        """(*spatial) argmax labels, with the nodata label where the input has no data."""
        return self._array(self._label_blocks(), (), label_dtype(self.num_classes))

    def writes(self, labels_target: Any, probabilities_target: Any = None,
               probabilities_dtype: str = "float32", probabilities: da.Array | None = None, *,
               only: Sequence[tuple[int, ...]] | None = None,
               on_written: Callable[[tuple[int, ...], dict], None] | None = None) -> list[Delayed]:
        """One delayed write per output chunk, each covering that whole chunk of the targets.

        ``probabilities`` replaces the stitched probabilities with a refined
        version on the same chunk grid (e.g. :func:`segmentation.crf.crf_dask`
        of :meth:`probabilities`); labels are then its argmax.  ``only``
        restricts the writes to those chunk indexes (a resumed run skips the
        finished ones; the graph is culled to what they need), and
        ``on_written(index, result)`` runs in each write task once its chunk
        is stored (a completion record).
        """
        # labels only: each write takes its chunk's labels (which, in fast, skip Σ w), nodata already in place
        labels_only = probabilities_target is None and probabilities is None
        blocks = self._label_blocks() if labels_only else self._probs
        if probabilities is not None:
            if probabilities.chunks[1:] != tuple(self.chunks):
                raise ValueError(f"refined probabilities are chunked {probabilities.chunks[1:]}, "
                                 f"the plan {self.chunks}")
            refined = probabilities.rechunk({0: -1}).to_delayed()[0]
            blocks = {idx: refined[idx] for idx in self._probs}
        masks = None if labels_only else self._mask_blocks
        return chunk_writes(blocks, {idx: self.box(idx) for idx in blocks}, masks, self.num_classes,
                            labels_target, probabilities_target, probabilities_dtype,
                            name=f"segflow-write-{self.token}-{'crf-' if probabilities is not None else ''}",
                            only=only, on_written=on_written)


__all__ = ["ComputedRegion", "StitchPlan"]
