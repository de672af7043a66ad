"""How fast could AP's step be with *any* z_t producer? (issue 13)

Times AP's fine-tuning step (default ``authors`` preset, and ``paper``) with each real producer and with
a "free" sampler: ``FinetuneContext.sample_zt`` patched to return the starting noise (zero UNet calls),
on top of ``pooled`` for the descent's z_t, whose refreshes are not charged either (their time is
subtracted) while the step still reads the pool's frozen predictions. The free variant learns
nonsense but does exactly the learning compute of a step (ascents, descent, backward), so
``exact / free`` bounds the speed-up any z_t producer can give, and ``free / ESD pooled`` bounds AP's
step-time ratio to ESD (ESD pooled is charged its refreshes, a conservative side). Variants are
interleaved per repetition; medians are printed.

    OMP_NUM_THREADS=1 python bench/ap_zt_bound.py --reps 3 --steps 10 --json bench/results/finetune_speed/ap_zt_bound.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from bench_finetune import RefreshTimer  # bench/ is on sys.path when this script runs

import erasekit
import erasekit.finetune as ft
from erasekit.edit import EraseRequest
from erasekit.io import write_json_atomic

ERASE = ["triangle", "square", "star", "heart", "circle"]


def _free_sample_zt(self, cond, n_steps, generator, *, guidance, frozen=True):
    """The z_t sampler at zero cost: the start noise, labelled with the asked-for timestep."""
    b = cond.shape[0]
    return self.initial_noise(b, generator), self.timesteps_at([n_steps] * b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="fine-tuning steps per timed run")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are printed)")
    ap.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps of the z_t sampler")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = erasekit.load_pipeline("shapes")
    req = EraseRequest(ERASE)
    variants: list[tuple[str, str, str | None, str, bool]] = [  # label, method, preset, producer, free sampler
        ("esd pooled, refreshes not charged", "esd", None, "pooled", True),
        ("ap authors trained (preset)", "ap", None, "trained", False),
        ("ap authors exact", "ap", None, "exact", False),
        ("ap authors pooled", "ap", None, "pooled", False),
        ("ap authors pooled + free sampler", "ap", None, "pooled", True),
        ("ap paper exact", "ap", "paper", "exact", False),
        ("ap paper pooled", "ap", "paper", "pooled", False),
        ("ap paper pooled + free sampler", "ap", "paper", "pooled", True),
    ]
    raw: dict[str, list[float]] = {v[0]: [] for v in variants}
    loads: list[float] = []
    real = ft.FinetuneContext.sample_zt
    for rep in range(args.reps):
        for label, method, preset, producer, free in variants:
            ft.FinetuneContext.sample_zt = _free_sample_zt if free else real
            try:
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                with RefreshTimer() as clock:
                    edit = erasekit.erase(
                        pipe,
                        req,
                        method=method,
                        preset=preset,
                        steps=args.steps,
                        ddim_steps=args.ddim_steps,
                        zt_producer=producer,
                        seed=rep,
                        progress=False,
                    )
                free_s = clock.seconds if free else 0.0  # the free variant: pool refreshes not charged
                raw[label].append((edit.trace["seconds"] - free_s) / args.steps)
            finally:
                ft.FinetuneContext.sample_zt = real
            print(
                f"rep={rep} {label:34s} {raw[label][-1] * 1000:7.1f} ms/step ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in raw.items()}
    ratios: dict[str, Any] = {
        "ap_authors_exact_over_free": med["ap authors exact"] / med["ap authors pooled + free sampler"],
        "ap_authors_trained_over_free": med["ap authors trained (preset)"] / med["ap authors pooled + free sampler"],
        "ap_paper_exact_over_free": med["ap paper exact"] / med["ap paper pooled + free sampler"],
        "ap_authors_free_over_esd_pooled": med["ap authors pooled + free sampler"]
        / med["esd pooled, refreshes not charged"],
        "ap_paper_free_over_esd_pooled": med["ap paper pooled + free sampler"]
        / med["esd pooled, refreshes not charged"],
    }
    print(
        f"\n== medians over {args.reps} reps, {args.threads} thread(s), DDIM {args.ddim_steps}, load {min(loads):.2f}-{max(loads):.2f}"
    )
    for k, v in med.items():
        print(f"  {k:34s} {v * 1000:7.1f} ms/step")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    if args.json:
        write_json_atomic(
            args.json,
            {"args": vars(args), "raw": raw, "median": med, "ratios": ratios, "load_range": [min(loads), max(loads)]},
        )


if __name__ == "__main__":
    main()
