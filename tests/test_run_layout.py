"""The one run-directory layout through the CLI, and the bugs issue 14 found on the way."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.edit import Edit
from erasekit.rundir import RunDir

runner = CliRunner()
ESD = ["--method", "esd", "--erase", "star", "--set", "steps=3", "--set", "ddim_steps=2", "--set", "lr=1e-3"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_erase_writes_the_run_layout_and_evaluate_defaults_into_it(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    r = _run("erase", "--model", tiny_pipe_dir, "--erase", "star", "--out", run)
    assert r.exit_code == 0, r.output
    rd = RunDir.open(run)
    assert rd.identity["method"] == "uce" and rd.stage("erase")["status"] == "done"
    assert rd.has_edit() and (run / "edit" / "edit.json").exists() and not (run / "edit.json").exists()
    assert Edit.load(run).digest() == rd.load_edit().digest()  # a run directory is accepted wherever an edit is
    # a second erase into the same folder with other settings is refused (the identity), naming the key
    r = _run("erase", "--model", tiny_pipe_dir, "--erase", "star", "--set", "lamb=0.1", "--out", run, "--overwrite")
    assert r.exit_code == 0, r.output  # --overwrite is --force: the identity is rewritten
    assert RunDir.open(run).identity["config"]["lamb"] == 0.1
    # evaluate --edit RUN without --out: RUN/eval/<protocol>/ (images, index, metrics.json) + a stage mark
    r = _run("evaluate", "--protocol", "shapes-objects", "--model", tiny_pipe_dir, "--edit", run,
             "--n-per-class", "1", "--steps", "1", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    rd = RunDir.open(run)
    assert rd.evaluated() == ["shapes-objects"] and rd.metrics("shapes-objects")["n_per_class"] == 1
    assert len(rd.records("eval/shapes-objects/index.jsonl")) == 10 and rd.stage("eval")["protocol"] == "shapes-objects"


def test_set_seed_is_honoured_from_the_cli(tiny_pipe_dir, tmp_path):
    a = _run("erase", "--model", tiny_pipe_dir, *ESD, "--set", "seed=3", "--out", tmp_path / "a")
    b = _run("erase", "--model", tiny_pipe_dir, *ESD, "--seed", "3", "--out", tmp_path / "b")
    c = _run("erase", "--model", tiny_pipe_dir, *ESD, "--set", "seed=4", "--out", tmp_path / "c")
    assert a.exit_code == b.exit_code == c.exit_code == 0, a.output + b.output + c.output
    ea, eb, ec = (Edit.load(tmp_path / n) for n in "abc")
    assert ea.config["seed"] == 3 and ea.trace["seed"] == 3 and ec.trace["seed"] == 4
    assert all(torch.equal(ea.tensors[k], eb.tensors[k]) for k in ea.tensors)  # --seed is the same option
    assert any(not torch.equal(ea.tensors[k], ec.tensors[k]) for k in ea.tensors)  # and it changes the result
    r = _run("erase", "--model", tiny_pipe_dir, *ESD, "--seed", "3", "--set", "seed=4", "--out", tmp_path / "d")
    assert r.exit_code == 2 and "disagree" in r.output and not (tmp_path / "d").exists()


def test_interrupted_erase_with_run_dir_set_to_out_keeps_its_checkpoints_and_resumes_exactly(
    tiny_pipe_dir, tmp_path, monkeypatch
):
    from erasekit.methods import esd

    full = _run("erase", "--model", tiny_pipe_dir, *ESD, "--out", tmp_path / "full")
    assert full.exit_code == 0, full.output
    run = tmp_path / "run"
    step = esd.ESDLoss.step

    def interrupt(self, ctx, batch):
        if batch.step == 2:
            raise KeyboardInterrupt
        return step(self, ctx, batch)

    monkeypatch.setattr(esd.ESDLoss, "step", interrupt)
    args = ["erase", "--model", tiny_pipe_dir, *ESD, "--set", "checkpoint_every=1", "--set", f"run_dir={run}"]
    r = _run(*args, "--out", run)
    assert r.exit_code != 0  # Ctrl-C
    assert run.is_dir(), "the interrupted run (with checkpoints) was deleted"
    assert sorted(p.name for p in (run / "train" / "checkpoints").glob("step-*")) == ["step-00000002"]
    failed = RunDir.open(run).stage("erase")
    assert failed["status"] == "failed" and "KeyboardInterrupt" in failed["error"]
    monkeypatch.setattr(esd.ESDLoss, "step", step)
    r = _run(*args, "--set", "resume=true", "--overwrite", "--out", run)
    assert r.exit_code == 0, r.output
    resumed, ref = Edit.load(run), Edit.load(tmp_path / "full")
    assert resumed.trace["steps_this_call"] == 1
    assert all(torch.equal(resumed.tensors[k], ref.tensors[k]) for k in ref.tensors)
    assert RunDir.open(run).stage("erase")["status"] == "done"


def test_erase_and_generate_share_one_default_device(tiny_pipe_dir, tmp_path, monkeypatch):
    import erasekit.cli.erase
    import erasekit.eval.runtime as runtime

    seen = []

    class Stop(Exception):
        pass

    def load(model, *a, device="cpu", **k):
        seen.append(str(device))
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.default_device() == "cuda" and runtime.default_device("cpu") == "cpu"
    monkeypatch.setattr(erasekit.cli.erase, "load_pipeline", load)
    runner.invoke(app, ["erase", "--model", str(tiny_pipe_dir), "--erase", "star", "--out", str(tmp_path / "a")])
    chosen = []

    def state(cpu, **k):
        chosen.append("cpu" if cpu else "cuda")
        raise Stop

    monkeypatch.setattr("erasekit.eval.distributed.PartialState", state)
    runner.invoke(app, ["generate", "--model", str(tiny_pipe_dir), "--prompt", "a star", "--out", str(tmp_path / "g")])
    assert seen == ["cuda"] and chosen == ["cuda"]  # erase defaulted to cpu before, generate to the GPU


def test_erase_help_lists_the_methods():
    r = runner.invoke(app, ["erase", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for name in ("uce", "rece", "esd", "ap", "age", "hide", "speed", "mace"):
        assert name in r.output, name


def test_run_json_is_valid_and_names_the_layout(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    assert _run("erase", "--model", tiny_pipe_dir, "--erase", "star", "--out", run).exit_code == 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["layout"] == 1 and [s["stage"] for s in meta["stages"]] == ["erase"]


def test_report_reads_the_run_directory_and_marks_its_stage(tiny_pipe_dir, tmp_path):
    from erasekit.eval.generate import SamplingConfig
    from erasekit.pipeline import load_pipeline
    from erasekit.report.run_report import build_run_report

    run = tmp_path / "run"
    assert _run("erase", "--model", tiny_pipe_dir, "--erase", "star", "--out", run).exit_code == 0
    page = build_run_report(
        run, pipe=load_pipeline(str(tiny_pipe_dir)), seeds=[0], sampling=SamplingConfig(steps=1), progress=False
    )
    assert page == RunDir.open(run).report_path and page.exists()
    assert "identity" in page.read_text()  # the run's run.json is shown with its config
    assert RunDir.open(run).stage("report")["status"] == "done"
