"""Inputs and outputs given as URLs (``s3://bucket/key``): staged in, processed locally, staged out.

The pipeline (:func:`flows.pipeline.segment_one`) reads and writes local
files only.  This module sits around it, so a local run is exactly what it
was, and a run with URLs does the same work on local copies:

**Staging in.**  An input URL is streamed (8 MiB at a time, bounded memory)
into the pipeline's work folder, ``LOCAL_OUT/.segflow-work/staged-in/<digest
of the URL>/<its file name>``, with the files that belong to it when they sit
beside it (a ``.hdr``'s ``.img``; a GeoTIFF's ``.msk``, ``.aux.xml``,
``.ovr`` and world file).  It keeps its file name, so its outputs are named
as a local file's would be.  The copy is then ingested as any local file; the
provenance, the prediction store and the outcome name the URL
(``segment_one(record_input_as=url)``) with the sha256 of the content, and
errors name the URL.  The copy is removed when the input is done, failed or
interrupted (an interrupted run's ingested store stays and is reused: the
next run downloads to the same path, and the store is reused when the sha256
still matches).

**Staging out.**  For an output URL the pipeline writes into a local folder,
``$SEGFLOW_STAGING_DIR`` (default ``<tmp>/segflow-staging``) ``/<digest of
the URL>-<input stem>``, with its atomic renames and completion markers as
usual (so an interrupted run resumes from it).  Only once the input is
complete are its outputs uploaded: first the earlier sidecar of the same
name is deleted, then the label map, the probabilities, the zarr store (its
prefix emptied first: stale chunks of an earlier store would read as data),
and the provenance sidecar LAST.  Object stores have no rename; the sidecar
is the commit point: outputs with no sidecar are not a result.  An upload
that fails deletes what it uploaded and fails the input (no sidecar is left).
The local copies are removed after the upload, successful or not.

The nightly ledger (:mod:`flows.ledger`) lives under the output URL too
(``OUT/.segflow-cache/<key>.json``, uploaded after the sidecar).  A skip check
downloads the entry, the sidecar and the outputs it lists into a scratch
folder and runs the ledger's own checks there (:func:`remote_lookup`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flows.pipeline import remove_if_empty
from flows.replacing import remove_path
from storage import remote
from storage.errors import ExportError, InputError, SegflowError
from storage.inputfiles import kind_of, stem_of
from storage.remote import is_url

STAGING_ENV = "SEGFLOW_STAGING_DIR"
STAGED_IN = "staged-in"
SIDECAR = ".provenance.json"


def staging_root() -> Path:
    """Where outputs bound for a URL are written before upload: ``$SEGFLOW_STAGING_DIR``, else
    ``<tmp>/segflow-staging``."""
    root = os.environ.get(STAGING_ENV, "").strip()
    return Path(root).expanduser() if root else Path(tempfile.gettempdir()) / "segflow-staging"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- staging in


def companion_names(name: str) -> list[str]:
    """Files read together with ``name`` when they sit beside it: a .hdr's .img, a GeoTIFF's mask/aux/overviews."""
    lower = name.lower()
    stem = stem_of(name)
    if lower.endswith(".hdr"):
        return [stem + (".IMG" if name.endswith(".HDR") else ".img")]
    if lower.endswith(".img"):
        return [stem + (".HDR" if name.endswith(".IMG") else ".hdr")]
    if lower.endswith((".tif", ".tiff", ".vrt")):
        return [f"{name}.msk", f"{name}.aux.xml", f"{name}.ovr", f"{stem}.tfw", f"{stem}.tifw", f"{stem}.wld"]
    return []


def fetch_input(url: str, folder: Path) -> Path:
    """Download an input URL (and its companions) into ``folder``; its local copy. Errors name the URL."""
    name = remote.name_of(url)
    if not name or name.startswith("."):
        raise InputError(url, "does not end in a file name")
    try:
        kind_of(url)  # an unsupported name is refused before anything is downloaded
    except InputError:
        if _quietly(remote.isdir, url):
            raise InputError(url, "is a prefix (a folder), expected an object") from None
        raise
    try:
        found = remote.kind(url)
        if found != "file":
            raise InputError(url, "is a prefix (a folder), expected an object" if found else "no such object")
        local = remote.download(url, folder / name)
        for companion in companion_names(name):
            companion_url = remote.join(remote.parent_of(url), companion)
            if remote.isfile(companion_url):
                remote.download(companion_url, folder / companion)
    except SegflowError:
        raise
    except remote.LocalWriteError as exc:
        raise ExportError(exc.filename or folder, f"cannot stage the input {url} locally: "
                                                  f"{exc.strerror or exc}") from exc
    except FileNotFoundError:
        raise InputError(url, "no such object") from None
    except PermissionError as exc:
        raise InputError(url, f"access denied: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types; the chain keeps the cause
        raise InputError(url, f"cannot download: {type(exc).__name__}: {exc}") from exc
    return local


def _quietly(check: Any, url: str) -> bool:
    try:
        return bool(check(url))
    except Exception:  # noqa: BLE001 - only a better message depends on it
        return False


def _renamed(exc: SegflowError, folder: Path, url: str) -> SegflowError:
    """``exc`` naming the URL instead of its local copy in ``folder`` (unchanged when about something else).
    The error may name the copy by a relative path (``--out out``) or by its absolute one (a reader that
    resolved it): both are recognised."""
    if exc.path is None:
        return exc
    for form in (folder, folder.absolute()):
        if exc.path.startswith(str(form)):
            folder = form
            break
    else:
        return exc
    local = str(folder / remote.name_of(url))
    problem = exc.problem.replace(local, url).replace(str(folder), remote.parent_of(url))
    renamed = type(exc)(url if exc.path == local else exc.path.replace(str(folder), remote.parent_of(url)), problem)
    return renamed


@contextlib.contextmanager
def staged_input(path: str, local_out: str | os.PathLike[str]) -> Iterator[str]:
    """A local path for the input: ``path`` itself, or the downloaded copy of a URL, removed on exit.

    SegflowErrors raised inside, about the copy, are re-raised naming the URL.
    """
    if not is_url(path):
        yield path
        return
    from flows.pipeline import WORK_DIR

    work = Path(local_out) / WORK_DIR
    folder = work / STAGED_IN / _digest(path)
    try:
        local = fetch_input(path, folder)
        yield str(local)
    except SegflowError as exc:
        renamed = _renamed(exc, folder, path)
        if renamed is exc:
            raise
        raise renamed from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        remove_if_empty(folder.parent)
        remove_if_empty(work)


# ----------------------------------------------------------------------------- staging out


class OutputTarget:
    """Where one input's outputs go: ``out_dir`` itself, or for a URL a local folder uploaded on success."""

    def __init__(self, out_dir: str | os.PathLike[str], stem: str) -> None:
        out_dir = str(out_dir)
        if is_url(out_dir):
            self.url: str | None = out_dir.rstrip("/")
            self.local = staging_root() / f"{_digest(self.url)}-{stem}"
        else:
            self.url = None
            self.local = Path(out_dir)

    @property
    def remote(self) -> bool:
        return self.url is not None

    def url_of(self, local: str | os.PathLike[str]) -> str:
        """The URL a file of the local folder is uploaded to (the same relative path)."""
        assert self.url is not None
        return remote.join(self.url, Path(local).relative_to(self.local).as_posix())

    def publish(self, outcome: Any, extra: Sequence[str | os.PathLike[str]] = ()) -> Any:
        """Upload a finished input's outputs (sidecar last, then ``extra``); the outcome naming the URLs.

        For a local target: the outcome unchanged.
        """
        if not self.remote:
            return outcome
        files = [Path(o) for o in outcome.outputs]
        self._upload(files, [Path(e) for e in extra])
        return replace(outcome, outputs=[self.url_of(f) for f in files])

    def _upload(self, files: list[Path], extra: list[Path]) -> None:
        sidecars = [f for f in files if f.name.endswith(SIDECAR)]
        data = [f for f in files if f not in sidecars]
        uploaded: list[str] = []
        current = self.url or ""
        try:
            for f in sidecars:  # the earlier commit point goes first: from now on the old outputs are no result
                current = self.url_of(f)
                remote.remove(current)
            for f in data:
                current = self.url_of(f)
                uploaded.append(current)
                if f.is_dir():
                    remote.remove(current)  # a store's prefix: stale chunks of an earlier store would read as data
                    remote.upload_tree(f, current)
                else:
                    remote.upload(f, current)
            for f in sidecars + extra:  # the commit point, then the ledger entry naming it
                current = self.url_of(f)
                uploaded.append(current)
                remote.upload(f, current)
        except Exception as exc:
            for u in reversed(uploaded):
                with contextlib.suppress(Exception):
                    remote.remove(u)
            raise ExportError(current, f"cannot upload: {type(exc).__name__}: {exc}; nothing of this input "
                                       "was left at the output URL") from exc
        finally:
            for f in files + extra:
                remove_path(f)
                remove_if_empty(f.parent)

    def close(self) -> None:
        """Remove the local staging folder of a URL target if nothing is left in it (an interrupted run's
        partial work stays for the next run to resume)."""
        if self.remote:
            remove_if_empty(self.local)


