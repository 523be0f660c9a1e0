"""JSON segflow did not write, nested too deeply or too large, refused in one line like any malformed JSON.

``json.loads`` raises ``RecursionError`` for a document nested deeper than the interpreter's stack, which no
``except ValueError`` catches: a 200 KB file nested 10⁵ deep in an inbox had ended a whole nightly run with a
traceback (nothing segmented, no report), and the same file given to ``segment`` had printed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from flows.inbox import list_inbox
from storage import jsontext

DEEP = '{"type": "Feature", "stac_version": "1.0.0", "id": "x", "properties": ' + "[" * 100_000 + "]" * 100_000 + "}"


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "400"})


def _raster(path, tags: dict | None = None):
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(400000, 5800000, 10, 10)) as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
        dst.update_tags(**(tags or {}))
    return path


def test_a_deeply_nested_json_in_an_inbox_is_ignored_and_the_rest_is_listed(tmp_path):
    (tmp_path / "deep.json").write_text(DEEP)
    _raster(tmp_path / "scene.tif")
    assert list_inbox(tmp_path) == ([str(tmp_path / "scene.tif")], [str(tmp_path / "deep.json")])


def test_a_deeply_nested_item_is_one_line_naming_it(tmp_path):
    from tests.models import tiny_model

    (tmp_path / "deep.json").write_text(DEEP)
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[8, 8])
    proc = run("segment", tmp_path / "deep.json", _raster(tmp_path / "scene.tif"), "--model", model.path, "--out",
               tmp_path / "out", "--no-prefect")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'deep.json'}: ") and \
        "nested too deeply to read" in errors[0], proc.stderr
    assert (tmp_path / "out" / "scene.tif").is_file()  # the batch went on
    with pytest.raises(ValueError, match="nested too deeply"):
        jsontext.loads(DEEP)
    from storage.errors import InputError
    from storage.stacassets import plan_item

    with pytest.raises(InputError, match=r"deep.json: is not a STAC item: not JSON \(nested too deeply to read"):
        plan_item(tmp_path / "deep.json")


def test_a_json_document_larger_than_its_kind_may_be_is_refused_unread(tmp_path):
    path = tmp_path / "card.json"
    with open(path, "wb") as f:  # sparse: 300 MB that take no room
        f.truncate(300 * 1024 * 1024)
    with pytest.raises(json.JSONDecodeError, match="more than the 268,435,456 such a document may hold"):
        jsontext.read(path)


def test_info_shows_a_label_tag_that_is_not_json_without_a_traceback(tmp_path):
    path = _raster(tmp_path / "labels.tif", {"CLASSES": "water, forest"})
    proc = run("info", path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "not JSON" in proc.stdout, proc.stdout
