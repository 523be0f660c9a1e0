"""A process-wide progress sink, so flows can report to the CLI's progress bars.

Flow parameters must be serialisable, so a callback cannot be passed through
Prefect; the CLI installs a reporter here instead, and the pipeline reports to
whatever is installed (nothing, by default).

What a person sees depends on where the output goes (``flows.cliutil.reporter``
picks): on a terminal, rich bars with the count, the rate per second, the time
spent and an estimate of the time left (:class:`RichReporter`); in a log file or
CI, where bars are noise, a plain line per long step every
:data:`PLAIN_EVERY_S` seconds and one when it ends (:class:`PlainReporter`);
with ``--quiet``, no progress and no informational notes, warnings only
(:class:`QuietReporter`).  Notes carry a logging level for that reason.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Protocol, Sequence

PLAIN_EVERY_S = 10.0  # seconds between a plain reporter's lines for one step


class Reporter(Protocol):
    def start(self, key: str, description: str, total: int, unit: str = "") -> None: ...
    def advance(self, key: str, amount: int = 1) -> None: ...
    def finish(self, key: str) -> None: ...


def note(text: str, level: int = logging.INFO) -> None:
    """A one-line message for the user (e.g. the Dask dashboard address), if the reporter shows messages.

    A reporter whose ``note`` takes no level (one made before levels existed) gets every note.
    """
    kept = getattr(_held, "notes", None)
    if kept is not None:  # made in a thread that holds its notes (:func:`holding_notes`)
        kept.append((text, level))
        return
    show = getattr(_current, "note", None)
    if show is None:
        return
    try:
        show(text, level)
    except TypeError:
        show(text)


_held = threading.local()


@contextmanager
def holding_notes(kept: list[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    """Keep the notes this thread makes in ``kept`` instead of showing them; the caller says them later, or not.

    A cluster started beside the model's load named its scheduler before the
    line that refused the model (``flows.batch.start_cluster``).
    """
    before = getattr(_held, "notes", None)
    _held.notes = kept
    try:
        yield kept
    finally:
        _held.notes = before


class _Silent:
    def start(self, key: str, description: str, total: int, unit: str = "") -> None:
        pass

    def advance(self, key: str, amount: int = 1) -> None:
        pass

    def finish(self, key: str) -> None:
        pass


_current: Reporter = _Silent()


def reporter() -> Reporter:
    return _current


@contextmanager
def reporting(rep: Reporter) -> Iterator[Reporter]:
    global _current
    previous, _current = _current, rep
    try:
        yield rep
    finally:
        _current = previous


class RichReporter:
    """Rich progress bars, one per long step (``flows.cliutil.progress`` gives them their columns)."""

    def __init__(self, progress) -> None:  # noqa: ANN001  (rich.progress.Progress)
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, key: str, description: str, total: int, unit: str = "") -> None:
        self.tasks[key] = self.progress.add_task(description, total=total, unit=unit)

    def advance(self, key: str, amount: int = 1) -> None:
        if key in self.tasks:
            self.progress.advance(self.tasks[key], amount)

    def finish(self, key: str) -> None:
        if key in self.tasks:
            task = self.tasks.pop(key)
            self.progress.update(task, completed=self.progress.tasks[task].total)

    def note(self, text: str, level: int = logging.INFO) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)


def rate_text(done: float, seconds: float, unit: str = "") -> str:
    """``3.2 chunks/s``, or ``12 s/chunk`` for steps slower than one a second; empty before anything is done."""
    if done <= 0 or seconds <= 0:
        return ""
    per_second = done / seconds
    if per_second >= 1 or not unit:
        return f"{per_second:.1f} {unit}/s".replace(" /s", "/s")
    return f"{seconds / done:.0f} s/{unit.removesuffix('s') if unit.endswith('s') else unit}"


def duration_text(seconds: float) -> str:
    """``0.4 s``, ``8.2 s``, ``40 s``, ``3 min 20 s``, ``1 h 05 min``: a time left or spent, as people say it."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class PlainReporter:
    """Plain lines for a log or CI: where a step is every :data:`PLAIN_EVERY_S` seconds, and when it ends.

    ``segment scene: 40/96 chunks (42%), 3.1 chunks/s, about 18 s left``, then
    ``segment scene: 96 chunks in 31 s (3.1 chunks/s)`` (``96 of 96 processed`` for
    a step whose caller names no unit).  A step that ends within the interval
    prints its last line only.
    """

    def __init__(self, console: Any, every: float = PLAIN_EVERY_S, clock: Any = time.monotonic) -> None:
        self.console, self.every, self.clock = console, every, clock
        self.steps: dict[str, dict[str, Any]] = {}

    def start(self, key: str, description: str, total: int, unit: str = "") -> None:
        now = self.clock()
        self.steps[key] = {"description": description, "total": total, "unit": unit, "done": 0,
                           "started": now, "printed": now}

    def advance(self, key: str, amount: int = 1) -> None:
        step = self.steps.get(key)
        if step is None:
            return
        step["done"] += amount
        now = self.clock()
        if now - step["printed"] >= self.every and step["done"] < step["total"]:
            step["printed"] = now
            self._print(self.line(step, now))

    def finish(self, key: str) -> None:
        step = self.steps.pop(key, None)
        if step is None:
            return
        seconds = self.clock() - step["started"]
        total, unit = step["total"], step["unit"]
        count = min(step["done"], total)  # a step cut short (an interrupted run) says how far it got
        if count < total:
            done = f"{count} of {total} {unit}" if unit else f"{count} of {total} processed"
        else:  # not "done": some may have failed; "1 window", not "1 windows"
            done = f"{count} {unit[:-1] if count == 1 and unit.endswith('s') else unit}" if unit else \
                f"{count} of {count} processed"
        rate = rate_text(count, seconds, unit) if seconds >= 1 else ""  # a rate over a blink says nothing
        self._print(f"{step['description']}: {done} in {duration_text(seconds)}" + (f" ({rate})" if rate else ""))

    def line(self, step: dict[str, Any], now: float) -> str:
        done, total, unit = step["done"], step["total"], step["unit"]
        seconds = now - step["started"]
        parts = [f"{done}/{total}{' ' + unit if unit else ''} ({100 * done // max(total, 1)}%)"]
        rate = rate_text(done, seconds, unit)
        if rate:
            parts.append(rate)
            parts.append(f"about {duration_text((total - done) * seconds / done)} left")
        return f"{step['description']}: " + ", ".join(parts)

    def note(self, text: str, level: int = logging.INFO) -> None:
        self._print(text)

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)


