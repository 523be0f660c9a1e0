"""Pascal VOC, Cityscapes and MS COCO layouts on tiny datasets written in each one's real conventions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.datasets import cityscapes, coco, cocomasks, voc
from storage.errors import CorruptInputError, InvalidInputError
from tests import natural_datasets as nd


def read_all(dataset, work: Path) -> dict:
    return {case.id: dataset.read(case, work) for case in dataset.cases}


def refused(open_or_read, needle: str, error=InvalidInputError) -> str:
    """The one-line message of the refusal, which must name the offending file (``needle``)."""
    with pytest.raises(error) as info:
        open_or_read()
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    return message


# -- Pascal VOC ----------------------------------------------------------------------------------------------

def test_voc_detects_year_and_devkit_folders_only(tmp_path: Path) -> None:
    year = nd.write_voc(tmp_path / "a").root
    devkit = nd.write_voc(tmp_path / "b", devkit=True).root
    city = nd.write_cityscapes(tmp_path / "c").root
    assert voc.LAYOUT.detect(year) and voc.LAYOUT.detect(devkit)
    assert not voc.LAYOUT.detect(city) and not voc.LAYOUT.detect(tmp_path / "c")
    assert not voc.LAYOUT.detect(year / "ImageSets" / "Segmentation" / "train.txt")


def test_voc_classes_are_the_21_with_the_standard_colour_map() -> None:
    classes = voc.voc_classes()
    assert [c.value for c in classes] == list(range(21))
    assert (classes[0].name, classes[1].name, classes[15].name, classes[20].name) == (
        "background", "aeroplane", "person", "tvmonitor")
    colours = voc.voc_colormap()
    assert colours[0] == (0, 0, 0) and colours[1] == (128, 0, 0) and colours[2] == (0, 128, 0)
    assert colours[15] == (192, 128, 128) and colours[20] == (0, 64, 128) and colours[255] == (224, 224, 192)
    assert [c.color for c in classes] == colours[:21]


def test_voc_reads_splits_raw_indices_and_rgb(tmp_path: Path) -> None:
    written = nd.write_voc(tmp_path)
    dataset = voc.LAYOUT.open(written.root)
    assert (dataset.layout, dataset.name, dataset.ignore_index, dataset.spatial_dims, dataset.channels) == (
        "voc", "VOC2012", 255, 2, 3)
    assert {c.id: c.split for c in dataset.cases} == written.splits  # the detection-only photograph is no case
    for case_id, data in read_all(dataset, tmp_path).items():
        assert data.image.shape == (3, nd.H, nd.W) and data.image.dtype == np.uint8
        assert data.labels.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, written.labels[case_id])  # indices, not palette colours
        assert data.spacing == (1.0, 1.0) and data.geometry is None
    grey = dataset.read(next(c for c in dataset.cases if c.id == "2008_000123"), tmp_path).image
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    colour = dataset.read(dataset.cases[0], tmp_path).image.transpose(1, 2, 0).astype(int)
    centres = (slice(5, None, 10), slice(5, None, 10))  # inside the flat blocks, away from JPEG's block edges
    assert np.abs(colour[centres] - nd.photo(0).astype(int)[centres]).max() <= 8  # RGB order, close to lossless
    dataset.validate_labels()


def test_a_dataset_given_as_dot_is_named_by_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`segflow train --dataset .` from inside the folder: the dataset's recorded name was '' (Path('.').name)."""
    written = nd.write_voc(tmp_path / "voc")
    monkeypatch.chdir(written.root)
    assert voc.LAYOUT.open(Path(".")).name == "VOC2012"
    city = nd.write_cityscapes(tmp_path / "city")
    monkeypatch.chdir(city.root)
    assert cityscapes.LAYOUT.open(Path(".")).name == city.root.resolve().name


def test_voc_devkit_with_trainval_only_is_unsplit(tmp_path: Path) -> None:
    written = nd.write_voc(tmp_path, devkit=True, trainval_only=True)
    dataset = voc.LAYOUT.open(written.root)
    assert dataset.name == "VOC2012" and dataset.root == written.root / "VOC2012"
    assert [c.split for c in dataset.cases] == [None, None, None]


