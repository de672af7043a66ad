"""Edit time of the closed forms at Stable Diffusion 1.4 sizes with random weights (issue 20).

A stand-in for SD 1.4 with random weights: the real CLIP text encoder architecture (12 layers,
768 wide, 123M parameters) with the real CLIP tokenizer, and the UNet's 16 cross-attention
blocks (``attn2.to_k`` / ``to_v``: 768 -> 320 / 640 / 1280, SD 1.4's module names), the only
UNet parts a closed form reads or writes. Every method runs through ``erasekit.erase`` on the same
request (``N`` erased concepts, 10 preserved ones, anchor ""), on one core (``--threads 1``).

Rows:

- ``uce``: UCE as wired (issue 20): every distinct prompt encoded once in batches
  (:class:`erasekit.methods.closed_form.PromptEmbeddings`) and ONE float64 Cholesky factor ``M``
  shared by the 32 projections (:func:`erasekit.methods.closed_form.shared_closed_form_edit`).
- ``uce-per-layer``: the code before the wiring, run here from the functions it used: erased and
  target prompts encoded in two unbatched calls (``uce.aligned_token_embeddings``), and every
  projection solving its own 768 x 768 system (``uce.uce_closed_form``). ``max_diff`` in the
  ``uce`` row is the largest element-wise difference between the two edits (float32 weights).
- ``rece``: RECE (3 epochs) as wired: one factor per epoch, composed in float64 and applied once,
  eq. 8 from the Gram matrix of the original K/V (:func:`~erasekit.methods.closed_form.shared_derivation_matrix`).
- ``rece-per-layer``: RECE before the wiring, re-run here from the functions it used: per-projection
  solves every epoch on the float32 running weights and eq. 8 by two passes over the 32 projections
  (:func:`erasekit.methods.rece.derivation_matrix`).
- ``speed`` (per-layer IPF/DPA and null space, the default) and ``speed-fast`` (one shared factor).

"text" is the time inside text encoding, "closed form" everything after it up to the edit (each
method's own ``trace["seconds"]``, or the two timed phases of the per-layer rows), "total" the wall
time; each also as process CPU time (the ``_cpu`` columns: on a shared machine the wall time mostly
measures the other processes).

    python bench/closed_form_speed.py --threads 1            # 1, 10, 100 concepts
    python bench/closed_form_speed.py --threads 1 --n 1,10 --rows uce,uce-shared
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import erasekit
import erasekit.methods.rece as rece_mod
import erasekit.methods.uce as uce_mod
from erasekit.edit import EraseRequest
from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.methods import closed_form as cf
from erasekit.methods.base import make_config
from erasekit.pipeline import base_info, encode_prompts
from erasekit.testing import TOKENIZER_DIR
from erasekit.world.tokenizer import load_clip_tokenizer

# SD 1.4's cross-attention blocks and their channels
SD14_BLOCKS: list[tuple[str, int]] = (
    [(f"down_blocks.{b}.attentions.{a}", c) for b, c in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)
ROWS = ("uce", "uce-per-layer", "rece", "rece-per-layer", "speed", "speed-fast")


class _Attn(torch.nn.Module):
    def __init__(self, channels: int, cross_dim: int = 768) -> None:
        super().__init__()
        self.to_k = torch.nn.Linear(cross_dim, channels, bias=False)
        self.to_v = torch.nn.Linear(cross_dim, channels, bias=False)


def sd14_standin(seed: int = 0) -> SimpleNamespace:
    """SD 1.4's text encoder (random weights) and its 16 cross-attention K/V blocks (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    unet = torch.nn.Module()  # SD's dotted module names, as a tree of containers
    for name, c in SD14_BLOCKS:
        parent = unet
        parts = f"{name}.transformer_blocks.0".split(".")
        for p in parts:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module("attn2", _Attn(c))
    pipe = SimpleNamespace(tokenizer=load_clip_tokenizer(TOKENIZER_DIR), text_encoder=text, unet=unet)
    base_info(pipe)  # fingerprint once, outside the timings
    return pipe


