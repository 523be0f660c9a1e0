"""The ``segflow`` command."""

from __future__ import annotations

import os

# Quiet, offline-friendly defaults, set before Prefect is imported; the user's environment wins.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from flows import cliutil  # noqa: E402
from storage.errors import SegflowError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Out-of-core, exactly stitched segmentation of large rasters and 3D volumes.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect and convert models.")
app.add_typer(model_app, name="model")
console, out = cliutil.console, cliutil.out
# the shared helpers under the names this module's commands use
_fail, _options, _check_models = cliutil.fail, cliutil.options, cliutil.check_models
_progress, _path_or_url, _ints = cliutil.progress, cliutil.path_or_url, cliutil.ints


@app.command()
def ingest(inputs: List[Path] = typer.Argument(..., help="GeoTIFF, VRT or NIfTI files, DICOM folders, DICOMDIRs "
                                                       "or DICOM files (one store per series)."),
           out: Path = typer.Option(..., "--out", help="Directory for the <stem>.zarr stores."),
           chunk: Optional[int] = typer.Option(None, help="Spatial chunk size (default 1024 in 2D, 128 in 3D).")) -> None:
    """Copy inputs into chunked zarr v3 image stores with their full geometry."""
    from flows.inputs import expand, input_label, input_stem
    from storage.ingest import ingest as do_ingest

    expanded, unusable = expand([str(p) for p in inputs])
    for _, error in unusable:
        console.print(f"[red]error:[/red] {escape(error)}", highlight=False, soft_wrap=True)
    failures = len(unusable)
    out.mkdir(parents=True, exist_ok=True)
    for item in expanded:
        try:
            store = do_ingest(item if not isinstance(item, str) else Path(item), out / f"{input_stem(item)}.zarr",
                              chunk=chunk)
            console.print(f"ingested {escape(input_label(item))} -> {store.path}  {store.image.shape} "
                          f"{store.image.dtype}", highlight=False, soft_wrap=True)
        except SegflowError as exc:
            failures += 1
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1 if failures else 0)


