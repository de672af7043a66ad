"""Fault injection: a fine-tuning run and a generation killed with SIGKILL at deterministic points
always resume to the same bytes as an uninterrupted run; a second concurrent writer is refused and
nothing is lost.

The work runs in a forked child process (the test process has torch and diffusers imported already,
so a child costs no import time; it sets one torch thread at once, as DataLoader workers do). The
kill point is read in one place, :func:`_install_kill_hook`, from ``ERASEKIT_TEST_KILL_AFTER=N``
(and ``ERASEKIT_TEST_KILL_MODE=before|after``): the child kills itself with SIGKILL just before (or
just after) its N-th file rename. Every durable write of a run is a rename (atomic files, index
appends' image files, checkpoint folders), so "before the N-th rename" walks the kill through every
half-written state a run can leave. Everything is compared through the public API and CLI (final
edit tensors, image bytes, index records), never through internal paths of the run directory.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import erasekit
from erasekit.cli import app
from erasekit.edit import Edit, EraseRequest

pytestmark = pytest.mark.usefixtures("one_thread")

GEN_ARGS = ["--prompt", "a red triangle", "--prompt", "a blue circle", "--seeds", "0:3", "--steps", "2"]
GEN_ARGS += ["--batch-size", "2", "--guidance", "3", "--quiet"]
ESD = {"steps": 6, "ddim_steps": 2, "checkpoint_every": 2, "lr": 1e-3, "seed": 0, "train_method": "xattn"}


def _install_kill_hook(env: dict[str, str]) -> Callable[[], int]:
    """The one reader of ERASEKIT_TEST_KILL_AFTER / _MODE / _HOLD: wrap os.replace and os.rename so the
    process SIGKILLs itself at the N-th rename (or, with HOLD=path, waits at rename HOLD_AT, default
    the first, until ``path`` exists, announcing ``path.held``). Returns the rename counter."""
    n = int(env.get("ERASEKIT_TEST_KILL_AFTER", "0"))
    mode = env.get("ERASEKIT_TEST_KILL_MODE", "before")
    hold = env.get("ERASEKIT_TEST_HOLD")
    hold_at = int(env.get("ERASEKIT_TEST_HOLD_AT", "1"))
    count = [0]

    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        def inner(*args: object, **kwargs: object) -> object:
            count[0] += 1
            if hold and count[0] == hold_at:
                Path(hold + ".held").touch()
                while not Path(hold).exists():
                    time.sleep(0.02)
            if count[0] == n and mode == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if count[0] == n and mode == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return inner

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)
    return lambda: count[0]


def _in_child(job: Callable[[], None], env: dict[str, str]) -> int:
    """Fork, run ``job`` in the child under the kill hook, return the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            _install_kill_hook(env)
            job()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 300.0) -> str:
    """'ok', 'killed' (SIGKILL) or 'failed'."""
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child process hung")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "ok" if os.WEXITSTATUS(status) == 0 else "failed"


class _OneThread:
    """One torch thread for the block (the children's count: thread counts change float sums, hence bytes)."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


def _run(job: Callable[[], None], **env: str) -> str:
    return _wait(_in_child(job, env))


def _count_renames(job: Callable[[], None]) -> int:
    """How many renames an uninterrupted run of ``job`` makes (in a child with no kill point)."""
    counter = Path(os.environ.get("TMPDIR", "/tmp")) / f"erasekit-renames-{os.getpid()}-{time.time_ns()}"

    def counted() -> None:
        import builtins

        before = [0]
        real_replace, real_rename = os.replace, os.rename

        def c(fn: Callable[..., object]) -> Callable[..., object]:
            def inner(*a: object, **k: object) -> object:
                before[0] += 1
                return fn(*a, **k)

            return inner

        os.replace, os.rename = c(real_replace), c(real_rename)
        job()
        os.replace, os.rename = real_replace, real_rename
        with builtins.open(counter, "w") as fh:
            fh.write(str(before[0]))

    assert _run(counted) == "ok"
    n = int(counter.read_text())
    counter.unlink()
    return n


# ------------------------------------------------------------------------------------------ generation
def _generate(model: Path, out: Path) -> Callable[[], None]:
    def job() -> None:
        res = CliRunner().invoke(app, ["generate", "--model", str(model), "--out", str(out), *GEN_ARGS])
        if res.exit_code != 0:
            raise RuntimeError(f"generate exited {res.exit_code}: {res.output}")

    return job


def _generation_bytes(out: Path) -> dict[tuple[str, int], bytes]:
    """(prompt, seed) -> the image's pixels, read through the public index reader."""
    from erasekit.eval.generate import read_index

    recs = read_index(out)
    return {(r["prompt"], r["seed"]): np.asarray(Image.open(out / r["path"]).convert("RGB")).tobytes() for r in recs}


