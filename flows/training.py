"""``segflow train`` wiring: files or a dataset -> array-likes -> ``segmentation.training`` -> model directory.

Two ways in: image/label file pairs, ingested into zarr stores in a scratch
folder, or a recognised dataset (:mod:`storage.datasets`), whose cases are
read through ``Dataset.read``.  Either way this module decides the
validation split (the dataset's own "val" cases, a seeded fraction of the
cases, or a spatial hold-out of every image), gives the engine training and
validation samples, and writes the model directory with the provenance a
card needs to be trusted: which data (layout, fingerprint), which split,
which scores.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import ValidationError

from flows.datasettruth import recorded_truth_values
from flows.modelspace import card_bands
from flows.scratch import owned_scratch
from flows.trainspace import CaseGrid, in_model_space, with_training_spacing
from segmentation.augment import Augmentation
from segmentation.card import ModelCard
from segmentation.checkpoint import CHECKPOINTS
from segmentation.holdout import Holdout
from segmentation.modeldir import LoadedModel
from segmentation.normalize import statistics_for
from segmentation.training import TrainingResult, TrainingSample, save_trained, train
from storage.datasets.base import Case, Dataset, SplitCounts, fingerprint
from storage.datasets.rasterising import label_grid_problem
from storage.errors import ConfigError, IncompatibleInputError, InvalidInputError
from storage.ingest import ingest
from storage.inputfiles import check_utf8_name, stem_of
from storage.layout import ImageStore, open_image_store

IGNORE = 255
TRAIN_SCRATCH = "segflow-train-"  # the prefix of a run's temporary folder of ingested cases
IN_MEMORY_BYTES = 256 << 20  # training inputs up to this size are read into memory; larger ones stay out of core
IN_MEMORY_TOTAL = 4 << 30  # ... until this much of a dataset is in memory; the rest is sliced where it lies
ID_LIST_LIMIT = 200  # case ids listed in the provenance per split; longer lists are recorded by count and hash


class MaskedLabels:
    """Channel 0 of a label store, with IGNORE wherever the *image* has no data; read patch by patch."""

    def __init__(self, labels: ImageStore, image_mask: Any) -> None:
        self.array = labels.image
        self.mask = image_mask
        self.shape = tuple(self.array.shape[1:])
        self.dtype = self.array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        out = np.asarray(self.array[(0,) + key])
        if self.mask is not None:
            out = np.where(np.asarray(self.mask[key]), out, IGNORE).astype(out.dtype)
        return out


@dataclass
class Split:
    """Which cases train and which validate (indices into the case list), and how that was decided."""

    train: list[int]
    val: list[int]
    method: str  # "dataset", "fraction", "holdout" or "none"
    excluded: list[int] = field(default_factory=list)  # cases the dataset reserves for testing

    def provenance(self, ids: Sequence[str], **extra: Any) -> dict[str, Any]:
        return {"method": self.method, **extra, "train": _id_list([ids[i] for i in self.train]),
                "validation": _id_list([ids[i] for i in self.val]), "excluded_test": len(self.excluded)}


def made_by(training: dict[str, Any]) -> dict[str, Any]:
    """When and with which code the weights were made, as an output's provenance says it of a run: a card's
    training record had named no segflow version, commit, host or time."""
    from storage import provenance

    return {"finished": provenance.now(), "environment": provenance.environment(str(training.get("device", "cpu")))}


def _id_list(ids: list[str]) -> list[str] | dict[str, Any]:
    if len(ids) <= ID_LIST_LIMIT:
        return ids
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def choose_split(declared: Sequence[str | None], *, val_fraction: float, seed: int,
                 holdout: Holdout | None = None) -> Split:
    """Decide the validation split of ``len(declared)`` cases.

    Cases declared "test" never take part.  A spatial hold-out trains on
    every other case (each one cut in two by the engine).  Otherwise cases
    the dataset declares "val" validate; without such a declaration, or when
    every case is declared "val" (a COCO val2017 JSON on its own), a seeded
    ``val_fraction`` of the cases does (at least one when there are two or
    more, never all).  One case and no hold-out: no validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(None, f"val_fraction must be in [0, 1), got {val_fraction}")
    excluded = [i for i, s in enumerate(declared) if s == "test"]
    usable = [i for i, s in enumerate(declared) if s != "test"]
    if not usable:
        raise ConfigError(None, "no case to train on (every case is declared for testing)")
    if holdout is not None:
        return Split(usable, [], "holdout", excluded)
    declared_val = [i for i in usable if declared[i] == "val"]
    train_ids = [i for i in usable if declared[i] != "val"]
    if declared_val and train_ids:
        return Split(train_ids, declared_val, "dataset", excluded)
    if declared_val and (val_fraction <= 0 or len(usable) < 2):  # a val-only set (COCO's val2017 JSON) alone
        raise ConfigError(None, "the dataset declares every usable case for validation: none is left to train on "
                                "(give --val-fraction F to split them, or --holdout AXIS:F)")
    # a dataset of a validation split only is split by the seeded fraction, as one that declares none
    if val_fraction > 0 and len(usable) >= 2:
        count = min(len(usable) - 1, max(1, int(round(len(usable) * val_fraction))))
        order = np.random.default_rng(seed).permutation(len(usable))
        val = sorted(usable[i] for i in order[:count])
        return Split([i for i in usable if i not in set(val)], val, "fraction", excluded)
    return Split(usable, [], "none", excluded)