def segment_staged(input_path: str | os.PathLike[str], model: Any, out_dir: str | os.PathLike[str], options: Any,
                   client: Any, still_ours: Callable[[], bool] | None = None) -> Any:
    """:func:`flows.pipeline.segment_one` for local paths or URLs, input and output directory alike."""
    from flows.pipeline import segment_one

    input_path, out_dir = str(input_path), str(out_dir)
    if not is_url(input_path) and not is_url(out_dir):
        return segment_one(input_path, model, out_dir, options, client, still_ours=still_ours)
    target = OutputTarget(out_dir, stem_of(input_path))
    try:
        with staged_input(input_path, target.local) as local:
            outcome = segment_one(local, model, target.local, options, client, still_ours=still_ours,
                                  record_input_as=input_path if local != input_path else None)
        return target.publish(outcome)
    finally:
        target.close()


# ----------------------------------------------------------------------------- the ledger under a URL


def _fetch_sidecar_and_outputs(url: str, sidecar_name: str, scratch: Path) -> None:
    """Download a sidecar and the outputs it lists (what is missing stays missing: the checks say so)."""
    if "/" in sidecar_name or sidecar_name.startswith(".") or not remote.isfile(remote.join(url, sidecar_name)):
        return
    local = remote.download(remote.join(url, sidecar_name), scratch / sidecar_name)
    try:
        outputs = json.loads(local.read_text()).get("outputs") or {}
    except (ValueError, AttributeError):
        return
    for name in outputs:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            continue
        source = remote.join(url, name)
        if remote.isfile(source):
            remote.download(source, scratch / name)
        elif remote.isdir(source):
            remote.download_tree(source, scratch / name)


