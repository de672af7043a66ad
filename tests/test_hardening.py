"""Hardening (issue 19): durable writes, crash-tolerant indexes, run-directory locks, typed --set
values, sampler validation, non-finite edits, device errors, and no code execution from data."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import erasekit
from erasekit.cli import app
from erasekit.eval.generate import PromptItem, SamplingConfig, generate, read_index
from erasekit.io import append_jsonl, read_jsonl, write_json_atomic
from erasekit.methods.ap import APConfig
from erasekit.runs import RunDirInUse, locked, parse_overrides, run_dir

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ durable files and indexes
def test_atomic_files_are_world_readable(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*tmp"))


def test_jsonl_index_survives_a_line_cut_by_a_crash(tmp_path):
    p = tmp_path / "index.jsonl"
    append_jsonl(p, [{"i": 0}, {"i": 1}])
    with open(p, "ab") as f:  # a crash in the middle of the third record
        f.write(b'{"i": 2, "pa')
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    append_jsonl(p, {"i": 3})  # the next append cuts the partial line off first
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 3}]
    assert p.read_bytes().count(b"\n") == 3
    append_jsonl(p, {"i": 4})
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 3, 4]  # and it does not fail forever after


def test_a_corrupt_terminated_line_is_an_error_not_silently_dropped(tmp_path):
    p = tmp_path / "index.jsonl"
    p.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(p)


# ------------------------------------------------------------------ locks
HOLD = """
import sys, time
from erasekit.runs import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_with_the_holders_pid_and_a_killed_holders_lock_is_taken_over(tmp_path):
    d = tmp_path / "run"
    proc = _holder(d)
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by PID {proc.pid}"):
            with locked(d):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with locked(d):  # the dead holder's lock is taken over
        assert (d / ".lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with locked(tmp_path / "r"):
        with pytest.raises(RunDirInUse):
            with locked(tmp_path / "r"):
                pass


def test_two_concurrent_generations_into_one_directory_second_refused(tmp_pipe_items):
    pipe, items, out = tmp_pipe_items
    with locked(out, "index.jsonl.lock"):  # another process is writing this index
        with pytest.raises(RunDirInUse, match="in use by PID"):
            generate(pipe, items, out, SamplingConfig(steps=2, batch_size=2), progress=False)
    recs = generate(pipe, items, out, SamplingConfig(steps=2, batch_size=2), progress=False)
    assert len(recs) == len(items) == len(read_index(out))


@pytest.fixture
def tmp_pipe_items(tiny_pipe, tmp_path):
    items = [PromptItem("a cat", s) for s in range(3)]
    return tiny_pipe, items, tmp_path / "gen"


def test_resuming_a_generation_with_another_batch_size_is_refused(tmp_pipe_items):
    pipe, items, out = tmp_pipe_items
    generate(pipe, items[:2], out, SamplingConfig(steps=2, batch_size=2), progress=False)
    with pytest.raises(ValueError, match="resume with --batch-size 2"):
        generate(pipe, items, out, SamplingConfig(steps=2, batch_size=1), progress=False)


# ------------------------------------------------------------------ run directories
def test_interrupted_run_with_checkpoints_is_kept_and_without_is_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with run_dir(tmp_path / "a") as d:
            (d / "train" / "checkpoints").mkdir(parents=True)
            raise KeyboardInterrupt
    assert (tmp_path / "a" / "train" / "checkpoints").is_dir()  # resumable work survives Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        with run_dir(tmp_path / "b") as d:
            (d / "edit.json").write_text("{}")
            raise KeyboardInterrupt
    assert not (tmp_path / "b").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        with run_dir(tmp_path / "a"):
            pass


# ------------------------------------------------------------------ typed options
def test_set_values_are_type_checked():
    assert parse_overrides(APConfig, ["resume=false"]) == {"resume": False}
    assert parse_overrides(APConfig, ["resume=True", "k=None", "lr=1e-4"]) == {"resume": True, "k": None, "lr": 1e-4}
    assert parse_overrides(APConfig, ["exclude=['pyramid']"]) == {"exclude": ["pyramid"]}
    for bad, msg in [
        ("lam=abc", "must be a number"),
        ("lam=1e999", "must be a finite number"),
        ("resume=maybe", "true or false"),
        ("steps=1.5", "must be an integer"),
        ("relaxation=foo", "must be one of 'hard', 'soft', 'topk'"),
        ("exclude=pyramid", "must be a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse_overrides(APConfig, [bad])


def test_a_non_finite_edit_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="NaN or infinite"):
        erasekit.erase(tiny_pipe, erasekit.EraseRequest(["cat"]), method="uce", lamb=float("inf"))


@pytest.mark.parametrize("steps", [0, -1])
def test_sampler_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
        SamplingConfig(steps=steps)


def test_cli_bad_values_are_one_line_errors_and_write_nothing(tmp_path):
    runner = CliRunner()
    cases = [
        ["erase", "--erase", "triangle", "--set", "lamb=abc", "--out", str(tmp_path / "a")],
        ["erase", "--erase", "triangle", "--set", "lamb=1e999", "--out", str(tmp_path / "b")],
        ["erase", "--erase", "triangle", "--device", "foo", "--out", str(tmp_path / "c")],
        ["generate", "--prompt", "a red triangle", "--steps", "-1", "--device", "cpu", "--out", str(tmp_path / "d")],
    ]
    for args in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output and "error:" in res.output, res.output
        assert not Path(args[-1]).exists(), args


# ------------------------------------------------------------------ data, never code
FORBIDDEN = [
    (re.compile(r"^\s*(import pickle|from pickle import|import cPickle|import dill)"), "pickle"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"(?<![\w.])eval\("), "eval("),
    (re.compile(r"(?<![\w.])exec\("), "exec("),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def scan(text: str) -> list[str]:
    return [name for line in text.splitlines() for rx, name in FORBIDDEN if rx.search(line)]


def test_the_scanner_finds_each_forbidden_pattern():
    bad = "import pickle\nx = torch.load(p)\ny = eval(s)\nexec(c)\nM(trust_remote_code=True)\nnp.load(f, allow_pickle=True)"
    assert len(scan(bad)) == 6
    assert scan("model.eval()\ntorch.load(p, weights_only=True)\nast.literal_eval(s)") == []


def test_no_code_execution_from_data_anywhere_in_the_tree():
    hits = []
    for path in [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py")]:
        hits += [f"{path.relative_to(ROOT)}: {h}" for h in scan(path.read_text(encoding="utf-8"))]
    assert hits == []


# ------------------------------------------------------------------ edits: integrity and all-or-nothing apply
def _uce_edit(pipe):
    return erasekit.erase(pipe, erasekit.EraseRequest(["cat"]), method="uce")


def test_edit_json_is_tied_to_its_tensors(tiny_pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    edit = _uce_edit(tiny_pipe)
    d = edit.save(tmp_path / "e")
    assert erasekit.Edit.load(d).digest() == edit.digest()
    tensors = load_file(d / "edit.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # corrupted values
    save_file(tensors, str(d / "edit.safetensors"))
    with pytest.raises(ValueError, match="do not match the digest"):
        erasekit.Edit.load(d)
    tensors = {**load_file(edit.save(tmp_path / "f") / "edit.safetensors"), "vae.decoder.conv_in.weight": tensors[name]}
    save_file(tensors, str(tmp_path / "f" / "edit.safetensors"))  # an extra tensor that edit.json does not list
    with pytest.raises(ValueError, match="tensors not listed"):
        erasekit.Edit.load(tmp_path / "f")


def test_an_edit_is_not_applied_over_another_edit_of_the_same_layers(tiny_pipe):
    edit = _uce_edit(tiny_pipe)
    other = erasekit.erase(tiny_pipe, erasekit.EraseRequest(["dog"]), method="uce")
    other.apply_(tiny_pipe, check=False)
    with pytest.raises(ValueError, match="already carries another edit"):
        edit.apply_(tiny_pipe)


def test_a_failed_apply_leaves_the_pipeline_untouched_and_applied_restores(tiny_pipe):
    import dataclasses

    import torch

    edit = _uce_edit(tiny_pipe)
    before = {k: v.detach().clone() for k, v in tiny_pipe.unet.state_dict().items()}
    bad = dataclasses.replace(edit, tensors={**edit.tensors, "unet.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        bad.apply_(tiny_pipe, check=False)  # (with the check, the touched digest refuses it first)
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    with edit.applied(tiny_pipe):
        assert any(not torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())


# ------------------------------------------------------------------ small CLI defects
def test_seeds_ranges_are_checked():
    from erasekit.eval.generate import parse_seeds

    assert parse_seeds("0:3") == [0, 1, 2] and parse_seeds("1,5") == [1, 5]
    for bad, msg in [
        ("5:2", "empty range"),
        ("-1", ">= 0"),
        ("1,1", "repeats"),
        ("a:b", "must look like"),
        (",", "no seed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)


def test_bad_report_seeds_fail_before_the_erase_and_name_the_flag(tmp_path):
    res = CliRunner().invoke(
        app, ["erase", "--erase", "triangle", "--report", "--report-seeds", "5:2", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "--report-seeds" in res.output and not (tmp_path / "r").exists()


def test_overwrite_drops_the_previous_runs_derived_outputs(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    for name in ("report.html", "metrics.json", "notes.txt"):
        (d / name).write_text("old")
    with run_dir(d, overwrite=True):
        pass
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["notes.txt"]


def test_every_command_group_turns_library_errors_into_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["world", "check", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output


def test_hide_refuses_a_used_key_dir_and_one_inside_the_run(tmp_path):
    from erasekit.methods.hide import check_key_dir

    used = tmp_path / "keys" / "a"
    used.mkdir(parents=True)
    (used / "key.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        check_key_dir(used)
    check_key_dir(tmp_path / "keys" / "b", tmp_path / "run")  # new and outside the run: fine
    runner = CliRunner()
    for key_dir, msg in [(used, "not empty"), (tmp_path / "run" / "key", "inside the run directory")]:
        res = runner.invoke(
            app,
            [
                "erase",
                "--method",
                "hide",
                "--erase",
                "triangle",
                "--set",
                f"key_dir={key_dir}",
                "--out",
                str(tmp_path / "run"),
            ],
        )
        assert res.exit_code == 2 and msg in res.output, res.output
        assert not (tmp_path / "run").exists()
    assert (used / "key.json").read_text() == "{}"


def test_every_protocol_is_found_whatever_was_imported_first():
    import subprocess as sp

    code = (
        "from erasekit.eval.protocols import get_protocol\n"
        "print(get_protocol('shapes-attack').__module__, get_protocol('i2p').__module__)"
    )
    out = sp.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["erasekit.attacks.asr", "erasekit.eval.real_protocols"]


def test_a_refused_overwrite_deletes_nothing_of_the_live_writers_run(tmp_path):
    """The lock comes first: a second ``--overwrite`` refused as in use leaves the first writer's derived files."""
    d = tmp_path / "run"
    d.mkdir()
    for name in ("report.html", "metrics.json"):
        (d / name).write_text("live")
    with locked(d):  # the first writer
        with pytest.raises(RunDirInUse):
            with run_dir(d, overwrite=True):
                pass
    assert (d / "report.html").read_text() == (d / "metrics.json").read_text() == "live"


def test_a_generation_holds_its_index_lock_for_the_whole_run_not_per_batch(tmp_pipe_items, monkeypatch):
    """A second writer arriving *between* two batches of a running generation is refused too."""
    from erasekit.eval import distributed as dist
    from erasekit.eval import generate as gen_mod

    pipe, items, out = tmp_pipe_items
    real_write, seen = gen_mod.write_batch, []

    def write_then_probe(folder, batch, imgs, index_name=gen_mod.INDEX):
        recs = real_write(folder, batch, imgs, index_name)
        try:  # between batches: the index lock must still be held by the running generation
            with locked(out, f"{index_name}.lock"):
                seen.append("free")
        except RunDirInUse:
            seen.append("held")
        return recs

    monkeypatch.setattr(gen_mod, "write_batch", write_then_probe)
    generate(pipe, items, out, SamplingConfig(steps=2, batch_size=1), progress=False)
    assert seen == ["held"] * len(items)
    # the CLI's path (erasekit generate / accelerate launch): the chunked driver, probed between its chunks
    seen.clear()
    monkeypatch.setattr(gen_mod, "write_batch", real_write)
    out = out.parent / "gen-cli"

    class ProbingBar:
        def __init__(self, *a, **k):
            pass

        def update(self, n):
            probe_index = dist.INDEX
            try:
                with locked(out, f"{probe_index}.lock"):
                    seen.append("free")
            except RunDirInUse:
                seen.append("held")

        def close(self):
            pass

    monkeypatch.setattr(dist, "tqdm", ProbingBar)
    more = [PromptItem("a dog", s) for s in range(3)]
    dist.generate_items(pipe, more, out, SamplingConfig(steps=2, batch_size=1), progress=False)
    assert seen == ["held"] * len(more)


def test_a_generation_folder_that_failed_before_its_first_image_takes_new_settings(tmp_pipe_items):
    """Nothing was generated under the old settings, so nothing can be mixed: the new run starts there."""
    from erasekit.eval.generate import generation_folder

    pipe, items, out = tmp_pipe_items
    generation_folder(out, pipe, SamplingConfig(steps=3, batch_size=2))  # identity written, then a crash
    recs = generate(pipe, items, out, SamplingConfig(steps=2, batch_size=2), progress=False)
    assert len(recs) == len(items)
    with pytest.raises(Exception, match="steps"):  # with images in it, other settings are refused again
        generate(pipe, items, out, SamplingConfig(steps=3, batch_size=2), progress=False)


def test_a_resume_with_another_thread_count_is_recorded_and_warned(tmp_pipe_items):
    """Images can differ by a grey level between torch thread counts: the folder records every count that
    wrote into it, and a resume at another count warns instead of mixing silently."""
    import json
    import warnings

    import torch

    from erasekit.eval.generate import ThreadCountWarning

    pipe, items, out = tmp_pipe_items
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        generate(pipe, items[:1], out, SamplingConfig(steps=2, batch_size=1), progress=False)
        assert json.loads((out / "generation.json").read_text())["torch_threads"] == [1]
        torch.set_num_threads(2)
        with pytest.warns(ThreadCountWarning, match=r"thread count\(s\) \[1\]; this process uses 2"):
            generate(pipe, items, out, SamplingConfig(steps=2, batch_size=1), progress=False)
        assert json.loads((out / "generation.json").read_text())["torch_threads"] == [1, 2]
        with warnings.catch_warnings():  # nothing left to generate: no warning
            warnings.simplefilter("error")
            generate(pipe, items, out, SamplingConfig(steps=2, batch_size=1), progress=False)
    finally:
        torch.set_num_threads(before)
