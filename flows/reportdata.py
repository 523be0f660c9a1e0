"""A run report read back as data: either shape as the nightly one, with what the page shows beside it.

The HTML page (:mod:`flows.htmlreport`) and the Prefect artifacts
(:mod:`flows.artifacts`) show the same run from the same facts: the report in
the nightly shape (:func:`as_run_report` adapts ``segment --report``
outcomes, reading the model, classes and cell size from the provenance
sidecar, the model card and the output's header), each output's quicklook,
the model cards.  Gathering them reads files but renders nothing, so it lives
apart from the page: what cannot be read is left out, never guessed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flows.report import REPORT_SCHEMA, InputReport, counts, fill_from_statistics, summary
from storage import jsontext
from storage.errors import InvalidInputError, SegflowError
from storage.inputfiles import stem_of
from storage.remote import is_url

QUICKLOOK_SUFFIX = ".quicklook.png"
MAX_CARD_BYTES = 1 << 20
MAIN_SUFFIXES = (".tif", ".tiff", ".nii.gz", ".nii")


def read_run_report(path: Path) -> dict[str, Any]:
    """A run report JSON file in the nightly shape, whichever shape it was written in."""
    try:
        data = jsontext.read(path)
    except OSError as exc:
        raise InvalidInputError(path, f"cannot read the report: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidInputError(path, f"report is not valid JSON: {exc}") from None
    return as_run_report(data, source=Path(path))


def as_run_report(report: dict[str, Any] | list[Any], *, source: Path | None = None,
                  base: Path | None = None) -> dict[str, Any]:
    """The nightly shape of a run report: a nightly report as it is, a list of segment outcomes adapted.

    ``source`` names the report in errors.  Relative output paths of outcomes
    are found from the current folder, else from ``base`` (default: ``source``'s
    folder): ``segment --report`` records them as given on the command line.
    """
    if isinstance(report, dict) and report.get("schema") == REPORT_SCHEMA:
        if not isinstance(report.get("inputs"), list) or not isinstance(report.get("run"), dict):
            raise InvalidInputError(source, "nightly report without 'run' and 'inputs'")
        return report
    if isinstance(report, dict) and "schema" in report:
        raise InvalidInputError(source, f"unknown report schema {str(report['schema'])[:80]!r}")
    outcomes = report.get("outcomes") if isinstance(report, dict) else report
    if not isinstance(outcomes, list) or not all(isinstance(o, dict) and "input" in o and "ok" in o
                                                 for o in outcomes):
        raise InvalidInputError(source, "not a segflow run report (a nightly report or segment outcomes)")
    base = base if base is not None else source.parent if source is not None else None
    models: dict[str, dict[str, Any]] = {}
    inputs = [_from_outcome(o, base, models) for o in outcomes]
    seconds = report.get("seconds") if isinstance(report, dict) else None
    if not isinstance(seconds, (int, float)):
        seconds = sum(float(r.seconds or 0) for r in inputs)
    ok = all(r.status in ("done", "skipped") for r in inputs)
    folders = {str(Path(r.outputs[0]).parent) for r in inputs if r.outputs}  # the page had said nothing of where
    return {"schema": REPORT_SCHEMA, "adapted_from": "segment-outcomes",
            "run": {"started": None, "finished": None, "seconds": seconds, "state": "Completed" if ok else "Failed",
                    "summary": summary(inputs), "out_dir": folders.pop() if len(folders) == 1 else None,
                    "models": list(models.values()),
                    "counts": counts(inputs)},
            "inputs": [r.to_dict() for r in inputs]}


def _from_outcome(outcome: dict[str, Any], base: Path | None, models: dict[str, dict[str, Any]]) -> InputReport:
    stats = outcome.get("statistics") if isinstance(outcome.get("statistics"), dict) else {}
    rep = InputReport(input=str(outcome["input"]), status="done" if outcome.get("ok") else "failed",
                      error=None if outcome.get("error") is None else str(outcome["error"]),
                      outputs=[str(o) for o in outcome.get("outputs") or []])
    if rep.status != "done":
        return rep
    if outcome.get("skipped"):  # `segment --skip-done`: its outputs of an earlier run stand, as a night's skip
        rep.status, rep.note = "skipped", str(outcome["skipped"])
    sidecar = next((o for o in rep.outputs if o.endswith(".provenance.json")), None)
    record = _read_json(locate_output(sidecar, base)) if sidecar else None
    model = record.get("model") if isinstance(record, dict) and isinstance(record.get("model"), dict) else {}
    rep.model, rep.model_path = _str(model.get("name")), _str(model.get("path"))
    card = read_card_summary(rep.model_path) if rep.model_path else None
    if rep.model_path and rep.model_path not in models:
        models[rep.model_path] = {"path": rep.model_path, "name": rep.model,
                                  "weights_sha256": _str(model.get("weights_sha256"))}
    classes = [{"value": v, "name": n} for v, n, _ in card["classes"]] if card else _classes_of(stats)
    volume = any(o.lower().endswith((".nii.gz", ".nii")) for o in rep.outputs)
    cell_size, unit, note = None, "mL" if volume else "ha", "the output's header was not read"
    main = main_output(rep.outputs)
    located = locate_output(main, base) if main else None
    if located is not None and located.exists():
        from storage.probe import probe

        try:
            header = probe(located)
            rep.kind, cell_size, unit, note = header.kind, header.cell_size, header.cell_unit, header.cell_note
        except (SegflowError, OSError) as exc:
            note = f"the output's header cannot be read: {exc}"
    fill_from_statistics(rep, stats, classes, cell_size, unit, note)
    rep.seconds = stats.get("total_seconds") if isinstance(stats.get("total_seconds"), (int, float)) else None
    return rep


def _classes_of(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Without a card: a volume's label statistics name its classes; else each counted value is "class N"."""
    named = (stats.get("label_statistics") or {}).get("classes") or {}
    if isinstance(named, dict) and named:
        return [{"value": int(e.get("value", i)), "name": str(n)} for i, (n, e) in enumerate(named.items())
                if isinstance(e, dict)]
    values = sorted(int(v) for v in (stats.get("label_pixels") or {}) if str(v).isdigit())
    return [{"value": v, "name": f"class {v}"} for v in values if v not in (255, 65535)]  # segflow's label nodata