class _Clock:
    """Wall and process-CPU time of consecutive phases."""

    def __init__(self) -> None:
        self.out: dict[str, float] = defaultdict(float)
        self.t, self.c = time.perf_counter(), time.process_time()

    def lap(self, bucket: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.out[bucket] += t - self.t
        self.out[f"{bucket}_cpu"] += c - self.c
        self.t, self.c = t, c


def uce_per_layer(pipe, request: EraseRequest) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """UCE (authors preset) as the code ran before the wiring: unbatched encoding, one solve per projection."""
    cfg = make_config("uce")
    clock = _Clock()
    erased, targets, preserved = uce_mod.uce_prompts(request, cfg)
    c_in, c_tgt = uce_mod.aligned_token_embeddings(pipe, erased, targets, cfg.erase_positions)
    c_pres = uce_mod.preserve_embeddings(pipe, preserved, cfg.preserve_positions, c_in.shape[1])
    clock.lap("text")
    kw = dict(erase_scale=cfg.erase_scale, preserve_scale=cfg.resolved_preserve_scale(len(preserved)), lamb=cfg.lamb)
    out = {}
    for name, w in cf.kv_weights_for(pipe, cfg.projections).items():
        out[name] = uce_mod.uce_closed_form(w, c_in, c_tgt, c_pres, **kw)
    clock.lap("closed_form")
    return out, dict(clock.out)


def rece_per_layer(pipe, request: EraseRequest) -> dict[str, float]:
    """RECE (authors preset) as the code ran before the wiring: per-projection solves on float32 running
    weights every epoch, eq. 8 by two passes over every projection, unbatched encoding."""
    cfg = make_config("rece")
    ucfg, ecfg = cfg.uce_config(), cfg.epoch_config()
    clock = _Clock()
    erased, targets, pres_u = uce_mod.uce_prompts(request, ucfg)
    _, _, pres_e = uce_mod.uce_prompts(request, ecfg)
    c_in, c_tgt = uce_mod.aligned_token_embeddings(pipe, erased, targets)
    d = c_in.shape[1]
    c_pu = uce_mod.preserve_embeddings(pipe, pres_u, cfg.preserve_positions, d)
    c_pe = uce_mod.preserve_embeddings(pipe, pres_e, cfg.preserve_positions, d)
    full = encode_prompts(pipe, erased).float()
    c_src, c_dt = uce_mod.aligned_token_embeddings(pipe, erased, targets, cfg.derived_positions)
    clock.lap("text")
    w_orig = rece_mod.kv_weights(pipe.unet)
    names = list(w_orig)

    def solve_all(ws, ci, ct, cp, ucfg_, scale):
        kw = dict(erase_scale=ucfg_.erase_scale, preserve_scale=scale, lamb=ucfg_.lamb)
        return {k: uce_mod.uce_closed_form(w, ci, ct, cp, **kw) for k, w in ws.items()}

    current = solve_all(w_orig, c_in, c_tgt, c_pu, ucfg, ucfg.resolved_preserve_scale(len(pres_u)))
    for epoch in range(cfg.epochs + 1):
        m = rece_mod.derivation_matrix([w_orig[k] for k in names], [current[k] for k in names], cfg.lamb_derive)
        _ = (full.double() @ m.T).float()
        c_der = (c_src.double() @ m.T).float()
        if epoch == cfg.epochs:
            break
        current = solve_all(current, c_der, c_dt, c_pe, ecfg, float(ecfg.preserve_scale))
    clock.lap("closed_form")
    return dict(clock.out)


def run_row(pipe, row: str, request: EraseRequest) -> dict[str, float]:
    """Time one method on ``request``: {"text", "closed_form", "total"} seconds (+ CPU and extras)."""
    t0, c0 = time.perf_counter(), time.process_time()
    clock: dict[str, float] = {}
    if row == "uce-per-layer":
        _, clock = uce_per_layer(pipe, request)
    elif row == "rece-per-layer":
        clock = rece_per_layer(pipe, request)
    else:
        method, preset = {"uce": ("uce", None), "rece": ("rece", None), "speed": ("speed", None)}.get(
            row, ("speed", "fast")
        )
        edit = erasekit.erase(pipe, request, method=method, preset=preset, progress=False)
        sec = edit.trace["seconds"]
        clock = {k: sec[k] for k in ("text", "closed_form", "text_cpu", "closed_form_cpu")}
    clock["total"] = time.perf_counter() - t0
    clock["total_cpu"] = time.process_time() - c0
    if row == "uce":  # the same edit as the pre-wiring code? (outside the timings)
        ref, _ = uce_per_layer(pipe, request)
        clock["max_diff"] = max(float((edit.tensors[k] - ref[k]).abs().max()) for k in ref)
        clock["max_weight"] = max(float(ref[k].abs().max()) for k in ref)
    return {k: round(v, 3) if k not in ("max_diff", "max_weight") else v for k, v in clock.items()}


def request_for(n: int, n_preserve: int) -> EraseRequest:
    """``n`` distinct erased concepts and ``n_preserve`` preserved ones (their names do not overlap)."""
    return EraseRequest(
        [f"celebrity {i:03d}" for i in range(n)], preserve=[f"painter {j:02d}" for j in range(n_preserve)]
    )


def markdown(results: dict[str, Any]) -> str:
    head = (
        "| concepts | method | text (s) | closed form (s) | total (s) | text CPU (s) | closed form CPU (s) | "
        "total CPU (s) | notes |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    order = sorted(results["cells"], key=lambda k: (int(k.split("|")[0]), ROWS.index(k.split("|")[1])))
    for key in order:
        r = results["cells"][key]
        n, row = key.split("|")
        note = (
            f"max abs difference from uce-per-layer {r['max_diff']:.1e} (largest weight {r['max_weight']:.2f})"
            if "max_diff" in r
            else ""
        )
        lines.append(
            f"| {n} | {row} | {r['text']:.2f} | {r['closed_form']:.3f} | {r['total']:.2f} | {r['text_cpu']:.2f} | "
            f"{r['closed_form_cpu']:.3f} | {r['total_cpu']:.2f} | {note} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1,10,100", help="comma-separated numbers of erased concepts")
    p.add_argument("--preserve", type=int, default=10, help="preserved concepts in every request")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/closed-form-speed")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown table from --out/results.json")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads((Path(args.out) / "results.json").read_text())
        write_text_atomic(Path(args.out) / "closed_form_speed.md", markdown(results))
        print(markdown(results))
        return results
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    pipe = sd14_standin()
    n_text = sum(x.numel() for x in pipe.text_encoder.parameters())
    n_kv = sum(x.numel() for x in pipe.unet.parameters())
    results: dict[str, Any] = {
        "settings": {
            "threads": args.threads,
            "preserve": args.preserve,
            "text_encoder_parameters": n_text,
            "kv_projections": 2 * len(SD14_BLOCKS),
            "kv_parameters": n_kv,
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "cells": {},
    }
    print(f"text encoder {n_text / 1e6:.1f}M parameters, {2 * len(SD14_BLOCKS)} K/V projections", flush=True)
    out = Path(args.out)
    for n in [int(x) for x in args.n.split(",") if x.strip()]:
        request = request_for(n, args.preserve)
        for row in rows:
            r = run_row(pipe, row, request)
            results["cells"][f"{n}|{row}"] = r
            print(f"{n:>4} {row:<12} {r}", flush=True)
            write_json_atomic(out / "results.json", results)
            write_text_atomic(out / "closed_form_speed.md", markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
