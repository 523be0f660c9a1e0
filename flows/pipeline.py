"""The steps of segmenting one input, as plain functions the Prefect flows wrap.

ingest (file -> zarr image store) -> infer (zarr -> zarr labels, on Dask)
-> export (labels -> COG or NIfTI, with provenance).  Every output is first
written under a temporary name and moved into place only when complete.

Nothing is lost when a run is killed.  The ingested store under
``OUT/.segflow-work`` is reused by the next run when it is complete and its
source still has the same sha256.  The partial prediction store
(``OUT/.<stem>.zarr.<identity>.partial``) carries a :class:`storage.layout.ChunkJournal`:
the run's identity (input sha256, weights sha256, card and the parameters that
shape the labels) and one marker per finished output chunk.  Rerunning the same
command finds it, checks the identity and computes only the chunks without a
marker; a run with another identity discards it and starts afresh (and says
so).  A failure caused by the input or the outputs removes everything; an
interruption (Ctrl-C, SIGTERM, a Dask worker lost too often, and what they
cause: a closed client, a cancelled future) keeps the partial store and the
ingested store for the next run (:func:`flows.interrupts.resumable`).  The chunk loop polls for
an interruption (:func:`flows.interrupts.check_interrupt`), so an input running in
a ``nightly`` task thread stops at its next chunk too.

The infer step, its identity and its test hook (``SEGFLOW_TEST_KILL_AFTER_CHUNKS``) are
:mod:`flows.infer`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import zarr
from distributed import Client

from flows import locks, medical, modelspace
from flows.config import SegmentOptions
from flows.export import export_labels, qgis_styles, quicklook_image, write_quicklook
from flows.infer import run_inference
from flows.inputnotes import check_has_data, input_warnings, unlabelled_note
from flows.inputs import (GROUPS, check_named_sources, ingest_input, input_label, input_stem, output_name,
                          overwritten_input, same_file)
from flows.interrupts import check_interrupt, resumable
from flows.progress import say
from flows.replacing import Replacing, remove_path
from flows.routing import band_request, thick_volume_problem
from segmentation import LoadedModel
from segmentation.chunkwrites import label_nodata
from segmentation.modeldir import CARD_FILE
from segmentation.oneslice import plane_axes, plane_model
from storage import provenance
from storage.atomic import make_output_folder
from storage.bands import units_facts
from storage.channelfiles import ATTR as CHANNEL_FILES_ATTR, FORMAT as CHANNEL_FILES_FORMAT
from storage.errors import ConfigError, ExportError, IncompatibleInputError, LockLostError, SegflowError
from storage.hashing import sha256_file
from storage.layout import LABELS, PROVENANCE_ATTR, ImageStore, commit_store, partial_path, partial_paths
from storage.mosaic import MOSAIC_ATTR, MosaicRef
from storage.remote import is_url
from storage.tilecuts import split_outputs, write_tile_cuts

WORK_DIR = ".segflow-work"
log = logging.getLogger("segflow")


@dataclass
class Outcome:
    """What happened to one input of a batch."""

    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why it was not segmented again (``segment --skip-done``): its outputs stand

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def segment_one(input_path: Any, model: LoadedModel, out_dir: str | Path, options: SegmentOptions,
                client: Client, *, record_input_as: str | None = None,
                still_ours: Callable[[], bool] | None = None) -> Outcome:
    """Ingest, infer, export one input. Raises SegflowError on bad input; leaves nothing partial.

    On an interruption (see :func:`flows.interrupts.resumable`) the hidden partial store and
    the ingested store stay, and the next run with the same identity resumes.

    ``record_input_as`` names the input in the provenance, the prediction
    store's source and the outcome when ``input_path`` is a local copy of it:
    the URL of an input :mod:`flows.staging` downloaded.  ``still_ours``: asked before the first output is
    written (nightly's input lock): False, another run took the input over while this one stalled, and this one
    writes nothing (:class:`LockLostError`; it had written its outputs over the other run's).
    """
    if isinstance(options, dict):  # as the flows take them (their parameters are validated so)
        options = SegmentOptions.model_validate(options)
    if not isinstance(model, LoadedModel) or client is None:  # AttributeErrors from deep inside, before
        raise ConfigError(None, "segment_one takes a model from segmentation.load_model(PATH) and a Dask client "
                                "(flows.cluster.dask_client())")
    check_interrupt()  # a run interrupted (Ctrl-C, SIGTERM) starts no new input
    started = provenance.now()
    t0 = time.perf_counter()
    if not isinstance(input_path, GROUPS):
        input_path = Path(input_path)
        check_named_sources(input_path)  # a VRT downloaded from a URL too, before GDAL opens its sources
    out_dir = Path(out_dir)
    clobbered = overwritten_input(input_path, out_dir, split_by_tile=options.split_by_tile)
    if clobbered is not None:
        raise IncompatibleInputError(*clobbered)
    make_output_folder(out_dir)
    locks.clear_leftovers(out_dir, input_stem(input_path))  # a killed run's half-written files of this name
    work = out_dir / WORK_DIR
    try:
        origin = record_input_as if record_input_as is not None and is_url(record_input_as) else None
        store, ingest_reused = ingest_input(input_path, work, options.chunk_size,
                                            bands=band_request(model.card, options), origin=origin)
    except BaseException as exc:
        remove_if_empty(work)
        if isinstance(exc, OSError):  # e.g. the disk filled up while copying: the line names the input, as for
            # two inputs of a batch on a full disk it had said the same work folder twice
            raise ExportError(input_label(input_path), f"cannot write the ingested copy in {exc.filename or work}: "
                                                       f"{exc.strerror or exc}") from None
        if isinstance(exc, SegflowError) and isinstance(input_path, Path) and exc.path is not None \
                and exc.path != str(input_path) and same_file(Path(exc.path), input_path):
            # the reader names the file as it resolved it: said as the user gave it, as the header check says it
            raise type(exc)(input_label(input_path), exc.problem) from None
        raise
    ingest_seconds = time.perf_counter() - t0
    stem = input_stem(input_path)
    zarr_target = out_dir / f"{stem}.zarr"
    # every output file is written here, hashed, and only then renamed into OUT, just before the sidecar: a run
    # killed while exporting (seconds, at scale) had left finished-looking outputs under their own names, a STAC
    # item among them, with no sidecar
    stage = work / f"{stem}.export"
    out_path = out_dir / output_name(input_path, store.meta.kind)
    created: list[Path] = []  # outputs this run put in place: on failure exactly these are removed
    given = model  # the model as loaded: the provenance records its card (a one-slice input runs a view of it)
    keep_work = False
    replacing: Replacing | None = None
    try:
        try:
            check_interrupt()  # interrupted during the ingest: stop before the inference, keep the ingest
            named = record_input_as or input_label(input_path)  # how messages name the input
            model, options = one_slice_fit(model, options, store, named)
            store = modelspace.model_bands_store(store, model, options)
            check_has_data(named, store)
            # said once the run is under way: "has no CRS; the output is written ..." had come before the line
            # refusing the same input (a card that needs a CRS)
            warnings = input_warnings(named, store, model, options, announce=False)
            stats, params = run_inference(store, model, options, zarr_target, client, record_input_as, named=named)
            for text in warnings:
                say(text, logging.WARNING)
        except SegflowError as exc:
            if exc.path is None:  # errors about the input's content must name the input
                raise type(exc)(named, exc.problem) from None
            raise
        check_interrupt()  # interrupted as the last chunks were written: stop before the export
        if store.meta.kind == "volume":  # per-label volumes and intensities, into the provenance and reports
            done = zarr.open_group(str(partial_path(zarr_target, stats["run_identity"])), mode="r")
            stats["label_statistics"] = medical.volume_statistics(done[LABELS], store, model)
        unlabelled = unlabelled_note(named, store, stats, label_nodata(model.card.num_classes), client)
        if unlabelled is not None:
            warnings.append(unlabelled)
        stats["ingest_seconds"] = round(ingest_seconds, 3)
        stats["ingest_reused"] = ingest_reused
        stats.update(units_facts(store.meta, units=model.card.input.units, dn_scale=model.card.input.dn_scale,
                                 names=stats.get("bands")))
        if warnings:
            stats["warnings"] = warnings
        record = provenance.make_record(
            input_path=record_input_as or store.meta.source.path, input_sha256=store.meta.source.sha256,
            model={"name": given.name, "path": str(given.path.resolve()), "weights_sha256": given.weights_sha256,
                   "weights_path": str(given.weights_path.resolve()) if given.weights_path else None,
                   "source": given.source, "card_sha256": given.card.shaping_sha256(), **_card_file(given),
                   "architecture": given.card.architecture.model_dump(mode="json")},
            parameters=params, device=stats.pop("device"),
            dask_scheduler=options.dask_address, started=started, finished=provenance.now(),
            statistics=stats, input_details=_input_details(store, split=options.split_by_tile))
        # what a run before this one wrote under this name is set aside (put back if this run fails), and so is
        # its sidecar; what a run killed while exporting left is undone first (flows/replacing.py)
        if still_ours is not None and not still_ours():
            raise LockLostError(record_input_as or input_label(input_path),
                                "another run took it over while this one had stalled (its lock was broken for a "
                                "heartbeat older than the stale timeout): that run's outputs stand, this one wrote "
                                "none")
        replacing = Replacing(out_dir, input_path, options.split_by_tile)
        replacing.begin(out_path)
        provenance.retire_sidecar(out_path)
        stable = provenance.embedded(record)  # what the outputs carry: equal for equal labels, so reproducible
        t1 = time.perf_counter()
        # the exports read the store while it is still partial, its journal in place: a run killed while
        # exporting is resumed with every chunk done and only exports again (committed first, it had been
        # recomputed whole, as the committed store is no partial one to resume)
        finished = partial_path(zarr_target, stats["run_identity"])
        remove_path(stage)  # a killed run's
        stage.mkdir(parents=True)
        staged_out = stage / out_path.name
        exported = export_labels(finished, modelspace.output_meta(store, model, options), model, staged_out, stable,
                                 created, vector=options.vector, simplify=options.simplify, beside=out_dir)
        if isinstance(input_path, MosaicRef) and options.split_by_tile:  # one COG per tile, cut from the mosaic
            cuts = write_tile_cuts(zarr.open_group(str(finished), mode="r")[LABELS], store.meta.geometry,
                                   record["input"]["mosaic"], stage, classes=model.card.classes,
                                   provenance=stable, created=created)
            exported += cuts + qgis_styles(cuts, model.card.classes, created, out_dir)  # each cut's legend too
        if store.meta.kind == "volume":
            labels = zarr.open_group(str(finished), mode="r")[LABELS]
            exported += medical.write_extras(labels, store, model, options, staged_out,
                                             stats["label_statistics"], created)
        if options.quicklook:
            with quicklook_image(input_path, band_request(model.card, options), work, origin) as image:
                picture = write_quicklook(exported[0], image, model, stats, created,
                                          image_store=store.image if store.meta.kind == "volume" else None)
            exported += [picture] if picture is not None else []
        commit_store(zarr_target, {PROVENANCE_ATTR: stable}, identity=stats["run_identity"])
        created.append(zarr_target)
        record["statistics"]["export_seconds"] = round(time.perf_counter() - t1, 3)
        record["statistics"]["total_seconds"] = round(time.perf_counter() - t0, 3)
        record["finished"] = provenance.now()
        hashes = {p.name: provenance.sha256_output(p) for p in
                  [*exported, *([zarr_target] if options.keep_zarr else [])]}  # all of them before any lands
        exported = _publish(exported, stage, out_dir, created)
        extras = tuple(exported[1:]) + ((zarr_target,) if options.keep_zarr else ())
        sidecar = provenance.write_sidecar(record, out_path, extras, known=hashes)
        created.append(sidecar)
        if not options.keep_zarr:
            shutil.rmtree(zarr_target)
        replacing.succeeded([*exported, sidecar, *([zarr_target] if options.keep_zarr else [])])
    except BaseException as exc:
        keep_work = resumable(exc)
        if not keep_work:
            for p in partial_paths(zarr_target):
                remove_path(p)
        for p in created:
            remove_path(p)
        if replacing is not None:  # (a SIGKILL leaves them aside: the next run of the stem puts them back)
            replacing.failed()
        provenance.restore_sidecar(out_path)  # the earlier outputs, put back, are its
        if isinstance(exc, OSError):  # a full disk or a denied write while storing or committing: one line,
            # naming the input (the chunk file alone said nothing of which input of a batch failed)
            where = exc.filename or out_dir
            raise ExportError(record_input_as or input_label(input_path),
                              f"cannot write {where}: {exc.strerror or exc}") from None
        if isinstance(exc, SegflowError) and (published := _as_published(exc, stage, out_dir)) is not exc:
            raise published from None
        raise
    finally:
        remove_path(stage)
        if not keep_work:
            remove_path(store.path)
            remove_path(modelspace.model_image_path(store))
            remove_if_empty(work)
    # absolute, all of them: a report built from them is read from OUT/reports, or from anywhere (`segflow report`)
    outputs = [os.path.abspath(p) for p in [*exported, sidecar, *([zarr_target] if options.keep_zarr else [])]]
    return Outcome(input=record_input_as or input_label(input_path), ok=True, outputs=outputs,
                   statistics=record["statistics"])


def _publish(staged: list[Path], stage: Path, out_dir: Path, created: list[Path]) -> list[Path]:
    """Rename the staged outputs into ``out_dir`` (the same file system: renames, milliseconds for them all), in
    their order; their paths there.  Each is added to ``created`` as it lands, so a failure removes it."""
    published, where = [], Path(os.path.abspath(stage))
    for path in staged:
        # compared absolute: writers return absolute paths, and OUT given as a relative path ("--out out") had left
        # every output in the staging folder, which is then removed
        final = out_dir / Path(os.path.abspath(path)).relative_to(where)
        try:
            os.replace(path, final)
        except OSError as exc:  # a folder of someone's under the output's name
            raise ExportError(final, f"cannot write: {exc.strerror or exc}") from None
        created.append(final)
        published.append(final)
    return published


def _as_published(exc: SegflowError, stage: Path, out_dir: Path) -> SegflowError:
    """An export's error as the user reads it: naming the output where it goes, not the staging folder."""
    forms = [(os.path.abspath(stage), os.path.abspath(out_dir)), (stage.as_posix(), out_dir.as_posix())]
    for staged, final in forms:
        if exc.path is not None and staged in exc.path:
            return type(exc)(exc.path.replace(staged, final), exc.problem.replace(staged, final))
    return exc


def one_slice_fit(model: LoadedModel, options: SegmentOptions, store: ImageStore,
                  named: str) -> tuple[LoadedModel, SegmentOptions]:
    """A 2-D model on a volume one slice thick (nnU-Net's X x Y x 1 NIfTI) runs as a 3-D model whose windows
    are one slice thick (:mod:`segmentation.oneslice`), so the volume path (model space, NIfTI and DICOM SEG,
    mL) serves it unchanged; the window and mirrored axes given as options gain the slice axis too."""
    if store.meta.kind != "volume" or model.card.input.spatial_dims != 2:
        return model, options
    if store.spatial_shape[0] != 1:  # routing refuses these first; the Python API reaches here
        raise IncompatibleInputError(named, thick_volume_problem(model.name, store.spatial_shape[::-1]))
    roi, flips = plane_axes(options.roi, options.flip_tta)
    return plane_model(model, named), options.model_copy(update={"roi": roi, "flip_tta": flips})


def _card_file(model: LoadedModel) -> dict[str, str]:
    """A model directory's card.json and its sha256, for ``verify``: the card is half of what the model is (an
    edited normalisation labels otherwise with the same weights, and verify had passed it)."""
    card = Path(model.path) / CARD_FILE
    if not card.is_file():
        return {}  # a bundle's or an archive's card is read from its weights file or configuration
    return {"card_path": str(card.resolve()), "card_file_sha256": sha256_file(card)}


def _input_details(store: ImageStore, split: bool = False) -> dict[str, Any] | None:
    """A DICOM series' identity for the provenance: UIDs, files and their sha256, de-identification state.

    A mosaic's: its grid, rules and every tile with its sha256 and window (and, ``split``, the COG cut for it).
    """
    if store.meta.source.format == "mosaic" and MOSAIC_ATTR in store.group.attrs:
        mosaic = dict(store.group.attrs[MOSAIC_ATTR])
        if split:
            names = split_outputs(mosaic)
            mosaic["tiles"] = [{**t, "output": names[t["path"]]} for t in mosaic["tiles"]]
        return {"format": "mosaic", "mosaic": mosaic}
    if store.meta.source.format == CHANNEL_FILES_FORMAT and CHANNEL_FILES_ATTR in store.group.attrs:
        return {"format": CHANNEL_FILES_FORMAT, "channel_files": list(store.group.attrs[CHANNEL_FILES_ATTR])}
    item = getattr(store.meta.geometry, "stac_item", None)
    if item is not None:  # a STAC item: its id, self href, and each asset used with its href and checksum
        return {"format": "STAC item", "stac_item": item.model_dump(mode="json")}
    info = getattr(store.meta.geometry, "dicom", None)
    if info is None:
        return None
    keep = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "sop_class_uid", "modality",
            "series_description", "series_number", "sop_instance_uids", "frame_numbers", "files",
            "transfer_syntax_uid", "volume", "copies", "searched")
    details = info.model_dump(mode="json", include=set(keep))
    details["deidentification"] = {"patient_name_present": info.patient_name_present,
                                   "patient_id_present": info.patient_id_present}
    return {"format": "DICOM", "dicom": details}


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