@app.command()
def segment(inputs: List[str] = typer.Argument(..., help="GeoTIFF, VRT or NIfTI files, DICOM folders, DICOMDIRs "
                                                      "or DICOM files (each series is one input), STAC item "
                                                      ".json files (the assets with the model's bands, stacked "
                                                      "on the finest band's grid; outputs named after the "
                                                      "item's id), or URLs (s3://bucket/key.tif; see "
                                                      "docs/storage.md)."),
            model: Path = typer.Option(..., "--model", help="Model directory (card.json + weights.safetensors), "
                                                            "MONAI bundle, or TorchScript archive with its card."),
            out: str = typer.Option(..., "--out", help="Output directory, or a URL prefix (s3://bucket/out/)."),
            precision: str = typer.Option("exact", help="exact (fp32) or fast (bf16 on CPU, AMP on CUDA)."),
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
            trust_bundle: bool = typer.Option(False, "--trust-bundle",
                                              help="Let MONAI evaluate a bundle's configuration (runs its code) to "
                                                   "build a network segflow's registry does not know."),
            tta: Optional[str] = typer.Option(None, "--tta", help="Flip test-time augmentation: the spatial axes to "
                                                                  "mirror, e.g. 0,1 (all combinations are averaged); "
                                                                  "'none' turns off the card's default."),
            compile: bool = typer.Option(False, "--compile", help="torch.compile the network: about 1.5x faster "
                                                                   "exact (fp32) windows, none in fast; the "
                                                                   "first run on a machine spends tens of seconds "
                                                                   "compiling (kernels cached in "
                                                                   "~/.cache/segflow/torch-compile, or "
                                                                   "$SEGFLOW_COMPILE_CACHE). See docs/performance.md."),
            crf: bool = typer.Option(False, "--crf", help="Refine probabilities with the truncated dense CRF "
                                                          "(chunk by chunk, with a halo) before the argmax."),
            crf_iterations: int = typer.Option(5, help="Mean-field iterations of --crf."),
            model_space: str = typer.Option("input", "--model-space",
                                            help="Where labels are written when a scan's grid differs from the "
                                                 "model's: input (the scan's grid) or keep (also the model's)."),
            dicom_seg: str = typer.Option("binary", "--dicom-seg",
                                          help="DICOM SEG for DICOM inputs: binary, labelmap or none."),
            bands: Optional[str] = typer.Option(None, "--bands",
                                                help="The input bands the model gets, in its order: names (B04, "
                                                     "red, a band description) or 1-based indices, e.g. "
                                                     "B02,B03,B04,B08 or 2,3,4,8 (default: the card's "
                                                     "channel names, matched by name)."),
            vector: str = typer.Option("none", "--vector", help="Also write the labels of a raster as polygons "
                                                                "per class with their area in hectares: gpkg, "
                                                                "parquet or geojson."),
            simplify: Optional[float] = typer.Option(None, "--simplify",
                                                     help="Simplify --vector polygons by this tolerance (CRS "
                                                          "units), keeping shared borders shared."),
            output_grid: str = typer.Option("input", "--output-grid",
                                            help="Where a raster's labels are written when its ground sample "
                                                 "distance or CRS differs from the model's: input or model."),
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
            truth: Optional[Path] = typer.Option(None, "--truth", help="A folder of ground-truth label maps named "
                                                                       "like the inputs: score the outputs against "
                                                                       "them (segflow evaluate) into "
                                                                       "OUT/evaluation/.")) -> None:
    """Segment each input into OUT/<stem>.tif or OUT/<stem>.nii.gz plus OUT/<stem>.provenance.json.

    A local OUT also gets the run's report, OUT/reports/<time>.json and .html (``segflow report`` rebuilds the
    page from the JSON).

    Every input's header is checked against the model first (it reads; its dimensions and bands fit the card):
    one that does not is an error line, and when none fits nothing is started.
    """
    from flows.batch import check_inputs, segment_inputs
    from flows.routing import model_input
    from flows.runlog import prefect_api_configured

    options = _options(precision=precision, roi=_ints(roi), overlap=overlap, chunk_size=chunk_size,
                       batch_size=batch_size, workers=workers, probabilities=probabilities,
                       device=device, dask_address=dask_address, gpus=gpus, keep_zarr=not no_zarr,
                       trust_bundle=trust_bundle, crf=crf, crf_iterations=crf_iterations,
                       flip_tta=None if tta is None else ([] if tta == "none" else _ints(tta)),
                       model_space=model_space, dicom_seg=dicom_seg,
                       bands=None if bands is None else [b.strip() for b in bands.split(",") if b.strip()],
                       vector=vector, simplify=simplify, output_grid=output_grid, mosaic=mosaic, crs=crs,
                       split_by_tile=split_by_tile, compile=compile, quicklook=quicklook)
    if truth is not None and not truth.is_dir():
        _fail(f"{truth}: --truth takes a folder of ground-truth label maps named like the inputs")
    if (split_by_tile or crs) and not mosaic:
        _fail(f"{'--split-by-tile' if split_by_tile else '--crs'} applies to a mosaic of tiles; add --mosaic NAME")
    if split_by_tile and output_grid == "model":
        _fail("--split-by-tile cuts the tiles' own grids out of the result; it cannot be combined with "
              "--output-grid model")
    arguments = dict(inputs=[_path_or_url(p) for p in inputs], model_dir=str(model), out_dir=_path_or_url(out),
                     options=options)
    run_log = None
    try:
        # every input's header against the card, before anything starts (no torch: the card is peeked at)
        checked = None if mosaic else check_inputs(arguments["inputs"], model_input(model, trust_bundle=trust_bundle),
                                                    options)
        if checked is not None and not checked.todo:  # nothing fits: no cluster, no Prefect, no network
            _check_models([model], trust_bundle=trust_bundle)  # a bad model still says so first (exit 2)
            outcomes = segment_inputs(**arguments, checked=checked)
        elif prefect_api_configured() if prefect is None else prefect:
            _check_models([model], trust_bundle=trust_bundle, load=True)  # a bad weights file: one line, first
            from flows.flows import batch_outcomes, segment_batch
            from flows.runlog import prefect_console

            with prefect_console("segment") as run_log, cliutil.reporter(quiet):
                outcomes = batch_outcomes(segment_batch(**arguments, return_state=True))
        else:  # the flow's body without Prefect (README: "Prefect or not"); its cluster starts during the load
            from flows.batch import start_cluster

            with cliutil.reporter(quiet), start_cluster(str(model), options) as cluster:
                _check_models([model], trust_bundle=trust_bundle, load=True)
                outcomes = segment_inputs(**arguments, cluster=cluster, checked=checked)
    except SegflowError as exc:
        _fail(str(exc))
    if report:
        report.write_text(json.dumps(outcomes, indent=2))
    page = _run_report(outcomes, arguments["out_dir"])
    scored = _score(outcomes, truth, model, arguments["out_dir"]) if truth is not None else None
    for o in outcomes:
        if o["ok"] and not quiet:
            s = o["statistics"]
            console.print(f"[green]ok[/green] {escape(o['input'])} -> {escape(o['outputs'][0])}  "
                          f"({s.get('windows_evaluated')} windows, {s.get('windows_skipped')} skipped, "
                          f"{s.get('total_seconds')} s)", highlight=False, soft_wrap=True)
    failed = [o for o in outcomes if not o["ok"]]
    for o in failed:
        console.print(f"[red]error:[/red] {escape(o['error'])}", highlight=False, soft_wrap=True)
    if run_log is not None and run_log.written:
        cliutil.inform(f"log: {run_log.path}", quiet)
    if page is not None:
        cliutil.inform(f"report: {page}", quiet)
    if scored is not None:
        cliutil.inform(f"scores: {scored}", quiet)
    cliutil.finish(1 if failed else 0)


