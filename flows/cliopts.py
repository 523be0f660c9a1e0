"""The output options ``segment``, ``nightly`` and ``schedule`` share, declared once.

A nightly run writes what ``segment`` writes, so its users need the same
choices (polygons, the bands a model gets, DICOM SEG, test-time
augmentation...); ``nightly`` and ``schedule`` had lacked them although the
nightly flow and its ledger honour every one.  Each option is an
``Annotated`` type carrying its typer declaration (nightly's own options too, which ``schedule`` passes to
its deployment), and :func:`output_fields`
turns the parsed values into :class:`flows.config.SegmentOptions` fields, so
the three commands cannot drift apart.  ``--mosaic``, ``--crs`` and
``--split-by-tile`` stay ``segment``'s: a nightly run segments inputs one by
one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flows import cliutil
from flows.config import MAX_PARALLEL

PRECISION_HELP = "exact (fp32) or fast (AMP on CUDA; bf16 on a CPU with bf16 instructions, else fp32)."
Precision = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]
Bands = Annotated[Optional[str], typer.Option(
    "--bands", help="The input bands the model gets, in its order: names (B04, red, a band description) or "
                    "1-based indices, e.g. B02,B03,B04,B08 or 2,3,4,8 (default: the card's channel names, "
                    "matched by name).")]
Vector = Annotated[str, typer.Option(
    "--vector", help="Also write the labels of a raster as polygons per class with their area in hectares: gpkg, "
                     "parquet or geojson.")]
Simplify = Annotated[Optional[float], typer.Option(
    "--simplify", help="Simplify --vector polygons by this tolerance (CRS units), keeping shared borders shared.")]
OutputGrid = Annotated[str, typer.Option(
    "--output-grid", help="Where a raster's labels are written when its ground sample distance or CRS differs "
                          "from the model's: input or model.")]
ModelSpace = Annotated[str, typer.Option(
    "--model-space", help="Where labels are written when a scan's grid differs from the model's: input (the "
                          "scan's grid) or keep (also the model's).")]
DicomSeg = Annotated[str, typer.Option(
    "--dicom-seg", help="DICOM SEG for DICOM inputs: binary, labelmap or none.")]
Tta = Annotated[Optional[str], typer.Option(
    "--tta", help="Flip test-time augmentation: the spatial axes to mirror, e.g. 0,1 (all combinations are "
                  "averaged); 'none' turns off the card's default.")]
Crf = Annotated[bool, typer.Option(
    "--crf", help="Refine probabilities with the truncated dense CRF (chunk by chunk, with a halo) before the "
                  "argmax.")]
CrfIterations = Annotated[int, typer.Option("--crf-iterations", help="Mean-field iterations of --crf.")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the network: faster exact (fp32) windows on some CPUs (1.5x measured on an "
                      "AMD EPYC, none on an Intel Xeon with AMX), none in fast; the first "
                      "run on a machine spends tens of seconds compiling (kernels cached in "
                      "~/.cache/segflow/torch-compile, or $SEGFLOW_COMPILE_CACHE). See docs/performance.md.")]
TrustBundle = Annotated[bool, typer.Option(
    "--trust-bundle", "--trust-code", help="Run code a model carries: let MONAI evaluate a bundle's configuration "
                                           "(to build a network segflow's registry does not know), and load a "
                                           "TorchScript archive (its graph is code). Only for models you trust.")]

# nightly's own, which `schedule` passes to the deployment
Retries = Annotated[int, typer.Option("--retries", min=0, help="Retries of an input after a transient I/O error.")]
RetryDelay = Annotated[float, typer.Option("--retry-delay", min=0.0, help="Seconds between retries.")]
Parallel = Annotated[int, typer.Option(
    "--parallel", min=1, max=MAX_PARALLEL, help="Inputs in flight at once (their windows share the cluster).")]
LockTimeout = Annotated[float, typer.Option(
    "--lock-timeout", min=1.0, show_default=False,
    help="Seconds without a heartbeat after which another run's lock on an input (OUT/.segflow-locks/) is stale "
         "and broken; give every run the same. Default 600.")]
SourceRoots = Annotated[Optional[list[Path]], typer.Option(
    "--source-root", metavar="DIR",
    help="A folder (repeatable) whose files an inbox's VRTs and STAC items may name as their sources, besides the "
         "inbox itself; sources elsewhere are refused.")]
Settle = Annotated[float, typer.Option(
    "--settle", min=0.0, help="Seconds an inbox entry must have been left unchanged to be taken: newer ones are "
                              "still arriving (a download filling a preallocated file, a DICOM folder filling up) "
                              "and wait for the next run. Default 0: everything is taken.")]


def output_fields(*, bands: str | None, vector: str, simplify: float | None, output_grid: str, model_space: str,
                  dicom_seg: str, tta: str | None, crf: bool, crf_iterations: int, compile: bool,
                  trust_bundle: bool) -> dict[str, object]:
    """The shared options as :class:`flows.config.SegmentOptions` fields (validated there, at the edge).  An
    option that would do nothing is refused, as ``--crs`` without ``--mosaic`` is: ``--simplify`` without
    ``--vector`` had run, drawn no polygons and recorded the tolerance in the provenance."""
    if simplify and vector == "none":
        cliutil.fail("--simplify applies to --vector polygons; add --vector gpkg, parquet or geojson")
    return dict(bands=None if bands is None else [b.strip() for b in bands.split(",") if b.strip()],
                vector=vector, simplify=simplify, output_grid=output_grid, model_space=model_space,
                dicom_seg=dicom_seg,
                flip_tta=None if tta is None else ([] if tta == "none" else cliutil.ints(tta, "--tta")), crf=crf,
                crf_iterations=crf_iterations, compile=compile, trust_bundle=trust_bundle)
