"""What a VRT or STAC item may send GDAL to (storage.sources), in `segment` and in `nightly` on an inbox.

A security probe put a VRT in an inbox whose raw bands read ``/etc/passwd``
as pixels, one whose source was a scan in another folder (segmented, and
drawn into a quicklook in the output folder), a STAC item whose asset was
``../elsewhere/private.tif``, one that made GDAL connect to a loopback port,
and a VRT reading ``/vsistdin/`` (the run hung).  All were "ok".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from flows.nightly import nightly, nightly_report
from storage.errors import UnsafeInputError
from storage.sources import NamedSource, check_sources, source_problem, vrt_sources
from tests.models import tiny_model

HEADER = ('<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>EPSG:32633</SRS>'
          "<GeoTransform>500000,10,0,5000000,0,-10</GeoTransform>")


def _tif(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=4, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(np.random.default_rng(seed).integers(0, 2000, (4, 32, 32), dtype=np.uint16))
    return path


def _vrt(path: Path, source: str, *, relative: bool = False) -> Path:
    """A 4-band VRT whose every band reads ``source``."""
    bands = "".join(f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename relativeToVRT='
                    f'"{int(relative)}">{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
                    "</VRTRasterBand>" for b in (1, 2, 3, 4))
    path.write_text(HEADER + bands + "</VRTDataset>")
    return path


def _raw_vrt(path: Path, source: str) -> Path:
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}" subClass="VRTRawRasterBand"><SourceFilename '
                    f'relativeToVRT="0">{source}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1'
                    "</PixelOffset><LineOffset>32</LineOffset></VRTRasterBand>" for b in (1, 2, 3, 4))
    path.write_text(HEADER + bands + "</VRTDataset>")
    return path


def _item(path: Path, href: str, ident: str = "scene") -> Path:
    names = ["blue", "green", "red", "nir"]
    doc = {"type": "Feature", "stac_version": "1.0.0", "id": ident, "geometry": None, "links": [],
           "properties": {"datetime": "2024-01-01T00:00:00Z"},
           "assets": {n: {"href": href, "type": "image/tiff; application=geotiff", "roles": ["data"],
                          "eo:bands": [{"name": n, "common_name": n}]} for n in names}}
    path.write_text(json.dumps(doc))
    return path


def test_the_always_refused_sources_and_the_allowed_ones(tmp_path):
    here = tmp_path / "in" / "a.vrt"
    here.parent.mkdir()
    refused = {
        NamedSource("/etc/passwd", here, raw=True): "a raw band's file outside the VRT's own folder",
        NamedSource(str(tmp_path / "in" / ".." / "x.bin"), here, raw=True): "a raw band's file outside",
        NamedSource("/vsistdin/", here): "uses GDAL's /vsistdin/ handler",
        NamedSource("/vsimem/x.tif", here): "uses GDAL's /vsimem/ handler",
        NamedSource("/vsisubfile/0_100,/etc/passwd", here): "uses GDAL's /vsisubfile/ handler",
        NamedSource("/vsicurl/http://169.254.169.254/latest/x.tif", here): "link-local address 169.254.169.254",
        NamedSource("http://[fe80::1]/x.tif", here): "link-local address fe80::1",
        NamedSource("/vsicurl/http://metadata.google.internal/x.tif", here): "metadata service host",
        NamedSource("/vsizip//vsistdin/", here): "/vsistdin/ handler",  # the archive's own path is checked
        NamedSource("file:///etc/passwd", here): "is a file:// URL",
        # 169.254.169.254 as the resolver also reads it: these were let through
        NamedSource("http://2852039166/x.tif", here): "link-local address 2852039166",
        NamedSource("/vsicurl/http://0xa9fea9fe/x.tif", here): "link-local address 0xa9fea9fe",
        NamedSource("http://0251.0376.0251.0376/x.tif", here): "link-local address",
        NamedSource("http://169.254.43518/x.tif", here): "link-local address",
        NamedSource("http://169.254.169.254./x.tif", here): "link-local address 169.254.169.254",
        NamedSource("http://[::ffff:169.254.169.254]/x.tif", here): "link-local address ::ffff:169.254.169.254",
        NamedSource("http://[::ffff:a9fe:a9fe]/x.tif", here): "link-local address",
        NamedSource("http://[fd00:ec2::254]/x.tif", here): "metadata service address fd00:ec2::254",
    }
    for source, problem in refused.items():
        got = source_problem(source)
        assert got is not None and problem in got, (source, got)
    allowed = [NamedSource(str(tmp_path / "in" / "sub" / "x.bin"), here, raw=True),  # a raw band's own folder
               NamedSource("/vsicurl/https://example.com/x.tif", here), NamedSource("/vsis3/bucket/x.tif", here),
               NamedSource("https://example.com/x.tif", here), NamedSource("/anywhere/x.tif", here),
               NamedSource("https://deadbeef.example/x.tif", here), NamedSource("http://2130706433/x.tif", here)]
    for source in allowed:
        assert source_problem(source) is None, source
    # with roots, local files must lie under one of them, links resolved
    roots = [tmp_path / "in"]
    assert source_problem(NamedSource(str(tmp_path / "in" / "sub" / "x.tif"), here), roots) is None
    outside = source_problem(NamedSource(str(tmp_path / "in" / ".." / "x.tif"), here), roots)
    assert outside is not None and "lies outside the folders its files may come from" in outside
    (tmp_path / "in" / "link").symlink_to(tmp_path)
    assert source_problem(NamedSource(str(tmp_path / "in" / "link" / "x.tif"), here), roots) is not None
    assert source_problem(NamedSource(f"/vsizip/{tmp_path}/elsewhere/a.zip/m.tif", here), roots) is not None
    assert source_problem(NamedSource(f"/vsizip/{tmp_path}/in/a.zip/m.tif", here), roots) is None


def test_a_vrts_sources_are_found_nested_and_relative_and_its_xml_is_not_trusted(tmp_path):
    (tmp_path / "sub").mkdir()
    inner = _raw_vrt(tmp_path / "sub" / "inner.vrt", "/etc/passwd")
    outer = _vrt(tmp_path / "outer.vrt", "sub/inner.vrt", relative=True)
    found = vrt_sources(outer)
    assert NamedSource(str(tmp_path / "sub" / "inner.vrt"), outer) in found
    assert NamedSource("/etc/passwd", inner, raw=True) in found
    with pytest.raises(UnsafeInputError, match=r"outer\.vrt: its source '/etc/passwd' is a raw band's file .*"
                                               r"\(in inner\.vrt\); not opened"):
        check_sources(outer, found)
    bomb = tmp_path / "bomb.vrt"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]><VRTDataset>&a;</VRTDataset>')
    with pytest.raises(UnsafeInputError, match="DOCTYPE or entity declarations"):
        vrt_sources(bomb)
    (tmp_path / "broken.vrt").write_text("<VRTDataset><VRTRasterBand>")
    with pytest.raises(UnsafeInputError, match="is not a readable VRT"):
        vrt_sources(tmp_path / "broken.vrt")
    code = tmp_path / "code.vrt"  # GDAL runs such code only where it is built and configured to: never asked
    code.write_text(HEADER + '<VRTRasterBand dataType="Byte" band="1" subClass="VRTDerivedRasterBand">'
                    "<PixelFunctionLanguage>Python</PixelFunctionLanguage><PixelFunctionType>f</PixelFunctionType>"
                    "<PixelFunctionCode><![CDATA[import os]]></PixelFunctionCode></VRTRasterBand></VRTDataset>")
    with pytest.raises(UnsafeInputError, match="is a VRT holding Python pixel-function code, which segflow does "
                                               "not run"):
        vrt_sources(code)
    loop = _vrt(tmp_path / "loop.vrt", "loop.vrt", relative=True)
    with pytest.raises(UnsafeInputError, match="nests VRTs more than 8 deep"):
        vrt_sources(loop)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("src-model") / "m", spatial_dims=2, channels=4, roi=[32, 32], seed=1)


def test_segment_refuses_raw_bands_elsewhere_stdin_and_metadata_hosts_before_gdal_opens_them(model, tmp_path):
    """Each in one line naming the file, nothing written for it, and the good VRT beside them done.  The
    /vsistdin/ VRT used to block on the terminal; the link-local item is refused without a connection."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = _vrt(inputs / "good.vrt", "scene.tif", relative=True)
    _tif(inputs / "scene.tif")
    raw = _raw_vrt(inputs / "raw.vrt", "/etc/passwd")
    stdin = _raw_vrt(inputs / "stdin.vrt", "/vsistdin/")
    item = _item(inputs / "meta.json", "http://169.254.169.254/latest/meta-data/x.tif", ident="meta")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(good), str(raw), str(stdin), str(item),
                           "--model", str(model.path), "--out", str(out), "--no-quicklook"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.PIPE)  # stdin left open
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"error: {raw}: its source '/etc/passwd' is a raw band's file outside the VRT's own folder" in \
        "\n".join(errors), proc.stderr
    assert any(line.startswith(f"error: {stdin}: its source '/vsistdin/' uses GDAL's /vsistdin/ handler")
               for line in errors), proc.stderr
    assert any(line.startswith(f"error: {item}: its source '/vsicurl/http://169.254.169.254/") and
               "link-local address" in line for line in errors), proc.stderr
    assert len(errors) == 3 and "Traceback" not in proc.stderr
    assert (out / "good.tif").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(("raw", "stdin", "meta"))]


