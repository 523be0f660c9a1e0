"""Segment a batch of inputs on one Dask cluster: the body of the ``segment-batch`` flow, free of Prefect.

:func:`flows.flows.segment_batch` wraps :func:`segment_inputs` in a Prefect
flow run (runs in the UI, deployments, ``nightly``); a one-off ``segflow
segment`` with no Prefect API configured calls it directly, without importing
Prefect (:mod:`flows.runlog`).  Each input is isolated: a bad one becomes a
failed outcome with a one-line error and the others go on.  With ``--mosaic
NAME`` every input is a tile of one seamless image (:mod:`storage.mosaic`): one
outcome, and a bad tile fails it whole.

Before anything starts, every input's header is checked against the model
(:func:`check_inputs`): that it reads, its dimensions, and the bands the model
would get (:func:`flows.routing.fit_problem`).  An input that fails is a
failed outcome with its one line; when every input fails, no cluster is
started at all.  A wrong band count is then one line within a second instead
of after the cluster's start.

Start-up is most of a small run (docs/performance.md, block ``startup``), so
the cluster is started next, in a thread (:func:`start_cluster`): its worker
process starts Python, imports torch and MONAI and loads the model on one
core while this process imports the pipeline and loads the model on the
other.  That is why this module imports only Dask and the configuration at
the top, and the pipeline inside :func:`segment_inputs`.
"""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.progress import holding_notes, note
from flows.runlog import run_logger
from storage.errors import (CorruptInputError, ExportError, IncompatibleInputError, SegflowError, is_native_panic,
                            one_line)

if TYPE_CHECKING:
    from distributed import Client

    from flows.inputs import Expanded
    from flows.pipeline import Outcome
    from flows.routing import ModelInput
    from storage.channelfiles import ChannelFiles
    from storage.dicomfiles import SeriesRef

T = TypeVar("T")
Starting = Callable[[], "Client"]  # waits for the cluster being started, and returns its client


@dataclass
class Checked:
    """A batch's inputs after their header check, in order: each with what goes on to be segmented (None when
    it failed) and its one-line error (None when it passed)."""

    entries: list[tuple[str, "Expanded | None", str | None]] = field(default_factory=list)

    @property
    def todo(self) -> list["Expanded"]:
        return [item for _, item, _ in self.entries if item is not None]

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(label, error) for label, _, error in self.entries if error is not None]


