"""Label classes as viewers see them: a value, a name and a colour.

Kept in ``storage`` because every writer (COG colour table, NIfTI label table,
zarr attributes) needs them, while only the model card says where they come
from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import jsontext

# A SNOMED CT class code for DICOM SEG: SCT:[<category>/]<type>[|<meaning>], e.g. "SCT:10200004|Liver"
SCT_CODE = re.compile(r"^SCT:(?:(?P<category>\d{6,18})/)?(?P<type>\d{6,18})(?:\|(?P<meaning>.+))?$")


class LabelClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=0, le=65534)
    name: str = Field(min_length=1)
    # 8-bit RGB: [300, -10, 20] passed the card, then failed after the inference (a quicklook's uint8, a COG's colour
    # hint) or went as is into the Slicer and ITK-SNAP tables
    color: tuple[Annotated[int, Field(ge=0, le=255)], Annotated[int, Field(ge=0, le=255)],
                 Annotated[int, Field(ge=0, le=255)]] = (128, 128, 128)
    code: str | None = None  # e.g. a SNOMED CT code (SCT:[<category>/]<type>[|<meaning>]) or a land-cover code

    @field_validator("code")
    @classmethod
    def _sct_syntax(cls, v: str | None) -> str | None:
        """A malformed SNOMED CT code is refused when the card is read, not when a DICOM SEG is written."""
        if v is not None and v.strip().upper().startswith("SCT:") and not SCT_CODE.match("SCT:" + v.strip()[4:].strip()):
            raise ValueError(f"code {v!r} is not SCT:[<category>/]<type>[|<meaning>] (SNOMED CT numbers)")
        return v


BACKGROUND_NAMES = frozenset({"background", "bg", "void", "unlabelled", "unlabeled", "clutter", "nothing"})


def background_value(names: Mapping[int, str]) -> int | None:
    """The value of the background class, by its name; None when no class is named as one.

    Class 0 is not always background: Cityscapes' 0 is road, a land-cover map's 0 may be water.  Such a class is
    scored like any other (in the mean Dice that picks a checkpoint, and with distances in ``evaluate``).  With no
    names known at all, 0 is taken as background, as the label maps of medical tools have it."""
    if not names:
        return 0
    found = [v for v, n in sorted(names.items()) if str(n).strip().lower() in BACKGROUND_NAMES]
    return found[0] if found else None


def label_dtype(classes: list[LabelClass]) -> str:
    """uint8 while one value is left free for nodata, uint16 beyond."""
    top = max((c.value for c in classes), default=0)
    return "uint8" if top < 255 else "uint16"


def nodata_value(classes: list[LabelClass]) -> int:
    """The label value written where the input had no data: the dtype's maximum."""
    return 255 if label_dtype(classes) == "uint8" else 65535


LABEL_TABLE_HEADER = "# segflow label table"  # the first line of every table slicer_color_table writes
_NAMES_LINE = "# names: "  # the exact names, as JSON {value: name}: the table's own column cannot hold a space


def slicer_color_table(classes: list[LabelClass]) -> str:
    """3D Slicer ``.ctbl`` text (``idx name R G B A``), which ITK-SNAP also reads.

    Slicer's name column is one word, so "white matter" is written ``white_matter``; a comment line (which
    Slicer skips) keeps the names as they are, for :func:`table_names` to read back."""
    ordered = sorted(classes, key=lambda c: c.value)
    lines = [f"{LABEL_TABLE_HEADER}: value name R G B A",
             _NAMES_LINE + json.dumps({str(c.value): c.name for c in ordered}, ensure_ascii=False)]
    for c in ordered:
        name = "_".join(c.name.split())
        lines.append(f"{c.value} {name} {c.color[0]} {c.color[1]} {c.color[2]} 255")
    return "\n".join(lines) + "\n"


def table_names(text: str) -> dict[int, str]:
    """Class names by value from a label table :func:`slicer_color_table` wrote (or any ``value name ...`` table,
    whose names then keep their '_')."""
    for line in text.splitlines():
        if line.startswith(_NAMES_LINE):
            try:
                named = jsontext.loads(line[len(_NAMES_LINE):])
                return {int(v): str(n) for v, n in named.items()}
            except (ValueError, TypeError, AttributeError):
                break  # a damaged line: the columns still name the classes
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out