@pytest.mark.parametrize("missing", ["val", "train"])
def test_voc_with_one_split_and_trainval_takes_the_other_as_trainval_less_it(tmp_path: Path, missing: str) -> None:
    """VOC's trainval.txt is train and val together: with one of them missing the folder was refused."""
    written = nd.write_voc(tmp_path)
    (written.root / "ImageSets" / "Segmentation" / f"{missing}.txt").unlink()
    dataset = voc.LAYOUT.open(written.root)
    assert {c.id: c.split for c in dataset.cases} == written.splits
    assert [c.split for c in dataset.cases] == sorted((c.split for c in dataset.cases), key=voc.SPLITS.index)


def test_voc_devkit_with_two_years_is_refused(tmp_path: Path) -> None:
    devkit = nd.write_voc(tmp_path, devkit=True).root
    shutil.copytree(devkit / "VOC2012", devkit / "VOC2007")
    assert "VOC2007, VOC2012" in refused(lambda: voc.LAYOUT.open(devkit), str(devkit))


@pytest.mark.parametrize("fault", ["no val.txt", "no split list", "no SegmentationClass", "no JPEGImages",
                                   "image without label",
                                   "label without image", "listed image missing", "size mismatch", "RGB label",
                                   "path in list"])
def test_voc_malformed_layouts_name_the_file(tmp_path: Path, fault: str) -> None:
    root = nd.write_voc(tmp_path).root
    sets, labels = root / "ImageSets" / "Segmentation", root / "SegmentationClass"
    if fault == "no val.txt":  # and no trainval.txt to take it from
        (sets / "val.txt").unlink()
        (sets / "trainval.txt").unlink()
        needle = str(sets / "val.txt")
    elif fault == "no split list":
        for name in ("train.txt", "val.txt", "trainval.txt"):
            (sets / name).unlink()
        needle = str(sets / "train.txt")
    elif fault == "no SegmentationClass":
        shutil.rmtree(labels)
        needle = str(labels)
    elif fault == "no JPEGImages":  # the pictures not unpacked yet: "not a dataset layout" had not said which
        shutil.rmtree(root / "JPEGImages")
        needle = str(root / "JPEGImages")
        from storage.datasets import open_dataset

        assert str(root / "JPEGImages") in refused(lambda: open_dataset(root), needle)
    elif fault == "image without label":
        (labels / "2007_000039.png").unlink()
        needle = str(root / "JPEGImages" / "2007_000039.jpg")
    elif fault == "label without image":
        nd.write_png(labels / "2011_000999.png", np.zeros((nd.H, nd.W), np.uint8), nd.voc_palette())
        needle = str(labels / "2011_000999.png")
    elif fault == "listed image missing":
        (root / "JPEGImages" / "2008_000123.jpg").unlink()
        needle = str(root / "JPEGImages" / "2008_000123.jpg")
    elif fault == "size mismatch":
        nd.write_png(labels / "2007_000032.png", np.zeros((nd.H, nd.W + 1), np.uint8), nd.voc_palette())
        needle = str(labels / "2007_000032.png")
    elif fault == "RGB label":
        Image.new("RGB", (nd.W, nd.H), (128, 0, 0)).save(labels / "2007_000032.png")
        needle = str(labels / "2007_000032.png")
    else:
        (sets / "val.txt").write_text("../../etc/passwd\n")
        needle = str(sets / "val.txt")
    refused(lambda: voc.LAYOUT.open(root), needle)


def test_a_label_pictures_mode_is_said_in_words(tmp_path: Path) -> None:
    """A 16-bit VOC label had been refused as "is a I;16 PNG" (Pillow's mode name), an RGB one as "is a RGB PNG"."""
    root = nd.write_voc(tmp_path).root
    label = root / "SegmentationClass" / "2007_000032.png"
    Image.fromarray(np.zeros((nd.H, nd.W), np.uint16)).save(label)
    assert refused(lambda: voc.LAYOUT.open(root), str(label)).endswith(
        ": is a 16-bit grey PNG; VOC class maps are palette PNGs whose indices are classes")
    Image.new("RGB", (nd.W, nd.H), (128, 0, 0)).save(label)
    assert refused(lambda: voc.LAYOUT.open(root), str(label)).endswith(": is an RGB colour PNG; VOC class maps are "
                                                                        "palette PNGs whose indices are classes")


