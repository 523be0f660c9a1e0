"""Which of an input's bands a model takes, found by name.

A model is trained on named bands in one order (a card's
``input.channel_names``: ``blue, green, red, nir``); a scene offers its own
(``B01 … B12, B8A`` in a 13-band Sentinel-2 file, ``SR_B2 …`` in Landsat).
Feeding B2,B3,B4 to a model trained on B4,B3,B2 runs without a word and gives
wrong labels, so bands are matched by name: a GDAL band description, a STAC
common name, or a Sentinel-2 / Landsat 8-9 band id, each resolving to the
others through one table.  A user may name them instead (``--bands``: names or
1-based indices).  A band that cannot be found is refused before any work,
with the list of what the input offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

from storage.errors import IncompatibleInputError

# STAC eo common names and the band ids that carry them: Sentinel-2 (two digits) and Landsat 8/9 (one or two
# digits without padding, with or without the Collection 2 "SR_" prefix).
_COMMON = {
    "coastal": ("B01", "B1", "SR_B1"),
    "blue": ("B02", "B2", "SR_B2"),
    "green": ("B03", "B3", "SR_B3"),
    "red": ("B04", "B4", "SR_B4"),
    "rededge1": ("B05",),
    "rededge2": ("B06",),
    "rededge3": ("B07",),
    "nir": ("B08", "B8A", "B5", "SR_B5"),  # S2 B08 is "nir", S2 B8A and Landsat B5 "nir08"; both answer "nir"
    "nir08": ("B8A", "B5", "SR_B5"),
    "nir09": ("B09",),
    "cirrus": ("B10", "B9"),
    "swir16": ("B11", "B6", "SR_B6"),
    "swir22": ("B12", "B7", "SR_B7"),
    "pan": ("B8",),
    "lwir11": ("ST_B10",),
}


def _norm(name: str) -> str:
    return "".join(name.split()).lower()


def aliases(name: str) -> list[str]:
    """``name`` first, then every other name of the same band (common name and band ids), normalised."""
    key = _norm(name)
    out = [key]
    for common, ids in _COMMON.items():
        names = [common, *(_norm(i) for i in ids)]
        if key == common:
            out += names[1:]
        elif key in names[1:]:
            out.append(common)
    return list(dict.fromkeys(out))


def select_bands(wanted: Sequence[str | int], offered: Sequence[str | None], *,
                 where: str | PathLike[str] | None = None, model: str = "the model",
                 hint: str = "choose them with --bands (names or 1-based indices)") -> list[int]:
    """0-based indexes into ``offered`` for each of ``wanted`` (names, or 1-based ints), or one refusal.

    An exact name wins over an alias, so a file whose bands are called
    ``nir`` and ``B8A`` gives ``nir`` for "nir".
    """
    keys = [_norm(o) if o else None for o in offered]
    picked: list[int] = []
    missing: list[str] = []
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.strip().isdigit()):
            i = int(w) - 1
            if not 0 <= i < len(offered):
                missing.append(f"band {int(w)}")
            else:
                picked.append(i)
            continue
        found = None
        for name in aliases(str(w)):
            if name in keys:
                found = keys.index(name)
                break
        if found is None:
            missing.append(str(w))
        else:
            picked.append(found)
    if missing:
        shown = ", ".join(f"{i}:{o}" if o else f"{i}:(unnamed)" for i, o in enumerate(offered, 1))
        raise IncompatibleInputError(where, f"{model} needs {', '.join(missing)}, which the input does not offer "
                                            f"(it has {len(offered)} band(s): {shown}); {hint}")
    if len(set(picked)) != len(picked):
        raise IncompatibleInputError(where, f"{model}'s bands {list(wanted)} name one input band twice; {hint}")
    return picked


__all__ = ["aliases", "select_bands"]
