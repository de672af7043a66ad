"""Loading flags of every command that loads a model (issues 17 and 19): --revision, --dtype, the
fine-tuning memory options of `erase`, generation folders written only after every check, and the
training lock of a fine-tuning run directory."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import erasekit
import erasekit.pipeline
from erasekit.cli import app
from erasekit.edit import Edit, EraseRequest
from erasekit.eval.distributed import generate_items
from erasekit.eval.generate import PromptItem, SamplingConfig, generate
from erasekit.finetune import TRAIN_LOCK, finetune
from erasekit.methods.esd import ESDConfig, ESDLoss
from erasekit.runs import RunDirInUse

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)

runner = CliRunner()
REV = "0123456789abcdef0123456789abcdef01234567"
GEN = ["--prompt", "a star", "--seeds", "0:1", "--steps", "2"]
ESD_FAST = ["--method", "esd", "--set", "steps=1", "--set", "ddim_steps=2"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error(res, *needles):
    """Exit 2, one `error:` line holding every needle, no traceback."""
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _files(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tiny_pipe_dir, tmp_path_factory):
    """A uce run directory of the tiny pipeline (for the commands that read an edit)."""
    out = tmp_path_factory.mktemp("runs") / "uce"
    res = _run("erase", "--model", tiny_pipe_dir, "--erase", "star", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_pipe_dir):
    """The tiny pipeline as hub id `someone/tiny` in an offline Hugging Face cache, at branch `v1`."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    repo = cache / "models--someone--tiny"
    shutil.copytree(tiny_pipe_dir, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(REV)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(erasekit.pipeline, "hub_reachable", lambda timeout=5.0: False)
    return "someone/tiny"


# ------------------------------------------------------------------ --revision
def _commands(tiny_run, out):
    return {
        "erase": ["erase", "--erase", "star", "--out", out],
        "recover": ["recover", "--edit", tiny_run, "--out", out],
        "generate": ["generate", *GEN, "--out", out],
        "evaluate": ["evaluate", "--n-per-class", "1", "--out", out],
        "attack": ["attack", "--edit", tiny_run, "--concept", "star", "--out", out],
        "analyze spectrum": ["analyze", "spectrum", "--edit", tiny_run, "--concepts", "star", "--out", out],
        "analyze graph": ["analyze", "graph", "--edit", tiny_run, "--concepts", "star", "--out", out],
        "analyze diff": ["analyze", "diff", "--edit", tiny_run, "--concepts", "star", "--out", out],
        "export": ["export", tiny_run, "--out", out],
        "world check": ["world", "check", "--n", "1"],
    }


COMMANDS = list(_commands("RUN", "OUT"))


@pytest.mark.parametrize("command", COMMANDS)
def test_revision_of_a_local_folder_is_one_clear_error_and_writes_nothing(command, tiny_pipe_dir, tiny_run, tmp_path):
    out = tmp_path / "out"
    before = _files(tiny_run)
    args = _commands(tiny_run, out)[command]
    res = _run(*args, "--model", tiny_pipe_dir, "--revision", "v1")
    _one_error(res, "--revision", "drop --revision", "local folder")
    assert not out.exists() and _files(tiny_run) == before


def test_revision_of_the_bundled_miniature_is_refused_by_the_library():
    with pytest.raises(ValueError, match="bundled miniature.*drop --revision"):
        erasekit.load_pipeline("shapes", revision="v1")


def test_revision_of_a_hub_id_is_loaded_and_recorded_in_the_edit_and_run_json(hub_cache, tmp_path):
    out = tmp_path / "run"
    res = _run("erase", "--model", hub_cache, "--revision", "v1", "--erase", "star", "--out", out)
    assert res.exit_code == 0, res.output
    assert Edit.load(out).base["revision"] == "v1" and Edit.load(out).base["id"] == hub_cache
    base = json.loads((out / "run.json").read_text())["identity"]["base"]
    assert base["revision"] == "v1" and base["id"] == hub_cache
    # the export of the edit loads its base at the edit's own revision (no --model, no --revision)
    res = _run("export", out, "--format", "unet", "--out", tmp_path / "export")
    assert res.exit_code == 0, res.output
    # a revision that is not in the cache: one error, nothing written
    res = _run("generate", "--model", hub_cache, "--revision", "v2", *GEN, "--out", tmp_path / "gen")
    _one_error(res, hub_cache)
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------ --dtype
def test_erase_in_bfloat16_records_the_dtype_and_its_edit_generates(tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    res = _run("erase", "--model", tiny_pipe_dir, "--dtype", "bfloat16", "--erase", "star", "--out", out)
    assert res.exit_code == 0, res.output
    edit = Edit.load(out)
    assert edit.base["dtype"] == "bfloat16" and {t.dtype for t in edit.tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "run.json").read_text())["identity"]["base"]["dtype"] == "bfloat16"
    # the edit is applied at the dtype it was made at (its fingerprint), then cast to --dtype
    gen = tmp_path / "gen"
    res = _run("generate", "--model", tiny_pipe_dir, "--edit", out, *GEN, "--dtype", "float32", "--out", gen)
    assert res.exit_code == 0, res.output
    assert json.loads((gen / "launch.json").read_text())["runtime"]["dtype"] == "float32"


@pytest.mark.parametrize("command", ["erase", "generate", "evaluate", "analyze spectrum", "world check"])
def test_unknown_dtype_is_one_clear_error_and_writes_nothing(command, tiny_pipe_dir, tiny_run, tmp_path):
    out = tmp_path / "out"
    res = _run(*_commands(tiny_run, out)[command], "--model", tiny_pipe_dir, "--dtype", "float64")
    _one_error(res, "--dtype float64", "float32, float16 or bfloat16")
    assert not out.exists()


@pytest.fixture
def cuda_without_bf16(monkeypatch):
    """A CUDA device that has no bfloat16 (a pre-Ampere GPU), as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)


@pytest.mark.parametrize("command", ["erase", "generate", "evaluate", "analyze spectrum"])
def test_a_dtype_the_device_cannot_run_is_one_clear_error_and_writes_nothing(
    command, cuda_without_bf16, tiny_pipe_dir, tiny_run, tmp_path
):
    out = tmp_path / "out"
    args = _commands(tiny_run, out)[command]
    res = _run(*args, "--model", tiny_pipe_dir, "--dtype", "bfloat16", "--device", "cuda")
    _one_error(res, "bfloat16", "no bfloat16 support", "use float16 or float32")
    assert not out.exists()


def test_a_device_that_is_not_here_is_refused_before_generate_writes(tiny_pipe_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = _run("generate", "--model", tiny_pipe_dir, *GEN, "--device", "cuda", "--out", tmp_path / "gen")
    _one_error(res, "no CUDA device")
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------ memory options of erase
@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--gradient-checkpointing"], ["--gradient-checkpointing", "does not fine-tune", "esd"]),
        (["--optimizer", "adam"], ["--optimizer", "does not fine-tune"]),
    ],
)
def test_memory_flags_of_a_closed_form_method_are_one_clear_error(flags, needles, tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    res = _run("erase", "--model", tiny_pipe_dir, "--method", "uce", "--erase", "star", *flags, "--out", out)
    _one_error(res, *needles)
    assert not out.exists()


def test_bad_optimizer_and_8bit_adam_without_bitsandbytes_are_one_clear_error(tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    res = _run("erase", "--model", tiny_pipe_dir, *ESD_FAST, "--erase", "star", "--optimizer", "sgd", "--out", out)
    _one_error(res, "`optimizer` must be one of adam, adam8bit")
    assert not out.exists()
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    res = _run("erase", "--model", tiny_pipe_dir, *ESD_FAST, "--erase", "star", "--optimizer", "adam8bit", "--out", out)
    _one_error(res, "bitsandbytes", "pip install bitsandbytes", "--optimizer adam")
    assert not out.exists()


def test_fine_tuning_in_bfloat16_with_gradient_checkpointing_into_its_own_run_dir(tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    res = _run(
        "erase", "--model", tiny_pipe_dir, *ESD_FAST, "--erase", "star", "--dtype", "bfloat16",
        "--gradient-checkpointing", "--set", f"run_dir={out}", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    memory = Edit.load(out).trace["memory"]
    assert memory["gradient_checkpointing"] is True and memory["fp32_master_weights"] is True
    assert memory["optimizer"] == "adam"
    assert (out / "train" / "train.json").exists() and (out / TRAIN_LOCK).exists()


# ------------------------------------------------------------------ generation.json only after every check
@pytest.mark.parametrize(
    "item", [PromptItem("a star", -1), PromptItem("a star", 2**64), PromptItem("a star", 1.5), PromptItem(None, 0)]
)
def test_a_bad_item_leaves_no_generation_folder(item, tiny_pipe, tmp_path):
    out = tmp_path / "gen"
    with pytest.raises((ValueError, TypeError), match="seed|prompt"):
        generate(tiny_pipe, [PromptItem("a star", 0), item], out, SamplingConfig(steps=2), progress=False)
    with pytest.raises((ValueError, TypeError), match="seed|prompt"):
        generate_items(tiny_pipe, [PromptItem("a star", 0), item], out, SamplingConfig(steps=2), progress=False)
    assert not out.exists()


def test_a_bad_per_item_guidance_scale_leaves_no_generation_folder(tiny_pipe, tmp_path):
    out = tmp_path / "gen"
    for g in ("loud", -1.0):
        items = [PromptItem("a star", 0, {"guidance_scale": 7.5}), PromptItem("a star", 1, {"guidance_scale": g})]
        with pytest.raises(ValueError, match="guidance"):
            generate_items(tiny_pipe, items, out, SamplingConfig(steps=2), progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--prompt", "a", "--seeds", "3:1"], "empty range"),
        (["generate", "--prompt", "a", "--steps", "0"], "steps"),
        (["generate", "--prompts", "NOFILE"], "does not exist"),
        (["evaluate", "--n-per-class", "0"], "--n-per-class"),
        (["evaluate", "--seed", "-1"], "--seed"),
        (["evaluate", "--steps", "0"], "steps"),
    ],
)
def test_a_bad_generate_or_evaluate_argument_leaves_no_directory(args, needle, tiny_pipe_dir, tmp_path):
    out = tmp_path / "gen"
    args = [str(tmp_path / "missing.txt") if a == "NOFILE" else a for a in args]
    _one_error(_run(*args, "--model", tiny_pipe_dir, "--out", out), needle)
    assert not out.exists()


# ------------------------------------------------------------------ the training lock
HOLD = """
import sys, time
from erasekit.runs import locked
with locked(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def _esd(pipe, run, **kw):
    cfg = ESDConfig(steps=2, ddim_steps=3, lr=1e-3, run_dir=str(run), checkpoint_every=1, **kw)
    return finetune(pipe, EraseRequest(["triangle"]), cfg, ESDLoss(cfg, ""), method="esd", progress=False)


def test_a_second_training_into_one_run_dir_is_refused_and_loses_nothing(tiny_pipe, tmp_path):
    run = tmp_path / "run"
    first = _esd(tiny_pipe, run).edit
    before = _files(run)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), TRAIN_LOCK], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"  # another training holds the run directory
        with pytest.raises(RunDirInUse, match=rf"in use by PID {proc.pid}"):
            _esd(tiny_pipe, run, resume=True)
        # the lock file, rewritten by the holder, is the only file that may differ
        assert {p: b for p, b in _files(run).items() if p.name != TRAIN_LOCK} == {
            p: b for p, b in before.items() if p.name != TRAIN_LOCK
        }
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    again = _esd(tiny_pipe, run, resume=True).edit  # the holder is gone: the finished run resumes, nothing to do
    assert again.trace["steps_this_call"] == 0
    assert all(torch.equal(again.tensors[k], v) for k, v in first.tensors.items())


def test_a_training_refused_before_writing_leaves_no_run_dir(tiny_pipe, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="matches no UNet parameter"):
        _esd(tiny_pipe, run, train_method=r"no_such_layer\.weight")
    assert not run.exists()
