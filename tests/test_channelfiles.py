"""nnU-Net's one file per channel (``case_0000.nii.gz``, ``case_0001.nii.gz``) segmented as one input.

A model trained with ``segflow train --dataset`` on an nnU-Net / Decathlon
layout took two channels from two files; ``segment`` and ``nightly`` had
refused the same files ("takes 2 channels, the input has 1").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flows.inputs import expand, ingest_input
from storage.channelfiles import ChannelFiles, group_channel_files
from tests.models import tiny_model

SEGFLOW = [sys.executable, "-m", "flows"]
SHAPE = (30, 28, 20)


def run(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def affine() -> np.ndarray:
    a = np.diag([1.2, 1.0, 2.0, 1.0])
    a[:3, 3] = [-10.0, 5.0, 3.0]
    return a


def channels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two channels of different dtypes (float32 and int16), as a T1 and a FLAIR file often are."""
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 20, SHAPE).astype(np.float32), rng.integers(0, 500, SHAPE).astype(np.int16))


def save(data: np.ndarray, path: Path, aff: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("cf") / "model", spatial_dims=3, channels=2, roi=[16, 16, 16])


def test_a_cases_channel_files_are_one_input_equal_to_the_stacked_4d_nifti(model, tmp_path):
    """The labels of case_0000 + case_0001 equal those of one 4-D NIfTI of the same channels, on the same grid,
    named after the case; the provenance lists each file, and verify rehashes them."""
    t1, flair = channels()
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    files = [save(t1, folder / "BraTS_001_0000.nii.gz"), save(flair, folder / "BraTS_001_0001.nii.gz")]
    save(np.stack([t1, flair.astype(np.float32)], axis=-1), tmp_path / "stacked.nii.gz")
    proc = run("segment", *files, "--model", model.path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert f"ok {folder / 'BraTS_001'}_0000..0001.nii.gz -> {tmp_path / 'out' / 'BraTS_001.nii.gz'}" in proc.stderr
    proc = run("segment", tmp_path / "stacked.nii.gz", "--model", model.path, "--out", tmp_path / "ref")
    assert proc.returncode == 0, proc.stderr
    labels, reference = nib.load(tmp_path / "out" / "BraTS_001.nii.gz"), nib.load(tmp_path / "ref" / "stacked.nii.gz")
    assert labels.shape == SHAPE and np.array_equal(labels.affine, reference.affine)
    assert np.array_equal(np.asarray(labels.dataobj), np.asarray(reference.dataobj))
    assert len(np.unique(np.asarray(labels.dataobj))) > 1  # a label map, not one class everywhere

    record = json.loads((tmp_path / "out" / "BraTS_001.provenance.json").read_text())
    assert [(c["channel"], c["path"]) for c in record["input"]["channel_files"]] == \
        [(0, str(files[0].resolve())), (1, str(files[1].resolve()))]
    assert run("verify", tmp_path / "out" / "BraTS_001.provenance.json").returncode == 0
    save(flair[::-1].copy(), files[1])  # another FLAIR under the same name
    proc = run("verify", tmp_path / "out" / "BraTS_001.provenance.json")
    assert proc.returncode == 1 and f"channel file {files[1].resolve()} changed" in proc.stdout + proc.stderr


def test_channel_files_that_do_not_make_a_case_are_refused_in_one_line_and_the_batch_goes_on(model, tmp_path):
    t1, flair = channels()
    folder = tmp_path / "in"
    folder.mkdir()
    shifted = affine()
    shifted[0, 3] += 5.0
    for name, data, aff in (("shape_0000", t1, None), ("shape_0001", t1[:, :, :10], None),
                            ("grid_0000", t1, None), ("grid_0001", t1, shifted),
                            ("vector_0000", t1, None), ("vector_0001", np.stack([t1, t1], -1), None),
                            ("good_0000", t1, None), ("good_0001", flair, None)):
        save(data, folder / f"{name}.nii.gz", aff)
    proc = run("segment", *sorted(folder.iterdir()), "--model", model.path, "--out", tmp_path / "out")
    assert proc.returncode == 1
    lines = errors(proc.stderr)
    assert sorted(lines) == sorted([
        f"error: {folder / 'shape_0001.nii.gz'}: has shape (30, 28, 10) but shape_0000.nii.gz has (30, 28, 20): one "
        "case's channel files share one voxel grid",
        f"error: {folder / 'grid_0001.nii.gz'}: is not on grid_0000.nii.gz's voxel grid (their affines differ): one "
        "case's channel files share one voxel grid",
        f"error: {folder / 'vector_0001.nii.gz'}: has 2 channels: nnU-Net channel files hold one each (it is one of "
        f"{folder / 'vector'}_0000..0001.nii.gz)"]), proc.stderr
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in names if not n.startswith("good.")] == ["reports"], names  # nothing of the refused cases
    assert "good.nii.gz" in names


