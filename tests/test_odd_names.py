"""File names as a file system keeps them, not as a terminal or a report would like them.

- A name that is no UTF-8 (``\\xff\\xfe.tif``, a file named in another encoding) reaches Python as lone
  surrogates: GDAL failed on it with ``UnicodeEncodeError``, then ``segment`` ended with a traceback writing its
  HTML report, and ``nightly`` with Prefect's event errors and a traceback writing its Markdown report, every
  night, as the file stayed in the inbox.  It is refused in one line; the batch and the reports go on.
- A name holding a newline or an escape sequence had been printed raw in the progress and ``ok`` lines
  (forged lines, a coloured terminal); ``error:`` lines already escaped them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from tests.models import tiny_model


def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *map(str, args)], capture_output=True, timeout=600,
                          env={**os.environ, "COLUMNS": "400", "PYTHONPATH": str(Path(__file__).parents[1])},
                          cwd=cwd)


def _raster(path: Path | bytes) -> None:
    """A small GeoTIFF at ``path``; bytes for a name GDAL cannot take, written beside it and renamed."""
    folder = Path(os.fsdecode(os.path.dirname(path))) if isinstance(path, bytes) else path.parent
    with rasterio.open(folder / ".written.tif", "w", driver="GTiff", width=40, height=40, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(400000, 5800000, 10, 10)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (1, 40, 40), dtype=np.uint8))
    os.replace(folder / ".written.tif", path)


def test_a_name_that_is_no_utf8_is_one_line_and_the_batch_and_reports_go_on(tmp_path):
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[16, 16])
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _raster(inbox / "good.tif")
    _raster(os.fsencode(inbox) + b"/\xff\xfebad.tif")
    proc = run("segment", "good.tif", os.fsdecode(b"\xff\xfebad.tif"), "--model", model.path, "--out",
               tmp_path / "out", "--no-prefect", cwd=inbox)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: \\udcff\\udcfebad.tif: its name is not valid UTF-8 (a file named in another "
                      "encoding), which GDAL cannot open: rename it"], stderr
    assert (tmp_path / "out" / "good.tif").is_file()
    reports = sorted(p.suffix for p in (tmp_path / "out" / "reports").iterdir())
    assert reports == [".html", ".json"], reports

    proc = run("nightly", "--inbox", inbox, "--model", model.path, "--out", tmp_path / "night", "--workers", "1")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr.decode("utf-8", "replace")
    assert sorted(p.suffix for p in (tmp_path / "night" / "reports").iterdir()) == [".html", ".json", ".md"]
    markdown = next((tmp_path / "night" / "reports").glob("*.md")).read_text(encoding="utf-8")
    assert "| `good.tif` | done |" in markdown and "\\udcff\\udcfebad.tif" in markdown


def test_a_name_with_a_newline_or_an_escape_sequence_is_printed_escaped(tmp_path):
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[16, 16])
    names = ["two\nok forged.tif", "\x1b[31mred.tif"]
    for name in names:
        _raster(tmp_path / name)
    proc = run("segment", *(tmp_path / n for n in names), "--model", model.path, "--out", tmp_path / "out",
               "--no-prefect")
    output = (proc.stdout + proc.stderr).decode("utf-8")
    assert proc.returncode == 0, output
    assert "\x1b[31mred" not in output and "\\x1b[31mred" in output
    assert not [line for line in output.splitlines() if line.startswith("ok forged")], output
    assert "two\\nok forged.tif" in output


def test_a_name_like_an_emoji_code_is_printed_as_it_is_and_dicom_text_warnings_stay_off(tmp_path):
    """rich turned ":fire:.tif" into "🔥.tif" in every line that named it (a file that does not exist); pydicom
    printed a two-line UserWarning for an escape sequence in a SeriesDescription, above segflow's lines."""
    from tests import dicom_samples

    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=1, roi=[16, 16])
    _raster(tmp_path / ":fire:.tif")
    _raster(tmp_path / "scan #1.tif")  # a name pystac cannot read back: its item is written, and said so
    proc = run("segment", tmp_path / ":fire:.tif", tmp_path / ":no_entry:.tif", tmp_path / "scan #1.tif",
               "--model", model.path, "--out", tmp_path / "out", "--no-prefect")
    output = (proc.stdout + proc.stderr).decode("utf-8")
    assert proc.returncode == 1 and "🔥" not in output and "⛔" not in output, output
    assert f"ok {tmp_path / ':fire:.tif'} -> " in output and f"error: {tmp_path / ':no_entry:.tif'}: " in output
    assert "scan #1.stac.json: the outputs' names hold '#', which pystac takes as URL syntax" in output, output
    assert ":fire:.stac.json: the outputs'" not in output and (tmp_path / "out" / "scan #1.stac.json").is_file()
    assert (tmp_path / "out" / ":fire:.tif").is_file()
    volume = tiny_model(tmp_path / "m3", spatial_dims=3, channels=1, roi=[8, 8, 8])
    dicom_samples.write_ct_series(tmp_path / "ct", np.zeros((8, 8, 8), np.int16),
                                  series_description="a\x1b[31mRED")
    proc = run("segment", tmp_path / "ct", "--model", volume.path, "--out", tmp_path / "out3", "--no-prefect")
    output = (proc.stdout + proc.stderr).decode("utf-8")
    assert proc.returncode == 0 and "Warning" not in output, output
