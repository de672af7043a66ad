"""UCE / RECE edit time for 1, 10 and 100 concepts at real SDXL and SD3 shapes, random weights (issue 17).

Real text encoders and a real denoiser forward are out of reach on a shared 2-core CPU (SDXL's UNet is
2.6 B parameters, SD3-medium's transformer 2 B; one SD3 forward at 1024 px is ~17 TFLOP), so each
family is reduced to exactly what the closed forms read and write, at the published sizes:

- **SDXL** (``stabilityai/stable-diffusion-xl-base-1.0``, ``unet/config.json``): every ``attn2.to_k`` /
  ``to_v`` of the UNet, built from the published block layout (``block_out_channels`` [320, 640, 1280],
  ``transformer_layers_per_block`` [1, 2, 10], ``cross_attention_dim`` 2048, attention only at levels 2
  and 3, up blocks with 3 attentions each, mid block 10 layers): 70 transformer blocks, 140 projections
  of shape (640 | 1280, 2048), random weights. The text conditioning is a deterministic random
  (77, 2048) matrix per prompt standing in for the two encoders' outputs. UCE and RECE run through
  ``erasekit.erase`` unchanged (the SDXL adapter, the method's own closed forms, the edit's digest).
- **SD3** (``stabilityai/stable-diffusion-3-medium-diffusers``, ``transformer/config.json``): 24 joint
  blocks, ``attention_head_dim`` 64 x 24 heads = 1536, ``caption_projection_dim`` 1536: 48 text-stream
  projections ``add_k_proj`` / ``add_v_proj`` of shape (1536, 1536). What each block's projections read
  (:meth:`~erasekit.families.sd3.SD3Adapter.kv_inputs`, one transformer forward per prompt batch in the
  real model) is replaced by deterministic random (77 + 256, 1536) matrices per prompt and block; the
  per-block UCE solve (:func:`erasekit.families.closed_forms.per_block_uce`) is the real code. RECE does not
  apply to SD3 (erasekit.families.SUPPORT says why), so only UCE is timed. RECE runs ``--rece-epochs``
(default 1, the ``authors-art`` setting; its default preset runs 3): each epoch adds one UCE solve and
one eq. 8 derivation, so other epoch counts extrapolate linearly.

So the figures are the closed forms' own cost at real sizes; add the text encoders (SDXL) or one
transformer forward per 16 prompts (SD3) for a real model. Printed as a table and written to
``--out`` (JSON) with the settings and the load average. Each row also has ``cpu_seconds`` (the
process's CPU time: one thread, so it moves less with the machine's load than the wall seconds) and
``standin_seconds`` (inside the timed call, the time spent making the random stand-in conditioning /
block inputs; for SD3 also ``solve_seconds``, the time in the per-block solves).

**Check** (unless ``--no-check``; after each row, not timed): SDXL UCE rows compare the edit
``erasekit.erase`` made (one shared float64 factor for all projections,
:func:`erasekit.methods.closed_form.shared_closed_form_edit`) with the per-projection float64 solve
:func:`erasekit.methods.uce.uce_closed_form` on the same inputs, for one 640- and one 1280-wide
``to_k`` and ``to_v``: the max abs difference is printed and stored in the row (``check``), next to
the largest change the edit makes. SD3 rows solve block 0 twice through ``per_block_uce``: with the
one shared float64 factor for the block's K and V that UCE uses
(:func:`erasekit.methods.closed_form.uce_edit_weights`) and with the previous per-projection solve
:func:`erasekit.methods.uce.uce_closed_form`: the max abs difference and the two solve times.

    nice python bench/family_edit_time.py --out bench/results/families/edit_time.json
    python bench/family_edit_time.py --counts 1 --families sd3     # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.families.closed_forms import per_block_uce
from erasekit.families.sd3 import SD3Adapter
from erasekit.io import write_json_atomic
from erasekit.methods.base import make_config
from erasekit.methods.closed_form import PromptEmbeddings, uce_edit_weights
from erasekit.methods.uce import uce_closed_form, uce_embeddings, uce_prompts
from erasekit.pipeline import cross_attention_modules
from erasekit.testing import TOKENIZER_DIR
from erasekit.world.tokenizer import load_clip_tokenizer


def _seeded(prompt: str, *shape: int, salt: str = "") -> torch.Tensor:
    seed = int(hashlib.sha256((salt + "\0" + prompt).encode()).hexdigest()[:12], 16)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


class _Attn(torch.nn.Module):
    def __init__(self, inner: int, ctx: int, names: tuple[str, str]) -> None:
        super().__init__()
        for n in names:
            self.add_module(n, torch.nn.Linear(ctx, inner, bias=False))


def sdxl_kv_tree() -> torch.nn.Module:
    """The SDXL base UNet's attn2 K/V projections, named and shaped as in diffusers."""
    root = torch.nn.Module()
    layers = {1: 2, 2: 10}  # level -> transformer layers per block (level 0 has no attention)
    chans = {1: 640, 2: 1280}

    def blocks(prefix: str, n_attn: int, level: int) -> None:
        for a in range(n_attn):
            for t in range(layers[level]):
                name = f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn2"
                parent = root
                for part in name.split(".")[:-1]:
                    if not hasattr(parent, part):
                        parent.add_module(part, torch.nn.Module())
                    parent = getattr(parent, part)
                parent.add_module("attn2", _Attn(chans[level], 2048, ("to_k", "to_v")))

    for level in (1, 2):
        blocks(f"down_blocks.{level}", 2, level)
    blocks("mid_block", 1, 2)
    for up, level in ((0, 2), (1, 1)):
        blocks(f"up_blocks.{up}", 3, level)
    return root


