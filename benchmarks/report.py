"""Benchmarks write their own figures into ``docs/performance.md``.

Each benchmark owns one block of the document, fenced by HTML comments::

    <!-- bench:predict-2d -->
    ... generated: the command, the machine, the date, the tables ...
    <!-- /bench:predict-2d -->

Re-running a benchmark replaces its block and leaves the prose around it
alone; a block that is not in the document yet is appended at the end.  So a
figure in the docs is always the output of the command printed above it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def _bf16_hardware() -> str:
    """" with AMX", " with AVX-512 BF16" or " without bf16 instructions": three Xeons and an EPYC with one model name
    ran these benchmarks, and `fast` computes in bf16 only on the first two (segmentation/precision.py)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ""
    return " with AMX" if "amx_bf16" in flags else " with AVX-512 BF16" if "avx512_bf16" in flags else \
        " with BF16" if "bf16" in flags else " without bf16 instructions"


def machine() -> str:
    """One line naming what ran the benchmark: CPU or GPU, cores, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}{_bf16_hardware()}, {os.cpu_count()} cores"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.insert(0, torch.cuda.get_device_name())
    except ImportError:
        pass
    return "; ".join(parts)


def command() -> str:
    """The command line that ran this benchmark, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(DOC.parents[1])
    except ValueError:
        pass
    return " ".join([".venv/bin/python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def record(key: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the block ``key`` of the performance document with ``body``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- bench:{key} -->\n"
             f"Command: `{command()}`  \n"
             f"Measured {stamp} on {machine()}.\n\n"
             f"{body.strip()}\n"
             f"<!-- /bench:{key} -->")
    text = doc.read_text() if doc.exists() else f"# {doc.stem.title()}\n"
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"recorded in {doc} (block {key})")


def publish(body: str, key: str | None) -> None:
    """Print a benchmark's figures, and record them in the block ``key`` when one was asked for (``--record``)."""
    print(body)
    if key:
        record(key, body)


def add_argument(parser, where: str = "docs/performance.md, in the block KEY") -> None:  # noqa: ANN001
    parser.add_argument("--record", metavar="KEY", default=None, help=f"write the figures into {where}")
