"""A process-wide progress sink, so flows can report to the CLI's progress bars.

Flow parameters must be serialisable, so a callback cannot be passed through
Prefect; the CLI installs a reporter here instead, and the pipeline reports to
whatever is installed (nothing, by default).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Reporter(Protocol):
    def start(self, key: str, description: str, total: int) -> None: ...
    def advance(self, key: str, amount: int = 1) -> None: ...
    def finish(self, key: str) -> None: ...


def note(text: str) -> None:
    """A one-line message for the user (e.g. the Dask dashboard address), if the reporter shows messages."""
    show = getattr(_current, "note", None)
    if show is not None:
        show(text)


class _Silent:
    def start(self, key: str, description: str, total: int) -> None:
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
    """Rich progress bars, one per long step."""

    def __init__(self, progress) -> None:  # noqa: ANN001  (rich.progress.Progress)
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, key: str, description: str, total: int) -> None:
        self.tasks[key] = self.progress.add_task(description, total=total)

    def advance(self, key: str, amount: int = 1) -> None:
        if key in self.tasks:
            self.progress.advance(self.tasks[key], amount)

    def finish(self, key: str) -> None:
        if key in self.tasks:
            task = self.tasks.pop(key)
            self.progress.update(task, completed=self.progress.tasks[task].total)

    def note(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)


def say(text: str, level: int) -> None:
    """To the user: on the CLI's console when it shows notes, else to the 'segflow' logger (flow runs, API)."""
    import logging

    if getattr(reporter(), "note", None) is not None:
        note(text)
    else:
        logging.getLogger("segflow").log(level, text)
