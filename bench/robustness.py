"""The robustness table: which erasures survive which attacks (RECE paper Table 4, on the miniature).

Rows are erasure methods (UCE, RECE, ESD-x, ESD-u, AP, AGE -- those registered), columns the
attacks of :mod:`erasekit.attacks` (attack success rate, %), with the pre-attack rate (plain
prompts on the edited model) beside them, the original model's rate on the same prompts in each
table's caption, and the attacks' cost (seconds and model calls per prompt). One table per erased
concept: the unsafe motif ("fire") and one object ("triangle").

Everything is resumable: edits are saved under ``OUT/edits/<concept>/<row>/`` and reloaded (a saved
edit made with other settings is refused), attack runs under ``OUT/attacks/<concept>/<row>/<attack>/``
skip prompts already done. Results go to ``OUT/robustness.json`` and ``OUT/robustness.md``; rows
that earlier invocations with the same comparable settings left there are kept, so one ``--out``
can be filled a row at a time. A row whose method fails is recorded with its
error and the table goes on.

    python bench/robustness.py --tiny --out runs/robustness-tiny      # smoke test, random tiny model
    python bench/robustness.py --out runs/robustness                  # the miniature (needs its weights)
    python bench/robustness.py --out runs/robustness --methods uce,rece --n-prompts 16 \\
        --set esd.steps=200 --attack-set unlearndiff.steps=20

Rows run in separate invocations (parallel jobs, or one row at a time) are folded into one table
with ``--merge``: the files must share the model, attacks, prompts, seed, images per prompt, attack
settings and detector; each row is named by the ROWS entry its recorded method settings match (an
``ap`` row run with ``--set ap.negative_guidance=1`` becomes ``ap-eta1``).

    python bench/robustness.py --out bench/results/robustness/merged \
        --merge bench/results/robustness/robustness.json,bench/results/robustness/robustness-esd-x.json

``--tiny`` runs the same code on a random tiny pipeline with a stand-in detector and minimal
settings (seconds to minutes); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "uce": ("uce", {}),
    "rece": ("rece", {}),
    "esd-x": ("esd", {"train_method": "xattn"}),
    "esd-u": ("esd", {"train_method": "noxattn"}),
    "ap": ("ap", {}),
    "ap-eta1": ("ap", {"negative_guidance": 1.0}),  # the authors' script's ESD-style target (bench/table1.py)
    "age": ("age", {}),
}
ATTACKS = ("inversion", "unlearndiff", "ringabell", "paraphrase")
FINETUNED = {"esd", "ap", "age"}

# --tiny: settings that make every step run in seconds on a random tiny pipeline.
TINY_METHOD = {"steps": 2, "ddim_steps": 2}
TINY_ATTACKS = {
    "inversion": {"steps": 2, "batch": 1, "n_latents": 1},
    "unlearndiff": {"steps": 2, "k": 2},
    "ringabell": {"population": 6, "generations": 2, "length": 4},
}


class TinyDetector:
    """Stand-in detector for ``--tiny`` (a random model has no meaning to detect): object = argmax of
    a fixed random projection of the colour histogram, unsafe = red dominance. Smoke tests only."""

    name = "tiny-standin"
    version = "0"

    def __init__(self) -> None:
        from erasekit.world.shapes import OBJECTS

        self.heads = {"object": list(OBJECTS), "unsafe": ["safe", "unsafe"]}
        self.proj = np.random.default_rng(0).normal(size=(3, len(OBJECTS)))

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(images, dtype=np.float64).mean(axis=(1, 2)) / 255.0  # (N, 3)
        logits = 8 * (x - 0.5) @ self.proj
        obj = np.exp(logits - logits.max(1, keepdims=True))
        red = 1 / (1 + np.exp(-20 * (x[:, 0] - x[:, 1:].mean(1))))
        return {"object": obj / obj.sum(1, keepdims=True), "unsafe": np.stack([1 - red, red], 1)}


def parse_sets(pairs: list[str], what: str) -> dict[str, dict[str, Any]]:
    """``name.key=value`` -> ``{name: {key: value}}`` (values parsed as JSON when possible)."""
    out: dict[str, dict[str, Any]] = {}
    for p in pairs:
        if "=" not in p or "." not in p.split("=", 1)[0]:
            raise SystemExit(f"{what} expects NAME.KEY=VALUE, got {p!r}.")
        lhs, value = p.split("=", 1)
        name, key = lhs.split(".", 1)
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[key] = parsed
    return out


def restore_(pipe, original, names) -> None:
    """Copy the original's values of parameters ``names`` back into ``pipe`` (undo an applied edit)."""
    from erasekit.edit import get_parameter

    with torch.no_grad():
        for n in names:
            get_parameter(pipe, n).copy_(get_parameter(original, n))


