"""Label sidecars and truths: the QGIS style beside a label raster, a DICOM SEG placed on a prediction's grid."""

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


def test_a_seg_volume_is_placed_by_axis_order_flip_and_offset() -> None:
    """storage.segtruth._place: the SEG's sub-volume on the prediction's grid, or None off it."""
    import numpy as np

    from storage.segtruth import _place

    data = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) + 1  # SEG axes (a0, a1, a2)
    # reference axis 0 <- a2, axis 1 <- a1 flipped, axis 2 <- a0; offsets 1, 5, 3
    to_ref = np.array([[0, 0, 1, 1], [0, -1, 0, 5], [1, 0, 0, 3], [0, 0, 0, 1]], float)
    placed = _place(data, to_ref, (6, 7, 8))
    expected = np.zeros((6, 7, 8), np.uint16)
    for a0 in range(2):
        for a1 in range(3):
            for a2 in range(4):
                expected[a2 + 1, 5 - a1, a0 + 3] = data[a0, a1, a2]
    assert placed is not None and np.array_equal(placed, expected)
    assert _place(data, to_ref, (6, 7, 4)) is None  # would fall outside
    half = to_ref.copy()
    half[0, 3] = 1.5
    assert _place(data, half, (6, 7, 8)) is None  # between voxels