@pytest.mark.parametrize("empty", ["train", "val"])
def test_voc_an_empty_split_list_is_refused_naming_it(tmp_path: Path, empty: str) -> None:
    """An empty train.txt (or val.txt) beside a val.txt listing cases had been passed over for a fraction split of
    the other list's cases, leaving the images it should have listed out without a word."""
    root = nd.write_voc(tmp_path).root
    sets = root / "ImageSets" / "Segmentation"
    (sets / f"{empty}.txt").write_text("\n")
    assert refused(lambda: voc.LAYOUT.open(root), str(sets / f"{empty}.txt")).endswith(": lists no cases")
    (sets / "trainval.txt").unlink()
    refused(lambda: voc.LAYOUT.open(root), str(sets / f"{empty}.txt"))
    (sets / f"{empty}.txt").unlink()
    (sets / "trainval.txt").write_text("")  # the other list with an empty trainval.txt
    refused(lambda: voc.LAYOUT.open(root), str(sets / "trainval.txt"))


def test_voc_an_empty_trainval_list_beside_train_and_val_is_not_read(tmp_path: Path) -> None:
    written = nd.write_voc(tmp_path)
    (written.root / "ImageSets" / "Segmentation" / "trainval.txt").write_text("")
    assert {c.id: c.split for c in voc.LAYOUT.open(written.root).cases} == written.splits


def test_voc_list_line_with_a_space_is_refused_naming_the_list_and_line(tmp_path: Path) -> None:
    """"2007_000032 copy" (a file copied in a file manager) was cut at the space, and the error said
    2007_000032.jpg was missing; a "name flag" line of the classification lists still reads."""
    root = nd.write_voc(tmp_path).root
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("2007_000032  1\n2007_000039 -1\n")
    assert {c.id for c in voc.LAYOUT.open(root).cases} == {"2007_000032", "2007_000039", "2008_000123"}
    for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        (root / folder / f"2007_000039{ext}").rename(root / folder / f"2007_000039 copy{ext}")
    (sets / "train.txt").write_text("2007_000032\n2007_000039 copy\n")
    message = refused(lambda: voc.LAYOUT.open(root), f"{sets / 'train.txt'}: line 2: ")
    assert "'2007_000039 copy': case names cannot contain spaces" in message


def test_voc_matches_extensions_in_any_case(tmp_path: Path) -> None:
    """A camera's 2007_000032.JPG was reported as "missing: ... .jpg" (the geo and nnU-Net layouts already took
    .TIF and .PNG)."""
    written = nd.write_voc(tmp_path / "voc")
    root = written.root
    (root / "JPEGImages" / "2007_000032.jpg").rename(root / "JPEGImages" / "2007_000032.JPG")
    (root / "SegmentationClass" / "2008_000123.png").rename(root / "SegmentationClass" / "2008_000123.PNG")
    dataset = voc.LAYOUT.open(root)
    assert {c.id: c.split for c in dataset.cases} == written.splits
    for case_id, data in read_all(dataset, tmp_path).items():
        np.testing.assert_array_equal(data.labels, written.labels[case_id])
    (root / "SegmentationClass" / "2011_000999.PNG").write_bytes(b"")  # still a label without an image
    refused(lambda: voc.LAYOUT.open(root), str(root / "SegmentationClass" / "2011_000999.PNG"))


def test_cityscapes_matches_extensions_in_any_case(tmp_path: Path) -> None:
    """A _leftImg8bit.PNG was refused: its label map was "a label without an image"."""
    city = nd.write_cityscapes(tmp_path / "city")
    images, labels = city.root / "leftImg8bit" / "train" / "aachen", city.root / "gtFine" / "val" / "frankfurt"
    (images / "aachen_000000_000019_leftImg8bit.png").rename(images / "aachen_000000_000019_leftImg8bit.PNG")
    (labels / "frankfurt_000000_000294_gtFine_labelIds.png").rename(
        labels / "frankfurt_000000_000294_gtFine_labelIds.Png")
    dataset = cityscapes.LAYOUT.open(city.root)
    assert {c.id: c.split for c in dataset.cases} == city.splits
    for case_id, data in read_all(dataset, tmp_path).items():
        np.testing.assert_array_equal(data.labels, city.labels[case_id])


def test_voc_label_values_outside_the_table_are_refused_on_read_and_scan(tmp_path: Path) -> None:
    written = nd.write_voc(tmp_path)
    bad = written.labels["2007_000039"].copy()
    bad[0, 0], bad[0, 1] = 21, 37
    label = written.root / "SegmentationClass" / "2007_000039.png"
    nd.write_png(label, bad, nd.voc_palette())
    dataset = voc.LAYOUT.open(written.root)  # open does not read label pixels
    message = refused(dataset.validate_labels, str(label))
    assert "21, 37" in message
    case = next(c for c in dataset.cases if c.id == "2007_000039")
    refused(lambda: dataset.read(case, tmp_path), str(label))
    dataset.read(dataset.cases[0], tmp_path)  # the other cases still read