def main_output(outputs: list[str]) -> str | None:
    """The label map among an input's outputs (a COG or a NIfTI), the one its quicklook is drawn from."""
    return next((o for o in outputs if o.lower().endswith(MAIN_SUFFIXES)), None)


def quicklook_path(output: str | os.PathLike[str]) -> Path:
    """Where an output's quicklook lives: ``<output stem>.quicklook.png`` beside it."""
    return Path(output).with_name(stem_of(output) + QUICKLOOK_SUFFIX)


def find_quicklooks(report: dict[str, Any], *, base: Path | None = None) -> dict[str, Path]:
    """{input: quicklook PNG} for the inputs whose label map has a quicklook beside it."""
    found = {}
    run_report = as_run_report(report, base=base)
    out_dir = _str(run_report["run"].get("out_dir"))
    for rep in run_report["inputs"]:
        main = main_output([str(o) for o in rep.get("outputs") or []])
        # looked for by its own name, so a label map deleted or moved since does not hide its picture
        located = locate_output(str(quicklook_path(Path(main))), base, out_dir) if main else None
        if located is not None and located.is_file():
            found[str(rep["input"])] = located
    return found


def previous_report_path(json_path: Path) -> Path | None:
    """The nightly report written before ``json_path`` in its folder (names are UTC stamps, -2, -3... after)."""
    def order(p: Path) -> tuple[str, int]:
        stamp, _, n = p.stem.partition("-")
        return stamp, int(n) if n.isdigit() else 1

    json_path = Path(json_path)
    earlier = [p for p in json_path.parent.glob("*.json") if p != json_path and order(p) < order(json_path)]
    return max(earlier, key=order, default=None)


