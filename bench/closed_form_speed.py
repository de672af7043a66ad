"""Edit time of the closed forms at Stable Diffusion 1.4 sizes with random weights (issue 20).

A stand-in for SD 1.4 with random weights: the real CLIP text encoder architecture (12 layers,
768 wide, 123M parameters) with the real CLIP tokenizer, and the UNet's 16 cross-attention
blocks (``attn2.to_k`` / ``to_v``: 768 -> 320 / 640 / 1280, SD 1.4's module names), the only
UNet parts a closed form reads or writes. Every method runs through ``erasekit.erase`` on the same
request (``N`` erased concepts, 10 preserved ones, anchor ""), on one core (``--threads 1``).

Rows:

- ``uce``: UCE today (each of the 32 projections solves its own 768 x 768 system; erased and
  target prompts encoded in two unbatched calls).
- ``uce-shared``: the same method with :func:`erasekit.methods.closed_form.aligned_embeddings`
  (deduplicated, batched encoding) and :func:`~erasekit.methods.closed_form.shared_closed_form_edit`
  (one factorisation per edit) swapped in for ``uce.aligned_token_embeddings`` /
  ``uce.closed_form_edit``: what UCE does once the lead wires them in.
- ``rece`` / ``rece-shared``: RECE (3 epochs) today and with the same two swaps; RECE's eq. 8
  derivation (two passes over the 32 projections per epoch) is unchanged in both; the
  ``shared_derivation`` column times :func:`~erasekit.methods.closed_form.shared_derivation_matrix`
  for the same 4 derivations (G computed once), what it costs once wired too.
- ``speed`` (per-layer IPF/DPA and null space, the default) and ``speed-fast`` (one shared factor).

"text" is the time inside the text-encoding functions, "closed form" the time inside the solve
functions (for SPEED: everything after encoding, from the edit's trace), "total" the wall time of
``erasekit.erase``; each also as process CPU time (the ``_cpu`` columns: on a shared machine the
wall time mostly measures the other processes).

    python bench/closed_form_speed.py --threads 1            # 1, 10, 100 concepts
    python bench/closed_form_speed.py --threads 1 --n 1,10 --rows uce,uce-shared
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from erasekit.pipeline import base_info
from erasekit.testing import TOKENIZER_DIR
from erasekit.world.tokenizer import load_clip_tokenizer

# SD 1.4's cross-attention blocks and their channels
SD14_BLOCKS: list[tuple[str, int]] = (
    [(f"down_blocks.{b}.attentions.{a}", c) for b, c in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
)
ROWS = ("uce", "uce-shared", "rece", "rece-shared", "speed", "speed-fast")


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


@contextmanager
def timed(
    module: Any, names: dict[str, str], clock: dict[str, float], swap: dict[str, Callable] | None = None
) -> Iterator[None]:
    """Wrap ``module.<name>`` (optionally replaced by ``swap[name]``) so its time adds to ``clock[names[name]]``."""
    saved = {n: getattr(module, n) for n in names}

    def wrap(fn: Callable, bucket: str) -> Callable:
        def inner(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                clock[bucket] += time.perf_counter() - t0
                clock[f"{bucket}_cpu"] += time.process_time() - c0

        return inner

    try:
        for n, bucket in names.items():
            setattr(module, n, wrap((swap or {}).get(n, saved[n]), bucket))
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def run_row(pipe, row: str, request: EraseRequest) -> dict[str, float]:
    """Time one method on ``request``: {"text", "closed_form", "total"} seconds (+ extras)."""
    clock: dict[str, float] = defaultdict(float)
    shared = {"aligned_token_embeddings": cf.aligned_embeddings, "closed_form_edit": cf.shared_closed_form_edit}
    t0, c0 = time.perf_counter(), time.process_time()
    if row in ("uce", "uce-shared"):
        names = {"aligned_token_embeddings": "text", "closed_form_edit": "closed_form"}
        with timed(uce_mod, names, clock, shared if row == "uce-shared" else None):
            erasekit.erase(pipe, request, method="uce", progress=False)
    elif row in ("rece", "rece-shared"):
        names = {
            "aligned_token_embeddings": "text",
            "encode_prompts": "text",
            "closed_form_edit": "closed_form",
            "derivation_matrix": "closed_form",
        }
        with timed(rece_mod, names, clock, shared if row == "rece-shared" else None):
            edit = erasekit.erase(pipe, request, method="rece", progress=False)
        clock["derivation_calls"] = len(edit.trace["epochs_log"])
    else:
        edit = erasekit.erase(
            pipe, request, method="speed", preset="fast" if row == "speed-fast" else None, progress=False
        )
        clock["text"] = edit.trace["seconds"]["text"]
        clock["closed_form"] = edit.trace["seconds"]["closed_form"]
        clock["text_cpu"] = edit.trace["seconds"]["text_cpu"]
        clock["closed_form_cpu"] = edit.trace["seconds"]["closed_form_cpu"]
    clock["total"] = time.perf_counter() - t0
    clock["total_cpu"] = time.process_time() - c0
    if row == "rece-shared":  # what eq. 8 costs with shared factors: G once, then (d, d) work per derivation
        t1, c1 = time.perf_counter(), time.process_time()
        g = cf.kv_gram(rece_mod.kv_weights(pipe.unet))
        m = torch.eye(768, dtype=torch.float64)
        for _ in range(int(clock["derivation_calls"])):
            cf.shared_derivation_matrix(g, m, 0.1)
        clock["shared_derivation"] = time.perf_counter() - t1
        clock["shared_derivation_cpu"] = time.process_time() - c1
    return {k: round(v, 3) for k, v in clock.items()}


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
            f"shared eq. 8: {r['shared_derivation_cpu']:.3f} s CPU for the {int(r['derivation_calls'])} derivations"
            if "shared_derivation" in r
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
