"""The HTML run report: self-contained, escaped, relative links, and checked in a real headless Chromium.

The generators below write a small, demo-like run to ``tmp_path``: a land-cover
GeoTIFF and a head NIfTI segmented (real label files, their real quicklooks
drawn by :mod:`storage.quicklook`, provenance sidecars, model cards), one
failed input whose name and error line carry HTML, and one skipped input.
The page is parsed with :mod:`html.parser`; the browser test loads it from
disk in Debian's Chromium, takes the screenshot and reads back from the DOM
whether every image decoded.  ``SEGFLOW_UPDATE_SCREENSHOT=1`` also copies that
screenshot to ``docs/report-screenshot.png`` (the README's picture).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from flows.htmlreport import (as_run_report, find_quicklooks, previous_report_path, quicklook_path,
                              read_run_report, write_html_report)
from flows.report import REPORT_SCHEMA
from tests.report_samples import EVIL_ERROR, sample_run  # noqa: F401  (the generated run)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2000)
class Page(HTMLParser):
    """The parts of a page the tests look at: tags with their attributes, and the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._skip = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        self._skip += tag in ("style", "script")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained_escaped_and_links_relative(tmp_path):
    run = sample_run(tmp_path)
    path = write_html_report(run.report, run.html, quicklooks=run.quicklooks)
    raw = path.read_text(encoding="utf-8")
    page = Page(raw)

    images = page.all("img")
    assert len(images) == 2
    for img in images:  # each is the quicklook PNG itself, inline, with its true size
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as png:
            assert png.format == "PNG" and png.size == (int(img["width"]), int(img["height"]))
    assert {png.read_bytes() for png in run.quicklooks.values()} == {
        base64.b64decode(i["src"].partition(",")[2]) for i in images}
    # nothing is fetched from anywhere and nothing runs
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert all(a.get("src", "").startswith("data:") for t, a in page.tags if "src" in a)
    csp = next(m["content"] for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src" not in csp

    # the error line and the file name are shown as text, never as markup
    assert EVIL_ERROR in page.words
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in raw and "<script>" not in raw
    assert "bad<1>&.tif" in page.words and "bad&lt;1&gt;&amp;.tif" in raw

    # status of each input, colour-coded by class
    sections = [a for a in page.all("section") if "input" in a.get("class", "").split()]
    assert [a["class"] for a in sections] == ["input status-done", "input status-done", "input status-failed",
                                              "input status-skipped"]

    # every link is relative to the page's folder and reaches the file
    hrefs = [a["href"] for a in page.all("a")]
    files = [h for h in hrefs if not h.startswith("#")]
    assert files and all(not urlparse(h).scheme and not h.startswith("/") for h in hrefs)
    for href in files:
        assert (path.parent / unquote(href)).exists(), href
    assert "../scene-a.tif" in files and "../scene-a.provenance.json" in files
    assert "../head-b.provenance.json" in files

    # timings, windows, the model cards with their class colours
    words = page.words
    assert "ingest 0.41 s · inference 3.2 s · export 0.3 s · total 3.91 s" in words
    assert "windows 12 evaluated, 3 skipped (of 15)" in words
    assert "architecture unet input 2-D, 3 channels (red, green, blue) spacing 10 × 10 m (x × y)" in words
    swatches = [a["style"] for a in page.all("span") if a.get("class") == "swatch"]
    assert "background: rgb(30, 90, 200)" in swatches and "background: rgb(230, 30, 30)" in swatches


def test_numbers_as_people_write_them_and_changes_since_the_previous_run(tmp_path):
    def report(water_ha: float, lesion_ml: float) -> dict:
        return {"schema": "segflow.nightly-report/1", "run": {"summary": "2 inputs", "models": []},
                "inputs": [{"input": "/in/scene.tif", "status": "done", "measure": "area_ha", "cell_size": 100.0,
                            "labels": [{"value": 0, "name": "water", "count": 858604, "area_ha": water_ha}]},
                           {"input": "/in/head.nii.gz", "status": "done", "measure": "volume_ml", "cell_size": 1e-3,
                            "labels": [{"value": 2, "name": "lesion", "count": 12430, "volume_ml": lesion_ml}]}]}

    page = Page(write_html_report(report(85860.4, 12.43), tmp_path / "r.html").read_text()).words
    assert "water 858,604 85,860 ha" in page and "lesion 12,430 12.4 mL" in page
    assert "change" not in page  # no previous run given: no change column

    page = Page(write_html_report(report(85860.4, 12.43), tmp_path / "r.html",
                                  previous=report(80000.0, 13.1)).read_text()).words
    assert "85,860 ha +5,860.4 ha (+7.3 %)" in page  # storage.numbers.readable: one decimal below 10,000
    assert "12.4 mL −0.67 mL (−5.1 %)" in page


def test_the_previous_run_of_an_input_reached_through_a_link_is_found(tmp_path):
    """An inbox given through a link (or, from Python, as ``../n1/inbox``) named every input by another path than
    the night before, and every class of every input read "not in the previous run"."""
    real = tmp_path / "inbox"
    real.mkdir()
    (real / "scene.tif").write_bytes(b"scene")
    (tmp_path / "link").symlink_to(real)

    def report(inbox: Path, water_ha: float) -> dict:
        return {"schema": "segflow.nightly-report/1", "run": {"summary": "1 input", "models": []},
                "inputs": [{"input": str(inbox / "scene.tif"), "status": "done", "measure": "area_ha",
                            "cell_size": 100.0, "labels": [{"value": 0, "name": "water", "count": 10,
                                                            "area_ha": water_ha}]}]}

    page = Page(write_html_report(report(tmp_path / "link", 2.0), tmp_path / "r.html",
                                  previous=report(real, 1.0)).read_text()).words
    assert "not in the previous run" not in page and "+1 ha (+100.0 %)" in page


def test_a_nightly_inbox_given_with_dotdot_is_named_without_it(tmp_path, monkeypatch):
    from flows.nightly import _absolute

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert _absolute("../inbox") == str(tmp_path.resolve() / "inbox")
    assert _absolute("s3://bucket/inbox/../x") == "s3://bucket/inbox/../x"


def test_a_model_of_hundreds_of_classes_lists_those_present_now_or_before(tmp_path):
    """A 300-class model's table had 218 rows of "0 / 0 ha" around the few classes on the map."""
    def report(present: dict[int, int]) -> dict:
        labels = [{"value": v, "name": f"class {v}", "count": present.get(v, 0), "area_ha": present.get(v, 0) / 100}
                  for v in range(300)]
        return {"schema": "segflow.nightly-report/1", "run": {"summary": "1 input", "models": []},
                "inputs": [{"input": "/in/scene.tif", "status": "done", "measure": "area_ha", "cell_size": 100.0,
                            "labels": labels}]}

    page = Page(write_html_report(report({3: 500, 7: 900}), tmp_path / "r.html").read_text())
    assert "class 3 500 5 ha" in page.words and "class 7 900 9 ha" in page.words
    assert "class 4 " not in page.words and "298 more classes with no pixels" in page.words
    # a class that was there the night before and is gone now stays listed, with its change
    page = Page(write_html_report(report({3: 500}), tmp_path / "r.html", previous=report({3: 500, 7: 900}))
                .read_text())
    assert "class 7 0 0 ha −9 ha (−100.0 %)" in page.words and "298 more classes with no pixels" in page.words


def test_no_change_is_shown_against_another_models_run(tmp_path):
    """Compared with a night segmented by another model, every class was marked "new" as if it had appeared."""
    def report(model: str, names: list[str]) -> dict:
        labels = [{"value": v, "name": n, "count": 100, "area_ha": 1.0} for v, n in enumerate(names)]
        return {"schema": "segflow.nightly-report/1", "run": {"summary": "1 input", "models": []},
                "inputs": [{"input": "/in/scene.tif", "status": "done", "model": model, "measure": "area_ha",
                            "cell_size": 100.0, "labels": labels}]}

    page = Page(write_html_report(report("landcover-v2", ["water", "trees"]), tmp_path / "r.html",
                                  previous=report("landcover-v1", ["water", "forest"])).read_text()).words
    assert "water 100 1 ha previous run: model landcover-v1" in page and "new" not in page
    page = Page(write_html_report(report("landcover-v1", ["water"]), tmp_path / "r.html",
                                  previous=report("landcover-v1", ["water"])).read_text()).words
    assert "water 100 1 ha no change" in page


def test_segment_outcomes_are_adapted_and_the_report_command_finds_quicklooks(tmp_path):
    run = sample_run(tmp_path)
    scene = run.report["inputs"][0]
    outcomes = [{"input": scene["input"], "ok": True, "outputs": scene["outputs"], "error": None,
                 "statistics": {"windows_evaluated": 12, "windows_skipped": 3, "windows_total": 15,
                                "total_seconds": 3.91, "label_pixels": {str(r["value"]): r["count"]
                                                                        for r in scene["labels"]}}},
                {"input": str(tmp_path / "inbox" / "bad.tif"), "ok": False, "outputs": [], "error": EVIL_ERROR,
                 "statistics": {}}]
    view = as_run_report(outcomes)
    assert [r["status"] for r in view["inputs"]] == ["done", "failed"]
    done = view["inputs"][0]
    assert done["model"] == "landcover-2d" and done["kind"] == "raster"  # from the sidecar and the output's header
    assert done["cell_size"] == pytest.approx(0.01)
    assert [(r["name"], r["area_ha"]) for r in done["labels"]] == [(r["name"], pytest.approx(r["area_ha"]))
                                                                  for r in scene["labels"]]
    assert view["run"]["summary"] == "1 of 2 inputs failed; 1 done; 0 skipped"
    assert view["run"]["out_dir"] == str(Path(scene["outputs"][0]).parent)  # the page had said nothing of where
    assert as_run_report(outcomes[:1])["run"]["summary"] == "1 input: 1 done, 0 skipped"
    assert find_quicklooks(outcomes) == {scene["input"]: quicklook_path(run.out / "scene-a.tif")}
    demo_shape = as_run_report({"outcomes": outcomes, "seconds": 12.5, "dice": []})  # `segflow demo`'s report
    assert demo_shape["run"]["seconds"] == 12.5 and demo_shape["inputs"] == view["inputs"]

    report_json = run.out / "outcomes.json"
    report_json.write_text(json.dumps(outcomes))
    res = CliRunner().invoke(_app(), ["report", str(report_json), "--previous", str(report_json)])
    assert res.exit_code == 0, res.output
    page = Page((run.out / "outcomes.html").read_text())
    assert len(page.all("img")) == 1 and "no change" in page.words
    assert EVIL_ERROR in page.words

    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something/else"}')
    res = CliRunner().invoke(_app(), ["report", str(bad)])
    assert res.exit_code == 1 and "unknown report schema" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    edited = [[dict(outcomes[0], outputs=5)], {"schema": REPORT_SCHEMA, "run": {}, "inputs": [5]}]
    for i, content in enumerate(edited):  # hand-edited: a field of the wrong type is one line, not a traceback
        bad.write_text(json.dumps(content))
        res = CliRunner().invoke(_app(), ["report", str(bad)])
        assert res.exit_code == 1, (i, res.output)
        [line] = [line for line in res.output.splitlines() if line.strip()]
        assert line.startswith(f"error: {bad}: a field of the report is not as segflow writes it"), line


def test_a_moved_output_folder_rebuilds_the_same_page(tmp_path):
    """`segflow report` on a run whose OUT was moved (or copied elsewhere): the recorded paths are gone, so each
    output is found by its name in the report's own OUT.  The rebuilt page had no models, "class N" names, no
    quicklooks and links into the old place."""
    run = sample_run(tmp_path / "then")
    report_json = run.html.with_suffix(".json")
    report_json.write_text(json.dumps(run.report))
    first = Page(write_html_report(run.report, run.html, quicklooks=run.quicklooks).read_text())
    moved = tmp_path / "now" / "out"
    moved.parent.mkdir()
    shutil.move(str(run.out), moved)
    res = CliRunner().invoke(_app(), ["report", str(moved / "reports" / report_json.name), "--out",
                                      str(moved / "reports" / "rebuilt.html")])
    assert res.exit_code == 0, res.output
    path = moved / "reports" / "rebuilt.html"
    page = Page(path.read_text())
    files = [a["href"] for a in page.all("a") if not a["href"].startswith("#")]
    assert files and all((path.parent / unquote(h)).exists() for h in files), files
    assert len(page.all("img")) == 2
    assert [w for w in first.words.split() if w.endswith("ha")] == [w for w in page.words.split() if w.endswith("ha")]


def test_a_copied_output_folder_rebuilds_its_own_page_not_the_originals(tmp_path):
    """An archived copy of OUT, rebuilt while the original folder still exists and has been run again: the page
    showed the original's newer quicklooks and linked into the original folder (its recorded absolute paths)."""
    run = sample_run(tmp_path / "live")
    report_json = run.html.with_suffix(".json")
    report_json.write_text(json.dumps(run.report))
    archive = tmp_path / "archive"
    shutil.copytree(run.out, archive)
    for png in run.quicklooks.values():  # the live folder's next run: other pictures under the same names
        Image.new("RGB", (7, 5), (255, 0, 0)).save(png)
    res = CliRunner().invoke(_app(), ["report", str(archive / "reports" / report_json.name)])
    assert res.exit_code == 0, res.output
    path = archive / "reports" / report_json.with_suffix(".html").name
    page = Page(path.read_text())
    files = [unquote(a["href"]) for a in page.all("a") if not a["href"].startswith("#")]
    assert files and all((path.parent / h).resolve().is_relative_to(archive.resolve()) for h in files), files
    archived = {(archive / Path(p).name).read_bytes() for p in run.quicklooks.values()}
    shown = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.all("img")}
    assert shown == archived


