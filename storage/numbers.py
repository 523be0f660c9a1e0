"""Areas and volumes as people write them: ``85,860 ha``, ``12.4 mL``, ``0.52 ha``, ``1,234.5 mL``.

Python's ``:g`` and ``:.4g`` print ``8.586e+04``, which nobody writes in a
report about a field or an organ.  Every place segflow shows an area or a
volume to a person (the CLI's tables, ``segflow info``, the nightly run report)
formats it through :func:`readable`, so one number reads the same everywhere.
The rule: whole numbers from 10,000 up (the digits below carry no meaning at
that size); below that one decimal, or three significant digits when that
shows more (``0.52``, ``0.004``); thousands separated by commas; trailing
zeros dropped.  Machine-readable outputs (JSON, provenance) keep full floats.
"""

from __future__ import annotations

import math

WHOLE_FROM = 10_000  # from here on a value prints as a whole number
SIGNIFICANT = 3  # digits kept for values whose one decimal would show fewer
MISSING = "–"  # what an unknown value prints as (the Markdown report's dash)


def decimals(value: float) -> int:
    """How many decimals :func:`readable` keeps for ``value``."""
    magnitude = abs(value)
    if magnitude >= WHOLE_FROM:
        return 0
    if magnitude == 0:
        return 0
    first = math.floor(math.log10(magnitude))  # 1 for 12.4, -1 for 0.52, -3 for 0.004
    return max(1, SIGNIFICANT - 1 - first)


def readable(value: float | None, unit: str | None = None) -> str:
    """``value`` as people write it, with ``unit`` after a space when given; None or NaN prints ``–``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    value = float(value)
    if math.isinf(value):
        text = "∞" if value > 0 else "-∞"
    else:
        places = decimals(value)
        text = f"{value:,.{places}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        if text in ("-0", ""):
            text = "0"
    return f"{text} {unit}" if unit else text


__all__ = ["readable", "decimals"]
