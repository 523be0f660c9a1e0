"""The ``nightly`` flow: segment what is new in an inbox or a manifest, skip what is done, report.

One Prefect task run per input (``segment-input``); the window-level work of
each stays in the Dask graph ``segment_one`` builds.  Each task run:

1. reads the input's header (:func:`storage.probe.probe`) and picks the first
   model whose card fits it (:mod:`flows.routing`); none fits: status
   ``no-model``, nothing processed.  A file that cannot be read fails here,
   whatever the models: its header, or (a GeoTIFF) its block table running
   past the end of the file;
2. hashes the input and builds the content key (:mod:`flows.ledger`); when the
   key's outputs exist and verify: status ``skipped``;
3. otherwise runs ``segment_one`` and records the key once the outputs are
   complete: status ``done``.

All of this runs under the input's lock (:mod:`flows.locks`,
``OUT/.segflow-locks/<stem>.lock``), taken before anything else: when another
live run holds it, the input is reported ``locked`` ("in progress in another
run (host, pid)"), nothing is done for it, and it does not fail the run (the
other run reports its outcome; the next run skips it).  The ledger is looked up
only once the lock is held, so an input the other run finished meanwhile is
``skipped``, never redone.  For an output URL the lock lives beside the local
staging folder (``$SEGFLOW_STAGING_DIR/.segflow-locks/``): it keeps runs on
one machine apart, not runs on different machines.

A task that raises fails alone: the others run, and the flow ends ``Failed``
with "k of n inputs failed" and the report as its result.  Transient I/O
errors (:func:`is_transient`) are retried by Prefect (``retries``,
``retry_condition_fn``); bad input (``InputError``) and every other error are
not.  A bad input is tried again on every run, even with an unchanged hash:
its failure stays in each night's report, and a fixed reader or a new model
can make it succeed; reading a header costs little.

The inbox, the manifest, its entries and the output directory may be fsspec
URLs (``s3://bucket/inbox/``): an input URL is downloaded before its header is
read, outputs bound for a URL are uploaded once complete, and the ledger and
the reports are kept under the output URL (:mod:`flows.staging`).

DICOM arrives as folders: an inbox's sub-folder holding DICOM files, a
DICOMDIR, loose ``.dcm`` files, or such a path in a manifest is expanded
(:func:`flows.inputs.expand`) into one item per series volume before any task
runs.  A series is routed by its headers like a NIfTI scan (3-D, 1 channel),
keyed by :meth:`storage.dicom.SeriesRef.sha256` (its files' contents), named
in the report and in errors by ``SeriesRef.display`` (folder and UIDs, never a
patient identifier) and its outputs by ``SeriesRef.name``.  A folder that
holds no image series fails alone, like a bad file.
"""

from __future__ import annotations

import csv
import errno
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run as flow_run_info
from prefect.runtime import task_run as task_run_info
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows import ledger, locks, progress, staging
from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.inputs import Expanded, expand, input_label, input_stem
from flows.report import InputReport, counts, fill_from_statistics, summary, timestamp
from flows.routing import ModelEntry, loaded, no_model_reason, read_models, route
from flows.runlog import exception_chain
from storage import provenance
from storage.dicomfiles import SeriesRef, is_dicom_input
from storage.errors import ConfigError, ExportError, InputError, SegflowError
from storage.hashing import sha256_input
from storage.ingest import kind_of, stem_of
from storage.stacitem import is_item_path
from storage.probe import probe
from storage.remote import is_url

# ----------------------------------------------------------------------------- inputs


