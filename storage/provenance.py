"""Provenance: which input, which model, which parameters, which code, when.

A provenance record is a JSON document.  It is written beside each output
(``<stem>.provenance.json``, which also records the output's own sha256) and
embedded in the output itself (zarr attribute, GeoTIFF tag, NIfTI header
extension), where it cannot name its own hash.  ``verify`` recomputes every
hash it names.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import tempfile
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any

from storage.errors import ExportError, ProvenanceError
from storage.hashing import sha256_file, sha256_tree

SCHEMA = "segflow.provenance/1"
PACKAGES = ("segflow", "torch", "monai", "zarr", "rasterio", "nibabel", "dask", "distributed", "prefect", "numpy")
_REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The source commit, when segflow runs from a git checkout (with '+dirty' for local edits)."""
    if not (_REPO / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(device: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "device": device, "versions": package_versions(), "git_commit": git_commit()}


def make_record(*, input_path: str, input_sha256: str, model: dict[str, Any], parameters: dict[str, Any],
                device: str, started: str, finished: str, statistics: dict[str, Any],
                outputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Assemble the record; ``model`` carries at least name, path and weights_sha256."""
    return {
        "schema": SCHEMA,
        "input": {"path": input_path, "sha256": input_sha256},
        "model": model,
        "parameters": parameters,
        "environment": environment(device),
        "started": started,
        "finished": finished,
        "statistics": statistics,
        "outputs": outputs or {},
    }


def sidecar_path(output: str | PathLike[str]) -> Path:
    """``OUT/<stem>.provenance.json`` for ``OUT/<stem>.tif`` or ``OUT/<stem>.nii.gz``."""
    from storage.ingest import stem_of

    return Path(output).with_name(stem_of(output) + ".provenance.json")


def sha256_output(path: str | PathLike[str]) -> str:
    """A file's sha256, or a zarr store's tree hash."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def write_sidecar(record: dict[str, Any], output: str | PathLike[str],
                  extra_outputs: tuple[str | PathLike[str], ...] = ()) -> Path:
    """Add the outputs' hashes to the record and write it atomically beside the main output."""
    output = Path(output)
    record = dict(record)
    hashes = {Path(p).name: sha256_output(p) for p in (output, *extra_outputs)}
    record["outputs"] = {**record.get("outputs", {}), **hashes}
    target = sidecar_path(output)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a sidecar is as public as its output
        os.replace(tmp, target)
    except OSError as exc:
        raise ExportError(target, f"cannot write provenance: {exc.strerror or exc}") from None
    return target


def read_sidecar(path: str | PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(path, f"unreadable provenance ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ProvenanceError(path, f"not a {SCHEMA} document")
    return record


def verify_sidecar(path: str | PathLike[str]) -> list[str]:
    """Recompute every hash the record names; return one line per problem (empty: verified)."""
    path = Path(path)
    record = read_sidecar(path)
    problems = []
    for name, digest in record.get("outputs", {}).items():
        out = path.parent / name
        if not out.exists():
            problems.append(f"output {out} is missing")
        elif sha256_output(out) != digest:
            problems.append(f"output {out} changed (sha256 differs from provenance)")
    checks = [("input", record.get("input", {}).get("path"), record.get("input", {}).get("sha256"))]
    model = record.get("model", {})
    weights = model.get("weights_path") or (str(Path(model["path"]) / "weights.safetensors")
                                            if model.get("path") else None)
    if weights:
        checks.append(("model weights", weights, model.get("weights_sha256")))
    for what, file, digest in checks:
        if not file or not digest:
            problems.append(f"{what}: no path or hash recorded")
        elif not Path(file).exists():
            problems.append(f"{what} {file} is not reachable (cannot verify)")
        elif sha256_file(file) != digest:
            problems.append(f"{what} {file} changed (sha256 differs from provenance)")
    return problems