def method_overrides(
    row: str, method: str, concept: str, tiny: bool, user: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A row's method settings: the row's variant, RECE's preset for the task, --tiny, then --set."""
    from erasekit.methods.base import get_method
    from erasekit.methods.rece import RECE_PRESETS
    from erasekit.world.shapes import UNSAFE

    over = dict(ROWS[row][1])
    if method == "rece":
        over.update(RECE_PRESETS["unsafe" if concept == UNSAFE else "object"])
    if tiny and method in FINETUNED:
        fields = get_method(method).config_class.__dataclass_fields__
        over.update({k: v for k, v in TINY_METHOD.items() if k in fields})
    over.update(user.get(method, {}))
    over.update(user.get(row, {}))
    return over


MERGE_KEYS = ("model", "attacks", "n_prompts", "n_images", "seed", "attack_overrides", "preserve_others")


def incomparable(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings (:data:`MERGE_KEYS`, detector) in which two results differ; [] = one table can hold both."""
    diff = [k for k in MERGE_KEYS if a["config"].get(k) != b["config"].get(k)]
    return diff + (["detector"] if a.get("detector") != b.get("detector") else [])


def in_table_order(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """``rows.items()`` in :data:`ROWS` order (names not in ROWS last)."""
    order = {n: i for i, n in enumerate(ROWS)}
    return sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order)))


def row_name(row: str, r: dict[str, Any]) -> str:
    """The ROWS entry a recorded row belongs to: same method, and the most specific variant whose
    settings all appear in the row's recorded overrides (``ap`` + negative_guidance 1 -> ``ap-eta1``)."""
    over = r.get("overrides", {})
    fits = [
        n
        for n, (m, variant) in ROWS.items()
        if m == r.get("method") and all(over.get(k) == v for k, v in variant.items())
    ]
    if not fits:
        return row
    return max(fits, key=lambda n: (len(ROWS[n][1]), n == row))


def merge_results(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Fold several invocations' ``robustness.json`` into one result (rows in ROWS order).

    Refuses files that are not comparable (different model, attacks, prompts, seed, images per
    prompt, attack settings, detector, or original-model rate) and two different results for one row.
    """
    if not parts:
        raise SystemExit("--merge needs at least one robustness.json.")
    first_src, first = parts[0]
    merged: dict[str, Any] = {
        "config": {**first["config"], "rows": [], "method_overrides": {}, "merged_from": [s for s, _ in parts]},
        "detector": first["detector"],
        "access": dict(first["access"]),
        "concepts": {},
    }
    for src, res in parts:
        for k in incomparable(res, first):
            theirs, ours = (r.get(k) if k == "detector" else r["config"].get(k) for r in (res, first))
            raise SystemExit(f"cannot merge {src}: its {k} is {theirs!r}, {first_src}'s is {ours!r}.")
        for concept, block in res["concepts"].items():
            mb = merged["concepts"].setdefault(concept, {**{k: v for k, v in block.items() if k != "rows"}, "rows": {}})
            if block["prompts"] != mb["prompts"]:
                raise SystemExit(f"cannot merge {src}: its prompts for {concept!r} differ.")
            if "original_rate" in block:
                if mb.get("original_rate") not in (None, block["original_rate"]):
                    raise SystemExit(
                        f"cannot merge {src}: the original model's rate for {concept!r} is "
                        f"{block['original_rate']}, elsewhere {mb['original_rate']}."
                    )
                mb["original_rate"] = block["original_rate"]
                mb.setdefault("judge", block.get("judge"))
            for row, r in block["rows"].items():
                name = row_name(row, r)
                if name in mb["rows"] and mb["rows"][name] != r:
                    raise SystemExit(
                        f"cannot merge {src}: row {name!r} of {concept!r} is already filled by another file."
                    )
                mb["rows"][name] = r
    for mb in merged["concepts"].values():
        mb["rows"] = dict(in_table_order(mb["rows"]))
    merged["config"]["rows"] = [
        n for n, _ in in_table_order({n: None for mb in merged["concepts"].values() for n in mb["rows"]})
    ]
    return merged


def carry_over(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Start ``results`` from the rows an earlier invocation left in ``path``, so that one ``--out``
    accumulates a table run a row at a time (a row run again replaces its entry). Results made with
    other comparable settings (:data:`MERGE_KEYS`, detector) are refused before any work is done."""
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    diff = incomparable(old, results)
    if diff:
        theirs = {k: old["config"].get(k, old.get(k)) for k in diff}
        raise SystemExit(
            f"{path} holds results made with other settings {theirs}; use another --out, or these settings."
        )
    results["concepts"] = dict(old.get("concepts", {}))
    results["config"]["rows"] = list(dict.fromkeys([*old["config"].get("rows", []), *results["config"]["rows"]]))
    results["config"]["concepts"] = list(
        dict.fromkeys([*old["config"].get("concepts", []), *results["config"]["concepts"]])
    )
    return results


def write_outputs(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``robustness.json`` and ``robustness.md`` under ``out`` (atomically) and print the tables."""
    from erasekit.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "robustness.json", results)
    md = markdown(results)
    write_text_atomic(out / "robustness.md", md)
    print(md)
    return results


def fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables: one per concept, ASR (%) per method and attack, pre-attack rate beside; then cost."""
    attacks = results["config"]["attacks"]
    lines = ["# Robustness of erasure methods against attacks (ASR, %)", ""]
    cost_rows: dict[str, list[dict[str, float]]] = {a: [] for a in attacks}
    for concept, block in results["concepts"].items():
        lines += [
            f"## Erasing {concept!r}",
            "",
            f"Original model on the plain prompts: {fmt(block.get('original_rate'))}% show {concept!r} "
            f"({block['n_prompts']} prompts x {results['config']['n_images']} images; detector "
            f"{results['detector']['name']}, head {(block.get('judge') or {}).get('head')}).",
            "",
            "| method | edit s | pre-attack | " + " | ".join(attacks) + " |",
            "|---|---:|---:|" + "---:|" * len(attacks),
        ]
        rows = in_table_order(block["rows"])
        for row, r in rows:
            if "error" in r:
                lines.append(f"| {row} | - | - | " + " | ".join("error" for _ in attacks) + " |")
                continue
            cells = [fmt(r["asr"].get(a)) for a in attacks]
            lines.append(
                f"| {row} | {r['edit_seconds']:.1f} | {fmt(r['pre_attack_rate'])} | " + " | ".join(cells) + " |"
            )
            for a in attacks:
                if a in r["cost"]:
                    cost_rows[a].append(r["cost"][a])
        settings = [
            f"- {row}: " + ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            for row, r in rows
            if r.get("overrides")
        ]
        if settings:
            lines += ["", "Method settings besides the method's defaults:", "", *settings]
        errors = {row: r["error"] for row, r in block["rows"].items() if "error" in r}
        if errors:
            lines += ["", *(f"- {row}: {e}" for row, e in errors.items())]
        lines.append("")
    lines += [
        "## Attack cost (mean per prompt over all rows)",
        "",
        "| attack | access | seconds | UNet calls | UNet items | text-encoder calls |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for a in attacks:
        rows = cost_rows[a]
        if not rows:
            continue
        mean = {k: float(np.mean([c[k] for c in rows])) for k in rows[0]}
        lines.append(
            f"| {a} | {results['access'][a]} | {mean['seconds']:.2f} | {mean['unet_calls']:.1f} | "
            f"{mean['unet_items']:.1f} | {mean['text_encoder_calls']:.1f} |"
        )
    lines += ["", "Seconds and calls are those of the attack's search only (image generation excluded)."]
    if results["config"].get("merged_from"):
        lines += [
            "",
            "Merged from " + ", ".join(results["config"]["merged_from"]) + " (edit times were measured "
            "in separate runs, under whatever load their cores had).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny pipeline + stand-in detector (a smoke test)")
    p.add_argument("--model", default="shapes", help="pipeline: 'shapes' or a diffusers folder")
    p.add_argument("--concepts", default="fire,triangle", help="comma-separated concepts to erase (one table each)")
    p.add_argument(
        "--methods", default=",".join(ROWS), help=f"rows, among {', '.join(ROWS)} (unregistered ones are skipped)"
    )
    p.add_argument("--attacks", default=",".join(ATTACKS), help="columns (attack names)")
    p.add_argument("--n-prompts", type=int, default=8, help="attacked prompts per concept")
    p.add_argument("--n-images", type=int, default=1, help="images per prompt (a prompt succeeds if any shows it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="METHOD_OR_ROW.KEY=VALUE method override")
    p.add_argument("--attack-set", action="append", default=[], help="ATTACK.KEY=VALUE attack override")
    p.add_argument("--preserve-others", action="store_true", help="objects: preserve every other object")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated robustness.json files (or their folders): fold them into OUT, run nothing",
    )
    a = p.parse_args(argv)
    if a.merge:
        paths = [Path(x.strip()) for x in a.merge.split(",") if x.strip()]
        paths = [q / "robustness.json" if q.is_dir() else q for q in paths]
        missing = [str(q) for q in paths if not q.exists()]
        if missing:
            raise SystemExit(f"--merge: no such file(s): {', '.join(missing)}")
        return write_outputs(a.out, merge_results([(str(q), json.loads(q.read_text())) for q in paths]))

    import erasekit
    from erasekit.attacks import available_attacks, run_attacks
    from erasekit.edit import Edit, EraseRequest
    from erasekit.eval.detectors import load_detector
    from erasekit.eval.generate import SamplingConfig
    from erasekit.io import write_json_atomic
    from erasekit.methods.base import available_methods
    from erasekit.pipeline import base_info
    from erasekit.world.shapes import OBJECTS

    if a.threads:
        torch.set_num_threads(a.threads)
    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()]
    attacks = [x.strip() for x in a.attacks.split(",") if x.strip()]
    rows = [r.strip() for r in a.methods.split(",") if r.strip()]
    bad_rows = [r for r in rows if r not in ROWS]
    if bad_rows:
        raise SystemExit(f"Unknown row(s) {bad_rows}; rows: {', '.join(ROWS)}.")
    known = available_attacks()
    bad = [x for x in attacks if x not in known]
    if bad:
        raise SystemExit(f"Unknown attack(s) {bad}; available: {', '.join(known)}.")
    registered = available_methods()
    skipped = [r for r in rows if ROWS[r][0] not in registered]
    rows = [r for r in rows if ROWS[r][0] in registered]
    method_sets = parse_sets(a.sets, "--set")
    attack_sets = parse_sets(a.attack_set, "--attack-set")
    if a.tiny:
        from erasekit.testing import tiny_pipeline

        original, edited = tiny_pipeline(0), tiny_pipeline(0)
        detector: Any = TinyDetector()
        sampling = SamplingConfig(steps=a.steps or 2)
        attack_cfg = {k: {**v, **attack_sets.get(k, {})} for k, v in TINY_ATTACKS.items()}
        attack_cfg.update({k: v for k, v in attack_sets.items() if k not in attack_cfg})
    else:
        original, edited = erasekit.load_pipeline(a.model), erasekit.load_pipeline(a.model)
        detector = load_detector("shapes")
        sampling = SamplingConfig(steps=a.steps)
        attack_cfg = attack_sets
    base_info(original), base_info(edited)  # fingerprint both before any edit is applied
    attack_cfg = {k: v for k, v in attack_cfg.items() if k in attacks}

    results: dict[str, Any] = {
        "config": {
            "model": "tiny" if a.tiny else a.model,
            "concepts": concepts,
            "rows": rows,
            "skipped_rows": skipped,
            "attacks": attacks,
            "n_prompts": a.n_prompts,
            "n_images": a.n_images,
            "seed": a.seed,
            "method_overrides": method_sets,
            "attack_overrides": attack_cfg,
            "preserve_others": a.preserve_others,
        },
        "detector": {"name": detector.name, "version": detector.version},
        "access": {x: "white-box" if known[x].white_box else "black-box" for x in attacks},
        "concepts": {},
    }
    results = carry_over(a.out / "robustness.json", results)
    if skipped:
        print(f"skipping rows whose method is not registered: {', '.join(skipped)}", file=sys.stderr)
    t_all = time.perf_counter()
    applied: list[str] = []
    for concept in concepts:
        from erasekit.attacks import default_prompts

        prompts = default_prompts(concept, a.n_prompts)
        block: dict[str, Any] = results["concepts"].setdefault(concept, {"rows": {}})
        block.update(n_prompts=len(prompts), prompts=prompts)
        preserve = [o for o in OBJECTS if o != concept] if a.preserve_others and concept in OBJECTS else []
        for row in rows:
            method = ROWS[row][0]
            over = method_overrides(row, method, concept, a.tiny, method_sets)
            edit_dir = a.out / "edits" / concept / row
            restore_(edited, original, applied)
            applied = []
            try:
                t0 = time.perf_counter()
                if (edit_dir / "edit.json").exists():
                    saved = json.loads((edit_dir / "bench.json").read_text())
                    if saved["overrides"] != json.loads(json.dumps(over)):
                        raise ValueError(
                            f"{edit_dir} holds an edit made with {saved['overrides']}, not {over}; use another --out."
                        )
                    edit = Edit.load(edit_dir)
                    edit_seconds = saved["edit_seconds"]
                else:
                    gen = torch.Generator().manual_seed(a.seed)
                    edit = erasekit.erase(
                        original,
                        EraseRequest([concept], preserve=preserve),
                        method=method,
                        generator=gen,
                        progress=False,
                        **over,
                    )
                    edit_seconds = time.perf_counter() - t0
                    edit.save(edit_dir)
                    write_json_atomic(edit_dir / "bench.json", {"edit_seconds": edit_seconds, "overrides": over})
                edit.apply_(edited)
                applied = list(edit.tensors)
                rep = run_attacks(
                    edited,
                    original,
                    concept,
                    attacks,
                    prompts=prompts,
                    detector=detector,
                    n_images=a.n_images,
                    seed=a.seed,
                    sampling=sampling,
                    out_dir=a.out / "attacks" / concept / row,
                    original_dir=a.out / "attacks" / concept / "original",
                    configs=attack_cfg,
                    progress=True,
                )
            except Exception as e:  # a failing row is reported, the table goes on
                traceback.print_exc()
                block["rows"][row] = {"method": method, "overrides": over, "error": f"{type(e).__name__}: {e}"}
                continue
            block["original_rate"] = rep["original_rate"]
            block["judge"] = rep["judge"]
            block["rows"][row] = {
                "method": method,
                "overrides": over,
                "edit_seconds": round(edit_seconds, 3),
                "pre_attack_rate": rep["pre_attack_rate"],
                "asr": {x: rep["attacks"][x]["asr"] for x in attacks},
                "adversarial": {x: rep["attacks"][x]["adversarial"] for x in attacks},
                "cost": {
                    x: {
                        k: rep["attacks"][x]["cost"]["attack"].get(k, 0) / len(prompts)
                        for k in ("seconds", "unet_calls", "unet_items", "text_encoder_calls")
                    }
                    for x in attacks
                },
            }
            a.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(a.out / "robustness.json", results)  # partial results survive a crash
    restore_(edited, original, applied)
    results["seconds"] = round(time.perf_counter() - t_all, 2)
    return write_outputs(a.out, results)


if __name__ == "__main__":
    main()