# -- Cityscapes ----------------------------------------------------------------------------------------------

def test_cityscapes_classes_and_id_mapping() -> None:
    classes = cityscapes.cityscapes_classes()
    assert [c.value for c in classes] == list(range(19))
    assert (classes[0].name, classes[0].color) == ("road", (128, 64, 128))
    assert (classes[13].name, classes[13].color) == ("car", (0, 0, 142))
    assert (classes[10].name, classes[18].name) == ("sky", "bicycle")
    assert len({c.color for c in classes}) == 19
    lookup, known = cityscapes.train_id_lookup()
    assert (lookup[7], lookup[26], lookup[0], lookup[24], lookup[33]) == (0, 13, 255, 11, 18)
    assert lookup[9] == 255 and lookup[29] == 255  # parking, caravan: labelled but not trained
    assert known[:34].all() and known[255] and not known[34:255].any()  # 255 is the license plate's -1


def test_cityscapes_detects_reads_train_ids_and_marks_test(tmp_path: Path) -> None:
    written = nd.write_cityscapes(tmp_path)
    assert cityscapes.LAYOUT.detect(written.root) and not cityscapes.LAYOUT.detect(tmp_path)
    dataset = cityscapes.LAYOUT.open(written.root)
    assert (dataset.layout, dataset.ignore_index, dataset.channels) == ("cityscapes", 255, 3)
    assert {c.id: c.split for c in dataset.cases} == written.splits
    for case_id, data in read_all(dataset, tmp_path).items():
        assert data.image.shape == (3, nd.H, nd.W) and data.image.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, written.labels[case_id])
    test_case = next(c for c in dataset.cases if c.split == "test")
    assert (dataset.read(test_case, tmp_path).labels == 255).all()
    road_and_car = dataset.read(dataset.cases[0], tmp_path).labels
    assert (road_and_car[24, 0], road_and_car[15, 5], road_and_car[15, 25], road_and_car[28, 5]) == (0, 2, 13, 255)
    dataset.validate_labels()


def test_cityscapes_test_split_without_gtfine_reads_as_ignore(tmp_path: Path) -> None:
    written = nd.write_cityscapes(tmp_path, test_labels=False)
    dataset = cityscapes.LAYOUT.open(written.root)
    test_case = next(c for c in dataset.cases if c.split == "test")
    assert test_case.labels is None
    assert (dataset.read(test_case, tmp_path).labels == 255).all()


