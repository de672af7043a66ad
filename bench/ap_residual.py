"""How much of each erased concept's guidance direction does an edit leave? (issue 15, AP `paper`)

For an edit of the miniature and each erased concept ``c``, on latents ``z_t`` the frozen model samples
with ``c`` (as fine-tuning does: DDIM from fresh noise, CFG 3, ``--ddim-steps`` steps, every step index
once per seed), with ``d = eps(z, c) - eps(z, "")`` of the original model and
``d' = eps'(z, c) - eps'(z, "")`` of the edited one:

- ``alpha = <d', d> / <d, d>``: the part of the concept direction the edit keeps (1 = untouched,
  0 = the concept looks like the empty prompt, < 0 = pushed away: ESD's negative guidance);
- ``w * alpha`` with the miniature's sampling guidance ``w`` = 5: the guidance towards the concept
  that classifier-free guidance still applies when the edited model samples "a <c>".

Also ``l1 = mean (eps'(z, c) - eps(z, ""))^2`` (AP eq. 5's L1 with eta 0), against ``mean d^2`` (its
value before training). Edits are read from study cells (``CELL/edit``); a cell without one is skipped.

    python bench/ap_residual.py bench/results/table1_study/cells/{ap-paper,ap-authors,esd-x}__split0__seed{1,2} \
        --json bench/results/ap_paper_ablation/residual.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from erasekit.edit import Edit, edit_folder
from erasekit.finetune import FinetuneContext
from erasekit.io import write_json_atomic
from erasekit.pipeline import load_pipeline

SAMPLING_GUIDANCE = 5.0  # the miniature's sampler (erasekit.world.recipe.Recipe.guidance_scale)


@torch.no_grad()
def directions(ctx: FinetuneContext, concept: str, seeds: int, ddim_steps: int) -> tuple[torch.Tensor, ...]:
    """``(z, t, cond, uncond)`` for every step index x seed: the latents the frozen model samples with ``concept``."""
    cond1, unc1 = ctx.embed([concept]), ctx.embed([""])
    zs, ts = [], []
    for s in range(seeds):
        for n in range(ddim_steps):
            z, t = ctx.sample_zt(cond1, n, torch.Generator().manual_seed(1000 * s + n), guidance=3.0)
            zs.append(z)
            ts.append(t)
    z, t = torch.cat(zs), torch.cat(ts)
    return z, t, cond1.expand(len(z), -1, -1), unc1.expand(len(z), -1, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", type=Path, help="study cell folders holding edit/")
    ap.add_argument("--seeds", type=int, default=4, help="sampler seeds per step index (default 4)")
    ap.add_argument("--ddim-steps", type=int, default=20, help="the z_t sampler's steps (default 20, the study's)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline("shapes")
    ctx = FinetuneContext(pipe, "xattn", ddim_steps=args.ddim_steps)
    cache: dict[str, tuple[torch.Tensor, ...]] = {}
    out = []
    for cell in args.cells:
        if edit_folder(cell / "edit") is None:
            print(f"{cell.name}: no edit/ here, skipped")
            continue
        edit = Edit.load(cell / "edit")
        for c in edit.request.erase:
            if c not in cache:
                z, t, cond, unc = directions(ctx, c, args.seeds, args.ddim_steps)
                with torch.no_grad():
                    e_c, e_u = ctx.eps_frozen(z, t, cond), ctx.eps_frozen(z, t, unc)
                cache[c] = (z, t, cond, unc, e_c, e_u)
            z, t, cond, unc, e_c, e_u = cache[c]
            with edit.applied(pipe), torch.no_grad():
                f_c, f_u = ctx.eps_frozen(z, t, cond), ctx.eps_frozen(z, t, unc)
            d, d2 = (e_c - e_u).flatten(1), (f_c - f_u).flatten(1)
            alpha = float((d2 * d).sum() / (d * d).sum())
            row = {
                "cell": cell.name,
                "concept": c,
                "alpha": round(alpha, 4),
                "cfg_towards_concept": round(SAMPLING_GUIDANCE * alpha, 3),
                "l1_eta0": float(((f_c - e_u) ** 2).mean()),
                "l1_eta0_before": float((d**2).mean()),
                "uncond_change": float(((f_u - e_u) ** 2).mean()),
            }
            out.append(row)
            print(
                f"{cell.name:32s} {c:10s} alpha {alpha:+.3f}  w*alpha {SAMPLING_GUIDANCE * alpha:+.2f}  "
                f"L1(eta 0) {row['l1_eta0']:.2e} (before {row['l1_eta0_before']:.2e})"
            )
    if args.json:
        write_json_atomic(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": out})


if __name__ == "__main__":
    main()