def list_inbox(folder: str | Path) -> tuple[list[str], list[str]]:
    """(inputs, ignored): the inbox's files and DICOM folders segflow reads, sorted; hidden entries skipped,
    other files and folders ignored.

    An Analyze/NIfTI pair is one input, read through its ``.hdr``.  A sub-folder holding DICOM files (at
    any depth), a DICOMDIR and a file with the DICOM preamble are listed as they are; :func:`flows.inputs.expand`
    turns them into series.  A URL prefix lists its objects (DICOM is read from local folders only).
    """
    if is_url(str(folder)):
        return _list_inbox_url(str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(folder, "inbox is not a directory")
    inputs, ignored = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or not p.is_file():
            if p.is_dir() and _is_dicom(p):
                inputs.append(str(p))
            elif p.is_dir():
                ignored.append(str(p))
            continue
        try:
            kind_of(p)
        except InputError:
            (inputs if _is_dicom(p) else ignored).append(str(p))
            continue
        if is_item_path(p):  # STAC items are segmented by `segflow segment item.json`; nightly does not route them
            ignored.append(str(p))
            continue
        if p.name.lower().endswith(".img") and p.with_suffix(".hdr").exists():
            continue
        inputs.append(str(p))
    return inputs, ignored


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom_input(path)
    except OSError:
        return False


def _list_inbox_url(url: str) -> tuple[list[str], list[str]]:
    """:func:`list_inbox` of a URL prefix: the objects directly under it."""
    from storage import remote

    try:
        files = remote.list_files(url)
    except FileNotFoundError:
        raise ConfigError(url, "inbox not found (no such bucket or prefix)") from None
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
        raise ConfigError(url, f"cannot list the inbox: {type(exc).__name__}: {exc}") from exc
    names = {remote.name_of(f) for f in files}
    inputs, ignored = [], []
    for f in files:
        name = remote.name_of(f)
        if name.startswith("."):
            continue
        try:
            kind_of(name)
        except InputError:
            ignored.append(f)
            continue
        if is_item_path(name):
            ignored.append(f)
            continue
        if name.lower().endswith(".img") and (stem_of(name) + ".hdr") in names:
            continue
        inputs.append(f)
    return inputs, ignored


def read_manifest(path: str | Path) -> list[str]:
    """The inputs a manifest lists: CSV with a ``path`` column, or JSON (a list of paths, of {"path": ...}
    objects, or an object with an "inputs" or "paths" list). Relative paths are relative to the manifest.
    Entries may be URLs; the manifest itself may be one (its relative entries are then URLs beside it)."""
    url = str(path) if is_url(str(path)) else None
    path = Path(path)
    if url is not None:
        from storage import remote

        try:
            text = remote.read_bytes(url).decode("utf-8-sig")
        except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
            raise ConfigError(url, f"cannot read manifest: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(path, f"cannot read manifest: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        column = next((c for c in (rows[0].keys() if rows else []) if c and c.strip().lower() == "path"), None)
        if column is None:
            raise ConfigError(url or path, "CSV manifest needs a 'path' column")
        items: list[Any] = [r[column] for r in rows]
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(url or path, f"manifest is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data = data.get("inputs", data.get("paths"))
        if not isinstance(data, list):
            raise ConfigError(url or path, "JSON manifest must be a list of paths or an object with an 'inputs' list")
        items = [d.get("path") if isinstance(d, dict) else d for d in data]
    else:
        raise ConfigError(url or path, "manifest must be a .csv or .json file")
    if not all(isinstance(i, str) for i in items):
        raise ConfigError(url or path, "every manifest entry must be a path string")
    out = []
    for item in (i.strip() for i in items):
        if item and (is_url(item) or url is not None):
            from storage import remote

            out.append(item if is_url(item) or item.startswith("/") else remote.resolve(remote.parent_of(url), item))
        elif item:
            p = Path(item).expanduser()
            out.append(str(p if p.is_absolute() else path.parent / p))
    return out


# ----------------------------------------------------------------------------- retries

TRANSIENT_ERRNOS = frozenset(e for e in (
    errno.EIO, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ESTALE, errno.ENOLCK, getattr(errno, "EREMOTEIO", None),
) if e is not None)


class TransientError(Exception):
    """A failure expected to pass on a later attempt (raise it to ask for a retry)."""


def is_transient(exc: BaseException) -> bool:
    """Retry?  Yes for timeouts, dropped connections and OSErrors with a transient errno (EIO, EAGAIN,
    ETIMEDOUT, ECONNRESET, ESTALE...), also when a reader wrapped them in an ``InputError``; no for the rest."""
    from distributed.comm import CommClosedError

    for e in exception_chain(exc):
        if isinstance(e, (TransientError, TimeoutError, ConnectionError, CommClosedError)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def retry_if_transient(task_, task_run, state) -> bool:  # noqa: ANN001 (Prefect's retry_condition_fn signature)
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


def one_line(exc: BaseException) -> str:
    if isinstance(exc, SegflowError):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ----------------------------------------------------------------------------- one input


@dataclass
class _Batch:
    """What every task run of one flow run shares (passed quoted: Prefect does not inspect it)."""

    models: list[ModelEntry]
    options: SegmentOptions
    out_dir: str
    client: Any
    attempts: dict[str, int] = field(default_factory=dict)
    lock_stale_after: float = locks.DEFAULT_STALE_AFTER_S


def _hash_input(path: str) -> str:
    try:
        return sha256_input(path)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from exc


def _hash_series(ref: SeriesRef) -> str:
    """The series' content key: one digest over its files' sha256s (a file gone since listing: one line)."""
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
def segment_input(item: Expanded, name: str, batch: _Batch) -> dict[str, Any]:
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
        raise ExportError(lock.path, f"cannot take the input's lock: {exc.strerror or exc}") from exc
    if holder is not None:  # another live run works on it: its outcome is that run's to report
        rep = InputReport(input=label, status="locked", attempts=batch.attempts[label],
                          note=f"in progress in another run ({holder.describe()}); not processed by this run",
                          dicom=series_details(item) if isinstance(item, SeriesRef) else None,
                          seconds=round(time.perf_counter() - t0, 3))
        get_run_logger().info("%s: %s", label, rep.note)
        return rep.to_dict()
    try:
        if isinstance(item, SeriesRef):
            if target.remote:  # as `segflow segment`: the series' outputs are written locally only
                raise InputError(label, "DICOM series cannot be written to a URL output yet; use a local --out")
            result = _segment_input(item, item, target, batch, t0)
        else:
            with staging.staged_input(item, target.local) as local:  # path itself, or a URL's downloaded copy
                result = _segment_input(item, local, target, batch, t0)
        notes = [result.get("note"), lock.broken,
                 "its lock was broken by another run while it ran (no heartbeat for longer than the stale "
                 "timeout?): check its outputs" if lock.lost or not lock.still_held() else None]
        result["note"] = "; ".join(n for n in notes if n) or None
        return result
    finally:
        try:
            target.close()
        finally:
            lock.release()


def input_lock(target: staging.OutputTarget, stem: str, stale_after: float) -> locks.InputLock:
    """The input's lock: ``OUT/.segflow-locks/<stem>.lock``; for an output URL, beside its local staging
    folder (``<staging root>/.segflow-locks/<digest of the URL>-<stem>.lock``), which only runs on this machine
    share."""
    if target.remote:
        return locks.InputLock(target.local.parent / locks.LOCKS_DIR, target.local.name, stale_after=stale_after)
    return locks.InputLock(target.local / locks.LOCKS_DIR, stem, stale_after=stale_after)


def _segment_input(item: Expanded, local: Expanded, target: staging.OutputTarget, batch: _Batch,
                   t0: float) -> dict[str, Any]:
    from flows.pipeline import segment_one

    path = input_label(item)  # a file's path or URL; a series' display
    series = item if isinstance(item, SeriesRef) else None
    rep = InputReport(input=path, status="done", attempts=batch.attempts[path])
    if series is not None:
        rep.dicom = series_details(series)
    header = probe(local)
    rep.kind, rep.channels = header.kind, header.channels
    entry = route(header, batch.models)
    if entry is None:
        rep.status, rep.error = "no-model", no_model_reason(header, batch.models)
        rep.seconds = round(time.perf_counter() - t0, 3)
        return rep.to_dict()
    model = loaded(entry, trust_bundle=batch.options.trust_bundle)
    rep.model, rep.model_path = model.name, entry.path
    classes = [c.model_dump(mode="json") for c in model.card.classes]
    rep.input_sha256 = _hash_series(series) if series is not None else _hash_input(local)
    document = ledger.key_document(rep.input_sha256, model.weights_sha256, model.card, batch.options)
    rep.cache_key = ledger.cache_key(document)
    if target.remote:  # the same checks, on a scratch copy of the entry and outputs under the URL
        hit, why_not, adopted = staging.remote_lookup(target, rep.cache_key, document, path, entry.path)
    else:
        hit, why_not = ledger.lookup(batch.out_dir, rep.cache_key, rep.input_sha256, model.weights_sha256)
        adopted = False
        if hit is None and why_not is None:  # never recorded: outputs of `segflow segment` count too
            hit, _ = ledger.adopt(batch.out_dir, path, rep.cache_key, document, entry.path, stem=input_stem(item))
            adopted = hit is not None
    if hit is not None:
        rep.status = "skipped"
        rep.note = (f"same input, model and parameters done {hit.record.get('finished')}"
                    + (" (outputs without a cache entry, verified and adopted)" if adopted else ""))
        rep.outputs = hit.outputs
        statistics = hit.record.get("statistics", {})
    else:
        outcome = segment_one(local, model, target.local, batch.options, batch.client,
                              record_input_as=path if series is None and local != path else None)
        sidecar = next(o for o in outcome.outputs if o.endswith(".provenance.json"))
        recorded = ledger.record_done(target.local, rep.cache_key, document, input_path=path,
                                      model_path=entry.path, sidecar=sidecar)
        if recorded is None:
            rep.note = "outputs written but not recorded as done: the input or model changed during the run"
        elif why_not:
            rep.note = f"processed again: {why_not}"
        outcome = target.publish(outcome, extra=[recorded] if recorded else [])  # a URL: upload, entry last
        rep.outputs = outcome.outputs
        statistics = outcome.statistics
    fill_from_statistics(rep, statistics, classes, header.cell_size, header.cell_unit, header.cell_note)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep.to_dict()


# ----------------------------------------------------------------------------- the flow


def dashboard_link(client: Any) -> str | None:
    """The Dask dashboard's address, when the scheduler serves one (its pages need bokeh, here and there)."""
    from flows.cluster import has_bokeh

    try:
        if "dashboard" not in client.scheduler_info().get("services", {}) or not has_bokeh():
            return None
        return client.dashboard_link or None
    except Exception:  # noqa: BLE001 - a dashboard address is a nicety
        return None


def _collisions(items: list[Expanded]) -> dict[str, str]:
    """Inputs whose outputs would overwrite an earlier input's (same stem): {later label: earlier label}.

    A DICOM series' stem is its ``SeriesRef.name``: the same series copied into two folders clashes.
    """
    first: dict[str, str] = {}
    clashes = {}
    for item in items:
        stem, label = input_stem(item), input_label(item)
        if stem in first:
            clashes[label] = first[stem]
        else:
            first[stem] = label
    return clashes


@flow(name="nightly", persist_result=False, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def nightly(model_dirs: list[str], out_dir: str, inbox: str | None = None, manifest: str | None = None,
            options: SegmentOptions | None = None, retries: int = 2, retry_delay_seconds: float = 10.0,
            lock_stale_after: float = locks.DEFAULT_STALE_AFTER_S):  # noqa: ANN201
    """Segment the new inputs of an inbox folder or a manifest with the model that fits each; write a run report.

    Ends Completed when every input is done, skipped or locked (in progress in
    another run), else Failed ("k of n inputs failed"); either way the report
    (a dict) is the state's data.  ``lock_stale_after``: seconds without a
    heartbeat after which another run's lock on an input is broken.
    """
    options = options or SegmentOptions()
    logger = get_run_logger()
    started, stamp, t0 = provenance.now(), timestamp(), time.perf_counter()
    if (inbox is None) == (manifest is None):
        raise ConfigError(None, "give an inbox folder or a manifest (one of them)")
    inbox = _absolute(inbox)
    manifest = _absolute(manifest)
    if inbox is not None:
        paths, ignored = list_inbox(inbox)
    else:
        paths, ignored = read_manifest(manifest), []
    paths = list(dict.fromkeys(paths))  # a path listed twice is one input
    items, unusable = expand(paths)  # DICOM folders, DICOMDIRs and loose DICOM files: one item per series volume
    by_label = {input_label(i): i for i in items}  # a series reached twice (folder and DICOMDIR) is one input
    models = read_models(model_dirs, trust_bundle=options.trust_bundle)  # a bad model fails the run up front
    for m in models:
        loaded(m, trust_bundle=options.trust_bundle)
    if is_url(out_dir):  # outputs, ledger and reports under a URL prefix (flows/staging.py)
        out: Any = out_dir.rstrip("/")
    else:
        out = Path(out_dir).expanduser().absolute()
        out.mkdir(parents=True, exist_ok=True)
    clashes = _collisions(list(by_label.values()))
    reports: dict[str, InputReport] = {
        p: InputReport(input=p, status="failed", attempts=0,
                       error=f"{p}: its outputs would overwrite those of {clashes[p]} (same name stem); "
                             "rename one of them") for p in clashes}
    for label, error in unusable:  # e.g. a folder without an image series: fails alone, nothing to route
        reports[label] = InputReport(input=label, status="failed", attempts=1, error=error)
        logger.info("input failed: %s", error)
    todo = [p for p in by_label if p not in clashes]
    cluster_kw = {"gpus": True} if getattr(options, "gpus", False) else {}
    with dask_client(options.dask_address, workers=options.workers, dashboard=True, **cluster_kw) as client:
        dashboard = dashboard_link(client)
        scheduler = getattr(client.scheduler, "address", None)
        # dask_client said which scheduler, and where its dashboard is, as it started or reached it
        batch = _Batch(models=models, options=options, out_dir=str(out), client=client,
                       lock_stale_after=lock_stale_after)
        run_task = segment_input.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        bar = progress.reporter()
        bar.start("nightly", "nightly inputs", total=len(todo))
        futures = {run_task.submit(quote(by_label[p]), _task_name(by_label[p]), quote(batch)): p for p in todo}
        for future in as_completed(list(futures)):
            path = futures[future]
            future.wait()  # sets the future's final state locally (no API read of a stale one)
            state = future.state
            if state.is_completed():
                reports[path] = InputReport(**future.result())
            else:
                exc = state.result(raise_on_failure=False)
                error = one_line(exc) if isinstance(exc, BaseException) else (state.message or state.name)
                item = by_label[path]
                reports[path] = InputReport(input=path, status="failed", error=error,
                                            attempts=batch.attempts.get(path, 0),
                                            dicom=series_details(item) if isinstance(item, SeriesRef) else None)
                logger.info("input failed: %s", error)
            bar.advance("nightly")
        bar.finish("nightly")
    inputs = [reports[p] for p in [*by_label, *(label for label, _ in unusable)]]
    message = summary(inputs)
    ok = all(r.status in ("done", "skipped", "locked") for r in inputs)
    report = {
        "schema": "segflow.nightly-report/1",
        "run": {
            "flow_run_id": flow_run_info.get_id(), "flow_run_name": flow_run_info.get_name(),
            "started": started, "finished": provenance.now(), "seconds": round(time.perf_counter() - t0, 3),
            "state": "Completed" if ok else "Failed", "summary": message,
            "inbox": str(inbox) if inbox else None, "manifest": str(manifest) if manifest else None,
            "out_dir": str(out), "ignored": ignored,
            "models": [{"path": m.path, "name": m.card.name, "spatial_dims": m.spatial_dims, "channels": m.channels,
                        "weights_sha256": loaded(m, trust_bundle=options.trust_bundle).weights_sha256}
                       for m in models],
            "options": options.model_dump(mode="json"),
            "dask_scheduler": scheduler, "dashboard": dashboard,
            "counts": counts(inputs),
        },
        "inputs": [r.to_dict() for r in inputs],
    }
    json_path, md_path = staging.write_report(report, out, stamp)
    report["report"] = {"json": str(json_path), "markdown": str(md_path)}
    html_path = _html_report(report, json_path, logger)
    if html_path is not None:
        report["report"]["html"] = str(html_path)
    from flows.artifacts import publish_artifacts
    from flows.htmlreport import find_quicklooks

    publish_artifacts(report, html_path=html_path, quicklooks={} if html_path is None else find_quicklooks(report))
    logger.info("%s; report %s", message, md_path)
    return Completed(message=message, data=report) if ok else Failed(message=message, data=report)


def _html_report(report: dict[str, Any], json_path: Any, logger: Any) -> Path | None:
    """The run's HTML page beside its JSON report (a local OUT only), with the change since the previous run;
    a page that cannot be written is a warning, never a failed run."""
    from flows.htmlreport import find_quicklooks, previous_report_path, read_run_report, write_html_report

    if is_url(str(json_path)):
        return None
    try:
        prev = previous_report_path(Path(json_path))
        previous = read_run_report(prev) if prev else None
        return write_html_report(report, Path(json_path).with_suffix(".html"), quicklooks=find_quicklooks(report),
                                 previous=previous)
    except (SegflowError, OSError) as exc:
        logger.warning("no HTML report: %s", exc)
        return None


def _task_name(item: Expanded) -> str:
    """The task run's name: the file's name, or the series' sanitised output stem."""
    return item.name if isinstance(item, SeriesRef) else Path(item).name


def _absolute(path: str | None) -> str | None:
    """A local path made absolute; a URL as it is."""
    if path is None or is_url(path):
        return path
    return str(Path(path).expanduser().absolute())


def nightly_report(state: Any) -> dict[str, Any]:
    """The report of a finished ``nightly`` run, failed or not; re-raises what stopped the run before any report."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result
