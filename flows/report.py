"""The run report of a nightly batch: one JSON document and the same in Markdown.

Per input: status (done, skipped, failed, no-model, locked, interrupted), the one-line error, the
model, attempts, timings, windows evaluated and skipped, the label areas in
hectares (rasters) or volumes in millilitres (NIfTI, DICOM), and the output
paths.  A DICOM series is named by its ``SeriesRef.display`` (folder and UIDs)
and carries its folder, UIDs and output stem under ``dicom``.  Volumes also
carry the pipeline's per-label statistics (``label_statistics``: voxels, mL,
mean and std of the input intensity, bounding box, whether the class touches
the volume's border), which the Markdown report condenses to one line per class.

Areas: pixel count x the area of one pixel, |det| of the geotransform in the
CRS's linear unit (metres, feet... converted to m²), / 10⁴.  A raster in a
geographic CRS (degrees) or without a CRS gets no areas (null, with the
reason): its pixels' ground area varies with latitude and the histogram is
for the whole image.  Volumes: voxel count x |det| of the affine's 3x3 part
(the product of the zooms) in mm³ / 1000.  The JSON keeps full floats; the
Markdown prints them as people write them (:func:`storage.numbers.readable`:
``85,860 ha``, ``12.4 mL``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.numbers import readable
from storage.atomic import make_output_folder

REPORT_SCHEMA = "segflow.nightly-report/1"
# locked: in progress in another run, not failed; interrupted: the run was stopped (a signal) before the input ended
STATUSES = ("done", "skipped", "failed", "no-model", "locked", "interrupted")
OPTIONAL_STATUSES = ("locked", "interrupted")  # counted only when some input has them
REPORTS_DIR = "reports"


@dataclass
class InputReport:
    input: str
    status: str  # one of STATUSES
    error: str | None = None  # one line, for failed and no-model
    note: str | None = None  # e.g. why a done input was not skipped, or when a skipped one was made
    kind: str | None = None
    channels: int | None = None
    model: str | None = None
    model_path: str | None = None
    input_sha256: str | None = None
    cache_key: str | None = None
    attempts: int = 1
    seconds: float | None = None  # this run's wall time for this input (hashing and checks included)
    timings: dict[str, float] = field(default_factory=dict)  # ingest/inference/export/total seconds of the work
    windows: dict[str, int] = field(default_factory=dict)  # evaluated, skipped, total
    measure: str | None = None  # "area_ha" or "volume_ml"
    cell_size: float | None = None  # ha per pixel or mL per voxel
    measure_note: str | None = None
    labels: list[dict[str, Any]] = field(default_factory=list)  # value, name, count, and area_ha or volume_ml
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # from the segmentation's statistics (e.g. mostly nodata)
    label_statistics: dict[str, Any] | None = None  # volumes: storage.statistics.label_statistics, as recorded
    dicom: dict[str, Any] | None = None  # a DICOM series: root, series_instance_uid, volume, name, files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_measures(statistics: dict[str, Any], classes: list[dict[str, Any]], cell_size: float | None,
                   unit: str) -> list[dict[str, Any]]:
    """One row per class: its pixel/voxel count (from the run's label histogram) and area or volume.

    The histogram also counts the nodata label, which is no class and is left out.
    """
    counts = {int(k): int(v) for k, v in (statistics.get("label_pixels") or {}).items()}
    key = "area_ha" if unit == "ha" else "volume_ml"
    rows = []
    for c in classes:
        n = counts.get(int(c["value"]), 0)
        rows.append({"value": int(c["value"]), "name": c["name"], "count": n,
                     key: None if cell_size is None else n * cell_size})
    return rows


def fill_from_statistics(rep: InputReport, statistics: dict[str, Any], classes: list[dict[str, Any]],
                         cell_size: float | None, unit: str, note: str | None) -> None:
    """Timings, windows and label measures from a segmentation's statistics (its provenance record's)."""
    rep.timings = {k: statistics[k] for k in ("ingest_seconds", "inference_seconds", "export_seconds",
                                              "total_seconds") if statistics.get(k) is not None}
    rep.windows = {"evaluated": statistics.get("windows_evaluated"), "skipped": statistics.get("windows_skipped"),
                   "total": statistics.get("windows_total")}
    rep.measure = "area_ha" if unit == "ha" else "volume_ml"
    rep.cell_size = cell_size
    rep.measure_note = note
    rep.labels = label_measures(statistics, classes, cell_size, unit)
    rep.warnings = list(statistics.get("warnings") or [])
    rep.label_statistics = statistics.get("label_statistics") or None


def resumed_note(statistics: dict[str, Any]) -> str | None:
    """Said of an input finished from an interrupted run's chunks: its timings and windows are this run's
    share only, which had read as a suspiciously fast input."""
    done, total = statistics.get("chunks_resumed") or 0, statistics.get("chunks")
    if not done:
        return None
    return (f"resumed an interrupted run: {done} of {total} output chunks were done before, "
            f"{statistics.get('chunks_written', 0)} computed now")


def counts(inputs: list[InputReport]) -> dict[str, int]:
    """Inputs per status; ``locked`` and ``interrupted`` only when some input was (the counts keep their four keys)."""
    n = {s: sum(1 for r in inputs if r.status == s) for s in STATUSES}
    for status in OPTIONAL_STATUSES:
        if not n[status]:
            del n[status]
    return n


def summary(inputs: list[InputReport]) -> str:
    """One line, also the flow's final state message."""
    n = counts(inputs)
    total = len(inputs)
    parts = [f"{n['done']} done", f"{n['skipped']} skipped"]
    if n.get("locked"):
        parts.append(f"{n['locked']} locked (in progress in another run)")
    if n.get("interrupted"):
        parts.append(f"{n['interrupted']} interrupted (the next run resumes them)")
    bad = []
    if n["failed"]:
        bad.append(f"{n['failed']} of {total} inputs failed")
    if n["no-model"]:
        bad.append(f"{n['no-model']} of {total} inputs had no model")
    return "; ".join(bad + parts) if bad else f"{total} input{'s' * (total != 1)}: " + ", ".join(parts)