@pytest.mark.parametrize("fault", ["no gtFine/val", "image without label", "label without image", "size mismatch"])
def test_cityscapes_malformed_layouts_name_the_file(tmp_path: Path, fault: str) -> None:
    root = nd.write_cityscapes(tmp_path).root
    gt_train = root / "gtFine" / "train" / "aachen"
    if fault == "no gtFine/val":
        shutil.rmtree(root / "gtFine" / "val")
        needle = str(root / "gtFine" / "val")
    elif fault == "image without label":
        (gt_train / "aachen_000000_000019_gtFine_labelIds.png").unlink()
        needle = str(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    elif fault == "label without image":
        orphan = gt_train / "aachen_000001_000042_gtFine_labelIds.png"
        nd.write_png(orphan, np.full((nd.H, nd.W), 7, np.uint8))
        needle = str(orphan)
    else:
        label = gt_train / "aachen_000000_000019_gtFine_labelIds.png"
        nd.write_png(label, np.full((nd.H - 1, nd.W), 7, np.uint8))
        needle = str(label)
    refused(lambda: cityscapes.LAYOUT.open(root), needle)


def test_cityscapes_label_ids_outside_the_table_are_refused(tmp_path: Path) -> None:
    root = nd.write_cityscapes(tmp_path).root
    label = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    ids = np.full((nd.H, nd.W), 7, np.uint8)
    ids[0, :3] = 40
    nd.write_png(label, ids)
    dataset = cityscapes.LAYOUT.open(root)
    assert "40" in refused(dataset.validate_labels, str(label))
    case = next(c for c in dataset.cases if c.split == "val")
    refused(lambda: dataset.read(case, tmp_path), str(label))


# -- MS COCO -------------------------------------------------------------------------------------------------

def test_coco_detects_folders_and_json_files_by_name(tmp_path: Path) -> None:
    root = nd.write_coco(tmp_path).root
    assert coco.LAYOUT.detect(root) and coco.LAYOUT.detect(root / "annotations" / "instances_val2017.json")
    assert not coco.LAYOUT.detect(root / "annotations" / "captions_val2017.json")
    assert not coco.LAYOUT.detect(root / "val2017") and not coco.LAYOUT.detect(tmp_path)


def test_coco_folder_reads_polygons_rle_and_crowd(tmp_path: Path) -> None:
    written = nd.write_coco(tmp_path)
    dataset = coco.LAYOUT.open(written.root)
    assert (dataset.layout, dataset.kind, dataset.name, dataset.root) == ("coco", "instances", "coco", written.root)
    assert [(c.value, c.name) for c in dataset.classes] == [(0, "background"), (1, "person"), (2, "car"),
                                                            (3, "dog")]
    assert dataset.classes[0].color == (0, 0, 0) and len({c.color for c in dataset.classes}) == 4
    assert {c.id: c.split for c in dataset.cases} == written.splits
    for case_id, data in read_all(dataset, tmp_path).items():
        assert data.image.shape == (3, nd.H, nd.W) and data.image.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, written.labels[case_id])
    labels = {c.id: dataset.read(c, tmp_path).labels for c in dataset.cases}
    assert labels["000000000009"][10, 12] == 3  # the small dog listed first still lies on the large person
    assert labels["000000000025"][0, 0] == 255 and labels["000000000025"][15, 5] == 1  # crowd, person on it
    dataset.validate_labels()


def test_coco_rectangle_polygons_cover_exactly_their_pixels(tmp_path: Path) -> None:
    """A polygon x0..x1, y0..y1 covers pixel columns x0..x1-1 and rows y0..y1-1: no pixel is ambiguous."""
    shape = cocomasks.Shape(1, 2, False, nd.polygon((3, 4, 13, 9)))
    labels = cocomasks.paint([shape], nd.H, nd.W, tmp_path / "x.json")
    expected = np.zeros((nd.H, nd.W), np.uint8)
    expected[4:9, 3:13] = 2
    np.testing.assert_array_equal(labels, expected)


def test_coco_json_file_opens_its_split_alone(tmp_path: Path) -> None:
    written = nd.write_coco(tmp_path)
    dataset = coco.LAYOUT.open(written.root / "annotations" / "instances_val2017.json")
    assert dataset.name == "instances_val2017" and dataset.root == written.root
    assert [(c.id, c.split) for c in dataset.cases] == [("000000000139", "val"), ("000000000285", "val")]
    np.testing.assert_array_equal(dataset.read(dataset.cases[0], tmp_path).labels, written.labels["000000000139"])


def test_coco_palette_is_distinct_and_deterministic() -> None:
    colours = coco.distinct_colours(255)
    assert len(set(colours)) == 255 and colours == coco.distinct_colours(255) and colours[0] == (0, 0, 0)


VAL = Path("annotations") / "instances_val2017.json"


def _add_category(data: dict) -> None:
    data["categories"].append({"id": 99, "name": "unicorn"})


def _crowd_only_category(data: dict) -> None:
    data["categories"].append({"id": 98, "name": "crowd"})
    data["annotations"].append({**data["annotations"][0], "id": 9998, "category_id": 98, "iscrowd": 1})


def _box_only_category(data: dict) -> None:
    data["categories"].append({"id": 97, "name": "boxed"})
    data["annotations"].append({**data["annotations"][0], "id": 9997, "category_id": 97, "segmentation": []})


def _same_name_twice(data: dict) -> None:
    data["categories"].append({"id": 77, "name": data["categories"][0]["name"]})


def _undeclared_category(data: dict) -> None:
    data["annotations"][0]["category_id"] = 42


def _unknown_image(data: dict) -> None:
    data["annotations"][0]["image_id"] = 123456


def _wrong_size(data: dict) -> None:
    data["images"][0]["width"] = 41


def _path_name(data: dict) -> None:
    data["images"][0]["file_name"] = "../train2017/000000000009.jpg"


