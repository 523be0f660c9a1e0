"""A chunk's labels in two steps (segmentation.settling): the same labels, and no whole region waiting."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from dask.utils import key_split
from hypothesis import given, settings
from hypothesis import strategies as st

import segmentation.stitching as stitching
from segmentation import build_plan
from segmentation.chunkwrites import label_nodata
from segmentation.settling import band, settled_box
from tests.test_ordering import HeldEvaluates
from tests.test_stitching import tiny_net

# 12 x 3 chunks of 40² (more than ten along the rows), windows of 10²: each chunk's band is at most 9 pixels deep
SHAPE, CHUNK, ROI = (480, 120), 40, (10, 10)


def plan_of(img: np.ndarray, mask: np.ndarray | None = None, chunks: int = CHUNK, precision: str = "fast",
            blend_outputs: str | None = None):
    return build_plan(img, tiny_net(2, 2, 4), roi=ROI, overlap=0.25, chunks=chunks, precision=precision,
                      mask=mask, one_process=True, blend_outputs=blend_outputs)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("precision, blend_outputs", [("fast", None), ("exact", None), ("exact", "logits")])
def test_two_steps_give_the_one_step_labels_bit_for_bit(masked, precision, blend_outputs):
    """`fast` labels from the undivided sums; `exact` (and blended logits) divided by Σ w, then a softmax."""
    img = np.random.default_rng(11).random((2, *SHAPE), dtype=np.float32) * (20 if blend_outputs else 1)
    mask = None
    if masked:
        mask = np.ones(SHAPE, bool)
        mask[100:180, :50] = False  # across chunk borders and bands
    plan = plan_of(img, mask, precision=precision, blend_outputs=blend_outputs)
    assert plan.settles and plan.undivided_labels == (precision == "fast")
    two = plan.labels()
    assert sum(key_split(k) == "segflow_settle" for k in dict(two.__dask_graph__())) > 20
    two = two.compute(scheduler="sync")
    plan.settles = False  # the one-step graph under the same keys: computed on its own, not merged with the other
    one = plan.labels()
    assert not any(key_split(k) == "segflow_settle" for k in dict(one.__dask_graph__()))
    assert np.array_equal(two, one.compute(scheduler="sync"))
    if masked:
        assert np.all(two[~mask] == label_nodata(4)) and np.all(two[mask] < 4)
    # and chunk-invariant: a grid of ten chunks or fewer takes one step
    other = plan_of(img, mask, chunks=60, precision=precision, blend_outputs=blend_outputs)
    assert not other.settles
    if precision == "exact":  # the same divided sums, whatever the chunking (within float32 summation order)
        probs = other.probabilities().compute(scheduler="sync")
        top2 = np.sort(probs, axis=0)[-2:]
        clear = (top2[1] - top2[0] > 1e-5) & (mask if masked else True)
        assert clear.mean() > 0.9 and np.array_equal(two[clear], probs.argmax(0)[clear])
    else:
        assert np.array_equal(two, other.labels().compute(scheduler="sync"))


def test_two_steps_in_3d_give_the_one_step_labels():
    """12 chunks of 16 along the first axis, 2 along the others, windows of 4³: each chunk settles 54 %."""
    img = np.random.default_rng(12).random((2, 192, 32, 32), dtype=np.float32)
    plan = build_plan(img, tiny_net(3, 2, 3), roi=(4, 4, 4), overlap=0.25, chunks=16, precision="fast",
                      one_process=True)
    assert plan.settles
    two = plan.labels()
    assert sum(key_split(k) == "segflow_settle" for k in dict(two.__dask_graph__())) == 12 * 2 * 2 - 1
    two = two.compute(scheduler="sync")
    plan.settles = False
    assert np.array_equal(two, plan.labels().compute(scheduler="sync"))


def test_an_owners_output_is_read_whole_only_by_its_own_chunks_first_step():
    """So the output, its whole region's sums, is freed as soon as that step and the neighbours' strips ran."""
    plan = plan_of(np.zeros((2, *SHAPE), np.float32))
    graph = dict(plan.labels().__dask_graph__())
    settles = 0
    for key, node in graph.items():
        if key_split(key) != "segflow_evaluate":
            continue
        owner = key.split("-")[-2:]
        readers = [r for r, n in graph.items() if key in n.dependencies and key_split(r) != "getitem"]
        assert len(readers) == 1
        kind = key_split(readers[0])
        settles += kind == "segflow_settle"
        # only the last chunk has no later owner: one step there
        assert (kind == "segflow_settle" and readers[0].split("-")[-2:] == owner) or \
            (kind == "segflow_labels" and list(map(str, readers[0][1:])) == owner)
    assert settles == 12 * 3 - 1


def test_dasks_order_past_ten_chunks_holds_strips_not_regions(monkeypatch):
    """On a 16 x 16 grid dask's ordering runs row 9 before row 10 (its keys' strings), and with one-step labels a
    whole row of owners' outputs waited for the row after it; in two steps only a few are held at once.  Without
    the rank tokens that now put the rows in order (tests/test_ordering.py), so that two steps hold few on their
    own, whatever the order."""
    monkeypatch.setattr(stitching, "rank_tokens", lambda *args: None)
    img = np.random.default_rng(2).random((2, 16 * 24, 16 * 24), dtype=np.float32)
    plan = build_plan(img, tiny_net(2, 2, 3), roi=(6, 6), overlap=0.25, chunks=24, precision="fast",
                      one_process=True)
    held = {}
    for settles in (True, False):
        plan.settles = settles
        with HeldEvaluates() as cb:
            plan.labels().compute(scheduler="threads", num_workers=2)
        held[settles] = cb.most
    assert held[False] >= 12, f"one-step labels held {held[False]}: dask's ordering may have changed"
    assert held[True] <= 4, held


@settings(max_examples=200, deadline=None)
@given(data=st.data(), ndim=st.sampled_from([2, 3]))
def test_the_settled_box_and_its_band_tile_the_chunk_and_miss_every_later_piece(data, ndim):
    lo = [data.draw(st.integers(0, 50)) for _ in range(ndim)]
    size = [data.draw(st.integers(4, 40)) for _ in range(ndim)]
    box = tuple((a, a + n) for a, n in zip(lo, size))
    index = (1,) * ndim
    later = []
    for owner in itertools.product(*[(1, 2)] * ndim):
        if owner == index or not data.draw(st.booleans()):
            continue
        piece = []
        for a, (b0, b1) in enumerate(box):  # a later owner's piece reaches into the tail along its later axes
            start = data.draw(st.integers(b0, b1 - 1)) if owner[a] > 1 else b0
            piece.append((start, b1 if owner[a] > 1 else data.draw(st.integers(start + 1, b1))))
        later.append((owner, tuple(piece)))
    settled = settled_box(index, box, later)
    if settled is None:
        return
    cover = np.zeros(size, int)
    for part in [settled, *band(box, settled)]:
        cover[tuple(slice(p0 - b0, p1 - b0) for (p0, p1), (b0, _) in zip(part, box))] += 1
    assert np.all(cover == 1)
    for _, piece in later:
        assert any(p1 <= s0 or s1 <= p0 for (p0, p1), (s0, s1) in zip(piece, settled))
