"""Chunks finalised in index order past ten chunks an axis (segmentation.ordering): few regions held, no value
changed."""

from __future__ import annotations

import numpy as np
import pytest
from dask.callbacks import Callback
from dask.utils import key_split

import segmentation.stitching as stitching
from segmentation import build_plan
from segmentation.chunkwrites import label_nodata
from segmentation import ordering
from segmentation.ordering import rank_tokens
from tests.test_stitching import tiny_net


class HeldEvaluates(Callback):
    """The most evaluate outputs (whole regions' sums) the threaded scheduler holds at once."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def _posttask(self, key, result, dsk, state, id) -> None:
        self.most = max(self.most, sum(key_split(k) == "segflow_evaluate" for k in state["cache"]))


@pytest.fixture(autouse=True)
def local_scheduler(monkeypatch):
    """These graphs run on dask's local schedulers, as built here; a distributed client that another test left
    current would otherwise make the plans go without ranks (test_no_ranks_while_a_distributed_client_is_current
    checks that gate with a real client)."""
    monkeypatch.setattr(ordering, "local_scheduler", lambda: True)


def _plan(img: np.ndarray, chunks: int, precision: str = "fast", **kwargs):
    return build_plan(img, tiny_net(img.ndim - 1, img.shape[0], 3), roi=(6,) * (img.ndim - 1), overlap=0.25,
                      chunks=chunks, precision=precision, one_process=True, **kwargs)


def test_tokens_only_past_ten_chunks_along_the_longest_axis():
    assert rank_tokens("t", (10, 10)) is None and rank_tokens("t", ()) is None
    axis, tokens = rank_tokens("t", (12, 3))
    assert axis == 0 and len(tokens) == 12
    axis, tokens = rank_tokens("t", (3, 16, 11))
    assert axis == 1 and len(tokens) == 16
    # a chain: token k has k tokens before it
    graph = dict(tokens[-1].__dask_graph__())
    assert sum(str(k).startswith("segflow_rank-t-") for k in graph) == 16
    assert tokens[5].compute() is None


def test_ten_chunks_or_fewer_keep_the_graph_as_it_was():
    img = np.random.default_rng(0).random((2, 60, 50), dtype=np.float32)
    plan = _plan(img, 10)  # 6 x 5 chunks
    assert plan._ranks is None
    for arr in (plan.probabilities(), plan.labels()):
        assert not any(key_split(k) == "segflow_rank" for k in dict(arr.__dask_graph__()))


@pytest.mark.parametrize("what", ["probabilities", "fast labels", "exact labels"])
def test_past_ten_chunks_dask_sweeps_the_rows_in_order_and_holds_few_regions(what, monkeypatch):
    """On a 16 x 16 grid dask's tie-break by key string ran row 9 before row 10, and a whole row of owners'
    outputs waited for the row after it (20 held); ranked, a few are (4 measured)."""
    img = np.random.default_rng(2).random((2, 16 * 24, 16 * 24), dtype=np.float32)
    held = {}
    for ranked in (True, False):
        if not ranked:
            monkeypatch.setattr(stitching, "rank_tokens", lambda *args: None)
        plan = _plan(img, 24, "exact" if what == "exact labels" else "fast")
        plan.settles = False  # one step: the two-step labels hold few regions on their own (tests/test_settling.py)
        arr = plan.probabilities() if what == "probabilities" else plan.labels()
        assert any(key_split(k) == "segflow_rank" for k in dict(arr.__dask_graph__())) == ranked
        with HeldEvaluates() as cb:
            arr.compute(scheduler="threads", num_workers=2)
        held[ranked] = cb.most
    assert held[False] >= 12, f"unranked, {held[False]} held: dask's ordering may have changed"
    assert held[True] <= 6, held


@pytest.mark.parametrize("shape, chunks", [((2, 12 * 20, 3 * 20), 20), ((2, 36, 13 * 6, 24), 6)])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_the_ranks_change_no_value(shape, chunks, precision, monkeypatch):
    """Probabilities and labels, ranked and unranked, bit for bit, with nodata (2-D ranked along the rows, 3-D
    along the second axis)."""
    img = np.random.default_rng(5).random(shape, dtype=np.float32)
    mask = np.ones(shape[1:], bool)
    mask[(slice(5, 17),) * (len(shape) - 1)] = False
    results = []
    for ranked in (True, False):
        if not ranked:
            monkeypatch.setattr(stitching, "rank_tokens", lambda *args: None)
        plan = _plan(img, chunks, precision, mask=mask)
        assert (plan._ranks is not None) == ranked
        results.append((plan.probabilities().compute(scheduler="sync"), plan.labels().compute(scheduler="sync")))
    (p1, l1), (p0, l0) = results
    assert np.array_equal(p1, p0) and np.array_equal(l1, l0)
    assert np.all(p1[:, ~mask] == 0) and np.all(l1[~mask] == label_nodata(3)) and np.all(l1[mask] < 3)


def test_no_ranks_while_a_distributed_client_is_current(monkeypatch):
    """The distributed scheduler queues root tasks by its own rules, and ``segment`` peaked higher with the
    tokens: a graph built while a client is current goes without."""
    from distributed import Client, LocalCluster

    monkeypatch.undo()  # the real gate
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        assert not ordering.local_scheduler()
        assert rank_tokens("t", (16, 16)) is None
