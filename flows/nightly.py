"""The ``nightly`` flow: segment what is new in an inbox or a manifest, skip what is done, report.

One Prefect task run per input (``segment-input``); the window-level work of
each stays in the Dask graph ``segment_one`` builds.  Each task run:

1. reads the input's header (:func:`storage.probe.probe`) and picks the first
   model whose card fits it (:mod:`flows.routing`); none fits: status
   ``no-model``, nothing processed.  A STAC item goes to the first 2-D model
   whose bands it offers, its assets' headers read as ingest reads them.  A file that cannot be read fails here,
   whatever the models: its header, or (a GeoTIFF) its block table running
   past the end of the file;
2. hashes the input and builds the content key (:mod:`flows.ledger`); when the
   key's outputs exist and verify: status ``skipped``.  An item's hash covers
   its JSON, the bands picked and each asset it reads (sha256 of a local
   file; the item's ``file:checksum`` and size, else the href, for a remote one);
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

Where the parts live: the inputs of an inbox or manifest in
:mod:`flows.inbox`, the per-input task in :mod:`flows.nightly_task`, the retry
rule in :mod:`flows.retries`; this module is the flow (list, submit, collect,
report).  ``list_inbox``, ``read_manifest``, ``is_transient`` and
``TransientError`` are importable from here too, as docs/nightly.md names them.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run as flow_run_info
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows import interrupts, locks, progress, staging
from flows.cluster import dask_client
from flows.config import MAX_PARALLEL, SegmentOptions
from flows.inbox import check_inbox, claimed_by_items, list_inbox, read_manifest, still_arriving
from flows.inputs import Expanded, expand, input_label, output_clashes
from flows.nightly_task import Batch, segment_input, series_details
from flows.report import REPORT_SCHEMA, REPORTS_DIR, InputReport, counts, summary, timestamp
from flows.retries import TransientError, is_transient
from flows.routing import loaded, read_models
from flows.runlog import own_errors_in_one_line
from flows.runstate import ended, run_result
from storage import provenance
from storage.atomic import make_output_folder
from storage.channelfiles import ChannelFiles
from storage.dicomfiles import SeriesRef
from storage.errors import ConfigError, SegflowError, one_line
from storage.remote import is_url

__all__ = ["nightly", "nightly_report", "dashboard_link", "list_inbox", "read_manifest", "is_transient",
           "TransientError"]

STOPPED_NOTE = "stopped by the run's interruption at a chunk boundary: its finished chunks are kept for the next run"


def dashboard_link(client: Any) -> str | None:
    """The Dask dashboard's address, when the scheduler serves one (its pages need bokeh, here and there)."""
    from flows.cluster import has_bokeh

    try:
        if "dashboard" not in client.scheduler_info().get("services", {}) or not has_bokeh():
            return None
        return client.dashboard_link or None
    except Exception:  # noqa: BLE001 - a dashboard address is a nicety
        return None


