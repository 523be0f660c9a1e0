"""The run report as one HTML page a person opens from disk: what each input became, at a glance.

The JSON and Markdown reports serve machines and terminals; this page serves
the person who checks a night's work.  It is one self-contained file: CSS and
every quicklook inline (base64 ``data:`` URIs), no script, nothing fetched
(its Content-Security-Policy allows only ``data:`` images and inline style), so
it can be mailed, archived or opened offline.  Links to the outputs and their
provenance are relative to the page's folder: page and outputs move together.

Two report shapes come in: the nightly report (``segflow.nightly-report/1``,
:mod:`flows.report`) and the outcomes of ``segflow segment --report``
(``Outcome.to_dict`` per input; also the demo report's ``"outcomes"``).
:func:`as_run_report` adapts the second to the first, reading what an outcome
lacks (model, classes, cell size) from its provenance sidecar, the model card
and the output's header; what cannot be read is left out, never guessed.
Every string from a report (file names, error lines, class names) is escaped.

Reading and adapting a report, and finding its quicklooks and model cards,
live in :mod:`flows.reportdata` (re-exported here); this module renders the
page and holds the ``segflow report`` command.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import typer

from storage.numbers import readable
from flows.reportdata import (MAIN_SUFFIXES, MAX_CARD_BYTES, QUICKLOOK_SUFFIX, as_run_report, find_quicklooks,
                              locate_output, main_output, previous_report_path, quicklook_path, read_card_summary,
                              read_run_report)
from storage.atomic import write_text_atomically
from storage.errors import SegflowError
from storage.inputfiles import same_file
from storage.remote import is_url

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_EMBED_BYTES = 8 << 20  # a quicklook is at most about 1 MB; anything far bigger is not one
MAX_CLASS_ROWS = 30  # a class table longer than this lists the classes present (218 rows of "0" had been shown)
TIMINGS = (("ingest", "ingest_seconds"), ("inference", "inference_seconds"), ("export", "export_seconds"),
           ("total", "total_seconds"))
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ----------------------------------------------------------------------------- numbers as people write them


def _amount(x: float | None, unit: str) -> str:
    return "–" if x is None else f"{readable(x)} {unit}"


def _seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{readable(s)} s"


# ----------------------------------------------------------------------------- the page


def write_html_report(report: dict[str, Any] | list[Any], out_html: Path, *,
                      quicklooks: dict[str, Path] | None = None, previous: dict[str, Any] | list[Any] | None = None,
                      base: Path | None = None) -> Path:
    """Write the page for ``report`` (either shape) to ``out_html``, atomically; returns its path.

    ``quicklooks``: {input as the report names it: PNG}.  ``previous``: the
    previous run's report (either shape), for each class's change since.
    ``base``: the folder relative output paths are relative to, when not the
    current one.
    """
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    page = _Page(out_html.parent.absolute(), base, quicklooks or {},
                 None if previous is None else as_run_report(previous, base=base))
    return write_text_atomically(out_html, page.render(as_run_report(report, base=base)), "HTML report")


@dataclass
class _Page:
    """What every part of one page needs: where links start, the quicklooks, the previous run, the cards."""

    html_dir: Path
    base: Path | None
    quicklooks: dict[str, Path]
    previous: dict[str, Any] | None
    cards: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    out_dir: str | None = None  # where the run wrote (the report's run.out_dir), to tell a copied OUT from it

    def render(self, report: dict[str, Any]) -> str:
        run = report["run"]
        self.out_dir = run.get("out_dir") if isinstance(run.get("out_dir"), str) else None
        inputs = [r for r in report["inputs"] if isinstance(r, dict)]
        models = [m for m in run.get("models") or [] if isinstance(m, dict)]
        self.cards = {str(m.get("path")): _card(m) for m in models}
        title = _e(f"segflow run {run.get('started') or ''}".strip())
        parts = [f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                 f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
                 f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
                 f'<style>{STYLE}</style>\n</head>\n<body>\n<header>\n<h1>{title}</h1>\n'
                 f'<p class="summary state-{_cls(run.get("state"))}"><strong>{_e(run.get("summary"))}</strong> '
                 f'— {_e(run.get("state"))}, {_e(_seconds(run.get("seconds")))}</p>\n<p class="counts">']
        parts += [f"{_badge(s, f'{n} {s}')} " for s, n in (run.get("counts") or {}).items()]
        parts.append('</p>\n<dl class="run">')
        for label, key in (("inputs from", "inbox"), ("manifest", "manifest"), ("outputs in", "out_dir"),
                           ("flow run", "flow_run_name"), ("finished", "finished")):
            if run.get(key):
                parts.append(f"<dt>{label}</dt><dd><code>{_e(run[key])}</code></dd>")
        if self.previous is not None:
            parts.append(f"<dt>changes since</dt><dd>the run of "
                         f"{_e(self.previous['run'].get('started') or 'the previous report')}</dd>")
        rows = "".join(f'<tr><td><a href="#input-{i}">{_e(input_name(r))}</a></td>'
                       f'<td>{_badge(r.get("status"))}</td><td>{_e(r.get("model") or "–")}</td>'
                       f'<td class="num">{_e(_seconds(r.get("seconds")))}</td></tr>' for i, r in enumerate(inputs))
        parts.append('</dl>\n</header>\n<main>\n<section class="overview"><h2>Inputs</h2><table><thead><tr>'
                     f'<th>input</th><th>status</th><th>model</th><th>seconds</th></tr></thead><tbody>{rows}'
                     '</tbody></table></section>\n')
        arriving = [a for a in run.get("arriving") or [] if isinstance(a, dict)]
        if arriving:  # --settle: left for the next run, so an operator sees why a delivered scan is not above
            items = "".join(f"<li><code>{_e(Path(str(a.get('input'))).name)}</code>: changed "
                            f"{_e(a.get('changed_seconds_ago'))} s before the run</li>" for a in arriving)
            parts.append(f'<section class="arriving"><h2>Still arriving</h2><p>Changed too recently '
                         f'(<code>--settle</code>); left for the next run:</p><ul>{items}</ul></section>\n')
        ignored = [str(p) for p in run.get("ignored") or []]
        if ignored:  # what the inbox held that is no input (the JSON and Markdown listed it; the page did not)
            claimed = run.get("band_files") or {}
            items = "".join(f"<li><code>{_e(Path(p).name)}</code>"
                            + (f": a band file of STAC item <code>{_e(Path(str(claimed[p])).name)}</code>"
                               if p in claimed else "") + "</li>" for p in ignored)
            parts.append(f'<section class="ignored"><h2>Not inputs</h2><p>In the inbox but not read (not a file '
                         'type segflow reads, a folder without DICOM files, or a band file a STAC item of the '
                         f'inbox names):</p><ul>{items}</ul></section>\n')
        cards = "".join(self.model(m) for m in models)
        if cards:
            parts.append(f'<section class="models"><h2>Models</h2><div class="cards">{cards}</div></section>\n')
        parts += [self.input(i, rep) for i, rep in enumerate(inputs)]
        made = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f'</main>\n<footer>Made by <code>segflow report</code> on {made}. Areas are pixel count × '
                     'pixel area (projected CRS only); volumes are voxel count × voxel volume. Skipped inputs show '
                     'the run that made their outputs.</footer>\n</body>\n</html>\n')
        return "".join(parts)

    def model(self, m: dict[str, Any]) -> str:
        card = self.cards.get(str(m.get("path")))
        facts = [("architecture", card and card["architecture"])]
        if card:
            names = f" ({', '.join(card['channel_names'])})" if card["channel_names"] else ""
            plural = "" if card["channels"] == 1 else "s"
            facts.append(("input", f"{card['spatial_dims']}-D, {card['channels']} channel{plural}{names}"))
            if card["spacing"]:  # the card's order is the storage order (z, y, x): said x first, as the quicklooks do
                axes = " × ".join("xyz"[:len(card["spacing"])])
                facts.append(("spacing", " × ".join(f"{v:g}" for v in reversed(card["spacing"]))
                              + f" {card['spacing_unit'] or ''} ({axes})"))
        if m.get("weights_sha256"):
            facts.append(("weights sha256", str(m["weights_sha256"])[:12] + "…"))
        classes = "".join(f'<li>{_swatch(rgb)}{_e(name)} <span class="dim">{value}</span></li>'
                          for value, name, rgb in (card["classes"] if card else []))
        text = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v)
        about = f'<p class="dim">{_e(card["description"])}</p>' if card and card["description"] else ""
        return (f'<article class="model"><h3>{_e(m.get("name") or (card or {}).get("name") or "model")}</h3>'
                f'{about}<dl>{text}</dl><ul class="classes">{classes}</ul></article>')

    def input(self, i: int, rep: dict[str, Any]) -> str:
        status = _cls(rep.get("status"))
        parts = [f'<section class="input status-{status}" id="input-{i}"><h2>{_badge(rep.get("status"))} '
                 f'<span title="{_e(rep.get("input"))}">{_e(input_name(rep))}</span></h2>']
        if rep.get("error"):
            parts.append(f'<p class="error"><code>{_e(rep["error"])}</code></p>')
        unmeasured = rep.get("measure_note") if rep.get("cell_size") is None and rep.get("labels") else None
        parts += [f'<p class="note">{_e(n)}</p>' for n in [rep.get("note"), unmeasured, *(rep.get("warnings") or [])]
                  if n]
        facts = [self.measures(rep)]
        timings = rep.get("timings") or {}
        if timings:
            facts.append("<p><b>timings</b> " + " · ".join(f"{label} {_e(_seconds(timings[k]))}"
                                                           for label, k in TIMINGS if k in timings) + "</p>")
        win = rep.get("windows") or {}
        if any(v is not None for v in win.values()):
            facts.append(f"<p><b>windows</b> {_count(win.get('evaluated'))} evaluated, {_count(win.get('skipped'))}"
                         f" skipped (of {_count(win.get('total'))})</p>")
        if rep.get("model"):
            attempts = rep.get("attempts") if isinstance(rep.get("attempts"), int) else 1
            facts.append(f"<p><b>model</b> {_e(rep['model'])}"
                         + (f" · <b>attempts</b> {attempts}" if attempts > 1 else "") + "</p>")
        outputs = [str(o) for o in rep.get("outputs") or []]
        for label, group in (("outputs", [o for o in outputs if not o.endswith(".provenance.json")]),
                             ("provenance", [o for o in outputs if o.endswith(".provenance.json")])):
            if group:
                facts.append(f'<p class="links"><b>{label}</b> {" · ".join(self.link(o) for o in group)}</p>')
        parts.append(f'<div class="body">{self.figure(i, rep)}<div class="facts">{"".join(facts)}</div></div>')
        return "".join(parts) + "</section>\n"

    def figure(self, i: int, rep: dict[str, Any]) -> str:
        if rep.get("status") == "skipped":  # its picture is in the page of the run that made it (and linked below):
            return ""  # embedded again every night, a page of 255 done inputs was 32 MB, night after night
        path = self.quicklooks.get(str(rep.get("input")))
        if path is None:
            listed = any(str(o).endswith(QUICKLOOK_SUFFIX) for o in rep.get("outputs") or [])
            return '<p class="missing"><em>quicklook not found</em></p>' if listed else ""  # it had gone unsaid
        try:
            data = Path(path).read_bytes() if Path(path).stat().st_size <= MAX_EMBED_BYTES else b""
        except OSError:
            data = b""
        if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
            return f'<p class="note">quicklook {_e(Path(path).name)} is not a readable PNG</p>'
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img class="quicklook" id="quicklook-{i}" src="{uri}" width="{width}" '
                f'height="{height}" alt="quicklook of {_e(input_name(rep))}"></figure>')

    def measures(self, rep: dict[str, Any]) -> str:
        labels = [r for r in rep.get("labels") or [] if isinstance(r, dict)]
        if not labels:
            return ""
        key = "volume_ml" if rep.get("measure") == "volume_ml" else "area_ha"
        unit, what, cells = ("mL", "volume", "voxels") if key == "volume_ml" else ("ha", "area", "pixels")
        card = self.cards.get(str(rep.get("model_path"))) or next(
            (c for c in self.cards.values() if c and c["name"] == rep.get("model")), None)
        colors = {value: rgb for value, _, rgb in (card["classes"] if card else [])}
        prior = None
        if self.previous is not None:
            inputs = [r for r in self.previous["inputs"] if isinstance(r, dict)]
            prior = next((r for r in inputs if str(r.get("input")) == str(rep.get("input"))), None)
            if prior is None:  # the same file reached another way (an inbox through a link)
                prior = next((r for r in inputs if _same_file(r.get("input"), rep.get("input"))), {})
        rows, listed = [], labels
        if len(labels) > MAX_CLASS_ROWS:  # hundreds of classes: those present now or in the previous run
            before = {str(r.get("name")) for r in (prior or {}).get("labels") or []
                      if isinstance(r, dict) and r.get("count")}
            listed = [r for r in labels if r.get("count") or str(r.get("name")) in before]
        for r in listed:
            amount = r.get(key) if isinstance(r.get(key), (int, float)) else None
            swatch = _swatch(colors[r.get("value")]) if r.get("value") in colors else ""
            change = "" if prior is None else f'<td class="num">{_e(_change(amount, r, prior, key, unit, rep))}</td>'
            rows.append(f'<tr><td>{swatch}{_e(r.get("name"))}</td><td class="num">{_count(r.get("count"))}</td>'
                        f'<td class="num">{_e(_amount(amount, unit))}</td>{change}</tr>')
        if len(listed) < len(labels):
            rows.append(f'<tr><td colspan="{3 if prior is None else 4}" class="dim">{len(labels) - len(listed)} more '
                        f'classes with no {cells}</td></tr>')
        head = f"<th>class</th><th>{cells}</th><th>{what}</th>" + ("" if prior is None else "<th>change</th>")
        return f'<table class="measures"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'

    def link(self, output: str) -> str:
        """A relative link from the page's folder; a URL, or a path no relative link reaches, as text."""
        located = locate_output(output, self.base, self.out_dir)
        try:
            rel = None if located is None else Path(os.path.relpath(located, self.html_dir)).as_posix()
        except ValueError:  # another drive
            rel = None
        if rel is None:
            return f"<code>{_e(output)}</code>"
        if not located.exists():  # moved or deleted since the run: said, not linked dead
            return f'<code>{_e(Path(output).name)}</code> <em class="missing">(not found)</em>'
        return f'<a href="{_e(quote(rel))}">{_e(Path(output).name)}</a>'


