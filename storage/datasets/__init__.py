"""Training dataset layouts: recognise a folder (or a COCO JSON) and open it as a :class:`Dataset`.

See :mod:`storage.datasets.base` for what every layout gives.  Layouts are
tried in a fixed order; the first whose ``detect`` says yes opens the path.
"""

from __future__ import annotations

from pathlib import Path

from storage.datasets.base import IGNORE, Case, CaseData, Dataset, Layout, SplitCounts, fingerprint, safe_id
from storage.errors import InvalidInputError


def layouts() -> list[Layout]:
    """Every known layout, in the order they are tried (imported here so each module stays on its own)."""
    from storage.datasets import cityscapes, coco, decathlon, geolabels, voc

    return [voc.LAYOUT, cityscapes.LAYOUT, coco.LAYOUT, decathlon.LAYOUT, geolabels.LAYOUT]


def open_dataset(path: str | Path) -> Dataset:
    """The dataset at ``path``, in whichever layout it is; one clear line when it is none of them."""
    root = Path(path)
    if not root.exists():
        raise InvalidInputError(root, "no such dataset folder or file")
    known = layouts()
    for layout in known:
        if layout.detect(root):
            return _ids_once(layout.open(root))
    if root.is_file() and root.name.lower().endswith(".json"):  # a COCO JSON by another name: COCO's own words
        from storage.datasets import coco

        return _ids_once(coco.open_coco(root))
    names = "; ".join(f"{layout.name} ({layout.holds})" for layout in known)
    inside = _layout_inside(root, known)
    hint = "" if inside is None else f"; its folder {inside[0].name}/ is a {inside[1]} dataset: give that folder"
    raise InvalidInputError(root, f"not a dataset layout segflow knows: {names}{hint}")


def _layout_inside(root: Path, known: list[Layout]) -> tuple[Path, str] | None:
    """A folder just inside ``root`` that is a dataset (the folder a VOC tarball unpacks to holds VOCdevkit/,
    which is the dataset): the refusal had named nothing to give instead."""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    for child in children[:50]:
        for layout in known:
            try:
                if layout.detect(child):
                    return child, layout.name
            except OSError:
                continue
    return None


def _ids_once(dataset: Dataset) -> Dataset:
    """Refuse two cases whose names make one case id (``case 000`` and ``case_000``): the card's recorded split
    names cases by id, and had listed ``case_000`` in training and in validation, which read as leakage."""
    seen: dict[str, Case] = {}
    for case in dataset.cases:
        other = seen.setdefault(case.id, case)
        if other is not case:
            mine = case.images[0] if case.images else case.labels or dataset.root
            theirs = other.images[0] if other.images else other.labels or dataset.root
            raise InvalidInputError(mine, f"becomes case id {case.id!r}, as {Path(theirs).name} does (names are "
                                          "made safe for file names); rename one")
    return dataset


__all__ = ["Case", "CaseData", "Dataset", "IGNORE", "Layout", "SplitCounts", "fingerprint", "layouts",
           "open_dataset", "safe_id"]
