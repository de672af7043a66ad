"""The run directory and its resumable-directory primitive (erasekit.rundir)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.edit import Edit, EraseRequest
from erasekit.rundir import ResumableDir, RunDir, RunDirMismatch, identity_diff, shard_name
from erasekit.runs import RunDirInUse

IDENT = {"method": "uce", "config": {"lamb": 0.5, "preset": "authors", "templates": ("a {}", "{}")}, "seed": 0}


def _edit() -> Edit:
    return Edit(
        tensors={"unet.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        method="uce",
        config={"lamb": 0.5},
        request=EraseRequest(erase=["triangle"], preserve=["square"]),
        base={"id": "shapes", "fingerprint": "abc"},
    )


def test_create_writes_run_json_with_identity_and_provenance(tmp_path):
    rd = RunDir.create(tmp_path / "r", IDENT)
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["layout"] == 1
    assert meta["identity"]["config"]["templates"] == ["a {}", "{}"]  # compared as JSON: tuples are lists
    assert {"created", "erasekit", "git"} <= set(meta)
    assert rd.identity == meta["identity"]
    assert rd.edit_dir == tmp_path / "r" / "edit" and rd.train_dir == tmp_path / "r" / "train"
    assert rd.eval_dir("shapes-objects") == tmp_path / "r" / "eval" / "shapes-objects"
    assert rd.attack_dir("inversion") == tmp_path / "r" / "attacks" / "inversion"
    assert rd.analysis_dir == tmp_path / "r" / "analysis" and rd.report_path == tmp_path / "r" / "report.html"


def test_same_identity_continues_and_other_identity_is_refused_naming_the_fields(tmp_path):
    RunDir.create(tmp_path, IDENT)
    RunDir.create(tmp_path, json.loads(json.dumps(IDENT)))  # same settings (lists for tuples): continues
    other = {**IDENT, "config": {**IDENT["config"], "lamb": 0.1}, "seed": 3}
    with pytest.raises(RunDirMismatch) as e:
        RunDir.create(tmp_path, other)
    msg = str(e.value)
    assert "config.lamb: 0.5 -> 0.1" in msg and "seed: 0 -> 3" in msg
    assert "--force" in msg and "another folder" in msg
    assert e.value.differences == ["config.lamb: 0.5 -> 0.1", "seed: 0 -> 3"]
    assert isinstance(e.value, ValueError)  # the CLI's error handler turns it into one line, exit 2
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["seed"] == 0  # nothing overwritten


def test_force_rewrites_the_identity_and_clears_stages(tmp_path):
    rd = RunDir.create(tmp_path, IDENT)
    rd.mark("erase", "done")
    other = {**IDENT, "seed": 9}
    rd2 = RunDir.create(tmp_path, other, force=True)
    assert rd2.identity["seed"] == 9
    assert RunDir.open(tmp_path).identity["seed"] == 9
    assert rd2.stages() == []


def test_identity_diff_names_added_and_removed_keys():
    assert identity_diff({"a": 1, "b": {"c": 2}}, {"b": {"c": 2, "d": 4}}) == ["a: 1 -> (absent)", "b.d: (absent) -> 4"]
    assert identity_diff({"a": [1, 2]}, {"a": [1, 2]}) == []


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RunDir.open(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        RunDir.create(tmp_path / "f", IDENT)


def test_bad_folder_names_are_refused(tmp_path):
    rd = RunDir.create(tmp_path, IDENT)
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="protocol"):
            rd.eval_dir(bad)
    with pytest.raises(ValueError, match="stay inside"):
        rd.write_json("../escape.json", {})


def test_json_and_metrics_round_trip(tmp_path):
    rd = RunDir.create(tmp_path, IDENT)
    assert rd.read_json("x/y.json", default={"d": 1}) == {"d": 1}
    rd.write_json("x/y.json", {"b": 2, "a": (1, 2)})
    assert rd.read_json("x/y.json") == {"a": [1, 2], "b": 2}
    assert rd.metrics("shapes-objects") is None
    rd.write_metrics("shapes-objects", {"esr_1": 0.9})
    assert rd.metrics("shapes-objects") == {"esr_1": 0.9}
    assert (tmp_path / "eval" / "shapes-objects" / "metrics.json").exists()
    assert rd.evaluated() == ["shapes-objects"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        rd.read_json("bad.json")


def test_index_survives_a_line_cut_by_a_crash(tmp_path):
    rd = RunDir.create(tmp_path, IDENT)
    rd.append("eval/p/index.jsonl", {"i": 0})
    rd.append("eval/p/index.jsonl", [{"i": 1}, {"i": 2}])
    with open(tmp_path / "eval/p/index.jsonl", "ab") as f:
        f.write(b'{"i": 3, "cut')  # a crash in the middle of a line
    assert [r["i"] for r in rd.records("eval/p/index.jsonl")] == [0, 1, 2]
    rd.append("eval/p/index.jsonl", {"i": 3})  # the cut line is dropped, the record redone
    assert [r["i"] for r in rd.records("eval/p/index.jsonl")] == [0, 1, 2, 3]
    assert [r["i"] for r in rd.records("eval/p/index.jsonl", valid=lambda r: r["i"] % 2 == 0)] == [0, 2]
    assert rd.records("missing.jsonl") == []


def test_lock_refuses_a_second_writer_with_the_pid(tmp_path):
    import os

    rd = RunDir.create(tmp_path, IDENT)
    with rd.lock():
        with pytest.raises(RunDirInUse, match=f"PID {os.getpid()}"):
            with RunDir.open(tmp_path).lock():
                pass
        rd.mark("erase", "done")  # stage marks do not need the run's lock
    with rd.lock():  # released
        pass


def test_stage_marks(tmp_path):
    rd = RunDir.create(tmp_path, IDENT)
    assert rd.stage("erase") is None
    rd.mark("erase", "failed", error=RuntimeError("out of memory"))
    rd.mark("erase", "done", seconds=1.5)
    rd.mark("eval", "done", protocol="shapes-objects")
    again = RunDir.open(tmp_path)
    assert [s["stage"] for s in again.stages()] == ["erase", "erase", "eval"]
    assert again.stages()[0]["error"] == "RuntimeError: out of memory"
    assert again.stage("erase")["status"] == "done" and again.stage("erase")["seconds"] == 1.5
    assert json.loads((tmp_path / "run.json").read_text())["identity"] == again.identity  # identity kept
    with pytest.raises(ValueError, match="error"):
        rd.mark("eval", "failed")
    with pytest.raises(ValueError, match="'done' or 'failed'"):
        rd.mark("eval", "ok")


def test_edit_round_trip_and_the_older_layout(tmp_path):
    rd = RunDir.create(tmp_path / "r", IDENT)
    assert not rd.has_edit() and rd.edit_digest() is None
    with pytest.raises(FileNotFoundError, match="holds no edit"):
        rd.load_edit()
    edit = _edit()
    rd.save_edit(edit)
    assert (tmp_path / "r" / "edit" / "edit.json").exists() and rd.has_edit()
    assert rd.edit_digest() == edit.digest()  # from the metadata, tensors not loaded
    back = RunDir.open(tmp_path / "r").load_edit()
    assert back.digest() == edit.digest() and back.request == edit.request
    # the layout before run.json: edit.json and config.json at the top of the folder
    old = tmp_path / "old"
    edit.save(old)
    (old / "config.json").write_text(json.dumps({"method": "uce", "seed": 0}))
    legacy = RunDir.open(old)
    assert legacy.identity == {"method": "uce", "seed": 0}
    assert legacy.has_edit() and legacy.load_edit().digest() == edit.digest()
    legacy.mark("report", "done")  # upgrades: a layout-1 run.json with the old identity
    assert RunDir.open(old).identity == {"method": "uce", "seed": 0} and RunDir.open(old).stage("report")


def test_resumable_dir_reads_an_identity_file_from_before_the_layout(tmp_path):
    (tmp_path / "generation.json").write_text(json.dumps({"weights": "w1", "sampling": {"steps": 4}}))
    ResumableDir(tmp_path, {"weights": "w1", "sampling": {"steps": 4}}, meta="generation.json")
    with pytest.raises(RunDirMismatch, match=r"sampling.steps: 4 -> 8"):
        ResumableDir(
            tmp_path, {"weights": "w1", "sampling": {"steps": 8}}, meta="generation.json", what="generation folder"
        )


def test_shards_merge_into_one_index(tmp_path):
    rd = ResumableDir(tmp_path, {"k": 1})
    assert shard_name("index.jsonl", 3) == "index.rank3.jsonl"
    rd.append("index.jsonl", {"key": "a", "v": 0})
    rd.append(shard_name("index.jsonl", 1), [{"key": "c", "v": 1}, {"key": "a", "v": 9}])
    rd.append(shard_name("index.jsonl", 0), {"key": "b", "v": 2})
    assert rd.shards("index.jsonl") == ["index.jsonl", "index.rank0.jsonl", "index.rank1.jsonl"]
    merged = rd.merge("index.jsonl", key=lambda r: r["key"], order=["c", "b"])
    assert list(merged) == ["c", "b", "a"] and merged["a"]["v"] == 0  # the first record of a key wins
    assert [r["key"] for r in rd.records("index.jsonl")] == ["c", "b", "a"]
    assert rd.shards("index.jsonl") == ["index.jsonl"]


def test_png_written_atomically(tmp_path):
    rd = ResumableDir(tmp_path, {"k": 1})
    img = np.zeros((8, 8, 3), np.uint8)
    img[2, 3] = 255
    rel = rd.write_png("images/a.png", img)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / rel)), img)
    assert not list((tmp_path / "images").glob(".*tmp"))


def test_update_meta_keeps_the_identity(tmp_path):
    rd = ResumableDir(tmp_path, {"k": 1}, meta="attack.json")
    rd.update_meta(prepare_cost={"seconds": 1.0})
    assert ResumableDir(tmp_path, {"k": 1}, meta="attack.json").meta["prepare_cost"] == {"seconds": 1.0}
    with pytest.raises(ValueError, match="identity"):
        rd.update_meta(identity={})
