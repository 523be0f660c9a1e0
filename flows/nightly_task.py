"""The nightly flow's per-input task, ``segment-input``: lock, route, hash, skip or segment one input.

One task run per input (a file, a URL, a DICOM series or a STAC item): under
the input's lock it reads the header, picks the model whose card fits (for an
item: whose bands it offers, :func:`flows.routing.route_item`), builds the
content key (for an item: over its JSON and the assets that model reads),
and either skips (the key's outputs exist and verify) or runs ``segment_one``
and records the key.  This is the body of the nightly run, apart from the flow
that lists the inputs, submits the tasks and writes the report
(``flows/nightly.py``); the steps are described there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run as task_run_info

from flows import ledger, locks, staging
from flows.config import SegmentOptions
from flows.inputs import (Expanded, check_named_sources, forged_problem, input_label, input_stem,
                          outputs_of_another, own_files)
from flows.report import InputReport, fill_from_statistics, resumed_note
from flows.retries import retry_if_transient
from flows.routing import ModelEntry, ModelInput, loaded, no_model_reason, one_slice, route, route_item
from storage.channelfiles import ChannelFiles
from storage.dicomfiles import SeriesRef
from storage.errors import (CorruptInputError, ExportError, IncompatibleInputError, InputError, LockLostError,
                            is_native_panic, one_line)
from storage.hashing import sha256_input
from storage.probe import probe
from storage.sources import check_own_files
from storage.stacitem import is_item_path


@dataclass
class Batch:
    """What every task run of one flow run shares (passed quoted: Prefect does not inspect it)."""

    models: list[ModelEntry]
    options: SegmentOptions
    out_dir: str
    client: Any
    attempts: dict[str, int] = field(default_factory=dict)
    lock_stale_after: float = locks.DEFAULT_STALE_AFTER_S
    source_roots: list[Path] | None = None  # where an input's VRT or STAC item may send GDAL (storage.sources)
    inbox_roots: list[Path] | None = None  # a local inbox's: where its inputs' own files may lie, links resolved


def _hash_input(path: str) -> str:
    try:
        return sha256_input(path)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from exc


def _hash_group(ref: SeriesRef | ChannelFiles) -> str:
    """The series' (or a case's channel files') content key: one digest over its files' sha256s (a file gone since
    listing: one line)."""
    try:
        return ref.sha256()
    except OSError as exc:
        raise InputError(ref.display, f"cannot read {Path(exc.filename or '?').name}: {exc.strerror or exc}") from exc


def series_details(ref: SeriesRef) -> dict[str, Any]:
    """What the report says of a DICOM series: where and which one, never who (no patient identifiers)."""
    return {"root": str(ref.root), "series_instance_uid": ref.series_instance_uid, "volume": ref.volume,
            "name": ref.name, "files": len(ref.files)}


@task(name="segment-input", task_run_name="segment-{name}", persist_result=False, cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def segment_input(item: Expanded, name: str, batch: Batch) -> dict[str, Any]:
    """Route, skip or segment one input (a file, a URL or a DICOM series); raises (and fails only this task
    run) when the input is bad."""
    t0 = time.perf_counter()
    label = input_label(item)
    batch.attempts[label] = task_run_info.get_run_count() or 1
    target = staging.OutputTarget(batch.out_dir, input_stem(item))  # out_dir itself, or a staging folder for a URL
    lock = input_lock(target, input_stem(item), batch.lock_stale_after)
    try:
        holder = lock.acquire(input=label)
    except OSError as exc:  # e.g. a read-only output folder (a transient errno is still retried: the chain keeps it)
        raise ExportError(label, f"cannot take its lock {lock.path}: {exc.strerror or exc}") from exc
    if holder is not None:  # another live run works on it: its outcome is that run's to report
        rep = InputReport(input=label, status="locked", attempts=batch.attempts[label],
                          note=f"in progress in another run ({holder.describe()}); not processed by this run",
                          dicom=series_details(item) if isinstance(item, SeriesRef) else None,
                          seconds=round(time.perf_counter() - t0, 3))
        get_run_logger().info("%s: %s", label, rep.note)
        return rep.to_dict()
    try:
        if isinstance(item, (SeriesRef, ChannelFiles)):
            if target.remote:  # as `segflow segment`: the series' outputs are written locally only
                what = "DICOM series" if isinstance(item, SeriesRef) else "nnU-Net channel files"
                raise InputError(label, f"{what} cannot be written to a URL output yet; use a local --out")
            result = _segment_input(item, item, target, batch, t0, lock)
        else:
            with staging.staged_input(item, target.local) as local:  # path itself, or a URL's downloaded copy
                result = _segment_input(item, local, target, batch, t0, lock)
        notes = [result.get("note"), lock.broken,
                 "its lock was broken by another run while it ran (no heartbeat for longer than the stale "
                 "timeout?): check its outputs" if lock.lost or not lock.still_held() else None]
        result["note"] = "; ".join(n for n in notes if n) or None
        return result
    except LockLostError as exc:  # another run took the input over while this one stalled: its outcome is that run's
        rep = InputReport(input=label, status="locked", attempts=batch.attempts[label], note=exc.problem,
                          dicom=series_details(item) if isinstance(item, SeriesRef) else None,
                          seconds=round(time.perf_counter() - t0, 3))
        get_run_logger().warning("%s: %s", label, exc.problem)
        return rep.to_dict()
    except BaseException as exc:
        if is_native_panic(exc):  # an Exception fails this input's task; a BaseException crashed the whole flow
            raise InputError(label, f"a native decoder failed on it ({one_line(exc)})") from None
        raise
    finally:
        try:
            target.close()
        finally:
            lock.release()


def drop_leftover_work(out_dir: Path, stem: str) -> None:
    """Remove what a killed run of ``stem`` left for a resume that will never come, now that its outputs are done:
    the ingested copies (``.segflow-work/<stem>.c<chunk>.<kind>.zarr``) and hidden partial stores
    (``.<stem>.zarr.<id>.partial``); a skipped input's stayed there night after night.  Names are matched whole,
    so another input's (``a`` beside ``a.b``) are never touched; the caller holds ``stem``'s lock."""
    import re
    import shutil

    from flows.pipeline import WORK_DIR

    name = re.escape(stem)
    patterns = ((out_dir / WORK_DIR, re.compile(rf"{name}\.c(\d+|default)\.(image|model|mosaic)\.zarr")),
                (out_dir, re.compile(rf"\.{name}\.zarr(\.[0-9a-f]{{16}})?\.partial")))
    for folder, pattern in patterns:
        for entry_name in _names_in(folder):
            entry = folder / entry_name
            if pattern.fullmatch(entry_name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


_LISTINGS: dict[Path, tuple[int, list[str]]] = {}  # folder -> (its mtime, the names in it) as last listed


def _names_in(folder: Path) -> list[str]:
    """The names in ``folder``, listed again only when it changed (its mtime): every skipped input looked for its
    leftovers by listing the whole output folder, so a night of N done inputs cost N^2 (200 ms a skip at 24,000
    entries).  Only names a leftover can have are kept (hidden ones, and the work folder's)."""
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:
        return []
    cached = _LISTINGS.get(folder)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    every = folder.name.startswith(".")  # the work folder: all of it; OUT: its hidden names only
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if every or e.name.startswith(".")]
    except OSError:
        return []
    if len(_LISTINGS) > 64:
        _LISTINGS.clear()
    _LISTINGS[folder] = (mtime, names)
    return names