@flow(name="nightly", persist_result=False, log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL))
def nightly(model_dirs: list[str], out_dir: str, inbox: str | None = None, manifest: str | None = None,
            options: SegmentOptions | None = None, retries: int = 2, retry_delay_seconds: float = 10.0,
            lock_stale_after: float = locks.DEFAULT_STALE_AFTER_S, settle_seconds: float = 0.0,
            parallel: int = 1, source_roots: list[str] | None = None):  # noqa: ANN201
    """Segment the new inputs of an inbox folder or a manifest with the model that fits each; write a run report.

    Ends Completed when every input is done, skipped or locked (in progress in
    another run), else Failed ("k of n inputs failed"); either way the report
    (a dict) is the state's data.  ``lock_stale_after``: seconds without a
    heartbeat after which another run's lock on an input is broken.  ``settle_seconds``: inbox entries changed
    more recently than this are still arriving and left for the next run (listed in the report, no failure).
    ``parallel``: inputs in flight at once, their windows sharing the cluster.  A parameter, not the task
    runner's size, so that a served deployment (``segflow schedule --parallel``) takes it too.
    ``source_roots``: folders besides a local inbox whose files an inbox's VRTs and STAC items may name as
    sources (:mod:`storage.sources`); a manifest's inputs are the operator's list and are not limited.
    """
    options = options or SegmentOptions()
    logger = get_run_logger()
    own_errors_in_one_line()  # a served run's console: a night that cannot start is one line, not a traceback
    started, stamp, t0 = provenance.now(), timestamp(), time.perf_counter()
    _check_numbers(retries, retry_delay_seconds, lock_stale_after, settle_seconds, parallel)
    if (inbox is None) == (manifest is None):
        raise ConfigError(None, "give an inbox folder or a manifest (one of them)")
    inbox = _absolute(inbox)
    manifest = _absolute(manifest)
    check_out_beside_inbox(inbox, out_dir)  # before any report: OUT inside the inbox is no place to write one
    with _reported_if_unstarted(out_dir, inbox, manifest, started, stamp, t0):
        arriving: dict[str, float] = {}
        if inbox is not None:
            paths, ignored = list_inbox(inbox)
            claimed = {} if is_url(inbox) else claimed_by_items(paths, ignored)
            arriving = still_arriving(paths, settle_seconds)
            paths = [p for p in paths if p not in arriving]
            for p, age in arriving.items():
                logger.info("still arriving (changed %.0f s ago), left for the next run: %s", age, p)
        else:
            paths, ignored, claimed = read_manifest(manifest), [], {}
        listed = Counter(paths)
        paths = list(dict.fromkeys(paths))  # a path listed twice is one input, and the report says so
        duplicates = [{"input": p, "listed": n} for p, n in listed.items() if n > 1]
        models = read_models(model_dirs, trust_bundle=options.trust_bundle)  # a bad model fails the run up front
        # DICOM folders, DICOMDIRs and loose DICOM files: one item per series volume; a case's nnU-Net channel files
        # one item, unless no model takes that many channels and one takes one (one-channel scans numbered so); a 2-D
        # model not in metres takes them too, one slice thick (nnU-Net's 2-D images: routing.one_slice)
        items, unusable = expand(paths, {m.channels for m in models if m.spatial_dims == 3 or not m.card.in_metres})
        by_label = {input_label(i): i for i in items}  # a series reached twice (folder and DICOMDIR) is one input
        for m in models:
            loaded(m, trust_bundle=options.trust_bundle)
        if is_url(out_dir):  # outputs, ledger and reports under a URL prefix (flows/staging.py)
            out: Any = out_dir.rstrip("/")
        else:
            out = make_output_folder(Path(out_dir).expanduser().absolute())
            make_output_folder(out / REPORTS_DIR)  # the run ends by writing its report there: a file in the way fails
        labels = list(by_label)
        clashes = {labels[i]: error for i, error in output_clashes(list(by_label.values()), usable=_readable).items()}
        reports: dict[str, InputReport] = {p: InputReport(input=p, status="failed", attempts=0, error=error)
                                           for p, error in clashes.items()}
        for label, error in unusable:  # e.g. a folder without an image series: fails alone, nothing to route
            reports[label] = InputReport(input=label, status="failed", attempts=1, error=error)
            logger.info("input failed: %s", error)
        todo = [p for p in by_label if p not in clashes]
    cluster_kw = {"gpus": True} if getattr(options, "gpus", False) else {}
    with dask_client(options.dask_address, workers=options.workers, dashboard=True, **cluster_kw) as client:
        dashboard = dashboard_link(client)
        scheduler = getattr(client.scheduler, "address", None)
        # dask_client said which scheduler, and where its dashboard is, as it started or reached it
        roots = allowed_sources(inbox, source_roots)
        batch = Batch(models=models, options=options, out_dir=str(out), client=client,
                      lock_stale_after=lock_stale_after, source_roots=roots,
                      inbox_roots=roots if inbox and not is_url(inbox) else None)
        run_task = segment_input.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        bar = progress.reporter()
        # the inputs refused before their task (an output name clash, a folder with no series) are counted too:
        # "6 of 6 processed" had come above "4 of 7 inputs failed"
        bar.start("nightly", "nightly inputs", total=len(todo) + len(reports))
        bar.advance("nightly", len(reports))
        futures: dict[Any, str] = {}
        # a Ctrl-C or SIGTERM from here on: nothing new starts, the inputs in flight stop at their next chunk and
        # keep their partial work, and only then does the client close (it had closed under them: their failures
        # deleted it); the flow then raises flows.interrupts.Interrupted
        with interrupts.deferred_interrupts():
            queue = list(todo)  # not submitted yet: one goes as each in flight ends, ``parallel`` at a time
            submitted: dict[str, float] = {}  # when each went: a failed input's seconds (the report had none)

            def submit_next() -> Any | None:
                if not queue or interrupts.interrupted() is not None:
                    return None
                p = queue.pop(0)
                future = run_task.submit(quote(by_label[p]), _task_name(by_label[p]), quote(batch))
                futures[future] = p
                submitted[p] = time.perf_counter()
                return future

            first = [submit_next() for _ in range(min(parallel, len(todo)))]
            for future in _completed([f for f in first if f is not None], submit_next):
                path = futures[future]
                future.wait()  # sets the future's final state locally (no API read of a stale one)
                state = future.state
                if state.is_completed():
                    reports[path] = InputReport(**future.result())
                else:
                    exc = state.result(raise_on_failure=False)
                    error = one_line(exc, path) if isinstance(exc, BaseException) else (state.message or state.name)
                    item = by_label[path]
                    reports[path] = InputReport(input=path, status="failed", error=error,
                                                attempts=batch.attempts.get(path, 0),
                                                dicom=series_details(item) if isinstance(item, SeriesRef) else None,
                                                seconds=round(time.perf_counter() - submitted[path], 3))
                    logger.info("input failed: %s", error)
                bar.advance("nightly")
            signum = interrupts.interrupted()  # kept: leaving the block forgets it where no command's handlers are
            if signum is not None:
                _stop(list(futures))
                for future, path in futures.items():  # an input that finished while the run stopped is done
                    if path in reports or _stopped(future):  # stopped: reported as interrupted, below
                        continue
                    future.wait()  # its final state, set locally (a stopped one's wrapped future has ended)
                    if future.state.is_completed():
                        reports[path] = InputReport(**future.result())
                        bar.advance("nightly")  # processed: the count said one fewer than the report's done
        bar.finish("nightly")
    # after the client and the cluster closed in order; stopped: a report of what got done and what is left, in
    # JSON and Markdown only (a pod has seconds left), then the CLI says one line naming what got done
    stopped = signum is not None
    if stopped:
        started_inputs = set(futures.values())
        for p in todo:
            if p not in reports:
                reports[p] = InputReport(input=p, status="interrupted", attempts=batch.attempts.get(p, 0),
                                         note=STOPPED_NOTE if p in started_inputs else "not started")
    inputs = [reports[p] for p in [*by_label, *(label for label, _ in unusable)]]
    message = summary(inputs)
    ok = all(r.status in ("done", "skipped", "locked") for r in inputs)
    report = {
        "schema": REPORT_SCHEMA,
        "run": {
            "flow_run_id": flow_run_info.get_id(), "flow_run_name": flow_run_info.get_name(),
            "started": started, "finished": provenance.now(), "seconds": round(time.perf_counter() - t0, 3),
            "state": "Interrupted" if stopped else "Completed" if ok else "Failed", "summary": message,
            "inbox": str(inbox) if inbox else None, "manifest": str(manifest) if manifest else None,
            "out_dir": str(out), "ignored": ignored, "band_files": claimed,
            "arriving": [{"input": p, "changed_seconds_ago": age} for p, age in arriving.items()],
            "duplicates": duplicates,
            "models": [{"path": m.path, "name": m.card.name, "spatial_dims": m.spatial_dims, "channels": m.channels,
                        "weights_sha256": loaded(m, trust_bundle=options.trust_bundle).weights_sha256}
                       for m in models],
            "options": options.model_dump(mode="json"),
            "dask_scheduler": scheduler, "dashboard": dashboard,
            "counts": counts(inputs),
        },
        "inputs": [r.to_dict() for r in inputs],
    }
    try:
        json_path, md_path = staging.write_report(report, out, stamp)
    except (OSError, SegflowError) as exc:  # a full disk: a traceback through Prefect and the CLI, no input named
        why = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or str(exc)
        problem = f"{out}: the run report was not written: {why}"
        if stopped:
            logger.info("%s", problem)
            raise interrupts.Interrupted(signum, tuple(p for p, r in reports.items() if r.status == "done"))
        report["run"]["state"], report["report"] = "Failed", {"error": problem}
        return ended(False, f"{message}; {problem}", report)
    report["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if stopped:  # raised here, not by check_interrupt: under a Prefect worker no handler keeps the signal this long
        logger.info("interrupted: %s; report %s", message, md_path)
        raise interrupts.Interrupted(signum, tuple(p for p, r in reports.items() if r.status == "done"))
    html_path = _html_report(report, json_path)
    if html_path is not None:
        report["report"]["html"] = str(html_path)
    from flows.artifacts import publish_artifacts
    from flows.htmlreport import find_quicklooks

    publish_artifacts(report, html_path=html_path, quicklooks={} if html_path is None else find_quicklooks(report))
    logger.info("%s; report %s", message, md_path)
    return ended(ok, message, report)  # failed: the report travels inside a RunFailed (flows.runstate)


def _completed(futures: list[Any], more: Callable[[], Any | None]) -> Iterator[Any]:
    """The task runs' futures as they finish; none once the run is interrupted (:func:`flows.interrupts.interrupted`).

    ``more`` submits the next input's task run as one ends (None when none is left), so that ``parallel`` are in
    flight.  Waits on the thread pool's own futures, polling, so that an interruption is seen even when no task
    run ends (Prefect's ``as_completed`` waits for one without a timeout).
    """
    import concurrent.futures as cf

    wrapped = {getattr(f, "wrapped_future", None): f for f in futures}
    if None in wrapped:  # another task runner than the thread pool's: everything submitted, Prefect's own wait
        while (future := more()) is not None:
            futures.append(future)
        for future in as_completed(futures):
            if interrupts.interrupted() is not None:
                return
            yield future
        return
    pending = set(wrapped)
    while pending:
        if interrupts.interrupted() is not None:
            return
        done, pending = cf.wait(pending, timeout=0.05, return_when=cf.FIRST_COMPLETED)
        for w in done:
            if interrupts.interrupted() is not None:
                return
            following = more()
            if following is not None:
                wrapped[following.wrapped_future] = following
                pending.add(following.wrapped_future)
            yield wrapped[w]


def _stopped(future: Any) -> bool:
    """A task run that ended by raising the interruption (its wait re-raised it, and no report was written)."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is None or not wrapped.done():
        return False
    return wrapped.cancelled() or isinstance(wrapped.exception(), KeyboardInterrupt)


def _stop(futures: list[Any]) -> None:
    """After an interruption: cancel the task runs not started yet, and wait for those in flight to stop (they
    raise Interrupted at their next chunk, keeping their partial store and ingested copy)."""
    import concurrent.futures as cf

    wrapped = [w for w in (getattr(f, "wrapped_future", None) for f in futures) if w is not None]
    for w in wrapped:
        w.cancel()  # a queued task run never starts; a running one goes on to its next poll
    cf.wait(wrapped)
    for f in futures:
        if getattr(f, "wrapped_future", None) is None:
            f.wait()


@contextmanager
def _reported_if_unstarted(out_dir: str, inbox: str | None, manifest: str | None, started: str, stamp: str,
                           t0: float) -> Iterator[None]:
    """A run that fails before any input (a model directory missing, the inbox gone, a bad option) writes its
    report too, where OUT already exists: an operator reading OUT/reports in the morning had found no report at
    all, as if the night had not run; the error was in Prefect's UI and the worker's log only.  The error still
    ends the run; a report that cannot be written changes nothing."""
    try:
        yield
    except SegflowError as exc:
        out: Any = out_dir.rstrip("/") if is_url(out_dir) else Path(out_dir).expanduser().absolute()
        if isinstance(out, Path) and not out.is_dir():  # never make OUT for a run that did nothing
            raise
        report = {"schema": REPORT_SCHEMA,
                  "run": {"flow_run_id": flow_run_info.get_id(), "flow_run_name": flow_run_info.get_name(),
                          "started": started, "finished": provenance.now(),
                          "seconds": round(time.perf_counter() - t0, 3),
                          "state": "Failed", "summary": f"the run did not start: {one_line(exc)}",
                          "error": one_line(exc), "inbox": inbox, "manifest": manifest, "out_dir": str(out),
                          "models": [],
                          "counts": counts([])},
                  "inputs": []}
        try:
            json_path, md_path = staging.write_report(report, out, stamp)
            report["report"] = {"json": str(json_path), "markdown": str(md_path)}
            _html_report(report, json_path)
        except (OSError, SegflowError):
            pass
        raise


def check_inbox_reported(out_dir: str, inbox: str | None) -> None:
    """``segflow nightly``'s check of a local inbox before Prefect starts (a missing inbox was said after 16 s of
    start-up), with the unstarted night's report written where OUT exists, as the flow writes it."""
    if inbox is None or is_url(inbox):
        return
    with _reported_if_unstarted(out_dir, _absolute(inbox), None, provenance.now(), timestamp(), time.perf_counter()):
        check_inbox(inbox)


