"""ESR/PSR of a fine-tuned method with one z_t producer against another (issue 13).

ESD-x and AP (paper eq. 5) on the miniature, split 0 of ``bench/table1.py`` (erase circle, square,
triangle, star, heart; keep the other 5), the same fine-tuning seed and the same evaluation seeds for
every producer, so the only difference between two cells of one row is how z_t is produced. Each
cell records ESR-1/3, PSR-1/3 (``shapes-objects`` protocol, ``--n-per-class`` images per object)
and the fine-tuning wall time. Runs are resumable: each fine-tuning writes checkpoints to
``--out/runs/<row>-<producer>`` and a re-run continues it; finished cells are skipped.

Settings: 1000 steps, DDIM 20 (the miniature's sampler), lr 1e-4 -- the measured Table 1's
lr x steps budget (200 x 5e-4) spread over the paper's 1000 steps; chosen before any result.

    nice -n 10 python bench/zt_quality.py --producers exact --rows esd-x --threads 1
    nice -n 10 python bench/zt_quality.py --producers pooled --rows esd-x,ap --threads 1
    python bench/zt_quality.py --tiny --steps 4 --n-per-class 2      # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import erasekit
from erasekit.analysis.spectrum import edit_applied
from erasekit.edit import Edit, EraseRequest
from erasekit.eval.generate import SamplingConfig
from erasekit.eval.protocols import evaluate
from erasekit.io import write_json_atomic
from erasekit.pipeline import base_info

SPLIT0 = ["circle", "square", "triangle", "star", "heart"]
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "esd-x": ("esd", {"train_method": "xattn"}),
    "ap": ("ap", {"vocabulary": "auto"}),
    "ap-eta1": ("ap", {"vocabulary": "auto", "negative_guidance": 1.0}),
}


def evaluate_split0(pipe, edit, args, detector, sampling) -> dict[str, float]:
    """ESR-1/3 and PSR-1/3 of ``edit`` on split 0 (the evaluation seeds of every cell)."""
    with edit_applied(pipe, edit):
        res = evaluate(
            pipe,
            "shapes-objects",
            erase=SPLIT0,
            n_per_class=args.n_per_class,
            seed=args.eval_seed,
            sampling=sampling,
            detector=detector,
            progress=not args.quiet,
        )
    return {m: res[m] for m in ("esr_1", "esr_3", "psr_1", "psr_3")}


def checkpoint_cell(pipe, row: str, producer: str, step: int, args, detector, sampling) -> dict[str, Any]:
    """Evaluate the checkpoint at ``step`` of a run (a run that could not reach ``--steps`` in time is
    compared with the other producer's run at the same step)."""
    run_dir = Path(args.out) / "runs" / f"{row}-{producer}"
    ck = run_dir / "train" / "checkpoints" / f"step-{step:08d}"  # the run directory layout (erasekit.rundir)
    if not (ck / "state.json").exists():
        raise SystemExit(f"{ck} does not exist (kept checkpoints: {sorted(p.name for p in ck.parent.glob('step-*'))}).")
    weights = load_file(ck / "trainable.safetensors")
    meta = json.loads((run_dir / "train" / "train.json").read_text())
    log = json.loads((ck / "state.json").read_text())["log"]
    edit = Edit(
        tensors={f"unet.{k}": v for k, v in weights.items()},
        method=ROWS[row][0],
        config=meta["config_all"],
        request=EraseRequest(SPLIT0),
        base=base_info(pipe),
    )
    return {
        **evaluate_split0(pipe, edit, args, detector, sampling),
        "checkpoint_step": step,
        "logged_steps": len(log),
        "config": {k: meta["config_all"][k] for k in ("steps", "lr", "ddim_steps", "seed", "zt_producer")},
    }


def run_cell(pipe, row: str, producer: str, args, detector, sampling) -> dict[str, Any]:
    """Fine-tune one row with one producer (resumable run_dir), then evaluate it on split 0."""
    method, extra = ROWS[row]
    kw: dict[str, Any] = dict(extra)
    if kw.get("vocabulary") == "auto" and args.tiny:
        kw["vocabulary"] = "shapes"
    kw.update(steps=args.steps, lr=args.lr, ddim_steps=args.ddim_steps, seed=args.seed, zt_producer=producer)
    run_dir = Path(args.out) / "runs" / f"{row}-{producer}"
    t0 = time.perf_counter()
    edit = erasekit.erase(
        pipe,
        EraseRequest(SPLIT0),
        method=method,
        progress=not args.quiet,
        run_dir=str(run_dir),
        resume=True,
        keep_checkpoints=args.keep_checkpoints,
        **kw,
    )
    seconds = time.perf_counter() - t0
    return {
        **evaluate_split0(pipe, edit, args, detector, sampling),
        "erase_seconds_this_call": round(seconds, 2),
        "steps_this_call": edit.trace["steps_this_call"],
        "seconds_per_step_this_call": edit.trace["seconds_per_step"],
        "config": {k: edit.config[k] for k in ("steps", "lr", "ddim_steps", "seed", "zt_producer")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="esd-x,ap", help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--producers", default="exact,pooled", help="comma-separated zt_producer values")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/zt_quality")
    p.add_argument("--tiny", action="store_true", help="smoke test on a random tiny pipeline")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints (every 100 steps) kept per run")
    p.add_argument(
        "--at-step",
        type=int,
        default=None,
        help="evaluate only the runs' checkpoints at this step (cells '<row>|<producer>|<step>'); trains nothing",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampling, detector = None, None
    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe = tiny_pipeline(0)
        sampling = SamplingConfig(steps=2, guidance_scale=3.0, batch_size=50)
        detector = _smoke_detector()
    else:
        from erasekit.eval.detectors import load_detector

        pipe, detector = erasekit.load_pipeline("shapes"), load_detector("shapes")
    out = Path(args.out)
    path = out / "results.json"
    settings = {
        "model": "tiny" if args.tiny else "shapes",
        "split": SPLIT0,
        "steps": args.steps,
        "lr": args.lr,
        "ddim_steps": args.ddim_steps,
        "n_per_class": args.n_per_class,
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "threads": args.threads,
    }
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "cells": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings ({results['settings']}); use another --out.")
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        for producer in [q.strip() for q in args.producers.split(",") if q.strip()]:
            key = f"{row}|{producer}" + (f"|{args.at_step}" if args.at_step is not None else "")
            if key in results["cells"]:
                continue
            print(f"== {key}", flush=True)
            if args.at_step is not None:
                cell = checkpoint_cell(pipe, row, producer, args.at_step, args, detector, sampling)
            else:
                cell = run_cell(pipe, row, producer, args, detector, sampling)
            print(json.dumps(cell), flush=True)
            results = json.loads(path.read_text()) if path.exists() else results  # parallel runs share the file
            results["cells"][key] = cell
            write_json_atomic(path, results)
    print(json.dumps(results, indent=2))
    return results


def _smoke_detector():
    from erasekit.study.operating import StandinDetector  # bench/table1.py's SmokeDetector, now in the study

    return StandinDetector()


if __name__ == "__main__":
    main()