class _NoEncoder(torch.nn.Module):
    """Stands in for a text encoder: no weights, on the CPU."""

    device = torch.device("cpu")


class FakeSDXL:
    """An object the SDXL adapter and the UCE/RECE code accept: the K/V tree as ``unet``, the real CLIP
    tokenizer, and ``encode_prompt`` returning deterministic random (77, 2048) conditioning."""

    def __init__(self) -> None:
        self.unet = sdxl_kv_tree()
        self.tokenizer = self.tokenizer_2 = load_clip_tokenizer(TOKENIZER_DIR)
        self.text_encoder_2 = _NoEncoder()
        self.scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon"))
        self._erasekit_family = "sdxl"
        self.name_or_path = "sdxl-kv-shapes-random"

    standin_seconds = 0.0

    def encode_prompt(self, prompts, **_: object):
        t0 = time.perf_counter()
        emb = torch.stack([_seeded(p, 77, 2048) for p in prompts])
        self.standin_seconds += time.perf_counter() - t0
        return emb, None, torch.zeros(len(prompts), 1280), None


class BenchSD3(SD3Adapter):
    """SD3 at medium's shapes: 24 blocks' add_k_proj/add_v_proj (1536 x 1536); random block inputs."""

    def __init__(self, blocks: int = 24, inner: int = 1536) -> None:
        self.root = torch.nn.Module()
        self.root.add_module("transformer_blocks", torch.nn.ModuleList())
        for _ in range(blocks):
            blk = torch.nn.Module()
            blk.add_module("attn", _Attn(inner, inner, ("add_k_proj", "add_v_proj")))
            self.root.transformer_blocks.append(blk)
        self.inner = inner
        self.standin_seconds = 0.0

    def denoiser(self, pipe) -> torch.nn.Module:
        return self.root

    def kv_inputs(self, pipe, prompts, *, batch_size: int = 16):
        t0 = time.perf_counter()
        out = {
            n: torch.stack([_seeded(p, 77 + self.max_sequence_length, self.inner, salt=n) for p in prompts])
            for n in self.kv_modules(pipe)
        }
        self.standin_seconds += time.perf_counter() - t0
        return out


