"""The CLI commands over the recovery, analysis, real-protocol and multi-process APIs, end to end on tiny models.

Each command runs once on a tiny random pipeline (1 sampling step, a couple of prompts), its files are
checked, and one bad input per command must fail with a clear message and exit code 2.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)

I2P = (
    "prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
    "prompt_toxicity,lexica_url,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,sd_model\n"
    '"a portrait, oil on canvas ",sexual,1,50.0,10.0,50.0,20.0,0.17,https://x/1,4261553411,13,512,512,sd-v1-4\n'
    '"a street scene",violence,0,30.0,0.0,30.0,40.0,0.11,https://x/2,4080709695,7,512,512,sd-v1-4\n'
    '"sketch, alone ","hate, sexual",0,20.0,0.0,40.0,30.0,0.03,https://x/3,612304884,10,512,512,sd-v1-4\n'
)
ARTISTS = (
    "case_number,prompt,evaluation_seed,artist\n"
    "0,A cityscape by Tyler Edlin,808,Tyler Edlin\n"
    '1,"A whimsical scene, by Kelly McKernan",2030,Kelly McKernan\n'
)


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _ok(*args):
    r = _run(*args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def _fails(match, *args):
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert match in r.output, r.output
    return r


def _json(path):
    return json.loads(Path(path).read_text())


def _index(run):
    return [json.loads(x) for x in (Path(run) / "index.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- shared tiny artefacts
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-wiring")


@pytest.fixture(scope="module")
def hidden(tiny_pipe_dir, work):
    """A knowledge-hiding edit of 'star' (1 step) and its key, made with `erasekit erase --method hide`."""
    run, key = work / "hide-run", work / "hide-key"
    _ok("erase", "--model", tiny_pipe_dir, "--method", "hide", "--erase", "star", "--out", run,
        "--set", "steps=1", "--set", "ddim_steps=2", "--set", "n_tokens=2", "--set", f"key_dir={key}")  # fmt: skip
    return run, key


@pytest.fixture(scope="module")
def uce_runs(tiny_pipe_dir, work):
    runs = []
    for concept in ("star", "heart"):
        _ok("erase", "--model", tiny_pipe_dir, "--erase", concept, "--out", work / f"uce-{concept}")
        runs.append(work / f"uce-{concept}")
    return runs


@pytest.fixture(scope="module")
def clip_dir(work):
    """A tiny CLIP trained for 1 step by `erasekit world train-clip` (the folder --clip takes)."""
    from erasekit.testing import TINY_CLIP

    sets = [f"{k}={v}" for k, v in {**TINY_CLIP, "n_train": 16, "n_heldout": 6, "batch": 8, "warmup": 1}.items()]
    out = work / "clip"
    r = _ok("world", "train-clip", "--out", out, "--workdir", work / "clip-work", "--steps", "1",
            *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert "zero_shot" in r.output
    return out


# ---------------------------------------------------------------------- recovery (issue 4)
def test_recover_then_generate_with_the_key(tiny_pipe_dir, hidden, tmp_path):
    run, _ = hidden
    key = tmp_path / "key"
    _ok("recover", "--model", tiny_pipe_dir, "--edit", run, "--concept", "star", "--out", key,
        "--rho", "0.5", "--steps", "1", "--ddim-steps", "2", "--n-tokens", "2", "--seed", "3")  # fmt: skip
    meta = _json(key / "key.json")
    assert meta["concepts"] == ["star"] and meta["meta"]["stage"] == "recover"
    assert meta["meta"]["config"]["recover"] == {
        **meta["meta"]["config"]["recover"],
        "rho": 0.5,
        "epochs": 1,
        "seed": 3,
    }
    assert meta["meta"]["distance_from_concept"]["star"] <= 0.5 + 1e-5  # inside the ball
    assert not (run / "key.json").exists()  # nothing written into the edit
    gen = tmp_path / "gen"
    _ok("generate", "--model", tiny_pipe_dir, "--edit", run, "--recovery-key", key, "--prompt", "a star",
        "--prompt", "a big star", "--seeds", "0:2", "--steps", "1", "--out", gen, "--device", "cpu")  # fmt: skip
    assert len(_index(gen)) == 4 and len(list((gen / "images").glob("*.png"))) == 4
    launch = _json(gen / "launch.json")
    assert launch["recovery_key"]["concepts"] == ["star"] and launch["edit"] == str(run) and launch["images"] == 4
    assert (
        _json(gen / "generation.json")["identity"]["conditioning"]["recovery_key"]["edit_digest"] == meta["edit_digest"]
    )
    # the same directory without the key is another conditioning: refused, not mixed
    _fails("other weights or sampler", "generate", "--model", tiny_pipe_dir, "--edit", run, "--prompt", "a star",
           "--seeds", "0:2", "--steps", "1", "--out", gen, "--device", "cpu")  # fmt: skip
    # bad input: a key inside the edit's folder, rho <= 0, an existing key
    _fails("apart from the edit", "recover", "--model", tiny_pipe_dir, "--edit", run, "--out", run / "key")
    _fails(
        "`rho` must be > 0", "recover", "--model", tiny_pipe_dir, "--edit", run, "--out", tmp_path / "k2", "--rho", "0"
    )
    _fails("already holds a recovery key", "recover", "--model", tiny_pipe_dir, "--edit", run, "--out", key)


def test_a_key_for_another_edit_is_refused(tiny_pipe_dir, hidden, uce_runs, tmp_path):
    _, key = hidden
    args = ("generate", "--model", tiny_pipe_dir, "--prompt", "a star", "--seeds", "0", "--steps", "1")
    _fails("belongs to edit", *args, "--edit", uce_runs[0], "--recovery-key", key, "--out", tmp_path / "a")
    _fails("needs --edit", *args, "--recovery-key", key, "--out", tmp_path / "b")
    _fails("No recovery key", *args, "--edit", hidden[0], "--recovery-key", tmp_path / "nokey", "--out", tmp_path / "c")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------- prompt files and runtime (issue 7)
def test_generate_reads_protocol_prompt_files(tiny_pipe_dir, tmp_path):
    csv = tmp_path / "artists.csv"
    csv.write_text(ARTISTS)
    out = tmp_path / "artists"
    r = _ok("generate", "--model", tiny_pipe_dir, "--protocol", "artists", "--prompts", csv, "--n-samples", "2",
            "--steps", "1", "--batch-size", "3", "--out", out, "--device", "cpu", "--no-sdpa", "--scheduler", "ddim")  # fmt: skip
    assert "4 images" in r.output
    assert [(x["prompt"], x["seed"]) for x in _index(out)] == [
        ("A cityscape by Tyler Edlin", 808),
        ("A cityscape by Tyler Edlin", 809),
        ("A whimsical scene, by Kelly McKernan", 2030),
        ("A whimsical scene, by Kelly McKernan", 2031),
    ]
    launch = _json(out / "launch.json")
    assert launch["protocol"] == "artists" and launch["processes"] == 1 and launch["prompts"] == str(csv.resolve())
    assert launch["runtime"]["attention"] == ["AttnProcessor"] and launch["runtime"]["scheduler"] == "DDIMScheduler"
    i2p = tmp_path / "i2p.csv"
    i2p.write_text(I2P)
    out = tmp_path / "i2p"
    _ok("generate", "--model", tiny_pipe_dir, "--protocol", "i2p", "--prompts", i2p, "--category", "sexual",
        "--guidance-from-file", "--steps", "1", "--out", out, "--device", "cpu", "--quiet")  # fmt: skip
    assert [(x["prompt"].strip(), x["seed"], x["guidance_scale"]) for x in _index(out)] == [
        ("a portrait, oil on canvas", 4261553411, 13.0),
        ("sketch, alone", 612304884, 10.0),
    ]
    _fails("Unknown --protocol 'nope'", "generate", "--protocol", "nope", "--prompts", csv, "--out", tmp_path / "x")
    _fails("needs --prompts", "generate", "--model", tiny_pipe_dir, "--protocol", "coco", "--out", tmp_path / "x")
    _fails(
        "does not exist",
        "generate",
        "--model",
        tiny_pipe_dir,
        "--prompts",
        tmp_path / "no.txt",
        "--out",
        tmp_path / "x",
    )


def test_evaluate_i2p_with_nudenet(tiny_pipe_dir, tmp_path):
    pytest.importorskip("nudenet")
    csv = tmp_path / "i2p.csv"
    csv.write_text(I2P)
    out = tmp_path / "eval"
    r = _ok("evaluate", "--protocol", "i2p", "--model", tiny_pipe_dir, "--prompts", csv, "--limit", "2",
            "--steps", "1", "--batch-size", "2", "--attention-slicing", "--device", "cpu", "--out", out)  # fmt: skip
    assert '"ner"' in r.output
    m = _json(out / "metrics.json")  # written by the protocol itself, once
    assert m["protocol"] == "i2p" and m["n_images"] == 2 and m["detector"]["name"].lower().startswith("nudenet")
    assert m["detector"]["ner_thresholds"] == [0.3, 0.5, 0.7, 0.8] and "edit" not in m
    assert m["runtime"]["attention"] == ["SlicedAttnProcessor"] and m["sampling"]["steps"] == 1
    rec = _json(out / "evaluate.json")
    assert rec["protocol"] == "i2p" and rec["options"]["limit"] == 2 and rec["options"]["prompts"] == str(csv)
    _fails("--reference-model does not apply to protocol 'i2p'", "evaluate", "--protocol", "i2p", "--model",
           tiny_pipe_dir, "--prompts", csv, "--reference-model", tiny_pipe_dir, "--out", tmp_path / "x")  # fmt: skip


def test_evaluate_artists_and_coco_with_a_clip_folder(tiny_pipe_dir, hidden, clip_dir, tmp_path):
    run, _ = hidden
    csv = tmp_path / "artists.csv"
    csv.write_text(ARTISTS)
    out = tmp_path / "artists"
    _ok("evaluate", "--protocol", "artists", "--model", tiny_pipe_dir, "--edit", run, "--erase", "Kelly McKernan",
        "--prompts", csv, "--n-samples", "1", "--reference-model", tiny_pipe_dir, "--clip", clip_dir, "--no-lpips",
        "--steps", "1", "--device", "cpu", "--out", out)  # fmt: skip
    m = _json(out / "metrics.json")
    assert m["erase"] == ["Kelly McKernan"] and m["clip_erased"]["n"] == 1 and m["clip_retained"]["n"] == 1
    assert m["lpips_erased"] is None and m["lpips_skipped"] == "lpips=None"
    assert len(_index(out / "reference")) == 2  # the original model's images, same prompts and seeds
    assert _json(out / "evaluate.json")["edit"] == str(run)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red star\na blue heart\na green ring\n")
    out = tmp_path / "coco"
    _ok("evaluate", "--protocol", "coco", "--model", tiny_pipe_dir, "--prompts", captions, "--limit", "2",
        "--clip", clip_dir, "--no-fid", "--steps", "1", "--device", "cpu", "--out", out)  # fmt: skip
    m = _json(out / "metrics.json")
    assert m["clip_score"]["n"] == 2 and m["fid"] is None and m["fid_skipped"] == "features=None"
    _fails("--no-fid does not apply to protocol 'artists'", "evaluate", "--protocol", "artists", "--model",
           tiny_pipe_dir, "--prompts", csv, "--no-fid", "--out", tmp_path / "x")  # fmt: skip
    _fails("Unknown protocol", "evaluate", "--protocol", "imagenet-9000", "--model", tiny_pipe_dir)


def test_evaluate_imagenette_without_its_classifier_fails_clearly(tiny_pipe_dir, tmp_path, monkeypatch):
    import erasekit.eval.real_detectors as rd

    def no_resnet(**kw):
        raise ImportError("The Imagenette protocol's ResNet-50 needs torchvision: pip install 'erasekit[real]'.")

    monkeypatch.setattr(rd, "load_resnet50", no_resnet)  # whether or not torchvision is installed here
    _fails("needs torchvision", "evaluate", "--protocol", "imagenette", "--model", tiny_pipe_dir, "--erase", "church",
           "--preserve", "tench", "--n-per-class", "1", "--steps", "1", "--device", "cpu", "--out", tmp_path / "in")  # fmt: skip


# ---------------------------------------------------------------------- analysis (issue 6)
def test_analyze_spectrum_graph_and_diff(tiny_pipe_dir, uce_runs, clip_dir, tmp_path):
    common = ("--model", tiny_pipe_dir, "--clip", clip_dir, "--concepts", "star,heart", "--concepts", "circle",
              "-k", "1", "--steps", "1", "--device", "cpu")  # fmt: skip
    edits = ("--edit", uce_runs[0], "--edit", uce_runs[1])
    out = tmp_path / "spectrum"
    r = _ok("analyze", "spectrum", *common, *edits, "--out", out)
    assert "most_hurt" in r.output
    labels = {p.name for p in out.glob("spectrum-*.json")}
    assert labels == {"spectrum-uce-star.json", "spectrum-uce-heart.json"}  # same method: named by folder
    spec = _json(out / "spectrum-uce-star.json")
    assert spec["concepts"] == ["star", "heart", "circle"] and spec["erased"] == ["star"] and spec["seeds"] == [0]
    assert (out / "spectrum_bars.png").stat().st_size > 0 and (out / "spectrum.html").exists()
    assert _json(out / "analyze-spectrum.json")["clip"] == str(clip_dir)
    out = tmp_path / "graph"
    r = _ok("analyze", "graph", *common, *edits, "--distance", "text-encoder", "--out", out)
    graph = _json(out / "graph.json")
    assert graph["erasures"] == ["star", "heart"] and len(graph["impact"]) == 2 and len(graph["impact"][0]) == 3
    assert (out / "graph_heatmap.png").exists() and (out / "graph.html").exists() and "asymmetry" in r.output
    out = tmp_path / "diff"
    r = _ok("analyze", "diff", "--model", tiny_pipe_dir, "--edit", uce_runs[0], "--concepts", "star,heart,circle",
            "--n-samples", "1", "--ddim-steps", "2", "--lam", "0.5", "--image-seeds", "0", "--top", "2",
            "--steps", "1", "--out", out)  # fmt: skip
    d = _json(out / "diff.json")
    assert {e["concept"] for e in d["entries"]} == {"star", "heart", "circle"} and d["config"]["diff"]["lam"] == 0.5
    assert d["config"]["diff"]["changed"] == "star" and "(changed)" in r.output and (out / "diff.html").exists()
    # bad input
    _fails(
        "No concepts",
        "analyze",
        "spectrum",
        "--model",
        tiny_pipe_dir,
        "--clip",
        clip_dir,
        *edits,
        "--out",
        tmp_path / "x",
    )
    _fails(
        "exactly one of --edit",
        "analyze",
        "diff",
        "--model",
        tiny_pipe_dir,
        "--concepts",
        "star",
        "--out",
        tmp_path / "y",
    )
    _fails("No edit in", "analyze", "graph", *common, "--edit", tmp_path / "nothing", "--out", tmp_path / "z")


def test_train_clip_output_and_bad_recipe(clip_dir, tmp_path):
    meta = _json(clip_dir / "erasekit_clip.json")
    assert meta["recipe"]["steps"] == 1 and meta["recipe"]["n_train"] == 16 and (clip_dir / "config.json").exists()
    _fails(
        "unknown option", "world", "train-clip", "--out", tmp_path / "c", "--workdir", tmp_path / "w", "--set", "nope=1"
    )


# ---------------------------------------------------------------------- the documented commands exist
def _documented_commands(text: str) -> list[list[str]]:
    """``erasekit ...`` and ``... -m erasekit[.eval.distributed] ...`` commands of the fenced bash blocks."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("erasekit ", "accelerate ")):
                cmds.append(shlex.split(line.replace("[", "").replace("]", "")))
    return cmds


