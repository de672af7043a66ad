"""The operating point of a cell, and the cell's whole run: reach the operating point on the
*selection* images, then evaluate on the *test* images (and attack), which selection never sees.

Rules (``[operating_point]`` of the spec):

- ``fixed``: fine-tuned methods train ``steps`` steps (or their preset's), closed forms solve once.
- ``target`` (the AP paper's Table 1 reports PSR-1 *at ESR-1 >= 95%*): a fine-tuned method trains in
  chunks of ``check_every`` steps of one run of ``max_steps`` steps (``FinetuneConfig.stop_at``: the
  run is cut after each chunk and resumed exactly from its checkpoint, so the model at step ``s`` is
  the one an uninterrupted ``max_steps`` run passes through at ``s``); after each chunk the selection
  metric (ESR-1 by default) is measured on ``selection_n_per_class`` images per object with seeds
  ``selection_seed ..`` and the run stops at the first check reaching ``target`` or at the cap. A
  closed form sweeps one option (``sweep``: the erase scale or lambda, weakest erasure first) and
  stops at the first value reaching the target. Every check's selection ESR/PSR is recorded
  (``curve.jsonl``): the method's ESR-PSR trade-off curve. A method that never reaches the target is
  evaluated at its best check (highest selection metric, earliest on ties) and reported with
  ``reached = false``, never dropped.

Cell folder (a run directory, ``erasekit.rundir``): ``run.json`` (identity, stages), ``finetune/``
(the fine-tuning run, a run directory of its own: checkpoints, step log, the latest chunk's edit),
``edit/`` (the operating point's edit: the best check's, written only here), ``key/`` (hiding: its
recovery key), ``best.json`` (the best check, with its edit's digest), ``curve.jsonl``,
``eval/shapes-objects/metrics.json`` (test), ``attacks/``, ``result.json``.

The test images are generated with the edit whose digest ``best.json`` records. Where ``edit/`` does
not hold it (a cell begun before the fine-tuning run had its own folder, when every chunk overwrote
``edit/``), the best check's edit is made again: one uninterrupted run cut at the best step (the same
model, see ``stop_at``), or the closed form at the best value; its selection rates are measured again
and recorded beside the curve's (``best.json["remade"]``).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

import erasekit
from erasekit.attacks import default_prompts, run_attacks
from erasekit.edit import EraseRequest, with_touched_digest
from erasekit.eval.detectors import load_detector
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.eval.metrics import _in_topk, rate_summary
from erasekit.eval.protocols import evaluate
from erasekit.methods.base import make_config, record_preset, require_finite
from erasekit.methods.hide import RecoveryKey, hide
from erasekit.pipeline import base_info
from erasekit.rundir import RunDir, RunDirMismatch
from erasekit.study.grid import CELL_STAGE, RESULT_JSON, SEARCH_CACHE, Cell, finetuned, open_cell, study_of
from erasekit.study.spec import StudySpec
from erasekit.testing import tiny_pipeline
from erasekit.world.protocols import object_prompts
from erasekit.world.shapes import COLOURS, OBJECTS

CURVE = "curve.jsonl"
BEST = "best.json"
KEY_DIR = "key"
FINETUNE_DIR = "finetune"  # the fine-tuning run's own run directory (its chunks write their edit there)


# ------------------------------------------------------------------------------------------ environment
class StandinDetector:
    """A stand-in detector for studies on random tiny models (``detector = "standin"``): every head is a
    fixed random projection of the image's mean colour. Deterministic; it tests plumbing, not erasure."""

    name, version = "standin", "0"

    def __init__(self) -> None:
        self.heads = {"object": list(OBJECTS), "colour": list(COLOURS), "unsafe": ["safe", "unsafe"]}
        g = np.random.default_rng(0)
        self.w = {h: g.normal(size=(3, len(c))) * 8 for h, c in self.heads.items()}

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1, 3).mean(1) / 255.0 - 0.5
        out = {}
        for h, w in self.w.items():
            z = x @ w
            e = np.exp(z - z.max(1, keepdims=True))
            out[h] = e / e.sum(1, keepdims=True)
        return out


_ENV: dict[tuple[str, str], Any] = {}