def test_nightly_takes_sources_from_the_inbox_and_the_allowed_folders_only(model, tmp_path, dask_cluster):
    """In an inbox others fill, a VRT or STAC item naming a file elsewhere on the host fails alone in one line
    (before, it was segmented and drawn into a quicklook in the output folder); one naming a file in the inbox is
    done; ``--source-root`` allows another folder."""
    inbox, elsewhere, out = tmp_path / "inbox", tmp_path / "elsewhere", tmp_path / "out"
    inbox.mkdir()
    private = _tif(elsewhere / "private.tif")
    _vrt(inbox / "outside.vrt", str(private))
    _item(inbox / "up.json", "../elsewhere/private.tif", ident="up")
    _tif(inbox / "tiles" / "t.tif", seed=3)  # a folder of tiles in the inbox, and a VRT over them
    _vrt(inbox / "inside.vrt", "tiles/t.tif", relative=True)
    other = _tif(elsewhere / "other.tif", seed=5)
    (inbox / "linked.tif").symlink_to(other)  # a link dropped in: it was segmented as the inbox's own file
    (inbox / "tiles" / "t2.tif").symlink_to(inbox / "tiles" / "t.tif")
    (inbox / "near.tif").symlink_to(inbox / "tiles" / "t2.tif")  # links that stay inside are the inbox's
    state = nightly(model_dirs=[str(model.path)], out_dir=str(out), inbox=str(inbox), return_state=True)
    by_name = {Path(r["input"]).name: r for r in nightly_report(state)["inputs"]}
    assert by_name["inside.vrt"]["status"] == "done", by_name["inside.vrt"]
    assert by_name["near.tif"]["status"] == "done", by_name["near.tif"]
    assert by_name["linked.tif"]["error"] == (
        f"{inbox / 'linked.tif'}: is a link to {other}, outside the folders its files may come from ({inbox}); "
        "allow its folder with --source-root; not opened"), by_name["linked.tif"]
    assert not list(out.glob("linked*"))
    for name, shown in (("outside.vrt", str(private)), ("up.json", str(private))):
        assert by_name[name]["status"] == "failed", by_name[name]
        assert by_name[name]["error"] == (
            f"{inbox / name}: its source {shown!r} lies outside the folders its files may come from ({inbox}); "
            "allow its folder with --source-root; not opened"), by_name[name]["error"]
    assert not list(out.glob("outside*")) and not list(out.glob("up.*"))

    state = nightly(model_dirs=[str(model.path)], out_dir=str(out), inbox=str(inbox), source_roots=[str(elsewhere)],
                    return_state=True)
    by_name = {Path(r["input"]).name: r for r in nightly_report(state)["inputs"]}
    assert by_name["outside.vrt"]["status"] == "done", by_name["outside.vrt"]
    assert by_name["linked.tif"]["status"] == "done", by_name["linked.tif"]
    assert (out / "outside.tif").is_file() and (out / "linked.tif").is_file()


def test_a_vrt_given_as_a_url_is_checked_once_downloaded(model, tmp_path, dask_cluster):
    """A URL input is staged (downloaded) before its header is read, which the header check skips: a VRT
    fetched so, whose raw bands read /etc/passwd, is refused as a local one is."""
    import fsspec

    from flows.config import SegmentOptions
    from flows.staging import segment_staged

    url = "memory://segflow-test-sources/raw.vrt"
    with fsspec.open(url, "w") as f:
        f.write(_raw_vrt(tmp_path / "raw.vrt", "/etc/passwd").read_text())
    try:
        with pytest.raises(UnsafeInputError, match=r"raw.vrt: its source '/etc/passwd' is a raw band's file"):
            segment_staged(url, model, str(tmp_path / "out"), SegmentOptions(), dask_cluster)
    finally:
        fsspec.filesystem("memory").rm("/segflow-test-sources", recursive=True)
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("raw")]