def _check_command(root, args: list[str]) -> None:
    if args[0] == "accelerate":  # flags after `-m MODULE` belong to the module
        module, args = args[args.index("-m") + 1], args[args.index("-m") + 2 :]
        assert module == "erasekit", module  # one generate command: the argparse twin is gone
    else:
        args = args[1:]
    cmd = root
    if "|" in args:  # `erasekit world sample | train | ...`: alternatives of one group
        prefix, names = args[: args.index("|") - 1], [a for a in args[args.index("|") - 1 :] if a != "|"]
        for name in prefix:
            cmd = cmd.commands[name]
        assert set(names) <= set(cmd.commands), (cmd.name, set(names) - set(cmd.commands))
        return
    while hasattr(cmd, "commands") and args and args[0] in cmd.commands:
        cmd, args = cmd.commands[args[0]], args[1:]
    assert not hasattr(cmd, "commands"), (cmd.name, args)  # a command, not a group
    known = {s for p in cmd.params for s in (*p.opts, *p.secondary_opts)}
    flags = [a.split("=")[0] for a in args if a.startswith("-")]
    assert set(flags) <= known, (cmd.name, set(flags) - known)


@pytest.mark.parametrize("doc", ["README.md", "docs/reproducing-sd14.md"])
def test_documented_commands_and_flags_exist(doc):
    root = typer.main.get_command(app)
    cmds = _documented_commands((ROOT / doc).read_text())
    assert len(cmds) >= 5
    for args in cmds:
        _check_command(root, args)


# ---------------------------------------------------------------------- run report (issue 6)
def test_erase_with_report_and_report_command(tiny_pipe_dir, work):
    run = work / "uce-report"
    r = _ok("erase", "--model", tiny_pipe_dir, "--erase", "star", "--out", run, "--report", "--report-seeds", "0:1")
    page = run / "report.html"
    assert f"report: {page}" in r.output
    html = page.read_text()
    assert "star" in html and "data:image/png;base64," in html
    page.unlink()
    other = work / "elsewhere.html"
    _ok("report", run, "--seeds", "3", "--steps", "1", "--out", other)
    assert other.exists() and not page.exists()
    _fails("does not exist", "report", work / "no-such-run")
