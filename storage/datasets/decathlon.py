"""Medical Segmentation Decathlon and nnU-Net v2 folders as a :class:`Dataset`.

Both keep ``dataset.json`` beside ``imagesTr/`` and ``labelsTr/`` but describe
them differently.  nnU-Net v2 names channels (``channel_names``), maps class
names to values (``labels`` {"background": 0, ...}) and finds cases by file
name: one NIfTI per channel, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``,
and ``labelsTr/<case>.nii.gz``.  The original Decathlon (and nnU-Net v1) maps
values to names (``labels`` {"0": "background"}), names modalities and lists
its cases (``training``), one NIfTI per case whose fourth axis holds the
channels.  ``imagesTs/`` (no labels) holds nothing to train on and is not
read.  Opening reads only the JSON and NIfTI headers, so a missing file, a
shape mismatch or a malformed table is reported before anything is ingested;
label values outside the table need the pixels and are found by
:meth:`DecathlonDataset.validate_labels` or when a patch meets them.  NIfTI
is read, and nnU-Net's 2-D pictures (``file_ending`` .png, .bmp, .tif:
:mod:`storage.datasets.nnunetpictures`); another ending (.nrrd, .mha) is
refused.  A dataset whose every case is one slice thick
(X x Y x 1, nnU-Net's way of keeping 2-D images in NIfTI) is 2-D: a 2-D
network trains on the slices' plane, on their own pixel grid.  Class values become contiguous (0..n-1, in the
order of the dataset's values); the dataset's own values stay in ``table``.

A case is ingested into zarr stores under the caller's work folder and read
patch by patch, label values mapped to contiguous classes one patch at a
time (:mod:`storage.datasets.arrays`, shared with :mod:`geolabels`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from storage.classes import LabelClass
from storage.datasets.base import IGNORE, Case, CaseData, Layout, read_json, safe_id
from storage.errors import CorruptInputError, InvalidInputError
from storage.geometry import VolumeGeometry, same_affine
from storage.inputfiles import stem_of
from storage.layout import ImageStore
from storage.datasets import nnunetpictures
from storage.datasets.arrays import (ChannelStack, LabelArray, LabelTable, OneSlice, count_classes, ingested,
                                     volume_spacing)
from storage.datasets.nnunetpictures import PICTURE_ENDINGS

NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# --------------------------------------------------------------------------- dataset.json


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidInputError(path, "missing: a Decathlon / nnU-Net dataset needs dataset.json beside imagesTr/")
    try:
        doc = read_json(path)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(path, f"cannot be read: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(path, "is not a JSON object")
    return doc


def _int(value: Any, where: Path, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInputError(where, f"{what} {value!r} is not an integer")
    try:
        number = int(value)
    except ValueError:
        raise InvalidInputError(where, f"{what} {value!r} is not an integer") from None
    if number < 0:
        raise InvalidInputError(where, f"{what} {number} is negative")
    return number


def _channel_names(doc: dict[str, Any], key: str, where: Path) -> list[str]:
    table = doc.get(key)
    if not isinstance(table, dict) or not table:
        raise InvalidInputError(where, f"'{key}' must be a non-empty object {{\"0\": \"T1\", ...}}")
    by_index = {_int(k, where, f"'{key}' key"): str(v) for k, v in table.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise InvalidInputError(where, f"'{key}' keys must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _nnunet_labels(doc: dict[str, Any], where: Path) -> LabelTable:
    labels = doc.get("labels")
    if "regions_class_order" in doc or (isinstance(labels, dict) and any(
            isinstance(v, (list, tuple)) for v in labels.values())):
        raise InvalidInputError(where, "uses nnU-Net region-based labels (a label is a list of values); "
                                       "segflow trains one class per value: give each class its own value")
    if not isinstance(labels, dict) or not labels:
        raise InvalidInputError(where, "'labels' must be a non-empty object {\"background\": 0, ...}")
    names: dict[int, str] = {}
    ignored: list[int] = []
    for name, value in labels.items():
        number = _int(value, where, f"label '{name}' value")
        if name == "ignore":  # nnU-Net v2's ignore label: pixels without annotation
            ignored.append(number)
        elif number in names:
            raise InvalidInputError(where, f"labels '{names[number]}' and '{name}' share the value {number}")
        else:
            names[number] = str(name)
    if not names:
        raise InvalidInputError(where, "'labels' names no class besides 'ignore'")
    return LabelTable.build(names, where, ignored=ignored)


def _msd_labels(doc: dict[str, Any], where: Path) -> LabelTable:
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InvalidInputError(where, "'labels' must be a non-empty object {\"0\": \"background\", ...}")
    if any(isinstance(v, (list, tuple, dict)) for v in labels.values()):
        raise InvalidInputError(where, "uses region-based labels (a label is a list of values); segflow trains "
                                       "one class per value")
    return LabelTable.build({_int(k, where, "label value"): str(v) for k, v in labels.items()}, where)


def _count_check(doc: dict[str, Any], found: int, where: Path) -> None:
    declared = doc.get("numTraining")
    if declared is not None and _int(declared, where, "numTraining") != found:
        raise InvalidInputError(where, f"numTraining is {declared} but {found} training cases were found")


def _visible_niftis(folder: Path, endings: tuple[str, ...] = NIFTI_ENDINGS) -> list[Path]:
    """The NIfTI (or other ``endings``) files of a folder, leaving out hidden ones (macOS ``._`` forks ship in
    the MSD archives)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name.lower().endswith(endings))