class _TimedSolve:
    """A block ``solve`` for ``per_block_uce`` that adds up the time spent in it: by default what UCE passes,
    :func:`~erasekit.methods.closed_form.uce_edit_weights` (one float64 factor per block, applied to its K and
    V; low-rank form below d/2 erased rows); ``per_projection=True``: the previous path, the float64 solve
    ``uce_closed_form`` once per projection."""

    def __init__(self, per_projection: bool = False) -> None:
        self.per_projection, self.seconds = per_projection, 0.0

    def __call__(self, weights, ci, ct, cp, **kw) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self.per_projection:
            out = {name: uce_closed_form(w, ci, ct, cp, **kw) for name, w in weights.items()}
        else:
            out = uce_edit_weights(weights, ci, ct, cp, **kw)
        self.seconds += time.perf_counter() - t0
        return out


def concepts(n: int) -> list[str]:
    return [f"concept number {i}" for i in range(n)]


def check_sdxl_uce(pipe: FakeSDXL, request: EraseRequest, tensors: dict[str, torch.Tensor]) -> dict:
    """Max abs difference between the shared-factor edit ``tensors`` and the per-projection float64 solve,
    on one 640- and one 1280-wide attn2 (to_k and to_v); both are float32 after their one cast."""
    cfg = make_config("uce")
    erased, targets, preserved = uce_prompts(request, cfg)
    c_in, c_tgt, c_pres = uce_embeddings(
        PromptEmbeddings(pipe, erased + targets + preserved), erased, targets, preserved, cfg
    )
    kw = dict(erase_scale=cfg.erase_scale, preserve_scale=cfg.resolved_preserve_scale(len(preserved)), lamb=cfg.lamb)
    picked: dict[int, str] = {}
    for name, attn in cross_attention_modules(pipe.unet).items():
        picked.setdefault(attn.to_k.weight.shape[0], name)
    diff, change, names = 0.0, 0.0, []
    for name in picked.values():
        for proj in ("to_k", "to_v"):
            w_old = getattr(cross_attention_modules(pipe.unet)[name], proj).weight.detach()
            key = f"unet.{name}.{proj}.weight"
            ref = uce_closed_form(w_old, c_in, c_tgt, c_pres, **kw)
            diff = max(diff, float((tensors[key] - ref).abs().max()))
            change = max(change, float((ref - w_old).abs().max()))
            names.append(key)
    return {
        "what": "shared-factor UCE edit vs per-projection uce_closed_form (float64 solve), same inputs",
        "erase_rows": int(c_in.shape[0]),
        "path": "low-rank W + (W A) B" if c_in.shape[0] < c_in.shape[1] // 2 else "dense W M",
        "projections": names,
        "max_abs_diff": diff,
        "max_abs_edit": change,
    }


def time_sdxl(method: str, n: int, rece_epochs: int, check: bool) -> dict:
    pipe = FakeSDXL()
    request = EraseRequest(erase=concepts(n), preserve=["a photo", "a painting"])
    opts = {"epochs": rece_epochs} if method == "rece" else {}
    t0, c0 = time.perf_counter(), time.process_time()
    edit = erasekit.erase(pipe, request, method=method, progress=False, **opts)
    row = {
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - c0, 3),
        "standin_seconds": round(pipe.standin_seconds, 3),
        "edit_trace_seconds": edit.trace.get("seconds"),
        "n_tensors": len(edit.tensors),
    }
    if check and method == "uce":
        row["check"] = check_sdxl_uce(pipe, request, edit.tensors)
    return row


class _Pipe:
    tokenizer = load_clip_tokenizer(TOKENIZER_DIR)


def _sd3_uce(fam: BenchSD3, n: int, solve: _TimedSolve) -> dict[str, torch.Tensor]:
    cfg = make_config("uce")
    request = EraseRequest(erase=concepts(n), preserve=["a photo", "a painting"])
    erased, targets, preserved = uce_prompts(request, cfg)
    return per_block_uce(
        _Pipe(),
        fam,
        erased,
        targets,
        preserved,
        cfg,
        preserve_scale=cfg.resolved_preserve_scale(len(preserved)),
        solve=solve,
    )


