"""Label tables that desktop viewers read beside a label map.

A label map is only integers; the viewer learns names and colours from a
side-car table.  3D Slicer reads a ``.ctbl`` colour table (``idx name R G B A``,
written by :func:`storage.classes.slicer_color_table`), ITK-SNAP its own
"label description" file (``IDX R G B A VIS MSH "LABEL"``, with label 0 the
"Clear Label").  :func:`write_label_tables` writes both from the model card's
classes, each under a temporary name renamed into place so that a viewer never
opens half a table.  For a raster, QGIS applies ``<stem>.qml`` beside
``<stem>.tif`` as the layer's default style when it opens the file: a paletted
renderer with the class names, so its legend reads "water", not "1"
(:func:`write_qgis_style`; the COG's colour table alone gives colours only).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from xml.sax.saxutils import quoteattr

from storage.atomic import write_text_atomically
from storage.classes import LabelClass, slicer_color_table

__all__ = ["itksnap_label_description", "qgis_style", "qgis_style_path", "write_label_tables", "write_qgis_style",
           "ITKSNAP_SUFFIX", "QGIS_SUFFIX", "SLICER_SUFFIX"]

SLICER_SUFFIX = ".ctbl"
ITKSNAP_SUFFIX = ".itksnap.txt"
QGIS_SUFFIX = ".qml"

# The header ITK-SNAP itself writes (Segmentation > Export Label Descriptions).
_ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    IDX:   Label mesh visibility (0 or 1)
#  LABEL:   Label description
################################################
"""


def _itksnap_line(value: int, rgb: tuple[int, int, int], alpha: float, visible: int, name: str) -> str:
    # ITK-SNAP parses the label between double quotes and has no escape: drop quotes and line breaks.
    clean = " ".join(name.replace('"', "'").split())
    return f'{value:5d} {rgb[0]:5d} {rgb[1]:4d} {rgb[2]:4d} {alpha:8g} {visible:2d} {visible:2d}    "{clean}"'


def itksnap_label_description(classes: list[LabelClass]) -> str:
    """ITK-SNAP label description text; index 0 is always ITK-SNAP's invisible "Clear Label".

    ITK-SNAP treats label 0 as "no label" whatever it is called, so the card's
    background class (if any) does not replace it: writing it visible would
    paint the whole volume.
    """
    lines = [_itksnap_line(0, (0, 0, 0), 0.0, 0, "Clear Label")]
    for c in sorted(classes, key=lambda c: c.value):
        if c.value == 0:
            continue
        lines.append(_itksnap_line(c.value, c.color, 1.0, 1, c.name))
    return _ITKSNAP_HEADER + "\n".join(lines) + "\n"


def write_label_tables(out_path_stem: str | PathLike[str], classes: list[LabelClass]) -> list[Path]:
    """Write ``<stem>.ctbl`` (3D Slicer) and ``<stem>.itksnap.txt`` (ITK-SNAP); their paths, in that order."""
    stem = Path(out_path_stem)
    documents = [
        (stem.parent / f"{stem.name}{SLICER_SUFFIX}", slicer_color_table(classes)),
        (stem.parent / f"{stem.name}{ITKSNAP_SUFFIX}", itksnap_label_description(classes)),
    ]
    return [write_text_atomically(path, text, "label table") for path, text in documents]


def qgis_style(classes: list[LabelClass]) -> str:
    """A QGIS layer style (QML) drawing band 1 with a paletted renderer: one entry per class, its name as the
    legend label; values outside the table (the nodata label) are not drawn."""
    entries = "\n".join(
        f"        <paletteEntry value=\"{c.value}\" color=\"#{c.color[0]:02x}{c.color[1]:02x}{c.color[2]:02x}\" "
        f"alpha=\"255\" label={quoteattr(' '.join(c.name.split()))}/>"
        for c in sorted(classes, key=lambda c: c.value))
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.28.0" styleCategories="Symbology">\n'
            "  <pipe>\n"
            '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
            "      <rasterTransparency/>\n"
            "      <colorPalette>\n"
            f"{entries}\n"
            "      </colorPalette>\n"
            "    </rasterrenderer>\n"
            "  </pipe>\n"
            "</qgis>\n")


def qgis_style_path(label_path: str | PathLike[str]) -> Path:
    """``<stem>.qml`` beside the label raster ``<stem>.tif``: the name QGIS looks for as its default style."""
    label_path = Path(label_path)
    return label_path.with_name(label_path.name.rsplit(".", 1)[0] + QGIS_SUFFIX)


def write_qgis_style(label_path: str | PathLike[str], classes: list[LabelClass]) -> Path:
    """The style at :func:`qgis_style_path`."""
    return write_text_atomically(qgis_style_path(label_path), qgis_style(classes), "QGIS style")
