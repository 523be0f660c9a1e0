"""Pascal VOC segmentation: JPEG photographs, palette-PNG class maps and split lists.

A VOC year folder (``VOC2012``) keeps every photograph in ``JPEGImages/``,
the class map of the segmented subset in ``SegmentationClass/`` and the
subset's split lists in ``ImageSets/Segmentation/{train,val,trainval}.txt``;
the ``VOCdevkit`` folder the archive unpacks to, holding one such year, is
accepted too.  A class map is a palette ("P") PNG whose raw palette indices
are the classes, 0 background to 20 tvmonitor, with 255 on the uncertain
border around each object: the indices are read as they are, never through
the palette's colours, so they arrive contiguous with 255 already the ignore
value.  Opening checks names, split lists and PNG/JPEG headers only; a class
map holding an index outside the table is found when its case is read or by
:meth:`VocDataset.validate_labels`, which scans them all.

The small picture helpers at the end (header, RGB pixels, raw indices) are
shared by the other photograph layouts (Cityscapes, COCO).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case, CaseData, Layout, safe_id
from storage.datasets.pictures import (LABEL_MODES, by_stem, listed, mode_words, picture_header, read_indices,
                                       read_rgb, size_text)
from storage.errors import CorruptInputError, InvalidInputError

__all__ = ["LAYOUT", "VOC_CLASSES", "VocDataset", "detect", "open_voc", "voc_classes", "voc_colormap"]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
YEAR = re.compile(r"^VOC\d{4}$")
PARTS = ("JPEGImages", "SegmentationClass", "ImageSets")
SPLITS = ("train", "val")  # trainval: the union, used unsplit only when both are absent
FLAGS = ("-1", "0", "1")  # a classification list's second word: not in, difficult, in


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour of each index: the index's bits dealt out in turn to R, G, B, most significant first.

    Index i's bits 0, 3, 6 set R's bits 7, 6, 5; bits 1, 4, 7 set G's; bits 2, 5 set B's (so 1 is dark red
    (128, 0, 0) and 255, the border, (224, 224, 192)).
    """
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


def voc_classes() -> list[LabelClass]:
    colours = voc_colormap(len(VOC_CLASSES))
    return [LabelClass(value=i, name=name, color=colours[i]) for i, name in enumerate(VOC_CLASSES)]


@dataclass
class VocDataset:
    """A VOC year folder as a :class:`storage.datasets.base.Dataset`."""

    name: str
    root: Path
    cases: list[Case]
    classes: list[LabelClass] = field(default_factory=voc_classes)
    layout: str = "voc"
    ignore_index: int | None = IGNORE
    spatial_dims: int = 2
    channels: int = 3

    def read(self, case: Case, work: Path) -> CaseData:
        """Photographs are small: both arrays are read whole into memory, ``work`` is not needed."""
        return CaseData(image=read_rgb(case.images[0]), labels=self._labels(case), spacing=(1.0, 1.0))

    def validate_labels(self) -> None:
        """Read every class map and refuse the first holding an index outside the VOC table (a full scan)."""
        for case in self.cases:
            self._labels(case)

    def _labels(self, case: Case) -> np.ndarray:
        assert case.labels is not None
        labels = read_indices(case.labels)
        counts = np.bincount(labels.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(counts) if v >= len(VOC_CLASSES) and v != IGNORE]
        if bad:
            raise InvalidInputError(case.labels, f"label values {listed(bad)} are not VOC classes "
                                    f"(0..{len(VOC_CLASSES) - 1}, {IGNORE} border)")
        return labels


def detect(root: Path) -> bool:
    """A folder with the VOC parts (its pictures or its class maps), or a VOCdevkit-like folder with a VOC20xx
    child (names only)."""
    root = Path(root)
    if not root.is_dir():
        return False
    # a year folder, even with a part missing (JPEGImages/ itself: the pictures not unpacked yet): open says which
    if (root / "JPEGImages").is_dir() or (root / "SegmentationClass").is_dir():
        return True
    return any(YEAR.match(child.name) and (child / "JPEGImages").is_dir() for child in _children(root))


