"""The infer step of one input: its parameters and identity, and the resumable run of its windows on Dask.

:func:`run_inference` builds the plan (the input's grid, or the model's: :mod:`flows.modelspace`), resolves
the parameters that shape the labels into the run's identity (:func:`run_identity`: input, weights, card,
parameters, device), and opens the hidden partial prediction store of that identity, or reopens an
interrupted run's: its :class:`storage.layout.ChunkJournal` lists the finished output chunks, and only the
others are computed.  Chunks are written as the cluster finishes them, each marked done after its write; the
loop polls for an interruption between chunks.  Split from :mod:`flows.pipeline`, which ingests before this
step and exports after it.

Test hook: with ``SEGFLOW_TEST_KILL_AFTER_CHUNKS=N`` in its environment the
process SIGKILLs itself once N chunk writes of this run have completed (its
whole process group, workers included, when it leads one); with
``SEGFLOW_TEST_KILL_SIGNAL=SIGINT`` as well it sends itself SIGINT (Ctrl-C)
instead. The kill tests use it to stop a run at a known point; never set it
otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import zarr
from distributed import Client

from flows import modelspace
from flows.cluster import gpu_tasks
from flows.config import SegmentOptions
from flows.export import MODEL_LABELS, model_space_labels
from flows.interrupts import completed_interruptibly, wait_interruptible
from flows.ledger import off_flags
from flows.progress import reporter, say, window_shares
from segmentation import LoadedModel, precision
from segmentation.chunkwrites import label_dtype, label_nodata
from segmentation.crf import CRFParams, crf_dask
from storage import chunkcache, provenance
from storage.errors import printable
from storage.layout import (ChunkJournal, ImageStore, create_prediction_store, identity_digest, partial_path,
                            partial_paths, reopen_prediction_store)
from storage.modelimage import model_geometry

KILL_AFTER_CHUNKS_ENV = "SEGFLOW_TEST_KILL_AFTER_CHUNKS"
KILL_SIGNAL_ENV = "SEGFLOW_TEST_KILL_SIGNAL"
# Options that change how the work is spread, never the labels: a run may resume with other values.
NOT_IDENTITY = ("workers", "dask_address", "keep_zarr")
log = logging.getLogger("segflow")


def crf_params(options: SegmentOptions) -> CRFParams:
    return CRFParams(iterations=options.crf_iterations)


def resolved_parameters(model: LoadedModel, options: SegmentOptions, plan: Any, device: str) -> dict[str, Any]:
    inf = model.card.inference
    predictor = getattr(getattr(plan, "stitch", plan), "predictor", None)
    return {
        **options.model_dump(exclude={"dask_address"} | off_flags(options)),
        "roi": list(plan.grid.roi),
        "overlap": options.overlap if options.overlap is not None else inf.overlap,
        "blend": options.blend or inf.blend,
        "sigma_scale": inf.sigma_scale,
        "batch_size": options.batch_size or inf.batch_size,
        "flip_tta": list(options.flip_tta if options.flip_tta is not None else inf.flip_tta),
        "crf": crf_params(options).model_dump(mode="json") if options.crf else None,
        "chunks": [c[0] for c in plan.chunks],
        # what `fast` computes in here (fp32 on a CPU without bf16 instructions): in the identity, so a run resumed
        # on another kind of CPU never mixes its chunks with the first one's
        "compute": precision.describe(options.precision,
                                      "cuda" if device.startswith("cuda") else "cpu",
                                      getattr(predictor, "cpu_dtype", None)),
    }


def run_identity(store: ImageStore, model: LoadedModel, params: dict[str, Any], device: str) -> dict[str, Any]:
    """What a prediction store's content depends on: two runs with equal identities write equal chunks.

    The device is the resolved one (``--device auto`` on a CPU host differs
    from the same option on a GPU host): chunks computed by different
    hardware are never mixed in one output.
    """
    return {
        "input_sha256": store.meta.source.sha256,
        "weights_sha256": model.weights_sha256,
        "card_sha256": identity_digest(model.card.model_dump(mode="json")),
        "parameters_sha256": identity_digest({k: v for k, v in params.items() if k not in NOT_IDENTITY}),
        "device": device,
        "segflow": provenance.package_versions().get("segflow"),
    }


def forget_read_chunks(plan: Any, client: Client) -> None:
    """Drop the decoded input chunks a run left in its workers' caches (storage.chunkcache): its last readers
    drop them as they go, but not on a failed run or where worker processes share the reads.

    Never raises, as :func:`flows.modelspace.forget_staged`: it runs while a failed run's own error propagates.
    """
    stitch = getattr(plan, "stitch", plan)
    token = getattr(stitch, "read_token", None)
    if token is None:
        return
    try:
        client.run(chunkcache.forget, token)
    except Exception as exc:  # noqa: BLE001  (a closed client raises AttributeError, a lost worker comm errors)
        logging.getLogger(__name__).debug("could not drop the cached input chunks: %s", exc)


def run_inference(store: ImageStore, model: LoadedModel, options: SegmentOptions, target: Path,
                  client: Client, source_path: str | None = None, *,
                  named: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment an image store into a prediction store at ``target``; return (statistics, parameters).

    Resumes the partial store an interrupted run of the same identity left,
    writing only the chunks its journal does not list as finished.
    ``named``: how messages name the input (as the batch's other lines do; default: the store's source).
    ``source_path`` replaces the source path the prediction store records
    (the URL of a staged input, see :func:`segment_one`).
    """
    t0 = time.perf_counter()
    with gpu_tasks(client):  # on GPU workers, the window tasks ask for one GPU each
        plan, mapping, space_facts = modelspace.build(store, model, options, client)
    stitch = getattr(plan, "stitch", plan)  # the model-space stitching (the plan itself on the input's grid)
    device = run_device(options, client)
    params = resolved_parameters(model, options, plan, device)
    if mapping is not None:
        params["resampling"] = modelspace.resampling_record(mapping, model, options)
    parts = run_identity(store, model, params, device)
    identity = identity_digest(parts)
    chunks = tuple(c[0] for c in plan.chunks)
    ldtype = str(label_dtype(plan.num_classes))
    pdtype = None if options.probabilities == "none" else options.probabilities
    partial = partial_path(target, identity)
    journal = ChunkJournal(partial, identity)
    reopened = reopen_prediction_store(target, identity, spatial_shape=plan.output_shape, chunks=chunks,
                                       label_dtype=ldtype, probabilities_dtype=pdtype,
                                       num_classes=plan.num_classes)
    input_name = target.name.removesuffix(".zarr")
    stale = [p for p in partial_paths(target) if p != partial or reopened is None]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if reopened is not None:
        _, labels, probs = reopened
        done = journal.done()
        partial_state = "resumed"
        label = named or store.meta.source.path
        say(f"{label}: resuming an interrupted run, {len(done)} of {len(plan.chunk_indexes)} chunks already done"
            if done else f"{label}: an interrupted run had finished no chunk; all {len(plan.chunk_indexes)} are "
            "computed now", logging.INFO)
    else:
        partial_state = "new"
        if stale:
            partial_state = "discarded"
            why = "killed as it committed it, or damaged" if partial in stale else "another input, model or parameters"
            message = (f"{store.meta.source.path}: discarding the partial result of an earlier run that cannot be "
                       f"resumed ({why}); starting afresh")
            say(message, logging.WARNING)
        _, labels, probs = create_prediction_store(
            target, meta=_with_source_path(modelspace.output_meta_attr(store, model, options), source_path),
            spatial_shape=plan.output_shape, chunks=chunks,
            label_dtype=ldtype, nodata_label=label_nodata(plan.num_classes),
            classes=[c.model_dump(mode="json") for c in model.card.classes], probabilities_dtype=pdtype,
            identity=identity)
        journal.start(parts)
        done = {}
    todo = [idx for idx in plan.chunk_indexes if idx not in done]

    refined = None
    if options.crf:
        refined = crf_dask(stitch.probabilities(), stitch.image, crf_params(options), stitch.mask,
                           normalizer=stitch.normalizer)
    writes = plan.writes(labels, probs, options.probabilities if probs is not None else "float32",
                         probabilities=refined, only=todo, on_written=journal)
    model_writes = []
    # --model-space keep (volumes): idempotent whole-chunk writes, redone on resume
    if mapping is not None and options.model_space == "keep" and store.meta.kind == "volume":
        geometry = model_geometry(store.meta.geometry, mapping)
        model_writes = stitch.writes(model_space_labels(partial, stitch, ldtype, geometry), probabilities=refined)
    elif options.model_space == "keep" and store.meta.kind == "volume":  # it had written nothing, and said nothing
        say(f"{store.meta.source.path}: --model-space keep: the scan is on the model's grid already, so its labels are the "
            "model-space labels; no .model-space.nii.gz is written", logging.INFO)
    futures = client.compute(writes + [plan.counts(only=todo)])
    model_futures = client.compute(model_writes) if model_writes else []
    key = f"infer:{target.name}"
    # a resumed run counts the windows it evaluates: its last line had said all of them, at a rate never run, and
    # then the finished chunks' windows only, though their owners shared with the chunks left run again
    shares = window_shares(plan, only=todo if done else None)
    left = sum(shares.values())
    # a name with a newline or an escape sequence had forged lines and coloured the terminal
    reporter().start(key, f"segment {printable(input_name)}" + (" (resumed)" if done else ""), total=left,
                     unit="windows")
    histogram: dict[int, int] = {}
    for chunk_histogram in done.values():
        for value, n in chunk_histogram.items():
            histogram[value] = histogram.get(value, 0) + n
    counts: dict[str, int] = {}
    kill_after = _test_kill_after()
    written = 0
    try:
        for future in completed_interruptibly(futures):  # an interruption raises between two chunks
            outcome = future.result()
            if isinstance(outcome, dict) and "histogram" not in outcome:
                counts = outcome
                continue
            for result in outcome if isinstance(outcome, list) else [outcome]:  # a grouped write: one per chunk
                for value, n in result["histogram"].items():
                    histogram[value] = histogram.get(value, 0) + n
                written += 1
                if kill_after is not None and written >= kill_after:
                    _kill_for_test()
                reporter().advance(key, shares.get(result.get("index"), 0))
        for future in model_futures:
            future.result()
        if model.card.inference.keep_largest is not None and model_writes:  # the model grid's labels too
            keep_largest(zarr.open_group(str(partial), mode="a")[MODEL_LABELS], model.card.inference.keep_largest,
                         label_nodata(plan.num_classes))
        if model.card.inference.keep_largest is not None:
            stats_keep = keep_largest(labels, model.card.inference.keep_largest, label_nodata(plan.num_classes))
            for value, n in stats_keep["removed_voxels"].items():
                histogram[int(value)] = histogram.get(int(value), 0) - n
                histogram[0] = histogram.get(0, 0) + n
            space_facts["keep_largest"] = stats_keep
    except BaseException as exc:
        # a shared cluster would otherwise go on computing an abandoned run (its tasks still write chunks)
        client.cancel(futures + model_futures)
        if not isinstance(exc, KeyboardInterrupt):  # a failed input's partial store is removed next: not under
            wait_for_cancelled(client, futures + model_futures)  # writes still running (an interrupted one stays)
        raise
    finally:
        modelspace.forget_staged(plan, client)
        forget_read_chunks(plan, client)
    reporter().finish(key)
    stats = {**counts, "windows_total": plan.num_windows, "chunks": len(plan.chunk_indexes),
             "chunks_written": written, "chunks_resumed": len(done), "partial_store": partial_state,
             "run_identity": identity,
             "label_pixels": {str(k): v for k, v in sorted(histogram.items()) if v},
             **space_facts,
             "inference_seconds": round(time.perf_counter() - t0, 3)}
    norm = getattr(stitch, "normalizer", None)
    if norm is not None:  # what the network saw: (x - shift) * factor, per channel (image statistics included)
        stats["normalization"] = {"shift": [float(v) for v in norm.shift], "factor": [float(v) for v in norm.factor]}
    stats["device"] = device  # the provenance's environment names it (flows.pipeline)
    return stats, params


