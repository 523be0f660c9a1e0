"""Cityscapes: street photographs per city, with fine label-id maps beside them.

The photographs are ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
and their fine annotation ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``,
an 8-bit map of the 34 Cityscapes label ids.  Training and evaluation use only
the 19 "train ids"; every other id (unlabeled, ego vehicle, parking, caravan...)
is ignore.  The mapping is Cityscapes' own label table, written below as data.
The ``test`` split is listed with split "test": its published labels are all
ignore, and where ``gtFine/test`` is absent its cases have no label file and
read as all ignore.  Opening checks names and PNG headers only; a label id
outside the table is found when its case is read or by
:meth:`CityscapesDataset.validate_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case, CaseData, Layout, safe_id
from storage.datasets.pictures import (by_stem, listed, mode_words, picture_header, read_indices, read_rgb,
                                       size_text)
from storage.errors import InvalidInputError

__all__ = ["CITYSCAPES_LABELS", "CityscapesDataset", "CityscapesLabel", "LAYOUT", "cityscapes_classes",
           "detect", "open_cityscapes", "train_id_lookup"]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
EXTENSION = ".png"  # matched in any case (a _leftImg8bit.PNG); the rest of a suffix as Cityscapes spells it


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int  # 255 or -1: not trained on, ignore
    category: str
    color: tuple[int, int, int]


# The Cityscapes label table as defined by cityscapesScripts (cityscapesscripts/helpers/labels.py,
# https://github.com/mcordts/cityscapesScripts): name, id, trainId, category, colour.
CITYSCAPES_LABELS = (
    CityscapesLabel("unlabeled", 0, 255, "void", (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, "void", (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, "void", (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, "void", (0, 0, 0)),
    CityscapesLabel("static", 4, 255, "void", (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, "void", (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, "void", (81, 0, 81)),
    CityscapesLabel("road", 7, 0, "flat", (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, "flat", (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, "flat", (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, "flat", (230, 150, 140)),
    CityscapesLabel("building", 11, 2, "construction", (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, "construction", (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, "construction", (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, "construction", (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, "construction", (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, "construction", (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, "object", (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, "object", (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, "object", (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, "object", (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, "nature", (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, "nature", (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, "sky", (70, 130, 180)),
    CityscapesLabel("person", 24, 11, "human", (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, "human", (255, 0, 0)),
    CityscapesLabel("car", 26, 13, "vehicle", (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, "vehicle", (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, "vehicle", (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, "vehicle", (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, "vehicle", (0, 0, 110)),
    CityscapesLabel("train", 31, 16, "vehicle", (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, "vehicle", (119, 11, 32)),
    CityscapesLabel("license plate", -1, -1, "vehicle", (0, 0, 142)),
)


def cityscapes_classes() -> list[LabelClass]:
    """The 19 trained classes, valued by train id."""
    trained = sorted((lab for lab in CITYSCAPES_LABELS if 0 <= lab.train_id < IGNORE), key=lambda lab: lab.train_id)
    return [LabelClass(value=lab.train_id, name=lab.name, color=lab.color) for lab in trained]


def train_id_lookup() -> tuple[np.ndarray, np.ndarray]:
    """(lookup, known): ``lookup[id]`` is the id's train id or 255; ``known[v]`` says whether the uint8 value
    v is a label id of the table.  The license plate's id -1 is 255 once stored in a uint8 map, so 255 is
    known (and ignore)."""
    lookup = np.full(256, IGNORE, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for lab in CITYSCAPES_LABELS:
        value = lab.id & 0xFF
        known[value] = True
        lookup[value] = lab.train_id if 0 <= lab.train_id < IGNORE else IGNORE
    return lookup, known


LOOKUP, KNOWN = train_id_lookup()


@dataclass
class CityscapesDataset:
    """A Cityscapes folder as a :class:`storage.datasets.base.Dataset`."""

    name: str
    root: Path
    cases: list[Case]
    classes: list[LabelClass] = field(default_factory=cityscapes_classes)
    layout: str = "cityscapes"
    ignore_index: int | None = IGNORE
    spatial_dims: int = 2
    channels: int = 3

    def truth_values(self) -> dict[int, int]:
        """Each label id a ``*_gtFine_labelIds.png`` can hold (as its uint8 value) and its train id, or 255."""
        return {int(v): int(LOOKUP[v]) for v in np.flatnonzero(KNOWN)}

    def read(self, case: Case, work: Path) -> CaseData:
        """Both arrays read whole (a 2048x1024 photograph is 6 MB); ``work`` is not needed."""
        image = read_rgb(case.images[0])
        if case.labels is None:  # a test case without gtFine/test
            labels = np.full(image.shape[1:], IGNORE, dtype=np.uint8)
        else:
            labels = self._labels(case.labels)
        return CaseData(image=image, labels=labels, spacing=(1.0, 1.0))

    def validate_labels(self) -> None:
        """Read every label-id map and refuse the first holding an id outside the Cityscapes table."""
        for case in self.cases:
            if case.labels is not None:
                self._labels(case.labels)

    def _labels(self, path: Path) -> np.ndarray:
        ids = read_indices(path)
        present = np.flatnonzero(np.bincount(ids.ravel(), minlength=256))
        bad = [int(v) for v in present if not KNOWN[v]]
        if bad:
            raise InvalidInputError(path, f"label ids {listed(bad)} are not in the Cityscapes label table (0..33)")
        return LOOKUP[ids]


def detect(root: Path) -> bool:
    """A folder holding ``leftImg8bit/`` and ``gtFine/`` (names only)."""
    root = Path(root)
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def open_cityscapes(root: Path) -> CityscapesDataset:
    """Every photograph of train, val and test paired with its label-id map, names and sizes checked."""
    root = Path(root)
    images_root, labels_root = root / "leftImg8bit", root / "gtFine"
    for folder in (images_root, labels_root):
        if not folder.is_dir():
            raise InvalidInputError(folder, "missing: a Cityscapes folder needs leftImg8bit/ and gtFine/")
    splits = [split for split in SPLITS if (images_root / split).is_dir()]
    if not splits:
        raise InvalidInputError(images_root / "train", "missing: leftImg8bit/ holds none of train/, val/, test/")
    cases: list[Case] = []
    for split in splits:
        labels = labels_root / split
        if not labels.is_dir() and split != "test":
            raise InvalidInputError(labels, f"missing: the labels of leftImg8bit/{split}/")
        cases += _split_cases(images_root / split, labels if labels.is_dir() else None, split)
    if not cases:
        raise InvalidInputError(images_root, f"holds no *{IMAGE_SUFFIX} photographs")
    return CityscapesDataset(name=root.resolve().name, root=root, cases=cases)


LAYOUT = Layout(name="cityscapes", detect=detect, open=open_cityscapes, holds="leftImg8bit/ and gtFine/")


def _hidden(path: Path) -> bool:
    """A name starting with '.': macOS's ``._<name>`` AppleDouble files beside each picture copied from a Mac,
    ``.DS_Store``, ``.ipynb_checkpoints``; not pictures, and refused as unreadable PNGs when read as ones."""
    return path.name.startswith(".")


def _pictures(folder: Path, suffix: str) -> dict[str, Path]:
    """stem (the name less ``suffix``) -> file of a city folder's pictures named ``<stem><suffix>``, the
    extension in any case (hidden files skipped)."""
    core = suffix[: -len(EXTENSION)]
    return {name[: -len(core)]: path for name, path in sorted(by_stem(folder, EXTENSION).items())
            if name.endswith(core) and len(name) > len(core)}


def _split_cases(images: Path, labels: Path | None, split: str) -> list[Case]:
    """One split's cases, city by city; every photograph needs its label map and every label map its photograph
    (hidden files skipped)."""
    cases = []
    for city in sorted(p for p in images.iterdir() if p.is_dir() and not _hidden(p)):
        found = _pictures(labels / city.name, LABEL_SUFFIX) if labels is not None else {}
        for stem, image in _pictures(city, IMAGE_SUFFIX).items():
            label = None
            if labels is not None:
                label = found.get(stem)
                if label is None or not label.is_file():
                    raise InvalidInputError(image, f"has no label: {labels / city.name / (stem + LABEL_SUFFIX)} "
                                                   "is missing")
                _check_pair(image, label)
            cases.append(Case(id=safe_id(stem), images=(image,), labels=label, split=split))
    if labels is not None:
        for city in sorted(p for p in labels.iterdir() if p.is_dir() and not _hidden(p)):
            photos = _pictures(images / city.name, IMAGE_SUFFIX)
            for stem, label in _pictures(city, LABEL_SUFFIX).items():
                if stem not in photos:
                    raise InvalidInputError(label, f"is a label without an image: "
                                                   f"{images / city.name / (stem + IMAGE_SUFFIX)} is missing")
    return cases


def _check_pair(image: Path, label: Path) -> None:
    image_size, _ = picture_header(image)
    label_size, mode = picture_header(label)
    if mode not in ("L", "P"):
        raise InvalidInputError(label, f"is {mode_words(mode)} PNG; labelIds maps are 8-bit greyscale label ids")
    if label_size != image_size:
        raise InvalidInputError(label, f"is {size_text(label_size)} but its image {image.name} is "
                                f"{size_text(image_size)}")