def read_card_summary(model_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the page shows of a model card, read as plain JSON (no torch); None when there is no readable card."""
    path = Path(model_path)
    card_path = path / "card.json" if path.is_dir() else path
    if card_path.suffix != ".json" or not card_path.is_file() or card_path.stat().st_size > MAX_CARD_BYTES:
        return None
    card = _read_json(card_path)
    if not isinstance(card, dict):
        return None
    spec = card.get("input") if isinstance(card.get("input"), dict) else {}
    arch = card.get("architecture") if isinstance(card.get("architecture"), dict) else {}
    classes = []
    for c in card.get("classes") or []:
        if isinstance(c, dict) and isinstance(c.get("value"), int):
            classes.append((c["value"], str(c.get("name", c["value"])), _rgb(c.get("color"), c["value"])))
    spacing = spec.get("spacing")
    return {"name": _str(card.get("name")), "description": _str(card.get("description")),
            "architecture": _str(arch.get("name")), "spatial_dims": spec.get("spatial_dims"),
            "channels": spec.get("channels"), "channel_names": [str(n) for n in spec.get("channel_names") or []],
            "spacing": [s for s in spacing if isinstance(s, (int, float))] if isinstance(spacing, list) else None,
            "spacing_unit": _str(spec.get("spacing_unit")), "classes": classes}


def _rgb(color: Any, value: int) -> tuple[int, int, int]:
    """A class colour as three ints in 0..255 (it goes into a style attribute); else the quicklooks' palette."""
    if isinstance(color, (list, tuple)) and len(color) == 3 and all(isinstance(c, int) for c in color):
        return tuple(max(0, min(255, c)) for c in color)  # type: ignore[return-value]
    from storage.quicklook_canvas import palette_color

    return palette_color(value)


def _read_json(path: Path | None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):  # a sidecar or card that cannot be read shows less, never fails the page
        return None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _moved_into(recorded: Path, base: Path | None, out_dir: str | None) -> Path | None:
    """``recorded`` at its place in the OUT a report now lies in (``base`` is OUT/reports), when the report was
    written in another OUT (``out_dir``); None when that does not apply."""
    if base is None or base.name != "reports" or not out_dir or is_url(out_dir):
        return None
    then, now = Path(out_dir).expanduser().absolute(), base.parent.absolute()
    if not recorded.is_relative_to(then) or then == now or (then.exists() and now.exists() and then.samefile(now)):
        return None
    return now / recorded.relative_to(then)


def locate_output(path: str, base: Path | None, out_dir: str | None = None) -> Path | None:
    """A local output path as absolute; URLs: None.  Where the recorded path is not there (OUT moved or copied,
    or a relative path recorded from another folder), the output is looked for by its name in OUT, the folder
    above ``base`` (a run report lives in OUT/reports), then in ``base``: outputs and their page move together.
    A report in a ``reports`` folder takes OUT's output of that name first, even where the recorded path still
    exists: a copied OUT (an archive of the run) had its page rebuilt from the original folder's newer outputs.
    Where the report names its OUT (``out_dir``) and now lies in another one, an output under the recorded OUT is
    only ever looked for at the same place in this one: a file deleted from the copy is missing, not the original's."""
    if is_url(path):
        return None
    p = Path(path).expanduser()
    recorded = p if p.is_absolute() else p.absolute()
    moved = _moved_into(recorded, base, out_dir)
    if moved is not None:
        return moved
    if base is not None and base.name == "reports" and p.name:  # OUT/reports: the run's own OUT first
        beside = base.parent / p.name
        if beside.exists() and beside.absolute() != recorded:  # OUT copied: the copy's outputs, not the original's
            return beside.absolute()
    if recorded.exists() or base is None:
        return recorded
    for candidate in ([] if p.is_absolute() else [base / p]) + [base.parent / p.name, base / p.name]:
        if candidate.exists():
            return candidate.absolute()
    return recorded
