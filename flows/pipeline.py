"""The steps of segmenting one input, as plain functions the Prefect flows wrap.

ingest (file -> zarr image store) -> infer (zarr -> zarr labels, on Dask)
-> export (labels -> COG or NIfTI, with provenance).  Every output is first
written under a temporary name and moved into place only when complete.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed

from flows.config import SegmentOptions
from flows.progress import reporter
from segmentation import LoadedModel, build_plan
from segmentation.crf import CRFParams, crf_dask
from segmentation.stitching import PROBABILITY_SCALE, label_dtype, label_nodata
from storage import provenance
from storage.errors import ExportError, SegflowError
from storage.ingest import ingest, stem_of
from storage.layout import (LABELS, META_ATTR, PROBABILITIES, PROVENANCE_ATTR, ImageStore, commit_store,
                            create_prediction_store, open_image_store, partial_path)

WORK_DIR = ".segflow-work"


@dataclass
class Outcome:
    """What happened to one input of a batch."""

    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_name(input_path: str | Path, kind: str) -> str:
    return stem_of(input_path) + (".tif" if kind == "raster" else ".nii.gz")


def ingest_input(path: str | Path, work_dir: str | Path, chunk: int | None = None) -> ImageStore:
    store_path = Path(work_dir) / f"{stem_of(path)}.image.zarr"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    ingest(path, store_path, chunk=chunk)
    return open_image_store(store_path)


def crf_params(options: SegmentOptions) -> CRFParams:
    return CRFParams(iterations=options.crf_iterations)


def resolved_parameters(model: LoadedModel, options: SegmentOptions, plan: Any) -> dict[str, Any]:
    inf = model.card.inference
    return {
        **options.model_dump(exclude={"dask_address"}),
        "roi": list(plan.grid.roi),
        "overlap": options.overlap if options.overlap is not None else inf.overlap,
        "blend": options.blend or inf.blend,
        "sigma_scale": inf.sigma_scale,
        "batch_size": options.batch_size or inf.batch_size,
        "flip_tta": list(options.flip_tta if options.flip_tta is not None else inf.flip_tta),
        "crf": crf_params(options).model_dump(mode="json") if options.crf else None,
        "chunks": [c[0] for c in plan.chunks],
    }


def run_inference(store: ImageStore, model: LoadedModel, options: SegmentOptions, target: Path,
                  client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment an image store into a prediction store at ``target``; return (statistics, parameters)."""
    t0 = time.perf_counter()
    plan = build_plan(store.image, model, roi=options.roi, overlap=options.overlap, blend=options.blend,
                      precision=options.precision, chunks=options.chunk_size, mask=store.mask,
                      batch_size=options.batch_size, device=options.device, flip_tta=options.flip_tta)
    params = resolved_parameters(model, options, plan)
    _, labels, probs = create_prediction_store(
        target, meta=store.group.attrs[META_ATTR], spatial_shape=plan.grid.shape,
        chunks=tuple(c[0] for c in plan.chunks), label_dtype=str(label_dtype(plan.num_classes)),
        nodata_label=label_nodata(plan.num_classes), classes=[c.model_dump(mode="json") for c in model.card.classes],
        probabilities_dtype=None if options.probabilities == "none" else options.probabilities)

    refined = None
    if options.crf:
        refined = crf_dask(plan.probabilities(), plan.image, crf_params(options), plan.mask,
                           normalizer=plan.normalizer)
    writes = plan.writes(labels, probs, options.probabilities if probs is not None else "float32",
                         probabilities=refined)
    futures = client.compute(writes + [plan.counts()])
    key = f"infer:{target.name}"
    reporter().start(key, f"segment {stem_of(store.meta.source.path)}", total=len(writes))
    histogram: dict[int, int] = {}
    counts: dict[str, int] = {}
    for future in as_completed(futures):
        result = future.result()
        if "histogram" in result:
            for value, n in result["histogram"].items():
                histogram[value] = histogram.get(value, 0) + n
            reporter().advance(key)
        else:
            counts = result
    reporter().finish(key)
    stats = {**counts, "windows_total": plan.num_windows, "chunks": len(writes),
             "label_pixels": {str(k): v for k, v in sorted(histogram.items())},
             "inference_seconds": round(time.perf_counter() - t0, 3)}
    return stats, params


