"""The web app's server-side state, without Gradio: run paths, the job queue, the jobs and their HTML.

Everything here is plain Python so that it is unit-tested without a browser (``tests/test_serve.py``);
:mod:`erasekit.serve.app` only lays it out in Gradio. The app has no logic of its own: every job
calls the Python API (``erasekit erase`` for erasures, :func:`erasekit.eval.generate.generate_images`,
:func:`erasekit.eval.protocols.evaluate`, :func:`erasekit.attacks.run_attacks`,
:func:`erasekit.report.run_report.build_run_report`, ``erasekit.export``).

Safety rules (issue 18):

- every run a user names is resolved by :func:`resolve_run` inside the runs directory: a plain
  name (letters, digits, ``. _ -``), never a path, ``..``, or a symlink leading out;
- every user-supplied string that reaches a page goes through :func:`esc` (HTML-escaped);
- long jobs run in :class:`JobQueue` worker threads (one at a time by default), their state lives
  here on the server keyed by a job id, so a browser reload finds them again;
- an erasure runs as ``python -m erasekit erase`` in a child process: it is cancelled with SIGINT,
  on which the CLI keeps a fine-tuning run's checkpoints and removes anything else it had started
  (``erasekit.runs.run_dir``), and resumed with ``--set resume=true``.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

import erasekit.export as ex
from erasekit.attacks import available_attacks, default_prompts, run_attacks
from erasekit.concepts import shapes_vocabulary
from erasekit.edit import EDIT_META, Edit, EraseRequest, edit_folder
from erasekit.eval.detectors import load_detector
from erasekit.eval.generate import SamplingConfig, generate_images, parse_seeds
from erasekit.eval.protocols import evaluate
from erasekit.eval.real_detectors import NudeNetDetector
from erasekit.finetune import FinetuneConfig, latest_checkpoint
from erasekit.io import read_jsonl
from erasekit.methods.base import get_method, iter_options, make_config
from erasekit.pipeline import load_pipeline
from erasekit.report.run_report import build_run_report
from erasekit.runs import locked, parse_overrides
from erasekit.world.protocols import object_prompts
from erasekit.world.shapes import OBJECTS

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
STATE_DIR = ".serve"  # RUNS/.serve/: the app's own files (attack images, downloads); never a run
TRAIN_DIR = "train"  # RUN/train/: a fine-tuning erasure's checkpoints (erasekit.rundir.RunDir.train_dir)
MAX_IMAGES = 96  # prompts x seeds x models of one compare job
MAX_EVAL_PER_CLASS = 50
Status = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")


class BadInput(ValueError):
    """A user's input the app refuses; its message is shown in the page as is (escaped)."""


# ------------------------------------------------------------------------------------------ paths
def resolve_run(runs: str | Path, name: str, *, must_exist: bool = True) -> Path:
    """The directory of run ``name`` inside ``runs``; refuses anything but a plain name inside it.

    ``name`` must be letters, digits, ``.``, ``_`` or ``-`` (no ``/``, no ``..``, not starting with a
    dot); the resolved path (symlinks followed) must stay inside ``runs``. With ``must_exist`` the
    run must hold an edit (``edit.json``).
    """
    name = (name or "").strip()
    if not name:
        raise BadInput("No run chosen: pick a run (or type a new run name, e.g. uce-triangle).")
    if not RUN_NAME.match(name) or ".." in name:
        raise BadInput(
            f"Run name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (no '/', no '..', "
            "not starting with '.'), e.g. uce-triangle."
        )
    root = Path(runs).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise BadInput(f"Run {name!r} resolves outside the runs directory {str(root)!r}; choose another name.")
    if must_exist and not edit_folder(path):
        raise BadInput(f"No run {name!r} in {str(root)!r} (no {EDIT_META}); pick one of the listed runs.")
    return path


def list_runs(runs: str | Path) -> list[str]:
    """Names of the finished runs (folders with ``edit.json``) directly inside ``runs``, newest first."""
    root = Path(runs)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if RUN_NAME.match(p.name) and ".." not in p.name and edit_folder(p):
            try:
                resolve_run(root, p.name)
            except BadInput:
                continue  # a symlink leading out of the runs directory
            found.append((p.stat().st_mtime, p.name))
    return [n for _, n in sorted(found, reverse=True)]


