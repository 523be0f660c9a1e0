"""Stitching is exact (MONAI's answer), chunk- and worker-invariant, and runs each window once."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.inferers import sliding_window_inference
from torch import nn

from dask._task_spec import Alias, Task
from dask.utils import key_split

from segmentation import build_plan, predict
from segmentation.chunkwrites import label_nodata


def tiny_net(spatial_dims: int, cin: int, classes: int, seed: int = 0) -> nn.Module:
    """A small translation-equivariant net with a receptive field wider than one pixel."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
                         conv(8, classes, 1)).eval()


def monai_reference(img: np.ndarray, net: nn.Module, roi, overlap, mode="gaussian") -> np.ndarray:
    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(img)[None], roi, 3, lambda x: torch.softmax(net(x), 1),
                                       overlap=overlap, mode=mode)
    return out[0].numpy()


def sizes(ndim: int, top: int, low: int = 3):
    # prime sizes, 1-pixel remainders and sizes below the ROI all turn up in these ranges
    return st.lists(st.integers(low, top), min_size=ndim, max_size=ndim)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ndim=st.sampled_from([2, 3]), overlap=st.sampled_from([0.0, 0.25, 0.4, 0.5, 0.75]),
       blend=st.sampled_from(["gaussian", "constant"]))
def test_equals_monai_and_is_chunk_invariant(data, ndim, overlap, blend):
    top, rmin, rmax = (90, 10, 40) if ndim == 2 else (30, 8, 16)  # bounded window counts keep it quick
    shape = data.draw(sizes(ndim, top), label="shape")
    roi = tuple(data.draw(sizes(ndim, rmax, rmin), label="roi"))
    chunks = [tuple(data.draw(sizes(ndim, top, 6), label=f"chunks{i}")) for i in range(2)]
    img = np.random.default_rng(len(shape) + sum(shape)).random((2, *shape), dtype=np.float32)
    net = tiny_net(ndim, 2, 3)
    ref = monai_reference(img, net, roi, overlap, blend)
    results = [predict(img, net, roi=roi, overlap=overlap, blend=blend, chunks=c).compute(scheduler="sync")
               for c in chunks]
    for probs in results:
        np.testing.assert_allclose(probs, ref, atol=1e-4, rtol=0)
        assert np.array_equal(probs.argmax(0), ref.argmax(0))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)
    assert np.array_equal(results[0].argmax(0), results[1].argmax(0))


SEEN: list[tuple[int, ...]] = []  # module level: the predictor runs its own copy of the net
SEEN_LOCK = threading.Lock()


class RecordingNet(nn.Module):
    """Records where each window it sees starts: channel 0/1(/2) of the input hold the pixel coordinates."""

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = ndim
        self.head = (nn.Conv2d if ndim == 2 else nn.Conv3d)(ndim, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = (slice(None), slice(None)) + (0,) * self.ndim
        with SEEN_LOCK:
            SEEN.extend(tuple(int(round(v)) for v in row) for row in x[corner].tolist())
        return self.head(x)


@pytest.mark.parametrize("shape, roi, chunks, overlap", [
    ((97, 131), (32, 32), (40, 50), 0.25),
    ((64, 50), (16, 24), (7, 64), 0.5),
    ((23, 19, 29), (8, 8, 8), (10, 19, 9), 0.3),
    ((100, 100), (48, 48), (50, 50), 0.5),  # the last chunk owns 9 of 16 windows: three parts
])
def test_each_window_evaluated_exactly_once(shape, roi, chunks, overlap):
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    net = RecordingNet(len(shape))
    SEEN.clear()
    plan = build_plan(coords, net, roi=roi, overlap=overlap, chunks=chunks, num_classes=2, batch_size=3)
    with dask.config.set(scheduler="threads"):
        _, counts = dask.compute(plan.labels(), plan.counts())
    expected = sorted(plan.grid)
    assert sorted(SEEN) == expected  # every window, none twice, none extra
    assert counts == {"windows_evaluated": len(expected), "windows_skipped": 0}


def evaluate_tasks(arr) -> list[str]:
    return [k for k in dict(arr.__dask_graph__()) if key_split(k) == "segflow_evaluate"]


@pytest.mark.parametrize("masked", [False, True])
def test_an_owner_of_most_windows_is_split_into_parts_with_the_same_answer(masked):
    """256³ in 128³ chunks with a 96³ ROI, scaled down: the last chunk owns 27 of 64 windows, and on two
    threads that one task was most of the run.  Its windows run as three tasks of 9; every window once,
    the answer MONAI's, the labels those of one chunk, the counts as before."""
    shape, roi = (64, 64, 64), (24, 24, 24)
    img = np.random.default_rng(3).random((2, *shape), dtype=np.float32)
    mask = None
    if masked:
        mask = np.ones(shape, bool)
        mask[:40, :40] = False
    net = tiny_net(3, 2, 3)
    plan = build_plan(img, net, roi=roi, overlap=0.25, chunks=32, mask=mask)
    assert len(plan.grid) == 64 and plan.owned_windows((1, 1, 1)) == 27
    tasks = evaluate_tasks(plan.probabilities())
    assert len(tasks) == 10 and sum(k.endswith(("-part1", "-part2")) for k in tasks) == 2
    probs, labels, counts, later = dask.compute(plan.probabilities(), plan.labels(), plan.counts(),
                                                plan.counts(only=[(1, 1, 1)]), scheduler="threads")
    whole = build_plan(img, net, roi=roi, overlap=0.25, chunks=64, mask=mask)
    assert len(evaluate_tasks(whole.probabilities())) == 1
    ref_probs, ref_labels, ref_counts = dask.compute(whole.probabilities(), whole.labels(), whole.counts(),
                                                     scheduler="sync")
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5, rtol=0)
    assert np.array_equal(labels, ref_labels)
    assert counts == ref_counts and sum(counts.values()) == 64
    assert sum(later.values()) == 27  # only (1, 1, 1)'s own owner: its three parts
    if not masked:
        np.testing.assert_allclose(probs, monai_reference(img, net, roi, 0.25), atol=1e-4, rtol=0)
    else:
        assert counts["windows_skipped"] > 0 and np.all(labels[~mask] == label_nodata(3))


