"""Seconds per fine-tuning step of ESD and AP with each z_t producer, and the floor (issue 13).

In one run, for each torch thread count (``--threads``, default 1 and 2) and repetition, the
variants are measured interleaved (ESD exact, ESD pooled, AP exact, AP pooled, the floor, then
again), so load changes on a shared machine hit every variant alike; the printed numbers are
medians over ``--reps``, and the load average (``os.getloadavg``) is recorded around every cell.

- ``exact`` is today's path: a DDIM run of the frozen model per step (ESD, Algorithm 1). Its cost
  depends on the drawn DDIM indices (uniform in [0, ddim_steps)); every variant of repetition ``r``
  uses seed ``r``, and the mean drawn index is printed next to its expected value.
- ``pooled`` computes ``zt_pool_size`` whole trajectories per refresh and serves
  ``zt_pool_size x ddim_steps`` steps from them. A bench run of ``--steps`` steps refreshes once, a pool
  capped to its own few steps, so the seconds per step are *amortised* as in a long run: the time of
  the steps without that refresh, plus ``1 / (zt_pool_size x ddim_steps / concepts_per_step)`` of the
  time of one full refresh (timed on its own, right after). The raw run time is kept too.
- the floor: what ESD's learning cannot avoid at the same batch, 3 UNet forwards + 1 backward
  (the frozen model on the anchor and erased rows in one call, the trained model on the erased row,
  the backward of the MSE to the trainable parameters), timed over ``--floor-iters`` iterations.

    python bench/bench_finetune.py                                  # the miniature, DDIM 50 (paper)
    python bench/bench_finetune.py --ddim-steps 20 --threads 1      # the miniature's own sampler
    python bench/bench_finetune.py --tiny --steps 2 --reps 1 --floor-iters 2   # smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

import erasekit
import erasekit.finetune as ft
from erasekit.edit import EraseRequest
from erasekit.methods.base import make_config


class RefreshTimer:
    """Times :meth:`PooledProducer._refresh` calls (the pool's batched DDIM runs) during a bench run."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._orig = ft.PooledProducer._refresh

    def __enter__(self) -> RefreshTimer:
        timer = self

        def timed(producer, step: int, k: int) -> None:
            t0 = time.perf_counter()
            timer._orig(producer, step, k)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1

        ft.PooledProducer._refresh = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ft.PooledProducer._refresh = self._orig  # type: ignore[method-assign]


def time_method(pipe, request: EraseRequest, method: str, producer: str, args, seed: int) -> dict[str, Any]:
    """One fine-tuning run of ``--steps`` steps; seconds per step (amortised for ``pooled``)."""
    method, _, preset = method.partition(":")  # "ap:paper": the method with that preset (default: its own)
    kw: dict[str, Any] = dict(steps=args.steps, ddim_steps=args.ddim_steps, seed=seed, zt_producer=producer)
    if producer == "pooled" and args.pool_size:
        kw["zt_pool_size"] = args.pool_size
    if method in ("ap", "age"):
        kw.update(vocabulary=args.vocabulary, k=args.k)
    config = make_config(method, preset or None, **kw)
    load = os.getloadavg()[0]
    with RefreshTimer() as timer:
        edit = erasekit.erase(pipe, request, method=method, config=config, progress=False)
    loop = edit.trace["seconds"]
    per_step = loop / args.steps
    out: dict[str, Any] = {"raw_seconds_per_step": per_step, "load_before": load, "load_after": os.getloadavg()[0]}
    if producer == "pooled":
        # A short bench run refreshes a pool capped to its own few steps; a long run refreshes full pools
        # of zt_pool_size trajectories. Charge each step its share of one full refresh, timed on its own.
        ctx = ft.FinetuneContext(pipe, config.train_method, ddim_steps=config.ddim_steps)
        # the refresh as the run made it: ESD and AP (empty anchor) keep the trajectories' frozen predictions
        keeps = method in ("esd", "ap") and request.target == ""
        full = ft.PooledProducer(ctx, replace(config, steps=10**9), request.erase, seed, frozen_eps=keeps)
        t0 = time.perf_counter()
        full._refresh(0, 0)
        refresh = time.perf_counter() - t0
        served = config.zt_pool_size * config.ddim_steps / config.concepts_per_step  # steps one refresh serves
        per_step = (loop - timer.seconds) / args.steps + refresh / served
        out.update(full_refresh_seconds=refresh, steps_per_refresh=served, capped_refresh_seconds=timer.seconds)
    else:
        grid = ddim_grid(pipe, args.ddim_steps)
        idx = [grid.index(int(r["t"])) for r in edit.trace["log"]]
        out["mean_ddim_index"] = statistics.fmean(idx)
    out["seconds_per_step"] = per_step
    return out


def ddim_grid(pipe, ddim_steps: int) -> list[int]:
    """The DDIM timesteps the fine-tuning samples on (index i = after i DDIM steps)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(ddim_steps)
    return [int(t) for t in sched.timesteps]


def time_floor(pipe, request: EraseRequest, args) -> dict[str, Any]:
    """3 UNet forwards + 1 backward at ESD's batch (1 erased row): the part of a step no producer saves."""
    ctx = ft.FinetuneContext(pipe, "xattn", ddim_steps=args.ddim_steps)
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    z = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = ctx.scheduler.timesteps[[args.ddim_steps // 2]]
    cond, anchor = ctx.embed(request.erase[:1]), ctx.embed([""])
    params = list(ctx.params.values())
    load = os.getloadavg()[0]

    def one() -> None:
        e_0, e_e = ctx.eps_frozen(torch.cat([z, z]), torch.cat([t, t]), torch.cat([anchor, cond])).chunk(2)
        loss = F.mse_loss(ctx.eps(z, t, cond), e_0 - (e_e - e_0))
        torch.autograd.grad(loss, params)

    one()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.floor_iters):
        one()
    return {"seconds_per_step": (time.perf_counter() - t0) / args.floor_iters, "load_before": load}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", help="pipeline: 'shapes', a diffusers folder or a hub id")
    ap.add_argument("--tiny", action="store_true", help="use a random tiny pipeline (smoke test; ignores --model)")
    ap.add_argument("--steps", type=int, default=10, help="fine-tuning steps per measured run")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--floor-iters", type=int, default=10, help="iterations of the floor measurement")
    ap.add_argument(
        "--methods", default="esd,ap", help="comma-separated: esd, ap, age; METHOD:PRESET picks a preset (ap:paper)"
    )
    ap.add_argument("--producers", default="exact,pooled", help="comma-separated z_t producers (first = old path)")
    ap.add_argument("--erase", default="triangle,square,star,heart,circle", help="comma-separated concepts to erase")
    ap.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the z_t sampler (ESD/AP: 50)")
    ap.add_argument("--pool-size", type=int, default=None, help="zt_pool_size (default: the config's)")
    ap.add_argument("--k", type=int, default=None, help="AP/AGE: K nearest concepts (default: the method's)")
    ap.add_argument("--vocabulary", default="auto", help="AP/AGE vocabulary (auto = shapes on the miniature)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe, model = tiny_pipeline(0), "tiny (random weights)"
        if args.vocabulary == "auto":
            args.vocabulary = "shapes"
    else:
        pipe, model = erasekit.load_pipeline(args.model), args.model
    request = EraseRequest([c.strip() for c in args.erase.split(",") if c.strip()])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    producers = [p.strip() for p in args.producers.split(",") if p.strip()]
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    print(f"model={model} steps={args.steps} reps={args.reps} ddim_steps={args.ddim_steps} erase={request.erase}")
    print(f"load average at start: {os.getloadavg()}", flush=True)

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    out: dict[str, Any] = {
        "command": "python bench/bench_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model,
        "steps": args.steps,
        "reps": args.reps,
        "ddim_steps": args.ddim_steps,
        "erase": request.erase,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "summary": {},
        "raw": raw,
    }
    for n in threads:
        torch.set_num_threads(n)
        cells = raw.setdefault(str(n), {})
        for rep in range(args.reps):
            for m in methods:
                for prod in producers:
                    r = time_method(pipe, request, m, prod, args, seed=rep)
                    cells.setdefault(f"{m}|{prod}", []).append(r)
                    print(
                        f"threads={n} rep={rep} {m:>4} {prod:>7}: {r['seconds_per_step'] * 1000:8.1f} ms/step",
                        flush=True,
                    )
                    _write(args, out, methods, producers)  # partial results survive an interrupted run
            r = time_floor(pipe, request, args)
            cells.setdefault("floor", []).append(r)
            print(f"threads={n} rep={rep} floor       : {r['seconds_per_step'] * 1000:8.1f} ms/step", flush=True)
            _write(args, out, methods, producers)
    for n, s in _write(args, out, methods, producers).items():
        print(f"\n== threads={n} (medians over {args.reps} reps; load average {s['load_average_range']})")
        for k, v in s["median_seconds_per_step"].items():
            print(f"  {k:>14}: {v * 1000:8.1f} ms/step")
        for k, v in s.items():
            if k != "median_seconds_per_step":
                print(f"  {k}: {v}")
        print(f"  expected mean DDIM index of exact: {(args.ddim_steps - 1) / 2}")
    return out


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]], methods: list[str], producers: list[str]) -> dict:
    """Medians per thread count and the ratios of the issue (those whose cells exist so far)."""
    summary: dict[str, dict[str, Any]] = {}
    old, new = producers[0], producers[-1]
    for n, cells in raw.items():
        med = {k: statistics.median(r["seconds_per_step"] for r in v) for k, v in cells.items()}
        s: dict[str, Any] = {"median_seconds_per_step": {k: round(v, 5) for k, v in med.items()}}
        s["reps_done"] = {k: len(v) for k, v in cells.items()}
        for m in methods:
            if f"{m}|{old}" in med and f"{m}|{new}" in med:
                s[f"{m}_speedup_{new}_vs_{old}"] = round(med[f"{m}|{old}"] / med[f"{m}|{new}"], 3)
            if f"{m}|{new}" in med and "floor" in med:
                s[f"{m}_{new}_over_floor"] = round(med[f"{m}|{new}"] / med["floor"], 3)
        for m in methods:
            for prod in producers:
                if m != "esd" and f"{m}|{prod}" in med and f"esd|{prod}" in med:
                    s[f"{m}_over_esd_{prod}"] = round(med[f"{m}|{prod}"] / med[f"esd|{prod}"], 3)
        idx = [r["mean_ddim_index"] for k, v in cells.items() for r in v if "mean_ddim_index" in r]
        if idx:
            s["exact_mean_ddim_index"] = round(statistics.fmean(idx), 2)
        loads = [r["load_before"] for v in cells.values() for r in v]
        s["load_average_range"] = [round(min(loads), 2), round(max(loads), 2)]
        summary[n] = s
    return summary


def _write(args, out: dict[str, Any], methods: list[str], producers: list[str]) -> dict:
    out["summary"] = summarise(out["raw"], methods, producers)
    if args.json:
        from erasekit.io import write_json_atomic

        write_json_atomic(args.json, out)
    return out["summary"]


if __name__ == "__main__":
    main()