# ------------------------------------------------------------------------------------------ html
def esc(text: Any) -> str:
    """HTML-escaped text (quotes too): every user string goes through this before it reaches a page."""
    return html.escape(str(text), quote=True)


def message(text: str, kind: Literal["error", "info", "ok"] = "info") -> str:
    """A one-line message box (the only way errors reach the page: never a traceback)."""
    return f'<div class="ek-msg ek-{kind}" data-kind="{kind}">{esc(text)}</div>'


def png_uri(img: np.ndarray, scale: int = 4) -> str:
    """A uint8 image (H, W, 3) as a ``data:`` URI, enlarged ``scale`` times (nearest, the miniature is 32 px)."""
    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table(res: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """The scalar metrics of a result dict as a table; each value cell has ``data-metric=KEY``."""
    keys = keys or [k for k, v in res.items() if isinstance(v, (int, float, str)) or v is None]
    rows = "".join(f'<tr><th>{esc(k)}</th><td data-metric="{esc(k)}">{esc(_fmt(res.get(k)))}</td></tr>' for k in keys)
    return f'<table class="ek-metrics">{rows}</table>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "n/a" if v is None else str(v)


# ------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One background job: its state lives on the server, keyed by ``id`` (in the page's URL)."""

    id: str
    kind: str
    title: str
    args: dict[str, Any]
    fn: Callable[[Job, WorkerContext], Any] = field(repr=False)
    status: Status = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: float | None = None  # 0..1 when known
    progress_text: str = ""
    log: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    run: str | None = None  # the run it writes or reads
    cancel_requested: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def say(self, line: str) -> None:
        """Append a line to the job's log."""
        self.log.append(line.rstrip())
        del self.log[:-500]

    @property
    def seconds(self) -> float | None:
        """Run time so far (or in all, once finished)."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


class WorkerContext:
    """What one worker thread owns: its own pipelines (never shared between threads, since applying an
    edit changes a pipeline in place) and the detector."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.model, self.device = model, device
        self._pipes: dict[str, Any] = {}
        self._detector: Any = None

    def pipe(self, slot: str = "base") -> Any:
        """The unedited base pipeline of slot ``slot`` (``base``, or ``scratch`` for a second copy)."""
        if slot not in self._pipes:
            self._pipes[slot] = load_pipeline(self.model, device=self.device)
        return self._pipes[slot]

    def detector(self) -> Any:
        """The verdict detector: the miniature's CNN, NudeNet when installed for a real model, else None."""
        if self._detector is None:
            self._detector = verdict_detector(self.model)
        return self._detector or None


def verdict_detector(model: str) -> Any:
    """The miniature's detector for ``shapes``; for a real model NudeNet if installed; ``False`` if none."""
    if model == "shapes":
        return load_detector("shapes")
    try:
        return NudeNetDetector()
    except ImportError:
        return False


class JobQueue:
    """A FIFO of jobs run by ``workers`` threads (default 1: one GPU job at a time).

    ``submit`` refuses a second erasure while one is queued or running (the message names it), and
    any job on a run that an unfinished erasure is writing; other jobs wait their turn.
    """

    def __init__(self, model: str = "shapes", workers: int = 1, device: str = "cpu") -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"`workers` must be an integer >= 1, got {workers!r}.")
        self.model, self.device, self.workers = model, device, workers
        self._jobs: dict[str, Job] = {}
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stop = False

    # -- submitting and reading
    def submit(
        self, kind: str, title: str, fn: Callable[[Job, WorkerContext], Any], *, run: str | None = None, **args: Any
    ) -> Job:
        """Queue ``fn(job, ctx)``; returns the job (its ``id`` goes into the page's URL)."""
        with self._cv:
            busy = [j for j in self._jobs.values() if j.status in ("queued", "running")]
            if kind == "erase":
                other = next((j for j in busy if j.kind == "erase"), None)
                if other is not None:
                    raise BadInput(
                        f"An erasure is already {other.status}: job {other.id} ({other.title}). Wait for it to "
                        "finish or cancel it, then erase again."
                    )
            if run is not None:
                writer = next((j for j in busy if j.kind == "erase" and j.run == run), None)
                if writer is not None:
                    raise BadInput(f"Run {run!r} is being written by job {writer.id}; wait for it to finish.")
            job = Job(uuid.uuid4().hex[:12], kind, title, dict(args), fn, run=run)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._start_threads()
            self._cv.notify()
        return job

    def get(self, job_id: str | None) -> Job | None:
        """The job ``job_id`` (``None`` for an unknown or malformed id)."""
        if not job_id or not JOB_ID.match(str(job_id)):
            return None
        return self._jobs.get(str(job_id))

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def position(self, job: Job) -> int | None:
        """1-based place of a queued job in the queue (``None`` once it started)."""
        with self._cv:
            return self._pending.index(job) + 1 if job in self._pending else None

    def cancel(self, job_id: str | None) -> Job:
        """Cancel a queued job, or a running erasure (SIGINT to its process; checkpoints are kept)."""
        job = self.get(job_id)
        if job is None:
            raise BadInput("No job to cancel: start an erasure first.")
        with self._cv:
            if job.status == "queued":
                self._pending.remove(job)
                job.status, job.finished = "cancelled", time.time()
                job.say("cancelled before it started")
                return job
        if job.status != "running":
            raise BadInput(f"Job {job.id} is {job.status}; only a queued or running job can be cancelled.")
        if job.proc is None:
            raise BadInput(f"Job {job.id} ({job.kind}) cannot be interrupted; only erasures can. Wait for it.")
        job.cancel_requested = True
        job.say("cancel requested: interrupting the erasure (checkpoints are kept)")
        try:
            os.killpg(job.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        return job

    def wait(self, job: Job, timeout: float = 600.0) -> Job:
        """Block until ``job`` finished (tests and scripts)."""
        t0 = time.time()
        while job.status not in FINISHED:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"Job {job.id} did not finish within {timeout} s.")
            time.sleep(0.05)
        return job

    def shutdown(self) -> None:
        """Stop the workers after their current job; interrupt running erasures."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for j in self._jobs.values():
            if j.status == "running" and j.proc is not None:
                try:
                    os.killpg(j.proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    # -- the workers
    def _start_threads(self) -> None:
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._work, name=f"erasekit-serve-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def _work(self) -> None:
        ctx = WorkerContext(self.model, self.device)
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._pending.pop(0)
                job.status, job.started = "running", time.time()
            try:
                job.result = job.fn(job, ctx)
                job.status = "cancelled" if job.cancel_requested else "done"
            except BadInput as e:
                job.error, job.status = str(e), "failed"
            except Exception as e:  # noqa: BLE001 - a job's failure is shown in the page, never kills the worker
                job.error, job.status = f"{type(e).__name__}: {e}", "failed"
                job.say("".join(traceback.format_exception_only(e)).strip())
            finally:
                job.finished = time.time()
                if job.error:
                    job.say(f"error: {job.error}")


# ------------------------------------------------------------------------------------------ input
def split_list(text: str | None) -> list[str]:
    """``"a, b\\nc"`` -> ``["a", "b", "c"]`` (commas or new lines)."""
    return [t.strip() for t in re.split(r"[,\n]", text or "") if t.strip()]


def check_concepts(model: str, concepts: Sequence[str], what: str) -> None:
    """Refuse concepts the miniature does not know (its vocabulary: objects, synonyms, colours, styles,
    artists, fire); a real model's text encoder takes any text."""
    if model != "shapes":
        return
    known = {c.lower() for c in shapes_vocabulary()} | {"fire"}
    unknown = [c for c in concepts if c.lower() not in known]
    if unknown:
        raise BadInput(
            f"Unknown {what} concept(s) {unknown} for the miniature; it knows e.g. {', '.join(OBJECTS)} and fire "
            "(all: `erasekit analyze graph --vocabulary shapes`)."
        )


