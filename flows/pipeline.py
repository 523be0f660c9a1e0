"""The steps of segmenting one input, as plain functions the Prefect flows wrap.

ingest (file -> zarr image store) -> infer (zarr -> zarr labels, on Dask)
-> export (labels -> COG or NIfTI, with provenance).  Every output is first
written under a temporary name and moved into place only when complete.

Nothing is lost when a run is killed.  The ingested store under
``OUT/.segflow-work`` is reused by the next run when it is complete and its
source still has the same sha256.  The partial prediction store
(``OUT/.<stem>.zarr.<identity>.partial``) carries a :class:`storage.layout.ChunkJournal`:
the run's identity (input sha256, weights sha256, card and the parameters that
shape the labels) and one marker per finished output chunk.  Rerunning the same
command finds it, checks the identity and computes only the chunks without a
marker; a run with another identity discards it and starts afresh (and says
so).  A failure caused by the input or the outputs removes everything; an
interruption (Ctrl-C, SIGTERM, a Dask worker lost too often, and what they
cause: a closed client, a cancelled future) keeps the partial store and the
ingested store for the next run (:func:`flows.interrupts.resumable`).  The chunk loop polls for
an interruption (:func:`flows.interrupts.check_interrupt`), so an input running in
a ``nightly`` task thread stops at its next chunk too.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zarr
from distributed import Client

from flows import locks, medical, modelspace
from flows.export import MODEL_LABELS, export_labels, model_space_labels, quicklook_image, write_quicklook
from flows.inputnotes import check_has_data, input_warnings, unlabelled_note
from flows.inputs import ingest_input, input_label, input_stem, output_name, overwritten_input
from flows.cluster import gpu_tasks
from flows.config import SegmentOptions
from flows.ledger import off_flags
from flows.progress import reporter, say, window_shares
from flows.routing import band_request
from flows.interrupts import check_interrupt, completed_interruptibly, resumable, wait_interruptible
from segmentation import LoadedModel
from segmentation.crf import CRFParams, crf_dask
from segmentation.chunkwrites import label_dtype, label_nodata
from storage import chunkcache, provenance
from storage.atomic import make_output_folder
from storage.bands import units_facts
from storage.dicomfiles import SeriesRef
from storage.mosaic import MOSAIC_ATTR, MosaicRef
from storage.tilecuts import split_outputs, write_tile_cuts
from storage.errors import ExportError, IncompatibleInputError, ProvenanceError, SegflowError
from storage.modelimage import model_geometry
from storage.remote import is_url
from storage.layout import (LABELS, PROVENANCE_ATTR, ChunkJournal, ImageStore,
                            commit_store, create_prediction_store, identity_digest,
                            partial_path, partial_paths, reopen_prediction_store)

WORK_DIR = ".segflow-work"
KILL_AFTER_CHUNKS_ENV = "SEGFLOW_TEST_KILL_AFTER_CHUNKS"
KILL_SIGNAL_ENV = "SEGFLOW_TEST_KILL_SIGNAL"
# Options that change how the work is spread, never the labels: a run may resume with other values.
NOT_IDENTITY = ("workers", "dask_address", "keep_zarr")
log = logging.getLogger("segflow")


@dataclass
class Outcome:
    """What happened to one input of a batch."""

    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def crf_params(options: SegmentOptions) -> CRFParams:
    return CRFParams(iterations=options.crf_iterations)


def resolved_parameters(model: LoadedModel, options: SegmentOptions, plan: Any) -> dict[str, Any]:
    inf = model.card.inference
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
                  client: Client, source_path: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment an image store into a prediction store at ``target``; return (statistics, parameters).

    Resumes the partial store an interrupted run of the same identity left,
    writing only the chunks its journal does not list as finished.
    ``source_path`` replaces the source path the prediction store records
    (the URL of a staged input, see :func:`segment_one`).
    """
    t0 = time.perf_counter()
    with gpu_tasks(client):  # on GPU workers, the window tasks ask for one GPU each
        plan, mapping, space_facts = modelspace.build(store, model, options, client)
    stitch = getattr(plan, "stitch", plan)  # the model-space stitching (the plan itself on the input's grid)
    params = resolved_parameters(model, options, plan)
    if mapping is not None:
        params["resampling"] = modelspace.resampling_record(mapping, model, options)
    parts = run_identity(store, model, params, _device_name(options.device))
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
        say(f"{store.meta.source.path}: resuming an interrupted run, {len(done)} of "
             f"{len(plan.chunk_indexes)} chunks already done", logging.INFO)
    else:
        partial_state = "new"
        if stale:
            partial_state = "discarded"
            message = (f"{store.meta.source.path}: discarding the partial result of an earlier run that cannot be "
                       f"resumed (another input, model or parameters); starting afresh")
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
    futures = client.compute(writes + [plan.counts(only=todo)])
    model_futures = client.compute(model_writes) if model_writes else []
    key = f"infer:{target.name}"
    shares = window_shares(plan)
    reporter().start(key, f"segment {input_name}", total=sum(shares.values()), unit="windows")
    if done:
        reporter().advance(key, sum(shares.get(idx, 0) for idx in done))
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
    except BaseException:
        # a shared cluster would otherwise go on computing an abandoned run (its tasks still write chunks)
        client.cancel(futures + model_futures)
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
    return stats, params


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