def _as_holdout(holdout: str | Holdout | None) -> Holdout | None:
    return Holdout.parse(holdout) if isinstance(holdout, str) else holdout


def _in_memory(array: Any, budget: list[int]) -> Any:
    """A small array-like read whole (random patches from a small store would decompress a whole chunk
    per patch), while ``budget`` (bytes left, shared across a dataset's cases) allows."""
    if isinstance(array, np.ndarray):
        return array
    size = int(getattr(array, "nbytes", 0) or np.prod(array.shape, dtype=np.int64) * np.dtype(array.dtype).itemsize)
    if size > IN_MEMORY_BYTES or size > budget[0]:
        return array
    budget[0] -= size
    return np.asarray(array[...])


def _sample(card: ModelCard, image: ImageStore, labels: ImageStore, work: Path) -> TrainingSample:
    src = labels.meta.source.path
    if image.spatial_shape != labels.spatial_shape:
        raise IncompatibleInputError(src, f"label grid {labels.spatial_shape} differs from the image's "
                                          f"{image.spatial_shape}")
    if labels.image.shape[0] != 1 or not np.issubdtype(labels.image.dtype, np.integer):
        raise InvalidInputError(src, "a label map must have one integer band")
    problem = label_grid_problem(image.meta.geometry, labels.meta.geometry, image.meta.source.path)
    if problem is not None:
        raise IncompatibleInputError(src, problem)
    source = image.image
    if image.meta.kind == "raster":  # the bands, order and units segment gives the network (card_bands)
        try:
            source, _ = card_bands(image, card)
        except IncompatibleInputError as exc:
            raise IncompatibleInputError(image.meta.source.path, exc.problem) from None
    if source.shape[0] != card.input.channels:
        raise IncompatibleInputError(image.meta.source.path, f"has {source.shape[0]} channels, the card "
                                                             f"expects {card.input.channels}")
    # a case off the card's grid is taken there first, as segment takes its inputs; its labels carry the
    # image's invalid pixels as IGNORE through the nearest-neighbour resampling
    moved = in_model_space(card, image.meta.geometry, source, MaskedLabels(labels, image.mask), image.mask,
                           work / "model-space", IGNORE, name=str(src))
    if moved is not None:
        budget = [IN_MEMORY_BYTES]
        pixels, valid = _in_memory(moved[0], budget), moved[2]
        valid = None if valid is None else _in_memory(valid, budget)
        return TrainingSample(image=pixels, labels=_in_memory(moved[1], budget),
                              stats=statistics_for(card.input.normalization, pixels, valid), ignore_index=IGNORE,
                              name=src, valid=valid)
    # over the valid pixels, as inference takes them (the label pixels outside the mask are ignored too)
    stats = statistics_for(card.input.normalization, source, image.mask)
    budget = [IN_MEMORY_BYTES]
    pixels = _in_memory(source, budget)
    targets: Any = MaskedLabels(labels, image.mask)
    if pixels is not source:
        targets = targets[...]
    valid = None if image.mask is None else _in_memory(image.mask, budget)
    return TrainingSample(image=pixels, labels=targets, stats=stats, ignore_index=IGNORE, name=src, valid=valid)


