"""Content-keyed record of finished work, kept beside the outputs: what lets a nightly run skip.

The key of an input's segmentation is the sha256 of a canonical JSON document
holding:

- the input's sha256 (its content, not its name or time stamp; for a DICOM
  series, ``SeriesRef.sha256()``: one digest over its files' sha256s);
- the model weights' sha256 and the model card (architecture, normalisation,
  classes, inference defaults: everything that shapes the output; the card's
  free-text description and training record are left out);
- the run parameters, with the card's defaults filled in (an explicit
  ``--roi`` equal to the card's gives the same key as none), leaving out the
  ones that only say where work runs (``dask_address``, ``workers``, ``gpus``;
  ``device`` stays in, as given: ``auto``, ``cpu`` or ``cuda``);
- the name stem the outputs take (``OUT/<stem>.tif``): a copy or a renamed
  input has the same content but outputs of its own name, so it is not the
  work already done (it was "skipped", and got no output under its name).

The code version is not in the key: a segflow upgrade does not redo every
output.  :data:`KEY_SCHEMA` is bumped when a change of segflow changes outputs.

When an input's outputs are complete, ``OUT/.segflow-cache/<key>.json`` is
written (atomically: a temporary file renamed into place), naming the
provenance sidecar.  One file per key: concurrent runs or tasks never rewrite
one shared index.  Before an input is skipped, the entry must still hold: its
sidecar readable, naming the same input and weights hashes, and every output
the sidecar lists present with its recorded sha256.  Anything else (outputs
deleted, edited, a half-copied output folder) and the input is processed again.

Prefect's own task cache is not used for this: it keys on the task's inputs
and run id by default, stores results in Prefect's result storage (not beside
the outputs), and a cache hit would not notice outputs deleted since.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import SegmentOptions
from segmentation.card import ModelCard
from segmentation.oneslice import plane_axes
from storage.errors import ProvenanceError
from storage.inputfiles import stem_of
from storage.layout import identity_digest
from storage.provenance import embedded_differs, is_output_name, read_sidecar, sha256_output

KEY_SCHEMA = "segflow.cache-key/2"  # /2: the output stem is in the key
ENTRY_SCHEMA = "segflow.cache-entry/1"
CACHE_DIR = ".segflow-cache"
EXECUTION_ONLY = frozenset({"dask_address", "workers", "gpus"})  # where the work runs, not what it computes


def off_flags(options: SegmentOptions) -> set[str]:
    """Opt-in flags that are off: left out of keys and records, so runs made before they existed keep their
    keys (a ledger entry, a resumable store) and their provenance."""
    return {name for name in ("compile", "quicklook") if not getattr(options, name)}


def keyed_parameters(card: ModelCard, options: SegmentOptions, *, one_slice: bool = False) -> dict[str, Any]:
    """The parameters of a run as far as they are known before it starts, card defaults filled in.

    ``one_slice``: a 2-D model on a volume one slice thick, which runs as a 3-D model with one-slice windows
    (:func:`flows.pipeline.one_slice_fit`): its window and mirrored axes as that run records them, and the
    options of volumes (not of rasters) in the key."""
    inf = card.inference
    params = options.model_dump(mode="json", exclude=set(EXECUTION_ONLY) | off_flags(options))
    roi = list(options.roi) if options.roi is not None else list(inf.roi)
    flips = sorted(options.flip_tta if options.flip_tta is not None else inf.flip_tta)
    if one_slice:
        roi, flips = plane_axes(roi, flips)
    params.update(
        roi=roi,
        overlap=options.overlap if options.overlap is not None else inf.overlap,
        blend=options.blend or inf.blend,
        sigma_scale=inf.sigma_scale,
        batch_size=options.batch_size or inf.batch_size,
        flip_tta=flips,
        crf_iterations=options.crf_iterations if options.crf else None,
    )
    params.update(_not_for(3 if one_slice else card.input.spatial_dims))
    return params


def _not_for(spatial_dims: int | None) -> dict[str, Any]:
    """The options that write nothing for this kind of input, at their defaults: `--vector gpkg` keyed a volume
    apart from the same run without it, and a nightly with it redid every volume another had done."""
    if spatial_dims == 3:
        return {"vector": "none", "simplify": None, "output_grid": "input", "bands": None}
    if spatial_dims == 2:
        return {"model_space": "input", "dicom_seg": "binary"}
    return {}


def _dims(document: dict[str, Any]) -> int | None:
    """The dimensions of the run a key describes: a one-slice volume's run is 3-D whatever its card says."""
    if isinstance(document, dict) and document.get("one_slice") is True:
        return 3
    card = document.get("card") if isinstance(document, dict) else None
    dims = (card.get("input") or {}).get("spatial_dims") if isinstance(card, dict) else None
    return dims if isinstance(dims, int) else None


