"""Interruptions (Ctrl-C, SIGTERM): what a run does when it is stopped, kept apart from the logs.

A terminal's Ctrl-C (SIGINT to the command's whole process group) or a SIGTERM (cron, Kubernetes, Prefect's
cancellation) stops a run; it says nothing about the inputs.  What segflow does then:

- :func:`interrupt_handlers` (entered by the CLI around a command) and :func:`deferred_interrupts` (entered by
  ``nightly`` while its tasks run in threads) handle both signals: the first is recorded (:func:`interrupted`)
  and the consoles' log handlers stop showing library records (a closed client, a lost worker: consequences,
  not news; the log file keeps them).  Outside a deferred block it raises :class:`Interrupted` (a
  ``KeyboardInterrupt``) in the main thread, as Ctrl-C always did.  Inside one it raises nothing: the block's
  code notices it (it polls), starts nothing new and waits for what runs to stop at its next chunk
  (:func:`check_interrupt` in ``flows.pipeline``), so that the Dask client is never closed under a running
  input.  A second signal raises at once.
- the helper processes a command starts do not die first on a terminal Ctrl-C: Prefect's temporary server
  runs in a session of its own (``flows.runlog.prefect_console``), Dask's local worker processes
  ignore SIGINT (:class:`flows.cluster.IgnoreCtrlC`); the command stops them itself, and ``flows/reaper.py``
  ends whatever a killed command leaves.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``: SIGINT for Ctrl-C, SIGTERM); its partial work is kept."""

    def __init__(self, signum: int = signal.SIGINT, finished: tuple[str, ...] = ()) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.finished = finished  # inputs done in this run (an input may finish while the run stops)


class _Interrupts:
    """What this process knows of interruptions (plain attributes: a signal handler takes no lock)."""

    signum: int | None = None  # the first signal received while handlers were installed
    depth = 0  # interrupt_handlers / deferred_interrupts entered (nested)
    deferring = 0  # deferred_interrupts blocks entered
    quiet = False  # consoles show no log records (set by the first signal)
    quieted: list[logging.Handler] = []


def interrupted() -> int | None:
    """The signal (SIGINT, SIGTERM) that interrupted the run under way, or None."""
    return _Interrupts.signum


def check_interrupt(finished: tuple[str, ...] = ()) -> None:
    """Raise :class:`Interrupted` if the run was interrupted: the polls of work running in a thread.  ``finished``:
    the inputs the run completed, which the command names."""
    signum = _Interrupts.signum
    if signum is not None:
        raise Interrupted(signum, finished)


def exit_code(exc: BaseException | None = None) -> int:
    """The shell's exit code for an interruption: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    signum = getattr(exc, "signum", None) or _Interrupts.signum
    if signum is None and exc is not None and type(exc).__name__ == "TerminationSignal":  # Prefect's own SIGTERM
        signum = getattr(exc, "signal", signal.SIGTERM)
    return 128 + int(signum or signal.SIGINT)


def _handle(signum: int, frame: Any) -> None:  # noqa: ARG001
    first = _Interrupts.signum is None
    if first:
        _Interrupts.signum, _Interrupts.quiet = signum, True
        _quiet_consoles()
    if first and _Interrupts.deferring:
        return  # the deferred block sees it and stops in order
    raise Interrupted(signum)


class _AfterInterrupt(logging.Filter):
    """Once interrupted, a console shows no more log records: what follows an interruption (a closed client,
    a cancelled task, a crashed flow run) is its consequence; the command says what happened in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _Interrupts.quiet


_AFTER_INTERRUPT = _AfterInterrupt()


def _console_handlers() -> list[logging.Handler]:
    """Every console handler, and logging's last resort: the records of a logger with none on its way to the
    root (asyncio's "Task exception was never retrieved" for the Dask client's gathers a SIGTERM cut short,
    20 lines of traceback above the command's one line) reach stderr through it."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    handlers = [h for lg in loggers for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    return handlers + ([logging.lastResort] if logging.lastResort is not None else [])


def _quiet_consoles() -> None:
    """Put :class:`_AfterInterrupt` on every console handler there is now (no lock taken: runs in a handler)."""
    for h in _console_handlers():
        if _AFTER_INTERRUPT not in h.filters:
            h.filters.append(_AFTER_INTERRUPT)
            _Interrupts.quieted.append(h)


def _install() -> dict[int, Any] | None:
    """Our handler for SIGINT and SIGTERM, in the main thread; the ones it replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _handle)
    return previous


