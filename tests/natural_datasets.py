"""Tiny Pascal VOC, Cityscapes and MS COCO datasets, written in each dataset's own folder and file conventions.

Every generator writes real files with Pillow and json (JPEG photographs,
palette or greyscale PNG label maps, COCO JSON with polygons, RLE and crowd
regions) into a given folder and returns what a reader must find: the root,
each case's split and the semantic label map (contiguous classes, 255 ignore)
drawn here from rectangles with numpy, independently of the readers.  The
pictures are 40x30 so a whole layout is written and read in milliseconds.
Tests break a written dataset afterwards (delete a file, resize a label...)
to check each refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

W, H = 40, 30


@dataclass
class Written:
    """What a generator wrote: the path to open, and per case id its split and expected labels."""

    root: Path
    splits: dict[str, str | None] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def paint(rects: list[tuple[int, int, int, int, int]], fill: int = 0) -> np.ndarray:
    """An (H, W) uint8 map: ``fill``, then each (x0, y0, x1, y1, value) rectangle (x1, y1 excluded) in order."""
    out = np.full((H, W), fill, dtype=np.uint8)
    for x0, y0, x1, y1, value in rects:
        out[y0:y1, x0:x1] = value
    return out


def photo(seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 picture of flat colour blocks (JPEG keeps them close to their values)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 10, axis=0), 10, axis=1)[:H, :W]


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def write_png(path: Path, values: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> None:
    """An 8-bit PNG: greyscale ("L"), or palette ("P") where ``palette`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8))  # 2-D uint8: "L"
    if palette is not None:
        picture = Image.frombytes("P", picture.size, picture.tobytes())
        picture.putpalette([c for colour in palette for c in colour])
    picture.save(path)


# -- Pascal VOC ----------------------------------------------------------------------------------------------

VOC_CASES = {  # id: (split, rectangles of class indices, greyscale JPEG)
    "2007_000032": ("train", [(4, 4, 30, 22, 255), (5, 5, 29, 21, 1)], False),  # aeroplane with its border
    "2007_000039": ("train", [(0, 10, 20, 30, 15), (22, 2, 38, 14, 255), (23, 3, 37, 13, 20)], False),
    "2008_000123": ("val", [(10, 5, 20, 25, 255), (11, 6, 19, 24, 3)], True),  # a bird, on a grey photograph
}


def voc_palette() -> list[tuple[int, int, int]]:
    """Any palette will do (readers take indices, not colours); this one is distinct per index."""
    return [(i, (i * 37) % 256, (i * 91) % 256) for i in range(256)]


def write_voc(folder: Path, *, devkit: bool = False, trainval_only: bool = False) -> Written:
    """A ``VOC2012`` folder (inside ``VOCdevkit/`` with ``devkit``), with one photograph outside the segmented
    subset as in the real JPEGImages/."""
    root = folder / "VOCdevkit" / "VOC2012" if devkit else folder / "VOC2012"
    out = Written(root=folder / "VOCdevkit" if devkit else root)
    lists: dict[str, list[str]] = {"train": [], "val": [], "trainval": []}
    for n, (case_id, (split, rects, grey)) in enumerate(VOC_CASES.items()):
        pixels = photo(n)
        write_jpeg(root / "JPEGImages" / f"{case_id}.jpg", pixels.mean(axis=2).astype(np.uint8) if grey else pixels)
        labels = paint(rects)
        write_png(root / "SegmentationClass" / f"{case_id}.png", labels, voc_palette())
        lists[split].append(case_id)
        lists["trainval"].append(case_id)
        out.splits[case_id] = None if trainval_only else split
        out.labels[case_id] = labels
    write_jpeg(root / "JPEGImages" / "2009_000001.jpg", photo(9))  # detection-only photograph: not a case
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, ids in lists.items():
        if trainval_only and split != "trainval":
            continue
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return out


# -- Cityscapes ----------------------------------------------------------------------------------------------

# label id -> train id, for the ids drawn here (from the Cityscapes definition; 255: ignore)
CITYSCAPES_TRAIN_IDS = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 9: 255, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}

CITYSCAPES_CASES = {  # (split, city, stem): label-id rectangles over a road (7)
    ("train", "aachen", "aachen_000000_000019"): [(0, 0, 40, 10, 23), (0, 10, 12, 22, 11), (20, 12, 30, 24, 26),
                                                  (0, 26, 40, 30, 1)],
    ("train", "bochum", "bochum_000000_000313"): [(0, 0, 40, 8, 21), (0, 20, 8, 30, 8), (10, 10, 14, 22, 24),
                                                  (30, 12, 36, 20, 33), (16, 0, 20, 4, 4)],
    ("val", "frankfurt", "frankfurt_000000_000294"): [(0, 0, 20, 12, 9), (22, 4, 30, 12, 0), (2, 14, 12, 28, 26)],
    ("test", "berlin", "berlin_000000_000019"): [(0, 0, 40, 30, 0), (0, 24, 40, 30, 1)],
}


def write_cityscapes(folder: Path, *, test_labels: bool = True) -> Written:
    """``leftImg8bit/`` and ``gtFine/`` with train (two cities), val and test; expected labels are train ids."""
    root = folder / "cityscapes"
    out = Written(root=root)
    lookup = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lookup[label_id] = train_id
    for n, ((split, city, stem), rects) in enumerate(CITYSCAPES_CASES.items()):
        write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", photo(n))
        ids = paint(rects, fill=7)
        if split != "test" or test_labels:
            gt = root / "gtFine" / split / city
            write_png(gt / f"{stem}_gtFine_labelIds.png", ids)
            write_png(gt / f"{stem}_gtFine_instanceIds.png", ids)  # beside it in the real data: not a label map
            (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": H, "imgWidth": W}))
        out.splits[stem] = split
        out.labels[stem] = lookup[ids]
    (root / "license.txt").write_text("generated for tests\n")
    return out


# -- MS COCO -------------------------------------------------------------------------------------------------

COCO_CATEGORIES = [  # declared out of id order on purpose: classes follow the ids (1 person, 3 car, 18 dog)
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
COCO_VALUES = {1: 1, 3: 2, 18: 3}  # category id -> contiguous class


def polygon(*rects: tuple[int, int, int, int]) -> list[list[float]]:
    """COCO polygons of axis-aligned rectangles (x0, y0, x1, y1): pixel columns x0..x1-1, rows y0..y1-1."""
    return [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)] for x0, y0, x1, y1 in rects]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths down the columns (Fortran order), starting with a run of zeros."""
    flat = mask.astype(bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return paint([(x0, y0, x1, y1, 1)]).astype(bool)


def _coco_images() -> dict[str, list[tuple[str, list[dict], np.ndarray]]]:
    """Per split folder: (file stem, annotations, expected labels); areas decide the painting order."""
    ell = rect_mask(24, 2, 30, 20) | rect_mask(24, 14, 38, 20)  # an L-shaped person, as compressed RLE
    return {
        "train2017": [
            ("000000000009", [  # a small dog listed before the large person it stands on: still visible
                {"category_id": 18, "segmentation": polygon((10, 8, 18, 15)), "iscrowd": 0},
                {"category_id": 1, "segmentation": polygon((2, 2, 30, 25)), "iscrowd": 0},
            ], paint([(2, 2, 30, 25, 1), (10, 8, 18, 15, 3)])),
            ("000000000025", [  # a crowd of people (ignore) with one person annotated on top; a car as RLE
                {"category_id": 1, "segmentation": uncompressed_rle(rect_mask(0, 0, 16, 30)), "iscrowd": 1},
                {"category_id": 1, "segmentation": polygon((4, 10, 8, 20)), "iscrowd": 0},
                {"category_id": 3, "segmentation": uncompressed_rle(rect_mask(20, 5, 36, 21)), "iscrowd": 0},
            ], paint([(0, 0, 16, 30, 255), (4, 10, 8, 20, 1), (20, 5, 36, 21, 2)])),
        ],
        "val2017": [
            ("000000000139", [  # a car in two parts, a dog as compressed RLE, an L-shaped person
                {"category_id": 3, "segmentation": polygon((0, 0, 6, 6), (8, 20, 18, 28)), "iscrowd": 0},
                {"category_id": 18, "segmentation": compressed_rle(rect_mask(10, 2, 20, 12)), "iscrowd": 0},
                {"category_id": 1, "segmentation": compressed_rle(ell), "iscrowd": 0},
            ], np.where(ell, 1, paint([(0, 0, 6, 6, 2), (8, 20, 18, 28, 2), (10, 2, 20, 12, 3)])).astype(np.uint8)),
            ("000000000285", [], np.zeros((H, W), np.uint8)),  # no annotations: all background, as in COCO
        ],
    }


def coco_json(split: str, cases: list[tuple[str, list[dict], np.ndarray]], first_id: int) -> dict:
    images, annotations = [], []
    for n, (stem, anns, _) in enumerate(cases):
        image_id = int(stem)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": W, "height": H})
        for ann in anns:
            annotations.append({"id": first_id + len(annotations), "image_id": image_id, "area": 0.0,
                                "bbox": [0, 0, 1, 1], **ann})
    return {"info": {"description": f"segflow test {split}"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": COCO_CATEGORIES}


def write_coco(folder: Path) -> Written:
    """``annotations/instances_{train,val}2017.json`` with ``train2017/`` and ``val2017/`` beside them."""
    root = folder / "coco"
    out = Written(root=root)
    for s, (split, cases) in enumerate(_coco_images().items()):
        for n, (stem, _, labels) in enumerate(cases):
            write_jpeg(root / split / f"{stem}.jpg", photo(10 * s + n))
            out.splits[stem] = split.removesuffix("2017")
            out.labels[stem] = labels
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        data = coco_json(split, cases, first_id=1000 * (s + 1))
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"annotations": []}))
    return out


PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person", "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "vehicle", "color": [0, 0, 142]},
    {"id": 187, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky", "color": [106, 154, 176]},
]


def write_coco_panoptic(folder: Path) -> Written:
    """``annotations/panoptic_val2017.json`` and its PNG folder, with ``val2017/`` photographs.

    Segment ids use all three PNG channels; id 0 (unlabelled) and a crowd segment must read as ignore."""
    root = folder / "coco-panoptic"
    out = Written(root=root)
    sky, person, car, crowd = 3_000_001, 258, 65_793, 7
    cases = {
        "000000000632": ([(0, 0, 40, 12, sky), (4, 12, 10, 28, person), (20, 16, 34, 26, car)],
                         [(sky, 187, 0), (person, 1, 0), (car, 3, 0)],
                         paint([(0, 0, 40, 12, 3), (4, 12, 10, 28, 1), (20, 16, 34, 26, 2)], fill=255)),
        "000000000724": ([(0, 0, 40, 30, sky), (0, 20, 20, 30, crowd), (30, 5, 36, 15, person + 1)],
                         [(sky, 187, 0), (crowd, 1, 1), (person + 1, 1, 0)],
                         paint([(0, 0, 40, 30, 3), (0, 20, 20, 30, 255), (30, 5, 36, 15, 1)])),
    }
    images, annotations = [], []
    for n, (stem, (rects, segments, labels)) in enumerate(cases.items()):
        write_jpeg(root / "val2017" / f"{stem}.jpg", photo(20 + n))
        ids = np.zeros((H, W), dtype=np.int64)
        for x0, y0, x1, y1, seg_id in rects:
            ids[y0:y1, x0:x1] = seg_id
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        png = root / "annotations" / "panoptic_val2017" / f"{stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(png)
        images.append({"id": int(stem), "file_name": f"{stem}.jpg", "width": W, "height": H})
        annotations.append({"image_id": int(stem), "file_name": f"{stem}.png", "segments_info": [
            {"id": seg_id, "category_id": cat, "iscrowd": crowd_flag, "area": 1, "bbox": [0, 0, 1, 1]}
            for seg_id, cat, crowd_flag in segments]})
        out.splits[stem] = "val"
        out.labels[stem] = labels
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": PANOPTIC_CATEGORIES}
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return out


def edit_json(path: Path, change) -> None:
    """Rewrite a JSON file through ``change(data)`` (which edits it in place): how tests break a COCO file."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def add_mac_metadata(root: Path) -> list[Path]:
    """What a dataset copied from a Mac onto a USB disk or a share holds besides its files: an AppleDouble
    ``._<name>`` beside every file and folder (resource fork and Finder info, magic 00 05 16 07, not the
    format its name says) and a ``.DS_Store`` in each folder.  Returns the files added."""
    header = (b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
              + b"\x00\x00\x00\x09\x00\x00\x00\x32\x00\x00\x0e\xb0"  # entry 9: Finder info
              + b"\x00\x00\x00\x02\x00\x00\x0e\xe2\x00\x00\x01\x1e")  # entry 2: resource fork
    added = []
    for path in sorted(root.rglob("*")):
        added.append(path.parent / f"._{path.name}")
        added[-1].write_bytes(header.ljust(4096, b"\x00"))
        if path.is_dir():
            added.append(path / ".DS_Store")
            added[-1].write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(2040))
    return added