def _run(card: ModelCard, samples: list[TrainingSample], split: Split, out: Path, *, steps: int, batch_size: int,
         lr: float, seed: int, precision: str, patch: Sequence[int] | None, holdout: Holdout | None,
         val_every: int | None, resume: bool, on_step: Callable[[dict], None] | None,
         augment: Augmentation = Augmentation(), data: str | None = None,
         on_start: Callable[[], None] | None = None) -> TrainingResult:
    return train(card, [samples[i] for i in split.train], validation=[samples[i] for i in split.val],
                 holdout=holdout, steps=steps, batch_size=batch_size, patch=patch, lr=lr, seed=seed,
                 precision=precision, log=on_step, val_every=val_every,  # type: ignore[arg-type]
                 checkpoints=out / CHECKPOINTS, resume=resume, augment=augment, data=data, on_start=on_start)


def train_from_files(card: ModelCard, pairs: Sequence[tuple[Path, Path]], out: Path, *, steps: int,
                     batch_size: int, lr: float = 2e-3, seed: int = 0, precision: str = "fast",
                     patch: Sequence[int] | None = None, on_step: Callable[[dict], None] | None = None,
                     val_fraction: float = 0.0, val_every: int | None = None,
                     holdout: str | Holdout | None = None, resume: bool = False,
                     augment: Augmentation = Augmentation(), say: Callable[[str], None] | None = None,
                     on_start: Callable[[], None] | None = None) -> LoadedModel:
    """Ingest each (image, labels) pair out-of-core, train, and write a model directory at ``out``.

    No validation by default (``segflow train`` asks for ``val_fraction=0.2``);
    with ``holdout`` (e.g. "x:0.5") every pair trains on one part and
    validates on the other.  ``on_start`` is called once the files are
    read and checked, as the first step starts.
    """
    out, held = Path(out), _as_holdout(holdout)
    split = choose_split([None] * len(pairs), val_fraction=val_fraction, seed=seed, holdout=held)
    with owned_scratch(TRAIN_SCRATCH) as work:  # a killed run's is removed by the next one
        samples, sources, ids, grids = [], [], [], []
        for n, (image_path, labels_path) in enumerate(pairs):
            image = _open(image_path, work / f"{n}-{stem_of(image_path)}.image.zarr")
            labels = _open(labels_path, work / f"{n}-{stem_of(labels_path)}.labels.zarr", labels=True)
            samples.append(_sample(card, image, labels, work / f"{n}-model"))
            grids.append(CaseGrid(str(image_path), image.meta.geometry, tuple(image.spatial_shape)))
            sources.append({"image": image.meta.source.model_dump(), "labels": labels.meta.source.model_dump()})
            ids.append(f"{n}-{stem_of(image_path)}")
        digest = hashlib.sha256("".join(f"{s['image']['sha256']}\t{s['labels']['sha256']}\n"
                                        for s in sources).encode()).hexdigest()
        saved_card, starting = _with_spacing(card, grids, say, on_start)
        result = _run(card, samples, split, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      precision=precision, patch=patch, holdout=held, val_every=val_every, resume=resume,
                      on_step=on_step, augment=augment, data=digest, on_start=starting)
        result.provenance["inputs"] = sources
        result.provenance["dataset"] = {"name": "image/label pairs", "layout": "pairs", "fingerprint": digest,
                                        "cases": len(pairs)}
        result.provenance["split"] = split.provenance(ids, **_split_extra(split, val_fraction, seed, held))
        result.provenance.update(made_by(result.provenance))
        return save_trained(out, saved_card, result)