class QuietReporter(_Silent):
    """``--quiet``: no progress, no informational notes; a warning about an input still shows."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def note(self, text: str, level: int = logging.INFO) -> None:
        if level >= logging.WARNING:
            self.console.print(text, highlight=False, soft_wrap=True, markup=False)


def say(text: str, level: int) -> None:
    """To the user: on the CLI's console when it shows notes, else to the 'segflow' logger (flow runs, API)."""
    if getattr(reporter(), "note", None) is not None:
        note(text, level)
    else:
        logging.getLogger("segflow").log(level, text)


def window_shares(plan: Any, only: Sequence[Any] | None = None) -> dict[Any, int]:
    """Windows to count as done when each output chunk is written, adding up to the windows the run computes.

    A stitched chunk owns its windows (:meth:`StitchPlan.owned_windows`); a
    model-space plan's chunks lie on the input's grid, so its windows are
    shared out evenly over them. Progress then reads in windows per second,
    the unit a user can compare with the model's own speed. A resumed run
    writes only the chunks ``only``, and evaluates again the windows of
    finished chunks that these need (``plan.needed_windows``): their shares
    add up to that, the report's windows evaluated and skipped, so the
    console's count and rate are those of the work done.
    """
    indexes = list(plan.chunk_indexes)
    owned = getattr(plan, "owned_windows", None)
    weights = {idx: owned(idx) for idx in indexes} if owned is not None else {idx: 1 for idx in indexes}
    total = plan.num_windows
    if only is not None:
        weights = {idx: weights[idx] for idx in only}
        total = plan.needed_windows(only)
    return spread(total, weights)


def spread(total: int, weights: dict[Any, int]) -> dict[Any, int]:
    """``total`` cut into whole shares in proportion to ``weights`` (evenly where they are all 0), adding up."""
    keys = list(weights)
    if not keys:
        return {}
    w = [weights[k] for k in keys] if any(weights.values()) else [1] * len(keys)
    whole, edges, run = sum(w), [], 0
    for x in w:
        run += x
        edges.append(total * run // whole)
    return {k: b - a for k, a, b in zip(keys, [0, *edges[:-1]], edges)}