def check_inputs(inputs: list[str], model: "ModelInput | None", options: SegmentOptions,
                 out_dir: str | None = None) -> Checked:
    """Check every input's header before anything starts: it reads, and it fits ``model`` (dimensions, bands).

    DICOM folders become their series first (:func:`flows.inputs.expand`).
    URLs and STAC items go on unchecked: their headers are read once they are
    downloaded or their assets chosen, and those steps say what is wrong.
    ``model`` None checks only that each header reads.  Of inputs whose
    outputs would share a name, only the first goes on
    (:func:`flows.inputs.output_clashes`); with ``out_dir``, an input its own
    outputs would overwrite is refused (:func:`flows.inputs.overwritten_input`).
    """
    from flows.inputs import (check_named_sources, expand, forged_problem, input_label, input_stem, name_too_long,
                              output_clashes, outputs_of_another, overwritten_input)
    from flows.routing import fit_problem
    from storage.header import NO_CRS
    from storage.probe import probe
    from storage.remote import is_url
    from storage.stacitem import is_item_path

    checked = Checked()
    # DICOM folders: one input per series; a case's nnU-Net channel files: one input, where the model takes them
    expanded, unusable = expand(inputs, None if model is None else {model.channels})
    checked.entries += [(label, None, error) for label, error in unusable]
    for item in expanded:
        label = input_label(item)
        if isinstance(item, str) and (is_url(item) or is_item_path(item)):
            checked.entries.append((label, item, None))
            continue
        try:
            check_named_sources(item)  # before GDAL opens a VRT's sources
            header = probe(item)
            forged = forged_problem(item, header)
            if forged is not None:
                raise CorruptInputError(label, forged)
            problem = None if model is None else fit_problem(header, model, options.bands)
            if problem is None and options.vector != "none" and header.kind == "volume":
                # a 2-D model takes a scan one slice thick (nnU-Net's 2-D images): polygons are a raster's output
                problem = (f"is a volume, and --vector {options.vector} writes the polygons of a raster's labels "
                           "(drop --vector for scans)")
            elif problem is None and options.vector != "none" and header.cell_note == NO_CRS:
                problem = (f"has no CRS, and --vector {options.vector} writes polygon areas in hectares, which need "
                           "a projected one (drop --vector, or give the raster a CRS)")
            elif problem is None and options.vector != "none" and header.kind == "raster" and \
                    header.cell_size is None and options.output_grid != "model":
                note = header.cell_note or ""
                what = "has a geographic CRS (degrees)" if "geographic" in note else \
                    "has a CRS without a linear unit" if "linear unit" in note else f"has no pixel area ({note})"
                # "which need a projected CRS" had been said of Web Mercator, which is one (not equal-area)
                problem = (f"{what}; --vector {options.vector} writes polygon areas in hectares, "
                           "which need a CRS whose pixels have a true area, such as UTM (reproject it, or add "
                           "--output-grid model with a card that works in one, e.g. crs: utm)")
            elif problem is None and options.vector == "geojson" and header.kind == "raster" and \
                    not header.on_the_earth and options.output_grid != "model":
                problem = ("is in a local CRS with no place on the Earth, and GeoJSON (RFC 7946) is in longitude and "
                           "latitude: use --vector gpkg or parquet")
            if problem is None and header.kind == "volume" and options.probabilities != "none" and \
                    not options.keep_zarr:
                problem = (f"a volume's probabilities are kept only in its zarr store, which --no-zarr removes: "
                           f"--probabilities {options.probabilities} would be dropped (keep the store, or drop "
                           "--probabilities)")
            if problem is None:
                problem = name_too_long(input_stem(item))
            if problem is not None:
                raise IncompatibleInputError(label, problem)
            clobbered = None if out_dir is None or is_url(out_dir) else overwritten_input(item, out_dir)
            if clobbered is not None:
                raise IncompatibleInputError(*clobbered)
            another = None if out_dir is None or is_url(out_dir) else outputs_of_another(item, out_dir)
            if another is not None:
                raise IncompatibleInputError(label, another)
        except Exception as exc:  # isolation, as in the segmentation itself: record and go on
            checked.entries.append((label, None, one_line(exc, label)))
        else:
            checked.entries.append((label, item, None))
    passed = [i for i, (_, item, _) in enumerate(checked.entries) if item is not None]
    for k, error in output_clashes([checked.entries[i][1] for i in passed]).items():
        checked.entries[passed[k]] = (checked.entries[passed[k]][0], None, error)
    return checked