@pytest.fixture(scope="module")
def reference_generation(tiny_pipe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-ref") / "run"
    with _OneThread():
        res = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipe_dir), "--out", str(out), *GEN_ARGS])
        assert res.exit_code == 0, res.output
    ref = _generation_bytes(out)
    assert len(ref) == 6
    return ref


@pytest.fixture(scope="module")
def generation_renames(tiny_pipe_dir, tmp_path_factory) -> int:
    """Renames of an uninterrupted generation: the kill points there are."""
    return _count_renames(_generate(tiny_pipe_dir, tmp_path_factory.mktemp("gen-count") / "run"))


def _kill_then_resume_generation(model: Path, out: Path, points: list[tuple[int, str]]) -> None:
    for n, mode in points:
        assert _run(_generate(model, out), ERASEKIT_TEST_KILL_AFTER=str(n), ERASEKIT_TEST_KILL_MODE=mode) == "killed"
    assert _run(_generate(model, out)) == "ok"


def test_generation_killed_twice_resumes_to_the_same_bytes(tiny_pipe_dir, reference_generation, tmp_path):
    """Killed after its 1st rename (generation.json), then mid-batch before its 5th (an image of the
    second batch: the first batch's index line is written, the second's images half there)."""
    points = [(1, "after"), (5, "before")]
    out = tmp_path / "run"
    _kill_then_resume_generation(tiny_pipe_dir, out, points)
    assert _generation_bytes(out) == reference_generation


@pytest.mark.slow
def test_generation_killed_at_every_rename_resumes_to_the_same_bytes(
    tiny_pipe_dir, reference_generation, generation_renames, tmp_path
):
    ref, total = reference_generation, generation_renames
    assert total >= 7  # generation.json + 6 images at least
    for n in range(1, total + 1):
        for mode in ("before", "after"):
            out = tmp_path / f"run-{n}-{mode}"
            _kill_then_resume_generation(tiny_pipe_dir, out, [(n, mode)])
            assert _generation_bytes(out) == ref, f"killed {mode} rename {n}"


# ------------------------------------------------------------------------------------------ fine-tuning
def _finetune(model: Path, run: Path, out: Path) -> Callable[[], None]:
    def job() -> None:
        pipe = erasekit.load_pipeline(str(model))
        edit = erasekit.erase(
            pipe, EraseRequest(["triangle"]), method="esd", progress=False, run_dir=str(run), resume=True, **ESD
        )
        edit.save(out)

    return job


def _tensors_bytes(edit_dir: Path) -> dict[str, bytes]:
    edit = Edit.load(edit_dir)
    return {k: v.contiguous().numpy().tobytes() for k, v in sorted(edit.tensors.items())}