def _run_report(outcomes: list[dict], out: str) -> Path | None:
    """OUT/reports/<time>.json (the outcomes) and its HTML page, for a local OUT where some input succeeded
    (a run that wrote nothing leaves OUT as it was); None otherwise."""
    import datetime as dt

    from flows.htmlreport import find_quicklooks, write_html_report
    from storage.atomic import write_text_atomically
    from storage.remote import is_url

    if is_url(out) or not any(o["ok"] for o in outcomes):
        return None
    folder = Path(out) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = folder / f"segment-{stamp}.json"
    n = 2
    while data.exists():
        data, n = folder / f"segment-{stamp}-{n}.json", n + 1
    write_text_atomically(data, json.dumps(outcomes, indent=2), "the run report")
    return write_html_report(outcomes, data.with_suffix(".html"), quicklooks=find_quicklooks(outcomes))


def _score(outcomes: list[dict], truth: Path, model: Path, out: str) -> Path | None:
    """``segflow evaluate`` of the run's label outputs against the same-named files in ``truth``."""
    from flows.evaluate import evaluate_files, write_reports
    from storage.remote import is_url

    predictions = [Path(o["outputs"][0]) for o in outcomes if o["ok"]]
    if not predictions or is_url(out):
        return None
    try:
        scores = evaluate_files(predictions, [truth], classes=model)
        write_reports(scores, Path(out) / "evaluation")
    except SegflowError as exc:
        console.print(f"[red]error:[/red] scoring against {escape(str(truth))}: {escape(str(exc))}",
                      highlight=False, soft_wrap=True)
        return None
    return Path(out) / "evaluation" / "evaluation.md"