def test_a_picture_deleted_from_a_copied_output_folder_is_not_taken_from_the_original(tmp_path):
    """An archived copy of OUT with one quicklook deleted, the original folder still there: the page embedded the
    original's picture (its recorded absolute path) as though it were the copy's."""
    run = sample_run(tmp_path / "live")
    report_json = run.html.with_suffix(".json")
    report_json.write_text(json.dumps(run.report))
    archive = tmp_path / "archive"
    shutil.copytree(run.out, archive)
    gone, kept = sorted(run.quicklooks.values())
    (archive / gone.name).unlink()
    res = CliRunner().invoke(_app(), ["report", str(archive / "reports" / report_json.name)])
    assert res.exit_code == 0, res.output
    page = Page((archive / "reports" / report_json.with_suffix(".html").name).read_text())
    shown = [base64.b64decode(img["src"].split(",", 1)[1]) for img in page.all("img")]
    assert gone.exists() and shown == [(archive / kept.name).read_bytes()]


def test_outputs_gone_since_the_run_are_said_missing_not_linked_dead(tmp_path):
    """A moved OUT with a label map and a quicklook deleted: the page linked the label map into the old folder,
    dropped the quicklook without a word, and lost the label map's own quicklook with it."""
    run = sample_run(tmp_path / "then")
    report = json.loads(json.dumps(run.report))
    scene, head = report["inputs"][0], report["inputs"][1]
    head["outputs"].append(str(quicklook_path(Path(head["outputs"][0]))))  # as the pipeline lists a quicklook
    report_json = run.html.with_suffix(".json")
    report_json.write_text(json.dumps(report))
    moved = tmp_path / "now" / "out"
    moved.parent.mkdir()
    shutil.move(str(run.out), moved)
    (moved / Path(scene["outputs"][0]).name).unlink()  # the label COG, its quicklook kept
    quicklook_path(moved / Path(head["outputs"][0]).name).unlink()
    res = CliRunner().invoke(_app(), ["report", str(moved / "reports" / report_json.name)])
    assert res.exit_code == 0, res.output
    path = moved / "reports" / report_json.with_suffix(".html").name
    page = Page(path.read_text())
    files = [unquote(a["href"]) for a in page.all("a") if not a["href"].startswith("#")]
    assert files and all((path.parent / h).exists() for h in files), files  # nothing linked dead
    assert "scene-a.tif (not found)" in page.words and "quicklook not found" in page.words
    assert len(page.all("img")) == 1  # the scene's quicklook, found by its own name