def _listed_file(entry: Any, folder: str, root: Path, where: Path) -> Path:
    """A path from the ``training`` list, allowed only as ``[./]<folder>/<file>``: never a way out of the root."""
    if not isinstance(entry, str) or "\\" in entry:
        raise InvalidInputError(where, f"training entry {entry!r} is not a path like ./{folder}/case.nii.gz")
    parts = [p for p in PurePosixPath(entry).parts if p != "."]
    if len(parts) != 2 or parts[0] != folder or parts[1].startswith(".") or entry.startswith("/"):
        raise InvalidInputError(where, f"training entry {entry!r} is not a path like ./{folder}/case.nii.gz")
    if not parts[1].lower().endswith(NIFTI_ENDINGS):
        raise InvalidInputError(where, f"training entry {entry!r} is not a NIfTI file (.nii.gz or .nii)")
    return root / folder / parts[1]


# --------------------------------------------------------------------------- headers


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """A NIfTI's shape and affine, from its header only."""
    import nibabel as nib

    if not path.is_file():
        raise InvalidInputError(path, "missing")
    try:
        img = nib.load(str(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise CorruptInputError(path, f"cannot read the NIfTI header: {str(exc).splitlines()[0][:200]}") from None


def _spatial_and_channels(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    spatial = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
    channels = 1
    for n in shape[3:]:
        channels *= n
    return spatial, channels


def _check_case(images: Sequence[Path], label: Path, channels_expected: int, per_file: bool) -> None:
    """Shapes and affines of one case's image files against its label file, from the headers."""
    label_shape, label_affine = _header(label)
    label_spatial, label_channels = _spatial_and_channels(label_shape)
    if label_channels != 1:
        raise InvalidInputError(label, f"label has shape {label_shape}; a label map has one value per voxel")
    if per_file and len(images) > 1:  # a channel off the others' grid is that channel's fault, not the label's
        first_shape, first_affine = _header(images[0])
        for image in images[1:]:
            shape, affine = _header(image)
            if shape != first_shape or not same_affine(affine, first_affine):
                what = f"shape {shape}" if shape != first_shape else "affine"
                raise InvalidInputError(image, f"{what} does not match the case's first channel file "
                                               f"{images[0].name}'s: its channels are not on one voxel grid")
    for image in images:
        _check_image(image, label, label_spatial, label_affine, channels_expected, per_file)


def _check_image(image: Path, label: Path, label_spatial: tuple[int, ...], label_affine: np.ndarray,
                 channels_expected: int, per_file: bool) -> None:
    shape, affine = _header(image)
    spatial, channels = _spatial_and_channels(shape)
    if per_file and channels != 1:
        raise InvalidInputError(image, f"has shape {shape}; nnU-Net keeps one channel per file (_0000, _0001 ...)")
    if not per_file and channels != channels_expected:
        raise InvalidInputError(image, f"has {channels} channel(s) (shape {shape}) but dataset.json names "
                                       f"{channels_expected} modalities")
    if spatial != label_spatial:
        raise InvalidInputError(label, f"label shape {label_spatial} does not match image {image.name} "
                                       f"shape {spatial}")
    if not same_affine(affine, label_affine):
        raise InvalidInputError(label, f"label affine does not match image {image.name}'s: the label is not on "
                                       "the image's voxel grid")


# --------------------------------------------------------------------------- the dataset


@dataclass
class DecathlonDataset:
    """An MSD or nnU-Net v2 training set; ``flavour`` says which dataset.json it had."""

    root: Path
    name: str
    flavour: str  # "nnunet-v2" or "msd"
    table: LabelTable
    channel_names: list[str]
    cases: list[Case]
    description: str | None = None
    layout: str = "decathlon"
    ignore_index: int | None = IGNORE
    spatial_dims: int = 3
    pictures: bool = False  # nnU-Net's 2-D pictures (.png ...): read whole, on their pixel grid
    classes: list[LabelClass] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = self.table.classes

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    def _label_array(self, case: Case, work: Path) -> tuple[LabelArray, list[ImageStore]]:
        if case.labels is None:
            raise ValueError(f"case {case.id} has no label file")
        if self.pictures:
            return LabelArray(nnunetpictures.case_labels(case.labels), self.table, case.labels), []
        stores = [ingested(p, work / f"{case.id}.image{k}.zarr") for k, p in enumerate(case.images)]
        label = ingested(case.labels, work / f"{case.id}.labels.zarr")
        if label.spatial_shape != stores[0].spatial_shape:
            raise InvalidInputError(case.labels, f"label shape {label.spatial_shape} does not match the image's "
                                                 f"{stores[0].spatial_shape}")
        masks = [s.mask for s in stores if s.mask is not None]
        return LabelArray(label.image, self.table, case.labels, masks), stores

    def read(self, case: Case, work: Path, *, check: bool = False) -> CaseData:
        """The case's arrays from stores ingested under ``work``.

        With ``check`` the whole label store is scanned for values outside
        the table first; without it (the default, no extra pass) a patch that
        meets such a value raises when it is read.
        """
        labels, stores = self._label_array(case, Path(work))
        if check:
            labels.validate()
        if self.pictures:
            return CaseData(image=nnunetpictures.case_image(case.images), labels=labels, spacing=(1.0, 1.0))
        image = stores[0].image if len(stores) == 1 else ChannelStack([s.image for s in stores])
        geometry = stores[0].meta.geometry
        spacing = volume_spacing(geometry) if isinstance(geometry, VolumeGeometry) else (1.0,) * 3
        if self.spatial_dims == 2:  # X x Y x 1 files: the plane (j, i), on its own pixel grid as a picture is
            return CaseData(image=OneSlice(image, 1), labels=OneSlice(labels, 0), spacing=spacing[1:])
        return CaseData(image=image, labels=labels, spacing=spacing, geometry=geometry)

    def validate_labels(self, work: Path | None = None) -> dict[int, int]:
        """Scan every case's labels chunk by chunk; raise naming the first file with values outside the
        table (and all of them), else return the voxel count of each class over the dataset.

        Without ``work`` the stores go to a temporary folder.
        """
        return count_classes(self.cases, lambda case, folder: self._label_array(case, folder)[0], work)


def _nnunet_cases(root: Path, doc: dict[str, Any], where: Path, channels: int) -> list[Case]:
    ending = doc.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or ending.lower() not in NIFTI_ENDINGS + PICTURE_ENDINGS:
        raise InvalidInputError(where, f"file_ending {ending!r} is not supported: segflow reads nnU-Net datasets "
                                       "stored as NIfTI (.nii.gz, .nii) or as 2-D pictures (.png, .bmp, .tif)")
    pictures = _pictures(doc)
    listed = (ending.lower(),) if pictures else NIFTI_ENDINGS
    if "dataset" in doc:
        raise InvalidInputError(where, "lists its files under 'dataset' (nnU-Net's explicit file list), which "
                                       "segflow does not read: keep the cases in imagesTr/ and labelsTr/")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    by_case: dict[str, dict[int, Path]] = {}
    for path in _visible_niftis(images_dir, listed):
        match = _CHANNEL_FILE.match(stem_of(path))
        if not path.name.endswith(ending):
            raise InvalidInputError(path, f"does not end in dataset.json's file_ending {ending!r}: fix file_ending "
                                          "or the files' names")
        if not match:
            raise InvalidInputError(path, f"image name is not <case>_<XXXX>{ending} (nnU-Net v2)")
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    others = [p.name for p in sorted(images_dir.iterdir()) if not p.name.startswith(".")] if not by_case else []
    if others:  # "numTraining is 4 but 0 training cases were found" had not said why
        more = f" and {len(others) - 1} more" if others[1:] else ""
        raise InvalidInputError(images_dir, f"holds no <case>_XXXX{ending} files (dataset.json's file_ending); "
                                            f"it holds {others[0]}{more}")
    labels = {path.name[: -len(ending)]: path for path in _visible_niftis(labels_dir, listed)
              if path.name.endswith(ending)}
    cases = []
    for name in sorted(by_case):
        files = by_case[name]
        label = labels.get(name)
        if label is None:
            raise InvalidInputError(files[min(files)], f"image without a label: labelsTr/{name}{ending} is missing"
                                    + _near_miss(labels_dir, name, ending))
        if pictures:  # an RGB picture holds three channels
            images = nnunetpictures.case_files(files, label, channels, images_dir, name, ending)
            cases.append(Case(id=safe_id(name), images=images, labels=label))
            continue
        for c in range(channels):
            if c not in files:
                raise InvalidInputError(images_dir / f"{name}_{c:04d}{ending}",
                                        f"missing channel {c} ({channels} channels in dataset.json)")
        extra = sorted(set(files) - set(range(channels)))
        if extra:
            raise InvalidInputError(files[extra[0]], f"channel {extra[0]} beyond the {channels} channels that "
                                                     "dataset.json names")
        images = tuple(files[c] for c in range(channels))
        _check_case(images, label, channels, per_file=True)
        cases.append(Case(id=safe_id(name), images=images, labels=label))
    for name, label in sorted(labels.items()):
        if name not in by_case:
            raise InvalidInputError(label, f"label without an image: imagesTr/{name}_0000{ending} is missing")
    _count_check(doc, len(cases), where)
    return cases


def _near_miss(folder: Path, name: str, ending: str) -> str:
    """The words naming a file of the case under another ending than dataset.json's ``file_ending`` (``(case_001.nii
    is there: ...)``), "" when there is none: "is missing" alone had hidden the file sitting right there."""
    try:
        others = sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{name}.") and p.name != name + ending)
    except OSError:
        return ""
    return f" ({others[0]} is there: dataset.json's file_ending is {ending})" if others else ""


def _msd_cases(root: Path, doc: dict[str, Any], where: Path, channels: int) -> list[Case]:
    training = doc.get("training")
    if not isinstance(training, list):
        raise InvalidInputError(where, "'training' must be a list of {\"image\": ..., \"label\": ...}")
    cases, used_images, used_labels = [], set(), set()
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InvalidInputError(where, f"training entry {str(entry)[:80]} lacks 'image' or 'label'")
        image = _listed_file(entry["image"], "imagesTr", root, where)
        label = _listed_file(entry["label"], "labelsTr", root, where)
        if not image.is_file():
            raise InvalidInputError(image, "missing (listed in dataset.json 'training')")
        if not label.is_file():
            raise InvalidInputError(image, f"image without a label: {label.name} (listed in dataset.json) is "
                                           "missing from labelsTr/")
        _check_case((image,), label, channels, per_file=False)
        used_images.add(image.name)
        used_labels.add(label.name)
        cases.append(Case(id=safe_id(stem_of(image)), images=(image,), labels=label))
    for path in _visible_niftis(root / "labelsTr"):
        if path.name not in used_labels:
            raise InvalidInputError(path, "label without an image: no dataset.json 'training' entry lists it")
    for path in _visible_niftis(root / "imagesTr"):
        if path.name not in used_images:
            raise InvalidInputError(path, "image without a label: no dataset.json 'training' entry lists it")
    if len({c.id for c in cases}) != len(cases):
        raise InvalidInputError(where, "'training' lists a case twice")
    _count_check(doc, len(cases), where)
    return sorted(cases, key=lambda c: c.id)


def detect(root: Path) -> bool:
    """A folder with imagesTr/ or labelsTr/, or with dataset.json and no geo images/ (open says what is missing)."""
    root = Path(root)
    return root.is_dir() and ((root / "imagesTr").is_dir() or (root / "labelsTr").is_dir()
                              or ((root / "dataset.json").is_file() and not (root / "images").is_dir()))


def open_decathlon(root: Path) -> DecathlonDataset:
    """Read dataset.json and every header; raise InvalidInputError naming the file for anything amiss."""
    root = Path(root)
    for folder in ("imagesTr", "labelsTr"):
        if not (root / folder).is_dir():
            raise InvalidInputError(root / folder, "missing: a Decathlon / nnU-Net dataset keeps its training "
                                                   "cases in imagesTr/ and labelsTr/")
    where = root / "dataset.json"
    doc = _load_json(where)
    if "channel_names" in doc:
        flavour, channel_names = "nnunet-v2", _channel_names(doc, "channel_names", where)
        table = _nnunet_labels(doc, where)
        cases = _nnunet_cases(root, doc, where, len(channel_names))
    elif "modality" in doc:
        flavour, channel_names = "msd", _channel_names(doc, "modality", where)
        table = _msd_labels(doc, where)
        cases = _msd_cases(root, doc, where, len(channel_names))
    else:
        raise InvalidInputError(where, "has neither 'channel_names' (nnU-Net v2) nor 'modality' (Decathlon)")
    if not cases:
        raise InvalidInputError(root / "imagesTr", "holds no training cases")
    name = doc.get("name")
    name = name.strip() if isinstance(name, str) and name.strip() else root.resolve().name
    description = doc.get("description") if isinstance(doc.get("description"), str) else None
    pictures = flavour == "nnunet-v2" and _pictures(doc)
    return DecathlonDataset(root=root, name=name, flavour=flavour, table=table, channel_names=channel_names,
                            cases=cases, description=description, pictures=pictures,
                            spatial_dims=2 if pictures else _spatial_dims(cases))


def _pictures(doc: dict[str, Any]) -> bool:
    """An nnU-Net v2 dataset of 2-D pictures (its ``file_ending`` .png, .bmp, .tif)."""
    return str(doc.get("file_ending")).lower() in PICTURE_ENDINGS


def _spatial_dims(cases: Sequence[Case]) -> int:
    """2 when every case is one slice thick (X x Y x 1, as nnU-Net stores 2-D images in NIfTI), else 3."""
    thin = [_spatial_and_channels(_header(case.labels)[0])[0][2] == 1 for case in cases if case.labels is not None]
    return 2 if thin and all(thin) else 3


LAYOUT = Layout(name="decathlon", detect=detect, open=open_decathlon, holds="dataset.json, imagesTr/ and labelsTr/")

__all__ = ["DecathlonDataset", "LAYOUT", "NIFTI_ENDINGS", "detect", "open_decathlon"]