@pytest.mark.parametrize("change, problem", [(_add_category, "category 99 'unicorn' has no annotations"),
                                             # these two trained as classes that never appear (probe, 2026-12-06)
                                             (_crowd_only_category, "category 98 'crowd' has no annotation that "
                                                                    "draws its class: only crowd regions"),
                                             (_box_only_category, "category 97 'boxed' has no annotation that "
                                                                  "draws its class"),
                                             (_undeclared_category, "category_id 42"),
                                             # had been blamed on the card, the JSON unnamed (probe, 2026-12-06)
                                             (_same_name_twice, "and 77 are both named "),
                                             (_unknown_image, "image_id 123456"),
                                             (_path_name, "not a file name or a relative path inside the "
                                                          "image folder")])
def test_coco_malformed_json_is_refused_naming_it(tmp_path: Path, change, problem: str) -> None:
    root = nd.write_coco(tmp_path).root
    nd.edit_json(root / VAL, change)
    assert problem in refused(lambda: coco.LAYOUT.open(root / VAL), str(root / VAL))
    refused(lambda: coco.LAYOUT.open(root), str(root / VAL))


def test_coco_file_names_in_subfolders_and_one_name_in_two_splits(tmp_path: Path) -> None:
    """Custom exports: ``file_name`` with a subfolder was refused ("not a plain file name"), and a train and a
    val picture of one name (different files) were refused as one image listed twice."""
    import json
    import shutil

    root = nd.write_coco(tmp_path).root
    val = json.loads((root / VAL).read_text())
    first = val["images"][0]["file_name"]
    (root / "val2017" / "day1").mkdir()
    shutil.move(str(root / "val2017" / first), root / "val2017" / "day1" / first)
    val["images"][0]["file_name"] = f"day1/{first}"
    (root / VAL).write_text(json.dumps(val))
    train_json = root / "annotations" / "instances_train2017.json"
    train = json.loads(train_json.read_text())
    other = train["images"][0]["file_name"]  # the same name, another picture, in the other split
    shutil.move(str(root / "train2017" / other), root / "train2017" / first)
    train["images"][0]["file_name"] = first
    train_json.write_text(json.dumps(train))
    dataset = coco.LAYOUT.open(root)
    paths = {c.images[0] for c in dataset.cases}
    assert root / "val2017" / "day1" / first in paths and root / "train2017" / first in paths
    assert len({c.id for c in dataset.cases}) == len(dataset.cases)


def _flat_polygon(data: dict) -> None:
    data["annotations"][0]["segmentation"] = data["annotations"][0]["segmentation"][0]  # [x1, y1, ...] unwrapped


def _odd_polygon(data: dict) -> None:
    data["annotations"][0]["segmentation"][0] = data["annotations"][0]["segmentation"][0][:-1]


@pytest.mark.parametrize("change, problem", [(_flat_polygon, "segmentation is not a list of polygons"),
                                             (_odd_polygon, "a polygon has an odd number of coordinates")])
def test_coco_malformed_polygons_are_refused_not_drawn_as_nothing(tmp_path: Path, change, problem: str) -> None:
    """A flat polygon list (a common hand-made mistake) drew no pixel: the object trained as background."""
    root = nd.write_coco(tmp_path).root
    nd.edit_json(root / VAL, change)
    dataset = coco.LAYOUT.open(root / VAL)
    case = next(c for c in dataset.cases if c.id.endswith("139"))
    assert f"annotation 2000: {problem}" in refused(lambda: dataset.read(case, tmp_path), str(root / VAL))


def test_coco_missing_or_resized_images_name_the_picture(tmp_path: Path) -> None:
    root = nd.write_coco(tmp_path).root
    nd.edit_json(root / VAL, _wrong_size)
    assert "41x30" in refused(lambda: coco.LAYOUT.open(root), str(root / "val2017" / "000000000139.jpg"))
    (root / "val2017" / "000000000139.jpg").unlink()
    refused(lambda: coco.LAYOUT.open(root), str(root / "val2017" / "000000000139.jpg"))
    shutil.rmtree(root / "val2017")
    refused(lambda: coco.LAYOUT.open(root), str(root / "val2017"))


