"""Prefect flows: coarse tasks (one per input and step); window-level work stays in Dask.

``segment`` runs one input; ``segment_batch`` runs many, each isolated: a bad
input fails its own flow run with a one-line error and the others go on; the
batch ends Failed when any input failed, with every outcome as its result.
With ``--mosaic NAME`` every input is a tile of one seamless image
(:mod:`storage.mosaic`): one outcome, and a bad tile fails it whole.
Inputs and the output directory may be local paths or fsspec URLs
(``s3://bucket/prefix/``): :mod:`flows.staging` downloads and uploads them.
"""

from __future__ import annotations


from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.inputs import expand
from flows.pipeline import Outcome, input_label, segment_one
from flows.staging import segment_staged  # local paths go straight to segment_one; URLs are staged
from segmentation import load_model
from storage.dicomfiles import SeriesRef
from storage.errors import SegflowError


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SegflowError):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@flow(name="segment", persist_result=False, log_prints=True)
def segment(input_path: str, model_dir: str, out_dir: str, options: SegmentOptions | None = None) -> dict[str, Any]:
    """Segment one GeoTIFF/NIfTI into OUT/<stem>.tif|.nii.gz with provenance."""
    options = options or SegmentOptions()
    model = load_model(model_dir, trust_bundle=options.trust_bundle)
    with dask_client(options.dask_address, workers=options.workers, gpus=options.gpus) as client:
        outcome = segment_staged(input_path, model, out_dir, options, client)
    get_run_logger().info("segmented %s -> %s", input_path, outcome.outputs[0])
    return outcome.to_dict()


@flow(name="segment-batch", persist_result=False, log_prints=True)
def segment_batch(inputs: list[str], model_dir: str, out_dir: str, options: SegmentOptions | None = None):  # noqa: ANN201
    """Segment many inputs on one Dask cluster; one input's failure does not stop the rest."""
    options = options or SegmentOptions()
    logger = get_run_logger()
    outcomes: list[dict[str, Any]] = []
    model = load_model(model_dir, trust_bundle=options.trust_bundle)  # a bad model fails the whole batch, before any input is touched
    if options.mosaic is not None:  # every input is a tile of one seamless image: one outcome, failed as a whole
        outcome = _mosaic_outcome(inputs, model, out_dir, options)
        if not outcome.ok:
            logger.info("input failed: %s", outcome.error)
            return Failed(message=f"mosaic {options.mosaic} failed", data=[outcome.to_dict()])
        return Completed(message=f"mosaic {options.mosaic} segmented", data=[outcome.to_dict()])
    expanded, unusable = expand(inputs)  # DICOM folders: one input per series
    for label, error in unusable:
        outcomes.append(Outcome(input=label, ok=False, error=error).to_dict())
        logger.info("input failed: %s", error)
    with dask_client(options.dask_address, workers=options.workers, gpus=options.gpus) as client:
        for path in expanded:
            try:
                if isinstance(path, SeriesRef):
                    outcome = segment_series(path, model, out_dir, options, client)
                else:
                    outcome = segment_staged(path, model, out_dir, options, client)
            except Exception as exc:  # isolation: record and go on
                outcome = Outcome(input=input_label(path), ok=False, error=_one_line(exc))
                logger.info("input failed: %s", outcome.error)
            outcomes.append(outcome.to_dict())
    failed = [o for o in outcomes if not o["ok"]]
    if failed:
        return Failed(message=f"{len(failed)} of {len(outcomes)} inputs failed", data=outcomes)
    return Completed(message=f"{len(outcomes)} inputs segmented", data=outcomes)


def _mosaic_outcome(inputs: list[str], model: Any, out_dir: str, options: SegmentOptions) -> Outcome:
    """All raster inputs as one mosaic (:mod:`storage.mosaic`): a bad tile fails it, since a hole would be silent."""
    from storage.mosaic import MosaicRef, mosaic_ref
    from storage.remote import is_url

    label = MosaicRef(str(options.mosaic), tuple(inputs)).display
    try:
        ref = mosaic_ref(str(options.mosaic), inputs, options.crs, options.split_by_tile)
        label = ref.display
        if is_url(out_dir):
            raise SegflowError(out_dir, "a --mosaic is written to a local --out only (for now)")
        with dask_client(options.dask_address, workers=options.workers, gpus=options.gpus) as client:
            return segment_one(ref, model, out_dir, options, client)
    except Exception as exc:  # one line naming the tile (or the mosaic), and nothing left behind
        return Outcome(input=label, ok=False, error=_one_line(exc))


def segment_series(ref: SeriesRef, model: Any, out_dir: str, options: SegmentOptions, client: Any) -> Outcome:
    """One DICOM series volume; its files are local (a URL prefix as --out is not supported for them yet)."""
    from storage.remote import is_url

    if is_url(out_dir):
        raise SegflowError(ref.display, "DICOM series cannot be written to a URL output yet; use a local --out")
    return segment_one(ref, model, out_dir, options, client)


def batch_outcomes(state: Any) -> list[dict[str, Any]]:
    """The per-input outcomes of a finished ``segment_batch`` run, failed or not."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


