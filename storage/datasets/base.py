"""What every training dataset layout gives: cases, a label table, and arrays read lazily.

People keep labelled data in a handful of layouts (Pascal VOC, Cityscapes,
MS COCO, the Medical Segmentation Decathlon / nnU-Net, a raster with a label
raster or a vector layer).  Each layout module recognises its own folder
(``detect``) and describes it as a :class:`Dataset`: the cases with their
files and splits, the classes with names and colours from the dataset's own
label table, and the ignore value.  Pixels are read only when a case is
opened (:meth:`Dataset.read`), as array-likes that training slices patch by
patch: large rasters and volumes come from zarr stores ingested into a work
folder, so a 20000² scene trains in the memory of a small one.  Label values
always arrive contiguous (0..n-1, the dataset's own ids mapped) with
``ignore_index`` where a pixel carries no label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from storage import jsontext
from storage.classes import LabelClass

IGNORE = 255  # the ignore value every layout maps its "no label" pixels to


@dataclass(frozen=True)
class Case:
    """One image and its labels as files.

    ``images``: the files whose channels stack in this order (usually one;
    nnU-Net keeps one file per channel, ``_0000``, ``_0001`` ...).
    ``labels``: the label file, or None where labels are drawn from
    annotations (COCO polygons, a vector layer); ``annotation`` then says
    which (layout-specific and opaque to callers).
    ``split``: "train", "val" or "test" as the dataset itself declares, None
    where it declares none.
    """

    id: str
    images: tuple[Path, ...]
    labels: Path | None
    split: str | None = None
    annotation: Any = None


@dataclass
class CaseData:
    """A case's pixels, as array-likes (numpy or zarr) sliced patch by patch.

    ``image`` is (C, *spatial); ``labels`` is (*spatial), integer, with values
    in 0..n-1 or the dataset's ``ignore_index``.  ``spacing`` is the pixel or
    voxel size per spatial axis (mm or metres; 1.0 where the format has none),
    for surface distances.  ``geometry``: the image store's geometry where the
    image was ingested (a raster's CRS and transform, a volume's affine).
    """

    image: Any
    labels: Any
    spacing: tuple[float, ...]
    geometry: Any = None
    store: Any = None  # the ingested image store (rasters): training reads its bands as segment does


class Dataset(Protocol):
    """A recognised dataset; built by a layout module's ``open_dataset(root)``."""

    layout: str  # "voc", "cityscapes", "coco", "decathlon", "geo"
    name: str
    root: Path
    classes: list[LabelClass]
    ignore_index: int | None
    cases: list[Case]
    spatial_dims: int
    channels: int

    def read(self, case: Case, work: Path) -> CaseData:
        """The case's pixels; ``work`` is a folder for ingested zarr stores (removed by the caller)."""
        ...


@dataclass
class Layout:
    """A dataset layout as the registry knows it: its name, how to recognise it, how to open it."""

    name: str
    detect: Any  # (root: Path) -> bool, cheap: looks at names only
    open: Any  # (root: Path) -> Dataset, validates, raises InvalidInputError naming the file
    holds: str = ""  # what the folder holds, for the error when no layout is recognised


def fingerprint(root: Path, files: Iterable[Path], *, mtimes: bool = False) -> str:
    """sha256 over the sorted relative paths and byte sizes of ``files``: what a card records as the
    dataset's identity (cheap for large datasets: contents are not read, so a file edited in place at the same
    size, an uncompressed label raster, keeps it).  ``mtimes`` adds each file's modification time: the key a
    resume is checked against, which such an edit changes (a resume had carried on with other labels)."""
    h = hashlib.sha256()
    rows = sorted((str(Path(f).relative_to(root)), Path(f).stat()) for f in files)
    for rel, st in rows:
        h.update((f"{rel}\t{st.st_size}" + (f"\t{st.st_mtime_ns}" if mtimes else "") + "\n").encode())
    return h.hexdigest()


def read_json(path: Path, limit: int | None = None) -> Any:
    """A dataset's JSON (dataset.json, a COCO annotation file, classes.json) as :func:`storage.jsontext.read`
    reads it, but with a UTF-8 byte-order mark accepted: Windows tools (Notepad, PowerShell) save one, and such a
    file had been refused as "not valid JSON"."""
    path, limit = Path(path), jsontext.MAX_BYTES if limit is None else limit
    size = path.stat().st_size
    if size > limit:
        raise json.JSONDecodeError(f"{size:,} bytes, more than the {limit:,} such a document may hold", "", 0)
    return jsontext.loads(path.read_text(encoding="utf-8-sig"))


def safe_id(text: str) -> str:
    """A case id read from a file or a folder name, made safe to use in a file name."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip("._")
    return out[:120] or "case"


@dataclass
class SplitCounts:
    """How many cases fall in each split (reported when a dataset is recognised)."""

    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, cases: Iterable[Case]) -> "SplitCounts":
        out: dict[str, int] = {}
        for c in cases:
            out[c.split or "unsplit"] = out.get(c.split or "unsplit", 0) + 1
        return cls(out)

    def __str__(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))


__all__ = ["Case", "CaseData", "Dataset", "IGNORE", "Layout", "SplitCounts", "fingerprint", "read_json", "safe_id"]
