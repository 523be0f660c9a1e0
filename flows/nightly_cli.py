"""``segflow nightly``: run the ``nightly`` flow once (registered on the app in :mod:`flows.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.markup import escape

from flows import cliopts

if TYPE_CHECKING:
    from rich.table import Table


def nightly_command(
        inbox: Optional[str] = typer.Option(None, "--inbox", help="Folder of inputs (GeoTIFF, VRT, NIfTI, DICOM "
                                                                  "series folders), or a URL prefix "
                                                                  "(s3://bucket/inbox/); hidden and other "
                                                                  "files are ignored."),
        manifest: Optional[str] = typer.Option(None, "--manifest", help="CSV with a 'path' column, or JSON list "
                                                                        "of paths or URLs, instead of --inbox."),
        model: List[Path] = typer.Option(..., "--model", help="Model directory; repeat: each input goes to the "
                                                              "first model whose card fits it (2D/3D, channels)."),
        out: str = typer.Option(..., "--out", help="Output directory or URL prefix (also holds .segflow-cache/ and "
                                                   "reports/)."),
        precision: cliopts.Precision = "exact",
        roi: Optional[str] = typer.Option(None, help="Window size, e.g. 256,256 (default: each card's)."),
        overlap: Optional[float] = typer.Option(None, help="Window overlap in [0, 1) (default: each card's)."),
        chunk_size: Optional[int] = typer.Option(None, help="Spatial chunk size of stores and tasks."),
        batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass."),
        workers: Optional[int] = typer.Option(None, help="Local Dask worker processes (default: 1; 0: threads of this process)."),
        probabilities: str = typer.Option("none", help="Also store probabilities: none, float32 or uint8."),
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        dask_address: Optional[str] = typer.Option(None, help="Use an existing Dask scheduler."),
        gpus: bool = typer.Option(False, "--gpus", help="One Dask worker per GPU (dask-cuda), or the GPU "
                                                        "workers of --dask-address."),
        no_zarr: bool = typer.Option(False, "--no-zarr", help="Do not keep OUT/<stem>.zarr."),
        retries: cliopts.Retries = 2,
        retry_delay: cliopts.RetryDelay = 10.0,
        parallel: cliopts.Parallel = 1,
        lock_timeout: cliopts.LockTimeout = 600.0,
        source_root: cliopts.SourceRoots = None,
        settle: cliopts.Settle = 0.0,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors and warnings only (failed and "
                                                                "no-model inputs): no progress, no table, no "
                                                                "report paths (the report is still written)."),
        quicklook: bool = typer.Option(True, "--quicklook/--no-quicklook",
                                       help="OUT/<stem>.quicklook.png beside each output (on by default), shown in "
                                            "the HTML report."),
        bands: cliopts.Bands = None,
        vector: cliopts.Vector = "none",
        simplify: cliopts.Simplify = None,
        output_grid: cliopts.OutputGrid = "input",
        model_space: cliopts.ModelSpace = "input",
        dicom_seg: cliopts.DicomSeg = "binary",
        tta: cliopts.Tta = None,
        crf: cliopts.Crf = False,
        crf_iterations: cliopts.CrfIterations = 5,
        compile: cliopts.Compile = False,
        trust_bundle: cliopts.TrustBundle = False,
) -> None:
    """Segment what is new in an inbox or manifest, skip what is done, write OUT/reports/<time>.json|.md|.html."""
    from flows import cliutil as cli
    from flows.nightly import nightly, nightly_report
    from flows.runlog import prefect_console
    from storage.errors import SegflowError
    from storage.remote import is_url

    if (inbox is None) == (manifest is None):
        cli.fail("give --inbox DIR or --manifest FILE (one of them)")
    cli.check_out_folder(out)
    if inbox is not None:
        from flows.nightly import check_inbox_reported

        try:
            check_inbox_reported(cli.path_or_url(out), cli.path_or_url(inbox))
        except SegflowError as exc:
            cli.fail(str(exc))
    if manifest is not None and not is_url(cli.path_or_url(manifest)):
        from flows.inbox import read_manifest

        try:  # a bad manifest in one second, not after Prefect's temporary server has started (11 s)
            read_manifest(cli.path_or_url(manifest))
        except SegflowError as exc:
            cli.fail(str(exc))
    options = cli.options(precision=precision, roi=cli.ints(roi), overlap=overlap, chunk_size=chunk_size,
                           batch_size=batch_size, workers=workers, probabilities=probabilities,
                           device=device, dask_address=dask_address, keep_zarr=not no_zarr, quicklook=quicklook,
                           **({"gpus": True} if gpus else {}),
                           **cliopts.output_fields(bands=bands, vector=vector, simplify=simplify,
                                                   output_grid=output_grid, model_space=model_space,
                                                   dicom_seg=dicom_seg, tta=tta, crf=crf,
                                                   crf_iterations=crf_iterations, compile=compile,
                                                   trust_bundle=trust_bundle))
    cli.check_device(options)
    cli.check_compile_cache(options)
    # loaded as the flow will (the same objects): a bad one is one line, first
    cli.check_models(model, trust_bundle=trust_bundle, load=True, roi=options.roi, bands=options.bands)
    try:
        with cli.resumable_on_interrupt(out), prefect_console("nightly") as run_log, cli.reporter(quiet):
            state = nightly(model_dirs=[str(m) for m in model], out_dir=cli.path_or_url(out),
                            inbox=cli.path_or_url(inbox) if inbox else None,
                            manifest=cli.path_or_url(manifest) if manifest else None,
                            options=options, retries=retries, retry_delay_seconds=retry_delay,
                            lock_stale_after=lock_timeout, settle_seconds=settle, parallel=parallel,
                            source_roots=[str(r) for r in source_root or []] or None, return_state=True)
    except SegflowError as exc:  # the Prefect API named but not answering
        cli.fail(str(exc))
    try:
        report = nightly_report(state)
    except SegflowError as exc:
        cli.fail(str(exc))
    if not quiet:  # the summary its own unwrapped line (a table title wrapped at 80 columns in a cron log)
        cli.out.print(f"segflow nightly: {report['run']['summary']}", highlight=False, soft_wrap=True, markup=False)
        cli.out.print(summary_table(report))
    for r in report["inputs"]:
        if r.get("error"):
            cli.console.print(f"[red]{r['status']}:[/red] {escape(r['error'])}", highlight=False, soft_wrap=True)
        elif r["status"] == "locked" and not quiet:  # not a failure: the run holding it reports its outcome
            cli.out.print(f"[yellow]locked:[/yellow] {escape(r['input'])}: {escape(r.get('note') or '')}",
                          highlight=False, soft_wrap=True)
    for d in report["run"].get("duplicates") or []:
        if not quiet:
            cli.out.print(f"[yellow]note:[/yellow] {escape(d['input'])}: given more than once ({d['listed']} times); "
                          "segmented once, under its first mention", highlight=False, soft_wrap=True)
    for a in report["run"].get("arriving") or []:
        if not quiet:
            cli.out.print(f"[yellow]arriving:[/yellow] {escape(a['input'])}: changed {a['changed_seconds_ago']:g} s "
                          "ago (--settle); left for the next run", highlight=False, soft_wrap=True)
    if report["report"].get("error"):  # no report written (a full disk): the lines above are the run's record
        cli.console.print(f"[red]error:[/red] {escape(report['report']['error'])}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if report["report"].get("warning"):
        cli.console.print(f"[yellow]warning:[/yellow] {escape(report['report']['warning'])}", highlight=False,
                          soft_wrap=True)
    if not quiet:
        if report["report"].get("html"):  # the page for people, first (it had gone unnamed)
            cli.out.print(f"report: {report['report']['html']}", highlight=False, soft_wrap=True)
        cli.out.print(f"report: {report['report']['markdown']}", highlight=False, soft_wrap=True)
        cli.out.print(f"report: {report['report']['json']}", highlight=False, soft_wrap=True)
    if run_log.written:
        cli.inform(f"log: {run_log.path}", quiet)
    raise typer.Exit(0 if report["run"]["state"] == "Completed" else 1)


SKIPPED_ROWS = 20  # more skipped inputs than this are one row of the terminal's table (the reports list each)


def summary_table(report: dict) -> "Table":
    """The run's inputs, one row each, with their label areas or volumes as people write them."""
    from rich.table import Table

    from storage.numbers import readable

    table = Table()
    for col in ("input", "status", "model", "s", "windows", "labels"):
        table.add_column(col)
    skipped = [r for r in report["inputs"] if r.get("status") == "skipped"]
    fold = len(skipped) > SKIPPED_ROWS  # a night of 300 done inputs printed 300 rows of nothing new
    for r in report["inputs"]:
        if fold and r.get("status") == "skipped":
            continue
        win = r.get("windows") or {}
        unit = "ha" if r.get("measure") == "area_ha" else "mL"
        labels = ", ".join(f"{x['name']} {readable(x[r['measure']], unit)}" for x in r.get("labels", [])
                           if x.get(r.get("measure") or "") is not None)
        table.add_row(escape(Path(r["input"]).name), r["status"], escape(r.get("model") or ""),
                      "" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                      f"{win.get('evaluated')}/{win.get('skipped')}" if win else "", escape(labels))
    if fold:
        table.add_row(f"{len(skipped)} inputs", "skipped", "", "", "", "done before; each is in the reports")
    return table