def _check_classes_trained(card: ModelCard, dataset: Dataset, train: list[Case], root: Path) -> None:
    """Every class drawn in some training case, where the dataset can tell without drawing (COCO, from its JSON):
    a category annotated in val2017 only had trained as a class the model never saw."""
    drawn = getattr(dataset, "drawn_classes", None)
    if not callable(drawn) or not train:
        return
    present = drawn(train)
    missing = [c for c in card.classes if c.value != 0 and c.value not in present]
    if missing:
        names = ", ".join(f"{c.name!r} (class {c.value})" for c in missing)
        raise InvalidInputError(root, f"{names} {'is' if len(missing) == 1 else 'are'} drawn in no training case "
                                      "(only in the validation split): the model would never learn "
                                      f"{'it' if len(missing) == 1 else 'them'}; annotate some training images "
                                      "with it, or drop the category")


def _nodata_classes(dataset: Any) -> list[int]:
    """Label-file nodata values the dataset trains as classes (a geo dataset's classes.json naming them)."""
    own = getattr(dataset, "nodata_classes", None)
    return list(own()) if callable(own) else []


def _split_extra(split: Split, val_fraction: float, seed: int, holdout: Holdout | None) -> dict[str, Any]:
    if split.method == "fraction":
        return {"val_fraction": val_fraction, "seed": seed}
    if split.method == "holdout":
        return {"holdout": str(holdout)}
    return {}


def with_dataset_classes(card: ModelCard, dataset: Dataset) -> ModelCard:
    """The card with the dataset's classes (names, colours); the network's outputs follow their number."""
    classes = sorted(dataset.classes, key=lambda c: c.value)
    try:
        return ModelCard.model_validate({**card.model_dump(exclude={"training", "weights_sha256"}),
                                         "classes": [c.model_dump() for c in classes]})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(dataset.root, f"the dataset's classes do not fit the card: "
                                              f"{'.'.join(map(str, first['loc'])) or 'card'}: {first['msg']}") from None


def with_dataset_channels(card: ModelCard, dataset: Dataset) -> ModelCard:
    """The card with the dataset's channel names (nnU-Net's ``channel_names``, the Decathlon's ``modality``) when it
    names none; refused when it names others.  A card saying CT, PET trained on T2, ADC kept its names and recorded
    nothing of the difference, so a scan would later be routed to it by the wrong names."""
    names = [str(n) for n in (getattr(dataset, "channel_names", None) or [])]
    if not names:
        return card
    declared = list(card.input.channel_names or [])
    if not declared:
        return ModelCard.model_validate({**card.model_dump(exclude={"training", "weights_sha256"}),
                                         "input": {**card.input.model_dump(), "channel_names": names}})
    if [n.strip().lower() for n in declared] != [n.strip().lower() for n in names]:
        raise IncompatibleInputError(dataset.root, f"its channels are {', '.join(names)}, the card's "
                                                   f"{', '.join(declared)} (in that order); fix the card's "
                                                   "input.channel_names, or leave them out to take the dataset's")
    return card


def dataset_fingerprint(dataset: Dataset, *, mtimes: bool = False) -> str:
    """``storage.datasets.fingerprint`` over every case's image and label files (and a root that is a file);
    ``mtimes``: the resume key, which a file edited in place changes."""
    root = Path(dataset.root)
    files = [Path(f) for c in dataset.cases for f in (*c.images, *([c.labels] if c.labels is not None else []))]
    if root.is_file():
        files.append(root)
    base = root if root.is_dir() else root.parent
    if any(not Path(os.path.abspath(f)).is_relative_to(os.path.abspath(base)) for f in files):
        base = Path(os.path.commonpath([os.path.abspath(f) for f in files] + [os.path.abspath(base)]))
    return fingerprint(Path(os.path.abspath(base)), [Path(os.path.abspath(f)) for f in files], mtimes=mtimes)


def _renumbered(dataset: Dataset) -> str:
    """How a dataset's own label values map to the model's classes, where they differ ("3 for 'enhancing'
    (value 4)"): a Decathlon label table of 0, 1, 2, 4 trains as classes 0..3, and the outputs hold 3 where
    the dataset's files hold 4.  "" when they are the same (or the layout maps ids by design: COCO, Cityscapes)."""
    table = getattr(dataset, "table", None)
    values = tuple(getattr(table, "values", ()) or ())
    if not values or values == tuple(range(len(values))):
        return ""
    return ", ".join(f"{k} for {n!r} (value {v})" for k, (v, n) in enumerate(zip(values, table.names)) if k != v)


