"""`segflow demo`'s folder: it replaces inputs/, models/ and outputs/ there, so only a demo's own folder is reused."""

from __future__ import annotations

import pytest

from flows.demo import DEMO_MARKER, claim_workdir
from storage.errors import SegflowError


def test_the_demo_never_empties_a_folder_it_did_not_make(tmp_path):
    project = tmp_path / "project"  # a user's folder with an inputs/ of their own
    (project / "inputs").mkdir(parents=True)
    (project / "inputs" / "scan.nii.gz").write_bytes(b"precious")
    with pytest.raises(SegflowError, match="not empty and not a demo's folder"):
        claim_workdir(project)
    assert (project / "inputs" / "scan.nii.gz").read_bytes() == b"precious"
    assert not (project / DEMO_MARKER).exists()

    (tmp_path / "file").write_text("x")
    with pytest.raises(SegflowError, match="is a file"):
        claim_workdir(tmp_path / "file")

    demo = tmp_path / "demo" / "run-1"  # new: made and marked; marked: taken again (a rerun)
    claim_workdir(demo)
    assert (demo / DEMO_MARKER).is_file()
    (demo / "inputs").mkdir()
    claim_workdir(demo)
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_workdir(empty)