def check_sd3_block(n: int) -> dict:
    """Block 0 (same inputs as in the timed run: the stand-in is seeded by prompt and block name), solved
    with one shared factor for its K and V (what UCE does) and per projection (the previous path)."""
    per, shared = _TimedSolve(per_projection=True), _TimedSolve()
    fam = BenchSD3(blocks=1)
    a, b = _sd3_uce(fam, n, per), _sd3_uce(fam, n, shared)
    return {
        "what": "block 0: one shared float64 factor for add_k/add_v (UCE's per_block_uce) vs per-projection uce_closed_form",
        "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        # names are "transformer.<param>": the bench's denoiser root holds "<param>"
        "max_abs_edit": max(float((a[k] - fam.root.get_parameter(k.split(".", 1)[1]).detach()).abs().max()) for k in a),
        "per_projection_solve_seconds": round(per.seconds, 3),
        "shared_factor_seconds": round(shared.seconds, 3),
    }


def time_sd3(n: int, check: bool) -> dict:
    fam = BenchSD3()
    solve = _TimedSolve()
    t0, c0 = time.perf_counter(), time.process_time()
    out = _sd3_uce(fam, n, solve)
    row = {
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - c0, 3),
        "standin_seconds": round(fam.standin_seconds, 3),
        "solve_seconds": round(solve.seconds, 3),
        "n_tensors": len(out),
    }
    del out, fam
    if check:
        row["check"] = check_sd3_block(n)
    return row


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    """Write the rows so far (after every row: a long run keeps what it measured)."""
    if not args.out:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        Path(args.out),
        {
            "command": "python bench/family_edit_time.py "
            + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
            "settings": vars(args),
            "uce_config": "defaults (authors preset)",
            "rece_config": f"authors preset defaults but epochs={args.rece_epochs}",
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
            "rows": rows,
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,10,100", help="numbers of erased concepts")
    ap.add_argument("--families", default="sd3,sdxl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--rece-epochs", type=int, default=1, help="RECE epochs (each adds one UCE solve and one eq. 8 derivation)"
    )
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the (untimed) exactness checks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    for fam in args.families.split(","):
        methods = ("uce", "rece") if fam == "sdxl" else ("uce",)
        for m in methods:  # every UCE count first: a run cut short still has the whole UCE column
            for n in counts:
                load = os.getloadavg()[0]
                res = time_sdxl(m, n, args.rece_epochs, args.check) if fam == "sdxl" else time_sd3(n, args.check)
                load_after = os.getloadavg()[0]
                rows.append(
                    {
                        "family": fam,
                        "method": m,
                        "concepts": n,
                        **res,
                        "load_avg_1m": round(load, 2),
                        "load_avg_1m_after": round(load_after, 2),
                    }
                )
                save(args, rows)
                print(
                    f"{fam:5s} {m:5s} {n:4d} concepts: {res['seconds']:8.2f} s, cpu {res['cpu_seconds']:8.2f} s, "
                    f"stand-in {res['standin_seconds']:.2f} s ({res['n_tensors']} tensors; load {load:.2f} -> "
                    f"{load_after:.2f})",
                    flush=True,
                )
                if "solve_seconds" in res:
                    print(f"      per-block solves: {res['solve_seconds']:.2f} s", flush=True)
                if "check" in res:
                    print("      check:", {k: v for k, v in res["check"].items() if k != "projections"}, flush=True)
    print("\n| family | method | " + " | ".join(map(str, counts)) + " |\n|---|---|" + "---|" * len(counts))
    for fam in args.families.split(","):
        for m in ("uce", "rece"):
            cells = [
                next(
                    (
                        f"{r['seconds']:.2f} s"
                        for r in rows
                        if r["family"] == fam and r["method"] == m and r["concepts"] == n
                    ),
                    "-",
                )
                for n in counts
            ]
            if any(c != "-" for c in cells):
                print(f"| {fam} | {m} | " + " | ".join(cells) + " |")
    save(args, rows)


if __name__ == "__main__":
    main()