def test_coco_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Saved from Notepad or PowerShell: refused as "is not valid JSON: Unexpected UTF-8 BOM"."""
    root = nd.write_coco(tmp_path).root
    before = {c.id: c.split for c in coco.LAYOUT.open(root).cases}
    (root / VAL).write_bytes(b"\xef\xbb\xbf" + (root / VAL).read_bytes())
    assert {c.id: c.split for c in coco.LAYOUT.open(root).cases} == before
    assert coco.LAYOUT.open(root / VAL).cases


def test_coco_broken_files_are_refused(tmp_path: Path) -> None:
    root = nd.write_coco(tmp_path).root
    (root / VAL).write_text("{not json")
    refused(lambda: coco.LAYOUT.open(root / VAL), str(root / VAL), CorruptInputError)
    (root / VAL).write_text(json.dumps({"images": []}))
    refused(lambda: coco.LAYOUT.open(root / VAL), str(root / VAL))


def test_coco_rle_of_the_wrong_size_is_refused_when_read(tmp_path: Path) -> None:
    root = nd.write_coco(tmp_path).root
    rle = nd.uncompressed_rle(np.ones((nd.H, nd.W + 2), bool))
    nd.edit_json(root / VAL, lambda data: data["annotations"][1].update(segmentation=rle))
    dataset = coco.LAYOUT.open(root / VAL)
    assert "RLE size" in refused(dataset.validate_labels, str(root / VAL))
    refused(lambda: dataset.read(dataset.cases[0], tmp_path), str(root / VAL))


@pytest.mark.parametrize("counts", ["zzzzzzzzzzzz", "0", "1N", "P"])
def test_coco_compressed_rle_that_does_not_cover_its_image_is_refused(tmp_path: Path, counts: str) -> None:
    """A compressed RLE string was handed to pycocotools unchecked: runs short of the image left the mask's tail
    as whatever memory held (a class mask that changed from run to run), runs past it write beyond it.  The
    string's runs are read as pycocotools reads them and must add up to the image (research-group probe)."""
    from pycocotools import mask as coco_mask

    root = nd.write_coco(tmp_path).root
    size = [nd.H, nd.W]
    nd.edit_json(root / VAL, lambda data: data["annotations"][1].update(segmentation={"size": size, "counts": counts}))
    dataset = coco.LAYOUT.open(root / VAL)
    assert f"RLE counts do not cover its {nd.H}x{nd.W} image" in refused(dataset.validate_labels, str(root / VAL))
    # and a true compressed RLE (pycocotools' own) of the image still reads, to its pixels
    truth = np.zeros((nd.H, nd.W), np.uint8)
    truth[3:9, 4:20] = 1
    good = coco_mask.encode(np.asfortranarray(truth))
    assert cocomasks.compressed_counts(good["counts"]) is not None
    nd.edit_json(root / VAL, lambda data: data["annotations"][1].update(
        segmentation={"size": size, "counts": good["counts"].decode()}))
    dataset = coco.LAYOUT.open(root / VAL)
    dataset.validate_labels()


def test_coco_panoptic_segments_crowd_and_unlabelled(tmp_path: Path) -> None:
    written = nd.write_coco_panoptic(tmp_path)
    source = written.root / "annotations" / "panoptic_val2017.json"
    assert coco.LAYOUT.detect(written.root) and coco.LAYOUT.detect(source)
    for path in (written.root, source):
        dataset = coco.LAYOUT.open(path)
        assert dataset.kind == "panoptic"
        assert [c.name for c in dataset.classes] == ["background", "person", "car", "sky-other-merged"]
        # the dataset's own colours and ids (a generated palette had replaced them, the ids were lost)
        assert [(c.color, c.code) for c in dataset.classes[1:]] == \
            [((220, 20, 60), "COCO:1"), ((0, 0, 142), "COCO:3"), ((106, 154, 176), "COCO:187")]
        assert {c.id: c.split for c in dataset.cases} == written.splits
        for case_id, data in read_all(dataset, tmp_path).items():
            np.testing.assert_array_equal(data.labels, written.labels[case_id])
    first = dataset.read(dataset.cases[0], tmp_path).labels
    assert first[29, 0] == 255 and first[0, 0] == 3  # id 0 "unlabelled" is ignore, not background