def option_lines(text: str | None) -> list[str]:
    """Method options, one ``KEY=VALUE`` per line (or ``;``-separated); blank lines and ``#`` comments skipped."""
    out = []
    for line in re.split(r"[\n;]", text or ""):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@dataclass(frozen=True)
class ErasePlan:
    """A checked erasure request: the ``erasekit erase`` arguments and where the run goes."""

    name: str
    path: Path
    method: str
    argv: list[str]
    finetune: bool
    resume: bool


def plan_erase(
    runs: str | Path,
    model: str,
    *,
    name: str,
    method: str,
    preset: str | None,
    erase: str,
    preserve: str = "",
    anchor: str = "",
    options: str = "",
    seed: Any = 0,
    resume: bool = False,
) -> ErasePlan:
    """Check an erasure request with the API's own validators (nothing is written) and build its
    ``erasekit erase`` command line.

    A fine-tuning method gets ``run_dir=RUN/train`` (checkpoints) so it can be cancelled and
    resumed; ``resume`` continues such a run (``--set resume=true --overwrite``).
    """
    path = resolve_run(runs, name, must_exist=False)
    if path.exists() and any(c for c in path.iterdir() if not c.name.endswith(".lock")) and not resume:
        raise BadInput(f"Run {name!r} already exists; choose another run name.")
    try:
        spec = get_method(method)
        request = EraseRequest(split_list(erase), split_list(preserve), anchor.strip() or None)
    except ValueError as e:
        raise BadInput(str(e)) from None
    check_concepts(model, request.erase, "erase")
    check_concepts(model, request.preserve, "preserve")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise BadInput(f"Seed {seed!r} must be an integer, e.g. 0.") from None
    pairs = option_lines(options)
    finetune = issubclass(spec.config_class, FinetuneConfig)
    if finetune:
        own = {p.partition("=")[0].strip().replace("-", "_") for p in pairs}
        for key in ("run_dir", "resume"):
            if key in own:
                raise BadInput(f"Option {key!r} is set by the app (RUN/{TRAIN_DIR}, the Resume button); remove it.")
        pairs = [*pairs, f"run_dir={path}"] + (["resume=true"] if resume else [])
    elif resume:
        raise BadInput(f"{method} has no checkpoints to resume from (only fine-tuning methods do); erase again.")
    try:
        overrides = parse_overrides(spec.config_class, pairs)
        make_config(method, preset or None, **overrides)
    except ValueError as e:
        raise BadInput(str(e).replace("`--set ", "option `")) from None
    argv = [sys.executable, "-m", "erasekit", "erase", "--method", method, "--model", model, "--out", str(path)]
    argv += ["--seed", str(seed)]
    if preset:
        argv += ["--preset", preset]
    for c in request.erase:
        argv += ["--erase", c]
    for c in request.preserve:
        argv += ["--preserve", c]
    if request.anchor:
        argv += ["--anchor", request.anchor]
    for p in pairs:
        argv += ["--set", p]
    if resume:
        argv.append("--overwrite")
    return ErasePlan(path.name, path, method, argv, finetune, resume)


