"""LoRA rank vs relative delta error vs ESR-1/PSR-1 on the miniature (issue 16).

For UCE, RECE, ESD-x and AP on one split of bench/table1.py (erase 5 objects, preserve the other
5), the edit is factorised by the export's truncated SVD (:func:`erasekit.export.plan_lora`) at
ranks 1, 4, 16 and full; each low-rank edit (``W_base + B A``, bias deltas exact as peft's
lora_bias) is evaluated with the ``shapes-objects`` protocol. Fine-tuned rows use the Table 1
budget (200 steps, lr 5e-4, ddim_steps 20, seed 0).

Results go to ``--out`` (``results.json`` and ``table.md``, written atomically after every cell;
re-running skips the cells already done with the same settings).

    python bench/export_lora.py --threads 1 --n-per-class 10        # what bench/results/export/ holds
    python bench/export_lora.py --tiny                               # smoke test (random tiny model)
    python bench/export_lora.py --rows ap --out B ... ; python bench/export_lora.py --merge B   # parallel runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from table1 import SPLITS, SmokeDetector  # bench/table1.py (this script's folder is on sys.path)

import erasekit
from erasekit.analysis.spectrum import edit_applied
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig
from erasekit.eval.protocols import evaluate
from erasekit.export import plan_lora
from erasekit.io import write_json_atomic, write_text_atomic

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "uce": ("uce", {}),
    "rece": ("rece", {}),
    "esd-x": ("esd", {"train_method": "xattn"}),
    "ap": ("ap", {}),
}
FINETUNED = {"esd", "ap"}
LABELS = {"uce": "UCE", "rece": "RECE", "esd-x": "ESD-x", "ap": "AP", "original": "Original"}


def make_edit(pipe, row: str, erase: list[str], args) -> tuple[Any, float]:
    """The row's edit (timed)."""
    method, extra = ROWS[row]
    kw: dict[str, Any] = dict(extra)
    if method in FINETUNED:
        kw.update(steps=args.steps, lr=args.lr, ddim_steps=args.ddim_steps, seed=args.seed)
    if method == "ap":
        kw.update(vocabulary=args.vocabulary, k=None)
    t0 = time.perf_counter()
    edit = erasekit.erase(pipe, EraseRequest(erase), method=method, progress=not args.quiet, **kw)
    return edit, time.perf_counter() - t0


def score(pipe, erase: list[str], args, detector, sampling) -> dict[str, float]:
    res = evaluate(
        pipe,
        "shapes-objects",
        erase=erase,
        n_per_class=args.n_per_class,
        seed=args.seed,
        sampling=sampling,
        detector=detector,
        progress=False,
    )
    return {m: res[m] for m in ("esr_1", "esr_3", "psr_1", "psr_3")}


def summarise(results: dict[str, Any]) -> str:
    head = (
        "| Method | rank | relative delta error | uniform rank for <= 1% | ESR-1 | PSR-1 | ESR-3 | PSR-3 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    order = ["original", *ROWS]
    ranks = ["-", "1", "4", "16", "full"]

    def where(key: str) -> tuple[int, int, str]:
        row, rank = key.split("|")
        return (order.index(row) if row in order else 99, ranks.index(rank) if rank in ranks else 99, rank)

    for key in sorted(results["cells"], key=where):
        c = results["cells"][key]
        row, rank = key.split("|")
        err = "-" if c.get("error") is None else f"{c['error']:.3e}"
        r1 = c.get("uniform_rank_for_1pct", "-")
        lines.append(
            f"| {LABELS.get(row, row)} | {rank} | {err} | {r1} | {100 * c['esr_1']:.1f} | {100 * c['psr_1']:.1f} "
            f"| {100 * c['esr_3']:.1f} | {100 * c['psr_3']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--ranks", default="1,4,16,full")
    p.add_argument("--split", type=int, default=0, help="bench/table1.py split index (0-3)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--vocabulary", default="shapes", help="AP's concept space (table1: the miniature's vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--original", action="store_true", help="also score the unedited model")
    p.add_argument("--out", default="bench/results/export")
    p.add_argument("--tiny", action="store_true", help="smoke test: random tiny model, stand-in detector")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated --out folders of parallel runs (same settings): fold their cells into --out, run nothing",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    ranks: list[int | str] = [r if r == "full" else int(r) for r in args.ranks.split(",")]
    erase = SPLITS[args.split]
    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe, sampling, detector = tiny_pipeline(0), SamplingConfig(steps=2, guidance_scale=3.0), SmokeDetector()
    else:
        from erasekit.eval.detectors import load_detector

        pipe, sampling, detector = erasekit.load_pipeline("shapes"), None, load_detector("shapes")
    settings = {
        "model": "tiny" if args.tiny else "shapes",
        "base": erasekit.pipeline.base_info(pipe)["fingerprint"],
        "split": erase,
        "steps": args.steps,
        "lr": args.lr,
        "ddim_steps": args.ddim_steps,
        "n_per_class": args.n_per_class,
        "vocabulary": args.vocabulary,
        "seed": args.seed,
    }
    out = Path(args.out)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "cells": {}, "edits": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings ({results['settings']}); use another --out.")

    for other in [Path(m.strip()) for m in args.merge.split(",") if m.strip()]:
        theirs = json.loads((other / "results.json").read_text())
        if theirs["settings"] != settings:
            raise SystemExit(f"{other / 'results.json'} was made with other settings; cannot merge it.")
        results["cells"].update({k: v for k, v in theirs["cells"].items() if k not in results["cells"]})
        results["edits"].update({k: v for k, v in theirs["edits"].items() if k not in results["edits"]})
    if args.merge:
        rows, args.original = [], False  # merging only

    def save() -> None:
        write_json_atomic(path, results)
        write_text_atomic(out / "table.md", summarise(results))

    if args.original and "original|-" not in results["cells"]:
        results["cells"]["original|-"] = score(pipe, erase, args, detector, sampling)
        save()
    for row in rows:
        todo = [r for r in ranks if f"{row}|{r}" not in results["cells"]]
        if not todo:
            continue
        print(f"== {row}: erase {erase}", flush=True)
        edit, seconds = make_edit(pipe, row, erase, args)
        results["edits"][row] = {"erase_seconds": round(seconds, 2), "tensors": len(edit.tensors)}
        for r in todo:
            plan = plan_lora(edit, pipe, rank=r)
            rep = plan.report()
            low = erasekit.export.low_rank_edit(edit, pipe, plan)
            with edit_applied(pipe, low):
                cell = score(pipe, erase, args, detector, sampling)
            cell.update(
                error=rep["overall_error"],
                uniform_rank_for_1pct=rep["uniform_rank_for_1pct"],
                max_layer_error=max(v["error"] for v in rep["layers"].values()),
                layers_rank_for_1pct=[v["rank_for_1pct"] for v in rep["layers"].values()],
                numerical_ranks=[v["numerical_rank"] for v in rep["layers"].values()],
                exact_biases=len(rep["biases"]),
            )
            results["cells"][f"{row}|{r}"] = cell
            print(
                f"{row} rank {r}: error {cell['error']:.3e} ESR-1 {cell['esr_1']:.3f} PSR-1 {cell['psr_1']:.3f}",
                flush=True,
            )
            save()
    save()
    table = summarise(results)
    if args.tiny:
        print("SMOKE TEST: random tiny model and a stand-in detector; the numbers mean nothing.")
    print(table)
    return results


if __name__ == "__main__":
    main()