def segment_one(input_path: Any, model: LoadedModel, out_dir: str | Path, options: SegmentOptions,
                client: Client, *, record_input_as: str | None = None) -> Outcome:
    """Ingest, infer, export one input. Raises SegflowError on bad input; leaves nothing partial.

    On an interruption (see :func:`flows.interrupts.resumable`) the hidden partial store and
    the ingested store stay, and the next run with the same identity resumes.

    ``record_input_as`` names the input in the provenance, the prediction
    store's source and the outcome when ``input_path`` is a local copy of it:
    the URL of an input :mod:`flows.staging` downloaded.
    """
    check_interrupt()  # a run interrupted (Ctrl-C, SIGTERM) starts no new input
    started = provenance.now()
    t0 = time.perf_counter()
    if not isinstance(input_path, (SeriesRef, MosaicRef)):
        input_path = Path(input_path)
    out_dir = Path(out_dir)
    clobbered = overwritten_input(input_path, out_dir, split_by_tile=options.split_by_tile)
    if clobbered is not None:
        raise IncompatibleInputError(*clobbered)
    make_output_folder(out_dir)
    locks.clear_leftovers(out_dir, input_stem(input_path))  # a killed run's half-written files of this name
    work = out_dir / WORK_DIR
    try:
        origin = record_input_as if record_input_as is not None and is_url(record_input_as) else None
        store, ingest_reused = ingest_input(input_path, work, options.chunk_size,
                                            bands=band_request(model.card, options), origin=origin)
    except BaseException as exc:
        remove_if_empty(work)
        if isinstance(exc, OSError):  # e.g. the disk filled up while copying
            raise ExportError(exc.filename or work, f"cannot write the ingested copy: {exc.strerror or exc}") from None
        raise
    ingest_seconds = time.perf_counter() - t0
    stem = input_stem(input_path)
    zarr_target = out_dir / f"{stem}.zarr"
    out_path = out_dir / output_name(input_path, store.meta.kind)
    created: list[Path] = []  # outputs this run put in place: on failure exactly these are removed
    keep_work = False
    try:
        try:
            check_interrupt()  # interrupted during the ingest: stop before the inference, keep the ingest
            named = record_input_as or input_label(input_path)  # how messages name the input
            store = modelspace.model_bands_store(store, model, options)
            check_has_data(named, store)
            # said once the run is under way: "has no CRS; the output is written ..." had come before the line
            # refusing the same input (a card that needs a CRS)
            warnings = input_warnings(named, store, model, options, announce=False)
            stats, params = run_inference(store, model, options, zarr_target, client, record_input_as)
            for text in warnings:
                say(text, logging.WARNING)
        except SegflowError as exc:
            if exc.path is None:  # errors about the input's content must name the input
                raise type(exc)(named, exc.problem) from None
            raise
        check_interrupt()  # interrupted as the last chunks were written: stop before the export
        if store.meta.kind == "volume":  # per-label volumes and intensities, into the provenance and reports
            done = zarr.open_group(str(partial_path(zarr_target, stats["run_identity"])), mode="r")
            stats["label_statistics"] = medical.volume_statistics(done[LABELS], store, model)
        unlabelled = unlabelled_note(named, store, stats, label_nodata(model.card.num_classes), client)
        if unlabelled is not None:
            warnings.append(unlabelled)
        stats["ingest_seconds"] = round(ingest_seconds, 3)
        stats["ingest_reused"] = ingest_reused
        stats.update(units_facts(store.meta, units=model.card.input.units, dn_scale=model.card.input.dn_scale,
                                 names=stats.get("bands")))
        if warnings:
            stats["warnings"] = warnings
        record = provenance.make_record(
            input_path=record_input_as or store.meta.source.path, input_sha256=store.meta.source.sha256,
            model={"name": model.name, "path": str(model.path.resolve()), "weights_sha256": model.weights_sha256,
                   "weights_path": str(model.weights_path.resolve()) if model.weights_path else None,
                   "source": model.source,
                   "architecture": model.card.architecture.model_dump(mode="json")},
            parameters=params, device=_device_name(options.device), started=started, finished=provenance.now(),
            statistics=stats, input_details=_input_details(store, split=options.split_by_tile))
        earlier = _earlier_outputs(out_path)  # what a run before this one wrote under this name
        provenance.retire_sidecar(out_path)  # before any of those is replaced (restored if this run fails)
        stable = provenance.embedded(record)  # what the outputs carry: equal for equal labels, so reproducible
        t1 = time.perf_counter()
        # the exports read the store while it is still partial, its journal in place: a run killed while
        # exporting is resumed with every chunk done and only exports again (committed first, it had been
        # recomputed whole, as the committed store is no partial one to resume)
        finished = partial_path(zarr_target, stats["run_identity"])
        exported = export_labels(finished, modelspace.output_meta(store, model, options), model, out_path, stable,
                                 created, vector=options.vector, simplify=options.simplify)
        if isinstance(input_path, MosaicRef) and options.split_by_tile:  # one COG per tile, cut from the mosaic
            exported += write_tile_cuts(zarr.open_group(str(finished), mode="r")[LABELS], store.meta.geometry,
                                        record["input"]["mosaic"], out_dir, classes=model.card.classes,
                                        provenance=stable, created=created)
        if store.meta.kind == "volume":
            labels = zarr.open_group(str(finished), mode="r")[LABELS]
            exported += medical.write_extras(labels, store, model, options, out_path,
                                             stats["label_statistics"], created)
        if options.quicklook:
            with quicklook_image(input_path, band_request(model.card, options), work, origin) as image:
                picture = write_quicklook(exported[0], image, model, stats, created)
            exported += [picture] if picture is not None else []
        commit_store(zarr_target, {PROVENANCE_ATTR: stable}, identity=stats["run_identity"])
        created.append(zarr_target)
        record["statistics"]["export_seconds"] = round(time.perf_counter() - t1, 3)
        record["statistics"]["total_seconds"] = round(time.perf_counter() - t0, 3)
        record["finished"] = provenance.now()
        extras = tuple(exported[1:]) + ((zarr_target,) if options.keep_zarr else ())
        sidecar = provenance.write_sidecar(record, out_path, extras)
        created.append(sidecar)
        if not options.keep_zarr:
            shutil.rmtree(zarr_target)
        _remove_stale(out_dir, earlier, [*exported, sidecar, *([zarr_target] if options.keep_zarr else [])])
    except BaseException as exc:
        keep_work = resumable(exc)
        if not keep_work:
            for p in partial_paths(zarr_target):
                remove_path(p)
        for p in created:
            remove_path(p)
        provenance.restore_sidecar(out_path)  # the earlier outputs left are its, as far as they are there
        if isinstance(exc, OSError):  # a full disk or a denied write while storing or committing: one line
            where = exc.filename or out_dir
            raise ExportError(where, f"cannot write: {exc.strerror or exc}") from None
        raise
    finally:
        if not keep_work:
            remove_path(store.path)
            remove_path(modelspace.model_image_path(store))
            remove_if_empty(work)
    # absolute, all of them: a report built from them is read from OUT/reports, or from anywhere (`segflow report`)
    outputs = [os.path.abspath(p) for p in [*exported, sidecar, *([zarr_target] if options.keep_zarr else [])]]
    return Outcome(input=record_input_as or input_label(input_path), ok=True, outputs=outputs,
                   statistics=record["statistics"])


