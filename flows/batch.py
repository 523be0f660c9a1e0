"""Segment a batch of inputs on one Dask cluster: the body of the ``segment-batch`` flow, free of Prefect.

:func:`flows.flows.segment_batch` wraps :func:`segment_inputs` in a Prefect
flow run (runs in the UI, deployments, ``nightly``); a one-off ``segflow
segment`` with no Prefect API configured calls it directly, without importing
Prefect (:mod:`flows.runlog`).  Each input is isolated: a bad one becomes a
failed outcome with a one-line error and the others go on.  With ``--mosaic
NAME`` every input is a tile of one seamless image (:mod:`storage.mosaic`): one
outcome, and a bad tile fails it whole.

Start-up is most of a small run (docs/performance.md, block ``startup``), so
the cluster is started first, in a thread (:func:`start_cluster`): its worker
process starts Python, imports torch and MONAI and loads the model on one
core while this process imports the pipeline and loads the model on the
other.  That is why this module imports only Dask and the configuration at
the top, and the pipeline inside :func:`segment_inputs`.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.runlog import run_logger
from storage.errors import SegflowError

if TYPE_CHECKING:
    from distributed import Client

    from flows.pipeline import Outcome
    from storage.dicomfiles import SeriesRef

T = TypeVar("T")
Starting = Callable[[], "Client"]  # waits for the cluster being started, and returns its client


def one_line(exc: BaseException) -> str:
    """An input's failure as the one line the user sees: a SegflowError's own text, else type and message."""
    if isinstance(exc, SegflowError):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def segment_inputs(inputs: list[str], model_dir: str, out_dir: str, options: SegmentOptions | None = None, *,
                   cluster: Starting | None = None) -> list[dict[str, Any]]:
    """Every input's outcome (``Outcome.to_dict``), in order; a bad model raises before any input is touched.

    ``cluster``: the value of a :func:`start_cluster` the caller entered
    earlier (the CLI does, before checking the model); else one is started
    here, once for the whole batch.
    """
    options = options or SegmentOptions()
    logger = run_logger()
    outcomes: list[dict[str, Any]] = []
    with (nullcontext(cluster) if cluster is not None else start_cluster(model_dir, options)) as up:
        # while the cluster starts: the pipeline's imports (torch, zarr, rasterio, ...) and the model
        from flows.inputs import expand
        from flows.pipeline import Outcome, input_label
        from flows.staging import segment_staged  # local paths go straight to segment_one; URLs are staged
        from segmentation import load_model
        from storage.dicomfiles import SeriesRef

        model = load_model(model_dir, trust_bundle=options.trust_bundle)
        if options.mosaic is not None:  # every input is a tile of one seamless image: one outcome, failed as a whole
            outcome = mosaic_outcome(inputs, model, out_dir, options, up)
            if not outcome.ok:
                logger.info("input failed: %s", outcome.error)
            return [outcome.to_dict()]
        expanded, unusable = expand(inputs)  # DICOM folders: one input per series
        for label, error in unusable:
            outcomes.append(Outcome(input=label, ok=False, error=error).to_dict())
            logger.info("input failed: %s", error)
        client = up()
        for path in expanded:
            try:
                if isinstance(path, SeriesRef):
                    outcome = segment_series(path, model, out_dir, options, client)
                else:
                    outcome = segment_staged(path, model, out_dir, options, client)
            except Exception as exc:  # isolation: record and go on
                outcome = Outcome(input=input_label(path), ok=False, error=one_line(exc))
                logger.info("input failed: %s", outcome.error)
            outcomes.append(outcome.to_dict())
    return outcomes


def start_cluster(model_dir: str, options: SegmentOptions) -> AbstractContextManager[Starting]:
    """Start the batch's Dask cluster in a thread; yields a call that waits for its client.

    Enter it as early as possible and call the result only when the client
    is needed: a local cluster's start is mostly its worker process starting
    Python and importing torch, then (:func:`batch_client`) MONAI and the
    model, on another core than this process's own imports and model load.
    """
    return started_meanwhile(batch_client(model_dir, options))


def load_and_drop(model_dir: str, trust_bundle: bool) -> None:
    """In a worker: load the model and drop it; the imports it made stay (see :func:`batch_client`).

    A failure is dropped too: the caller's own load reports it, as one line.
    """
    with suppress(Exception):
        from segmentation import load_model

        load_model(model_dir, trust_bundle=trust_bundle)


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
    with dask_client(options.dask_address, workers=options.workers, gpus=options.gpus) as client:
        ours = options.dask_address is None and client is not before
        if ours:
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


def mosaic_outcome(inputs: list[str], model: Any, out_dir: str, options: SegmentOptions,
                   cluster: Starting) -> "Outcome":
    """All raster inputs as one mosaic (:mod:`storage.mosaic`): a bad tile fails it, since a hole would be silent."""
    from flows.pipeline import Outcome, segment_one
    from storage.mosaic import MosaicRef, mosaic_ref
    from storage.remote import is_url

    label = MosaicRef(str(options.mosaic), tuple(inputs)).display
    try:
        ref = mosaic_ref(str(options.mosaic), inputs, options.crs, options.split_by_tile)
        label = ref.display
        if is_url(out_dir):
            raise SegflowError(out_dir, "a --mosaic is written to a local --out only (for now)")
        return segment_one(ref, model, out_dir, options, cluster())
    except Exception as exc:  # one line naming the tile (or the mosaic), and nothing left behind
        return Outcome(input=label, ok=False, error=one_line(exc))


def segment_series(ref: "SeriesRef", model: Any, out_dir: str, options: SegmentOptions, client: Any) -> "Outcome":
    """One DICOM series volume; its files are local (a URL prefix as --out is not supported for them yet)."""
    from flows.pipeline import segment_one
    from storage.remote import is_url

    if is_url(out_dir):
        raise SegflowError(ref.display, "DICOM series cannot be written to a URL output yet; use a local --out")
    return segment_one(ref, model, out_dir, options, client)
