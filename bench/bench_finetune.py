"""Wall time per fine-tuning step of ESD, AP (and AGE) on one pipeline.

Every method runs the same number of steps with the same seed, so each draws the same erased
concepts, DDIM steps and z_t (the z_t sampler is shared and dominates ESD's cost); the difference
is the method's own work per step. Issue 3's target: AP within 2x of ESD per step.

    python bench/bench_finetune.py                      # the bundled miniature ("shapes"), 20 steps
    python bench/bench_finetune.py --steps 1000         # the issue's 1000-step measurement
    python bench/bench_finetune.py --tiny --steps 3     # smoke test on a random tiny pipeline
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import erasekit
from erasekit.edit import EraseRequest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", help="pipeline: 'shapes', a diffusers folder or a hub id")
    ap.add_argument("--tiny", action="store_true", help="use a random tiny pipeline (smoke test; ignores --model)")
    ap.add_argument("--steps", type=int, default=20, help="fine-tuning steps per method")
    ap.add_argument("--methods", default="esd,ap", help="comma-separated: esd, ap, age")
    ap.add_argument("--erase", default="triangle,square,star,heart,circle", help="comma-separated concepts to erase")
    ap.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the z_t sampler (ESD/AP: 50)")
    ap.add_argument("--k", type=int, default=None, help="AP/AGE: K nearest concepts (default: the method's)")
    ap.add_argument("--vocabulary", default="auto", help="AP/AGE vocabulary (auto = shapes on the miniature)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe, model = tiny_pipeline(0), "tiny (random weights)"
        vocabulary = "shapes" if args.vocabulary == "auto" else args.vocabulary
    else:
        pipe, model, vocabulary = erasekit.load_pipeline(args.model), args.model, args.vocabulary
    request = EraseRequest([c.strip() for c in args.erase.split(",") if c.strip()])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    results: dict[str, dict] = {}
    print(
        f"model={model} steps={args.steps} ddim_steps={args.ddim_steps} threads={torch.get_num_threads()} erase={request.erase}"
    )
    for m in methods:
        kw: dict = dict(steps=args.steps, ddim_steps=args.ddim_steps, seed=args.seed)
        if m in ("ap", "age"):
            kw.update(vocabulary=vocabulary, k=args.k)
        t0 = time.perf_counter()
        edit = erasekit.erase(pipe, request, method=m, progress=False, **kw)
        total = time.perf_counter() - t0
        per_step = edit.trace["seconds"] / args.steps
        results[m] = {
            "seconds_total": round(total, 3),
            "seconds_loop": edit.trace["seconds"],
            "seconds_per_step": round(per_step, 5),
        }
        print(
            f"{m:>4}: {per_step * 1000:9.1f} ms/step   loop {edit.trace['seconds']:8.2f} s   total (with setup) {total:8.2f} s"
        )
    if "esd" in results:
        for m in results:
            if m != "esd":
                ratio = results[m]["seconds_per_step"] / results["esd"]["seconds_per_step"]
                results[m]["ratio_to_esd"] = round(ratio, 3)
                print(f"{m}/esd time per step: {ratio:.2f}x (target for AP: <= 2x)")
    out = {
        "model": model,
        "steps": args.steps,
        "ddim_steps": args.ddim_steps,
        "threads": torch.get_num_threads(),
        "erase": request.erase,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    if args.json:
        from erasekit.io import write_json_atomic

        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    print(json.dumps(main()["results"], indent=2))