def _same_file(a: Any, b: Any) -> bool:
    """Two local paths of one existing file (links followed); URLs and vanished files only by their text."""
    return bool(a and b) and not is_url(str(a)) and not is_url(str(b)) and same_file(str(a), str(b))


def _card(model: dict[str, Any]) -> dict[str, Any] | None:
    path = model.get("path")
    return read_card_summary(path) if isinstance(path, str) and path and not is_url(path) else None


def _change(amount: float | None, row: dict[str, Any], prior: dict[str, Any], key: str, unit: str,
            rep: dict[str, Any]) -> str:
    """This class's change since the previous run of the same input, in the unit and as a percentage; none
    against another model's classes (a page compared with such a run had marked every class "new")."""
    if not prior:
        return "not in the previous run"
    if prior.get("status") not in ("done", "skipped"):
        return f"previous run: {prior.get('status')}"
    if prior.get("model") and rep.get("model") and prior.get("model") != rep.get("model"):
        return f"previous run: model {prior.get('model')}"
    old = next((r.get(key) for r in prior.get("labels") or [] if isinstance(r, dict)
                and str(r.get("name")) == str(row.get("name"))), None)
    if amount is None or not isinstance(old, (int, float)):
        return "new" if amount is not None and old is None else "–"
    delta = amount - old
    if delta == 0:
        return "no change"
    sign = "+" if delta > 0 else "−"
    return f"{sign}{_amount(abs(delta), unit)}" + (f" ({sign}{abs(delta) / old * 100:.1f} %)" if old else "")