@pytest.mark.parametrize("fault", ["no PNG folder", "image without PNG", "PNG without image", "unknown segment"])
def test_coco_panoptic_malformed_names_the_file(tmp_path: Path, fault: str) -> None:
    root = nd.write_coco_panoptic(tmp_path).root
    pngs = root / "annotations" / "panoptic_val2017"
    if fault == "no PNG folder":
        shutil.rmtree(pngs)
        refused(lambda: coco.LAYOUT.open(root), str(pngs))
    elif fault == "image without PNG":
        (pngs / "000000000724.png").unlink()
        refused(lambda: coco.LAYOUT.open(root), str(root / "val2017" / "000000000724.jpg"))
    elif fault == "PNG without image":
        shutil.copy(pngs / "000000000724.png", pngs / "000000000999.png")
        refused(lambda: coco.LAYOUT.open(root), str(pngs / "000000000999.png"))
    else:
        rgb = np.asarray(Image.open(pngs / "000000000724.png")).copy()
        rgb[0, 0] = (9, 9, 0)
        Image.fromarray(rgb).save(pngs / "000000000724.png")
        dataset = coco.LAYOUT.open(root)
        assert "2313" in refused(dataset.validate_labels, str(pngs / "000000000724.png"))


# -- the registry --------------------------------------------------------------------------------------------

def test_open_dataset_recognises_each_layout(tmp_path: Path) -> None:
    pytest.importorskip("storage.datasets.decathlon", reason="the decathlon layout is not written yet")
    pytest.importorskip("storage.datasets.geolabels", reason="the geolabels layout is not written yet")
    from storage.datasets import open_dataset

    for writer, layout in [(nd.write_voc, "voc"), (nd.write_cityscapes, "cityscapes"), (nd.write_coco, "coco"),
                           (nd.write_coco_panoptic, "coco")]:
        root = writer(tmp_path / layout).root
        assert open_dataset(root).layout == layout
    assert open_dataset(tmp_path / "coco" / "coco" / VAL).layout == "coco"


def test_a_folder_in_no_layout_is_refused_saying_what_each_layout_holds(tmp_path: Path) -> None:
    """The one line lists each layout with the folders it is recognised by, so a user can see what is missing."""
    from storage.datasets import layouts, open_dataset

    (tmp_path / "scene.tif").write_bytes(b"x")
    (tmp_path / "scene.truth.tif").write_bytes(b"x")
    with pytest.raises(InvalidInputError) as err:
        open_dataset(tmp_path)
    text = str(err.value)
    assert text.startswith(f"{tmp_path}: not a dataset layout segflow knows: voc (JPEGImages/ and ")
    assert all(layout.holds and f"{layout.name} ({layout.holds})" in text for layout in layouts())


def test_the_folder_a_dataset_unpacks_into_names_the_dataset_inside_it(tmp_path: Path) -> None:
    """The folder a VOC tarball unpacks to holds VOCdevkit/, the dataset: "not a dataset layout" had named nothing
    to give instead.  A COCO JSON under another name (a CVAT or Roboflow export) gets COCO's own refusal."""
    from storage.datasets import open_dataset

    nd.write_voc(tmp_path / "unpacked", devkit=True)
    with pytest.raises(InvalidInputError) as err:
        open_dataset(tmp_path / "unpacked")
    assert str(err.value).endswith("; its folder VOCdevkit/ is a voc dataset: give that folder"), str(err.value)
    exported = tmp_path / "_annotations.coco.json"
    exported.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(InvalidInputError, match=r"is not named instances_<split>\.json or panoptic_<split>\.json"):
        open_dataset(exported)


@pytest.mark.parametrize("layout", ["voc", "cityscapes", "coco panoptic"])  # COCO instances list no folder
def test_mac_metadata_files_beside_the_pictures_are_skipped(tmp_path: Path, layout: str) -> None:
    """A dataset copied from a Mac holds ``._<name>`` AppleDouble files beside every picture: Cityscapes refused
    ``._aachen_..._leftImg8bit.png`` as not a readable PNG, VOC and COCO panoptic ``._<id>.png`` as a label
    without an image.  Hidden files are no part of a dataset."""
    write, module = {"voc": (nd.write_voc, voc), "cityscapes": (nd.write_cityscapes, cityscapes),
                     "coco panoptic": (nd.write_coco_panoptic, coco)}[layout]
    written = write(tmp_path)
    # VOC: class maps painted on a Mac, beside photographs from elsewhere (a ._<id>.jpg would pair with ._<id>.png)
    added = nd.add_mac_metadata(written.root / "SegmentationClass" if layout == "voc" else written.root)
    assert any(p.name.endswith(".png") for p in added)
    dataset = module.LAYOUT.open(written.root)
    assert {c.id: c.split for c in dataset.cases} == written.splits
    for case_id, data in read_all(dataset, tmp_path).items():
        np.testing.assert_array_equal(data.labels, written.labels[case_id])
    dataset.validate_labels()