def wait_for_cancelled(client: Client, futures: list[Any], timeout: float = 120.0, poll: float = 0.05) -> bool:
    """Wait for the cancelled tasks a worker thread is still running to end (Dask cannot stop a running task):
    on a full disk one chunk write failed, the input's partial store was removed, and the writes still running
    made it again (``.scene.zarr.<id>.partial/labels/c/0/3/0`` left in an OUT whose every input had failed).
    True when none runs any more; False after ``timeout`` or when the workers cannot be asked."""
    keys = {f.key for f in futures}

    def running(dask_worker: Any) -> int:  # on each worker: ours, cancelled or not yet told
        return sum(1 for ts in dask_worker.state.all_running_tasks if ts.state == "cancelled" or ts.key in keys)

    deadline = time.monotonic() + timeout
    while True:
        try:
            if not any(client.run(running).values()):
                return True
        except Exception:  # noqa: BLE001 - a closed client or a lost worker: nothing left to wait for here
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def keep_largest(labels: Any, keep: Any, nodata: int) -> dict[str, Any]:
    """The card's KeepLargestConnectedComponent on the finished label map, across chunks."""
    from segmentation.components import keep_largest_components

    return keep_largest_components(labels, applied_labels=keep.applied_labels, independent=keep.independent,
                                   connectivity=keep.connectivity, num_components=keep.num_components,
                                   nodata_label=nodata)


