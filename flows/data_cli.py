"""The ``segflow ingest``, ``info`` and ``verify`` commands: getting data in and looking at what is there.

These commands make or read stores, outputs and provenance records without
running a model: ``ingest`` copies inputs into zarr stores, ``info`` prints a
file's metadata (and a label output's class table), ``verify`` recomputes the
hashes a provenance record names.  They share no code with ``segment`` or
``train``, so they sit in their own module, which ``flows/cli.py`` mounts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from flows import cliutil
from flows.config import MIN_CHUNK
from storage.errors import SegflowError

console, out = cliutil.console, cliutil.out


def ingest(inputs: List[Path] = typer.Argument(..., readable=False,
                                               help="GeoTIFF, VRT or NIfTI files, DICOM folders, DICOMDIRs "
                                                    "or DICOM files (one store per series)."),
           out_arg: str = typer.Option(..., "--out", help="Directory for the <stem>.zarr stores."),
           chunk: Optional[int] = typer.Option(None, "--chunk-size", "--chunk",
                                               help="Spatial chunk size (default 1024 in 2D, 128 in 3D), as "
                                                    "`segment --chunk-size`."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Print errors only: no line per input "
                                                                   "ingested.")) -> None:
    """Copy inputs into chunked zarr v3 image stores with their full geometry."""
    from flows.cluster import numpy_hugepages_off
    from flows.inputs import expand, input_label, input_stem, output_clashes
    from storage.atomic import make_output_folder
    from storage.ingest import ingest as do_ingest

    cliutil.check_out_folder(out_arg)  # `--out ""` had written into the working directory
    out = Path(out_arg)
    expanded, unusable = expand([str(p) for p in inputs])
    clashes = output_clashes(expanded, done="ingested")
    errors = [error for _, error in unusable] + list(clashes.values())
    for error in errors:
        console.print(f"[red]error:[/red] {escape(error)}", highlight=False, soft_wrap=True)
    failures = len(errors)
    cliutil.local_only(out, "--out")
    if chunk is not None and chunk < MIN_CHUNK:  # `segment --chunk-size` takes no less: 3 had written 3 x 3 chunks
        cliutil.fail(f"--chunk-size must be at least {MIN_CHUNK} pixels or voxels, got {chunk}")
    try:
        make_output_folder(out)
    except SegflowError as exc:
        cliutil.fail(str(exc))
    numpy_hugepages_off()  # no cluster here: the copy runs on dask's threads in this process
    for item in (item for i, item in enumerate(expanded) if i not in clashes):
        try:
            store = do_ingest(item if not isinstance(item, str) else Path(item), out / f"{input_stem(item)}.zarr",
                              chunk=chunk)
            if not quiet:  # a cron job's mail holds only what went wrong
                console.print(f"ingested {escape(input_label(item))} -> {store.path}  {store.image.shape} "
                              f"{store.image.dtype}", highlight=False, soft_wrap=True)
        except SegflowError as exc:
            failures += 1
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1 if failures else 0)



def info(path: Path = typer.Argument(..., readable=False,
                                     help="A zarr store, a GeoTIFF/NIfTI output, a provenance JSON "
                                          "or a model directory.")) -> None:
    """Print a store's or an output's metadata and provenance as JSON; for a label output also its classes with
    their pixels or voxels and area (ha) or volume (mL), as a table on stderr."""
    from flows.inspect import describe

    try:
        described = describe(path)
    except SegflowError as exc:
        cliutil.fail(str(exc))
    out.print_json(json.dumps(described, default=str))
    if isinstance(described, dict) and described.get("label_table"):
        console.print(_label_table(described["label_table"]))


def _label_table(table: dict) -> Table:
    """``segflow info``'s class table: value, name, pixels or voxels, area or volume as people write them."""
    from storage.numbers import readable

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


def verify(output: str = typer.Argument(..., help="An output file or its .provenance.json, or its URL."),
           strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) when an input or weights file is "
                                                                "not reachable from here and so not checked.")
           ) -> None:
    """Recompute the hashes named in an output's provenance; non-zero exit on any mismatch or missing output.

    An input or weights file not reachable from here is reported as unverified, not as a failure (--strict:
    a failure).
    """
    from storage.provenance import read_sidecar, sidecar_for, sidecar_path, verify as verify_record
    from storage.remote import is_url

    try:
        if is_url(output):  # downloaded to a scratch folder and checked there (flows/staging.py)
            from flows.staging import verify_url

            report = verify_url(output)
            sidecar = output if output.endswith(".provenance.json") else \
                output.rsplit("/", 1)[0] + "/" + sidecar_path(output.rsplit("/", 1)[-1]).name
        else:
            output_path = Path(output)
            if output_path.is_dir() and not output_path.name.endswith(".zarr"):
                cliutil.fail(f"{output}: is a folder; give one output file (or its .provenance.json)")
            if not output_path.exists() and not output_path.name.endswith(".provenance.json") and \
                    not sidecar_for(output_path).exists():  # it named only the sidecar, as though that were amiss
                cliutil.fail(f"{output}: no such file, and no provenance sidecar beside where it would be")
            sidecar = output_path if output_path.name.endswith(".provenance.json") else sidecar_for(output_path)
            if sidecar != output_path:  # the file named must be one the record lists: any file had "verified"
                if not sidecar.exists() and output_path.exists():
                    cliutil.fail(f"{output}: no provenance beside it records it ({sidecar.name} is absent, and no "
                                 "other .provenance.json there lists it)")
                listed = read_sidecar(sidecar).get("outputs")
                if not isinstance(listed, dict) or output_path.name not in listed:
                    if not output_path.exists():
                        cliutil.fail(f"{output}: no such file (nor among the outputs {sidecar.name} records)")
                    console.print(f"[red]mismatch:[/red] {output} is not among the outputs {sidecar} records",
                                  highlight=False, soft_wrap=True)
                    raise typer.Exit(1)
            report = verify_record(sidecar)
    except SegflowError as exc:
        cliutil.fail(str(exc))
    for line in report.unverified:
        console.print(f"[yellow]unverified:[/yellow] {line}", highlight=False, soft_wrap=True)
    for p in report.problems:
        console.print(f"[red]mismatch:[/red] {p}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    if strict and report.unverified:
        console.print(f"[red]not verified[/red] {sidecar}: {len(report.unverified)} file(s) not reachable "
                      "(--strict)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]verified[/green] {sidecar} ({len(report.verified)} hashes)", highlight=False,
                  soft_wrap=True)