def _badge(status: Any, text: Any = None) -> str:
    return f'<span class="badge status-{_cls(status)}">{_e(status if text is None else text)}</span>'


def _swatch(rgb: tuple[int, int, int]) -> str:
    r, g, b = (int(c) for c in rgb)
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def input_name(rep: dict[str, Any]) -> str:
    """A file by its name; a DICOM series by its display (its folder and UIDs tell it apart)."""
    text = str(rep.get("input"))
    return text if rep.get("dicom") or is_url(text) else Path(text).name


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "–"


def _cls(text: Any) -> str:
    """A CSS class name made from a report value: letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "", str(text).lower()) or "unknown"


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1f2328; margin: 0 auto; max-width: 1180px; padding: 16px 24px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 17px; margin: 8px 0; } h3 { font-size: 15px; margin: 0; }
code { font: 12px ui-monospace, monospace; overflow-wrap: anywhere; } table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #d8dee4; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dt { color: #59636e; } dd { margin: 0; }
dl.run, .model dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0; }
.status-done { --c: #1a7f37; } .status-skipped { --c: #0969da; } .status-failed { --c: #cf222e; }
.status-no-model { --c: #bc4c00; } .status-locked { --c: #8250df; }
.missing { color: #cf222e; } .badge { display: inline-block; border-radius: 10px; padding: 0 8px; color: #fff; font-size: 12px; font-weight: 600;
         background: var(--c, #59636e); }
section.input { border: 1px solid #d8dee4; border-left: 6px solid var(--c, #59636e); border-radius: 6px;
                padding: 8px 14px; margin: 14px 0; }
.body { display: flex; gap: 18px; flex-wrap: wrap; align-items: flex-start; } figure { margin: 0; }
.quicklook { max-width: 520px; height: auto; border: 1px solid #d8dee4; } .facts p { margin: 4px 0; }
.facts { flex: 1; min-width: 320px; } .note, .dim, footer { color: #59636e; } .note { margin: 2px 0; }
.error { color: #cf222e; background: #ffebe9; padding: 4px 8px; border-radius: 4px; }
.state-failed strong { color: #cf222e; } .state-completed strong { color: #1a7f37; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; } .classes { list-style: none; padding: 0; columns: 2; }
.model { border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 12px; min-width: 280px; flex: 1; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #0003; margin-right: 6px;
          vertical-align: -1px; } footer { font-size: 12px; margin: 24px 0 8px; }
"""