def test_grouping_takes_only_a_whole_local_case_named_together(tmp_path, monkeypatch):
    """A lone _0000 stays a plain file (a one-channel case); files of two folders are not one case, one folder
    spelled two ways is, and so are .nii beside .nii.gz; the group stands where its first file was, and other
    inputs keep their order."""
    t1, _ = channels()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    lone = save(t1, a / "lone_0000.nii.gz")
    first = save(t1, a / "case_0000.nii.gz")
    other = save(t1, b / "case_0001.nii.gz")  # the same case name in another folder
    plain = save(t1, a / "scan.nii.gz")
    second = save(t1, a / "case_0001.nii.gz")
    unzipped = save(t1, a / "case_0002.nii")  # another ending, the same case
    items, failed = expand([str(p) for p in (lone, first, other, plain, second, unzipped)])
    assert failed == []
    assert items == [str(lone), ChannelFiles("case", (first, second, unzipped)), str(other), str(plain)]
    # the channel order is the files' numbers, not the order given; a relative spelling is the same folder
    monkeypatch.chdir(tmp_path)
    assert group_channel_files(["a/case_0001.nii.gz", str(first), str(unzipped), "a/case_0000.nii.gz"]) == \
        [ChannelFiles("case", (first, Path("a/case_0001.nii.gz"), unzipped))]  # a file given twice: once


def test_one_channel_scans_numbered_like_channels_stay_separate_inputs(model, tmp_path):
    """AMOS and WORD number their one-channel scans amos_0001, amos_0004 ...: the first grouping refused them as
    a case with channels missing.  Numbers that do not start at _0000 without a gap are no case, and a whole
    case of K files stays K inputs where no model takes K channels and one takes one."""
    t1, _ = channels()
    amos = [save(t1, tmp_path / f"amos_{n:04d}.nii.gz") for n in (1, 4, 5)]
    assert group_channel_files([str(p) for p in amos]) == [str(p) for p in amos]
    word = [str(save(t1, tmp_path / f"word_{n:04d}.nii.gz")) for n in range(3)]
    assert group_channel_files(word, takes={1}) == word  # a one-channel model and none of 3: each alone
    assert group_channel_files(word, takes={1, 3}) == [ChannelFiles("word", tuple(map(Path, word)))]
    assert group_channel_files(word, takes={2}) == [ChannelFiles("word", tuple(map(Path, word)))]  # refused whole
    one = tiny_model(tmp_path / "one", spatial_dims=3, channels=1, roi=[16, 16, 16])
    proc = run("segment", *amos, *word, "--model", one.path, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "out").glob("*.nii.gz")} == \
        {"amos_0001.nii.gz", "amos_0004.nii.gz", "amos_0005.nii.gz", "word_0000.nii.gz", "word_0001.nii.gz",
         "word_0002.nii.gz"}
    proc = run("segment", *word, "--model", model.path, "--out", tmp_path / "out2")  # two channels, three files
    assert errors(proc.stderr) == [
        f"error: {tmp_path / 'word'}_0000..0002.nii.gz: model 'tiny-3d-2ch' takes 2 channels, the input is 3 nnU-Net "
        "channel files of one case (word_0000 ... word_0002): give the 2 files it takes, or use a model that takes 3"]


