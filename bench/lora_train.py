"""LoRA-trained ESD-x against full fine-tuning on the miniature (issue 16, ``lora_rank``).

Rows (every one ESD-x, ``train_method="xattn"``, on split 0 of bench/table1.py: erase circle,
square, triangle, star, heart; the other five objects are the preserved ones):

- ``full``: the cross-attention weights and biases themselves (what every other bench trains);
- ``lora4``: a rank-4 LoRA on the same Linear layers (``lora_rank=4``, alpha 4), same lr;
- ``lora4-lr10x``: the same LoRA at 10x the learning rate (LoRA is usually trained at a larger
  lr than full fine-tuning; stated before the run, not tuned after it).

Each row trains in its own Python process (``--child``), so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: recorded after loading the model and
after training (before any evaluation), with the bytes of the trainable parameters, their
gradients and Adam's two moments counted beside it. The step time is the core's
``seconds_per_step``. Then the edit is scored with the ``shapes-objects`` protocol (ESR-1/3 over
the erased objects, PSR-1/3 over the kept ones) and, for the LoRA rows, factorised by the export
(:func:`erasekit.export.plan_lora` at the trained rank: its largest per-layer SVD error and the
numerical ranks). Rows run one after another in the same invocation (``--rows``), so the step
times are comparable within one run only.

Budget (the 2 shared CPU cores): the ``paper`` preset with ``zt_producer="pooled"`` (z_t from whole
frozen DDIM trajectories, ~1 UNet forward a step instead of ~ddim_steps; the same for every row),
``--steps`` 200 at lr 5e-4, DDIM 20, as the miniature's Table 1 (whose ESD-x rows use the
``authors`` preset's trained sampler instead; so these rows are not Table 1's ESD-x cells).

    nice python bench/lora_train.py --threads 1 --n-per-class 20
    python bench/lora_train.py --rows full,lora4 --steps 20 --n-per-class 2 --out /tmp/lora-smoke   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from erasekit.io import write_json_atomic, write_text_atomic

SPLIT0 = ["circle", "square", "triangle", "star", "heart"]
ROWS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora4": {"lora_rank": 4},
    "lora4-lr10x": {"lora_rank": 4, "lr_scale": 10.0},
}
LABELS = {"full": "full fine-tuning", "lora4": "LoRA rank 4", "lora4-lr10x": "LoRA rank 4, lr x10"}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """Train one row, record memory and time, evaluate; write ``<out>/<row>/cell.json``."""
    import erasekit
    from erasekit.edit import EraseRequest
    from erasekit.eval.protocols import evaluate

    torch.set_num_threads(args.threads)
    row = args.child
    spec = dict(ROWS[row])
    lr = args.lr * spec.pop("lr_scale", 1.0)
    pipe = erasekit.load_pipeline("shapes")
    rss_loaded = _maxrss_mib()
    request = EraseRequest(list(SPLIT0))
    kw = dict(
        preset="paper",
        train_method="xattn",
        zt_producer="pooled",
        steps=args.steps,
        lr=lr,
        ddim_steps=args.ddim_steps,
        seed=args.seed,
        **spec,
    )
    t0 = time.perf_counter()
    edit = erasekit.erase(pipe, request, method="esd", progress=not args.quiet, **kw)
    train_seconds = time.perf_counter() - t0
    rss_trained = _maxrss_mib()
    n_params = int(edit.trace["n_parameters"])
    cell: dict[str, Any] = {
        "row": row,
        "config": dict(kw),
        "n_trainable_parameters": n_params,
        # parameters + gradients + Adam's exp_avg and exp_avg_sq, float32
        "trainable_state_mib": round(4 * 4 * n_params / 2**20, 3),
        "maxrss_after_load_mib": round(rss_loaded, 1),
        "maxrss_after_train_mib": round(rss_trained, 1),
        "train_increment_mib": round(rss_trained - rss_loaded, 1),
        "seconds_per_step": edit.trace["seconds_per_step"],
        "train_seconds": round(train_seconds, 2),
        "n_edited_tensors": len(edit.tensors),
    }
    if "lora_rank" in spec:
        from erasekit.export import plan_lora

        plan = plan_lora(edit, pipe, rank=spec["lora_rank"])
        cell["export"] = {
            "rank": spec["lora_rank"],
            "max_layer_error": max(low.error for low in plan.layers.values()),
            "overall_error": plan.overall_error,
            "numerical_ranks": sorted({low.numerical_rank for low in plan.layers.values()}),
            "layers": len(plan.layers),
        }
    from erasekit.analysis.spectrum import edit_applied

    with edit_applied(pipe, edit):
        res = evaluate(
            pipe,
            "shapes-objects",
            erase=list(SPLIT0),
            n_per_class=args.n_per_class,
            seed=args.eval_seed,
            progress=not args.quiet,
        )
    cell.update({m: res[m] for m in ("esr_1", "esr_3", "psr_1", "psr_3")}, eval_seconds=res["seconds"])
    cell["intervals"] = res["intervals"]
    write_json_atomic(Path(args.out) / row / "cell.json", cell)  # the edit itself is not kept (size)
    print(json.dumps({k: v for k, v in cell.items() if k != "intervals"}), flush=True)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| row | ESR-1 | ESR-3 | PSR-1 | PSR-3 | trainable parameters | params+grads+Adam (MiB) | peak RSS after "
        "training (MiB) | RSS growth in training (MiB) | s / step | export at rank (max layer error, numerical ranks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        c = results["cells"].get(row)
        if c is None:
            continue
        ex = c.get("export")
        ex_s = f"{ex['rank']} ({ex['max_layer_error']:.1e}, {ex['numerical_ranks']})" if ex else "n/a"
        lines.append(
            f"| {LABELS[row]} (lr {c['config']['lr']:g}) | {100 * c['esr_1']:.1f} | {100 * c['esr_3']:.1f} | "
            f"{100 * c['psr_1']:.1f} | {100 * c['psr_3']:.1f} | {c['n_trainable_parameters']:,} | "
            f"{c['trainable_state_mib']:.2f} | {c['maxrss_after_train_mib']:.0f} | {c['train_increment_mib']:.0f} | "
            f"{c['seconds_per_step']:.3f} | {ex_s} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--n-per-class", type=int, default=20)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/export/lora-train")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    out = Path(args.out)
    settings = {
        k: getattr(args, k) for k in ("steps", "lr", "ddim_steps", "seed", "n_per_class", "eval_seed", "threads")
    }
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"settings": settings, "cells": {}}
    if {k: results["settings"].get(k) for k in settings} != settings:
        raise SystemExit(f"{path} was made with other settings ({results['settings']}); use another --out.")
    results["settings"] = {
        **settings,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    for row in rows:
        if row in results["cells"]:
            continue
        cmd = [sys.executable, __file__, "--child", row, *(argv if argv is not None else sys.argv[1:])]
        print(f"== {row}", flush=True)
        subprocess.run(cmd, check=True)
        results["cells"][row] = json.loads((out / row / "cell.json").read_text())
        # the load while this row ran (step times on shared cores are only comparable within one run)
        results["cells"][row]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        write_json_atomic(path, results)
        write_text_atomic(out / "lora_train.md", markdown(results))
    table = markdown(results)
    print(table)
    return results


if __name__ == "__main__":
    main()