def timestamp(moment: _dt.datetime | None = None) -> str:
    moment = moment or _dt.datetime.now(_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str], stamp: str) -> tuple[Path, Path]:
    """OUT/reports/<stamp>.json and .md, each written atomically; a second report in the same second gets -2, -3...

    The JSON file's name is claimed with a hard link, which fails when the name
    exists: two runs finishing at once never overwrite each other's report.
    """
    folder = make_output_folder(Path(out_dir) / REPORTS_DIR)
    i = 1
    while True:
        name = stamp if i == 1 else f"{stamp}-{i}"
        i += 1
        json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
        if json_path.exists() or md_path.exists():
            continue
        named = {**report, "report": {"json": str(json_path), "markdown": str(md_path)}}
        if not _atomic_write(json_path, json.dumps(named, indent=2, default=str), exclusive=True):
            continue  # another run took this name meanwhile
        _atomic_write(md_path, render_markdown(named))
        return json_path, md_path


def _atomic_write(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Write ``text`` under a temporary name and move it into place; with ``exclusive``, False (nothing
    written) when ``path`` exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        # a name that is no UTF-8 (lone surrogates) as "\udcff", as storage.atomic writes it
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: best effort
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"


def _measures(rep: dict[str, Any]) -> str:
    if not rep.get("labels"):
        return ""
    unit = "ha" if rep.get("measure") == "area_ha" else "mL"
    key = rep.get("measure") or "area_ha"
    if rep.get("cell_size") is None:
        counts_text = ", ".join(f"{r['name']} {r['count']:,} px" for r in rep["labels"])
        return f"{counts_text} (no {unit}: {rep.get('measure_note')})"
    return ", ".join(f"{r['name']} {readable(r[key], unit)}" for r in rep["labels"])


def _input_name(rep: dict[str, Any]) -> str:
    """A file by its name; a DICOM series by its display (folder and UIDs), the only thing that tells it apart."""
    return rep["input"] if rep.get("dicom") else Path(rep["input"]).name


def class_line(name: str, entry: dict[str, Any], unit: str | None) -> str:
    """One class of a volume's label statistics: voxels, mL, mean ± std intensity, border contact."""
    text = f"{name}: {entry.get('voxels', 0):,} voxels, {readable(entry.get('volume_ml'), 'mL')}"
    if entry.get("mean") is not None:
        std = entry.get("std")
        text += f", {entry['mean']:.4g} ± {std:.3g}" if std is not None else f", {entry['mean']:.4g}"
        text += f" {unit}" if unit else " (scanner units)"
    if entry.get("touches_border"):
        text += ", touches the border"
    return text


def _statistics_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for rep in report["inputs"]:
        stats = rep.get("label_statistics")
        if not stats or not stats.get("classes"):
            continue
        lines.append(f"- `{_input_name(rep)}`:")
        # by class value: a skipped input's statistics come from its sidecar, whose keys are sorted by name
        ordered = sorted(stats["classes"].items(), key=lambda item: (_value_of(item[1]), item[0]))
        lines += [f"  - {class_line(name, entry, stats.get('unit'))}" for name, entry in ordered]
    return lines


def _value_of(entry: Any) -> float:
    value = entry.get("value") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) else float("inf")