def test_nodata_windows_are_skipped_and_counted():
    shape = (120, 100)
    img = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    mask = np.zeros(shape, bool)
    mask[:50, :40] = True
    net = tiny_net(2, 2, 3)
    plan = build_plan(img, net, roi=(32, 32), overlap=0.25, chunks=48, mask=mask)
    labels, probs, counts = dask.compute(plan.labels(), plan.probabilities(), plan.counts(), scheduler="sync")
    assert counts["windows_skipped"] > 0
    assert counts["windows_evaluated"] + counts["windows_skipped"] == len(plan.grid)
    # exactly the windows with no valid pixel were skipped
    expected_skipped = sum(1 for w in plan.grid if not mask[plan.grid.slices(w)].any())
    assert counts["windows_skipped"] == expected_skipped
    assert np.all(labels[~mask] == label_nodata(3))
    assert np.all(probs[:, ~mask] == 0)
    # inside the valid region the answer is MONAI's on the image with its invalid pixels set to 0 (skipped windows
    # touch no valid pixel); what lies under the mask changes nothing
    seen = np.where(mask, img, 0).astype(np.float32)
    ref = monai_reference(seen, net, (32, 32), 0.25)
    np.testing.assert_allclose(probs[:, mask], ref[:, mask], atol=1e-4)
    hidden = img.copy()
    hidden[:, ~mask] = np.random.default_rng(2).random((2, int((~mask).sum())), dtype=np.float32) * 50
    other = build_plan(hidden, net, roi=(32, 32), overlap=0.25, chunks=48, mask=mask)
    np.testing.assert_array_equal(other.probabilities().compute(scheduler="sync"), probs)


