"""``segflow evaluate``: score predicted label maps against ground truth, never holding a map whole.

Each prediction and its truth are opened as block readers (rasterio windows,
nibabel's ``dataobj`` slicing, zarr slicing) and their grids compared: the same
shape, and the same CRS and transform within 1e-9 relative (rasters) or the
same affine within 1e-4 mm (volumes).  A mismatch is a one-line error naming
both files; nothing is ever resampled to make them fit.  One exception, the
rule training reads label rasters by: a truth raster with no CRS and no
transform (a mask saved by an image editor), of the prediction's shape, is
read as on the prediction's grid, and its case says so.
:mod:`segmentation.evaluation` then scores them block by block (volumes in
slabs of whole planes along k, which a gzip NIfTI reads strictly forwards;
rasters in square windows), so memory is bounded by one block plus the largest
class's bounding box, whatever the map's size.

Units come from the files: NIfTI zooms (converted from the header's spatial
unit) give mm and mL per voxel; a GeoTIFF's or a store's transform gives
metres (the CRS's linear unit) and hectares per pixel.  A raster whose CRS has
no linear unit (none, or degrees) is measured in pixels and gets no areas.

Pairing: PRED and TRUTH in the order given; or, with one ``--truth DIR``, by
case name (:mod:`flows.pairing`).

A pair that cannot be scored (no truth, another grid, a file that does not
read) does not stop the others: the report holds the pairs scored and lists
the others under ``unscored`` with their error, and the command prints one
``error:`` line each and exits 1.  The report's files are written under
temporary names and renamed into place together, so a failed write leaves the
folder as it was.

A prediction's "no prediction" value is the nodata its file declares (a
GeoTIFF's nodata, a store's ``nodata_label``), else the ``--ignore`` value
(255, the label nodata segflow writes).

Class names: ``--classes`` (a model card or model directory; refused when the
prediction carries other class values, as when the card is another model's),
else what the prediction carries (the CLASSES tag of a segflow COG, the label table of a
segflow NIfTI, the ``classes`` attribute of a prediction store), else "class N".
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

import typer

from flows.datasettruth import DatasetValues, dataset_truth_map, truth_note
from flows.evalreport import METRICS, fmt, write_reports
from flows.pairing import case_name, match_inputs
from storage.labelmaps import LabelSource, open_labels
from storage.errors import ConfigError, IncompatibleInputError, InputError, InvalidInputError, SegflowError
from storage.inputfiles import stem_of
from storage.reorient import on_grid_of

__all__ = ["check_same_grid", "evaluate_command", "evaluate_files"]

VOLUME_BLOCK_VOXELS = 1 << 20  # a volume is read in slabs of whole planes holding about this many voxels
RASTER_BLOCK = 1024
TRANSFORM_RTOL = 1e-9
AFFINE_ATOL_MM = 1e-4
NO_PREDICTION = "no prediction"


# --------------------------------------------------------------------------- pairing and grids


def _crs_name(crs: Any) -> str:
    if crs is None:
        return "no CRS"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else "a custom CRS"


def check_same_grid(pred: LabelSource, truth: LabelSource) -> None:
    """Refuse a pair whose pixels do not lie on the same grid; the message names both files."""
    import numpy as np

    def mismatch(problem: str) -> IncompatibleInputError:
        return IncompatibleInputError(pred.path, f"its grid differs from the truth {truth.path}: {problem} "
                                                 f"(segflow does not resample to compare)")

    if pred.kind != truth.kind:
        raise mismatch(f"a {pred.kind} against a {truth.kind}")
    if pred.shape != truth.shape:
        raise mismatch(f"shape {pred.shape} vs {truth.shape}")
    if pred.kind == "raster":
        if (pred.crs is None) != (truth.crs is None) or (pred.crs is not None and pred.crs != truth.crs):
            raise mismatch(f"{_crs_name(pred.crs)} vs {_crs_name(truth.crs)}")
        pixel = max(abs(v) for v in (*pred.transform[:2], *pred.transform[3:5]))
        for i, (a, b) in enumerate(zip(pred.transform, truth.transform)):
            scale = max(abs(a), abs(b)) if i in (2, 5) else pixel  # origins relative to themselves, steps to a pixel
            if abs(a - b) > TRANSFORM_RTOL * scale:
                raise mismatch(f"transform {tuple(pred.transform)} vs {tuple(truth.transform)}")
    else:
        diff = float(np.max(np.abs(np.asarray(pred.affine, float) - np.asarray(truth.affine, float))))
        if diff > AFFINE_ATOL_MM:
            raise mismatch(f"affines differ by up to {diff:.6g} mm")


GRIDLESS_TRUTH = "the truth has no CRS or transform: read as on the prediction's grid, as training reads it"


def _gridless(source: LabelSource) -> bool:
    """A raster with no CRS and no geotransform (rasterio's identity): a mask saved by an image editor, or a PNG."""
    return (source.kind == "raster" and source.crs is None and source.transform is not None
            and all(abs(a - b) <= 1e-12 for a, b in zip(source.transform, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))))


