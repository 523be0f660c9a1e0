"""Provenance: which input, which model, which parameters, which code, when.

A provenance record is a JSON document.  It is written beside each output
(``<stem>.provenance.json``, which also records the output's own sha256) and
embedded in the output itself (zarr attribute, GeoTIFF tag, NIfTI header
extension), where it cannot name its own hash.  ``verify`` recomputes every
hash it names.

The embedded copy (:func:`embedded`) leaves out what differs between two runs
that produce the same labels: the start and finish times and the run
statistics (timings, chunks resumed).  So a resumed run's outputs are
byte-identical to an uninterrupted run's; the sidecar keeps the whole record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any

from storage import jsontext
from storage.errors import ExportError, ProvenanceError
from storage.hashing import sha256_file, sha256_tree
from storage.inputfiles import stem_of

SCHEMA = "segflow.provenance/1"
PACKAGES = ("segflow", "torch", "monai", "zarr", "rasterio", "nibabel", "dask", "distributed", "prefect", "numpy")
_REPO = Path(__file__).resolve().parents[1]
SOURCE_COMMIT_VARIABLE = "SEGFLOW_SOURCE_COMMIT"


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
    """The source commit, when segflow runs from a git checkout (with '+dirty' for local edits); in an installed
    copy (a container image has no ``.git``), the commit its build recorded in ``SEGFLOW_SOURCE_COMMIT``
    (infra/Dockerfile's ``SEGFLOW_COMMIT`` build argument), so outputs made in production still name their code."""
    if not (_REPO / ".git").exists():
        return os.environ.get(SOURCE_COMMIT_VARIABLE, "").strip() or None
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(device: str, dask_scheduler: str | None = None) -> dict[str, Any]:
    """Where the run ran: this host, and the scheduler whose workers did the window work when it was not a local
    cluster (``device`` is then the workers')."""
    where = {"dask_scheduler": dask_scheduler} if dask_scheduler else {}
    return {"host": socket.gethostname(), **where, "platform": platform.platform(), "python": platform.python_version(),
            "device": device, "versions": package_versions(), "git_commit": git_commit()}


def make_record(*, input_path: str, input_sha256: str, model: dict[str, Any], parameters: dict[str, Any],
                device: str, started: str, finished: str, statistics: dict[str, Any],
                outputs: dict[str, str] | None = None, input_details: dict[str, Any] | None = None,
                dask_scheduler: str | None = None) -> dict[str, Any]:
    """Assemble the record; ``model`` carries at least name, path and weights_sha256.

    ``input_details`` adds to the input's entry: a DICOM series' UIDs, its
    files with their sha256 (``verify`` checks each) and its de-identification
    state, never patient identifiers.
    """
    return {
        "schema": SCHEMA,
        "input": {"path": input_path, "sha256": input_sha256, **(input_details or {})},
        "model": model,
        "parameters": parameters,
        "environment": environment(device, dask_scheduler),
        "started": started,
        "finished": finished,
        "statistics": statistics,
        "outputs": outputs or {},
    }


VOLATILE = ("started", "finished", "statistics", "outputs")
STABLE_STATISTICS = ("windows_total", "chunks", "label_pixels", "bands")  # bands: the input bands the network got


def embedded(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that only depends on what made the output: embedded in outputs, so they stay reproducible.

    Times, timings and how the work was split between runs (resumed chunks)
    are dropped; the statistics that follow from the labels (windows of the
    grid, chunks, pixels per label) are kept.
    """
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    stats = record.get("statistics") or {}
    out["statistics"] = {k: stats[k] for k in STABLE_STATISTICS if k in stats}
    return out


def sidecar_path(output: str | PathLike[str]) -> Path:
    """``OUT/<stem>.provenance.json`` for ``OUT/<stem>.tif`` or ``OUT/<stem>.nii.gz``."""
    return Path(output).with_name(stem_of(output) + ".provenance.json")


def sidecar_for(output: str | PathLike[str]) -> Path:
    """The sidecar that records ``output``: its own (``<stem>.provenance.json``), else one beside it that lists
    it among its outputs (a mosaic's ``--split-by-tile`` cuts are recorded in the mosaic's sidecar, and
    ``verify`` of a cut said "no such provenance file").  Else its own path, whose absence the caller reports."""
    own = sidecar_path(output)
    if own.exists():
        return own
    name = Path(output).name
    for candidate in sorted(Path(output).parent.glob("*.provenance.json")):
        if not candidate.is_file():  # a FIFO so named had blocked the read for ever
            continue
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and name in (record.get("outputs") or {}):
            return candidate
    return own


def retired_path(output: str | PathLike[str]) -> Path:
    """Where an earlier run's sidecar waits while a new run replaces its outputs: hidden, so no reader takes it
    for the provenance of what is there now."""
    live = sidecar_path(output)
    return live.with_name(f".{live.name}.previous")


def retire_sidecar(output: str | PathLike[str]) -> None:
    """Move the sidecar beside ``output`` out of the way before any output of a new run replaces one: killed
    between the two, the folder held new labels beside the old run's provenance, which described other
    parameters (``verify`` said "changed", everything else looked complete)."""
    live = sidecar_path(output)
    if live.is_file():
        os.replace(live, retired_path(output))


def restore_sidecar(output: str | PathLike[str]) -> None:
    """Put a retired sidecar back (a run that failed before writing its own: the earlier outputs' record)."""
    retired = retired_path(output)
    if retired.is_file() and not sidecar_path(output).exists():
        os.replace(retired, sidecar_path(output))


def sha256_output(path: str | PathLike[str]) -> str:
    """A file's sha256, or a zarr store's tree hash."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def write_sidecar(record: dict[str, Any], output: str | PathLike[str],
                  extra_outputs: tuple[str | PathLike[str], ...] = (), known: dict[str, str] | None = None) -> Path:
    """Add the outputs' hashes to the record and write it atomically beside the main output.  ``known``: hashes
    taken already, by file name (of outputs hashed before they were renamed into place)."""
    output = Path(output)
    record = dict(record)
    known = known or {}
    hashes = {Path(p).name: known.get(Path(p).name) or sha256_output(p) for p in (output, *extra_outputs)}
    record["outputs"] = {**record.get("outputs", {}), **hashes}
    target = sidecar_path(output)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # named for its output, as others' are
    try:
        with open(tmp, "x") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)  # as public as its output, whatever the umask
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(target, f"cannot write provenance: {exc.strerror or exc}") from None
    retired_path(output).unlink(missing_ok=True)  # the new record stands: the earlier one is not needed
    return target


def read_sidecar(path: str | PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO: reading it blocks
        raise ProvenanceError(path, "is not a regular file, so no provenance file")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProvenanceError(path, "no such provenance file (is the output segflow's, and its sidecar beside "
                                    "it?)") from None
    except IsADirectoryError:
        raise ProvenanceError(path, "is a directory, not a provenance file") from None
    except OSError as exc:
        raise ProvenanceError(path, f"unreadable provenance ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ProvenanceError(path, f"unreadable provenance (not JSON: {exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ProvenanceError(path, f"not a {SCHEMA} document")
    return record


@dataclass
class Verification:
    """What ``verify`` found: ``problems`` (tampering, missing outputs: a failure) and ``unverified``.

    An input or weights file that is not reachable from here (outputs are
    often copied away from the data they came from) cannot be checked: that
    is reported, but is not a failure.
    """

    sidecar: Path
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "none"


def is_output_name(name: object) -> bool:
    """Whether a name in a record's ``outputs`` is a plain file name beside the sidecar, as segflow writes them.
    A path there is an edited record: following it would have verify or the ledger read (or block on, for a
    FIFO) any file the record names."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def verify(path: str | PathLike[str]) -> Verification:
    """Recompute every hash the record names and compare the provenance embedded in the outputs with it."""
    path = Path(path)
    record = read_sidecar(path)
    malformed = record_problem(record)
    if malformed is not None:  # values of the wrong type had ended verify in a TypeError's traceback
        raise ProvenanceError(path, f"malformed provenance: {malformed}")
    try:
        return _checked(path, record)
    except (TypeError, AttributeError, KeyError) as exc:  # deeper values (a series' file list) of the wrong shape
        raise ProvenanceError(path, f"malformed provenance ({type(exc).__name__}: {exc})") from None


def _checked(path: Path, record: dict[str, Any]) -> Verification:
    report = Verification(sidecar=path)
    outputs = record.get("outputs") or {}
    if not outputs:
        report.problems.append(f"{path} names no outputs")
    for name, digest in outputs.items():
        if not is_output_name(name):
            report.problems.append(f"{path} names an output outside its folder: {str(name)[:80]!r}")
            continue
        out = path.parent / name
        if not out.exists():
            report.problems.append(f"output {out} is missing")
            continue
        if not out.is_file() and not out.is_dir():  # a FIFO in its place: hashing it had blocked for ever
            report.problems.append(f"output {out} is not a regular file")
            continue
        if out.is_dir() and not name.endswith(".zarr"):  # its tree hash had been reported as a changed sha256
            report.problems.append(f"output {out} is a folder, where {path.name} records a file")
            continue
        try:
            actual = sha256_output(out)
        except OSError as exc:  # a file its owner made private: a traceback
            report.problems.append(f"output {out} cannot be read: {exc.strerror or exc}")
            continue
        if actual != digest:
            report.problems.append(f"output {out} changed: sha256 is {_short(actual)}, provenance records "
                                   f"{_short(digest)}")
            continue
        report.verified.append(f"output {out}")
        keys = embedded_differs(out, record)
        if keys:
            report.problems.append(f"output {out} embeds provenance that differs from {path.name} in: "
                                   f"{', '.join(keys)}")
    stale = _statistics_differ(path, record, report)
    if stale is not None:
        report.problems.append(stale)
    checks = _input_checks(record.get("input", {}))
    model = record.get("model", {})
    weights = model.get("weights_path") or (str(Path(model["path"]) / "weights.safetensors")
                                            if model.get("path") else None)
    # a file of a multi-file input (a series' slice, a mosaic's tile) gone while others of it are here was
    # deleted, not left on another machine: a mismatch, never "unverified" (one missing slice passed verify)
    members = [file for what, file, _ in checks if what in _MEMBERS and file and not _is_url(file)]
    group_here = len(members) > 1 and any(Path(f).is_file() for f in members)
    checks.append(("model weights", weights, model.get("weights_sha256")))
    if model.get("card_path"):  # a model directory's card: the same weights behind an edited card label otherwise
        checks.append(("model card", model["card_path"], model.get("card_file_sha256")))
    for what, file, digest in checks:
        if not file or not digest:
            report.problems.append(f"{what}: no path or sha256 recorded")
        elif _is_url(file):  # an input read from a URL (staged): hashed by streaming the object
            _verify_url(report, what, file, digest)
        elif not Path(file).is_file() and group_here and what in _MEMBERS:
            report.problems.append(f"{what} {file} is missing, while the input's other files are here")
        elif not Path(file).is_file() and what == "model weights" and _card_here(model):
            # the model directory is here (its card verified), its weights gone: deleted, not left elsewhere
            report.problems.append(f"{what} {file} is missing, while the model's card is here")
        elif not Path(file).is_file():
            report.unverified.append(f"{what} {file} is not reachable; its sha256 {_short(digest)} was not checked")
        else:
            try:
                actual = sha256_file(file)
            except OSError as exc:
                report.problems.append(f"{what} {file} cannot be read: {exc.strerror or exc}")
                continue
            if actual != digest:
                report.problems.append(f"{what} {file} changed: sha256 is {_short(actual)}, provenance records "
                                       f"{_short(digest)}")
            else:
                report.verified.append(f"{what} {file}")
    grown = _series_growth(record.get("input", {}))
    if grown is not None:
        report.problems.append(grown)
    return report


def embedded_differs(output: Path, record: dict[str, Any]) -> list[str]:
    """The keys in which the provenance embedded in ``output`` differs from the record's (none: it agrees, or it
    embeds none).  ``verify`` and the ledger's skip both ask: a sidecar edited after the run had its outputs
    skipped as done by ``--skip-done`` while ``verify`` refused them."""
    inner, expected = read_embedded(output), embedded(record)
    if inner is None or inner == expected:
        return []
    return sorted(k for k in set(inner) | set(expected) if inner.get(k) != expected.get(k))


def _statistics_differ(path: Path, record: dict[str, Any], report: Verification) -> str | None:
    """A volume's label statistics in the record against ``<stem>.statistics.json``, the output written from the
    same table (its hash verified above): they are not embedded in the label file, so an edited volume in mL had
    passed verify."""
    table = (record.get("statistics") or {}).get("label_statistics")
    name = path.name.removesuffix(".provenance.json") + ".statistics.json"
    out = path.parent / name
    if table is None or name not in (record.get("outputs") or {}) or f"output {out}" not in report.verified:
        return None
    try:
        written = json.loads(out.read_text())
    except (OSError, ValueError):
        return None  # its hash matched: only a file segflow wrote can be here
    if written == table:
        return None
    return f"{path.name}'s statistics.label_statistics differ from {out}, which its recorded hash vouches for"


def _card_here(model: dict[str, Any]) -> bool:
    card = model.get("card_path")
    return isinstance(card, str) and not _is_url(card) and Path(card).is_file()


def record_problem(record: dict[str, Any]) -> str | None:
    """What in a record is not of the shape segflow writes (an edited or damaged sidecar), or None."""
    outputs = record.get("outputs")
    if outputs is not None and not isinstance(outputs, dict):
        return "'outputs' is not a mapping of file names to sha256 hashes"
    for name, digest in (outputs or {}).items():
        if not isinstance(digest, str):
            return f"outputs[{str(name)[:80]!r}] is not a sha256 string"
    for part in ("input", "model", "parameters"):
        if record.get(part) is not None and not isinstance(record.get(part), dict):
            return f"'{part}' is not a mapping"
    for part, keys in (("input", ("path", "sha256")), ("model", ("path", "weights_path", "weights_sha256",
                                                                  "card_path", "card_file_sha256"))):
        for key in keys:
            value = (record.get(part) or {}).get(key)
            if value is not None and not isinstance(value, str):
                return f"{part}.{key} is not a string"
    return None


def _series_growth(source: dict[str, Any]) -> str | None:
    """A DICOM series whose folders now hold slices of it the record does not list (one added after the run):
    each recorded file still matched, so verify had passed while a rerun gave another volume.  A series found by
    searching a folder (``searched``) is looked for where that search goes, below it too (a slice added in a
    subfolder had passed, while a rerun read it); files named one by one, in the folders they are in."""
    dicom = source.get("dicom") or {}
    uid, files, root = dicom.get("series_instance_uid"), dicom.get("files"), Path(source.get("path") or "")
    if not uid or not files or not root.is_dir():
        return None
    from storage.dicomfiles import volume_label, walk
    from storage.dicomobject import scan_file

    recorded = {root / f["path"] for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)}
    recorded |= {root / c for c in dicom.get("copies") or [] if isinstance(c, str)}
    added = []
    if dicom.get("searched"):
        candidates = [p for p in walk(root) if p not in recorded]
    else:
        candidates = []
        for folder in sorted({f.parent for f in recorded}):
            try:
                candidates += sorted(p for p in folder.iterdir() if p not in recorded and p.is_file())
            except OSError:
                continue
    for path in candidates:
        try:
            obj = scan_file(path)
        except Exception:  # noqa: BLE001 - an unreadable or damaged file beside the series is not of it
            continue
        if obj is not None and obj.is_image and obj.series_instance_uid == uid and (
                not dicom.get("volume") or any(volume_label(f.key) == dicom["volume"] for f in obj.frames)):
            added.append(path)
    if not added:
        return None
    shown = ", ".join(str(f.relative_to(root)) for f in added[:3]) + (", ..." if len(added) > 3 else "")
    return (f"input series {uid} in {root} has {len(added)} file(s) of it that the record does not list "
            f"({shown}): the series changed since the run; segment it again")


# the files of one input read together (a DICOM series, a mosaic, a case's channel files)
_MEMBERS = ("input file", "mosaic tile", "channel file")


def _input_checks(source: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(what, file, sha256) of every file the input was read from.

    A DICOM series' files, a mosaic's tiles, or a STAC item's JSON and the
    local assets it stacked: their own hashes, since the input's recorded
    sha256 is then a digest of those, not of any one file.
    """
    files = (source.get("dicom") or {}).get("files")
    if files:  # a DICOM series: each of its files, relative to the series folder
        return [("input file", str(Path(source.get("path", "")) / f["path"]), f.get("sha256")) for f in files]
    channels = source.get("channel_files")
    if channels:  # nnU-Net's one file per channel: each file, in channel order
        return [("channel file", c.get("path"), c.get("sha256")) for c in channels]
    tiles = (source.get("mosaic") or {}).get("tiles")
    if tiles:
        return [("mosaic tile", t.get("path"), t.get("sha256")) for t in tiles]
    item = source.get("stac_item")
    if item:
        checks = [("STAC item", source.get("path"), item.get("sha256"))]
        for asset in item.get("assets") or []:
            if asset.get("sha256"):  # a remote asset records only what its item states: nothing to rehash here
                checks.append((f"asset {asset.get('key')}", asset.get("href"), asset["sha256"]))
        return checks
    return [("input", source.get("path"), source.get("sha256"))]


def _is_url(path: str) -> bool:
    from storage.remote import is_url

    return is_url(path)


def _verify_url(report: Verification, what: str, url: str, digest: str) -> None:
    """Check a recorded URL's sha256; an object that cannot be read from here is unverified, not a failure."""
    from storage.remote import sha256_url

    try:
        actual = sha256_url(url)
    except Exception as exc:  # noqa: BLE001 - no credentials, no network, no such object: each backend's own type
        report.unverified.append(f"{what} {url} is not reachable ({type(exc).__name__}); its sha256 "
                                 f"{_short(digest)} was not checked")
        return
    if actual != digest:
        report.problems.append(f"{what} {url} changed: sha256 is {_short(actual)}, provenance records "
                               f"{_short(digest)}")
    else:
        report.verified.append(f"{what} {url}")


def verify_sidecar(path: str | PathLike[str]) -> list[str]:
    """Recompute every hash the record names; return one line per problem (empty: verified).

    Unreachable inputs or weights are not problems (see :class:`Verification`).
    """
    return verify(path).problems


def read_embedded(output: str | PathLike[str]) -> dict[str, Any] | None:
    """The provenance record embedded in a segflow output (zarr attribute, GeoTIFF tag, NIfTI extension).

    None when the output does not carry one (e.g. a probability file of an
    older version); an output that cannot be read at all raises ProvenanceError.
    """
    output = Path(output)
    name = output.name.lower()
    try:
        if output.is_dir():
            import zarr

            return zarr.open_group(str(output), mode="r").attrs.get("provenance")
        if name.endswith((".tif", ".tiff")):
            import rasterio

            with rasterio.open(output) as src:
                text = src.tags().get("SEGFLOW_PROVENANCE")
            return None if text is None else jsontext.loads(text)
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            for ext in nib.load(str(output)).header.extensions:
                content = ext.get_content()
                text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
                try:
                    doc = jsontext.loads(text.rstrip("\0"))
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
                    return doc
            return None
    except ProvenanceError:
        raise
    except Exception as exc:  # each reader raises its own types for an unreadable file
        raise ProvenanceError(output, f"cannot read the provenance it embeds ({type(exc).__name__}: {exc})") from None
    return None