def train_from_dataset(card: ModelCard, dataset: Dataset, out: Path, *, steps: int, batch_size: int,
                       val_fraction: float = 0.2, val_every: int | None = None,
                       holdout: str | Holdout | None = None, resume: bool = False, lr: float = 2e-3,
                       seed: int = 0, precision: str = "fast", patch: Sequence[int] | None = None,
                       on_step: Callable[[dict], None] | None = None,
                       say: Callable[[str], None] | None = print, augment: Augmentation = Augmentation(),
                       on_start: Callable[[], None] | None = None) -> LoadedModel:
    """Train on a recognised dataset and write a model directory at ``out``.

    The card's classes are replaced by the dataset's (names and colours);
    its channels and spatial dimensions must match the dataset's.  The
    split: see :func:`choose_split`.  ``say`` hears which layout was found
    and how the cases were split.
    """
    out, held = Path(out), _as_holdout(holdout)
    root = Path(dataset.root)
    if dataset.spatial_dims != card.input.spatial_dims:
        raise IncompatibleInputError(root, f"a {dataset.spatial_dims}-D dataset, the card's network is "
                                           f"{card.input.spatial_dims}-D")
    # a geo dataset's rasters go through the bands segment would give the card (by name: a 13-band Sentinel-2
    # tile for a card naming blue, green, red, nir), each case as it is read; other layouts' channels are the card's
    by_name = dataset.layout == "geo" and bool(card.input.channel_names)
    if dataset.channels != card.input.channels and not by_name:
        raise IncompatibleInputError(root, f"has {dataset.channels} channels, the card expects {card.input.channels}"
                                           + ("; a card naming its bands (input.channel_names) takes them by name"
                                              if dataset.layout == "geo" else ""))
    card = with_dataset_classes(card, dataset)
    if not by_name:
        card = with_dataset_channels(card, dataset)
    cases = list(dataset.cases)
    if not cases:
        raise InvalidInputError(root, "the dataset has no cases")
    for case in cases:  # before any is read: such a name reached GDAL or the fingerprint as a traceback
        for f in (*case.images, *([case.labels] if case.labels is not None else [])):
            check_utf8_name(f)
    split = choose_split([c.split for c in cases], val_fraction=val_fraction, seed=seed, holdout=held)
    _check_classes_trained(card, dataset, [cases[i] for i in split.train], root)
    if say is not None:
        say(f"found a {dataset.layout} dataset {dataset.name!r}: {len(cases)} cases ({SplitCounts.of(cases)}), "
            f"{card.num_classes} classes; training on {len(split.train)}, validating on "
            + (f"the held-out {1 - abs(held.fraction):g} of each along {held.axis}" if held is not None
               else f"{len(split.val)} ({split.method} split)"))
    if say is not None:
        for line in getattr(dataset, "notes", list)():  # a layout's own word on its labels (a geo nodata value)
            say(f"note: {line}")
    renumbered = _renumbered(dataset)
    if say is not None and renumbered:
        say(f"note: the dataset's label values are not 0..{card.num_classes - 1}: the model's outputs write "
            f"{renumbered} (segflow evaluate --classes MODEL reads the dataset's own label files so)")
    with owned_scratch(TRAIN_SCRATCH) as work:  # a killed run's is removed by the next one
        samples: list[TrainingSample | None] = [None] * len(cases)
        budget = [IN_MEMORY_TOTAL]
        grids: list[CaseGrid] = []
        for i in split.train + split.val:
            samples[i] = _case_sample(card, dataset, cases[i], work / f"case-{i}", budget, grids)
        saved_card, starting = _with_spacing(card, grids, say, on_start)
        digest = dataset_fingerprint(dataset)
        truth = recorded_truth_values(dataset)  # segflow evaluate --classes reads the dataset's files through it
        result = _run(card, samples, split, out, steps=steps, batch_size=batch_size,  # type: ignore[arg-type]
                      lr=lr, seed=seed, precision=precision, patch=patch, holdout=held, val_every=val_every,
                      resume=resume, on_step=on_step, augment=augment, data=dataset_fingerprint(dataset, mtimes=True),
                      on_start=starting)
        result.provenance["dataset"] = {"name": dataset.name, "layout": dataset.layout, "root": str(root.resolve()),
                                        "fingerprint": digest, "cases": len(cases),
                                        "ignore_index": dataset.ignore_index,
                                        **({"label_values": list(getattr(dataset, "table").values)}
                                           if renumbered else {}),
                                        **({"truth_values": truth} if truth is not None else {}),
                                        **({"nodata_classes": counted} if (counted := _nodata_classes(dataset))
                                           else {})}
        result.provenance["split"] = split.provenance([c.id for c in cases],
                                                      **_split_extra(split, val_fraction, seed, held))
        result.provenance.update(made_by(result.provenance))
        return save_trained(out, saved_card, result)