class Env:
    """What every cell of one process shares: the base pipeline (and a second copy for attacks), the
    detector and the sampling settings (loaded once per process)."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.pipe = _load(spec.model)
        self._edited = None
        if spec.detector == "standin":
            self.detector: Any = StandinDetector()
        else:
            self.detector = load_detector("shapes")
        ev = spec.evaluation
        self.sampling = SamplingConfig(
            steps=ev.sampling_steps if ev else None, **({"batch_size": ev.batch_size} if ev and ev.batch_size else {})
        )

    @property
    def edited(self):
        """A second copy of the base pipeline, for attacks (they need the original beside the edit)."""
        if self._edited is None:
            self._edited = _load(self.spec.model)
        return self._edited


def _load(model: str):
    if model == "tiny":
        pipe = tiny_pipeline(0)
    else:
        pipe = erasekit.load_pipeline(model)
    base_info(pipe)  # fingerprint before any edit is applied
    return pipe


def env_for(spec: StudySpec) -> Env:
    key = (spec.model, spec.detector + repr(spec.evaluation))
    if key not in _ENV:
        _ENV.clear()
        _ENV[key] = Env(spec)
    env = _ENV[key]
    env.spec = spec  # the pipeline, detector and sampling are shared; the operating point, attacks ... are this spec's
    return env


# ------------------------------------------------------------------------------------------ pieces
def _request(cell: Cell):
    return EraseRequest(list(cell.concept.erase), preserve=list(cell.concept.preserve or []))


def make_edit(env: Env, cell: Cell, rd: RunDir, **extra: Any) -> tuple[Any, Any]:
    """The cell's edit with the spec's preset and overrides plus ``extra``: ``(edit, recovery key or None)``."""
    m = cell.method
    over = {**m.set, **extra}
    if finetuned(m):
        over.setdefault("seed", cell.seed)
    config = make_config(m.method, m.preset, **over)
    if m.method == "hide":  # hide() returns the key in memory (the registered entry point wants a key_dir)
        edit, key = hide(env.pipe, _request(cell), config, progress=False)
        require_finite(edit)
        return with_touched_digest(record_preset(edit, config), env.pipe), key
    return erasekit.erase(env.pipe, _request(cell), m.method, config, progress=False), None


def selection_metrics(env: Env, cell: Cell, edit: Any) -> dict[str, Any]:
    """ESR/PSR on the selection images (seeds ``selection_seed ..``), with the edit applied."""
    ev = env.spec.evaluation
    return _objects(env, cell, edit, ev.selection_n_per_class, ev.selection_seed)


def _objects(env: Env, cell: Cell, edit: Any, n: int, seed: int) -> dict[str, Any]:
    with edit.applied(env.pipe) if edit is not None else nullcontext():
        return evaluate(
            env.pipe,
            env.spec.evaluation.protocol,
            erase=list(cell.concept.erase),
            preserve=list(cell.concept.preserve) if cell.concept.preserve is not None else None,
            n_per_class=n,
            seed=seed,
            sampling=env.sampling,
            detector=env.detector,
            progress=False,
        )


def recovery_rates(env: Env, cell: Cell, edit: Any, key: Any) -> dict[str, Any]:
    """RSR-1/3 (hiding): test images of the erased objects generated with the recovery key."""
    ev = env.spec.evaluation
    items = object_prompts(list(cell.concept.erase), ev.n_per_class, ev.test_seed)
    with edit.applied(env.pipe):
        embeds = key.prompt_embeds(env.pipe, [it.prompt for it in items])
        images = generate_images(env.pipe, None, [it.seed for it in items], env.sampling, prompt_embeds=embeds)
    probs = env.detector.predict(images)["object"]
    labels = np.array([it.meta["label"] for it in items])
    return {f"rsr_{k}": rate_summary(_in_topk(probs, labels, k)) for k in (1, 3)}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("esr_1", "esr_3", "psr_1", "psr_3")}


def _save_best(rd: RunDir, edit: Any, key: Any, point: dict[str, Any]) -> dict[str, Any]:
    """Write the operating point's edit (and key) and ``best.json`` with the edit's digest; returns it."""
    point = {**point, "edit_digest": edit.digest()}
    if rd.edit_dir.exists():
        shutil.rmtree(rd.edit_dir)
    rd.save_edit(edit)
    if key is not None:
        shutil.rmtree(rd.path / KEY_DIR, ignore_errors=True)
        key.save(rd.path / KEY_DIR)
    rd.write_json(BEST, point)
    return point


def _holds_best(rd: RunDir, best: dict[str, Any]) -> bool:
    """Whether ``edit/`` holds the edit of ``best`` (by the digest recorded with it)."""
    want = best.get("edit_digest")
    return want is not None and rd.edit_digest() == want


def _remake_best(env: Env, cell: Cell, rd: RunDir, best: dict[str, Any]) -> dict[str, Any]:
    """Make the best check's edit again (see the module docstring) and measure its selection rates again."""
    op, m = env.spec.operating_point, cell.method
    if "step" in best:  # no run_dir: one uninterrupted run, cut at the best step
        extra: dict[str, Any] = {"steps": op.max_steps, "stop_at": best["step"]}
    else:
        extra = {m.sweep_option: best["value"]}
    t0 = time.perf_counter()
    edit, key = make_edit(env, cell, rd, **extra)
    sel = _summary(selection_metrics(env, cell, edit))
    remade = {
        "selection": sel,
        "matches_curve": sel == best["selection"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return _save_best(rd, edit, key, {**best, "remade": remade})


# ------------------------------------------------------------------------------------------ the rule
def reach_operating_point(env: Env, cell: Cell, rd: RunDir) -> dict[str, Any]:
    """Reach the cell's operating point (see the module docstring); returns its record. Resumable: the
    checks already in ``curve.jsonl`` are not redone, a fine-tuning chunk resumes from its checkpoint."""
    op, m = env.spec.operating_point, cell.method
    if m.is_original:
        return {"rule": "none"}
    if op.rule == "fixed":
        extra: dict[str, Any] = {}
        if finetuned(m):
            extra = {"run_dir": str(rd.path / FINETUNE_DIR), "resume": True}
            if op.steps is not None:
                extra["steps"] = op.steps
        done_point = rd.read_json(BEST)
        if done_point and _holds_best(rd, done_point):
            return done_point
        t0 = time.perf_counter()
        edit, key = make_edit(env, cell, rd, **extra)
        point = {"rule": "fixed", "step": extra.get("steps"), "train_seconds": round(time.perf_counter() - t0, 3)}
        return _save_best(rd, edit, key, point)

    metric, target = op.metric, op.target
    if finetuned(m):
        plan: list[tuple[str, Any]] = [("step", s) for s in op.checks()]
    else:
        plan = [("value", v) for v in m.sweep_values]
    done = {(r["at"], json_key(r["position"])): r for r in rd.records(CURVE)}
    best = rd.read_json(BEST)
    curve: list[dict[str, Any]] = []
    for i, (at, pos) in enumerate(plan):
        rec = done.get((at, json_key(pos)))
        if rec is None:
            t0 = time.perf_counter()
            if at == "step":
                extra = {"steps": op.max_steps, "stop_at": pos, "run_dir": str(rd.path / FINETUNE_DIR), "resume": True}
                extra["checkpoint_every"] = op.check_every
            else:
                extra = {m.sweep_option: pos}
            edit, key = make_edit(env, cell, rd, **extra)
            t1 = time.perf_counter()
            sel = selection_metrics(env, cell, edit)
            t2 = time.perf_counter()
            rec = {
                "check": i,
                "at": at,
                "position": pos,
                **_summary(sel),
                "train_seconds": round(t1 - t0, 3),
                "eval_seconds": round(t2 - t1, 3),
            }
            if best is None or (rec[metric] or 0.0) > best["selection"][metric]:
                best = {"rule": "target", at: pos, "check": i, "selection": _summary(sel), "reached": None}
                if at == "value":
                    best["option"] = m.sweep_option
                best = _save_best(rd, edit, key, best)
            rd.append(CURVE, rec)  # last: a check is done once its record is written
        curve.append(rec)
        if (rec[metric] or 0.0) >= target:
            break
    if not _holds_best(rd, best):
        best = _remake_best(env, cell, rd, best)
    reached = any((r[metric] or 0.0) >= target for r in curve)
    point = {
        **best,
        "reached": reached,
        "metric": metric,
        "target": target,
        "checks": len(curve),
        "train_seconds": round(sum(r["train_seconds"] for r in curve), 3),
        "selection_eval_seconds": round(sum(r["eval_seconds"] for r in curve), 3),
    }
    return point


def json_key(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


# ------------------------------------------------------------------------------------------ one cell
def run_cell(spec: StudySpec, cell: Cell, study_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Run one cell to the end (skipped when done); a failure is recorded in the cell and returned, never
    raised (it must not stop the other cells). Returns ``{"key", "state", "error"?}``."""
    try:
        rd = open_cell(study_dir, spec, cell, force=force)
    except RunDirMismatch as e:  # another spec's cell: reported, never overwritten without --force
        return {"key": cell.key, "state": "failed", "error": str(e)}
    st = rd.stage(CELL_STAGE)
    if st is not None and st["status"] == "done":
        return {"key": cell.key, "state": "done", "skipped": True}
    try:
        with rd.lock():
            result = _run(spec, cell, rd)
            rd.write_json(RESULT_JSON, result)
            rd.mark(CELL_STAGE, "done")
        return {"key": cell.key, "state": "done"}
    except Exception as e:  # the cell failed: recorded, retried on the next run
        err = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc(limit=6)
        try:
            rd.mark(CELL_STAGE, "failed", error=err, traceback=tb)
        except Exception:  # noqa: BLE001 - the disk may be why it failed; report anyway
            pass
        return {"key": cell.key, "state": "failed", "error": err}


def _run(spec: StudySpec, cell: Cell, rd: RunDir) -> dict[str, Any]:
    env = env_for(spec)
    point = reach_operating_point(env, cell, rd)
    edit = rd.load_edit() if rd.has_edit() else None
    result: dict[str, Any] = {
        "cell": cell.key,
        "method": cell.method.label,
        "method_name": cell.method.method,
        "preset": (edit.config.get("preset") if edit is not None else None),
        "concept": cell.concept.label,
        "erase": list(cell.concept.erase),
        "seed": cell.seed,
        "operating_point": point,
        "seconds": {
            "train": point.get("train_seconds", 0.0),
            "selection_eval": point.get("selection_eval_seconds", 0.0),
            **({"remake": point["remade"]["seconds"]} if "remade" in point else {}),
        },
    }
    if spec.evaluation is not None:
        ev = spec.evaluation
        t0 = time.perf_counter()
        test = _objects(env, cell, edit, ev.n_per_class, ev.test_seed)
        result["seconds"]["test_eval"] = round(time.perf_counter() - t0, 3)
        rd.write_metrics(ev.protocol, test)
        result["test"] = test["intervals"]
        if cell.method.method == "hide" and (rd.path / KEY_DIR).exists():
            key = RecoveryKey.load(rd.path / KEY_DIR, edit=edit)
            result["test"].update(recovery_rates(env, cell, edit, key))
    if spec.attacks is not None:
        result["attacks"] = _attacks(env, cell, rd, edit)
        result["seconds"]["attacks"] = result["attacks"].pop("seconds")
    return result


def _attacks(env: Env, cell: Cell, rd: RunDir, edit: Any) -> dict[str, Any]:
    at = env.spec.attacks
    concept = cell.concept.erase[0]
    edited = env.edited
    with edit.applied(edited) if edit is not None else nullcontext():
        rep = run_attacks(
            edited,
            env.pipe,
            concept,
            list(at.names),
            prompts=default_prompts(concept, at.n_prompts),
            detector=env.detector,
            n_images=at.n_images,
            seed=0,
            sampling=env.sampling,
            out_dir=rd.attack_dir("asr"),
            original_dir=rd.attack_dir("original"),
            configs={k: dict(v) for k, v in at.set.items()},
            progress=False,
            search_cache=study_of(rd.path) / SEARCH_CACHE,  # Ring-A-Bell searches once per concept, not per cell
        )
    out: dict[str, Any] = {
        "original_rate": rep["original_rate"],
        "pre_attack": rate_summary(rep["pre_attack_successes"]),
        "seconds": rep["seconds"],
        # prompts whose attack an earlier, interrupted run of this cell did: its seconds miss their time
        "resumed_prompts": sum(a["cost"]["resumed_prompts"] for a in rep["attacks"].values()),
    }
    for name in at.names:
        a = rep["attacks"][name]
        out[name] = {
            **rate_summary(a["successes"]),
            "cost": {k: a["cost"]["attack"].get(k, 0) for k in ("seconds", "unet_calls", "text_encoder_calls")},
        }
    return out


def set_threads(n: int | None) -> None:
    """Torch threads of this process (one cell's share of the machine)."""
    if n:
        torch.set_num_threads(int(n))
