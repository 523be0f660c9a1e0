"""The QGIS style beside a label raster: QGIS's legend reads the classes' names, in the card's colours."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from storage.classes import LabelClass
from storage.labeltables import qgis_style, write_qgis_style


def test_the_qml_lists_every_class_with_its_value_colour_and_name(tmp_path: Path) -> None:
    classes = [LabelClass(value=3, name='built-up "dense" & <old>', color=(200, 40, 40)),
               LabelClass(value=0, name="water", color=(30, 90, 200)),
               LabelClass(value=1, name="forest\nedge", color=(20, 110, 40))]
    path = write_qgis_style(tmp_path / "scene.tif", classes)
    assert path == tmp_path / "scene.qml"  # the name QGIS looks for beside scene.tif
    root = ET.fromstring(path.read_text())
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None and renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(e.get("value"), e.get("color"), e.get("label")) for e in renderer.iter("paletteEntry")]
    assert entries == [("0", "#1e5ac8", "water"), ("1", "#146e28", "forest edge"),
                       ("3", "#c82828", 'built-up "dense" & <old>')]  # by value; names escaped, one line
    assert path.read_text() == qgis_style(classes)