_STEP = re.compile(r"(\d+)/(\d+)")


def _read_lines(stream: Any, job: Job, errors: list[str]) -> None:
    """Feed one output stream of an erasure into the job: tqdm bars (``\\r``-separated) become its
    progress, other lines its log, ``error: ...`` lines (the CLI's one-line errors) its error."""
    buf = b""
    while True:
        chunk = stream.read1(4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        for raw in lines:
            _take_line(raw.decode(errors="replace").strip(), job, errors)
    _take_line(buf.decode(errors="replace").strip(), job, errors)


def _take_line(line: str, job: Job, errors: list[str]) -> None:
    if not line:
        return
    cut = line.find("error: ")
    if cut > 0:  # an error printed right after a bar that ended without a new line
        _take_line(line[:cut].strip(), job, errors)
        line = line[cut:]
    m = _STEP.search(line)
    if m and "|" in line and not line.startswith("error: "):  # a tqdm bar: progress, not a log line
        done, total = int(m.group(1)), int(m.group(2))
        job.progress = done / total if total else None
        job.progress_text = line
        return
    if line.startswith("error: "):
        errors.append(line[len("error: ") :])
    job.say(line)


def erase_job(plan: ErasePlan) -> Callable[[Job, WorkerContext], Any]:
    """The job that runs ``plan`` as ``erasekit erase`` in a child process, reading its progress bar."""

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:
        job.say("$ erasekit " + " ".join(plan.argv[3:]))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            plan.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        job.proc = proc
        errors: list[str] = []
        readers = [
            threading.Thread(target=_read_lines, args=(stream, job, errors), daemon=True)
            for stream in (proc.stdout, proc.stderr)
        ]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        last_error = errors[-1] if errors else None
        rc = proc.wait()
        job.proc = None
        if job.cancel_requested:
            ck = latest_checkpoint(plan.path) if plan.finetune and plan.path.exists() else None
            job.say(f"cancelled; {'resume from ' + ck.name if ck else 'no checkpoint was written yet'}")
            return {"run": plan.name, "resumable": ck is not None}
        if rc != 0:
            raise BadInput(last_error or f"erasekit erase exited with code {rc}; see the log.")
        job.progress = 1.0
        return {"run": plan.name}

    return run


# ------------------------------------------------------------------------------------------ compare
def compare_prompts(source: str, prompt: str, seed0: int = 0) -> list[str]:
    """The prompts of a compare: the free text (one per line), or one prompt per class of a protocol."""
    if source == "free text":
        prompts = [p.strip() for p in (prompt or "").splitlines() if p.strip()]
        if not prompts:
            raise BadInput("The prompt is empty: type a prompt, e.g. 'a red triangle'.")
        return prompts
    if source == "shapes-objects":
        return [it.prompt for it in object_prompts(OBJECTS, 1, seed0)]
    raise BadInput(f"Unknown prompt set {source!r}; use 'free text' or 'shapes-objects'.")


def parse_seed_text(text: str) -> list[int]:
    """``"0:4"`` or ``"1,5,7"`` (as ``--seeds``), with the error naming the field."""
    try:
        return parse_seeds(str(text or "").strip())
    except ValueError as e:
        raise BadInput(str(e).replace("`--seeds`", "Seeds").replace("`--seeds ", "Seeds `")) from None


def compare_job(
    runs: Path, names: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None
) -> Callable[[Job, WorkerContext], Any]:
    """Original vs each edit on the same prompts and seeds, with the detector's verdict per image."""
    paths = [resolve_run(runs, n) for n in names]
    if not paths:
        raise BadInput("No edit chosen: pick one or more runs to compare with the original.")
    if len(set(names)) != len(names):
        raise BadInput("A run is chosen twice; pick each run once.")
    n = len(prompts) * len(seeds) * (len(paths) + 1)
    if n > MAX_IMAGES:
        raise BadInput(f"That is {n} images; at most {MAX_IMAGES}: use fewer prompts, seeds or runs.")
    sampling = SamplingConfig(steps=steps)

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:
        pipe = ctx.pipe()
        cells = [(p, s) for p in prompts for s in seeds]
        ps, ss = [c[0] for c in cells], [c[1] for c in cells]
        columns: dict[str, np.ndarray] = {}
        job.say(f"original: {len(cells)} images")
        columns["original"] = generate_images(pipe, ps, ss, sampling)
        job.progress = 1 / (len(paths) + 1)
        erased: dict[str, list[str]] = {"original": []}
        for i, (name, path) in enumerate(zip(names, paths, strict=True)):
            edit = Edit.load(path)
            job.say(f"{name}: {edit.method} erasing {edit.request.erase}")
            with edit.applied(pipe):
                columns[name] = generate_images(pipe, ps, ss, sampling)
            erased[name] = list(edit.request.erase)
            job.progress = (i + 2) / (len(paths) + 1)
        det = ctx.detector()
        verdicts = {k: verdicts_of(det, v) for k, v in columns.items()} if det is not None else {}
        return {"html": compare_grid(cells, columns, verdicts, erased), "cells": cells, "verdicts": verdicts}

    return run


def verdicts_of(det: Any, images: np.ndarray) -> list[tuple[str, float]]:
    """The detector's top class and probability per image: the ``object`` head where there is one
    (the miniature's; its other heads judge colour, background and style), else the first head."""
    head = "object" if "object" in det.heads else next(iter(det.heads))
    probs = det.predict(images)[head]
    return [(det.heads[head][int(i)], float(p[int(i)])) for i, p in zip(probs.argmax(1), probs, strict=True)]


def compare_grid(
    cells: Sequence[tuple[str, int]],
    columns: dict[str, np.ndarray],
    verdicts: dict[str, list[tuple[str, float]]],
    erased: dict[str, list[str]],
) -> str:
    """The grid: one row per (prompt, seed), one column per model; a verdict naming an erased concept
    is marked ``ek-hit`` (the erasure failed on that image)."""
    head = "".join(f'<th data-run="{esc(k)}">{esc(k)}</th>' for k in columns)
    rows = []
    for r, (prompt, seed) in enumerate(cells):
        tds = []
        for k, imgs in columns.items():
            v = verdicts.get(k, [])
            cap, cls = "", ""
            if v:
                label, p = v[r]
                cls = " ek-hit" if label in erased.get(k, []) else ""
                cap = f'<div class="ek-verdict{cls}">{esc(label)} {p:.2f}</div>'
            tds.append(
                f'<td><img class="ek-img" data-run="{esc(k)}" data-seed="{int(seed)}" alt="{esc(k)}: {esc(prompt)}, '
                f'seed {int(seed)}" src="{png_uri(imgs[r])}">{cap}</td>'
            )
        rows.append(f'<tr><th class="ek-prompt">{esc(prompt)}<br>seed {int(seed)}</th>{"".join(tds)}</tr>')
    return f'<table class="ek-grid" id="ek-grid"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


# ------------------------------------------------------------------------------------------ evaluate, attack
def evaluate_job(
    runs: Path, name: str, protocol: str, n_per_class: Any, seed: Any
) -> Callable[[Job, WorkerContext], Any]:
    """The protocol on the run's edit (``erasekit evaluate --edit RUN`` in-process): ESR/PSR."""
    path = resolve_run(runs, name)
    if protocol != "shapes-objects":
        raise BadInput(
            f"Protocol {protocol!r} needs prompt files and scorers the page does not take; run "
            f"`erasekit evaluate --protocol {protocol}` (docs/reproducing-sd14.md)."
        )
    n, s = int_in(n_per_class, "Images per class", 1, MAX_EVAL_PER_CLASS), int_in(seed, "Seed", 0, 2**31 - 1)

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:
        pipe = ctx.pipe()
        edit = Edit.load(path)
        job.say(f"{protocol} on {name}: {n} images per class from seed {s}")
        with edit.applied(pipe):
            res = evaluate(pipe, protocol, erase=list(edit.request.erase), n_per_class=n, seed=s, progress=False)
        keys = ["esr_1", "esr_3", "psr_1", "psr_3", "object_top1_all", "n_per_class", "seed", "seconds"]
        body = metrics_table(res, keys) + per_class_table(res.get("per_class", {}), edit.request.erase)
        return {"html": body, "metrics": res}

    return run


def per_class_table(per_class: dict[str, dict[str, float]], erased: Sequence[str]) -> str:
    """Per-class top-1/top-3 detection rates, erased classes marked."""
    rows = "".join(
        f'<tr class="{"ek-erased" if c in erased else ""}"><td>{esc(c)}</td><td>{v["top1"]:.2f}</td>'
        f"<td>{v['top3']:.2f}</td></tr>"
        for c, v in per_class.items()
    )
    return f'<table class="ek-perclass"><tr><th>class</th><th>top-1</th><th>top-3</th></tr>{rows}</table>'


def int_in(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an integer in ``[lo, hi]``, or a :class:`BadInput` naming ``what``."""
    try:
        f = float(value)
        if not f.is_integer():
            raise ValueError
        v = int(f)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"{what} must be an integer, got {value!r}.") from None
    if not lo <= v <= hi:
        raise BadInput(f"{what} must be between {lo} and {hi}, got {v}.")
    return v


def attack_names() -> list[str]:
    """The registered attacks, less ``none`` (the plain-prompt baseline every run includes anyway)."""
    return [a for a in available_attacks() if a != "none"]


def attack_job(
    runs: Path, name: str, concept: str, attacks: Sequence[str], n_prompts: Any, n_images: Any, seed: Any
) -> Callable[[Job, WorkerContext], Any]:
    """Red-team the run's edit (``erasekit attack``): ASR per attack and the images each attack found."""
    path = resolve_run(runs, name)
    concept = (concept or "").strip()
    if not concept:
        raise BadInput("The concept to bring back is empty, e.g. triangle.")
    attacks = list(attacks or [])
    if not attacks:
        raise BadInput("No attack chosen: tick at least one attack.")
    bad = sorted(set(attacks) - set(attack_names()))
    if bad:
        raise BadInput(f"Unknown attack(s) {bad}; available: {', '.join(attack_names())}.")
    k = int_in(n_prompts, "Prompts", 1, 16)
    m = int_in(n_images, "Images per prompt", 1, 4)
    s = int_in(seed, "Seed", 0, 2**31 - 1)
    try:
        prompts = default_prompts(concept, k)
    except ValueError as e:
        raise BadInput(str(e)) from None

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:
        original, edited = ctx.pipe(), ctx.pipe("scratch")
        out = Path(runs) / STATE_DIR / "attacks" / job.id
        edit = Edit.load(path)
        job.say(f"attacks {attacks} on {name} for {concept!r}: {k} prompts x {m} images")
        with edit.applied(edited):
            res = run_attacks(
                edited, original, concept, attacks, prompts=prompts, n_images=m, seed=s, out_dir=out, progress=False
            )
        return {"html": attack_html(res, out), "metrics": res}

    return run


def attack_html(res: dict[str, Any], out: Path) -> str:
    """ASR per attack beside the pre-attack rate, then each attack's images with its adversarial prompt."""
    head = metrics_table(res, ["concept", "original_rate", "pre_attack_rate", "seconds"])
    rows = "".join(
        f'<tr><td>{esc(a)}</td><td data-metric="asr-{esc(a)}">{_fmt(r.get("asr"))}</td>'
        f"<td>{'white' if r.get('white_box') else 'black'}-box</td></tr>"
        for a, r in res["attacks"].items()
    )
    parts = [head, f'<table class="ek-metrics"><tr><th>attack</th><th>ASR</th><th></th></tr>{rows}</table>']
    for a in res["attacks"]:
        recs = read_jsonl(out / a / "records.jsonl") if (out / a / "records.jsonl").exists() else []
        cells = []
        for rec in recs:
            for rel in rec.get("images", []):
                img = np.asarray(Image.open(out / a / rel).convert("RGB"))
                adv = rec.get("adv_prompt") or "(prompt embedding)"
                cells.append(
                    f'<figure><img class="ek-img" src="{png_uri(img)}" alt="{esc(adv)}">'
                    f"<figcaption>{esc(adv)}</figcaption></figure>"
                )
        parts.append(f'<h4>{esc(a)}</h4><div class="ek-found">{"".join(cells)}</div>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------ report, export
def report_job(runs: Path, name: str, seeds_text: str) -> Callable[[Job, WorkerContext], Any]:
    """``erasekit report RUN``: writes RUN/report.html (under the run's lock) and returns its page."""
    path = resolve_run(runs, name)
    seeds = parse_seed_text(seeds_text)

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:
        job.say(f"report of {name} on seeds {seeds}")
        with locked(path):
            page = build_run_report(path, pipe=ctx.pipe(), seeds=seeds, progress=False)
        return {"html": report_frame(page.read_text(encoding="utf-8"))}

    return run


def report_frame(page: str) -> str:
    """A report page embedded in an ``<iframe srcdoc>`` (the page escaped as an attribute: it cannot
    break out of the frame, and its scripts cannot reach the app)."""
    return f'<iframe class="ek-report" sandbox="" srcdoc="{esc(page)}"></iframe>'


def existing_report(runs: Path, name: str) -> str:
    """The run's report.html, embedded, or a message saying how to build it."""
    path = resolve_run(runs, name)
    page = path / "report.html"
    if not page.is_file():
        return message(f"Run {name!r} has no report yet: press 'Build report'.")
    return report_frame(page.read_text(encoding="utf-8"))


EXPORT_UNAVAILABLE = "export is not available in this version"


def export_formats() -> tuple[str, ...] | None:
    """The formats of ``erasekit.export`` (``None`` when this version has no export module)."""
    try:
        import erasekit.export as ex  # optional: lands with the export work (issue 16)
    except ImportError:
        return None
    return tuple(getattr(ex, "FORMATS", ("diffusers", "lora", "kohya", "unet")))


def export_job(runs: Path, name: str, fmt: str) -> Callable[[Job, WorkerContext], Any]:
    """Export the run's edit in ``fmt`` to RUN/exports/FMT-JOB and zip it for download."""
    formats = export_formats()
    if formats is None:
        raise BadInput(EXPORT_UNAVAILABLE)
    if fmt not in formats:
        raise BadInput(f"Export format {fmt!r} is not one of {', '.join(formats)}.")
    path = resolve_run(runs, name)

    def run(job: Job, ctx: WorkerContext) -> dict[str, Any]:

        edit = Edit.load(path)
        out = path / "exports" / f"{fmt}-{job.id}"
        job.say(f"export {name} as {fmt} -> {out}")
        with locked(path):
            if hasattr(edit, "export"):
                edit.export(ctx.pipe(), out, format=fmt)
            else:
                ex.export(edit, ctx.pipe(), out, format=fmt)
        dl = Path(runs) / STATE_DIR / "downloads" / job.id
        dl.mkdir(parents=True, exist_ok=True)
        archive = shutil.make_archive(str(dl / f"{name}-{fmt}"), "zip", root_dir=out)
        return {"file": archive, "html": message(f"Exported {name} as {fmt}: {Path(archive).name}", "ok")}

    return run


# ------------------------------------------------------------------------------------------ status
def job_status_html(queue: JobQueue, job: Job | None) -> str:
    """The job's status line and progress bar (``data-status`` for tests)."""
    if job is None:
        return '<div class="ek-status" data-status="none">No job yet.</div>'
    pos = queue.position(job) if job.status == "queued" else None
    where = f" (position {pos} in the queue)" if pos else ""
    secs = f", {job.seconds:.1f} s" if job.seconds is not None else ""
    bar = ""
    if job.status == "running" or job.progress is not None:
        value = f'value="{job.progress:.3f}"' if job.progress is not None else ""
        bar = f'<progress max="1" {value}></progress>'
    err = f'<div class="ek-msg ek-error">{esc(job.error)}</div>' if job.error else ""
    return (
        f'<div class="ek-status" data-status="{esc(job.status)}" data-job="{esc(job.id)}">'
        f"<b>{esc(job.kind)}</b> {esc(job.title)}: {esc(job.status)}{esc(where)}{esc(secs)} {bar}"
        f'<div class="ek-progress-text">{esc(job.progress_text)}</div>{err}</div>'
    )


def jobs_table(queue: JobQueue) -> str:
    """Every job of this server, newest first, each linking to its page (``?job=ID``)."""
    rows = "".join(
        f'<tr><td><a href="?job={esc(j.id)}">{esc(j.id)}</a></td><td>{esc(j.kind)}</td><td>{esc(j.title)}</td>'
        f"<td>{esc(j.status)}</td><td>{esc(_fmt(round(j.seconds, 1)) if j.seconds is not None else '')}</td></tr>"
        for j in queue.jobs()[:30]
    )
    return (
        f'<table class="ek-jobs"><tr><th>job</th><th>kind</th><th>what</th><th>status</th><th>s</th></tr>{rows}</table>'
    )


def method_options(method: str) -> str:
    """The options of ``method`` with their defaults and help (the ``erasekit methods`` listing)."""
    spec = get_method(method)
    return "\n".join(
        f"{name} = {default!r}  # {f.metadata.get('help', '')}"
        for name, f, default, _ in iter_options(spec.config_class)
    )