def test_an_ingest_of_channel_files_is_reused_only_while_every_file_is_unchanged(tmp_path):
    t1, flair = channels()
    ref = ChannelFiles("case", (save(t1, tmp_path / "case_0000.nii.gz"), save(flair, tmp_path / "case_0001.nii.gz")))
    store, reused = ingest_input(ref, tmp_path / "work", 16)
    assert not reused and store.image.shape == (2, *reversed(SHAPE)) and store.image.dtype == np.float32
    assert np.array_equal(store.image[1], flair.T.astype(np.float32))  # channel 1 is the second file, k-j-i
    assert ingest_input(ref, tmp_path / "work", 16)[1]
    save(flair + 1, ref.files[1])
    store, reused = ingest_input(ref, tmp_path / "work", 16)
    assert not reused and np.array_equal(store.image[1], (flair + 1).T.astype(np.float32))


def test_nightly_takes_a_case_from_the_inbox_once(model, tmp_path):
    t1, flair = channels()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    save(t1, inbox / "case7_0000.nii.gz")
    save(flair, inbox / "case7_0001.nii.gz")
    args = ("nightly", "--model", model.path, "--inbox", inbox, "--out", tmp_path / "out", "--settle", "0")
    for status in ("done", "skipped"):
        proc = run(*args)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(max((tmp_path / "out" / "reports").glob("*.json")).read_text())
        assert [(i["input"], i["status"], i["channels"]) for i in report["inputs"]] == \
            [(f"{inbox / 'case7'}_0000..0001.nii.gz", status, 2)]
    assert (tmp_path / "out" / "case7.nii.gz").is_file()


def test_a_case_waits_in_the_inbox_while_one_of_its_channel_files_arrives(tmp_path):
    """An old _0000 beside a _0001 still being copied: both wait (alone, _0000 went in as a one-channel input)."""
    from flows.inbox import still_arriving

    t1, flair = channels()
    old = [save(t1, tmp_path / "case_0000.nii.gz"), save(t1, tmp_path / "other_0000.nii.gz"),
           save(t1, tmp_path / "plain.nii.gz")]
    for path in old:
        os.utime(path, (1e9, 1e9))
    fresh = save(flair, tmp_path / "case_0001.nii.gz")
    paths = [str(p) for p in (*old, fresh)]
    assert sorted(still_arriving(paths, 60)) == [str(old[0]), str(fresh)]
    os.utime(fresh, (1e9, 1e9))
    assert still_arriving(paths, 60) == {}
    # rsync copies under a hidden name, then renames: the finished _0000 and _0001 wait for their hidden _0002
    partial = tmp_path / ".case_0002.nii.gz.Ab12Cd"
    partial.write_bytes(b"\x1f\x8b")
    assert sorted(still_arriving(paths, 60)) == [str(old[0]), str(fresh)]
    os.utime(partial, (1e9, 1e9))  # a copy given up long ago holds nothing
    assert still_arriving(paths, 60) == {}


def test_a_case_that_does_not_fit_the_model_is_told_as_channel_files(tmp_path):
    """A case of 2 files before a 4-channel model had been told about a 4-D NIfTI's 4th axis and time series."""
    from flows.routing import ModelInput, fit_problem
    from storage.probe import probe

    t1, flair = channels()
    ref = ChannelFiles("case", (save(t1, tmp_path / "case_0000.nii.gz"), save(flair, tmp_path / "case_0001.nii.gz")))
    header = probe(ref)
    assert header.channels == 2 and header.path == ref.display
    assert fit_problem(header, ModelInput("m4", 3, 4)) == (
        "model 'm4' takes 4 channels, the input is 2 nnU-Net channel files of one case (case_0000 ... case_0001): "
        "case_0002, case_0003 are not among the files given")
    assert fit_problem(header, ModelInput("m1", 3, 1)) == (
        "model 'm1' takes 1 channel, the input is 2 nnU-Net channel files of one case (case_0000 ... case_0001): "
        "give each file alone")
