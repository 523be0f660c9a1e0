"""The report files of ``segflow evaluate``: evaluation.json, evaluation.md and a CSV per case, all or none.

Every file is written under a hidden temporary name and renamed into place
once all are written, the JSON last, since it names what the run wrote: a
failure leaves the folder as the previous evaluation left it, and no report
describes a CSV that is not there.  The CSVs of cases an earlier report
listed and this one does not are removed after it is in place.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from storage.errors import ExportError

METRICS = ("dice", "iou", "hd95", "asd", "nsd", "pred_size", "truth_size", "size_diff")


def fmt(x: Any) -> str:
    """A score as the tables print it: 4 significant digits, '-' for none; never "1" for a score short of it
    (a Dice of 0.99998 read as perfect): that is cut to 0.9999."""
    if x is None:
        return "-"
    if not isinstance(x, float):
        return str(x)
    text = f"{x:.4g}"
    return "0.9999" if text == "1" and x < 1 else text


def _md_cell(text: Any) -> str:
    return " ".join(fmt(text).replace("|", "\\|").split())


def _md_table(rows: list[dict[str, Any]], distance: str, size: str, tolerance: float,
              counted: bool = False) -> list[str]:
    """A class table; ``counted``: a mean's, with the number of cases each class's mean is over."""
    head = ["class", *(["cases"] if counted else []), "Dice", "IoU", f"HD95 ({distance})", f"ASD ({distance})",
            f"NSD@{tolerance:g} {distance}", f"pred ({size})", f"truth ({size})", f"diff ({size})", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['value']} {r['name']}", *([r.get("cases")] if counted else []), *(r[m] for m in METRICS),
                 r.get("note")]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def _markdown(report: dict[str, Any]) -> str:
    cases, tol = report["cases"], report["tolerance"]
    ignore = report["ignore"]
    tolerances = ", ".join(dict.fromkeys(f"{tol:g} {c['distance_unit']}" for c in cases))
    unscored = report.get("unscored") or []
    lines = ["# segflow evaluation", "",
             f"{len(cases)} case(s)" + (f", {len(unscored)} not scored (listed below)" if unscored else "")
             + f"; NSD tolerance {tolerances}; "
             + (f"truth value {ignore} not counted; " if ignore is not None else "")
             + "HD95 and ASD are symmetric; sizes are pixel counts x pixel size.", ""]
    if unscored:  # first, so that nobody takes the means for those of every prediction
        lines += ["## Not scored", "", "These predictions are in no mean and no table below:", "",
                  *(f"- {_unscored_line(u)}" for u in unscored), ""]
    means = report["means"]
    for group in means:
        title = "## Mean over cases" if len(means) == 1 else \
            f"## Mean over {', '.join(_md_cell(c) for c in group['cases'])} ({group['kind']}s)"
        lines += [title, "", *_md_table(group["classes"], group["distance_unit"], group["size_unit"], tol,
                                        counted=True), ""]
    for case in cases:
        facts = [f"prediction `{case['prediction']}`, truth `{case['truth']}`, {case['counted_pixels']} pixels "
                 f"counted, {case['ignored_pixels']} ignored", *case["notes"]]
        if case["size_note"]:
            facts.append(case["size_note"])
        lines += [f"## {_md_cell(case['case'])}", "", "; ".join(facts), "",
                  *_md_table(case["classes"], case["distance_unit"], case["size_unit"], tol), "",
                  "Confusion matrix (pixels; rows: truth, columns: prediction):", ""]
        conf = case["confusion"]
        lines.append("| truth \\ prediction | " + " | ".join(_md_cell(c) for c in conf["columns"]) + " |")
        lines.append("|" + "---|" * (len(conf["columns"]) + 1))
        for name, row in zip(conf["rows"], conf["matrix"]):
            lines.append(f"| {_md_cell(name)} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _unscored_line(entry: dict[str, Any]) -> str:
    """The error, led by the prediction where the error names another file (its truth, a card)."""
    error = _md_cell(entry["error"])
    shown = _md_cell(entry["prediction"])
    return error if error.startswith(f"{shown}: ") else f"`{shown}`: {error}"


def _csv(case: dict[str, Any]) -> str:
    buffer = io.StringIO()
    columns = ["value", "name", "dice", "iou", "hd95", "asd", "nsd", "pred_pixels", "truth_pixels", "pred_size",
               "truth_size", "size_diff", "note"]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns[:4] + [f"{c}_{case['distance_unit']}" for c in ("hd95", "asd")] + columns[6:9]
                    + [f"{c}_{case['size_unit']}" for c in ("pred_size", "truth_size", "size_diff")] + ["note"])
    for row in case["classes"]:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return buffer.getvalue()


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """evaluation.json, evaluation.md and one <case>.csv per case, all or none: each is written under a hidden
    temporary name, and renamed into place once every one is written (a CSV that could not be written had left
    a report describing it).  A failure removes what this run wrote: before the renames (where it is found)
    the folder is left as it was."""
    import errno
    import os
    import uuid

    from storage.atomic import make_output_folder

    make_output_folder(out_dir)
    outputs = [(out_dir / f"{c['case']}.csv", _csv(c)) for c in report["cases"]]
    outputs += [(out_dir / "evaluation.md", _markdown(report)),  # the JSON last: it names what the run wrote
                (out_dir / "evaluation.json", json.dumps(report, indent=2, allow_nan=False) + "\n")]
    old = _old_cases(out_dir)
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    target = out_dir
    try:
        for target, text in outputs:
            tmp = out_dir / f".{target.name}.{uuid.uuid4().hex}.tmp"
            staged.append((tmp, target))
            with open(tmp, "xb") as fh:
                fh.write(text.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in staged:  # a folder in an output's place: before any is renamed
            if target.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        for tmp, target in staged:
            os.replace(tmp, target)
            placed.append(target)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for done in placed:
            done.unlink(missing_ok=True)
        raise ExportError(target, f"cannot write the evaluation: {exc.strerror or type(exc).__name__}") from None
    for name in old - {c["case"] for c in report["cases"]}:
        (out_dir / f"{name}.csv").unlink(missing_ok=True)
    return [outputs[-1][0], outputs[-2][0], *(path for path, _ in outputs[:-2])]


def _old_cases(out_dir: Path) -> set[str]:
    """The cases an earlier evaluation.json in ``out_dir`` listed, whose CSVs go once this one is written: beside
    a report of A alone, B.csv and C.csv of the run before looked like part of it.  Only names segflow makes."""
    try:
        old = json.loads((out_dir / "evaluation.json").read_text(encoding="utf-8"))
        names = {c["case"] for c in old.get("cases", []) if isinstance(c.get("case"), str)}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    return {name for name in names if re.fullmatch(r"[\w.-]+", name)}  # a case name segflow made (never a path)


__all__ = ["METRICS", "fmt", "write_reports"]
