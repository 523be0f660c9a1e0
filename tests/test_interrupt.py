"""Ctrl-C in a terminal (SIGINT to the command's whole process group) and SIGTERM (cron, Kubernetes, Prefect's
cancellation) stop `segflow nightly` and `segflow segment` in order: nothing new starts, the input in flight keeps
its partial store and ingested copy, the helper processes (Dask's workers, Prefect's temporary server) do not die
first, the command prints one `interrupted:` line and nothing else about it, and exits 130 or 143; the rerun
resumes and writes outputs identical to an uninterrupted run's.

The signals come from outside, as a terminal or cron sends them, once the first input's partial store holds a
few finished chunks (the windows overlap by 3/4, so that the 16 chunks take seconds to segment).  Before the fix,
the terminal's Ctrl-C hung for more than a minute, printed ~150 lines of Prefect errors and exited 1, and
SIGTERM exited 143 with a Dask traceback; both deleted the partial store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.infer import KILL_AFTER_CHUNKS_ENV, KILL_SIGNAL_ENV
from flows.pipeline import WORK_DIR
from storage.layout import JOURNAL_DIR
from storage.samples import make_scene
from tests.faults import group_alive
from tests.models import tiny_model

SIZE, CHUNK = (160, 160), 40  # a 4 x 4 grid of output chunks
CHUNKS = (SIZE[0] // CHUNK) * (SIZE[1] // CHUNK)
SLOW = ("--chunk-size", str(CHUNK), "--overlap", "0.75")  # ~4x the windows of the card's 0.25
NOISE = ("Traceback", "ClosedClientError", "EventsWorker", "CommClosedError", "Crash detected", "ERROR")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    model = tiny_model(root / "model", spatial_dims=2, channels=4, roi=[32, 32], seed=1)
    inbox = root / "inbox"
    inbox.mkdir()
    for name, seed in (("a", 3), ("b", 4)):
        _, truth = make_scene(inbox / f"{name}.tif", size=SIZE, seed=seed)
        truth.unlink()
    return {"root": root, "model": model.path, "inbox": inbox}


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "250"}
    env.pop(KILL_AFTER_CHUNKS_ENV, None)
    env.pop(KILL_SIGNAL_ENV, None)
    return env


def _command(command: str, data: dict, out: Path) -> list[str]:
    if command == "nightly":
        return [sys.executable, "-m", "flows", "nightly", "--inbox", str(data["inbox"]), "--model", str(data["model"]),
                "--out", str(out), "--no-quicklook", "--retries", "0", *SLOW]
    return [sys.executable, "-m", "flows", "segment", str(data["inbox"] / "a.tif"), str(data["inbox"] / "b.tif"),
            "--model", str(data["model"]), "--out", str(out), "--workers", "1", *SLOW]


def _run(command: str, data: dict, out: Path) -> tuple[int, str]:
    proc = subprocess.run(_command(command, data, out), capture_output=True, text=True, env=_env(), timeout=600,
                          start_new_session=True)
    return proc.returncode, proc.stderr


def _markers(out: Path, stem: str) -> list[Path]:
    return sorted(out.glob(f".{stem}.zarr.*.partial/{JOURNAL_DIR}/done/*.json"))


def _interrupt(command: str, data: dict, out: Path, how: str) -> tuple[int, str, float, int]:
    """Run ``command`` in a session of its own; once input a's partial store has 2 finished chunks, send the
    signal (``how``: "group-SIGINT" as a terminal's Ctrl-C, or "SIGTERM" to the command's process).
    (rc, stderr, seconds from the signal to the exit, chunks done when the signal went)."""
    err = out.parent / f"{out.name}.err"
    with open(err, "w") as se:
        proc = subprocess.Popen(_command(command, data, out), stdout=subprocess.DEVNULL, stderr=se, env=_env(),
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(_markers(out, "a")) < 2:
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "no chunk was written in 300 s"
                time.sleep(0.02)
            seen = len(_markers(out, "a"))
            t0 = time.monotonic()
            if how == "group-SIGINT":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=120)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deadline = time.monotonic() + 60
    while group_alive(proc.pid):  # nothing of the run goes on writing once it said it stopped
        assert time.monotonic() < deadline, "the run's workers outlived it"
        time.sleep(0.05)
    print(f"{command} {how}: exit {rc} {seconds:.1f} s after the signal ({seen} chunks done then)")
    return rc, err.read_text(), seconds, seen


def _same_output(a: Path, b: Path) -> bool:
    """Byte-identical label COGs; or, where the checkout got a commit between the two runs (the provenance embeds
    the git commit), the same pixels and the same embedded provenance but for that commit."""
    if a.read_bytes() == b.read_bytes():
        return True
    import json

    import numpy as np
    import rasterio

    def content(path: Path) -> tuple:
        with rasterio.open(path) as src:
            tags = src.tags()
            record = json.loads(tags.pop("SEGFLOW_PROVENANCE", "{}"))
            record.get("environment", {}).pop("git_commit", None)
            return src.read(), tags, record, src.profile

    (pa, ta, ra, fa), (pb, tb, rb, fb) = content(a), content(b)
    return np.array_equal(pa, pb) and ta == tb and ra == rb and fa == fb


def _line(out: Path, command: str) -> str:
    again = " with --skip-done" if command == "segment" else ""  # nightly skips what is done by itself
    return (f"interrupted: the inputs in progress left nothing in {out} that looks complete (those already done "
            f"are); run the same command again{again} to resume them from their finished chunks")


@pytest.fixture(scope="module")
def references(data):
    """Each command run once, uninterrupted."""
    refs = {}
    for command in ("nightly", "segment"):
        out = data["root"] / f"ref-{command}"
        rc, stderr = _run(command, data, out)
        assert rc == 0, stderr
        refs[command] = out
    return refs


@pytest.mark.parametrize("command, how", [("nightly", "group-SIGINT"), ("nightly", "SIGTERM"),
                                          ("segment", "group-SIGINT"), ("segment", "SIGTERM")])
def test_interrupted_run_keeps_its_work_says_one_line_and_the_rerun_resumes(data, references, tmp_path, command,
                                                                            how):
    out = tmp_path / "out"
    rc, stderr, seconds, seen = _interrupt(command, data, out, how)
    assert rc == (130 if how == "group-SIGINT" else 143), stderr
    lines = stderr.rstrip().splitlines()
    assert lines[-1] == _line(out, command), stderr
    assert sum(line.startswith("interrupted:") for line in lines) == 1, stderr
    for noise in NOISE:
        assert noise not in stderr, stderr
    assert seconds < 30, f"{seconds:.1f} s from the signal to the exit"

    # input a was in flight: its partial store and its ingested copy stay, nothing of it looks complete
    done = len(_markers(out, "a"))
    assert seen <= done < CHUNKS
    assert list(out.glob(".a.zarr.*.partial")) and list((out / WORK_DIR).glob("a.*"))
    assert not any((out / n).exists() for n in ("a.tif", "a.zarr", "a.provenance.json"))
    # input b was not started after the signal
    assert not list(out.glob(".b.zarr.*")) and not (out / "b.tif").exists()
    assert not list((out / WORK_DIR).glob("b.*"))

    rc, stderr = _run(command, data, out)
    assert rc == 0, stderr
    assert f"a.tif: resuming an interrupted run, {done} of {CHUNKS} chunks already done" in stderr, stderr
    for name in ("a.tif", "b.tif"):
        assert _same_output(out / name, references[command] / name), name
    assert not list(out.glob(".*.partial")) and not (out / WORK_DIR).exists()


def test_an_interruption_python_can_only_drop_is_not_printed(monkeypatch):
    """A SIGTERM landing in a garbage-collector callback (distributed's GC diagnosis) printed "Exception ignored
    in ..." and a traceback above the command's one line; other unraisable errors are still reported."""
    import gc

    from flows.interrupts import Interrupted, interrupt_handlers

    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))

    class Raises:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:
            raise self.exc

    with interrupt_handlers():
        Raises(Interrupted(signal.SIGTERM))
        Raises(ValueError("a real bug"))
        gc.collect()
    assert seen == [ValueError]
    Raises(Interrupted(signal.SIGTERM))  # outside a command's handlers, the hook is the one it was
    gc.collect()
    assert seen == [ValueError, Interrupted]


def test_what_asyncio_logs_after_a_sigterm_stays_off_the_terminal():
    """A SIGTERM during ingest left the Dask client's gathers unfinished: asyncio's "Task exception was never
    retrieved" and a traceback reached stderr through logging's last resort (no handler on its way to the root),
    above the command's one line."""
    script = textwrap.dedent("""
        import logging, os, signal, sys
        from flows.interrupts import deferred_interrupts, interrupt_handlers
        logging.getLogger("asyncio").error("before: still shown")
        with interrupt_handlers(), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        print("done", file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["before: still shown", "done"], proc.stderr