def _with_source_path(meta: Any, source_path: str | None) -> Any:
    """A store's meta attribute naming ``source_path`` as its source (unchanged when None)."""
    if source_path is None:
        return meta
    meta = dict(meta)
    meta["source"] = {**meta["source"], "path": source_path}
    return meta


def _test_kill_after() -> int | None:
    value = os.environ.get(KILL_AFTER_CHUNKS_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _kill_for_test() -> None:
    """The test hook: die as abruptly as a power cut would stop the run (SIGKILL, no clean-up runs), or be
    interrupted as Ctrl-C interrupts it (``SEGFLOW_TEST_KILL_SIGNAL=SIGINT``).

    When this process leads its process group (the kill tests start it so),
    the whole group goes at once, so no worker writes anything afterwards.
    """
    if os.environ.get(KILL_SIGNAL_ENV, "").strip().upper() == "SIGINT":
        os.kill(os.getpid(), signal.SIGINT)
        # the KeyboardInterrupt arrives in the main thread meanwhile; in a task thread, the interruption is seen
        wait_interruptible(lambda: False, 5)
        return
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def run_device(options: SegmentOptions, client: Client) -> str:
    """The device the window work runs on, as the workers that run it name theirs.

    A scheduler elsewhere has workers with hardware of their own: GPU
    workers behind a client without one were recorded as the client's
    "cpu (x86_64)", in the provenance and in the run's identity (which keeps
    chunks from other hardware apart).  Workers that differ are all named
    ("cuda:0 (...) + cpu (...)").  A local cluster's workers are this host's.
    """
    if options.dask_address is None:
        return device_name(options.device)
    from flows.cluster import GPU

    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    chosen = [a for a, w in workers.items() if not options.gpus or (w.get("resources") or {}).get(GPU)]
    names = sorted(set(client.run(device_name, options.device, workers=chosen or None).values()))
    return " + ".join(map(str, names)) if names else device_name(options.device)


def device_name(device: str) -> str:
    """The device a run computes on, as provenance names it (its identity: chunks from another device never mix)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