def _restore(previous: dict[int, Any] | None) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``sys.unraisablehook`` that says nothing of an :class:`Interrupted` raised where Python can only drop it:
    a signal landing in a garbage-collector callback (distributed's GC diagnosis) printed "Exception ignored in
    ..." and a traceback above the command's one line.  The interruption is recorded anyway, and the next poll
    (:func:`check_interrupt`) raises it where it is handled."""
    def quiet(unraisable: Any) -> None:
        if not isinstance(getattr(unraisable, "exc_value", None), Interrupted):
            hook(unraisable)

    quiet.segflow_interrupts = True  # type: ignore[attr-defined]
    return quiet


@contextmanager
def _interrupt_scope(defer: bool, keep_quiet: bool = False) -> Iterator[None]:
    if _Interrupts.depth == 0:  # a new command or run: an earlier one's interruption is not this one's
        _Interrupts.signum, _Interrupts.quiet = None, False
    _Interrupts.depth += 1
    _Interrupts.deferring += defer
    previous = _install()
    hook = sys.unraisablehook
    if not getattr(hook, "segflow_interrupts", False):
        sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        _restore(previous)
        sys.unraisablehook = hook
        _Interrupts.deferring -= defer
        _Interrupts.depth -= 1
        if _Interrupts.depth == 0:
            _Interrupts.signum = None
            if not (keep_quiet and _Interrupts.quiet):  # an interrupted command stays quiet to its exit
                _Interrupts.quiet = False
                for h in _Interrupts.quieted:
                    h.removeFilter(_AFTER_INTERRUPT)
                _Interrupts.quieted.clear()


def interrupt_handlers() -> Any:
    """While a command runs: Ctrl-C and SIGTERM are recorded, quiet the consoles and raise :class:`Interrupted`
    in the main thread (its ``signum`` gives the exit code, :func:`exit_code`).  After an interruption the
    consoles stay quiet until the process exits (Prefect's and Dask's shutdown say nothing more)."""
    return _interrupt_scope(defer=False, keep_quiet=True)


def deferred_interrupts() -> Any:
    """While the main thread waits for work running in other threads: a first Ctrl-C or SIGTERM is recorded
    only (:func:`interrupted`), for that work to stop at its next poll and the block to stop in order; a second
    raises :class:`Interrupted` at once.  It also replaces, for the block, the SIGTERM handler of a Prefect flow
    run (which raised in the main thread and let the Dask client close under the running tasks)."""
    return _interrupt_scope(defer=True)


def wait_interruptible(condition: Callable[[], bool], seconds: float, poll: float = 0.05) -> bool:
    """Wait up to ``seconds`` for ``condition``; raise :class:`Interrupted` as soon as the run is interrupted."""
    deadline = time.monotonic() + seconds
    while not condition():
        check_interrupt()
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def completed_interruptibly(futures: list[Any]) -> Iterator[Any]:
    """``distributed.as_completed`` that raises :class:`Interrupted` within 0.1 s of a Ctrl-C or
    SIGTERM, also where this runs in a task thread of ``nightly`` (the signal is handled in the main thread)."""
    from distributed import as_completed

    pending = as_completed(futures)
    condition = getattr(pending, "thread_condition", None)
    while True:
        while not pending.has_ready():
            check_interrupt()
            if pending.is_empty():
                return
            if condition is None:
                time.sleep(0.05)
            else:
                with condition:
                    condition.wait(timeout=0.05)
        check_interrupt()
        yield next(pending)


# Failures that say nothing about the input: the cluster or the run went away under it.  A closed client, a
# cancelled future and a lost connection are what a Ctrl-C or SIGTERM leaves in the threads still running;
# TerminationSignal is Prefect's SIGTERM inside a flow run.
NOT_THE_INPUTS = ("KilledWorker", "ClosedClientError", "FutureCancelledError", "CancelledError", "CommClosedError",
                  "TerminationSignal", "LockLostError")


def resumable(exc: BaseException) -> bool:
    """Whether a failure interrupted the run rather than condemned the input: then its partial work is kept.

    Ctrl-C, SIGTERM, Dask giving up on a task after losing its workers, a
    closed client or a cancelled future say nothing about the input; neither
    does any failure once the run was interrupted (:func:`interrupted`):
    it is the interruption's.  The next run resumes from the chunks already done.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or interrupted() is not None:
        return True
    from flows.runlog import exception_chain

    return any(cls.__name__ in NOT_THE_INPUTS for e in exception_chain(exc) for cls in type(e).__mro__)