def _with_spacing(card: ModelCard, grids: list[CaseGrid], say: Callable[[str], None] | None,
                  on_start: Callable[[], None] | None) -> tuple[ModelCard, Callable[[], None]]:
    """The card the model directory gets (with the training data's spacing when it declared none), and what to
    call as training starts: the note on the spacing is said then, not before a label file is refused."""
    saved, note = with_training_spacing(card, grids)

    def starting() -> None:
        if note is not None and say is not None:
            say(note)
        if on_start is not None:
            on_start()
    return saved, starting


def _case_sample(card: ModelCard, dataset: Dataset, case: Case, work: Path, budget: list[int],
                 grids: list[CaseGrid]) -> TrainingSample:
    work.mkdir(parents=True, exist_ok=True)
    data = dataset.read(case, work)
    where = case.images[0] if case.images else dataset.root
    grids.append(CaseGrid(str(where), data.geometry, tuple(data.image.shape)[1:]))
    image, labels = data.image, data.labels
    if data.store is not None and data.store.meta.kind == "raster":  # the bands segment gives the network
        try:
            image, _ = card_bands(data.store, card)
        except IncompatibleInputError as exc:
            raise IncompatibleInputError(where, exc.problem) from None
    image_shape, label_shape = tuple(image.shape), tuple(labels.shape)
    if len(image_shape) != card.input.spatial_dims + 1 or image_shape[0] != card.input.channels:
        raise IncompatibleInputError(where, f"image shape {image_shape} is not ({card.input.channels} channels, "
                                            f"{card.input.spatial_dims} spatial axes)")
    if label_shape != image_shape[1:]:
        raise IncompatibleInputError(case.labels or where, f"labels shape {label_shape} differs from the "
                                                           f"image's {image_shape[1:]}")
    # a case off the card's grid, taken there as segment takes its inputs
    moved = in_model_space(card, data.geometry, image, labels, None if data.store is None else data.store.mask,
                           work / "model-space", IGNORE if dataset.ignore_index is None else dataset.ignore_index,
                           name=str(where))
    valid = None
    if moved is not None:
        image, labels, valid = moved
    return TrainingSample(image=_in_memory(image, budget), labels=_in_memory(labels, budget),
                          ignore_index=dataset.ignore_index, name=str(case.labels or where),
                          valid=None if valid is None else _in_memory(valid, budget))


def _open(path: Path, store: Path, labels: bool = False) -> ImageStore:
    """Ingest one training file; a folder of one DICOM series (or a file of it) is that series, as ``segment``
    reads it (it had been refused as "a folder holding no DICOM files").  ``labels``: a PNG is label values
    (a palette PNG's indices, as ``evaluate`` reads it), not a photograph."""
    from storage.dicom import find_series, is_dicom_input

    if labels and Path(path).suffix.lower() == ".png":
        from storage.photo import ingest_picture

        ingest_picture(path, store, labels=True)
        return open_image_store(store)
    source: Any = path
    if is_dicom_input(path):
        series = find_series([path])
        if len(series) != 1:
            raise InvalidInputError(path, f"holds {len(series)} DICOM series ("
                                    f"{', '.join(s.name for s in series[:4])}{', ...' if len(series) > 4 else ''}): "
                                    "give the folder of the one its labels belong to")
        source = series[0]
    ingest(source, store)
    return open_image_store(store)
