import json

import pytest
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_erase_writes_a_complete_run(tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    r = _run(
        "erase",
        "--model",
        tiny_pipe_dir,
        "--erase",
        "star",
        "--preserve",
        "heart,ring",
        "--set",
        "lamb=0.2",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "run.json").read_text())
    cfg = meta["identity"]
    assert cfg["method"] == "uce" and cfg["config"]["lamb"] == 0.2
    assert cfg["request"] == {"erase": ["star"], "preserve": ["heart", "ring"], "anchor": None}
    assert cfg["base"]["fingerprint"] and meta["erasekit"]
    assert (out / "edit" / "edit.safetensors").exists() and (out / "edit" / "edit.json").exists()
    # generation with the edit applied, resumable
    g = _run(
        "generate",
        "--model",
        tiny_pipe_dir,
        "--edit",
        out,
        "--prompt",
        "a star",
        "--seeds",
        "0:2",
        "--steps",
        "2",
        "--out",
        out / "gen",
    )
    assert g.exit_code == 0, g.output
    assert len((out / "gen" / "index.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "args,match",
    [
        (["--erase", ""], "erase"),
        (["--erase", "star", "--preserve", "star"], "both erased and preserved"),
        (["--erase", "star", "--method", "nope"], "Unknown method"),
        (["--erase", "star", "--set", "lambda=1"], "unknown option"),
        (["--erase", "star", "--model", "/no/such/folder"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, tiny_pipe_dir, args, match):
    out = tmp_path / "run"
    if "--model" not in args:
        args = [*args, "--model", str(tiny_pipe_dir)]
    r = _run("erase", *args, "--out", out)
    assert r.exit_code == 2
    assert match in r.output
    assert not out.exists()


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "x").mkdir()
    r = _run("erase", "--erase", "star", "--model", tmp_path / "x", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "model_index.json" in r.output and not (tmp_path / "run").exists()


def test_unknown_protocol(tiny_pipe_dir):
    r = _run("evaluate", "--protocol", "imagenet-9000", "--model", tiny_pipe_dir)
    assert r.exit_code == 2 and "Unknown protocol" in r.output


def test_many_piece_word_warns(tiny_pipe_dir, tmp_path):
    r = _run("erase", "--model", tiny_pipe_dir, "--erase", "Kasimir Lund", "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    r = _run("erase", "--model", tiny_pipe_dir, "--erase", "Vantreck", "--out", tmp_path / "r2")
    assert "split by the tokenizer" in r.output


def test_methods_lists_uce():
    r = _run("methods")
    assert r.exit_code == 0 and "uce" in r.output and "lamb" in r.output
