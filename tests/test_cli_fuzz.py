"""Fuzzing the command line's inputs: concept lists, --set values, seeds, paths and prompt files
with odd bytes. Every case must succeed (exit 0) or fail with exit code 2 and one ``error:`` line
(or click's own usage error for a malformed command line), never a traceback.

Hand-written nasty cases plus seeded random ones (deterministic: ``random.Random(seed)``). The
pipeline load is cached (a copy of one tiny random pipeline per call), so a case costs the command's
own work only; the erase method is UCE (closed form, milliseconds).
"""

from __future__ import annotations

import copy
import random
import string
import sys

import pytest
from typer.testing import CliRunner

import erasekit
import erasekit.pipeline
from erasekit.cli import app
from erasekit.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "in_tmp_cwd")


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run each case from a scratch directory: a path the CLI resolves against the working
    directory (``--out .``, a relative name) lands there, never in the repository."""
    monkeypatch.chdir(tmp_path)


runner = CliRunner()


@pytest.fixture(scope="module")
def fast_load():
    """Replace the pipeline loader by a copy of one tiny pipeline (the base fingerprint kept)."""
    base = tiny_pipeline(0)
    erasekit.pipeline.base_info(base)
    real = erasekit.pipeline.load_pipeline

    def load(model="shapes", *args, **kwargs):
        if model not in ("shapes", "tiny"):
            return real(model, *args, **kwargs)  # a path: the real loader's errors are part of the fuzz
        return copy.deepcopy(base)

    mp = pytest.MonkeyPatch()
    for mod in list(sys.modules.values()):  # the CLI's modules (and launch_generation's) import it by name
        if getattr(mod, "__name__", "").startswith("erasekit") and getattr(mod, "load_pipeline", None) is real:
            mp.setattr(mod, "load_pipeline", load)
    yield
    mp.undo()


def check(args: list[str]) -> int:
    """Run the CLI; assert the outcome is clean; return the exit code."""
    res = runner.invoke(app, args)
    out = res.output
    assert "Traceback" not in out, f"{args!r}: traceback\n{out}"
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{args!r} raised {type(res.exception).__name__}: {res.exception}") from res.exception
    assert res.exit_code in (0, 2), f"{args!r}: exit {res.exit_code}\n{out}"
    if res.exit_code == 2:
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        usage = "Usage:" in out and "Error" in out  # click's own message for a malformed command line
        assert len(errors) == 1 or (usage and not errors), f"{args!r}: not one error line\n{out}"
    return res.exit_code


NASTY_CONCEPTS = [
    "",
    ",",
    " , ,, ",
    "triangle,,circle",
    "tri\x00angle",
    "tri\nangle",
    "a" * 2000,
    "../../etc/passwd",
    "ünïcødé ☃",
    "\u202eevil",
    "'; rm -rf /",
    "%s%s%n",
    "{}",
    "triangle,triangle",
]
NASTY_SETS = [
    "lamb=nan",
    "lamb=inf",
    "lamb=-1",
    "lamb=1e999",
    "lamb=",
    "=0.5",
    "lamb",
    "lamb=[1,2]",
    "lamb=__import__('os')",
    "lamb=0.5=0.5",
    "unknown=1",
    "lamb=\x00",
    "lamb=1_0",
    "lamb=True",
    "preserve_scale=" + "9" * 400,
]
NASTY_SEEDS = ["", ":", "5:2", "-1", "1,,2", "0:3:1", "a", "1.5", "0:" + "9" * 30, "9" * 30, "0:100000000000", "٣"]


def test_erase_concepts(fast_load, tmp_path):
    for i, c in enumerate(NASTY_CONCEPTS):
        check(["erase", "--model", "tiny", "--erase", c, "--out", str(tmp_path / f"c{i}")])
        check(["erase", "--model", "tiny", "--erase", "triangle", "--preserve", c, "--out", str(tmp_path / f"p{i}")])


def test_erase_set_values(fast_load, tmp_path):
    for i, s in enumerate(NASTY_SETS):
        check(["erase", "--model", "tiny", "--erase", "triangle", "--set", s, "--out", str(tmp_path / f"s{i}")])


def test_generate_seeds(fast_load, tmp_path):
    for i, s in enumerate(NASTY_SEEDS):
        check(["generate", "--model", "tiny", "--prompt", "a red triangle", "--seeds", s, "--steps", "1",
               "--out", str(tmp_path / f"g{i}"), "--quiet"])  # fmt: skip


@pytest.mark.slow
def test_paths(fast_load, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for out in [str(f), str(f / "below"), "", "\x00", str(tmp_path / ("x" * 300)), "/proc/definitely/not"]:
        check(["erase", "--model", "tiny", "--erase", "triangle", "--out", out])
        check(["generate", "--model", "tiny", "--prompt", "p", "--seeds", "0", "--steps", "1", "--out", out, "--quiet"])
    for model in [str(f), str(tmp_path / "missing"), "", "\x00", str(tmp_path)]:
        check(["erase", "--model", model, "--erase", "triangle", "--out", str(tmp_path / "m")])
    for edit in [str(f), str(tmp_path / "missing"), str(tmp_path)]:
        check(
            [
                "generate",
                "--model",
                "tiny",
                "--edit",
                edit,
                "--prompt",
                "p",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "e"),
            ]
        )


PROMPT_FILES: dict[str, bytes] = {
    "empty": b"",
    "blank": b"\n \n\t\n",
    "bom-crlf": b"\xef\xbb\xbfa red triangle\r\na blue circle\r\n",
    "latin1": b"caf\xe9 triangle\n",
    "nul": b"a red\x00triangle\n",
    "invalid-utf8": b"\xff\xfe\xfa\n",
    "long": b"triangle " * 5000 + b"\n",
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_prompt_files_with_odd_bytes(fast_load, tmp_path, name):
    p = tmp_path / f"{name}.txt"
    p.write_bytes(PROMPT_FILES[name])
    for protocol in ("lines", "i2p", "artists", "coco"):
        check(["generate", "--model", "tiny", "--prompts", str(p), "--protocol", protocol, "--seeds", "0",
               "--steps", "1", "--out", str(tmp_path / f"out-{protocol}"), "--quiet"])  # fmt: skip


def _random_token(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\x00\x7fé☃"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_seeded_random_erase_and_generate(fast_load, tmp_path, seed):
    rng = random.Random(seed)
    for i in range(8):
        args = ["erase", "--model", "tiny", "--out", str(tmp_path / f"r{i}")]
        args += [
            "--erase",
            rng.choice([_random_token(rng), "triangle", ",".join(_random_token(rng) for _ in range(3))]),
        ]
        for _ in range(rng.randint(0, 2)):
            key = rng.choice(["lamb", "preserve_scale", "erase_scale", _random_token(rng)])
            args += [
                "--set",
                f"{key}={rng.choice([_random_token(rng), str(rng.uniform(-5, 5)), str(rng.randint(-9, 9))])}",
            ]
        check(args)
        seeds = rng.choice([_random_token(rng), f"{rng.randint(-3, 5)}:{rng.randint(-3, 5)}", str(rng.randint(0, 3))])
        check(["generate", "--model", "tiny", "--prompt", _random_token(rng) or "x", "--seeds", seeds,
               "--steps", str(rng.randint(-1, 2)), "--out", str(tmp_path / f"q{i}"), "--quiet"])  # fmt: skip


def test_duplicate_and_contradictory_concepts(fast_load, tmp_path):
    from erasekit import Edit

    assert (
        check(
            [
                "erase",
                "--model",
                "tiny",
                "--erase",
                "triangle,triangle",
                "--erase",
                " triangle",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert Edit.load(tmp_path / "d").request.erase == ["triangle"]
    out = tmp_path / "c"
    res = runner.invoke(
        app, ["erase", "--model", "tiny", "--erase", "triangle", "--preserve", "triangle", "--out", str(out)]
    )
    assert res.exit_code == 2 and "both erased and preserved" in res.output and not out.exists()