def _cell(text: Any) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", str(text if text is not None else "")).replace("\n", " ")


_MARKDOWN = re.compile(r"([\\`*<>|&])")  # what turns text into markup; "_" and "[" stay, so paths read plainly


def _md(text: Any) -> str:
    """Free text (a class or model name, an error line naming a file) shown as itself in Markdown: HTML, emphasis,
    code and table characters are backslash-escaped.  Only ``|`` was, so a class named ``<script>...`` or
    ``*bold*`` reached a renderer as markup."""
    return _MARKDOWN.sub(r"\\\1", str(text if text is not None else "")).replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"# segflow nightly run {run['started']}", "",
             f"**{run['summary']}** — state `{run['state']}`, {run['seconds']:.1f} s, "
             f"flow run `{run.get('flow_run_id') or '–'}`", ""]
    source = run.get("inbox") or run.get("manifest")
    lines += [f"- inputs from: `{source}`", f"- outputs in: `{run['out_dir']}`",
              f"- Dask: {run.get('dask_scheduler') or '–'}"
              + (f", dashboard {run['dashboard']}" if run.get("dashboard") else ""),
              "- models: " + "; ".join(f"`{m['name']}` ({m['spatial_dims']}D, {m['channels']} ch, weights "
                                        f"{(m.get('weights_sha256') or '')[:12]}…) `{m['path']}`"
                                        for m in run["models"]), ""]
    lines += ["| input | status | model | attempts | seconds (this run) | windows evaluated / skipped | labels | outputs |",
              "|---|---|---|---|---|---|---|---|"]
    for rep in report["inputs"]:
        win = rep.get("windows") or {}
        windows = f"{win.get('evaluated')} / {win.get('skipped')}" if win else ""
        secs = rep.get("seconds")
        lines.append("| " + " | ".join(_cell(v) for v in (
            f"`{_input_name(rep)}`", rep["status"], _md(rep.get("model") or ""),
            rep.get("attempts"), _fmt(secs, 1) if secs is not None else "", windows, _md(_measures(rep)),
            "<br>".join(f"`{Path(o).name}`" for o in rep.get("outputs", [])))) + " |")
    statistics = _statistics_lines(report)
    if statistics:
        lines += ["", "## Label statistics", "", "Voxels, volume and mean ± std input intensity per class, on the "
                  "input's grid; a class that touches the border may be cut by the field of view.", ""]
        lines += statistics
    problems = [r for r in report["inputs"] if r.get("error")]
    if problems:
        lines += ["", "## Errors", ""]
        lines += [f"- **{r['status']}**: {_md(r['error'])}" for r in problems]
    notes = [(r, text) for r in report["inputs"] for text in ([r["note"]] if r.get("note") else [])
             + list(r.get("warnings") or [])]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- `{_input_name(r)}`: {_md(text)}" for r, text in notes]
    if run.get("duplicates"):  # a manifest naming one file twice: segmented once
        lines += ["", "## Listed more than once", "", "Segmented once, under the first mention:", ""]
        lines += [f"- `{_cell(Path(d['input']).name)}`: listed {d['listed']} times" for d in run["duplicates"]]
    if run.get("arriving"):  # --settle: entries still changing, taken by a later run
        lines += ["", "## Still arriving", "", "Changed too recently (`--settle`); left for the next run:", ""]
        lines += [f"- `{_cell(Path(a['input']).name)}`: changed {a['changed_seconds_ago']:g} s before the run"
                  for a in run["arriving"]]
    if run.get("ignored"):  # what the inbox held that is no input: a misnamed scan is found here
        lines += ["", "## Not inputs", "", "In the inbox but not read (not a file type segflow reads, a folder "
                  "without DICOM files, or a file a STAC item of the inbox names, read through that item):", ""]
        claimed = run.get("band_files") or {}  # set aside as a band file of an item: which item says so
        lines += [f"- `{_cell(Path(p).name)}`" + (f": a band file of STAC item `{_cell(Path(claimed[p]).name)}`"
                                                   if p in claimed else "") for p in run["ignored"]]
    lines += ["", "Skipped inputs show the windows and labels of the run that made their outputs (its timings are "
                  "in the JSON report). Areas are pixel count × pixel area (projected CRS only); volumes are voxel "
                  "count × voxel volume.", ""]
    return "\n".join(lines)