def test_previous_report_is_the_one_written_just_before(tmp_path):
    names = ["20261201T030000Z.json", "20261202T030000Z.json", "20261202T030000Z-2.json", "20261203T030000Z.json"]
    for n in names:
        (tmp_path / n).write_text("{}")
    assert previous_report_path(tmp_path / names[3]) == tmp_path / names[2]
    assert previous_report_path(tmp_path / names[2]) == tmp_path / names[1]
    assert previous_report_path(tmp_path / names[0]) is None


def test_a_report_that_is_no_report_is_one_line(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[1, 2]")
    with pytest.raises(Exception) as err:
        read_run_report(path)
    assert str(path) in str(err.value) and "not a segflow run report" in str(err.value)
    assert type(err.value).__name__ == "InvalidInputError"


def _app():  # noqa: ANN202
    from flows.cli import app

    return app


# --------------------------------------------------------------------------- in a real browser


PROBE = """<script>
addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), first = document.querySelector("img.quicklook");
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var r = first.getBoundingClientRect(), out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: imgs.length, loaded: ok, failed: imgs.length - ok,
                                    box: [r.left + scrollX, r.top + scrollY, r.width, r.height]});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium as a container runs it; its dbus and GPU warnings on stderr are noise."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package runs the browser test)")
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_chromium_renders_every_image_from_disk(tmp_path):
    run = sample_run(tmp_path)
    path = write_html_report(run.report, run.html, quicklooks=run.quicklooks)

    shot = tmp_path / "screenshot.png"
    _chromium(tmp_path, f"--screenshot={shot}", path.as_uri())
    # a copy of the page that reports, from the DOM, which images decoded; its CSP lets only this script run
    probe = path.with_name("probe.html")
    text = path.read_text(encoding="utf-8")
    probe.write_text(text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                     .replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    found = Page(dom)
    assert "probe" in [a.get("id") for a in found.all("pre")], dom[-1000:]
    result = json.loads(next(t for t in found.text if t.lstrip().startswith('{"images"')))
    assert result["images"] == 2 and result["loaded"] == 2 and result["failed"] == 0
    # under the page's own policy the same script never runs: markup slipped into a report could not either
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom", probe.as_uri()).stdout
    assert "probe" not in [a.get("id") for a in Page(dom).all("pre")]

    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == WINDOW
        left, top, width, height = (round(v) for v in result["box"])
        assert width > 100 and height > 100 and top + height <= WINDOW[1]
        quicklook = img.convert("L").crop((left, top, left + width, top + height))
        assert ImageStat.Stat(quicklook).stddev[0] > 20  # a picture, not a blank box
    if os.environ.get("SEGFLOW_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "report-screenshot.png")


def test_a_skipped_inputs_quicklook_is_linked_not_embedded_again(tmp_path):
    """Embedded again every night: a nightly page of 255 done (skipped) inputs was 32 MB, night after night. The
    picture is in the page of the run that made it; tonight's page links the file."""
    run = sample_run(tmp_path)
    scene_a = run.report["inputs"][0]
    scene_a["status"] = "skipped"
    scene_a["outputs"] = [*scene_a["outputs"], str(run.quicklooks[scene_a["input"]])]  # as a run lists it
    raw = write_html_report(run.report, run.html, quicklooks=run.quicklooks).read_text(encoding="utf-8")
    page = Page(raw)
    assert [img["alt"] for img in page.all("img")] == ["quicklook of head-b.nii.gz"]
    assert "scene-a.quicklook.png" in [Path(a["href"]).name for a in page.all("a") if "href" in a]