def remote_lookup(target: OutputTarget, key: str, document: dict[str, Any], input_path: str,
                  model_path: str) -> tuple[Any, str | None, bool]:
    """:func:`flows.ledger.lookup` (then ``adopt``) for outputs under a URL: (hit, why not, adopted).

    The entry, its sidecar and the outputs it lists are downloaded into a
    scratch folder and checked there by the ledger's own code, so a URL
    output is skipped exactly when a local one would be.  Costs one download
    of the outputs (as a local skip costs one read of them).  An adopted
    result's new entry is uploaded.  The hit names the URLs.
    """
    from flows import ledger

    assert target.url is not None
    scratch = Path(tempfile.mkdtemp(prefix=".segflow-check-", dir=_mkdir(staging_root())))
    try:
        entry_url = remote.join(target.url, ledger.CACHE_DIR, f"{key}.json")
        hit, why_not, adopted = None, None, False
        if remote.isfile(entry_url):
            entry_file = remote.download(entry_url, ledger.entry_path(scratch, key))
            try:
                sidecar_name = str(json.loads(entry_file.read_text()).get("sidecar", ""))
            except (ValueError, AttributeError):
                sidecar_name = ""
            _fetch_sidecar_and_outputs(target.url, sidecar_name, scratch)
            hit, why_not = ledger.lookup(scratch, key, document["input_sha256"], document["weights_sha256"])
        if hit is None and why_not is None:
            _fetch_sidecar_and_outputs(target.url, f"{stem_of(input_path)}{SIDECAR}", scratch)
            hit, _ = ledger.adopt(scratch, input_path, key, document, model_path)
            if hit is not None:
                remote.upload(ledger.entry_path(scratch, key), entry_url)
                adopted = True
        if hit is not None:
            hit.outputs = [remote.join(target.url, Path(o).relative_to(scratch).as_posix()) for o in hit.outputs]
        return hit, why_not, adopted
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- reports and verify