def open_voc(root: Path) -> VocDataset:
    """The VOC folder at ``root``, its split lists, images and class maps checked for existence and size."""
    root = _year_folder(Path(root))
    for part in PARTS[:2] + ("ImageSets/Segmentation",):
        if not (root / part).is_dir():
            raise InvalidInputError(root / part, "missing: a VOC folder needs JPEGImages/, SegmentationClass/ "
                                    "and ImageSets/Segmentation/")
    lists = _split_lists(root / "ImageSets" / "Segmentation")
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    # extensions in any case (2007_000000.JPG); hidden files (macOS's ._<name>.png) left out
    jpegs, pngs = by_stem(images, ".jpg"), by_stem(labels, ".png")
    cases: list[Case] = []
    seen: dict[str, Path] = {}
    for split, listing, entries in lists:
        for number, case_id in entries:
            if case_id in seen:
                raise InvalidInputError(listing, f"line {number}: {case_id} is also listed in {seen[case_id].name}")
            seen[case_id] = listing
            image, label = jpegs.get(case_id), pngs.get(case_id)
            if image is None or not image.is_file():
                raise InvalidInputError(images / f"{case_id}.jpg", f"missing: listed in {listing.name} line {number}")
            if label is None or not label.is_file():
                raise InvalidInputError(image, f"has no label: {labels / (case_id + '.png')} is missing")
            _check_pair(image, label)
            cases.append(Case(id=case_id, images=(image,), labels=label, split=split))
    for stem, label in sorted(pngs.items()):
        if stem not in jpegs:
            raise InvalidInputError(label, f"is a label without an image: {images / (stem + '.jpg')} is missing")
    if not cases:
        raise InvalidInputError(lists[0][1], "lists no cases")
    return VocDataset(name=root.resolve().name, root=root, cases=cases)


LAYOUT = Layout(name="voc", detect=detect, open=open_voc, holds="JPEGImages/ and SegmentationClass/")


def _children(root: Path) -> list[Path]:
    try:
        return [child for child in root.iterdir() if child.is_dir()]
    except OSError:
        return []


def _year_folder(root: Path) -> Path:
    """``root`` itself, or the one VOC20xx folder a VOCdevkit holds."""
    if (root / "JPEGImages").exists() or (root / "SegmentationClass").exists():  # a year folder, maybe incomplete
        return root
    years = sorted(child for child in _children(root) if YEAR.match(child.name))
    if len(years) != 1:
        names = ", ".join(y.name for y in years) or "none"
        raise InvalidInputError(root, f"a VOCdevkit folder must hold exactly one VOC20xx folder (found {names})")
    return years[0]


def _split_lists(folder: Path) -> list[tuple[str | None, Path, list[tuple[int, str]]]]:
    """(split, list file, its (line, case id)s): train and val; one of them and trainval, the other being
    trainval less it (as VOC makes trainval: their union); else trainval as one unsplit set.  A list file that
    lists no case is refused: an empty train.txt or val.txt had been passed over for a fraction split (of the
    other list's cases alone), leaving the images it should have listed out without a word."""
    have = {name: folder / f"{name}.txt" for name in (*SPLITS, "trainval") if (folder / f"{name}.txt").is_file()}
    used = [name for name in SPLITS if name in have]
    if len(used) < 2 and "trainval" in have:  # trainval.txt is read only where train.txt or val.txt is not there
        used.append("trainval")
    read = {name: _read_list(have[name]) for name in used}
    for name in used:
        if not read[name]:
            raise InvalidInputError(have[name], "lists no cases")
    if all(split in have for split in SPLITS):
        return [(split, have[split], read[split]) for split in SPLITS]
    given = [split for split in SPLITS if split in have]
    if given and "trainval" in have:
        listed = read[given[0]]
        ids = {case_id for _, case_id in listed}
        rest = [(n, case_id) for n, case_id in read["trainval"] if case_id not in ids]
        other = next(split for split in SPLITS if split not in have)
        return sorted([(given[0], have[given[0]], listed), (other, have["trainval"], rest)],
                      key=lambda entry: SPLITS.index(entry[0]))
    if given:
        other = next(split for split in SPLITS if split not in have)
        raise InvalidInputError(folder / f"{other}.txt", "missing: VOC lists its train and val splits together "
                                "(or one of them with trainval.txt)")
    if "trainval" in have:
        return [(None, have["trainval"], read["trainval"])]
    raise InvalidInputError(folder / "train.txt", "missing: no VOC split list (train.txt, val.txt or trainval.txt)")


def _read_list(listing: Path) -> list[tuple[int, str]]:
    """(line number, case id) of a split list; an id must be a plain name, since it becomes a file name.  A line
    is a name, or a name and a -1/0/1 flag (the classification lists' form); any other second word is a name
    with a space, which had been cut at it (and the first word's .jpg reported missing)."""
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptInputError(listing, f"cannot be read as a text list: {err}") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] not in FLAGS):
            raise InvalidInputError(listing, f"line {number}: {line.strip()!r}: case names cannot contain spaces (a "
                                    "line is a name, or a name and a -1/0/1 flag); rename the files")
        if safe_id(words[0]) != words[0]:
            raise InvalidInputError(listing, f"line {number}: {words[0]!r} is not a plain case name")
        out.append((number, words[0]))
    return out


def _check_pair(image: Path, label: Path) -> None:
    image_size, _ = picture_header(image)
    label_size, mode = picture_header(label)
    if mode not in LABEL_MODES:
        raise InvalidInputError(label, f"is {mode_words(mode)} PNG; VOC class maps are palette PNGs whose indices "
                                       "are classes")
    if label_size != image_size:
        raise InvalidInputError(label, f"is {size_text(label_size)} but its image {image.name} is "
                                f"{size_text(image_size)}")