@app.command()
def train(card: Path = typer.Option(..., "--card", help="A model card JSON (architecture, input, classes, ROI)."),
          image: Optional[List[Path]] = typer.Option(None, "--image", help="Training image (repeat; pairs with "
                                                                           "--labels)."),
          labels: Optional[List[Path]] = typer.Option(None, "--labels", help="Label map on the image's grid (repeat)."),
          dataset: Optional[Path] = typer.Option(None, "--dataset", help="A dataset folder (VOC, Cityscapes, "
                                                                         "COCO, Decathlon/nnU-Net, raster + "
                                                                         "labels) instead of --image/--labels; "
                                                                         "its classes replace the card's."),
          out: Path = typer.Option(..., "--out", help="Model directory to write."),
          steps: int = typer.Option(300, help="Optimiser steps."),
          batch_size: int = typer.Option(8, help="Patches per step."),
          lr: float = typer.Option(2e-3, help="Learning rate."),
          seed: int = typer.Option(0, help="Random seed (sampling, initial weights, the validation split)."),
          precision: str = typer.Option("fast", help="exact (fp32) or fast (bf16/AMP), training and validation."),
          val_fraction: Optional[float] = typer.Option(None, "--val-fraction",
                                                       help="Share of the cases that validate, seeded (default "
                                                            "0.2; a dataset's own val split wins)."),
          val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate (and save the resume state) "
                                                                            "every N steps (default: about 10 "
                                                                            "times per run)."),
          holdout: Optional[str] = typer.Option(None, "--holdout", help="AXIS:FRACTION, e.g. x:0.5: train on the "
                                                                        "first half of every image along x, "
                                                                        "validate on the rest (x:-0.5: train "
                                                                        "on the last half)."),
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from the state its "
                                                              "last validation saved in OUT/checkpoints."),
          augment_intensity: float = typer.Option(0.0, "--augment-intensity",
                                                  help="Share of patches (0-1) given a random contrast, "
                                                       "brightness and noise; flips always.")) -> None:
    """Train a card's architecture on image/label pairs or a dataset; the result is a model directory with
    provenance, the best validated weights, a learning curve and a per-class validation table."""
    from flows.training import train_from_dataset, train_from_files
    from segmentation.modeldir import read_card

    image, labels = image or [], labels or []
    if dataset is not None and (image or labels):
        _fail("give either --dataset or --image/--labels, not both")
    if dataset is None and not image:
        _fail("nothing to train on: give --dataset PATH or --image/--labels pairs")
    if len(image) != len(labels):
        _fail(f"{len(image)} --image but {len(labels)} --labels: give them in pairs")
    if holdout is not None and val_fraction is not None:
        _fail("--holdout validates on part of every image; it cannot be combined with --val-fraction")
    if precision not in ("exact", "fast"):
        _fail(f"--precision {precision!r} is neither exact nor fast")
    if not 0.0 <= augment_intensity <= 1.0:
        _fail(f"--augment-intensity {augment_intensity:g} is not a share in [0, 1]")

    def on_step(info: dict) -> None:
        progress.update(task, completed=info["step"])
        if "validation" in info:
            v = info["validation"]
            scores = ", ".join(f"{k} {d:.3f}" for k, d in v["dice"].items() if d is not None)  # classes present
            mean = "n/a" if v["mean_foreground"] is None else f"{v['mean_foreground']:.3f}"
            console.print(f"step {info['step']}: validation mean foreground Dice {mean} (best: step "
                          f"{v['best_step']}); {escape(scores)}", highlight=False, soft_wrap=True)

    try:
        model_card = read_card(card)
        common = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                      val_every=val_every, holdout=holdout, resume=resume, on_step=on_step,
                      intensity=augment_intensity)
        with _progress() as progress:
            task = progress.add_task(f"train {model_card.name}", total=steps)
            if dataset is not None:
                from storage.datasets import open_dataset

                loaded = train_from_dataset(model_card, open_dataset(dataset), out, **common,
                                            val_fraction=0.2 if val_fraction is None else val_fraction,
                                            say=lambda line: console.print(escape(line), highlight=False,
                                                                           soft_wrap=True))
            else:
                loaded = train_from_files(model_card, list(zip(image, labels)), out, **common,
                                          val_fraction=0.2 if val_fraction is None else val_fraction)
    except SegflowError as exc:
        _fail(str(exc))
    best = (loaded.card.training or {}).get("validation", {}).get("best")
    if best:
        console.print(f"best validation: step {best['step']}, mean foreground Dice "
                      f"{best['mean_foreground'] if best['mean_foreground'] is not None else 'n/a'}",
                      highlight=False, soft_wrap=True)
    console.print(f"trained {loaded.name} -> {loaded.path} (weights sha256 {loaded.weights_sha256[:12]}…)")