def write_report(report: dict[str, Any], out: str | os.PathLike[str], stamp: str) -> tuple[str, str]:
    """:func:`flows.report.write_report`, under a URL too (written locally, then uploaded): (json, markdown)."""
    from flows.report import REPORTS_DIR
    from flows.report import write_report as write_local

    if not is_url(str(out)):
        json_path, md_path = write_local(report, out, stamp)
        return str(json_path), str(md_path)
    folder = remote.join(str(out), REPORTS_DIR)
    name, i = stamp, 1
    while remote.exists(remote.join(folder, f"{name}.json")) or remote.exists(remote.join(folder, f"{name}.md")):
        i += 1
        name = f"{stamp}-{i}"
    json_url, md_url = remote.join(folder, f"{name}.json"), remote.join(folder, f"{name}.md")
    with tempfile.TemporaryDirectory(prefix=".segflow-report-", dir=_mkdir(staging_root())) as tmp:
        local_json, local_md = write_local(report, tmp, name)
        document = json.loads(Path(local_json).read_text())
        document["report"] = {"json": json_url, "markdown": md_url}
        remote.upload(local_md, md_url)
        remote.write_bytes(json_url, json.dumps(document, indent=2, default=str).encode())
    return json_url, md_url


def verify_url(url: str) -> Any:
    """:func:`storage.provenance.verify` of an output URL or its sidecar's: the sidecar and the outputs it
    lists are downloaded to a scratch folder and checked there; the report names the URLs."""
    from storage.provenance import Verification, verify

    name = remote.name_of(url)
    sidecar_name = name if name.endswith(SIDECAR) else f"{stem_of(name)}{SIDECAR}"
    folder = remote.parent_of(url)
    sidecar_url = remote.join(folder, sidecar_name)
    if not remote.isfile(sidecar_url):
        from storage.errors import ProvenanceError

        raise ProvenanceError(sidecar_url, "unreadable provenance (no such object)")
    with tempfile.TemporaryDirectory(prefix=".segflow-verify-", dir=_mkdir(staging_root())) as tmp:
        def named(line: str) -> str:
            return line.replace(str(Path(tmp) / sidecar_name), sidecar_url).replace(tmp, folder)

        _fetch_sidecar_and_outputs(folder, sidecar_name, Path(tmp))
        try:
            found = verify(Path(tmp) / sidecar_name)
        except SegflowError as exc:
            raise type(exc)(named(exc.path or sidecar_url), named(exc.problem)) from None

    return Verification(sidecar=found.sidecar, problems=[named(x) for x in found.problems],
                        unverified=[named(x) for x in found.unverified],
                        verified=[named(x) for x in found.verified])