@pytest.mark.parametrize("masked", [False, True])
def test_fast_labels_skip_the_weight_sum_yet_equal_the_argmax_and_ignore_the_chunking(masked):
    """``fast`` labels come from Σ w·p undivided (stitching._undivided_labels): the same classes as the argmax of
    the divided probabilities wherever the top two are not a rounding tie, nodata off the mask, and two chunkings
    give the same labels."""
    shape = (150, 130)
    img = np.random.default_rng(5).random((2, *shape), dtype=np.float32)
    mask = None
    if masked:
        mask = np.ones(shape, bool)
        mask[:40, :70] = False
    net = tiny_net(2, 2, 4)
    kw = dict(roi=(32, 32), overlap=0.25, precision="fast", mask=mask)
    plan = build_plan(img, net, chunks=48, **kw)
    assert plan.undivided_labels
    labels = plan.labels()
    assert any(str(k[0] if isinstance(k, tuple) else k).startswith("segflow_labels-")
               for k in dict(labels.__dask_graph__()))  # the undivided path, not an argmax of probabilities
    labels, probs = dask.compute(labels, plan.probabilities(), scheduler="sync")
    other = build_plan(img, net, chunks=(70, 41), **kw).labels().compute(scheduler="sync")
    assert np.array_equal(labels, other)
    valid = np.ones(shape, bool) if mask is None else mask
    assert np.all(labels[~valid] == label_nodata(4))
    assert np.all(labels[valid] < 4)
    top2 = np.sort(probs[:, valid], axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-6  # a quotient tie can only come from sums within a few ulps
    assert clear.mean() > 0.99
    assert np.array_equal(labels[valid][clear], probs.argmax(0)[valid][clear])
    # exact keeps dividing: its labels are the argmax of its probabilities, everywhere
    exact = build_plan(img, net, chunks=48, roi=(32, 32), overlap=0.25, mask=mask)
    assert not exact.undivided_labels
    e_labels, e_probs = dask.compute(exact.labels(), exact.probabilities(), scheduler="sync")
    assert np.array_equal(e_labels[valid], e_probs.argmax(0)[valid])


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_the_arrays_blocks_are_the_per_chunk_tasks_themselves(precision):
    """``labels()`` and ``probabilities()`` hand out the stitching's per-chunk tasks as the arrays' blocks: no
    alias per chunk and no tree of concatenations between them (``da.from_delayed`` + ``da.block``), each of
    which costs a scheduler round trip that leaves a worker thread waiting."""
    img = np.random.default_rng(3).random((2, 150, 130), dtype=np.float32)
    plan = build_plan(img, tiny_net(2, 2, 3), roi=(32, 32), overlap=0.25, chunks=48, precision=precision)
    chunks = 4 * 3
    for arr, names in ((plan.labels(), {"segflow_labels", "segflow_argmax"}),
                       (plan.probabilities(), {"segflow_finalise"})):
        graph = dict(arr.__dask_graph__())
        keys = list(dask.core.flatten(arr.__dask_keys__()))
        assert len(keys) == chunks and all(key_split(k) in names for k in keys)
        assert all(isinstance(graph[k], Task) for k in keys)  # the computation itself, not an alias of it
        assert not any(isinstance(node, Alias) for node in graph.values())
        assert not {key_split(k) for k in graph} & {"concatenate", "from-value", "block"}
        per_chunk = [k for k in graph if key_split(k) in names]
        assert len(per_chunk) == chunks
    # and they compute to the same answer as the whole-image reference
    ref = monai_reference(img, tiny_net(2, 2, 3), (32, 32), 0.25)
    probs = plan.probabilities().compute(scheduler="sync")
    np.testing.assert_allclose(probs, ref, atol=1e-4 if precision == "exact" else 2e-2, rtol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_nodata_is_seen_as_zero_not_spread_into_valid_pixels(bad):
    shape = (70, 90)
    img = np.random.default_rng(2).random((2, *shape), dtype=np.float32)
    mask = np.ones(shape, bool)
    mask[30:37, 20:50] = False  # a hole of NaN (or an infinity) inside the image, as a float raster's nodata gives
    with_nan = img.copy()
    with_nan[:, ~mask] = bad
    zeros = img.copy()
    zeros[:, ~mask] = 0.0
    net = tiny_net(2, 2, 3)
    kw = dict(roi=(32, 32), overlap=0.25, chunks=40, mask=mask)
    probs = predict(with_nan, net, **kw).compute(scheduler="sync")
    assert np.isfinite(probs).all()
    np.testing.assert_array_equal(probs, predict(zeros, net, **kw).compute(scheduler="sync"))
    ref = monai_reference(zeros, net, (32, 32), 0.25)
    np.testing.assert_allclose(probs[:, mask], ref[:, mask], atol=1e-4)


def test_a_batch_larger_than_the_windows_allocates_for_the_windows():
    """--batch-size 100000 (or a card's) sized the batch buffers by the option: 26 GB for a region of 9 windows,
    and the run failed; now they hold the region's windows at most, and the result does not change."""
    img = np.random.default_rng(5).random((3, 60, 70), dtype=np.float32)
    net = tiny_net(2, 3, 4)
    kw = dict(roi=(32, 32), overlap=0.25, chunks=64)
    huge = predict(img, net, batch_size=10**9, **kw).compute(scheduler="sync")  # 3 TB as sized before
    np.testing.assert_allclose(huge, predict(img, net, batch_size=2, **kw).compute(scheduler="sync"), atol=1e-6)


def test_distributed_workers_give_the_same_answer(dask_cluster):
    img = np.random.default_rng(2).random((3, 150, 170), dtype=np.float32)
    net = tiny_net(2, 3, 4)
    local = predict(img, net, roi=(48, 48), overlap=0.3, chunks=64).compute(scheduler="sync")
    dist = dask_cluster.compute(predict(img, net, roi=(48, 48), overlap=0.3, chunks=(50, 90))).result()
    np.testing.assert_allclose(dist, local, atol=1e-5, rtol=0)
    assert np.array_equal(dist.argmax(0), local.argmax(0))


def test_an_owners_parts_on_distributed_workers_give_the_same_answer(dask_cluster):
    """The parts' pieces travel to their chunks as any owner's do (a getitem each), whichever worker ran them."""
    img = np.random.default_rng(4).random((2, 100, 100), dtype=np.float32)
    net = tiny_net(2, 2, 3)
    kw = dict(roi=(48, 48), overlap=0.5, chunks=50)  # the last chunk owns 9 of 16 windows: three parts
    plan = build_plan(img, net, **kw)
    assert not plan.whole_outputs and sum("-part" in k for k in evaluate_tasks(plan.probabilities())) == 2
    dist = dask_cluster.compute(plan.probabilities()).result()
    local = build_plan(img, net, one_process=True, **kw).probabilities().compute(scheduler="sync")
    np.testing.assert_allclose(dist, local, atol=1e-5, rtol=0)
    np.testing.assert_allclose(local, monai_reference(img, net, (48, 48), 0.5), atol=1e-4, rtol=0)


def test_pieces_travel_alone_between_processes_and_whole_within_one(dask_cluster):
    """Between worker processes a chunk receives only its pieces of each owner's output (a getitem task on the
    owner's worker, so the owner's own 1024² sums never travel for a neighbour's strip); where every task runs
    in one process nothing travels, and a chunk takes its own owner's whole output with no getitem task (one
    scheduler round trip less per chunk).  The same sums, added in the same order, either way."""
    img = np.random.default_rng(4).random((3, 150, 170), dtype=np.float32)
    net = tiny_net(2, 3, 4)
    kw = dict(roi=(48, 48), overlap=0.3, chunks=(50, 90))
    split = build_plan(img, net, **kw)  # decided from the current client: two worker processes
    assert not split.whole_outputs
    whole = build_plan(img, net, one_process=True, **kw)
    assert whole.whole_outputs

    def getitems(arr):
        return sum(key_split(k) == "getitem" for k in dict(arr.__dask_graph__()))
    owners = len(split.chunk_indexes)  # every chunk owns windows here
    assert getitems(split.probabilities()) - getitems(whole.probabilities()) == owners
    # only the owner's own chunk reads its output whole, so the output (its own piece, in 2D a view of the whole
    # region's sums) is not held until the last neighbour's chunk is finalised
    graph = dict(whole.probabilities().__dask_graph__())
    for key in graph:
        if key_split(key) == "segflow_evaluate":
            owner = tuple(int(i) for i in key.split("-")[-2:])
            whole_readers = [r for r, node in graph.items() if key in node.dependencies and key_split(r) != "getitem"]
            assert [r[2:] for r in whole_readers] == [owner]
    on_workers = [dask_cluster.compute(p.probabilities()).result() for p in (split, whole)]  # whole: a wrong guess
    in_threads = [p.probabilities().compute(scheduler="threads") for p in (split, whole)]
    assert np.array_equal(*on_workers) and np.array_equal(*in_threads)
    np.testing.assert_allclose(on_workers[0], in_threads[0], atol=1e-5, rtol=0)  # other processes' torch
    np.testing.assert_allclose(in_threads[1], monai_reference(img, net, (48, 48), 0.3), atol=1e-4, rtol=0)


def test_without_a_client_the_plan_expects_one_process():
    """A fresh process (this one may hold another test's client): dask's local schedulers run in one process."""
    code = ("import numpy as np, torch; from segmentation import build_plan; "
            "net = torch.nn.Conv2d(2, 3, 1).eval(); "
            "print(build_plan(np.zeros((2, 40, 40), np.float32), net, roi=(16, 16), chunks=20).whole_outputs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "True"


def test_zarr_input_and_3d_labels(tmp_path):
    import zarr

    arr = zarr.create_array(str(tmp_path / "img.zarr"), shape=(1, 20, 26, 31), chunks=(1, 9, 9, 9), dtype="float32")
    data = np.random.default_rng(3).random(arr.shape, dtype=np.float32)
    arr[:] = data
    net = tiny_net(3, 1, 2)
    labels = predict(arr, net, roi=(12, 12, 12), overlap=0.25, probabilities=False).compute(scheduler="sync")
    ref = monai_reference(data, net, (12, 12, 12), 0.25)
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, ref.argmax(0))


def test_a_dask_image_is_computed_region_by_region_inside_the_evaluates(tmp_path):
    """A dask input's chunks are never tasks of the stitch's graph (a scheduler loaded them far ahead of their
    windows); each evaluate computes its own region, and the answer is the in-memory one."""
    import dask.array as da
    import zarr

    store = zarr.create_array(str(tmp_path / "img.zarr"), shape=(3, 70, 90), chunks=(3, 32, 32), dtype="uint8")
    store[:] = np.random.default_rng(5).integers(0, 255, store.shape, dtype=np.uint8)
    image = da.from_zarr(store).astype("float32") / 255
    net = tiny_net(2, 3, 4)
    probs = predict(image, net, roi=(16, 16), overlap=0.25, chunks=32)
    image_layers = set(image.__dask_graph__().layers)
    assert image_layers and not image_layers & set(probs.__dask_graph__().layers)
    image_keys = set(dict(image.__dask_graph__()))
    assert not image_keys & set(dict(probs.__dask_graph__()))
    ours = probs.compute(scheduler="threads")
    ref = predict(np.asarray(store[:]).astype("float32") / 255, net, roi=(16, 16), overlap=0.25, chunks=32)
    assert np.allclose(ours, ref.compute(scheduler="sync"), atol=1e-6)
    assert np.allclose(ours, monai_reference(np.asarray(image), net, (16, 16), 0.25), atol=1e-5)


def test_predict_leaves_the_callers_module_untouched():
    net = tiny_net(2, 1, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    predict(np.zeros((1, 40, 40), np.float32), net, roi=(16, 16), precision="fast").compute(scheduler="sync")
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_module_left_in_train_mode_keeps_its_batchnorm_statistics_and_gives_eval_results():
    """predict's class-count probe ran the caller's module in train mode: its BatchNorm running statistics changed,
    and the windows ran with them (0.036 off MONAI's on the same module in eval mode)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    img = np.random.default_rng(0).normal(size=(2, 40, 36)).astype(np.float32)
    got = predict(img, net, roi=(16, 16)).compute(scheduler="sync")
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    reference = monai_reference(img, net.eval(), (16, 16), 0.25)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_networks_sharing_weights_but_not_structure_have_their_own_results():
    """Two networks with one state_dict and different activations had one dask key: computed together, both gave
    the first one's probabilities."""
    a = tiny_net(2, 1, 2)
    b = nn.Sequential(*[nn.Tanh() if isinstance(m, nn.ReLU) else m for m in tiny_net(2, 1, 2)]).eval()
    b.load_state_dict(a.state_dict())
    img = np.random.default_rng(1).normal(size=(1, 30, 30)).astype(np.float32)
    pa, pb = predict(img, a, roi=(16, 16)), predict(img, b, roi=(16, 16))
    assert pa.name != pb.name
    ga, gb = dask.compute(pa, pb, scheduler="sync")
    np.testing.assert_allclose(gb, monai_reference(img, b, (16, 16), 0.25), atol=1e-5)
    assert not np.allclose(ga, gb)


def test_loaded_models_sharing_a_weights_file_but_not_a_card_have_their_own_results(tmp_path):
    """The same for two model directories: one weights file, cards differing in the activation.  A loaded model's dask name was its weights' sha256 alone, so computed together both gave the
    first one's probabilities."""
    import json
    import shutil

    from segmentation.card import ModelCard
    from segmentation.modeldir import build_module, load_model, save_model
    from tests.models import tiny_model

    plain = tiny_model(tmp_path / "plain", spatial_dims=2, channels=1, roi=[16, 16]).card.model_dump(mode="json")
    plain["architecture"]["kwargs"]["act"] = "relu"
    plain["weights_sha256"] = None
    card = ModelCard.model_validate(plain)
    torch.manual_seed(3)
    first = save_model(tmp_path / "a", card, build_module(card))
    other = tmp_path / "b"
    shutil.copytree(first.path, other)
    card = json.loads((other / "card.json").read_text())
    card["architecture"]["kwargs"]["act"] = "elu"  # no parameters either: the same weights file fits
    (other / "card.json").write_text(json.dumps(card))
    a, b = load_model(first.path), load_model(other)
    assert a.weights_sha256 == b.weights_sha256
    _own_results(a, b, np.random.default_rng(1).normal(size=(1, 30, 30)).astype(np.float32))


def _own_results(a, b, img: np.ndarray) -> None:
    """``a`` and ``b`` computed together give each its own probabilities, as ``b`` alone does."""
    pa, pb = predict(img, a), predict(img, b)
    assert pa.name != pb.name
    alone = pb.compute(scheduler="sync")
    ga, gb = dask.compute(pa, pb, scheduler="sync")
    np.testing.assert_array_equal(gb, alone)
    assert not np.allclose(ga, gb)


def test_a_loaded_model_whose_weights_were_changed_in_memory_has_its_own_results(tmp_path):
    """A loaded model's dask name was its weights file's hash: one fine-tuned (or given another state_dict) in
    memory, computed together with a copy as loaded, gave the copy's probabilities for both (API probe)."""
    from segmentation.modeldir import load_model
    from tests.models import tiny_model

    path = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[16, 16]).path
    a, b = load_model(path), load_model(path)
    img = np.random.default_rng(2).normal(size=(1, 30, 30)).astype(np.float32)
    assert predict(img, a).name == predict(img, b).name  # unchanged: one name, computed once
    with torch.no_grad():
        for p in b.module.parameters():
            p.mul_(0.5)
    assert b.weights_changed() and not a.weights_changed()
    _own_results(a, b, img)


def test_a_channels_last_image_or_a_batch_is_named_as_such(tmp_path):
    """Both had been told only that the channel count or the dimensions differ."""
    from segmentation import load_model
    from storage.errors import IncompatibleInputError
    from tests.models import tiny_model

    model = load_model(tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[16, 16]).path)
    with pytest.raises(IncompatibleInputError, match=r"takes 4 channels, the input has 40 \(shape \(40, 40, 4\): "
                                                     r"channels last\? .*np.moveaxis\(image, -1, 0\)\)"):
        predict(np.zeros((40, 40, 4), np.float32), model)
    with pytest.raises(IncompatibleInputError, match=r"is 2D, the input is 3D \(shape \(2, 4, 40, 40\): a batch\? "
                                                     r"predict takes one \(C, H, W\) image at a time\)"):
        predict(np.zeros((2, 4, 40, 40), np.float32), model)
    with pytest.raises(IncompatibleInputError, match=r"takes 4 channels, the input has 3$"):  # no false hint
        predict(np.zeros((3, 40, 40), np.float32), model)


def test_torchscript_modules_and_user_mistakes():
    """A scripted or traced module failed inside the task (requires_grad on a copy's non-leaf parameters); a
    wrong precision ran as exact without a word; a model folder's path was told 'roi is required'."""
    from storage.errors import ConfigError

    net = tiny_net(2, 1, 2)
    img = np.random.default_rng(2).normal(size=(1, 30, 30)).astype(np.float32)
    reference = monai_reference(img, net, (16, 16), 0.25)
    for module in (torch.jit.script(net), torch.jit.trace(net, torch.zeros(1, 1, 16, 16))):
        np.testing.assert_allclose(predict(img, module, roi=(16, 16)).compute(scheduler="sync"), reference,
                                   atol=1e-5)
    with pytest.raises(ConfigError, match="precision must be 'exact' or 'fast', got 'bogus'"):
        predict(img, net, roi=(16, 16), precision="bogus")
    with pytest.raises(ConfigError, match="model must be a torch module or segmentation.load_model"):
        predict(img, "models/landcover-2d", roi=(16, 16))
    with pytest.raises(ConfigError, match="image must be a .* array, got list"):
        predict([[1.0]], net, roi=(16, 16))
    # what the network returns for a window is checked before any task: these failed inside the tasks
    with pytest.raises(ConfigError, match=r"the network fails on a \(1, 2, 16, 16\) window: .*channels"):
        predict(np.zeros((2, 30, 30), np.float32), net, roi=(16, 16))

    class Dict(nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            return {"out": net(x)}

    with pytest.raises(ConfigError, match=r"the network returns dict for a \(1, 1, 16, 16\) window.*wrap it"):
        predict(img, Dict(), roi=(16, 16))
    # the CLI's spelling of labels only, --probabilities none, had returned probabilities
    for value in ("none", "uint8", None):
        with pytest.raises(ConfigError, match=f"probabilities must be True .* or False .*, got {value!r}"):
            predict(img, net, roi=(16, 16), probabilities=value)
    # a mistyped keyword is predict's, with the near option (it had named build_plan, an internal function)
    with pytest.raises(TypeError, match=r"^predict\(\) got an unexpected keyword argument 'probabilites'; "
                                        r"did you mean 'probabilities'\?$"):
        predict(img, net, roi=(16, 16), probabilites=False)
    with pytest.raises(TypeError, match=r"^predict\(\) got an unexpected keyword argument 'sigma_scal'; "
                                        r"did you mean 'sigma_scale'\?$"):
        predict(img, net, roi=(16, 16), sigma_scal=0.1)
    # one sigmoid channel: its softmax is 1 everywhere, and every pixel was class 0 without a word
    with pytest.raises(ConfigError, match="the network gives 1 class channel; .* needs 2 or more"):
        predict(img, nn.Conv2d(1, 1, 1), roi=(16, 16))
    # arguments checked before a graph: batch_size=-1 ran no window (all-zero probabilities, labels all 0), a float
    # mask of 0.3 was all valid, "bogus" blend outputs ran as probabilities, sigma 0 as 0.125, roi 64.5 as 64, and
    # the rest failed deep inside torch, MONAI or dask
    for kwargs, message in (({"batch_size": -1}, "batch_size must be a whole number >= 1"),
                            ({"batch_size": 0}, "batch_size must be"),
                            ({"mask": np.full((30, 30), 0.3)}, "mask must be boolean"),
                            ({"mask": np.ones((1, 30, 30), bool)}, "mask shape .* no channel axis"),
                            ({"blend_outputs": "bogus"}, "blend_outputs must be"),
                            ({"blend": "bogus"}, "blend must be 'gaussian' or 'constant'"),
                            ({"sigma_scale": 0}, "sigma_scale must be a number > 0"),
                            # these four failed deep in numpy, MONAI or the window tasks (API probe, 2026-12-06)
                            ({"sigma_scale": "0.1"}, "sigma_scale must be a number > 0, got '0.1'"),
                            ({"overlap": "0.5"}, r"overlap must be a number in \[0, 1\), got '0.5'"),
                            ({"chunks": 64.0}, "chunks must be a positive whole number"),
                            ({"flip_tta": 1}, r"flip_tta must list spatial axes \(e.g. \[0, 1\]\), got 1"),
                            ({"roi": (16.5, 16)}, "roi must be positive whole numbers"),
                            ({"chunks": 0}, "chunks must be"), ({"chunks": (8, 8, 8)}, "chunks must be"),
                            ({"chunks": "auto"}, "chunks must be"), ({"device": "bogus"}, "device must be"),
                            ({"normalizer": "zscore"}, "normalizer must be")):
        with pytest.raises(ConfigError, match=message):
            predict(img, net, **{"roi": (16, 16), **kwargs})
    with pytest.raises(ConfigError, match="num_classes=7, and the network returns"):  # in its first window's task
        predict(img, net, roi=(16, 16), num_classes=7).compute(scheduler="sync")
    with pytest.raises(ConfigError, match="torch tensor"):
        predict(torch.zeros(1, 30, 30), net, roi=(16, 16))
    with pytest.raises(ConfigError, match="real numbers"):
        predict(img.astype(np.complex64), net, roi=(16, 16))
    np.testing.assert_allclose(predict(img, net, roi=16).compute(scheduler="sync"), reference, atol=1e-5)


@pytest.mark.parametrize("ndim, shape, roi, flips", [
    (2, (53, 71), (24, 32), [0]),
    (2, (40, 37), (16, 16), [0, 1]),
    (3, (19, 23, 17), (8, 12, 8), [0, 2]),
])
def test_flip_tta_equals_monai_with_mirrored_predictor_and_is_chunk_invariant(ndim, shape, roi, flips):
    img = np.random.default_rng(7).random((2, *shape), dtype=np.float32) * 20  # logits that vary
    net = tiny_net(ndim, 2, 3, seed=3)
    dims = [a + 2 for a in flips]
    combos = [()] + [c for k in range(1, len(dims) + 1) for c in __import__("itertools").combinations(dims, k)]

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return sum(torch.flip(torch.softmax(net(torch.flip(x, c)), 1), c) if c else torch.softmax(net(x), 1)
                   for c in combos) / len(combos)

    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(img)[None], roi, 3, mirrored, overlap=0.25,
                                       mode="gaussian")[0].numpy()
    plain = predict(img, net, roi=roi, chunks=11).compute(scheduler="sync")
    assert np.abs(plain - ref).max() > 1e-3  # the augmentation changes the answer, so the check below can fail
    results = [predict(img, net, roi=roi, chunks=c, flip_tta=flips).compute(scheduler="sync") for c in (11, 29)]
    for probs in results:
        np.testing.assert_allclose(probs, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_blending_raw_outputs_equals_monai_inferer_then_softmax(ndim):
    """``blend_outputs="logits"``: what a MONAI bundle computes (the inferer blends logits, softmax after)."""
    shape, roi = ((70, 53), (24, 20)) if ndim == 2 else ((21, 26, 19), (12, 10, 8))
    img = np.random.default_rng(7).random((2, *shape), dtype=np.float32) * 20  # logits that vary
    net = tiny_net(ndim, 2, 3, seed=3)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(img)[None], roi, 3, net, overlap=0.25, mode="gaussian")
    ref = torch.softmax(logits, 1)[0].numpy()
    for chunks in (9, 16):
        probs = predict(img, net, roi=roi, overlap=0.25, chunks=chunks, blend_outputs="logits").compute(
            scheduler="sync")
        np.testing.assert_allclose(probs, ref, atol=1e-5, rtol=0)
        assert np.array_equal(probs.argmax(0), ref.argmax(0))
    softmax_blend = predict(img, net, roi=roi, overlap=0.25, chunks=16).compute(scheduler="sync")
    assert np.abs(softmax_blend - ref).max() > 1e-4  # the two blends differ: the option matters


@pytest.mark.parametrize("roi", [(256, 256), (40, 96, 96)])
def test_the_softmax_in_slabs_equals_the_whole_windows(roi):
    """A CPU worker takes each window's softmax in cache-sized slabs (``softmax_slabs``): bit for bit the values
    of the whole window's, channels-last bf16 logits as a network under autocast gives them."""
    from segmentation.inference import SLAB_BYTES, exp_and_scale, softmax_slabs

    fmt = torch.channels_last if len(roi) == 2 else torch.channels_last_3d
    logits = (torch.randn((1, 5) + roi, generator=torch.Generator().manual_seed(0)) * 8).to(torch.bfloat16)
    logits = logits.contiguous(memory_format=fmt)
    weight = torch.rand(roi, generator=torch.Generator().manual_seed(1))
    e, scale = exp_and_scale(logits, torch.empty((1, 5) + roi), weight)
    want = (e * scale)[0]
    got = torch.empty_like(want)
    buf = torch.empty((2, 5) + roi)
    slabs = 0
    for a, b, es, ss in softmax_slabs(logits, buf, weight):
        assert 4 * es.numel() <= SLAB_BYTES
        got[:, a:b] = (es * ss)[0]
        slabs += 1
    assert slabs > 1 and torch.equal(got, want)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_network_that_ends_in_a_softmax_is_blended_as_it_is_not_softmaxed_twice(ndim):
    """Its probabilities had got a second softmax: 0.98 came out 0.57, and blending then flipped labels.  MONAI's
    inferer blends what the network returns: the reference here."""
    shape, roi = ((70, 53), (24, 20)) if ndim == 2 else ((21, 26, 19), (12, 10, 8))
    img = np.random.default_rng(5).random((2, *shape), dtype=np.float32) * 20
    net = nn.Sequential(tiny_net(ndim, 2, 3, seed=4), nn.Softmax(1)).eval()
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(img)[None], roi, 3, net, overlap=0.25, mode="gaussian")
    ref = ref[0].numpy()
    assert ref.max() > 0.9  # confident somewhere: a second softmax would pull it toward 1/3, so the check can fail
    for chunks in (9, 16):
        with pytest.warns(UserWarning, match="probabilities already"):
            probs = predict(img, net, roi=roi, overlap=0.25, chunks=chunks).compute(scheduler="sync")
        np.testing.assert_allclose(probs, ref, atol=1e-5, rtol=0)
        with pytest.warns(UserWarning, match="probabilities already"):
            labels = predict(img, net, roi=roi, overlap=0.25, chunks=chunks, probabilities=False).compute(
                scheduler="sync")
        assert np.array_equal(labels, ref.argmax(0))