@app.command()
def info(path: Path = typer.Argument(..., help="A zarr store, a GeoTIFF/NIfTI output, a provenance JSON "
                                               "or a model directory.")) -> None:
    """Print a store's or an output's metadata and provenance as JSON; for a label output also its classes with
    their pixels or voxels and area (ha) or volume (mL), as a table on stderr."""
    from flows.inspect import describe

    try:
        described = describe(path)
    except SegflowError as exc:
        _fail(str(exc))
    out.print_json(json.dumps(described, default=str))
    if isinstance(described, dict) and described.get("label_table"):
        console.print(_label_table(described["label_table"]))


def _label_table(table: dict) -> Table:
    """``segflow info``'s class table: value, name, pixels or voxels, area or volume as people write them."""
    from flows.numbers import readable

    unit, raster = table["unit"], table["measure"] == "area_ha"
    caption = f"counts from {table['source']}" + (f"; no {unit}: {table['note']}" if table["cell_size"] is None else "")
    grid = Table(title="classes", caption=caption)
    for name, justify in (("value", "right"), ("name", "left"), ("pixels" if raster else "voxels", "right"),
                          (f"area ({unit})" if raster else f"volume ({unit})", "right")):
        grid.add_column(name, justify=justify)
    for row in table["rows"]:
        grid.add_row(str(row["value"]), escape(str(row["name"])), f"{row['count']:,}",
                     readable(row.get(table["measure"])))
    return grid


@app.command()
def verify(output: str = typer.Argument(..., help="An output file or its .provenance.json, or its URL.")) -> None:
    """Recompute the hashes named in an output's provenance; non-zero exit on any mismatch or missing output.

    An input or weights file not reachable from here is reported as unverified, not as a failure.
    """
    from storage.provenance import sidecar_path, verify as verify_record  # issue 6: report unreachable files apart
    from storage.remote import is_url

    try:
        if is_url(output):  # downloaded to a scratch folder and checked there (flows/staging.py)
            from flows.staging import verify_url

            report = verify_url(output)
            sidecar = output if output.endswith(".provenance.json") else \
                output.rsplit("/", 1)[0] + "/" + sidecar_path(output.rsplit("/", 1)[-1]).name
        else:
            output_path = Path(output)
            sidecar = output_path if output_path.name.endswith(".provenance.json") else sidecar_path(output_path)
            report = verify_record(sidecar)
    except SegflowError as exc:
        _fail(str(exc))
    for line in report.unverified:
        console.print(f"[yellow]unverified:[/yellow] {line}", highlight=False, soft_wrap=True)
    for p in report.problems:
        console.print(f"[red]mismatch:[/red] {p}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    console.print(f"[green]verified[/green] {sidecar} ({len(report.verified)} hashes)", highlight=False,
                  soft_wrap=True)


@model_app.command("inspect")
def model_inspect(path: Path = typer.Argument(..., help="Model directory, MONAI bundle or TorchScript archive."),
                  trust_bundle: bool = typer.Option(False, "--trust-bundle",
                                                    help="Let MONAI evaluate a bundle's configuration."),
                  stac: bool = typer.Option(False, "--stac", help="Print the model as a STAC item with the "
                                                                  "Machine Learning Model extension instead.")) -> None:
    """Print a model card (for a bundle: the card segflow maps it to), or with --stac the model as an MLM item.

    The model is loaded as `segment` loads it: weights `segment` would refuse (a pickle checkpoint, a truncated
    file, tensors that do not fit the card's architecture) are one error line and exit 1.
    """
    from flows.inspect import inspect_model, model_stac

    try:
        if stac:
            out.print_json(json.dumps(model_stac(path, trust_bundle=trust_bundle)))
            return
        card = inspect_model(path, trust_bundle=trust_bundle).card
    except SegflowError as exc:
        _fail(str(exc), 1)
    out.print_json(card.model_dump_json())


