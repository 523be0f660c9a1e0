"""Prefect artifacts of a run, created in a real flow run on a real local Prefect server and read back.

The server is the one ``tests/test_schedule.py`` starts (``prefect server
start`` on a free loopback port, SQLite in a temporary PREFECT_HOME); a tiny
flow in this process publishes the sample run of ``tests/test_htmlreport.py``
against it, and the Prefect client reads the table, markdown and link
artifacts back by the flow run's id.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import tests.test_schedule as schedule_tests
from flows.artifacts import artifact_key, publish_artifacts, results_table
from flows.htmlreport import as_run_report, write_html_report
from tests.report_samples import EVIL_ERROR, sample_run

prefect_server = schedule_tests.prefect_server  # the module-scoped server fixture, reused


def test_keys_are_valid_prefect_artifact_keys():
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only

    for text, key in [("segflow-nightly", "segflow-nightly"), ("---", "segflow"), ("a" * 300, "a" * 100),
                      ("Segflow Nightly/<Inbox> ü 2026", "segflow-nightly-inbox-2026")]:
        assert artifact_key(text) == key
        raise_on_name_alphanumeric_dashes_only(artifact_key(text))  # what Prefect itself checks


def test_table_rows_share_their_keys_and_hold_plain_values(tmp_path):
    rows = results_table(as_run_report(sample_run(tmp_path).report))
    assert [r["status"] for r in rows] == ["done", "done", "failed", "skipped"]
    assert len({tuple(r) for r in rows}) == 1  # the UI takes its columns from the first row
    assert all(isinstance(v, (str, int, float)) for r in rows for v in r.values())
    assert rows[0]["classes"] == "water, forest, cropland, built-up" and rows[0]["areas / volumes"].endswith(" ha")
    assert rows[1]["areas / volumes"].startswith("background ") and " mL" in rows[1]["areas / volumes"]
    assert rows[2]["error"] == EVIL_ERROR


def test_outside_a_flow_run_nothing_is_published(tmp_path):
    run = sample_run(tmp_path)
    assert publish_artifacts(run.report, html_path=None, quicklooks=run.quicklooks) == []


@pytest.mark.slow
def test_artifacts_in_a_flow_run_on_a_prefect_server(prefect_server, tmp_path, monkeypatch):
    from prefect import artifacts, flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    api, _ = prefect_server
    run = sample_run(tmp_path)
    html = write_html_report(run.report, run.html, quicklooks=run.quicklooks)

    @flow(name="segflow-artifacts-test", persist_result=False)
    def publish(broken: bool) -> list[str]:
        if broken:  # the table fails to publish: logged and skipped, the rest still made, the run not failed
            monkeypatch.setattr(artifacts, "create_table_artifact", _raise)
        return publish_artifacts(run.report, html_path=html, quicklooks=run.quicklooks)

    # logs stay local: shipped in the background, they would outlive this module's server
    with temporary_settings({PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_ENABLED: False}):
        state = publish(False, return_state=True)
        broken = publish(True, return_state=True)
        with get_client(sync_client=True) as client:
            found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))}
            after_error = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[broken.state_details.flow_run_id])))}

    keys = ["segflow-nightly-inputs", "segflow-nightly-summary", "segflow-nightly-html-report"]
    assert state.is_completed() and state.result() == keys
    assert set(found) == set(keys)
    assert broken.is_completed() and broken.result() == keys[1:] and after_error == set(keys[1:])

    table = found["segflow-nightly-inputs"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["input"], r["status"]) for r in rows] == [("scene-a.tif", "done"), ("head-b.nii.gz", "done"),
                                                        ("bad<1>&.tif", "failed"), ("scene-c.tif", "skipped")]
    assert rows[0]["seconds"] == 4.21 and rows[2]["error"] == EVIL_ERROR

    markdown = found["segflow-nightly-summary"]
    assert markdown.type == "markdown"
    text = markdown.data
    assert "1 of 4 inputs failed" in text and "\\<script\\>" in text and "<script>" not in text
    thumbs = [line for line in text.splitlines() if line.startswith("![quicklook of ")]
    assert len(thumbs) == 2
    for line in thumbs:  # inline thumbnails the UI shows (data:image/ is allowed there), a few hundred pixels
        data = base64.b64decode(line.split("data:image/png;base64,")[1].rstrip(")"))
        with Image.open(io.BytesIO(data)) as img:
            assert max(img.size) <= 320
    for png in run.quicklooks.values():  # and each full PNG as a file link and its path as text
        assert f"]({png.as_uri()})" in text and f"`{png}`" in text

    link = found["segflow-nightly-html-report"]
    assert link.data == f"[{html}]({html.as_uri()})"


def _raise(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise RuntimeError("the API refused the artifact")


def test_the_summary_stays_under_prefects_event_limit_with_many_quicklooks(tmp_path):
    """150 inputs' thumbnails (about 36 KB each) made a 5.4 MB artifact, which Prefect refused to publish
    ("Refusing to publish event of size 5412220"); the thumbnails stop at 1 MB, the rest named by path."""
    import numpy as np

    from flows.artifacts import MAX_INLINE_TOTAL, summary_markdown, thumbnail_uri

    png = tmp_path / "noisy.quicklook.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8)).save(png)
    one = len(thumbnail_uri(png))
    assert 20_000 < one < 150_000
    inputs = [{"input": f"/inbox/scene-{i:03d}.tif", "status": "done"} for i in range(150)]
    run = {"run": {"started": "2026-12-06T00:00:00Z", "summary": "150 done", "state": "Completed"},
           "inputs": inputs}
    text = summary_markdown(run, {r["input"]: png for r in inputs}, None)
    assert MAX_INLINE_TOTAL - one < len(text) < 1_500_000
    shown = text.count("![quicklook of")
    assert shown == MAX_INLINE_TOTAL // one
    assert f"The thumbnails of {150 - shown} more quicklooks are left out" in text
    assert all(f"scene-{i:03d}.tif" in text for i in range(150))  # every input still named, with its PNG's path
