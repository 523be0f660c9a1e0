"""How a batch or nightly flow run ends, and what its caller gets back from the state.

A run that ended well carries its result (the outcomes, the report) as the state's data.  A run with a failed
input ends Failed, and its result travels inside a :class:`storage.errors.RunFailed`: Prefect raises a failed
state's data when the flow is called as a plain function, and it cannot raise a list or a dict ("TypeError:
Unexpected result for failed state"), so the exception is what a direct call raises, one line, with the result
on it.  :func:`run_result` gives the result back from a state either way.
"""

from __future__ import annotations

from typing import Any

from prefect.states import Completed, Failed

from storage.errors import RunFailed


def ended(ok: bool, message: str, result: Any, problem: str | None = None) -> Any:
    """The run's final state: Completed with ``result``, or Failed with ``result`` inside a RunFailed that says
    ``problem`` (default: ``message``)."""
    if ok:
        return Completed(message=message, data=result)
    return Failed(message=message, data=RunFailed(problem or message, result))


def run_result(state: Any) -> Any:
    """The result of a finished run, failed or not; re-raises what stopped the run before any result."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunFailed):
        return result.result
    if isinstance(result, BaseException):
        raise result
    return result