def export_labels(pred_path: Path, meta: Any, model: LoadedModel, out_path: Path,
                  record: dict[str, Any]) -> list[Path]:
    """The label map (and, for rasters, a probability COG when probabilities were kept)."""
    group = zarr.open_group(str(pred_path), mode="r")
    labels = group[LABELS]
    if meta.kind == "raster":
        from storage.geotiff import write_label_cog, write_probability_cog

        written = [write_label_cog(labels, meta.geometry, out_path, classes=model.card.classes,
                                   provenance=record)]
        if PROBABILITIES in group:
            probs = group[PROBABILITIES]
            written.append(write_probability_cog(
                _Probabilities(probs), meta.geometry, probabilities_path(out_path),
                class_names=[c.name for c in model.card.classes], mask=_Valid(labels, group.attrs["nodata_label"]),
                dtype=str(probs.dtype), provenance=record))
        return written
    from storage.nifti import write_label_nifti

    return [write_label_nifti(labels, meta.geometry, out_path, classes=model.card.classes, provenance=record)]


class _Probabilities:
    """Stored probabilities read back as floats in [0, 1], whatever their stored dtype."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.chunks = array, array.shape, array.chunks

    def __getitem__(self, key: Any) -> Any:
        block = np.asarray(self.array[key])
        return block.astype(np.float32) / PROBABILITY_SCALE if block.dtype == np.uint8 else block


class _Valid:
    """Where the labels are not the nodata label: the valid-data mask of a prediction."""

    def __init__(self, labels: Any, nodata: int) -> None:
        self.labels, self.nodata, self.shape = labels, nodata, labels.shape

    def __getitem__(self, key: Any) -> Any:
        return np.asarray(self.labels[key]) != self.nodata


def probabilities_path(out_path: Path) -> Path:
    return out_path.with_name(stem_of(out_path) + ".probabilities.tif")


def segment_one(input_path: str | Path, model: LoadedModel, out_dir: str | Path, options: SegmentOptions,
                client: Client) -> Outcome:
    """Ingest, infer, export one input. Raises SegflowError on bad input; leaves nothing partial."""
    started = provenance.now()
    t0 = time.perf_counter()
    input_path = Path(input_path)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(out_dir, f"cannot create output directory: {exc.strerror or exc}") from None
    work = out_dir / WORK_DIR
    try:
        store = ingest_input(input_path, work, options.chunk_size)
    except BaseException:
        _remove_if_empty(work)
        raise
    ingest_seconds = time.perf_counter() - t0
    stem = stem_of(input_path)
    zarr_target = out_dir / f"{stem}.zarr"
    out_path = out_dir / output_name(input_path, store.meta.kind)
    try:
        try:
            stats, params = run_inference(store, model, options, zarr_target, client)
        except SegflowError as exc:
            if exc.path is None:  # errors about the input's content must name the input
                raise type(exc)(input_path, exc.problem) from None
            raise
        stats["ingest_seconds"] = round(ingest_seconds, 3)
        record = provenance.make_record(
            input_path=store.meta.source.path, input_sha256=store.meta.source.sha256,
            model={"name": model.name, "path": str(model.path.resolve()), "weights_sha256": model.weights_sha256,
                   "weights_path": str(model.weights_path.resolve()) if model.weights_path else None,
                   "source": model.source,
                   "architecture": model.card.architecture.model_dump(mode="json")},
            parameters=params, device=_device_name(options.device), started=started, finished=provenance.now(),
            statistics=stats)
        commit_store(zarr_target, {PROVENANCE_ATTR: record})
        t1 = time.perf_counter()
        exported = export_labels(zarr_target, store.meta, model, out_path, record)
        record["statistics"]["export_seconds"] = round(time.perf_counter() - t1, 3)
        record["statistics"]["total_seconds"] = round(time.perf_counter() - t0, 3)
        record["finished"] = provenance.now()
        extras = tuple(exported[1:]) + ((zarr_target,) if options.keep_zarr else ())
        sidecar = provenance.write_sidecar(record, out_path, extras)
        if not options.keep_zarr:
            shutil.rmtree(zarr_target)
    except BaseException:
        leftovers = (partial_path(zarr_target), zarr_target, out_path, probabilities_path(out_path),
                     provenance.sidecar_path(out_path))
        for p in leftovers:
            _remove(p)
        raise
    finally:
        _remove(store.path)
        _remove_if_empty(work)
    outputs = [str(p) for p in exported] + [str(sidecar)] + ([str(zarr_target)] if options.keep_zarr else [])
    return Outcome(input=str(input_path), ok=True, outputs=outputs, statistics=record["statistics"])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _device_name(device: str) -> str:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