def _html_report(report: dict[str, Any], json_path: Any) -> Path | None:
    """The run's HTML page beside its JSON report (a local OUT only), with the change since the previous run;
    a page that cannot be written is a warning (``report["report"]["warning"]``, which the command prints in
    its own words), never a failed run."""
    from flows.htmlreport import find_quicklooks, previous_report_path, read_run_report, write_html_report

    if is_url(str(json_path)):
        return None
    try:
        prev = previous_report_path(Path(json_path))
        previous = read_run_report(prev) if prev else None
        return write_html_report(report, Path(json_path).with_suffix(".html"), quicklooks=find_quicklooks(report),
                                 previous=previous)
    except (SegflowError, OSError) as exc:
        report["report"]["warning"] = f"no HTML report: {exc}"
        return None


def _task_name(item: Expanded) -> str:
    """The task run's name: the file's name, or the series' sanitised output stem (a case's, for channel files);
    a name that is no UTF-8 with its bytes escaped (``\\udcff``): Prefect's events could not carry it."""
    name = item.name if isinstance(item, (SeriesRef, ChannelFiles)) else Path(item).name
    return name.encode("utf-8", errors="backslashreplace").decode("utf-8")


def allowed_sources(inbox: str | None, extra: list[str] | None) -> list[Path] | None:
    """Where an input's VRT or STAC item may send GDAL: a local inbox and the ``--source-root`` folders; for an
    inbox URL only the latter (a delivered file naming a local one is refused); a manifest: anywhere, unless
    folders are given."""
    roots = [Path(r).expanduser().absolute() for r in extra or []]
    if inbox is None:
        return roots or None
    return ([] if is_url(inbox) else [Path(inbox)]) + roots


