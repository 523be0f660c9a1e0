"""MS COCO: photographs with object outlines (instances) or segment maps (panoptic) in a JSON file.

The path is an ``instances_<split>.json`` or ``panoptic_<split>.json`` file,
or a folder whose ``annotations/`` holds such files (the instances files are
used where both kinds are there; open a panoptic JSON by its path).  A JSON's
photographs are in the folder named after its split (``instances_val2017.json``
-> ``val2017/``), beside the JSON or beside its ``annotations/`` folder; a
panoptic JSON's segment PNGs are in the folder of the same stem beside it
(``panoptic_val2017/``).  The split ("train", "val", "test") is read from
that name.

Categories become contiguous classes: 0 is background, then the declared
categories sorted by id are 1..n, named from the JSON and coloured from a
generated palette of distinct colours.  Instances: polygons and RLE masks are
painted into one semantic map with pycocotools, the larger annotations first,
so that a small object lying on a larger one stays visible; a crowd region is
painted as ignore (255) in the same order, so objects annotated one by one
on top of a crowd keep their class.  Unannotated pixels are background; an
image without annotations is all background (COCO has such images).
Panoptic: each pixel's segment id is ``R + 256 G + 256² B`` of the PNG and
its class the category of that segment in ``segments_info`` (things and stuff
alike); a crowd segment is ignore, and so is id 0, which in panoptic COCO
means "unlabelled", not background.

Opening parses the JSON and checks it (categories, image ids, file names,
every category annotated) and the picture headers; the masks themselves are
decoded when a case is read, or all of them by :meth:`CocoDataset.validate_labels`.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case, CaseData, Layout, read_json, safe_id
from storage.datasets.cocomasks import Shape, draws, paint
from storage.datasets.pictures import listed, picture_header, read_rgb, read_rgb_ids, size_text
from storage.errors import CorruptInputError, InvalidInputError

__all__ = ["CocoDataset", "CocoImage", "LAYOUT", "PanopticSegments", "detect", "distinct_colours", "open_coco"]

JSON_NAME = re.compile(r"^(?P<kind>instances|panoptic)_(?P<split>[A-Za-z0-9_.-]+)\.json$")
MAX_CLASSES = IGNORE - 1  # values 1..254 for categories, 0 background, 255 ignore: uint8 labels


@dataclass(frozen=True)
class CocoImage:
    """``Case.annotation`` of an instances case: which JSON and image id its shapes come from."""

    source: Path
    image_id: int
    height: int
    width: int


@dataclass(frozen=True)
class PanopticSegments:
    """``Case.annotation`` of a panoptic case: (segment id, class value) pairs, crowd segments valued 255."""

    source: Path
    values: tuple[tuple[int, int], ...]


def distinct_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` colours, black first (background), then hues a golden-ratio turn apart at alternating
    saturations and brightnesses, so neighbouring class values never look alike."""
    colours = [(0, 0, 0)]
    k = 0
    while len(colours) < n:
        k += 1
        hue = (k * 0.6180339887498949) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, (0.85, 0.55, 0.7)[k % 3], (0.95, 0.7)[(k // 3) % 2])
        colour = (round(rgb[0] * 255), round(rgb[1] * 255), round(rgb[2] * 255))
        if colour not in colours:
            colours.append(colour)
    return colours[:n]


@dataclass
class CocoDataset:
    """One or more COCO JSON files of one kind, as a :class:`storage.datasets.base.Dataset`."""

    name: str
    root: Path
    cases: list[Case]
    classes: list[LabelClass]
    kind: str  # "instances" or "panoptic"
    sources: list[Path]  # the JSON files
    shapes: dict[CocoImage, list[Shape]] = field(default_factory=dict, repr=False)
    layout: str = "coco"
    ignore_index: int | None = IGNORE
    spatial_dims: int = 2
    channels: int = 3

    def read(self, case: Case, work: Path) -> CaseData:
        """The photograph and its semantic map, both whole in memory; ``work`` is not needed."""
        return CaseData(image=read_rgb(case.images[0]), labels=self.labels(case), spacing=(1.0, 1.0))

    def labels(self, case: Case) -> np.ndarray:
        """(H, W) uint8 semantic map of the case, drawn from its annotations or its segment PNG."""
        if isinstance(case.annotation, PanopticSegments):
            assert case.labels is not None
            return _panoptic_labels(case.labels, case.annotation)
        image = case.annotation
        assert isinstance(image, CocoImage)
        return paint(self.shapes.get(image, []), image.height, image.width, image.source)

    def drawn_classes(self, cases: list[Case]) -> set[int]:
        """The class values some annotation of ``cases`` paints (crowd regions and empty segmentations paint none),
        from the JSON alone: what a training split must hold for every class to be learnt."""
        out: set[int] = set()
        for case in cases:
            if isinstance(case.annotation, PanopticSegments):
                out.update(v for _, v in case.annotation.values if v != IGNORE)
            else:
                out.update(shape.value for shape in self.shapes.get(case.annotation, [])
                           if not shape.crowd and draws(shape.segmentation))
        return out

    def validate_labels(self) -> None:
        """Decode every annotation (or scan every segment PNG) and refuse the first that does not fit."""
        for case in self.cases:
            self.labels(case)


def detect(path: Path) -> bool:
    """An instances/panoptic JSON, or a folder whose ``annotations/`` holds one (names only)."""
    path = Path(path)
    if path.is_file():
        return bool(JSON_NAME.match(path.name))
    annotations = path / "annotations"
    return annotations.is_dir() and any(JSON_NAME.match(p.name) for p in annotations.iterdir() if p.is_file())


def open_coco(path: Path) -> CocoDataset:
    """The COCO dataset at ``path`` (a JSON file or a folder), its JSON checked and its pictures' sizes too."""
    path = Path(path)
    if path.is_file():
        sources, name = [path], path.stem
        if not JSON_NAME.match(path.name):
            raise InvalidInputError(path, "is not named instances_<split>.json or panoptic_<split>.json")
    else:
        found = sorted(p for p in (path / "annotations").glob("*.json") if JSON_NAME.match(p.name))
        instances = [p for p in found if p.name.startswith("instances_")]
        sources, name = instances or found, path.resolve().name
        if not sources:
            raise InvalidInputError(path / "annotations", "holds no instances_*.json or panoptic_*.json")
    reader = _Reader()
    for source in sources:
        reader.add(source)
    reader.check_all_annotated()
    roots = {folder.parent for folder in reader.image_folders}  # the folder holding images and annotations
    root = roots.pop() if len(roots) == 1 else (path.parent if path.is_file() else path)
    kind = JSON_NAME.match(sources[0].name)["kind"]  # type: ignore[index]
    return CocoDataset(name=name, root=root, cases=reader.cases, classes=reader.classes(), kind=kind,
                       sources=sources, shapes=reader.shapes)


LAYOUT = Layout(name="coco", detect=detect, open=open_coco, holds="annotations/instances_*.json or panoptic_*.json")


class _Reader:
    """Reads the JSON files of one dataset one by one, checking each against the first's categories."""

    def __init__(self) -> None:
        self.categories: dict[int, str] | None = None
        self.first: Path | None = None
        self.annotated: set[int] = set()
        self.drawn: set[int] = set()  # categories with an annotation that paints their class (not crowd, not empty)
        self.cases: list[Case] = []
        self.case_ids: dict[str, tuple[Path, Path]] = {}  # case id -> (JSON listing it, the picture)
        self.shapes: dict[CocoImage, list[Shape]] = {}
        self.image_folders: list[Path] = []
        self.colours: dict[int, tuple[int, int, int]] = {}  # a panoptic category's own "color"

    def classes(self) -> list[LabelClass]:
        """Background, then the categories by id as classes 1..N; each keeps its COCO id as its ``code``
        (``COCO:90``: the ids 1, 5, 90 become 1, 2, 3) and its own colour where the JSON gives one."""
        assert self.categories is not None
        colours = distinct_colours(len(self.categories) + 1)
        out = [LabelClass(value=0, name="background", color=colours[0])]
        for value, (cat_id, name) in enumerate(sorted(self.categories.items()), start=1):
            out.append(LabelClass(value=value, name=name, color=self.colours.get(cat_id, colours[value]),
                                  code=f"COCO:{cat_id}"))
        return out

    def add(self, source: Path) -> None:
        match = JSON_NAME.match(source.name)
        assert match is not None
        kind, split_name = match["kind"], match["split"]
        data = _load(source)
        categories = _categories(source, data["categories"])
        self.colours.update(_colours(data["categories"]))
        if self.categories is None or self.first is None:
            self.categories, self.first = categories, source
        elif categories != self.categories:
            raise InvalidInputError(source, f"declares other categories than {self.first.name}")
        values = {cat_id: value for value, cat_id in enumerate(sorted(categories), start=1)}
        folder = _image_folder(source, split_name)
        self.image_folders.append(folder)
        images = _images(source, data["images"], folder)
        split = _split_of(split_name)
        if kind == "instances":
            self._add_instances(source, data["annotations"], images, values, split)
        else:
            self._add_panoptic(source, data["annotations"], images, values, split)

    def _add_instances(self, source: Path, annotations: list, images: dict[int, dict], values: dict[int, int],
                       split: str | None) -> None:
        keys = {}
        for image_id, image in images.items():
            key = CocoImage(source, image_id, image["height"], image["width"])
            keys[image_id] = key
            self._add_case(source, image, labels=None, annotation=key, split=split)
        for n, ann in enumerate(annotations):
            ann_id = ann.get("id", f"#{n}") if isinstance(ann, dict) else f"#{n}"
            if not isinstance(ann, dict) or not isinstance(ann.get("segmentation"), (list, dict)):
                raise InvalidInputError(source, f"annotation {ann_id} has no polygon or RLE segmentation")
            category = self._category(source, ann, f"annotation {ann_id}", values)
            if ann.get("image_id") not in keys:
                raise InvalidInputError(source, f"annotation {ann_id} refers to image_id {ann.get('image_id')!r}, "
                                        "which is not in its images")
            shape = Shape(ann_id, values[category], bool(ann.get("iscrowd", 0)), ann["segmentation"])
            self.shapes.setdefault(keys[ann["image_id"]], []).append(shape)
            if not shape.crowd and draws(shape.segmentation):
                self.drawn.add(category)

    def _add_panoptic(self, source: Path, annotations: list, images: dict[int, dict], values: dict[int, int],
                      split: str | None) -> None:
        pngs = source.parent / source.stem
        if not pngs.is_dir():
            raise InvalidInputError(pngs, f"missing: the segment PNGs of {source.name} (unpack {source.stem}.zip "
                                    "there)")
        by_image: dict[int, dict] = {}
        for n, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not isinstance(ann.get("segments_info"), list):
                raise InvalidInputError(source, f"annotation #{n} has no segments_info list")
            image_id = ann.get("image_id")
            if image_id not in images:
                raise InvalidInputError(source, f"annotation #{n} refers to image_id {image_id!r}, "
                                        "which is not in its images")
            if image_id in by_image:
                raise InvalidInputError(source, f"image_id {image_id} has two panoptic annotations")
            by_image[image_id] = ann
        used = set()
        for image_id, image in images.items():
            picture = image["path"]
            ann = by_image.get(image_id)
            if ann is None:
                raise InvalidInputError(picture, f"has no label: {source.name} has no panoptic annotation for it")
            png = pngs / _plain_name(source, ann.get("file_name"), f"image_id {image_id}")
            if not png.is_file():
                raise InvalidInputError(picture, f"has no label: {png} is missing")
            size, _ = picture_header(png)
            if size != (image["width"], image["height"]):
                raise InvalidInputError(png, f"is {size_text(size)} but its image {picture.name} is "
                                        f"{image['width']}x{image['height']}")
            used.add(png.name)
            segments = []
            for segment in ann["segments_info"]:
                where = f"a segment of image_id {image_id}"
                category = self._category(source, segment, where, values)
                seg_id = segment.get("id") if isinstance(segment, dict) else None
                if not isinstance(seg_id, int) or not 0 < seg_id < 256 ** 3:
                    raise InvalidInputError(source, f"{where} has id {seg_id!r}, not an id 1..16777215")
                segments.append((seg_id, IGNORE if segment.get("iscrowd") else values[category]))
                if not segment.get("iscrowd"):
                    self.drawn.add(category)
            if len({seg_id for seg_id, _ in segments}) != len(segments):
                raise InvalidInputError(source, f"image_id {image_id} lists a segment id twice")
            self._add_case(source, image, labels=png, annotation=PanopticSegments(source, tuple(segments)),
                           split=split)
        for png in sorted(p for p in pngs.glob("*.png") if not p.name.startswith(".")):  # macOS's ._<name>.png
            if png.name not in used:
                raise InvalidInputError(png, f"is a label without an image: {source.name} does not refer to it")

    def _category(self, source: Path, entry: Any, where: str, values: dict[int, int]) -> int:
        category = entry.get("category_id") if isinstance(entry, dict) else None
        if category not in values:
            raise InvalidInputError(source, f"{where} has category_id {category!r}, which no category declares")
        self.annotated.add(category)
        return category

    def _add_case(self, source: Path, image: dict, labels: Path | None, annotation: Any, split: str | None) -> None:
        picture: Path = image["path"]
        case_id = safe_id(picture.stem)
        if case_id in self.case_ids and self.case_ids[case_id][1] != picture:
            # another picture of that name (train2017/0001.jpg and val2017/0001.jpg of a custom export): its
            # folder tells them apart
            case_id = safe_id(f"{picture.parent.name}-{picture.stem}")
        if case_id in self.case_ids:
            raise InvalidInputError(source, f"image {picture.name} is also an image of "
                                            f"{self.case_ids[case_id][0].name}")
        self.case_ids[case_id] = (source, picture)
        self.cases.append(Case(id=case_id, images=(picture,), labels=labels, split=split, annotation=annotation))

    def check_all_annotated(self) -> None:
        assert self.categories is not None and self.first is not None
        for cat_id, name in sorted(self.categories.items()):
            if cat_id not in self.annotated:
                raise InvalidInputError(self.first, f"category {cat_id} '{name}' has no annotations")
            if cat_id not in self.drawn:  # had trained as a class that never appears (a detection-only export)
                raise InvalidInputError(self.first, f"category {cat_id} '{name}' has no annotation that draws its "
                                                    "class: only crowd regions (trained as ignore) or empty "
                                                    "segmentations (box-only annotations)")


def _load(source: Path) -> dict:
    try:
        data = read_json(source, limit=1 << 31)  # COCO's train2017 instances are about 450 MB
    except OSError as err:
        raise InvalidInputError(source, f"cannot be read: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptInputError(source, f"is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(source, "is not a COCO annotation file (no top-level object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InvalidInputError(source, f"has no '{key}' list: not a COCO annotation file")
    return data


def _colours(entries: list) -> dict[int, tuple[int, int, int]]:
    """The categories' ``color`` (COCO panoptic's [r, g, b]), where one is well formed."""
    out = {}
    for cat in entries:
        if not isinstance(cat, dict):
            continue
        colour = cat.get("color")
        if isinstance(cat.get("id"), int) and isinstance(colour, list) and len(colour) == 3 and \
                all(isinstance(c, int) and 0 <= c <= 255 for c in colour):
            out[cat["id"]] = (colour[0], colour[1], colour[2])
    return out


def _categories(source: Path, entries: list) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, cat in enumerate(entries):
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cat_id, int) or not isinstance(name, str) or not name.strip():
            raise InvalidInputError(source, f"category #{n} has no integer id and name")
        if cat_id in out:
            raise InvalidInputError(source, f"category id {cat_id} is declared twice")
        name = " ".join(name.split())
        same = next((other for other, known in out.items() if known == name), None)
        if same is not None or name == "background":  # class names key statistics and reports (the card's rule)
            raise InvalidInputError(source, f"categories {same if same is not None else 'background (class 0)'} "
                                            f"and {cat_id} are both named {name!r}; class names must be unique")
        out[cat_id] = name
    if not out:
        raise InvalidInputError(source, "declares no categories")
    if len(out) > MAX_CLASSES:
        raise InvalidInputError(source, f"declares {len(out)} categories; at most {MAX_CLASSES} fit uint8 labels")
    return out


def _images(source: Path, entries: list, folder: Path) -> dict[int, dict]:
    """Image id -> {path, width, height}; each file must exist with the size the JSON gives."""
    out: dict[int, dict] = {}
    for n, image in enumerate(entries):
        image_id = image.get("id") if isinstance(image, dict) else None
        if not isinstance(image_id, int):
            raise InvalidInputError(source, f"image #{n} has no integer id")
        if image_id in out:
            raise InvalidInputError(source, f"image id {image_id} is declared twice")
        width, height = image.get("width"), image.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
            raise InvalidInputError(source, f"image id {image_id} has no positive integer width and height")
        path = folder / _relative_name(source, image.get("file_name"), f"image id {image_id}")
        if not path.is_file():
            raise InvalidInputError(path, f"missing: {source.name} lists it as image id {image_id}")
        size, _ = picture_header(path)
        if size != (width, height):
            raise InvalidInputError(path, f"is {size_text(size)} but {source.name} says {width}x{height}")
        out[image_id] = {"path": path, "width": width, "height": height}
    return out


def _relative_name(source: Path, name: Any, where: str) -> str:
    """An image's file_name: a plain name, or a relative path of plain names inside the image folder (custom
    exports write ``images/0001.jpg``); never absolute, never ``..``."""
    if not isinstance(name, str) or any(part in ("", ".", "..") or "\\" in part or "\0" in part
                                        for part in name.split("/")):
        raise InvalidInputError(source, f"{where} has file_name {name!r}, not a file name or a relative path "
                                        "inside the image folder")
    return name


def _plain_name(source: Path, name: Any, where: str) -> str:
    """A file name read from the JSON, refused unless it is a plain name inside its folder."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InvalidInputError(source, f"{where} has file_name {name!r}, not a plain file name")
    return name


def _image_folder(source: Path, split_name: str) -> Path:
    """The split's photograph folder, beside the JSON or beside its ``annotations/`` folder."""
    candidates = [source.parent / split_name, source.parent.parent / split_name]
    for folder in candidates:
        if folder.is_dir():
            return folder
    expected = candidates[1] if source.parent.name == "annotations" else candidates[0]
    raise InvalidInputError(expected, f"missing: the images of {source.name}")


def _split_of(split_name: str) -> str | None:
    for split in ("train", "val", "test"):
        if split in split_name.lower():
            return split
    return None


def _panoptic_labels(png: Path, segments: PanopticSegments) -> np.ndarray:
    """Segment ids to class values: id 0 (unlabelled) and crowd segments are ignore."""
    ids = read_rgb_ids(png)
    table = dict(segments.values)
    present, inverse = np.unique(ids, return_inverse=True)
    bad = [int(i) for i in present if i != 0 and i not in table]
    if bad:
        raise InvalidInputError(png, f"segment ids {listed(bad)} are not in the segments_info of "
                                f"{segments.source.name}")
    values = np.array([IGNORE if i == 0 else table[int(i)] for i in present], dtype=np.uint8)
    return values[inverse.reshape(ids.shape)]
