"""Which failures of a nightly task run are retried: transient I/O and network errors, nothing else.

Prefect retries a task run when ``retry_condition_fn`` says so; the rule
(timeouts, dropped connections, OSErrors with a transient errno, also when a
reader wrapped them) is small but documented and tested on its own
(docs/nightly.md, "Failures and retries"), so it has its own module, which
``flows/nightly_task.py`` hands to Prefect.
"""

from __future__ import annotations

import errno

from flows.runlog import exception_chain


TRANSIENT_ERRNOS = frozenset(e for e in (
    errno.EIO, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ESTALE, errno.ENOLCK, getattr(errno, "EREMOTEIO", None),
) if e is not None)


class TransientError(Exception):
    """A failure expected to pass on a later attempt (raise it to ask for a retry)."""


def is_transient(exc: BaseException) -> bool:
    """Retry?  Yes for timeouts, dropped connections and OSErrors with a transient errno (EIO, EAGAIN,
    ETIMEDOUT, ECONNRESET, ESTALE...), also when a reader wrapped them in an ``InputError``; no for the rest."""
    from distributed.comm import CommClosedError

    for e in exception_chain(exc):
        if isinstance(e, (TransientError, TimeoutError, ConnectionError, CommClosedError)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def retry_if_transient(task_, task_run, state) -> bool:  # noqa: ANN001 (Prefect's retry_condition_fn signature)
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001
            return False
    return isinstance(exc, BaseException) and is_transient(exc)