# ----------------------------------------------------------------------------- the command


def report_command(
        run_json: Path = typer.Argument(..., readable=False,
                                        help="A run report: OUT/reports/<stamp>.json of `segflow nightly`, or "
                                             "the outcomes JSON of `segflow segment --report`."),
        out: Optional[Path] = typer.Option(None, "--out", help="The HTML file to write (default: RUN_JSON with "
                                                               ".html)."),
        previous: Optional[Path] = typer.Option(None, "--previous", help="The previous run's report: show each "
                                                                         "class's change since.")) -> None:
    """Rebuild the self-contained HTML report of a run from its JSON report and the quicklooks beside its outputs."""
    from flows import cliutil

    cliutil.local_only(out, "--out")
    try:
        report = read_run_report(run_json)
        before = read_run_report(previous) if previous is not None else None
        base = run_json.parent.absolute()
        path = write_html_report(report, out or run_json.with_suffix(".html"), base=base,
                                 quicklooks=find_quicklooks(report, base=base), previous=before)
    except SegflowError as exc:
        cliutil.fail(str(exc), code=1)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:  # a field of the wrong type, hand-edited
        cliutil.fail(f"{run_json}: a field of the report is not as segflow writes it "
                     f"({type(exc).__name__}: {exc})", code=1)
    cliutil.out.print(str(path), highlight=False, soft_wrap=True)


__all__ = ["CSP", "MAIN_SUFFIXES", "MAX_CARD_BYTES", "MAX_EMBED_BYTES", "PNG_SIGNATURE", "QUICKLOOK_SUFFIX", "STYLE",
           "TIMINGS", "as_run_report", "find_quicklooks", "input_name", "main_output", "previous_report_path",
           "quicklook_path", "read_card_summary", "read_run_report", "report_command", "write_html_report"]
