"""A run's results in the Prefect UI: a table, a summary with quicklooks, and a link to the HTML report.

Whoever watches the nightly flow in Prefect should see what it made without
opening a file: one table artifact (a row per input: status, classes, areas or
volumes, seconds), one markdown artifact (the summary line, the errors, each
quicklook) and one link artifact (the self-contained HTML report).  Keys stay
the same from run to run (``segflow-nightly-inputs``...), so Prefect's
Artifacts page shows each as one artifact with a version per run.

What Prefect 3's UI renders, read from the UI shipped in ``prefect`` 3.9 (the
React "V2" UI, the default; ``prefect/server/ui-v2``): markdown goes through
react-markdown with rehype-sanitize, whose allowed protocols the UI extends
with ``data:`` for ``<img src>`` (and its URL filter passes ``data:image/``),
so small inline PNGs show; link hrefs keep only http(s), mailto, irc and xmpp,
so a ``file://`` link shows its text but is not clickable (the older V1 UI
keeps the href, but browsers refuse ``file://`` from an http page anyway).
Both UIs were seen showing the inline thumbnails in headless Chromium.  Hence every path is also written
out as text, and quicklooks are inlined as thumbnails of a few hundred pixels
(the artifact is stored in Prefect's database), with a link to the full PNG.
A table artifact must be a list of rows with the same keys, and every cell is
shown as text, so cells are strings and numbers only.

Publishing is a courtesy: it never fails the run.  Any error is logged and
the artifact skipped; outside a flow or task run nothing is published (Prefect
would otherwise start a temporary server of its own).
"""

from __future__ import annotations

import base64
import io
import logging
import re
from pathlib import Path
from typing import Any

from flows.htmlreport import as_run_report, input_name
from storage.numbers import readable

THUMBNAIL_PX = 320  # longest side of a quicklook inlined in the markdown artifact
MAX_INLINE_BYTES = 150_000  # a thumbnail larger than this is linked, not inlined
# all thumbnails of one summary together: Prefect refuses to publish an event over 1.5 MB ("Refusing to publish
# event of size 5412220" for 150 inputs, about 36 KB each), and stores the artifact with every run
MAX_INLINE_TOTAL = 1_000_000
MAX_KEY = 100
log = logging.getLogger("segflow")


def artifact_key(text: str) -> str:
    """A valid Prefect artifact key from any text: lowercase letters, digits and single dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:MAX_KEY].strip("-")
    return key or "segflow"


def publish_artifacts(report: dict[str, Any] | list[Any], *, html_path: Path | None,
                      quicklooks: dict[str, Path], key_prefix: str | None = None) -> list[str]:
    """Create the run's table, markdown and link artifacts in the current flow run; returns the keys created.

    ``report``: the nightly report or segment outcomes (either shape).
    ``quicklooks``: {input as the report names it: PNG}.  ``key_prefix``:
    default ``segflow-nightly`` or ``segflow-segment``.
    """
    logger = _logger()
    if logger is None:
        log.debug("not in a Prefect flow or task run: no artifacts published")
        return []
    try:
        run = as_run_report(report)
    except Exception as exc:  # noqa: BLE001 - never fail the run over its artifacts
        logger.warning("no Prefect artifacts: %s", exc)
        return []
    kind = "segment" if run.get("adapted_from") else "nightly"
    prefix = artifact_key(key_prefix or f"segflow-{kind}")[:MAX_KEY - 12].strip("-")
    from prefect import artifacts

    made: list[str] = []
    steps = [("inputs", lambda key: artifacts.create_table_artifact(
                 results_table(run), key=key, description=f"segflow {kind}: {run['run'].get('summary')}")),
             ("summary", lambda key: artifacts.create_markdown_artifact(
                 summary_markdown(run, quicklooks, html_path), key=key, description=f"segflow {kind} run"))]
    if html_path is not None:
        steps.append(("html-report", lambda key: artifacts.create_link_artifact(
            Path(html_path).absolute().as_uri(), link_text=str(Path(html_path).absolute()), key=key,
            description="The self-contained HTML report (open it from disk: browsers refuse file:// links from "
                        "an http page).")))
    for suffix, create in steps:
        key = f"{prefix}-{suffix}"
        try:
            result = create(key)
            if hasattr(result, "close") and hasattr(result, "send"):  # an async caller got a coroutine
                result.close()
                raise RuntimeError("publish_artifacts runs in synchronous flows only")
            made.append(key)
        except Exception as exc:  # noqa: BLE001 - never fail the run over its artifacts
            logger.warning("Prefect artifact %s not published: %s", key, " ".join(str(exc).split())[:300])
    return made


def results_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per input, every row with the same keys, every cell a string or a number."""
    rows = []
    for rep in (r for r in run["inputs"] if isinstance(r, dict)):
        unit = "mL" if rep.get("measure") == "volume_ml" else "ha"
        key = rep.get("measure") or "area_ha"
        labels = [r for r in rep.get("labels") or [] if isinstance(r, dict)]
        amounts = "; ".join(f"{r.get('name')} {readable(r.get(key))} {unit}" for r in labels
                            if isinstance(r.get(key), (int, float)))
        if labels and not amounts:  # counted, but no area (e.g. a geographic CRS): say why
            amounts = str(rep.get("measure_note") or "")
        seconds = rep.get("seconds")
        rows.append({"input": input_name(rep), "status": str(rep.get("status")), "model": str(rep.get("model") or ""),
                     "classes": ", ".join(str(r.get("name")) for r in labels), "areas / volumes": amounts,
                     "seconds": round(seconds, 2) if isinstance(seconds, (int, float)) else "",
                     "error": str(rep.get("error") or "")})
    return rows


