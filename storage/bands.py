"""Which of an input's bands a model takes, found by name.

A model is trained on named bands in one order (a card's
``input.channel_names``: ``blue, green, red, nir``); a scene offers its own
(``B01 … B12, B8A`` in a 13-band Sentinel-2 file, ``SR_B2 …`` in Landsat).
Feeding B2,B3,B4 to a model trained on B4,B3,B2 runs without a word and gives
wrong labels, so bands are matched by name: a GDAL band description, a STAC
common name, or a Sentinel-2 / Landsat band id.  A band id means different
bands on different sensors (``B5``: Sentinel-2's red edge, Landsat 8-9's nir,
Landsat 4-7's swir16), so an id is read for the sensor the input's whole set
of ids fits (:func:`band_meanings`); where that set fits several sensors that
read the id differently, the match is refused, not guessed.  A user may name
the bands instead (``--bands``: names or 1-based indices).  A band that cannot
be found is refused before any work, with the list of what the input offers.

Units: an ingested raster records each band's GDAL scale and offset (from
the file, or a STAC item's ``raster:bands``); a card that declares
``input.units`` gets value * scale + offset ("reflectance"), or that times
its ``dn_scale`` ("dn"), as float32, lazily.  A card without units gets the
stored values exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from storage.errors import IncompatibleInputError, InvalidInputError


def _ids(prefixes: tuple[str, ...], table: dict[str, str]) -> dict[str, str]:
    return {f"{p}{k}": v for p in prefixes for k, v in table.items()}


_S2_BANDS = {"1": "coastal", "2": "blue", "3": "green", "4": "red", "5": "rededge1", "6": "rededge2",
             "7": "rededge3", "8": "nir", "9": "nir09"}
# normalised band id -> STAC eo common name, per sensor.  Sentinel-2 ids come padded (B02, the ESA products') or
# not (B2, Google Earth Engine's); Landsat's are never padded, with or without Collection 2's SR_/ST_ prefixes.
SENSORS: dict[str, dict[str, str]] = {
    "Sentinel-2": {**_ids(("b", "b0"), _S2_BANDS), "b8a": "nir08", "b10": "cirrus", "b11": "swir16",
                   "b12": "swir22"},
    "Landsat 8-9": {**_ids(("b", "sr_b"), {"1": "coastal", "2": "blue", "3": "green", "4": "red", "5": "nir08",
                                           "6": "swir16", "7": "swir22"}),
                    "b8": "pan", "b9": "cirrus", "b10": "lwir11", "b11": "lwir12", "st_b10": "lwir11"},
    "Landsat 4-7": {**_ids(("b", "sr_b"), {"1": "blue", "2": "green", "3": "red", "4": "nir08", "5": "swir16",
                                           "7": "swir22"}),
                    "b6": "lwir", "b6_vcid_1": "lwir", "b6_vcid_2": "lwir", "b8": "pan", "st_b6": "lwir"},
}
# a set of ids that is exactly one sensor's product tells that sensor even where another's ids include it:
# Landsat 4-7's Collection 2 surface reflectance has no band 6 (thermal is ST_B6); Landsat 8-9's always has SR_B6
_PRODUCTS = {frozenset(f"sr_b{i}" for i in (1, 2, 3, 4, 5, 7)): "Landsat 4-7"}
COMMON_NAMES = frozenset({*(m for ids in SENSORS.values() for m in ids.values()), "nir", "rededge", "yellow"})
SENTINEL2_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def sentinel2_numbers(names: Sequence[str]) -> list[int] | None:
    """The 1-based numbers of bands ``names`` (common names or ids) in a 13-band Sentinel-2 file in
    :data:`SENTINEL2_ORDER`, or None when one is not a Sentinel-2 band: the example an unnamed file is given."""
    common = {i: SENSORS["Sentinel-2"][i.lower()] for i in SENTINEL2_ORDER}
    out = []
    for name in names:
        key = name.strip()
        hits = [n for n, (i, c) in enumerate(common.items(), 1) if key.upper() == i or key.lower() == c]
        if len(hits) != 1:
            return None
        out.append(hits[0])
    return out or None


GREY = "grey"  # a grey picture's one band (storage.photo): a network that learnt pictures as RGB sees it thrice
_BROADER = {"nir": "nir08"}  # asked for "nir", a band that is only "nir08" (Landsat's, S2's B8A) answers
_ALL_IDS = frozenset(i for ids in SENSORS.values() for i in ids)


def _norm(name: str) -> str:
    return "".join(name.split()).lower()


def sensors_of(names: Iterable[str | None]) -> list[str]:
    """The sensors whose band ids include every band id among ``names`` (other names are not ids: ignored)."""
    ids = {_norm(n) for n in names if n} & _ALL_IDS
    if not ids:
        return []
    if frozenset(ids) in _PRODUCTS:
        return [_PRODUCTS[frozenset(ids)]]
    return [s for s, table in SENSORS.items() if ids <= table.keys()]


def band_meanings(offered: Sequence[Iterable[str | None]]) -> list[dict[str, list[str]]]:
    """For each band (given by all its names), the common names it may be: {common name: sensors saying so}.

    A band named by a common name means that ([] for its sensors); a band id
    means what it means on each sensor the whole set of ids fits (on every
    sensor that has it, where the set fits none); other names mean nothing.
    """
    bands = [[_norm(n) for n in names if n] for names in offered]
    fit = sensors_of(n for names in bands for n in names)
    out: list[dict[str, list[str]]] = []
    for names in bands:
        common = [n for n in names if n in COMMON_NAMES]
        meanings: dict[str, list[str]] = {c: [] for c in common}
        if not common:
            for sensor in fit or list(SENSORS):
                for n in names:
                    if n in SENSORS[sensor]:
                        meanings.setdefault(SENSORS[sensor][n], []).append(sensor)
        out.append(meanings)
    return out


def aliases(name: str) -> list[str]:
    """``name`` first, then every name the same band may have on some sensor (common name and band ids)."""
    key = _norm(name)
    meanings = {key} if key in COMMON_NAMES else {m for ids in SENSORS.values() for i, m in ids.items() if i == key}
    meanings |= {_BROADER[m] for m in meanings if m in _BROADER}
    out = [key, *sorted(meanings)]
    out += sorted(i for ids in SENSORS.values() for i, m in ids.items() if m in meanings)
    return list(dict.fromkeys(out))


@dataclass
class Located:
    """Where one wanted band is among the offered ones: ``hits`` (0-based), and, where band ids fit several
    sensors that read them differently, ``doubts``: why each hit is not known to be the band meant."""

    hits: list[int]
    exact: bool = False
    doubts: list[str] = field(default_factory=list)


def _said(name: str, meanings: dict[str, list[str]]) -> str:
    return f"{name} is " + ", ".join(f"{m} in {' and '.join(s)}" for m, s in meanings.items())


def locate(wanted: str, offered: Sequence[Iterable[str | None]], *, context: Iterable[str] = (),
           meanings: list[dict[str, list[str]]] | None = None, labels: Sequence[str] | None = None) -> Located:
    """The offered bands (each given by all its names) that ``wanted`` names: by exact name, else by meaning.

    A wanted band id is read for the sensor ``context`` (every name wanted)
    fits; an id whose meaning that leaves open matches its exact name only.
    ``meanings``: :func:`band_meanings` of ``offered``, when already known;
    ``labels``: how a doubt names each offered band (else by its first name).
    """
    bands = [[_norm(n) for n in names if n] for names in offered]
    key = _norm(wanted)
    exact = [i for i, names in enumerate(bands) if key in names]
    if exact:
        return Located(exact, exact=True)
    if key in COMMON_NAMES:
        meaning = key
    else:
        # the wanted ids read for the sensor they and the offered ids fit together: B2, B3, B4, B8 alone fit
        # Sentinel-2 and both Landsats (B2 blue or green), a file's B01 ... B8A only Sentinel-2
        together = [*context, *(n for names in bands for n in names)]
        read = band_meanings([[key], *([c] for c in (together if sensors_of([key, *together]) else context))])[0]
        if len(read) != 1:
            return Located([])
        meaning = next(iter(read))
    meanings = meanings if meanings is not None else band_meanings(bands)
    hits = [i for i, m in enumerate(meanings) if meaning in m]
    if not hits and key in _BROADER:
        hits = [i for i, m in enumerate(meanings) if _BROADER[key] in m]
    shown = labels if labels is not None else [next((n for n in b if n), "?") for b in offered]
    doubts = [_said(str(shown[i]), meanings[i]) for i in hits if len(meanings[i]) > 1]
    return Located(hits, doubts=doubts)


def select_bands(wanted: Sequence[str | int], offered: Sequence[str | None], *,
                 where: str | PathLike[str] | None = None, model: str = "the model",
                 hint: str = "choose them with --bands (names or 1-based indices)") -> list[int]:
    """0-based indexes into ``offered`` for each of ``wanted`` (names, or 1-based ints), or one refusal.

    An exact name wins over an alias, so a file whose bands are called
    ``nir`` and ``B8A`` gives ``nir`` for "nir"; a band id is read for the
    sensor the file's ids tell, and refused where they do not tell it.
    """
    names = [[o] if o else [] for o in offered]
    meanings = band_meanings(names)
    labels = [f"band {i} {o!r}" if o else f"band {i}" for i, o in enumerate(offered, 1)]
    context = [str(w) for w in wanted]
    picked: list[int] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    unsure: list[str] = []
    doubts: dict[str, None] = {}
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.strip().isdigit()):
            i = int(w) - 1
            if not 0 <= i < len(offered):
                missing.append(f"band {int(w)}" + (" (indices are 1-based)" if i < 0 else ""))
            else:
                picked.append(i)
            continue
        found = locate(str(w), names, context=context, meanings=meanings, labels=labels)
        hits = found.hits
        if found.doubts:  # "nir" in B2,B3,B4,B5,B8: Sentinel-2's B8 or Landsat 8-9's B5, the names do not say
            unsure.append(str(w).strip())
            doubts.update(dict.fromkeys(found.doubts))
        elif len(hits) > 1:  # two bands called "red": taking the first would be a guess
            what = f"named {offered[hits[0]]!r}" if found.exact else f"{_norm(str(w))}"
            ambiguous.append(f"{str(w).strip()!r} (bands {', '.join(str(h + 1) for h in hits)} are all {what})")
        if not hits:
            missing.append(str(w))
        else:
            picked.append(hits[0])
    if missing:
        shown = ", ".join(f"{i}:{o}" if o else f"{i}:(unnamed)" for i, o in enumerate(offered, 1))
        raise IncompatibleInputError(where, f"{model} needs {', '.join(missing)}, which the input does not offer "
                                            f"(it has {len(offered)} band(s): {shown}); {hint}")
    if unsure:
        raise IncompatibleInputError(where, f"{model} needs {', '.join(unsure)}, but the input's band ids fit "
                                            f"{_sensors(offered)}, which number their bands differently "
                                            f"({'; '.join(doubts)}), so which band is meant is not known; {hint}")
    if ambiguous:
        raise IncompatibleInputError(where, f"{model} needs {', '.join(ambiguous)}: which one is meant is not "
                                            f"known; {hint}")
    same_band_once(wanted, picked, where=where, model=model, hint=hint)
    return picked


def _sensors(offered: Iterable[str | None]) -> str:
    fit = sensors_of(offered) or list(SENSORS)
    return ", ".join(fit[:-1]) + f" and {fit[-1]}" if len(fit) > 1 else fit[0]


def same_band_once(wanted: Sequence[str | int], picked: Sequence[Any], *, where: str | PathLike[str] | None,
                   model: str, hint: str, shown: Sequence[str] | None = None) -> None:
    """Refuse one band reached by two different names; one band asked for again by the same token is meant
    ("1,1,1": a grey image for an RGB model), reached by "nir" and "B08" it is a card or a --bands that confuses
    two bands.  ``picked``: what each wanted name reached (0-based band indexes, or any hashable band)."""
    tokens: dict[Any, tuple[int, str]] = {}
    for n, (w, band) in enumerate(zip(wanted, picked)):
        first = tokens.setdefault(band, (n, str(w).strip()))[1]
        if first.lower() != str(w).strip().lower():
            what = f"input band {band + 1}" if shown is None else shown[tokens[band][0]]
            raise IncompatibleInputError(where, f"{model} names {what} twice, as {first!r} and "
                                                f"{str(w).strip()!r}; {hint}")


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
    """(scales, offsets) of the channels ``names`` (None: all), or None when none of them has a known one.

    A scale of 1 and offset of 0 is what GDAL says of a band that declares
    none: such a band's values are taken as they are.  Channels that mix the
    two are refused (:class:`InvalidInputError`): a STAC item whose blue asset
    lacked its ``raster:bands`` scale, or a file whose one unused band carried
    one, had every channel converted alike, and labelled a scene all water.
    """
    geometry = meta.geometry
    scales = list(getattr(geometry, "band_scales", None) or [])
    offsets = list(getattr(geometry, "band_offsets", None) or [])
    if not scales and not offsets:
        return None
    n = len(meta.channel_names)
    scales, offsets = scales or [1.0] * n, offsets or [0.0] * n
    picked = channel_indexes(list(meta.channel_names), names)
    scales, offsets = [scales[i] for i in picked], [offsets[i] for i in picked]
    declared = [s != 1.0 or o != 0.0 for s, o in zip(scales, offsets)]
    if not any(declared):
        return None
    if not all(declared):
        label = [str(meta.channel_names[i]) for i in picked]
        given = [x for x, d in zip(label, declared) if d]
        missing = [x for x, d in zip(label, declared) if not d]
        raise InvalidInputError(None, f"the bands it takes mix units: {', '.join(given)} declare a scale or offset, "
                                      f"{', '.join(missing)} none, so they cannot be brought to the card's units "
                                      "alike; declare the missing ones (GDAL band scale and offset, or the STAC "
                                      "item's raster:bands) or pick other bands with --bands")
    return scales, offsets


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


__all__ = ["COMMON_NAMES", "GREY", "SENSORS", "BandRequest", "Located", "aliases", "apply_units", "band_meanings",
           "channel_indexes", "channel_units", "locate", "preselected", "same_band_once", "select_bands", "sensors_of",
           "units_facts"]