def _absolute(path: str | None) -> str | None:
    """A local path made absolute, without ``..`` (resolved as the file system does: a path that went up out of a
    link); a URL as it is.  Reports name inputs by these paths, and the next night's report is matched to them: an
    inbox given as ``../n1/inbox`` had every class "not in the previous run"."""
    if path is None or is_url(path):
        return path
    local = Path(path).expanduser().absolute()
    return str(local.resolve() if ".." in local.parts else local)


def _readable(item: Expanded) -> bool:
    """Whether an input's header reads (asked of inputs that share a name stem: only such a one claims the name;
    the others fail in their own task, with their own error). URLs and DICOM series are taken as readable."""
    if not isinstance(item, str) or is_url(item):
        return True
    from storage.errors import InputError
    from storage.probe import probe

    try:
        probe(item)
    except InputError:
        return False
    return True


def _check_numbers(retries: int, retry_delay_seconds: float, lock_stale_after: float, settle_seconds: float,
                   parallel: int = 1) -> None:
    """The limits the CLI's options have, for a run started from a deployment (``lock_stale_after=0`` let a
    second run break a live lock).  Checked here, not as ``Annotated`` constraints in the signature: a served
    deployment's runner could not build its parameter model from them."""
    for name, value, least in (("retries", retries, 0), ("retry_delay_seconds", retry_delay_seconds, 0.0),
                               ("lock_stale_after", lock_stale_after, 1.0), ("settle_seconds", settle_seconds, 0.0),
                               ("parallel", parallel, 1)):
        if not value >= least:
            raise ConfigError(None, f"{name} must be >= {least:g}, got {value}")
    if parallel > MAX_PARALLEL:
        raise ConfigError(None, f"parallel must be <= {MAX_PARALLEL}, got {parallel}")


def check_out_beside_inbox(inbox: str | None, out_dir: str) -> None:
    """Refuse an output folder that is the inbox or inside it: the next night read segflow's own outputs as
    inputs (a label COG beside its scene, a STAC item 'no model fits', a folder of DICOM SEGs), and every night
    after the first failed."""
    if inbox is None or is_url(inbox) or is_url(out_dir):
        return
    box, out = Path(inbox).resolve(), Path(out_dir).expanduser().absolute().resolve()
    if out == box or box in out.parents:
        raise ConfigError(out_dir, f"is {'the inbox' if out == box else 'inside the inbox ' + str(box)}: the next "
                                   "night would read segflow's outputs as new inputs; write them elsewhere")


def nightly_report(state: Any) -> dict[str, Any]:
    """The report of a finished ``nightly`` run, failed or not; re-raises what stopped the run before any report."""
    return run_result(state)