@pytest.fixture(scope="module")
def reference_finetune(tiny_pipe_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft-ref")
    pipe = erasekit.load_pipeline(str(tiny_pipe_dir))
    with _OneThread():
        edit = erasekit.erase(
            pipe, EraseRequest(["triangle"]), method="esd", progress=False, run_dir=str(d / "run"), **ESD
        )
    edit.save(d / "edit")
    ref = _tensors_bytes(d / "edit")
    assert ref and len(edit.trace["log"]) == ESD["steps"]
    return ref


@pytest.fixture(scope="module")
def finetune_renames(tiny_pipe_dir, tmp_path_factory) -> int:
    """Renames of an uninterrupted fine-tuning run (+ its edit.save): the kill points there are."""
    d = tmp_path_factory.mktemp("ft-count")
    return _count_renames(_finetune(tiny_pipe_dir, d / "run", d / "edit"))


def _kill_then_resume_finetune(model: Path, d: Path, points: list[tuple[int, str]]) -> None:
    for n, mode in points:
        status = _run(
            _finetune(model, d / "run", d / "edit"), ERASEKIT_TEST_KILL_AFTER=str(n), ERASEKIT_TEST_KILL_MODE=mode
        )
        assert status == "killed", (n, mode, status)
    assert _run(_finetune(model, d / "run", d / "edit")) == "ok"


def test_finetune_killed_twice_resumes_to_the_same_tensors(tiny_pipe_dir, reference_finetune, tmp_path):
    """Killed after its 2nd rename (inside the first checkpoint), then before its 9th (in a later one)."""
    points = [(2, "after"), (9, "before")]
    _kill_then_resume_finetune(tiny_pipe_dir, tmp_path, points)
    assert _tensors_bytes(tmp_path / "edit") == reference_finetune


@pytest.mark.slow
def test_finetune_killed_at_every_rename_resumes_to_the_same_tensors(
    tiny_pipe_dir, reference_finetune, finetune_renames, tmp_path
):
    ref, total = reference_finetune, finetune_renames
    assert total >= 9
    for n in range(1, total + 1):
        for mode in ("before", "after"):
            d = tmp_path / f"{n}-{mode}"
            _kill_then_resume_finetune(tiny_pipe_dir, d, [(n, mode)])
            assert _tensors_bytes(d / "edit") == ref, f"killed {mode} rename {n}"


# ------------------------------------------------------------------------------------------ two writers
def test_second_concurrent_generate_is_refused_and_nothing_is_lost(tiny_pipe_dir, reference_generation, tmp_path):
    ref = reference_generation
    out, hold = tmp_path / "run", tmp_path / "release"
    # rename 1 is generation.json (written before the per-batch lock), rename 2 the first image,
    # written while the first batch holds the index lock
    pid = _in_child(_generate(tiny_pipe_dir, out), {"ERASEKIT_TEST_HOLD": str(hold), "ERASEKIT_TEST_HOLD_AT": "2"})
    try:
        t0 = time.time()
        while not Path(str(hold) + ".held").exists():  # the first writer holds the lock, mid-run
            assert time.time() - t0 < 120, "the first writer never started"
            time.sleep(0.02)
        res = CliRunner().invoke(app, ["generate", "--model", str(tiny_pipe_dir), "--out", str(out), *GEN_ARGS])
        assert res.exit_code == 2
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"in use by PID {pid}" in errors[0] and "Traceback" not in res.output
    finally:
        hold.touch()
    assert _wait(pid) == "ok"
    assert _generation_bytes(out) == ref  # the first writer's run is complete and untouched


@pytest.mark.slow
def test_second_concurrent_erase_into_one_run_dir_is_refused(tiny_pipe_dir, tmp_path):
    out, hold = tmp_path / "run", tmp_path / "release"

    def first() -> None:
        res = CliRunner().invoke(
            app, ["erase", "--model", str(tiny_pipe_dir), "--erase", "triangle", "--method", "uce", "--out", str(out)]
        )
        if res.exit_code != 0:
            raise RuntimeError(res.output)

    pid = _in_child(first, {"ERASEKIT_TEST_HOLD": str(hold)})
    try:
        t0 = time.time()
        while not Path(str(hold) + ".held").exists():
            assert time.time() - t0 < 120, "the first writer never started"
            time.sleep(0.02)
        res = CliRunner().invoke(
            app,
            [
                "erase",
                "--model",
                str(tiny_pipe_dir),
                "--erase",
                "circle",
                "--method",
                "uce",
                "--out",
                str(out),
                "--overwrite",
            ],
        )
        assert res.exit_code == 2 and "in use by PID" in res.output and "Traceback" not in res.output
    finally:
        hold.touch()
    assert _wait(pid) == "ok"
    edit = Edit.load(out)
    assert edit.request.erase == ["triangle"]  # the first writer's edit, whole; the second wrote nothing
