"""The ``segflow segment`` command: options checked at the edge, the batch run, its report and scores.

``segment`` is the command most people run and the one with most options, so
it has a module of its own beside ``flows/cli.py`` (which only mounts it on
the ``segflow`` app).  Besides parsing and checking its options, it chooses
where the batch runs (Prefect flow run or the same code without Prefect),
writes the run's JSON and HTML report into a local OUT, and with ``--truth``
scores the outputs as ``segflow evaluate`` does.  Heavy imports (Prefect,
torch, Dask) stay inside the function so ``segflow --help`` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.markup import escape

from flows import cliopts, cliutil
from storage.atomic import make_output_folder, write_text_atomically
from storage.errors import SegflowError, printable

if TYPE_CHECKING:
    from flows.config import SegmentOptions
    from flows.routing import ModelInput

console = cliutil.console


def segment(inputs: List[str] = typer.Argument(..., help="GeoTIFF, VRT or NIfTI files (a case's nnU-Net channel "
                                                      "files case_0000, case_0001 ... are one input), PNG, JPEG or BMP "
                                                      "pictures (read as training reads them), DICOM folders, "
                                                      "DICOMDIRs "
                                                      "or DICOM files (each series is one input), STAC item "
                                                      ".json files (the assets with the model's bands, stacked "
                                                      "on the finest band's grid; outputs named after the "
                                                      "item's id), or URLs (s3://bucket/key.tif; see "
                                                      "docs/storage.md)."),
            model: Path = typer.Option(..., "--model", help="Model directory (card.json + weights.safetensors), "
                                                            "MONAI bundle, or TorchScript archive with its card."),
            out: str = typer.Option(..., "--out", help="Output directory, or a URL prefix (s3://bucket/out/)."),
            precision: cliopts.Precision = "exact",
            roi: Optional[str] = typer.Option(None, help="Window size, e.g. 256,256 (default: the card's)."),
            overlap: Optional[float] = typer.Option(None, help="Window overlap in [0, 1) (default: the card's)."),
            chunk_size: Optional[int] = typer.Option(None, help="Spatial chunk size of stores and tasks."),
            batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass."),
            workers: Optional[int] = typer.Option(None, help="Local Dask worker processes (default: 0, the work runs in threads of this process, one per core; N: N processes, which isolate the work from this one)."),
            probabilities: str = typer.Option("none", help="Also store probabilities: none, float32 or uint8."),
            device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
            dask_address: Optional[str] = typer.Option(None, help="Use an existing Dask scheduler."),
            gpus: bool = typer.Option(False, "--gpus", help="One Dask worker per GPU with dask-cuda's "
                                                            "LocalCUDACluster (or, with --dask-address, its GPU "
                                                            "workers); window tasks ask for a GPU."),
            no_zarr: bool = typer.Option(False, "--no-zarr", help="Do not keep OUT/<stem>.zarr."),
            report: Optional[Path] = typer.Option(None, help="Write the per-input outcomes as JSON here."),
            trust_bundle: cliopts.TrustBundle = False,
            tta: cliopts.Tta = None,
            compile: cliopts.Compile = False,
            crf: cliopts.Crf = False,
            crf_iterations: cliopts.CrfIterations = 5,
            model_space: cliopts.ModelSpace = "input",
            dicom_seg: cliopts.DicomSeg = "binary",
            bands: cliopts.Bands = None,
            vector: cliopts.Vector = "none",
            simplify: cliopts.Simplify = None,
            output_grid: cliopts.OutputGrid = "input",
            mosaic: Optional[str] = typer.Option(None, "--mosaic",
                                                 help="Segment all raster inputs as one seamless mosaic, "
                                                      "written as OUT/NAME.tif."),
            crs: Optional[str] = typer.Option(None, "--crs", help="The --mosaic's CRS when its tiles' CRSs "
                                                                  "differ, e.g. EPSG:32633."),
            split_by_tile: bool = typer.Option(False, "--split-by-tile",
                                               help="With --mosaic: also one COG per tile, cut from the "
                                                    "seamless result."),
            prefect: Optional[bool] = typer.Option(None, "--prefect/--no-prefect",
                                                   help="Run as a Prefect flow run (shown in the Prefect UI), or "
                                                        "the same code without Prefect (faster start-up). "
                                                        "Default: a flow run only when a Prefect API is "
                                                        "configured (PREFECT_API_URL in the environment or the "
                                                        "Prefect profile)."),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors and warnings only: no progress, "
                                                                    "no ok lines, no dashboard link."),
            quicklook: bool = typer.Option(False, "--quicklook/--no-quicklook",
                                           help="Also write OUT/<stem>.quicklook.png: the labels over the image, "
                                                "with areas (ha) or volumes (mL)."),
            skip_done: bool = typer.Option(False, "--skip-done",
                                           help="Leave out an input whose outputs in OUT were made from the same "
                                                "content, model and parameters and still verify (a rerun of an "
                                                "interrupted batch; nightly always does)."),
            truth: Optional[Path] = typer.Option(None, "--truth", help="A folder of ground-truth label maps named "
                                                                       "like the inputs: score the outputs against "
                                                                       "them (segflow evaluate) into "
                                                                       "OUT/evaluation/.")) -> None:
    """Segment each input into OUT/<stem>.tif or OUT/<stem>.nii.gz plus OUT/<stem>.provenance.json.

    A local OUT also gets the run's report, OUT/reports/segment-<time>.json and .html (``segflow report``
    rebuilds the page from the JSON).

    Every input's header is checked against the model first (it reads; its dimensions and bands fit the card):
    one that does not is an error line, and when none fits nothing is started.
    """
    from flows.batch import check_inputs, mosaic_refused, segment_inputs
    from flows.routing import model_input
    from flows.runlog import prefect_api_configured

    options = cliutil.options(precision=precision, roi=cliutil.ints(roi), overlap=overlap, chunk_size=chunk_size,
                              batch_size=batch_size, workers=workers, probabilities=probabilities,
                              device=device, dask_address=dask_address, gpus=gpus, keep_zarr=not no_zarr,
                              mosaic=mosaic, crs=crs, split_by_tile=split_by_tile, quicklook=quicklook,
                              **cliopts.output_fields(bands=bands, vector=vector, simplify=simplify,
                                                      output_grid=output_grid, model_space=model_space,
                                                      dicom_seg=dicom_seg, tta=tta, crf=crf,
                                                      crf_iterations=crf_iterations, compile=compile,
                                                      trust_bundle=trust_bundle))
    if truth is not None and not truth.is_dir():
        cliutil.fail(f"{truth}: --truth takes a folder of ground-truth label maps named like the inputs")
    if (split_by_tile or crs) and not mosaic:
        cliutil.fail(f"{'--split-by-tile' if split_by_tile else '--crs'} applies to a mosaic of tiles; "
                     "add --mosaic NAME")
    if crs:  # a bad option is exit 2 before any work, not a failed mosaic (exit 1) after the cluster started
        from storage.mosaic_plan import parse_crs

        try:
            parse_crs(crs)
        except ValueError as exc:
            cliutil.fail(str(exc))
    if split_by_tile and output_grid == "model":
        cliutil.fail("--split-by-tile cuts the tiles' own grids out of the result; it cannot be combined with "
                     "--output-grid model")
    cliutil.check_out_folder(out)
    if report is not None:
        cliutil.check_report_file(report, out)
    cliutil.check_device(options)
    cliutil.check_compile_cache(options)
    arguments = dict(inputs=[cliutil.path_or_url(p) for p in inputs], model_dir=str(model),
                     out_dir=cliutil.path_or_url(out), options=options, skip_done=skip_done)
    run_log = None
    from storage.remote import is_url

    fresh = not is_url(arguments["out_dir"]) and not Path(arguments["out_dir"]).exists()
    again = "" if skip_done or mosaic else " with --skip-done"  # what the interrupted line tells a rerun to add
    with cliutil.resumable_on_interrupt(arguments["out_dir"], again=again):  # Ctrl-C: one line, exit 130
        try:
            # every input's header against the card, before anything starts (no torch: the card is peeked at)
            model_in = None if mosaic else model_input(model, trust_bundle=trust_bundle)
            if model_in is not None and model_in.spatial_dims == 3 and options.vector != "none":
                cliutil.fail(f"--vector {options.vector} writes the polygons of raster labels, and model "
                             f"{model_in.name!r} is 3D: it segments volumes only")
            _check_grid_options(options, model_in)
            checked = None if mosaic else check_inputs(arguments["inputs"], model_in, options, arguments["out_dir"])
            refused = mosaic_refused(arguments["inputs"], options) if mosaic else None
            if refused is not None:  # tiles that cannot make one image: said before anything starts
                cliutil.check_models([model], trust_bundle=trust_bundle)
                outcomes = [refused]
            elif checked is not None and not checked.todo:  # nothing fits: no cluster, no Prefect, no network
                cliutil.check_models([model], trust_bundle=trust_bundle)  # a bad model still says so first (exit 2)
                outcomes = segment_inputs(**arguments, checked=checked)
            elif prefect_api_configured() if prefect is None else prefect:
                # a bad weights file: one line, first
                cliutil.check_models([model], trust_bundle=trust_bundle, load=True, roi=options.roi)
                from flows.flows import batch_outcomes, segment_batch
                from flows.runlog import prefect_console

                with prefect_console("segment") as run_log, cliutil.reporter(quiet):
                    outcomes = batch_outcomes(segment_batch(**arguments, return_state=True))
            else:  # the flow's body without Prefect (README: "Prefect or not"); its cluster starts during the load
                from flows.batch import start_cluster

                with cliutil.reporter(quiet), start_cluster(str(model), options) as cluster:
                    cliutil.check_models([model], trust_bundle=trust_bundle, load=True, roi=options.roi)
                    outcomes = segment_inputs(**arguments, cluster=cluster, checked=checked)
        except SegflowError as exc:
            cliutil.fail(str(exc))
    unsaved = []  # the outputs are written; a report that cannot be is said last, and fails the command
    if report:
        try:
            write_text_atomically(report, json.dumps(outcomes, indent=2), "--report file")
        except SegflowError as exc:
            unsaved.append(str(exc))
    try:
        page = _run_report(outcomes, arguments["out_dir"])
    except SegflowError as exc:
        page = None
        unsaved.append(str(exc))
    scored = _score(outcomes, truth, model, arguments["out_dir"], unsaved) if truth is not None else None
    for o in outcomes:
        if o.get("skipped") and not quiet:  # (--skip-done) its outputs stand: say so, not "ok" with no windows
            console.print(f"[green]skipped[/green] {escape(printable(o['input']))} -> "
                          f"{escape(printable(o['outputs'][0]))}  ({escape(o['skipped'])}; --skip-done)",
                          highlight=False, soft_wrap=True)
        elif o["ok"] and not quiet:
            from flows.modelspace import space_words

            s = o["statistics"]
            space = space_words(s)
            console.print(f"[green]ok[/green] {escape(printable(o['input']))} -> {escape(printable(o['outputs'][0]))}  "
                          f"({s.get('windows_evaluated')} window{'' if s.get('windows_evaluated') == 1 else 's'}"
                          f"{' ' + space if space else ''}, {s.get('windows_skipped')} skipped, "
                          f"{s.get('total_seconds')} s)", highlight=False, soft_wrap=True)
    failed = [o for o in outcomes if not o["ok"]]
    if fresh and len(failed) == len(outcomes):  # an input that fails at ingest (all nodata) had left an empty OUT
        _remove_empty_tree(Path(arguments["out_dir"]))
    for text in [o["error"] for o in failed] + unsaved:
        console.print(f"[red]error:[/red] {escape(printable(text))}", highlight=False, soft_wrap=True)
    if run_log is not None and run_log.written:
        cliutil.inform(f"log: {run_log.path}", quiet)
    if page is not None:
        cliutil.inform(f"report: {page}", quiet)
    if scored is not None:
        cliutil.inform(f"scores: {scored}", quiet)
    cliutil.finish(1 if failed or unsaved else 0)


def _remove_empty_tree(folder: Path) -> None:
    """``folder`` and the folders in it, where none holds a file: a run whose every input failed leaves OUT as it
    was, also when an input failed after the cluster started (it had left an empty new OUT)."""
    import os

    if any(files for _, _, files in os.walk(folder)):
        return
    for path, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):  # the deepest first
        try:
            os.rmdir(path)
        except OSError:
            return


def _run_report(outcomes: list[dict], out: str) -> Path | None:
    """OUT/reports/<time>.json (the outcomes) and its HTML page, for a local OUT where some input succeeded
    (a run that wrote nothing leaves OUT as it was); None otherwise."""
    import datetime as dt

    from flows.htmlreport import find_quicklooks, write_html_report
    from storage.remote import is_url

    if is_url(out) or not any(o["ok"] for o in outcomes):
        return None
    folder = make_output_folder(Path(out) / "reports")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = folder / f"segment-{stamp}.json"
    n = 2
    while data.exists():
        data, n = folder / f"segment-{stamp}-{n}.json", n + 1
    write_text_atomically(data, json.dumps(outcomes, indent=2), "the run report")
    return write_html_report(outcomes, data.with_suffix(".html"), quicklooks=find_quicklooks(outcomes))


def _score(outcomes: list[dict], truth: Path, model: Path, out: str, problems: list[str]) -> Path | None:
    """``segflow evaluate`` of the run's label outputs against the same-named files in ``truth``; each output that
    cannot be scored adds its line to ``problems``, which fail the command (asked for, it had printed "error:"
    and exit 0), and the others are still scored (one missing truth had left every output unscored)."""
    from flows.evalreport import write_reports
    from flows.evaluate import evaluate_files
    from storage.remote import is_url

    predictions = [Path(o["outputs"][0]) for o in outcomes if o["ok"]]
    if not predictions or is_url(out):
        return None
    try:
        scores = evaluate_files(predictions, [truth], classes=model)
        problems += [f"scoring against {truth}: {u['error']}" for u in scores["unscored"]]  # the others are scored
        if not scores["cases"]:
            return None
        write_reports(scores, Path(out) / "evaluation")
    except SegflowError as exc:
        problems.append(f"scoring against {truth}: {exc}")
        return None
    return Path(out) / "evaluation" / "evaluation.md"


def _check_grid_options(options: "SegmentOptions", model_in: "ModelInput | None") -> None:
    """An option for the other kind of input would be ignored without a word: a 2D model segments rasters
    (their model-grid labels are ``--output-grid model``) and one-slice volumes on their own grid, a 3D one
    volumes (``--model-space keep``)."""
    rasters = model_in is None or model_in.spatial_dims == 2  # None: a --mosaic, which is of rasters
    dims = 2 if model_in is None else model_in.spatial_dims
    # said once, before the work: they had failed every input, each line blaming the input (exit 1)
    if options.roi is not None and len(options.roi) != dims:
        cliutil.fail(f"--roi {','.join(map(str, options.roi))} has {len(options.roi)} axes, and the model's images "
                     f"have {dims} spatial axes")
    if options.flip_tta and any(not 0 <= a < dims for a in options.flip_tta):
        cliutil.fail(f"--tta {','.join(map(str, options.flip_tta))}: the axes to mirror are spatial axes "
                     f"0..{dims - 1} of the model's {dims}-D images")
    if rasters and options.model_space == "keep":
        cliutil.fail("--model-space keep applies to 3D models' volumes (a 2D model segments a one-slice volume on "
                     "its own grid); a raster's labels stay on the model's grid with --output-grid model")
    if not rasters and options.output_grid == "model":
        cliutil.fail(f"--output-grid model applies to rasters, and model {model_in.name!r} is 3D; a volume's "
                     "labels are also written on the model's grid with --model-space keep")