def input_lock(target: staging.OutputTarget, stem: str, stale_after: float) -> locks.InputLock:
    """The input's lock: ``OUT/.segflow-locks/<stem>.lock``; for an output URL, beside its local staging
    folder (``<staging root>/.segflow-locks/<digest of the URL>-<stem>.lock``), which only runs on this machine
    share."""
    if target.remote:
        return locks.InputLock(target.local.parent / locks.LOCKS_DIR, target.local.name, stale_after=stale_after)
    return locks.InputLock(target.local / locks.LOCKS_DIR, stem, stale_after=stale_after)


def _segment_input(item: Expanded, local: Expanded, target: staging.OutputTarget, batch: Batch,
                   t0: float, lock: locks.InputLock) -> dict[str, Any]:
    from flows.pipeline import segment_one

    path = input_label(item)  # a file's path or URL; a series' display
    series = item if isinstance(item, SeriesRef) else None
    channel_files = item if isinstance(item, ChannelFiles) else None
    rep = InputReport(input=path, status="done", attempts=batch.attempts[path])
    if series is not None:
        rep.dicom = series_details(series)
    content = None  # a STAC item's identity: its JSON and the content of the assets the model reads
    if batch.inbox_roots is not None and local == item:  # (a staged copy of a remote input is segflow's own)
        check_own_files(path, own_files(item), batch.inbox_roots)
    if series is None and channel_files is None:
        check_named_sources(local, batch.source_roots, origin=path if local != path else None)
    if series is None and channel_files is None and is_item_path(local):
        routed = route_item(local, batch.models, batch.options, origin=path if local != path else None, shown=path)
        header, entry, content, reason = routed.header, routed.entry, routed.sha256, routed.reason
        rep.kind = "raster"
    else:
        header = probe(local)
        forged = forged_problem(local, header)
        if forged is not None:
            raise CorruptInputError(path, forged)
        entry = route(header, batch.models)
        reason = None if entry is not None else no_model_reason(header, batch.models)
    if header is not None:
        rep.kind, rep.channels = header.kind, header.channels
    if entry is None or header is None:
        rep.status, rep.error = "no-model", reason
        rep.seconds = round(time.perf_counter() - t0, 3)
        return rep.to_dict()
    model = loaded(entry, trust_bundle=batch.options.trust_bundle)
    rep.model, rep.model_path = model.name, entry.path
    classes = [c.model_dump(mode="json") for c in model.card.classes]
    group = series or channel_files
    rep.input_sha256 = content or (_hash_group(group) if group is not None else _hash_input(local))
    document = ledger.key_document(rep.input_sha256, model.weights_sha256, model.card, batch.options,
                                   stem=input_stem(item),
                                   one_slice=one_slice(header, ModelInput.of(model.card)))
    rep.cache_key = ledger.cache_key(document)
    if target.remote:  # the same checks, on a scratch copy of the entry and outputs under the URL
        hit, why_not, adopted = staging.remote_lookup(target, rep.cache_key, document, path, entry.path)
    else:
        recorded_before = ledger.entry_path(batch.out_dir, rep.cache_key).is_file()
        # never recorded: outputs of `segflow segment` count too (adopted)
        hit, why_not = ledger.done_before(batch.out_dir, path, document, entry.path, stem=input_stem(item))
        adopted = hit is not None and not recorded_before
    if hit is not None:
        rep.status = "skipped"
        rep.note = (f"same input, model and parameters done {hit.record.get('finished')}"
                    + (" (outputs without a cache entry, verified and adopted)" if adopted else ""))
        if not target.remote:
            drop_leftover_work(Path(batch.out_dir), input_stem(item))
        rep.outputs = hit.outputs
        statistics = hit.record.get("statistics", {})
    else:
        another = None if target.remote or group is not None or local != item else \
            outputs_of_another(local, batch.out_dir, content=rep.input_sha256)
        if another is not None:  # another night's input of the same name: its outputs had been replaced
            raise IncompatibleInputError(path, another)
        outcome = segment_one(local, model, target.local, batch.options, batch.client,
                              record_input_as=path if group is None and local != path else None,
                              still_ours=lambda: not lock.lost and lock.still_held())
        sidecar = next(o for o in outcome.outputs if o.endswith(".provenance.json"))
        try:
            recorded = ledger.record_done(target.local, rep.cache_key, document, input_path=path,
                                          model_path=entry.path, sidecar=sidecar)
            unrecorded = "the input or model changed during the run"
        except OSError as exc:  # the outputs are complete and verified; only the skip next time is lost
            recorded, unrecorded = None, (f"its ledger entry could not be written ({exc.strerror or exc}); the "
                                          "next run processes it again")
        if recorded is None:
            rep.note = f"outputs written but not recorded as done: {unrecorded}"
        elif why_not:
            rep.note = f"processed again: {why_not}"
        outcome = target.publish(outcome, extra=[recorded] if recorded else [])  # a URL: upload, entry last
        rep.outputs = outcome.outputs
        statistics = outcome.statistics
        rep.note = "; ".join(n for n in (rep.note, resumed_note(statistics)) if n) or None
    fill_from_statistics(rep, statistics, classes, header.cell_size, header.cell_unit, header.cell_note)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep.to_dict()
