"""Prefect flows: coarse tasks (one per input and step); window-level work stays in Dask.

``segment`` runs one input; ``segment_batch`` runs many, each isolated: a bad
input fails its own flow run with a one-line error and the others go on; the
batch ends Failed when any input failed, with every outcome as its result.
Its body is :func:`flows.batch.segment_inputs`, which a one-off ``segflow
segment`` without a Prefect API runs without Prefect (:mod:`flows.runlog`).
With ``--mosaic NAME`` every input is a tile of one seamless image
(:mod:`storage.mosaic`): one outcome, and a bad tile fails it whole.
Inputs and the output directory may be local paths or fsspec URLs
(``s3://bucket/prefix/``): :mod:`flows.staging` downloads and uploads them.
"""

from __future__ import annotations


from typing import Any

from prefect import flow, get_run_logger

from flows.batch import one_off_in_process, segment_inputs
from flows.cluster import dask_client
from flows.config import SegmentOptions
from flows.runstate import ended, run_result
from flows.staging import segment_staged  # local paths go straight to segment_one; URLs are staged
from segmentation import load_model


@flow(name="segment", persist_result=False, log_prints=True)
def segment(input_path: str, model_dir: str, out_dir: str, options: SegmentOptions | None = None) -> dict[str, Any]:
    """Segment one GeoTIFF/NIfTI into OUT/<stem>.tif|.nii.gz with provenance."""
    options = options or SegmentOptions()
    model = load_model(model_dir, trust_bundle=options.trust_bundle)
    with dask_client(options.dask_address, workers=options.workers or None, gpus=options.gpus,
                     in_process=one_off_in_process(options)) as client:
        outcome = segment_staged(input_path, model, out_dir, options, client)
    get_run_logger().info("segmented %s -> %s", input_path, outcome.outputs[0])
    return outcome.to_dict()


@flow(name="segment-batch", persist_result=False, log_prints=True)
def segment_batch(inputs: list[str], model_dir: str, out_dir: str,  # noqa: ANN201
                  options: SegmentOptions | None = None, skip_done: bool = False):
    """Segment many inputs on one Dask cluster; one input's failure does not stop the rest.

    The body is :func:`flows.batch.segment_inputs`, which a one-off ``segflow
    segment`` without a Prefect API calls directly; this flow adds the run
    (UI, logs, state) and ends Failed when any input failed.
    """
    outcomes = segment_inputs(inputs, model_dir, out_dir, options, skip_done=skip_done)  # a bad model fails all
    failed = [o for o in outcomes if not o["ok"]]
    mosaic = options is not None and options.mosaic is not None
    if not failed:
        return ended(True, f"mosaic {options.mosaic} segmented" if mosaic  # type: ignore[union-attr]
                     else f"{len(outcomes)} inputs segmented", outcomes)
    message = (f"mosaic {options.mosaic} failed" if mosaic  # type: ignore[union-attr]
               else f"{len(failed)} of {len(outcomes)} inputs failed")
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return ended(False, message, outcomes, problem=f"{message}: {failed[0]['error']}{more}")


def batch_outcomes(state: Any) -> list[dict[str, Any]]:
    """The per-input outcomes of a finished ``segment_batch`` run, failed or not."""
    return run_result(state)