def _earlier_outputs(out_path: Path) -> list[str]:
    """The outputs the sidecar already beside ``out_path`` lists (an earlier run's of the same name), and those
    of a sidecar a killed run had retired (:func:`storage.provenance.retire_sidecar`)."""
    names: list[str] = []
    for path in (provenance.sidecar_path(out_path), provenance.retired_path(out_path)):
        try:
            record = provenance.read_sidecar(path)
        except (ProvenanceError, OSError):
            continue
        names += [n for n in (record.get("outputs") or {}) if provenance.is_output_name(n) and n not in names]
    return names


def _remove_stale(out_dir: Path, earlier: list[str], written: list[Path]) -> None:
    """Remove what an earlier run of this name wrote and this one did not (a probability COG, polygons, a
    quicklook, a model-space NIfTI of other options): left beside the new outputs, they described another run
    while the new sidecar and ``verify`` said nothing of them.  Only files an earlier sidecar named as its
    outputs are touched, never anything else in OUT."""
    now = {Path(p).name for p in written}
    for name in earlier:
        if name not in now:
            remove_path(out_dir / name)


def _input_details(store: ImageStore, split: bool = False) -> dict[str, Any] | None:
    """A DICOM series' identity for the provenance: UIDs, files and their sha256, de-identification state.

    A mosaic's: its grid, rules and every tile with its sha256 and window (and, ``split``, the COG cut for it).
    """
    if store.meta.source.format == "mosaic" and MOSAIC_ATTR in store.group.attrs:
        mosaic = dict(store.group.attrs[MOSAIC_ATTR])
        if split:
            names = split_outputs(mosaic)
            mosaic["tiles"] = [{**t, "output": names[t["path"]]} for t in mosaic["tiles"]]
        return {"format": "mosaic", "mosaic": mosaic}
    item = getattr(store.meta.geometry, "stac_item", None)
    if item is not None:  # a STAC item: its id, self href, and each asset used with its href and checksum
        return {"format": "STAC item", "stac_item": item.model_dump(mode="json")}
    info = getattr(store.meta.geometry, "dicom", None)
    if info is None:
        return None
    keep = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "sop_class_uid", "modality",
            "series_description", "series_number", "sop_instance_uids", "frame_numbers", "files",
            "transfer_syntax_uid", "volume")
    details = info.model_dump(mode="json", include=set(keep))
    details["deidentification"] = {"patient_name_present": info.patient_name_present,
                                   "patient_id_present": info.patient_id_present}
    return {"format": "DICOM", "dicom": details}


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree; a link to a directory is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _device_name(device: str) -> str:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