def summary_markdown(run: dict[str, Any], quicklooks: dict[str, Path], html_path: Path | None) -> str:
    """The summary, the errors and the quicklooks (inline thumbnails where small, always the PNG's path)."""
    info = run["run"]
    lines = [f"## segflow run {info.get('started') or ''}".rstrip(), "",
             f"**{_md(info.get('summary'))}**, state {_md(info.get('state'))}", ""]
    if html_path is not None:
        lines += [f"HTML report: `{_code(Path(html_path).absolute())}`", ""]
    failed = [r for r in run["inputs"] if isinstance(r, dict) and r.get("error")]
    if failed:
        lines += ["### Errors", ""] + [f"- **{_md(r.get('status'))}** `{_code(input_name(r))}`: {_md(r['error'])}"
                                       for r in failed] + [""]
    shown = [(r, Path(quicklooks[str(r.get("input"))])) for r in run["inputs"]
             if isinstance(r, dict) and str(r.get("input")) in quicklooks]
    if shown:
        lines += ["### Quicklooks", ""]
    inlined, left_out = 0, 0
    for rep, png in shown:
        lines.append(f"**{_md(input_name(rep))}** ({_md(rep.get('status'))}): "
                     f"[{_md(png.name)}]({png.absolute().as_uri()}) `{_code(png.absolute())}`")
        thumb = thumbnail_uri(png) if inlined < MAX_INLINE_TOTAL else None
        if thumb is not None and inlined + len(thumb) > MAX_INLINE_TOTAL:
            thumb, inlined = None, MAX_INLINE_TOTAL  # the rest go by path only
        if thumb is not None:
            inlined += len(thumb)
            lines += ["", f"![quicklook of {_md(input_name(rep))}]({thumb})"]
        elif inlined >= MAX_INLINE_TOTAL:
            left_out += 1
        lines.append("")
    if left_out:
        lines += [f"_The thumbnails of {left_out} more quicklooks are left out, to keep this artifact under "
                  "Prefect's event size limit: their PNGs are named above, and the HTML report shows them all._", ""]
    return "\n".join(lines)


def thumbnail_uri(png: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A small PNG of a quicklook as a ``data:`` URI; None when unreadable or still too big to inline."""
    from PIL import Image

    try:
        with Image.open(png) as img:
            img.thumbnail((size, size))
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="PNG", optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    data = buffer.getvalue()
    return None if len(data) > MAX_INLINE_BYTES else "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _logger() -> Any:
    """The run's logger inside a flow or task run; None outside one."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001
        return log


def _md(text: Any) -> str:
    """Text from a report inside markdown: its markup characters escaped, on one line."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", " ".join(str(text).split()))


def _code(text: Any) -> str:
    return " ".join(str(text).split()).replace("`", "'")
