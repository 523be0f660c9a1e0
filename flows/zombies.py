"""A nightly run whose process died without a word is marked Crashed, not left Running.

A pod stopped under a Prefect worker, a machine lost or an OOM kill ends a
flow run's process before it can report: Prefect then shows the run as
Running for ever, and with the deployments' one-run-at-a-time limit the next
night waited about five minutes for its concurrency slot (seen with
``infra/prefect.yaml``'s process worker given SIGTERM mid-run).  Prefect's
remedy is an automation on the server: flow runs send heartbeat events
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 180 s by default in Prefect 3.9), and a
run whose heartbeats stop without a final state is set to Crashed.  Prefect
Cloud has it built in; a self-hosted server needs it created once, which
``segflow schedule`` does (and ``python -m flows.zombies`` for deployments
made with ``prefect deploy``).  It is limited to runs tagged ``segflow`` (every
segflow deployment's tag), so other flows' heartbeat settings are not judged
by it, and it waits :data:`SILENT_AFTER_S` seconds: three default heartbeats
and a margin, so a busy run is never taken for a dead one.
"""

from __future__ import annotations

import os
from datetime import timedelta

AUTOMATION_NAME = "segflow: crash runs that stopped sending heartbeats"
TAG = "segflow"
SILENT_AFTER_S = 600  # > 3 x Prefect's default heartbeat (180 s)
SILENT_AFTER_ENV = "SEGFLOW_CRASH_SILENT_RUNS_AFTER_S"  # for a test, or a server of faster heartbeats


def silent_after() -> float:
    """Seconds without a heartbeat after which a run is Crashed (:data:`SILENT_AFTER_ENV`, else the default)."""
    from storage.errors import ConfigError

    given = os.environ.get(SILENT_AFTER_ENV, "").strip()
    if not given:
        return float(SILENT_AFTER_S)
    try:
        value = float(given)
    except ValueError:
        raise ConfigError(None, f"{SILENT_AFTER_ENV}={given!r} is not a number of seconds") from None
    if not value >= 60:
        raise ConfigError(None, f"{SILENT_AFTER_ENV}={given!r}: give at least 60 s (two heartbeats of 30 s)")
    return value


def crash_automation(within_s: float) -> object:
    """The automation, as Prefect's guide "detect zombie flows" builds it, for runs tagged ``segflow``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    finals = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=AUTOMATION_NAME,
        description="A segflow run that sends no heartbeat and reaches no final state within "
                    f"{within_s:g} s lost its process (a stopped pod, a lost machine): it is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *finals},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": [f"prefect.tag.{TAG}"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {within_s:g} s: the run's process ended without reporting (segflow)")],
    )


def ensure_crash_automation() -> bool:
    """Create the automation on the server ``PREFECT_API_URL`` names unless one of its name is there; True when
    created now."""
    from prefect.automations import Automation

    try:
        Automation.read(name=AUTOMATION_NAME)
        return False
    except ValueError:  # Prefect 3.9: "Automation with name ... not found"
        pass
    crash_automation(silent_after()).create()
    return True


def main() -> None:
    """``python -m flows.zombies``: create it once for deployments made with ``prefect deploy``."""
    created = ensure_crash_automation()
    print(f"{'created' if created else 'already there'}: Prefect automation {AUTOMATION_NAME!r}")


if __name__ == "__main__":
    main()