def truth_on_grid(pred: LabelSource, truth: LabelSource) -> tuple[LabelSource, str | None]:
    """``truth`` read on ``pred``'s grid where it is that grid, and the note saying why when the file does not
    say so itself: a volume stored in another axis order, or a truth raster with no CRS and no transform of the
    prediction's shape, which training takes by its shape (storage.datasets.geolabels) and scoring had refused.
    A truth that names another CRS or transform is left as it is, for :func:`check_same_grid` to refuse."""
    truth = on_grid_of(truth, pred)
    if pred.kind == "raster" and truth.shape == pred.shape and _gridless(truth) and not _gridless(pred):
        return replace(truth, crs=pred.crs, transform=pred.transform), GRIDLESS_TRUTH
    return truth, None


# --------------------------------------------------------------------------- scoring


def _block(source: LabelSource, chunk: int | None) -> tuple[int, ...]:
    if source.kind == "raster":
        edge = chunk or RASTER_BLOCK
        return (edge, edge)
    i, j, _ = source.shape
    return (i, j, chunk or max(1, VOLUME_BLOCK_VOXELS // max(1, i * j)))


def _values(names: dict[int, str]) -> str:
    return ", ".join(f"{v} {n}" for v, n in sorted(names.items()))


def _case(name: str, pred: LabelSource, truth: LabelSource, names: dict[int, str], *, ignore: int | None,
          tolerance: float, include_background: bool, chunk: int | None,
          distance_limit: int | None, counted_nodata: tuple[int, ...] = ()) -> dict[str, Any]:
    from segmentation.evaluation import score_case
    from storage.classes import background_value

    nodata = pred.nodata if pred.nodata is not None else ignore
    # the truth's own nodata is counted nowhere, as training reads it (storage.datasets.geolabels: IGNORE), unless
    # every pixel is to count (--ignore -1: it had still left a nodata 0 that was the background class out) or the
    # model's training counted it as a class (classes.json named it: left out, it had raised Dice by 0.24)
    truth_nodata = truth.nodata if ignore is not None and truth.nodata not in counted_nodata else None
    ignored = sorted({v for v in (ignore, truth_nodata) if v is not None})
    scores = score_case(pred.array, truth.array, pred.spacing, values=names.keys(), block=_block(pred, chunk),
                        ignore=ignored, pred_nodata=nodata, tolerance=tolerance,
                        background=None if include_background else background_value(names),
                        distance_limit=distance_limit)
    if scores.scan.counted == 0:
        values = " or ".join(str(v) for v in ignored)
        raise InvalidInputError(truth.path, f"every pixel is {values} (not counted): nothing to score "
                                            f"{pred.path} against")
    notes = []
    if truth.nodata is not None and truth.nodata in counted_nodata and truth.nodata != ignore:
        notes.append(f"the truth's nodata {truth.nodata} counted as class "
                     f"{names.get(truth.nodata, truth.nodata)!r}, as the model's training counted it")
    if truth_nodata is not None and truth_nodata != ignore:
        also = f", though it is also class {names[truth_nodata]!r}" if truth_nodata in names else ""
        notes.append(f"the truth's nodata {truth_nodata} not counted{also} (--ignore -1 counts every pixel)")
    if pred.nodata is not None and pred.nodata in names:
        notes.append(f"the prediction's nodata {pred.nodata} is also class {names[pred.nodata]!r}: its pixels count "
                     "as no prediction")
    warnings = []
    present = [c.value for c in scores.classes if c.truth_count]
    if scores.scan.ignored and len(present) <= 1 and ignore is not None:  # a 0/255 mask: its 255s scored nowhere
        warnings.append(f"{truth.path}: {scores.scan.ignored} truth pixels are the ignore value {ignore} and every "
                        f"other one is {'class ' + repr(names.get(present[0], present[0])) if present else 'nodata'}"
                        f": a 0/{ignore} mask? Relabel it 0/1, or --ignore -1 to count {ignore} as a class")
        notes.extend(warnings)
    cell = pred.cell_size
    rows = []
    for c in scores.classes:
        sizes = (None, None, None) if cell is None else (c.pred_count * cell, c.truth_count * cell,
                                                           (c.pred_count - c.truth_count) * cell)
        rows.append({"value": c.value, "name": row_name(c.value, names), "dice": c.dice, "iou": c.iou,
                     "hd95": c.hd95, "asd": c.asd, "nsd": c.nsd, "pred_pixels": c.pred_count,
                     "truth_pixels": c.truth_count, "pred_size": sizes[0], "truth_size": sizes[1],
                     "size_diff": sizes[2], "note": _note(c.note, c.value, names)})
    labels = [r["name"] for r in rows]
    return {"case": name, "prediction": str(pred.path), "truth": str(truth.path), "kind": pred.kind,
            "shape": list(pred.shape), "spacing": list(pred.spacing), "distance_unit": pred.distance_unit,
            "size_unit": pred.size_unit, "cell_size": cell, "size_note": pred.size_note,
            "prediction_nodata": nodata, "truth_nodata": truth.nodata, "notes": notes, "warnings": warnings,
            "named_classes": [[v, n] for v, n in sorted(names.items())],
            "counted_pixels": scores.scan.counted, "ignored_pixels": scores.scan.ignored, "classes": rows,
            "confusion": {"rows": labels, "columns": labels + [NO_PREDICTION], "values": [r["value"] for r in rows],
                          "matrix": scores.confusion().tolist()}}


def row_name(value: int, names: dict[int, str]) -> str:
    """A row's class name: the table's, else "class N", unless another value of the table bears that name (a geo
    model's class 2 is "class 1000", the dataset's value): two rows had been named "class 1000"."""
    if value in names:
        return names[value]
    generic = f"class {value}"
    return f"unlisted value {value}" if generic in names.values() else generic


def _unlisted_truth(case: dict[str, Any], names: dict[int, str], whose: str, model: str | None) -> str | None:
    """The one warning for truth values that the class table leaves out: a dataset's own values (a Decathlon
    0, 1, 2, 4 that trains as 0..3, a geo 0, 1, 1000 as 0..2) are not the model's class numbers, and scored as
    they are they had given 'enhancing' a Dice of 0 and an extra row, with no word of why."""
    extra = [r["value"] for r in case["classes"] if r["truth_pixels"] and r["value"] not in names]
    if not names or not extra:
        return None
    shown = ", ".join(map(str, extra[:6])) + (f" ... ({len(extra)} values)" if len(extra) > 6 else "")
    table = _values(dict(sorted(names.items())[:8])) + (" ..." if len(names) > 8 else "")
    hint = ("" if model is None else
            f"; pass --classes MODEL (the prediction's provenance names {model}: its card records the table "
            "training read the dataset's values through)")
    return (f"{case['truth']}: holds values {shown} that are not among {whose} classes ({table}): a dataset's own "
            f"values rather than the model's class numbers? Scored as they are, each its own row{hint}")


def _recorded_model(pred_path: Path) -> str | None:
    """The model directory the prediction's provenance sidecar names, when it is still there: what --classes
    wants.  Best effort: a missing or unreadable sidecar names none."""
    import json

    from storage.provenance import sidecar_for

    try:
        model = (json.loads(sidecar_for(pred_path).read_text()).get("model") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and Path(model).is_dir() else None


def _note(note: str | None, value: int, names: dict[int, str]) -> str | None:
    """The score's note, plus a warning for a label value that the class names (a card's, or the file's) leave
    out: a stray value, or names from the wrong model."""
    if not names or value in names:
        return note
    return "; ".join(filter(None, [note, "value not among the named classes"]))


def _group_key(case: dict[str, Any]) -> tuple:
    return (case["kind"], case["distance_unit"], case["size_unit"], tuple(tuple(c) for c in case["named_classes"]))


def _means(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mean over cases, per group of cases that share a kind, units and class table: outputs of two models
    scored in one run (a land-cover scene and a scan) had 'water' averaged with 'background', by value alone."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for case in cases:
        groups.setdefault(_group_key(case), []).append(case)
    return [{"cases": [c["case"] for c in members], "kind": members[0]["kind"],
             "distance_unit": members[0]["distance_unit"], "size_unit": members[0]["size_unit"],
             "classes": _mean(members)} for members in groups.values()]


def _mean(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class, the mean of each score over the cases that have it (None rows are left out, and counted)."""
    by_value: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        for row in case["classes"]:
            by_value.setdefault(row["value"], []).append(row)
    out = []
    for value in sorted(by_value):
        rows = by_value[value]
        entry: dict[str, Any] = {"value": value, "name": rows[0]["name"], "cases": len(rows), "n": {}}
        for metric in METRICS:
            values = [r[metric] for r in rows if r[metric] is not None]
            entry[metric] = sum(values) / len(values) if values else None
            entry["n"][metric] = len(values)
        out.append(entry)
    return out


def evaluate_files(predictions: list[Path], truths: list[Path], *, tolerance: float = 1.0, ignore: int | None = 255,
                   classes: Path | None = None, include_background: bool = False,
                   chunk: int | None = None, distance_limit: int | None = None) -> dict[str, Any]:
    """Every score of every pair that can be scored, as the JSON document ``evaluation.json`` holds; each pair
    that cannot (no truth for it, another grid, an unreadable file) is in ``unscored`` with its one-line error,
    and the others are still scored (one missing truth had left a whole batch unscored).

    All pairs are opened and their grids checked before any is scored, so a
    bad pair costs no scoring time.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(None, f"--tolerance must be a finite number >= 0, got {tolerance}")
    if chunk is not None and chunk < 1:
        raise ConfigError(None, f"--chunk-size must be positive, got {chunk}")
    if distance_limit is None:
        from segmentation.evaluation import DISTANCE_LIMIT

        distance_limit = DISTANCE_LIMIT
    if distance_limit < 0:
        raise ConfigError(None, f"--distance-limit must be >= 0 pixels, got {distance_limit}")
    card_names, dataset_values, counted_nodata = None, None, ()
    if classes is not None:
        from segmentation.modeldir import read_card

        card = read_card(classes)
        card_names = {c.value: c.name for c in card.classes}
        dataset_values = dataset_truth_map(card)
        # label-file nodata values training counted as classes (classes.json named them): counted here too
        counted_nodata = tuple(int(v) for v in ((card.training or {}).get("dataset") or {}).get("nodata_classes")
                               or [])
    matches = match_inputs([Path(p) for p in predictions], [Path(t) for t in truths])
    checked = [(p, t, _first_problem(p, t, error, card_names, classes)) for p, t, error in matches]
    cases: list[dict[str, Any]] = []
    unscored: list[dict[str, Any]] = []
    taken: set[str] = set()
    for pred_path, truth_path, error in checked:
        if error is None:
            name = base = re.sub(r"[^\w.-]+", "_", case_name(pred_path)).strip("._") or "case"
            for i in range(2, len(matches) + 2):  # two predictions of the same name get base, base-2...
                if name not in taken:
                    break
                name = f"{base}-{i}"
            try:
                cases.append(_scored(name, pred_path, truth_path, card_names, dataset_values, ignore=ignore,
                                     tolerance=tolerance, include_background=include_background, chunk=chunk,
                                     distance_limit=distance_limit, counted_nodata=counted_nodata))
                taken.add(name)
                continue
            except SegflowError as exc:
                error = exc
        unscored.append({"case": case_name(pred_path), "prediction": str(pred_path),
                         "truth": None if truth_path is None else str(truth_path), "error": str(error)})
    return {"tolerance": tolerance, "ignore": ignore, "include_background": include_background,
            "distance_limit": distance_limit,
            "definitions": {"dice": "2|P∩T| / (|P|+|T|) from the confusion matrix", "iou": "|P∩T| / |P∪T|",
                            "hd95": "95th percentile of the symmetric surface distances (MONAI)",
                            "asd": "mean of the symmetric surface distances (MONAI)",
                            "nsd": "normalised surface Dice at the tolerance (MONAI)",
                            "size_diff": "prediction minus truth, in size_unit"},
            "cases": cases, "unscored": unscored, **_mean_fields(cases)}


def _open_truth(path: Path, pred: LabelSource, card_names: dict[int, str] | None,
                stack: ExitStack) -> tuple[LabelSource, str | None]:
    """The truth on the prediction's grid, and a note on how it was read: a label map (:func:`truth_on_grid`), or
    a DICOM SEG placed on the prediction's voxel grid (:mod:`storage.segtruth`; it had been "no truth named")."""
    from storage.segtruth import is_dicom_seg, open_seg_truth

    if is_dicom_seg(path):
        return open_seg_truth(path, pred, card_names)
    return truth_on_grid(pred, open_labels(path, stack))


def _first_problem(pred_path: Path, truth_path: Path | None, pairing: SegflowError | None,
                   card_names: dict[int, str] | None, classes: Path | None) -> SegflowError | None:
    """A missing prediction first (paired by a folder it had been "no truth named p.* in FOLDER"), then the
    pairing's error, then what the headers tell."""
    if not pred_path.exists():
        return InputError(pred_path, "no such file")
    return pairing or _check_pair(pred_path, truth_path, card_names, classes)


def _check_pair(pred_path: Path, truth_path: Path | None, card_names: dict[int, str] | None,
                classes: Path | None) -> SegflowError | None:
    """Why the pair cannot be scored (a file that does not open, another grid, another model's card), found
    from the headers before any pair is scored, so that no scoring time goes to a pair that fails; None when
    it can be."""
    try:
        with ExitStack() as stack:
            pred = open_labels(pred_path, stack)
            truth, _ = _open_truth(truth_path, pred, card_names, stack)
            check_same_grid(pred, truth)
            if card_names is not None and pred.classes and set(pred.classes) != set(card_names):
                raise ConfigError(classes, f"--classes names the class values {_values(card_names)}, but "
                                           f"{pred_path} carries {_values(pred.classes)}: another model's card? "
                                           f"(leave --classes out to use the prediction's own names)")
    except SegflowError as exc:
        return exc
    return None


def _scored(name: str, pred_path: Path, truth_path: Path, card_names: dict[int, str] | None,
            dataset_values: dict[int, int] | None, **options: Any) -> dict[str, Any]:
    """One checked pair's case: its scores, and notes on how its truth was read."""
    with ExitStack() as stack:
        pred = open_labels(pred_path, stack)
        truth, grid_note = _open_truth(truth_path, pred, card_names, stack)
        if dataset_values is not None:  # the dataset's own values in the truth, class numbers in the prediction
            truth = replace(truth, array=DatasetValues(truth.array, dataset_values))
        case = _case(name, pred, truth, card_names if card_names is not None else pred.classes, **options)
        pred_classes = pred.classes
        renamed = {v: (pred.classes[v], n) for v, n in (card_names or {}).items()
                   if pred.classes and v in pred.classes and pred.classes[v] != n}
    if renamed:  # another card's names over the same values: allowed, and said (it had renamed without a word)
        shown = ", ".join(f"{v} {old!r} as {new!r}" for v, (old, new) in sorted(renamed.items())[:4])
        line = f"{pred_path}: its own class names differ from --classes ({shown}); scored under --classes' names"
        case["notes"].append(line)
        case["warnings"].append(line)
    if grid_note is not None:
        case["notes"].append(grid_note)
    if dataset_values is not None:
        case["notes"].append(truth_note(dataset_values))
    if dataset_values is None and stem_of(truth_path).endswith("_gtFine_labelIds"):
        raw = (f"{truth_path.name} holds Cityscapes label ids (road 7...), not the 19 train ids a Cityscapes model "
               "writes: scored as they are, the classes do not line up; pass --classes MODEL (its card records the "
               "table training read them through)")
        case["notes"].append(raw)
        case["warnings"].append(raw)
    elif (unlisted := _unlisted_truth(case, card_names if card_names is not None else pred_classes,
                                      "--classes'" if card_names is not None else "the prediction's",
                                      None if card_names is not None else _recorded_model(pred_path))) is not None:
        case["notes"].append(unlisted)
        case["warnings"].append(unlisted)
    if (other := _other_series(pred_path, truth_path)) is not None:  # scored: the grids agree, but say so
        case["notes"].append(other)
        case["warnings"].append(other)
    return case


def _other_series(pred_path: Path, truth_path: Path) -> str | None:
    """A DICOM SEG truth that references another series or frame of reference than the one the prediction was
    made from (its provenance sidecar says which): on a grid that happens to agree it had been scored silently."""
    import json

    import pydicom

    from storage.provenance import sidecar_path
    from storage.segtruth import is_dicom_seg

    sidecar = sidecar_path(pred_path)
    if not is_dicom_seg(truth_path) or not sidecar.is_file():
        return None
    try:
        dicom = (json.loads(sidecar.read_text()).get("input") or {}).get("dicom") or {}
        seg = pydicom.dcmread(truth_path, stop_before_pixels=True)
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return None
    series = {str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in r}
    frame = str(seg.get("FrameOfReferenceUID", "")) or None
    theirs, ours = dicom.get("series_instance_uid"), dicom.get("frame_of_reference_uid")
    if theirs and series and theirs not in series:
        return (f"{truth_path}: the DICOM SEG references series {', '.join(sorted(series))}, the prediction was "
                f"made from series {theirs}: another scan's annotation?")
    if ours and frame and ours != frame:
        return (f"{truth_path}: the DICOM SEG is in frame of reference {frame}, the prediction's series in "
                f"{ours}: another scan's annotation?")
    return None


def _mean_fields(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """``means``, one per group of comparable cases; ``mean``, the one group's rows (None when there are several,
    where no single table holds them)."""
    means = _means(cases)
    return {"mean": means[0]["classes"] if len(means) == 1 else None, "means": means}


# --------------------------------------------------------------------------- command


def evaluate_command(
        predictions: List[Path] = typer.Argument(..., readable=False,
                                                 help="Predicted label maps: segflow outputs (.tif, .nii.gz), "
                                                      "their .zarr stores, or any integer label GeoTIFF/NIfTI."),
        truth: List[Path] = typer.Option(..., "--truth", readable=False,
                                         help="The ground truth of each prediction, in the same "
                                              "order (repeat --truth), or one folder: DIR/<stem>.* "
                                              "for <stem>.tif, <stem>.labels.tif, <stem>.nii.gz; "
                                              "<stem>.truth.* or <stem>.labels.* before <stem>.*."),
        out_dir: Path = typer.Option(Path("."), "--out", help="Folder for evaluation.json, evaluation.md and "
                                                              "<case>.csv."),
        tolerance: float = typer.Option(1.0, "--tolerance", help="Normalised surface Dice tolerance, in mm "
                                                                 "(volumes) or metres (rasters)."),
        ignore: int = typer.Option(255, "--ignore", help="Truth value counted nowhere (segflow's label nodata); "
                                                         "negative: count every pixel."),
        classes: Optional[Path] = typer.Option(None, "--classes", help="Class names from a model card JSON or a "
                                                                       "model directory."),
        include_background: bool = typer.Option(False, "--include-background",
                                                help="Also compute distances for the background class (class 0, "
                                                     "or the class named background; its box is usually the "
                                                     "whole image)."),
        chunk: Optional[int] = typer.Option(None, "--chunk-size", "--chunk",
                                            help="Read rasters in CHUNK x CHUNK windows and "
                                                 "volumes CHUNK planes at a time."),
        distance_limit: Optional[int] = typer.Option(None, "--distance-limit",
                                                     help="Skip HD95, ASD and NSD (with a note) for a class whose "
                                                          "bounding box holds more pixels than this: distances "
                                                          "need the whole box in memory, about 28 bytes a pixel "
                                                          "(default 67108864, an 8192² box, about 2 GB).")) -> None:
    """Score predictions against ground truth: Dice, IoU, HD95, ASD, NSD and volumes/areas per class and case."""
    from rich.markup import escape
    from rich.table import Table

    from flows import cliutil
    from storage.errors import SegflowError

    cliutil.local_only(out_dir, "--out")
    cliutil.check_out_folder(out_dir)  # a file in --out's way had been told after the scoring
    try:
        report = evaluate_files(predictions, truth, tolerance=tolerance, ignore=ignore if ignore >= 0 else None,
                                classes=classes, include_background=include_background, chunk=chunk,
                                distance_limit=distance_limit)
        written = write_reports(report, out_dir) if report["cases"] else []
    except ConfigError as exc:  # an option or a pairing the run cannot take: a usage error, as in other commands
        cliutil.fail(str(exc), 2)
    except SegflowError as exc:
        cliutil.fail(str(exc), 1)
    for group in report["means"]:
        title = f"mean over {len(group['cases'])} case(s)" if len(report["means"]) == 1 else \
            f"mean over {', '.join(group['cases'])}"
        table = Table(title=escape(title))
        unit = group["distance_unit"]  # NSD named as the Markdown names it, with its tolerance
        for col in ("class", "n", "Dice", "IoU", f"HD95 {unit}", f"ASD {unit}", f"NSD@{tolerance:g} {unit}",
                    f"pred {group['size_unit']}", f"truth {group['size_unit']}"):
            table.add_column(col, no_wrap=col == "class")  # a class name split over lines reads as two
        for r in group["classes"]:
            table.add_row(escape(f"{r['value']} {r['name']}"), fmt(r.get("cases")), *(fmt(r[m]) for m in METRICS[:7]))
        cliutil.out.print(table)
    if written:
        unscored = f" ({len(report['unscored'])} prediction(s) not scored, listed there)" if report["unscored"] else ""
        cliutil.out.print(f"wrote {escape(str(written[0]))}, {escape(written[1].name)} and {len(written) - 2} CSV "
                          f"file(s){unscored}", highlight=False, soft_wrap=True)
    for case in report["cases"]:
        for line in case.get("warnings", []):
            cliutil.console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    for entry in report["unscored"]:
        cliutil.console.print(f"[red]error:[/red] {escape(entry['error'])}", highlight=False, soft_wrap=True)
    if report["unscored"]:
        raise typer.Exit(1)