def segment_inputs(inputs: list[str], model_dir: str, out_dir: str, options: SegmentOptions | None = None, *,
                   cluster: Starting | None = None, checked: Checked | None = None,
                   skip_done: bool = False) -> list[dict[str, Any]]:
    """Every input's outcome (``Outcome.to_dict``), in order; a bad model raises before any input is touched.

    ``checked``: the inputs' header check (:func:`check_inputs`) when the
    caller made it (the CLI does, to start nothing when every input fails);
    else it is made here, before any cluster starts.  ``cluster``: the value
    of a :func:`start_cluster` the caller entered (the CLI does, before it
    loads the model); else one is started here, once for the whole batch, and
    only when some input passed the check.  ``skip_done``: an input whose outputs in ``out_dir`` were made from
    the same content, model and parameters, and verify, is not segmented again (:func:`done_before`).
    """
    from flows.routing import load_cached, model_input
    from storage.remote import is_url

    options = options or SegmentOptions()
    if not is_url(out_dir):  # the workers of a Dask scheduler elsewhere run in folders of their own
        out_dir = str(Path(out_dir).expanduser().absolute())
    logger = run_logger()
    if options.mosaic is None and checked is None:
        checked = check_inputs(inputs, model_input(model_dir, trust_bundle=options.trust_bundle), options, out_dir)
    if checked is not None and not checked.todo:  # nothing passed: no cluster, no network; still refuse a bad card
        from segmentation.modeldir import check_model

        check_model(model_dir, trust_bundle=options.trust_bundle)
        for _, error in checked.failed:
            logger.info("input failed: %s", error)
        return [_failed(label, error) for label, error in checked.failed]
    outcomes: list[dict[str, Any]] = []
    with (nullcontext(cluster) if cluster is not None else start_cluster(model_dir, options)) as up:
        # while the cluster starts: the pipeline's imports (torch, zarr, rasterio, ...) and the model
        from flows.inputs import input_label, input_stem
        from flows.pipeline import Outcome
        from flows.staging import segment_staged  # local paths go straight to segment_one; URLs are staged
        from storage.channelfiles import ChannelFiles
        from storage.dicomfiles import SeriesRef

        model = load_cached(model_dir, trust_bundle=options.trust_bundle)
        if options.mosaic is not None:  # every input is a tile of one seamless image: one outcome, failed as a whole
            with input_lock(out_dir, options.mosaic, f"mosaic {options.mosaic}") as (busy, ours):
                outcome = Outcome(input=f"mosaic {options.mosaic}", ok=False, error=busy) if busy else \
                    mosaic_outcome(inputs, model, out_dir, options, up, still_ours=ours)
            if not outcome.ok:
                logger.info("input failed: %s", outcome.error)
            return [outcome.to_dict()]
        assert checked is not None
        client = up()
        for label, path, error in checked.entries:
            if path is None:  # failed its header check
                logger.info("input failed: %s", error)
                outcomes.append(_failed(label, error or ""))
                continue
            try:
                with input_lock(out_dir, input_stem(path), input_label(path)) as (busy, ours):
                    if busy:
                        outcome = Outcome(input=input_label(path), ok=False, error=busy)
                    elif skip_done and (earlier := done_before(path, model, model_dir, out_dir, options)):
                        outcome = earlier
                    elif isinstance(path, (SeriesRef, ChannelFiles)):
                        outcome = segment_series(path, model, out_dir, options, client, still_ours=ours)
                    else:
                        outcome = segment_staged(path, model, out_dir, options, client, still_ours=ours)
            except BaseException as exc:  # isolation: record and go on (a native decoder's panic too)
                if not isinstance(exc, Exception) and not is_native_panic(exc):
                    raise  # an interrupt, an exit, a cancellation
                outcome = Outcome(input=input_label(path), ok=False, error=one_line(exc, input_label(path)))
            if not outcome.ok:
                logger.info("input failed: %s", outcome.error)
            outcomes.append(outcome.to_dict())
    return outcomes


def done_before(path: "Expanded", model: Any, model_dir: str, out_dir: str,
                options: SegmentOptions) -> "Outcome | None":
    """The outcome of an input done before into a local ``out_dir`` with the same content, model, card and
    parameters, its outputs verified (the ledger's check, :func:`flows.ledger.done_before`), or None: a rerun of an
    interrupted batch had segmented again every input it had finished.  A local STAC item's content is its JSON and
    the assets the card's bands read (as ``nightly`` keys it); URLs are segmented again."""
    from flows import ledger
    from flows.inputs import input_label, input_stem
    from flows.pipeline import Outcome
    from flows.routing import ModelInput, band_request, one_slice
    from storage.channelfiles import ChannelFiles
    from storage.dicomfiles import SeriesRef
    from storage.hashing import sha256_input
    from storage.probe import probe
    from storage.remote import is_url
    from storage.stacitem import is_item_path, probe_item

    group = isinstance(path, (SeriesRef, ChannelFiles))
    if is_url(out_dir) or (not group and is_url(str(path))):
        return None
    try:
        if not group and is_item_path(str(path)):
            header, content = probe_item(path, band_request(model.card, options))
        else:
            header, content = probe(path), path.sha256() if group else sha256_input(path)
        thin = one_slice(header, ModelInput.of(model.card))
    except (OSError, ValueError, SegflowError):  # unreadable now: segmenting it says why
        return None
    document = ledger.key_document(content, model.weights_sha256, model.card, options, stem=input_stem(path),
                                   one_slice=thin)
    hit, _ = ledger.done_before(out_dir, input_label(path), document, model_dir, stem=input_stem(path))
    if hit is None:
        return None
    return Outcome(input=input_label(path), ok=True, outputs=hit.outputs,
                   statistics=hit.record.get("statistics") or {},
                   skipped=f"same input, model and parameters as its outputs of {hit.record.get('finished')}")


