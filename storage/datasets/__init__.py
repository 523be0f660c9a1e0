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
            return layout.open(root)
    names = "; ".join(f"{layout.name} ({layout.holds})" for layout in known)
    raise InvalidInputError(root, f"not a dataset layout segflow knows: {names}")


__all__ = ["Case", "CaseData", "Dataset", "IGNORE", "Layout", "SplitCounts", "fingerprint", "layouts",
           "open_dataset", "safe_id"]