@model_app.command("convert")
def model_convert(src: Path = typer.Argument(..., help="MONAI bundle directory, state_dict checkpoint "
                                                       "(.pt/.pth/.bin/.safetensors), TorchScript archive, or a "
                                                       "STAC item (.json) with the MLM extension whose mlm:model "
                                                       "asset is such a weights file."),
                  out: Path = typer.Option(..., "--out", help="Model directory to write."),
                  card: Optional[Path] = typer.Option(None, "--card", help="Model card JSON: the architecture of a "
                                                                           "checkpoint, or the input, classes and "
                                                                           "inference of a bundle segflow cannot "
                                                                           "map."),
                  trust_bundle: bool = typer.Option(False, "--trust-bundle",
                                                    help="Let MONAI evaluate the bundle's configuration "
                                                         "(runs its code).")) -> None:
    """Make a segflow model directory (card.json + weights.safetensors) from weights made elsewhere."""
    from segmentation.mlm import convert_item, looks_like_item
    from segmentation.modeldir import convert_model, read_card

    try:
        if looks_like_item(src):  # an MLM item: the card comes from the item, the weights from its model asset
            if card is not None:
                _fail(f"{src}: an MLM item describes its model itself; --card applies to weights files")
            loaded, notes = convert_item(src, out)
        else:
            given = read_card(card) if card is not None else None
            loaded, notes = convert_model(src, out, card=given, trust_bundle=trust_bundle)
    except SegflowError as exc:
        _fail(str(exc))
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    console.print(f"converted {src} -> {loaded.path} ({loaded.card.architecture.name}, "
                  f"{loaded.weights_path.name if loaded.weights_path else ''} sha256 {loaded.weights_sha256[:12]}…)",
                  highlight=False, soft_wrap=True)


@app.command()
def demo(workdir: Path = typer.Option(Path("demo/run"), "--workdir", help="Fresh folder for inputs, models, outputs."),
         workers: Optional[int] = typer.Option(None, help="Local Dask worker processes.")) -> None:
    """Generate sample data, train two small models, segment held-out inputs, report Dice."""
    from flows.demo import run_demo

    try:
        with _progress() as progress:
            summary = run_demo(workdir, workers=workers, progress=progress)
    except SegflowError as exc:
        _fail(str(exc))
    table = Table(title="segflow demo: held-out Dice per class")
    for col in ("model", "input", "class", "dice"):
        table.add_column(col)
    for row in summary["dice"]:
        table.add_row(row["model"], Path(row["input"]).name, row["class"], f"{row['dice']:.3f}")
    out.print(table)
    for key, value in summary["paths"].items():
        out.print(f"{key}: {value}")
    out.print(f"total {summary['seconds']:.1f} s")
    raise typer.Exit(0 if summary["ok"] else 1)


# --- nightly (issue 5): the command's body lives in flows/nightly_cli.py -----------------------------------
from flows.nightly_cli import nightly_command  # noqa: E402

app.command("nightly")(nightly_command)
# --- end nightly ---------------------------------------------------------------------------------------------


# --- schedule (issue 5): the command's body lives in flows/schedule.py ---------------------------------------
from flows.schedule import schedule_command  # noqa: E402

app.command("schedule")(schedule_command)
# --- end schedule --------------------------------------------------------------------------------------------


# --- evaluate (issue 13): the command's body lives in flows/evaluate.py (heavy imports inside it) ----------
from flows.evaluate import evaluate_command  # noqa: E402

app.command("evaluate")(evaluate_command)
# --- end evaluate --------------------------------------------------------------------------------------------


# --- report (issue 14): the command's body lives in flows/htmlreport.py ------------------------------------
from flows.htmlreport import report_command  # noqa: E402

app.command("report")(report_command)
# --- end report ----------------------------------------------------------------------------------------------


def main() -> None:  # pragma: no cover
    sys.exit(app())
