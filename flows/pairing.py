"""Which truth scores which prediction: by the order given, or by case name in one ``--truth`` folder.

A file's case name is its name less its format suffix (.tif, .tiff, .vrt,
.png, .nii, .nii.gz, .hdr, .img, .zarr) and less a trailing ``.labels`` or
``.truth``, so that ``OUT/<stem>.tif``, ``<stem>.labels.tif``,
``<stem>.truth.tif`` and ``<stem>.nii.gz`` all match ``DIR/<stem>.*``; each
prediction must match exactly one file there, where a name marked ``.labels``
or ``.truth`` wins over an unmarked one (the image itself, when images and
truths share a folder, as the demo's do).  The datasets' own names pair too:
Cityscapes' ``<city>_<seq>_<frame>_leftImg8bit`` prediction with its
``..._gtFine_labelIds.png``, and an nnU-Net prediction named by its image file,
``<case>_0000``, with ``labelsTr/<case>.*`` when no truth bears the channel
suffix.
"""

from __future__ import annotations

import re
from pathlib import Path

from storage.errors import ConfigError, SegflowError, UnsupportedFormatError
from storage.inputfiles import DICOM_SUFFIXES, stem_of
from storage.labelmaps import ANNOTATION_SUFFIXES, RASTER_SUFFIXES, VOLUME_SUFFIXES, not_a_label_map

__all__ = ["LABEL_MARKS", "case_name", "match_inputs", "pair_inputs"]

LABEL_MARKS = (".labels", ".truth", ".seg", "_gtFine_labelIds")  # name marks of a label map, dropped when pairing
IMAGE_MARKS = ("_leftImg8bit",)  # a Cityscapes image's mark, which its prediction keeps
_CHANNEL = re.compile(r"^(?P<case>.+)_\d{4}$")  # nnU-Net's <case>_0000: the image file a prediction is named by


def case_name(path: Path) -> str:
    """The name a file is paired by: less its format suffix and a trailing :data:`LABEL_MARKS` mark."""
    stem = stem_of(path)
    for mark in LABEL_MARKS + IMAGE_MARKS:
        if stem.endswith(mark):
            return stem[:-len(mark)]
    return stem


def match_inputs(predictions: list[Path], truths: list[Path]) -> list[tuple[Path, Path | None, SegflowError | None]]:
    """(prediction, truth, None) by order, or by case name when ``truths`` is one folder (not a store); a
    prediction the folder has no one truth for is (prediction, None, the error), so that the others are still
    scored.  Unequal counts given in order are one error for the run: no pairing is to be guessed."""
    for p in predictions:  # a folder of outputs given as one prediction had been "no truth named <folder>.*"
        if p.is_dir() and not p.name.lower().endswith(".zarr"):
            raise ConfigError(p, "is a folder: give the label maps in it (e.g. FOLDER/*.tif or FOLDER/*.nii.gz)")
    folders = [t for t in truths if t.is_dir() and not t.name.lower().endswith(".zarr")]
    if len(truths) == 1 and folders:
        return _in_folder(predictions, truths[0])
    if folders:  # it had been refused in words about segment's inputs ("a folder holding no DICOM files")
        raise ConfigError(folders[0], "is a folder, and a --truth folder must be the only --truth (its files pair "
                                      "with the predictions by name); otherwise give one truth file per prediction")
    if len(truths) != len(predictions):
        raise ConfigError(None, f"{_count(len(predictions), 'prediction')} but {_count(len(truths), 'truth')}: "
                                "give one --truth per prediction, in the same order, or one --truth folder")
    return [(p, t, ConfigError(p, "is given as its own truth") if _same_file(p, t) else None)
            for p, t in zip(predictions, truths)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _in_folder(predictions: list[Path], folder: Path) -> list[tuple[Path, Path | None, SegflowError | None]]:
    index: dict[str, list[Path]] = {}
    dicom: dict[str, list[Path]] = {}  # a SEG named by its case, taken (and refused in words) only where no map is
    unread: dict[str, list[Path]] = {}  # a vector layer or COCO JSON named by its case: refused in words
    for f in sorted(folder.iterdir()):
        if not f.name.startswith(".") and f.name.lower().endswith((*RASTER_SUFFIXES, *VOLUME_SUFFIXES, ".zarr")):
            index.setdefault(case_name(f), []).append(f)
        elif not f.name.startswith(".") and f.name.lower().endswith(DICOM_SUFFIXES):
            dicom.setdefault(case_name(f), []).append(f)
        elif not f.name.startswith(".") and f.name.lower().endswith(ANNOTATION_SUFFIXES):
            unread.setdefault(case_name(f), []).append(f)
    for found in index.values():  # an Analyze/NIfTI pair is one map, named by its header
        headers = {stem_of(f) for f in found if f.name.lower().endswith((".hdr", ".hdr.gz"))}
        found[:] = [f for f in found if not (f.name.lower().endswith((".img", ".img.gz"))
                                             and stem_of(f) in headers)]
    matches: list[tuple[Path, Path | None, SegflowError | None]] = []
    for p in predictions:
        name = case_name(p)
        channel = _CHANNEL.match(name)
        if name not in index and channel is not None:  # img-4_0000.tif: labelsTr/img-4.png
            name = channel["case"]
        found = index.get(name) or dicom.get(name, [])
        itself = [f for f in found if _same_file(f, p)]  # predictions kept beside their truths: never its own
        found = [f for f in found if f not in itself]
        marked = [f for f in found if stem_of(f) != case_name(f)]
        if len(found) > 1 and len(marked) == 1:  # scene.tif beside scene.truth.tif: the image and its truth
            found = marked
        if not found and not itself and (refused := _unread(unread.get(name, []))) is not None:
            matches.append((p, None, refused))
        elif len(found) != 1:
            names = ", ".join(f.name for f in found)
            what = f"{len(found)} truths ({names}) match" if found else "no truth named"
            besides = " besides the prediction itself" if itself and not found else ""
            matches.append((p, None, ConfigError(p, f"{what} {case_name(p)}.* in {folder}{besides}")))
        else:
            matches.append((p, found[0], None))
    return matches


def _unread(candidates: list[Path]) -> SegflowError | None:
    """The error for a case whose only truths are of a kind evaluate does not read: what the first one is, in
    words (tile_3.geojson beside no label raster had been "no truth named tile_3.*")."""
    for f in candidates:
        if (reason := not_a_label_map(f)) is not None:
            return UnsupportedFormatError(f, reason)
    return None


def pair_inputs(predictions: list[Path], truths: list[Path]) -> list[tuple[Path, Path]]:
    """(prediction, truth) pairs as :func:`match_inputs` finds them; the first prediction without one is an error."""
    pairs = []
    for p, t, error in match_inputs(predictions, truths):
        if error is not None or t is None:
            raise error or ConfigError(p, "no truth")
        pairs.append((p, t))
    return pairs