@contextmanager
def input_lock(out_dir: str, stem: str, label: str) -> Iterator[tuple[str | None, Callable[[], bool] | None]]:
    """The input's lock under a local ``out_dir``, the one ``nightly`` takes (:mod:`flows.locks`): two runs
    writing one input's outputs into one folder at once both failed, each on the other's half-written files.

    Yields ``(None, still_ours)`` while held, else ``(the input's one-line error, None)``.  ``still_ours`` is
    for ``segment_one``: a run stalled past the stale timeout (a suspended laptop, SIGSTOP) may have had its
    lock broken and the input taken over, and must then write nothing over the other run's outputs.  An output
    URL's outputs are published whole (:mod:`flows.staging`), so none is taken there."""
    from flows import locks
    from storage.remote import is_url

    if is_url(out_dir):
        yield None, None
        return
    lock = locks.InputLock(Path(out_dir) / locks.LOCKS_DIR, stem)
    try:
        holder = lock.acquire(input=label)
    except OSError as exc:
        raise ExportError(label, f"cannot take its lock {lock.path}: {exc.strerror or exc}") from None
    if holder is not None:
        yield (f"{label}: another run is writing its outputs into {out_dir} ({holder.describe()}); not "
               "processed: run again when it is done"), None
        return
    try:
        yield None, lambda: not lock.lost and lock.still_held()
    finally:
        lock.release()


def _failed(label: str, error: str) -> dict[str, Any]:
    """A failed outcome (``Outcome.to_dict``'s shape) without importing the pipeline."""
    return {"input": label, "ok": False, "outputs": [], "error": error, "statistics": {}}


def start_cluster(model_dir: str, options: SegmentOptions) -> AbstractContextManager[Starting]:
    """Start the batch's Dask cluster in a thread; yields a call that waits for its client.

    Enter it as early as possible and call the result only when the client
    is needed: with worker processes (``--workers N``), a local cluster's
    start is mostly each one starting Python and importing torch, then
    (:func:`batch_client`) MONAI and the model, on another core than this
    process's own imports and model load. In this process (the default) it
    is the scheduler's start, beside those imports.
    """
    return _said_when_used(batch_client(model_dir, options))


@contextmanager
def _said_when_used(manager: AbstractContextManager["Client"]) -> Iterator[Starting]:
    """:func:`started_meanwhile`, with what the start says (the scheduler's line) held until the client is first
    asked for: a model refused meanwhile is then the only line, as it is when no cluster starts."""
    kept: list[tuple[str, int]] = []
    lock = threading.Lock()

    @contextmanager
    def entered_holding() -> Iterator["Client"]:
        with ExitStack() as stack:
            with holding_notes(kept):
                client = stack.enter_context(manager)
            yield client

    with started_meanwhile(entered_holding()) as started:
        def client() -> "Client":
            up = started()
            with lock:
                for text, level in kept:
                    note(text, level)
                kept.clear()
            return up

        yield client


def load_and_drop(model_dir: str, trust_bundle: bool) -> None:
    """In a worker: load the model and drop it; the imports it made stay (see :func:`batch_client`).

    A failure is dropped too: the caller's own load reports it, as one line.
    """
    with suppress(Exception):
        from segmentation import load_model

        load_model(model_dir, trust_bundle=trust_bundle)


def one_off_in_process(options: SegmentOptions) -> bool:
    """Whether a one-off ``segment`` starts its local cluster in this process (see :func:`flows.cluster.dask_client`).

    It does unless ``--workers N`` asks for worker processes: without a
    second process importing torch and loading the model, a small input's
    run starts about 1.3 s sooner. ``nightly`` does not come here: it keeps
    a worker process unless ``--workers 0``.
    """
    return not options.gpus and not options.workers


@contextmanager
def batch_client(model_dir: str, options: SegmentOptions) -> Iterator["Client"]:
    """:func:`flows.cluster.dask_client` for a batch; a local cluster started for it is readied and ended quickly.

    Each worker loads the model once before it gets any work: what matters is
    that torch, MONAI and segflow's modules get imported there early, not when
    the first window task unpickles the model.  The load is waited for: a
    window task unpickling the model in another thread of the worker while it
    still imports MONAI fails on a partly imported module.  Before the cluster
    closes, its workers' objects are frozen out of the garbage collector
    (``gc.freeze``), so that their exit does not walk those modules' objects
    (1.9 s to 0.3 s for the cluster's shutdown on 2 cores).  Neither is done
    to a cluster that outlives the batch (``--dask-address``, or a client
    already current in this process).
    """
    from distributed import get_client, wait as wait_for

    try:
        before = get_client()
    except ValueError:
        before = None
    in_process = one_off_in_process(options)
    with dask_client(options.dask_address, workers=options.workers or None, gpus=options.gpus, dashboard=True,
                     in_process=in_process) as client:
        ours = options.dask_address is None and client is not before
        if ours and not in_process:  # in this process, the model's imports are this process's own
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
            loads = [client.submit(load_and_drop, model_dir, options.trust_bundle, pure=False, workers=[address],
                                   allow_other_workers=False) for address in workers]
            wait_for(loads)  # a model that fails to load is reported by this process's own load
            del loads
        try:
            yield client
        finally:
            if ours:
                with suppress(Exception):  # a speed-up only: a worker that died must not fail the batch here
                    client.run(gc.freeze)


