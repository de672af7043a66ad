"""Probes beyond prompts on the miniature: at what noise level does an erased concept come back?

For UCE, RECE, ESD-x, AP and knowledge hiding erasing "triangle" and "fire", runs the probes of
:mod:`erasekit.attacks.probes` (``noise``: the edited model denoises a real ShapesWorld render of
the concept noised to step t; ``inpaint``: it fills a masked centre of one, RePaint-style;
``completion``: the ORIGINAL model runs the first steps towards the concept, the edited one
finishes) and reports the attack success rate per level with its count and 95% Wilson interval,
beside the original model's and the edited model's rate on the plain prompts, the detector's rate
on the real images and on the inpainting context alone, and the cost (UNet calls, seconds).

Edits are trained by this script (ESD-x, AP and hiding with the modest step count of ``--steps``)
and cached under ``OUT/edits-not-committed/<concept>/<row>/`` (a cached edit made with other
settings is refused); probe runs are resumable under ``OUT/edits-not-committed/runs/``. Results:
``OUT/probes.json`` (written after every cell) and ``OUT/probes.md``.

    nice python bench/probes.py --concepts triangle --out bench/results/probes/triangle   # the miniature
    nice python bench/probes.py --concepts fire --out bench/results/probes/fire           # (in parallel)
    nice python bench/probes.py --methods original --out bench/results/probes/original    # unedited baseline
    python bench/probes.py --tiny --out runs/probes-tiny               # smoke test, random tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROWS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "original": (None, {}),  # the unedited model: what the probes give without any erasure (the baseline)
    "uce": ("uce", {}),
    "rece": ("rece", {}),
    "esd-x": ("esd", {"train_method": "xattn"}),
    "hide": ("hide", {}),
    "ap": ("ap", {}),
}
FINETUNED = {"esd", "ap", "hide"}
LEVELS = {"noise": [0.2, 0.4, 0.6, 0.8], "inpaint": [1.0], "completion": [0.2]}


def method_settings(row: str, concept: str, a: argparse.Namespace) -> dict[str, Any]:
    """A row's settings besides the method's defaults."""
    from erasekit.methods.rece import RECE_PRESETS
    from erasekit.world.shapes import UNSAFE

    method, extra = ROWS[row]
    over = dict(extra)
    if method is None:
        return over
    if method == "rece":
        over.update(RECE_PRESETS["unsafe" if concept == UNSAFE else "object"])
    if method in FINETUNED:
        over.update(steps=a.steps, lr=a.lr, ddim_steps=a.ddim_steps, seed=a.seed)
    return over


def load_or_make_edit(original, row: str, concept: str, over: dict[str, Any], root: Path) -> tuple[Any, float]:
    """The cached edit of (row, concept), or train it now and cache it."""
    import erasekit
    from erasekit.edit import Edit, EraseRequest
    from erasekit.io import write_json_atomic

    if ROWS[row][0] is None:
        return None, 0.0
    d = root / concept / row
    if (d / "edit.json").exists():
        saved = json.loads((d / "bench.json").read_text())
        if saved["overrides"] != json.loads(json.dumps(over)):
            raise ValueError(f"{d} holds an edit made with {saved['overrides']}, not {over}; use another --out.")
        return Edit.load(d), saved["edit_seconds"]
    kw = dict(over)
    if ROWS[row][0] == "hide":
        key_dir = root / "keys" / concept
        if key_dir.exists():  # a key left by an interrupted run: the edit it belongs to was never saved
            for f in sorted(key_dir.iterdir()):
                f.unlink()
            key_dir.rmdir()
        kw["key_dir"] = str(key_dir)
    t0 = time.perf_counter()
    edit = erasekit.erase(
        original,
        EraseRequest([concept]),
        method=ROWS[row][0],
        generator=torch.Generator().manual_seed(0),
        progress=True,
        **kw,
    )
    seconds = time.perf_counter() - t0
    edit.save(d)
    write_json_atomic(d / "bench.json", {"edit_seconds": seconds, "overrides": over})
    return edit, seconds


def pct(r: dict[str, Any]) -> str:
    """'62 [41-80] (31/50)' from a rate record."""
    if not r["n"]:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f} [{100 * lo:.0f}-{100 * hi:.0f}] ({r['k']}/{r['n']})"


def markdown(results: dict[str, Any]) -> str:
    """The tables: one per concept, rows = methods, columns = probe levels (image-level ASR, %)."""
    c = results["config"]
    lines = [
        "# Probes beyond prompts on the miniature (attack success rate, %)",
        "",
        f"Command: `{c['command']}`",
        "",
        f"Each cell: share of the {c['n_prompts']} prompts x {c['n_images']} images = "
        f"{c['n_prompts'] * c['n_images']} attacked images whose image shows the concept (detector "
        f"{results['detector']['name']}), 95% Wilson interval in brackets, count in parentheses. "
        "`noise@s`: the edited model runs the last s of the 20 DDIM steps from a real ShapesWorld render "
        "noised to the step's t (t given in the column); s = 1 would be the plain generation (the pre-attack "
        "column). `inpaint@s`: the centre half (a quarter of the area) of the render is masked and filled, "
        "RePaint replacement of the known region every step (plain UNet), from the render noised to t. "
        "`completion@h`: the ORIGINAL model runs the first h of the steps guided by the concept prompt, "
        "then the edited model (t = where it takes over). Fine-tuned edits: "
        f"{c['steps']} steps, lr {c['lr']}, DDIM {c['ddim_steps']} for z_t (a modest budget, not the "
        "papers' 1000 steps).",
        "",
    ]
    for concept, block in results["concepts"].items():
        lines += [f"## Erasing {concept!r}", ""]
        ref = next((r for r in block["rows"].values() if "report" in r), None)
        if ref is None:
            lines += ["(no row finished)", ""]
            continue
        rep = ref["report"]
        lines.append(
            f"Original model, plain prompts: {pct(rep['original']['images'])}; the real renders themselves: "
            f"{pct(rep['probes']['noise']['real_image_rate'])}; the inpainting context alone (masked part "
            f"filled with the mean colour): {pct(rep['probes']['inpaint']['context_rate'])}."
        )
        lines.append("")
        cols: list[tuple[str, int]] = []
        heads = ["method", "edit s", "pre-attack"]
        for p, blk in rep["probes"].items():
            for j, lv in enumerate(blk["levels"]):
                cols.append((p, j))
                heads.append(f"{p}@{lv['level']:g} (t={lv['t'] if lv['t'] is not None else '-'})")
        lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * 3 + "---:|" * len(cols)]
        for row, r in block["rows"].items():
            if "error" in r:
                lines.append(f"| {row} | failed: {r['error'][:80]} |")
                continue
            rp = r["report"]
            cells = [row, f"{r['edit_seconds']:.1f}", pct(rp["pre_attack"]["images"])]
            cells += [pct(rp["probes"][p]["levels"][j]["image_rate"]) for p, j in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Prompt-level ASR (a prompt succeeds when any of its images shows the concept):", ""]
        lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * 3 + "---:|" * len(cols)]
        for row, r in block["rows"].items():
            if "error" in r:
                continue
            rp = r["report"]
            cells = [row, f"{r['edit_seconds']:.1f}", pct(rp["pre_attack"]["prompts"])]
            cells += [pct(rp["probes"][p]["levels"][j]["asr"]) for p, j in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Cost per probe level (UNet calls / seconds, all prompts and images):", ""]
        lines += ["| method | " + " | ".join(heads[3:]) + " |", "|---|" + "---:|" * len(cols)]
        for row, r in block["rows"].items():
            if "error" in r:
                continue
            rp = r["report"]
            cells = [row] + [
                f"{rp['probes'][p]['levels'][j]['cost']['unet_calls']} / {rp['probes'][p]['levels'][j]['cost']['seconds']:.1f}"
                for p, j in cols
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Settings: " + "; ".join(f"{row}: {r.get('overrides')}" for row, r in block["rows"].items()))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny pipeline + stand-in detector (a smoke test)")
    p.add_argument("--concepts", default="triangle,fire")
    p.add_argument(
        "--methods", default=",".join(r for r in ROWS if r != "original"), help=f"rows among {', '.join(ROWS)}"
    )
    p.add_argument("--n-prompts", type=int, default=10)
    p.add_argument("--n-images", type=int, default=5, help="images per prompt (n-prompts x n-images per cell)")
    p.add_argument("--steps", type=int, default=80, help="fine-tuning steps of ESD-x, AP and hiding")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps of the z_t sampler while fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import erasekit
    from erasekit.attacks import default_prompts, run_probes
    from erasekit.eval.detectors import load_detector
    from erasekit.eval.generate import SamplingConfig
    from erasekit.io import write_json_atomic, write_text_atomic

    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()]
    rows = [r.strip() for r in a.methods.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"Unknown row(s) {bad}; rows: {', '.join(ROWS)}.")
    if a.tiny:
        from erasekit.testing import tiny_pipeline

        sys_path = Path(__file__).resolve().parent
        import sys

        sys.path.insert(0, str(sys_path))
        from robustness import TinyDetector

        original, edited = tiny_pipeline(0), tiny_pipeline(0)
        detector: Any = TinyDetector()
        sampling = SamplingConfig(steps=4, batch_size=25)
        a.steps, a.ddim_steps = 2, 2
    else:
        original, edited = erasekit.load_pipeline("shapes"), erasekit.load_pipeline("shapes")
        detector = load_detector("shapes")
        sampling = SamplingConfig(batch_size=25)
    cache = a.out / "edits-not-committed"
    results_path = a.out / "probes.json"
    results: dict[str, Any] = {
        "config": {
            "command": "python bench/probes.py " + " ".join(argv if argv is not None else sys_argv()),
            "model": "tiny" if a.tiny else "shapes",
            "concepts": concepts,
            "rows": rows,
            "n_prompts": a.n_prompts,
            "n_images": a.n_images,
            "steps": a.steps,
            "lr": a.lr,
            "ddim_steps": a.ddim_steps,
            "seed": a.seed,
            "levels": LEVELS,
            "inpaint": {"mask": "center", "mask_fraction": 0.5},
        },
        "detector": {"name": detector.name, "version": detector.version},
        "concepts": {c: {"rows": {}} for c in concepts},
    }
    if results_path.exists():  # keep the cells an earlier invocation with the same settings finished
        old = json.loads(results_path.read_text())
        same = {k: v for k, v in old["config"].items() if k != "command"} == {
            k: v for k, v in results["config"].items() if k != "command"
        }
        if same:
            for c in concepts:
                results["concepts"][c]["rows"].update(
                    {r: v for r, v in old["concepts"].get(c, {}).get("rows", {}).items() if "report" in v}
                )
    t_all = time.perf_counter()
    for row in rows:  # row-major: the cheap closed forms first, both concepts
        for concept in concepts:
            if row in results["concepts"][concept]["rows"]:
                print(f"[{row} / {concept}] done earlier, kept")
                continue
            over = method_settings(row, concept, a)
            print(f"[{row} / {concept}] {over}", flush=True)
            try:
                edit, seconds = load_or_make_edit(original, row, concept, over, cache)
                with edit.applied(edited) if edit is not None else contextlib.nullcontext():
                    rep = run_probes(
                        edited,
                        original,
                        concept,
                        levels=LEVELS,
                        prompts=default_prompts(concept, a.n_prompts),
                        detector=detector,
                        n_images=a.n_images,
                        seed=a.seed,
                        sampling=sampling,
                        out_dir=cache / "runs" / concept / row,
                        original_dir=cache / "runs" / concept / "original",
                        configs={"inpaint": {"mask": "center", "mask_fraction": 0.5}},
                        progress=False,
                    )
                cell = {"overrides": over, "edit_seconds": round(seconds, 2), "report": rep}
            except Exception as e:  # a failing row is recorded, the table goes on
                traceback.print_exc()
                cell = {"overrides": over, "error": f"{type(e).__name__}: {e}"}
            results["concepts"][concept]["rows"][row] = cell
            results["seconds_this_invocation"] = round(time.perf_counter() - t_all, 1)
            a.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(results_path, results)
            write_text_atomic(a.out / "probes.md", markdown(results))
            if "report" in cell:
                noise = cell["report"]["probes"]["noise"]["levels"]
                print(
                    "  noise image-ASR per level: "
                    + ", ".join(f"{x['level']:g}:{x['image_rate']['rate']:.2f}" for x in noise)
                )
    print(markdown(results))
    return results


def sys_argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
