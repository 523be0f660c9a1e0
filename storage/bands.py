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

Units: an ingested raster records each band's GDAL scale and offset (from
the file, or a STAC item's ``raster:bands``); a card that declares
``input.units`` gets value * scale + offset ("reflectance"), or that times
its ``dn_scale`` ("dn"), as float32, lazily.  A card without units gets the
stored values exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np

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
    ambiguous: list[str] = []
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.strip().isdigit()):
            i = int(w) - 1
            if not 0 <= i < len(offered):
                missing.append(f"band {int(w)}" + (" (indices are 1-based)" if i < 0 else ""))
            else:
                picked.append(i)
            continue
        found = None
        for name in aliases(str(w)):
            if name in keys:
                hits = [k for k, key in enumerate(keys) if key == name]
                if len(hits) > 1:  # two bands called "red": taking the first would be a guess
                    ambiguous.append(f"{str(w).strip()!r} (bands {', '.join(str(h + 1) for h in hits)} are all "
                                     f"named {offered[hits[0]]!r})")
                found = hits[0]
                break
        if found is None:
            missing.append(str(w))
        else:
            picked.append(found)
    if missing:
        shown = ", ".join(f"{i}:{o}" if o else f"{i}:(unnamed)" for i, o in enumerate(offered, 1))
        raise IncompatibleInputError(where, f"{model} needs {', '.join(missing)}, which the input does not offer "
                                            f"(it has {len(offered)} band(s): {shown}); {hint}")
    if ambiguous:
        raise IncompatibleInputError(where, f"{model} needs {', '.join(ambiguous)}: which one is meant is not "
                                            f"known; {hint}")
    # one band asked for again by the same token is meant ("1,1,1": a grey image for an RGB model); reached by
    # two different names ("nir" and "B08") it is a card or a --bands that confuses two bands
    tokens: dict[int, str] = {}
    for w, i in zip(wanted, picked):
        first = tokens.setdefault(i, str(w).strip())
        if first.lower() != str(w).strip().lower():
            raise IncompatibleInputError(where, f"{model} names input band {i + 1} twice, as {first!r} and "
                                                f"{str(w).strip()!r}; {hint}")
    return picked


@dataclass(frozen=True)
class BandRequest:
    """Which bands a run wants, for inputs that must pick them while ingesting (a STAC item's assets).

    ``wanted`` (``--bands`` or the card's channel names) in the model's order;
    None takes every band the input offers, when their number is ``channels``.
    """

    wanted: tuple[str, ...] | None = None
    channels: int | None = None
    model: str = "the model"
    from_user: bool = False  # --bands named them (not the card)
    resampling: str = "bilinear"  # GDAL's kernel for coarser bands brought onto the finest band's grid

    @classmethod
    def of(cls, option: Sequence[str] | None, channel_names: Sequence[str], channels: int,
           model: str, resampling: str = "auto") -> "BandRequest":
        """``--bands`` when given, else the card's channel names (None when the card names none).

        ``resampling`` is the card's ``input.resampling``: ``auto`` is bilinear,
        what refining calls for (the finest grid is never coarser).
        """
        wanted = option if option is not None else (channel_names or None)
        return cls(wanted=None if wanted is None else tuple(str(w) for w in wanted), channels=channels,
                   model=model, from_user=option is not None,
                   resampling="bilinear" if resampling == "auto" else resampling)

    @property
    def hint(self) -> str:
        return "choose them with --bands (names or 1-based indices)" if not self.from_user else \
            "name them as listed, or by 1-based index, in --bands"


def preselected(meta: Any) -> list[str] | None:
    """The channel names of a store whose bands were picked at ingest (a STAC item), else None."""
    if getattr(meta.geometry, "stac_item", None) is None:
        return None
    return list(meta.channel_names)


def channel_indexes(offered: Sequence[str], names: Sequence[str] | None) -> list[int]:
    """The stored channels behind ``names`` (as band selection returns them; None: all, in order)."""
    if names is None:
        return list(range(len(offered)))
    used: set[int] = set()
    out = []
    for name in names:  # the first not yet used, so equal descriptions map to distinct channels; then a repeat
        matches = [i for i, o in enumerate(offered) if o == name]
        found = [i for i in matches if i not in used] or matches  # "--bands 1,1,1" takes one channel thrice
        if not found:
            raise ValueError(f"band {name!r} is not among the store's channels {list(offered)}")
        used.add(found[0])
        out.append(found[0])
    return out


def channel_units(meta: Any, names: Sequence[str] | None = None) -> tuple[list[float], list[float]] | None:
    """(scales, offsets) of the channels ``names`` (None: all), or None when the store knows of none."""
    geometry = meta.geometry
    scales = list(getattr(geometry, "band_scales", None) or [])
    offsets = list(getattr(geometry, "band_offsets", None) or [])
    if not scales and not offsets:
        return None
    n = len(meta.channel_names)
    scales, offsets = scales or [1.0] * n, offsets or [0.0] * n
    picked = channel_indexes(list(meta.channel_names), names)
    return [scales[i] for i in picked], [offsets[i] for i in picked]


def apply_units(image: Any, meta: Any, *, units: str | None, dn_scale: float = 10000.0,
                names: Sequence[str] | None = None) -> Any:
    """The image in the units a card declares: ``value * scale + offset`` (reflectance), times ``dn_scale`` (dn).

    ``image`` holds the channels ``names`` of the store ``meta`` describes
    (None: all of them, in order).  ``units`` None, or a store with no known
    scale or offset, gives ``image`` back untouched: its values are taken to
    be in the card's units already.  Otherwise a lazy float32 dask array,
    computed in float64 per chunk.
    """
    known = None if units is None else channel_units(meta, names)
    if known is None:
        return image
    import dask.array as da

    arr = image if isinstance(image, da.Array) else da.from_zarr(image)
    shape = (-1,) + (1,) * (arr.ndim - 1)
    scale = np.asarray(known[0], dtype=np.float64).reshape(shape)
    offset = np.asarray(known[1], dtype=np.float64).reshape(shape)
    if units == "dn":
        scale, offset = scale * dn_scale, offset * dn_scale
    return (arr.astype(np.float64) * scale + offset).astype(np.float32)


def units_facts(meta: Any, *, units: str | None, dn_scale: float = 10000.0,
                names: Sequence[str] | None = None) -> dict[str, Any]:
    """What :func:`apply_units` did, for the statistics and provenance ({} when the card declares no units)."""
    if units is None:
        return {}
    known = channel_units(meta, names)
    facts: dict[str, Any] = {"units": units}
    if units == "dn":
        facts["dn_scale"] = dn_scale
    if known is None:
        facts["applied"] = False
        facts["note"] = "no band scale or offset known: the stored values were taken to be in these units"
    else:
        facts.update(applied=True, scales=known[0], offsets=known[1])
    return {"units": facts}


__all__ = ["BandRequest", "aliases", "apply_units", "channel_indexes", "channel_units", "preselected", "select_bands",
           "units_facts"]