@contextmanager
def started_meanwhile(manager: AbstractContextManager[T]) -> Iterator[Callable[[], T]]:
    """Enter ``manager`` in a thread while the block goes on; yields a call that waits for what it entered.

    The manager is exited when the block ends, after its start has finished,
    whether the block failed or not; a start that failed while the block
    failed too is not reported over the block's own error.
    """
    stack = ExitStack()
    pool = ThreadPoolExecutor(1, thread_name_prefix="segflow-start")
    entering = pool.submit(stack.enter_context, manager)
    pool.shutdown(wait=False)
    try:
        yield entering.result
    finally:
        wait([entering])  # never leave a half-started cluster behind
        stack.close()


def mosaic_refused(inputs: list[str], options: SegmentOptions) -> dict[str, Any] | None:
    """A mosaic whose tiles cannot make one image (two CRSs and no ``--crs``, bands that differ, a tile off the
    grid), found from their headers before a cluster starts: its failed outcome, else None.  The refusal had come
    after the Dask cluster's start, against docs/errors.md's "when every input fails, nothing is started"."""
    from storage.mosaic import MosaicRef, plan_mosaic

    label = MosaicRef(str(options.mosaic), tuple(inputs)).display
    try:
        ref = _mosaic_of(inputs, options)
        label = ref.display
        plan_mosaic(ref)
    except Exception as exc:  # noqa: BLE001 - said as mosaic_outcome says it, one line naming the tile or mosaic
        return _failed(label, one_line(exc, label))
    return None


def _mosaic_of(inputs: list[str], options: SegmentOptions) -> Any:
    """The inputs as the ``--mosaic`` they make (:func:`storage.mosaic.mosaic_ref`), a VRT tile's sources checked
    before GDAL opens them."""
    from flows.inputs import check_named_sources
    from storage.mosaic import mosaic_ref

    for tile in inputs:
        check_named_sources(tile)
    return mosaic_ref(str(options.mosaic), inputs, options.crs, options.split_by_tile)


def mosaic_outcome(inputs: list[str], model: Any, out_dir: str, options: SegmentOptions,
                   cluster: Starting, still_ours: Callable[[], bool] | None = None) -> "Outcome":
    """All raster inputs as one mosaic (:mod:`storage.mosaic`): a bad tile fails it, since a hole would be silent."""
    from flows.pipeline import Outcome, segment_one
    from storage.mosaic import MosaicRef
    from storage.remote import is_url

    label = MosaicRef(str(options.mosaic), tuple(inputs)).display
    try:
        ref = _mosaic_of(inputs, options)
        label = ref.display
        if is_url(out_dir):
            raise SegflowError(out_dir, "a --mosaic is written to a local --out only (for now)")
        return segment_one(ref, model, out_dir, options, cluster(), still_ours=still_ours)
    except Exception as exc:  # one line naming the tile (or the mosaic), and nothing left behind
        return Outcome(input=label, ok=False, error=one_line(exc, label))


def segment_series(ref: "SeriesRef | ChannelFiles", model: Any, out_dir: str, options: SegmentOptions,
                   client: Any, still_ours: Callable[[], bool] | None = None) -> "Outcome":
    """One DICOM series volume, or one case's channel files; their files are local (a URL prefix as --out is not
    supported for them yet)."""
    from flows.pipeline import segment_one
    from storage.remote import is_url

    if is_url(out_dir):
        what = "DICOM series" if isinstance(ref, SeriesRef) else "nnU-Net channel files"
        raise SegflowError(ref.display, f"{what} cannot be written to a URL output yet; use a local --out")
    return segment_one(ref, model, out_dir, options, client, still_ours=still_ours)