def key_document(input_sha256: str, weights_sha256: str, card: ModelCard, options: SegmentOptions, *,
                 stem: str, one_slice: bool = False) -> dict[str, Any]:
    document = {
        "schema": KEY_SCHEMA,
        "input_sha256": input_sha256,
        "weights_sha256": weights_sha256,
        "card": card.shaping(),
        "parameters": keyed_parameters(card, options, one_slice=one_slice),
        "output_stem": stem,
    }
    if one_slice:  # (absent otherwise: the keys of every other run stay as they were)
        document["one_slice"] = True
    return document


def cache_key(document: dict[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def entry_path(out_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(out_dir) / CACHE_DIR / f"{key}.json"


@dataclass
class Hit:
    """A verified earlier result: the sidecar's record and the outputs it lists."""

    entry: dict[str, Any]
    record: dict[str, Any]
    outputs: list[str]


def lookup(out_dir: str | os.PathLike[str], key: str, input_sha256: str,
           weights_sha256: str) -> tuple[Hit | None, str | None]:
    """(hit, None) when the work of ``key`` is done and intact, else (None, why not) — why is None when never done."""
    path = entry_path(out_dir, key)
    if not path.is_file():
        return None, None
    try:
        entry = json.loads(path.read_text())
        if entry.get("schema") != ENTRY_SCHEMA or entry.get("key") != key:
            return None, f"cache entry {path.name} is not a {ENTRY_SCHEMA} for this key"
        if not is_output_name(entry["sidecar"]):
            return None, f"cache entry {path.name} names a sidecar outside the output folder"
        sidecar = Path(out_dir) / entry["sidecar"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cache entry {path.name} unreadable ({type(exc).__name__})"
    if not sidecar.is_file():
        return None, f"earlier output's provenance {sidecar.name} is missing"
    try:
        record = read_sidecar(sidecar)
    except ProvenanceError as exc:
        return None, str(exc)
    if record.get("input", {}).get("sha256") != input_sha256:
        return None, f"{sidecar.name} now describes another input (overwritten by another run)"
    if record.get("model", {}).get("weights_sha256") != weights_sha256:
        return None, f"{sidecar.name} now describes another model (overwritten by another run)"
    recorded = record.get("outputs") or {}
    if not recorded:
        return None, f"{sidecar.name} lists no outputs"
    for name, digest in recorded.items():
        if not is_output_name(name):
            return None, f"{sidecar.name} names an output outside its folder ({str(name)[:80]!r})"
        out = sidecar.parent / name
        if not out.exists():
            return None, f"earlier output {name} is missing"
        if sha256_output(out) != digest:
            return None, f"earlier output {name} changed since it was written (sha256 differs)"
    # the same input and model with other parameters (another run's --overlap 0.5 into this folder) rewrote the
    # outputs and their sidecar: the entry's work is gone, though every hash above matched
    pinned = entry.get("sidecar_sha256")
    if pinned is not None and pinned != _sha256(sidecar):
        return None, f"{sidecar.name} was rewritten since this entry was recorded (another run's outputs?)"
    document = entry.get("key_document")
    if isinstance(document, dict) and isinstance(document.get("parameters"), dict) and \
            _comparable_recorded(record.get("parameters") or {}, _dims(document)) != \
            _comparable_keyed(document["parameters"], _dims(document)):
        return None, f"{sidecar.name} now describes a run with other parameters (rewritten by another run)"
    for name in recorded:  # last, after the more telling reasons: an edited sidecar, which verify refuses
        try:
            differs = embedded_differs(sidecar.parent / name, record)
        except ProvenanceError as exc:
            return None, str(exc)
        if differs:
            return None, f"earlier output {name} embeds provenance that differs from {sidecar.name}"
    outputs = _ordered(sidecar, list(recorded))
    return Hit(entry=entry, record=record, outputs=outputs), None


# the parameters a sidecar must share with a key for its outputs to be that key's work: everything that changes
# what is written (--bands 4,3,2,1 and --output-grid model had been left out, and such outputs were adopted)
_COMPARED = ("precision", "roi", "overlap", "blend", "sigma_scale", "batch_size", "probabilities", "device",
             "keep_zarr", "flip_tta", "trust_bundle", "chunk_size", "bands", "model_space", "output_grid", "vector",
             "simplify", "dicom_seg", "mosaic", "crs", "split_by_tile")


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _ordered(sidecar: Path, names: list[str]) -> list[str]:
    """As ``segment_one`` lists them: the label map, other files, the sidecar, then stores."""
    stem = sidecar.name[: -len(".provenance.json")]
    main = [n for n in names if n in (f"{stem}.tif", f"{stem}.nii.gz")]
    files = [n for n in names if n not in main and not (sidecar.parent / n).is_dir()]
    stores = [n for n in names if n not in main and n not in files]
    return [str(sidecar.parent / n) for n in main + files] + [str(sidecar)] + [str(sidecar.parent / n) for n in stores]


def _comparable_keyed(params: dict[str, Any], dims: int | None = None) -> dict[str, Any]:
    out = {k: params.get(k) for k in _COMPARED}
    out["crf"] = params.get("crf_iterations") if params.get("crf") else None
    out["quicklook"] = bool(params.get("quicklook"))  # an adopted input got no quicklook where one was asked for
    out.update(_not_for(dims))
    return out


def _comparable_recorded(params: dict[str, Any], dims: int | None = None) -> dict[str, Any]:
    out = {k: params.get(k) for k in _COMPARED}
    out["flip_tta"] = sorted(out["flip_tta"] or [])
    crf = params.get("crf")
    out["crf"] = crf.get("iterations") if isinstance(crf, dict) else None
    out["quicklook"] = bool(params.get("quicklook"))
    out.update(_not_for(dims))
    return out


def adopt(out_dir: str | os.PathLike[str], input_path: str, key: str, document: dict[str, Any],
          model_path: str, *, stem: str | None = None) -> tuple[Hit | None, str | None]:
    """Outputs made without an entry (by ``segflow segment``, or before the ledger existed) count as done
    when ``OUT/<stem>.provenance.json`` names the same input hash, weights hash and parameters and its
    outputs verify; the entry is then written.  (hit, None), or (None, why not; None when nothing is there).

    ``stem`` is the outputs' name when it is not the input file's (a DICOM series: its ``SeriesRef.name``).
    """
    sidecar = Path(out_dir) / f"{stem or document.get('output_stem') or stem_of(input_path)}.provenance.json"
    if not sidecar.is_file():
        return None, None
    try:
        record = read_sidecar(sidecar)
    except ProvenanceError as exc:
        return None, str(exc)
    if record.get("input", {}).get("sha256") != document["input_sha256"]:
        return None, f"{sidecar.name} is of another version of the input"
    if record.get("model", {}).get("weights_sha256") != document["weights_sha256"]:
        return None, f"{sidecar.name} was made with another model"
    if record.get("model", {}).get("card_sha256") != identity_digest(document["card"]):
        # the same weights behind an edited card (its normalisation, classes) label otherwise; a record without
        # the hash (older segflow) cannot say it is the same card
        return None, f"{sidecar.name} was made with another model card"
    if _comparable_recorded(record.get("parameters") or {}, _dims(document)) != \
            _comparable_keyed(document["parameters"], _dims(document)):
        return None, f"{sidecar.name} was made with other parameters"
    if record_done(out_dir, key, document, input_path=input_path, model_path=model_path, sidecar=sidecar) is None:
        return None, f"{sidecar.name} lists missing outputs"
    return lookup(out_dir, key, document["input_sha256"], document["weights_sha256"])


def done_before(out_dir: str | os.PathLike[str], input_path: str, document: dict[str, Any],
                model_path: str, *, stem: str | None = None) -> tuple[Hit | None, str | None]:
    """The work of ``document`` found done in a local ``out_dir``: by its entry, or by outputs made without one
    (``segflow segment``'s), verified and then given an entry.  (hit, None), or (None, why not; None when
    nothing was ever there).  What ``nightly`` and ``segment --skip-done`` both ask before they segment."""
    key = cache_key(document)
    hit, why_not = lookup(out_dir, key, document["input_sha256"], document["weights_sha256"])
    if hit is None and why_not is None:
        try:
            hit, why_not = adopt(out_dir, input_path, key, document, model_path, stem=stem)
        except OSError as exc:  # the cache folder unwritable: the outputs are not adopted, only redone
            hit, why_not = None, f"its ledger entry could not be written ({exc.strerror or exc})"
    return hit, why_not


def record_done(out_dir: str | os.PathLike[str], key: str, document: dict[str, Any], *, input_path: str,
                model_path: str, sidecar: str | os.PathLike[str]) -> Path | None:
    """Write the entry of ``key`` once its outputs are complete; None (nothing written) if they do not verify.

    The sidecar must name the input and weights hashes the key was built
    from: an input replaced while it was being processed gets no entry, so
    the next run looks at it again.
    """
    hit, _ = lookup_sidecar(sidecar, document["input_sha256"], document["weights_sha256"])
    if not hit:
        return None
    target = entry_path(out_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    entry = {"schema": ENTRY_SCHEMA, "key": key, "key_document": document, "input_path": str(input_path),
             "model_path": str(model_path),
             "sidecar": os.path.relpath(Path(sidecar).resolve(), Path(out_dir).resolve()),
             "sidecar_sha256": _sha256(Path(sidecar))}
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash never leaves an empty entry in place
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the entry is as public as the outputs
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def lookup_sidecar(sidecar: str | os.PathLike[str], input_sha256: str, weights_sha256: str) -> tuple[bool, str | None]:
    """Whether a just-written sidecar names these hashes and lists outputs that exist."""
    try:
        record = read_sidecar(sidecar)
    except ProvenanceError as exc:
        return False, str(exc)
    if record.get("input", {}).get("sha256") != input_sha256:
        return False, "the input changed while it was processed"
    if record.get("model", {}).get("weights_sha256") != weights_sha256:
        return False, "the model changed while it was processed"
    missing = [n for n in (record.get("outputs") or {})
               if not is_output_name(n) or not (Path(sidecar).parent / n).exists()]
    if missing or not record.get("outputs"):
        return False, f"outputs missing: {', '.join(missing) or 'none listed'}"
    return True, None
