"""A study's outputs: one tidy table (one row per cell x metric, with the cell's settings) as CSV and
JSON, and markdown tables in the papers' layout (AP paper Table 1: ESR/PSR per method, mean and 95%
interval over splits, then seeds; RECE paper Table 4: ASR per method and attack).

Timings are kept out of the tidy table (a study run twice gives byte-identical tables); they go to
``timing.md``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.rundir import RunDir
from erasekit.study.grid import RESULT_JSON, cell_dir, cell_status, cells
from erasekit.study.spec import StudySpec
from erasekit.study.stats import mean_interval

COLUMNS = (
    "study",
    "cell",
    "method",
    "method_name",
    "preset",
    "concept",
    "erase",
    "seed",
    "rule",
    "op_step",
    "op_value",
    "reached",
    "selection_metric",
    "selection_value",
    "metric",
    "rate",
    "successes",
    "n",
    "ci_lo",
    "ci_hi",
)
OBJECT_METRICS = ("esr_1", "esr_3", "psr_1", "psr_3", "rsr_1", "rsr_3")
LABEL = {"esr_1": "ESR-1", "esr_3": "ESR-3", "psr_1": "PSR-1", "psr_3": "PSR-3", "rsr_1": "RSR-1", "rsr_3": "RSR-3"}


def results(spec: StudySpec, study_dir: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every done cell, in the grid's order."""
    out = []
    for c in cells(spec):
        if cell_status(study_dir, c, spec)["state"] == "done":  # not a stale cell of another spec
            out.append(RunDir.open(cell_dir(study_dir, c)).read_json(RESULT_JSON))
    return out


def _r(x: Any) -> Any:
    return round(float(x), 6) if isinstance(x, float) and math.isfinite(x) else x


def tidy(spec: StudySpec, study_dir: Path) -> list[dict[str, Any]]:
    """One row per cell x metric (see :data:`COLUMNS`)."""
    rows = []
    for r in results(spec, study_dir):
        op = r["operating_point"]
        sel_metric = op.get("metric")
        base = {
            "study": spec.name,
            "cell": r["cell"],
            "method": r["method"],
            "method_name": r["method_name"],
            "preset": r.get("preset"),
            "concept": r["concept"],
            "erase": "+".join(r["erase"]),
            "seed": r["seed"],
            "rule": op.get("rule"),
            "op_step": op.get("step"),
            "op_value": op.get("value"),
            "reached": op.get("reached"),
            "selection_metric": sel_metric,
            "selection_value": _r((op.get("selection") or {}).get(sel_metric)) if sel_metric else None,
        }
        metrics: list[tuple[str, dict[str, Any]]] = list((r.get("test") or {}).items())
        for name, a in (r.get("attacks") or {}).items():
            if isinstance(a, dict):
                metrics.append(("pre_attack" if name == "pre_attack" else f"asr:{name}", a))
            elif name == "original_rate":
                metrics.append(("original_rate", {"rate": a}))
        for name, m in metrics:
            ci = m.get("ci95") or [None, None]
            rows.append(
                {
                    **base,
                    "metric": name,
                    "rate": _r(m.get("rate")),
                    "successes": m.get("successes"),
                    "n": m.get("n"),
                    "ci_lo": _r(ci[0]),
                    "ci_hi": _r(ci[1]),
                }
            )
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return buf.getvalue()


def _pct(s: dict[str, Any]) -> str:
    if not s["cells"] or not math.isfinite(s["mean"]):
        return "n/a"
    lo, hi = s["ci95"]
    return f"{100 * s['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def group_rows(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    """``rows`` grouped by the values of ``keys`` (a tuple per group), each group in the rows' order."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def markdown(spec: StudySpec, study_dir: Path) -> str:
    """The study's markdown tables (objects table, then attack tables, when the spec has them)."""
    rows = tidy(spec, study_dir)
    res = results(spec, study_dir)
    total = len(cells(spec))
    op = spec.operating_point
    lines = [f"# Study {spec.name!r}", ""]
    if op.rule == "target":
        lines.append(
            f"Operating point: train (fine-tuned, checked every {op.check_every} steps, cap {op.max_steps}) or sweep "
            f"(closed forms) until selection {LABEL.get(op.metric, op.metric)} >= {100 * op.target:.0f}%; then test."
        )
    else:
        lines.append(f"Operating point: fixed ({op.steps or 'the preset'} steps for fine-tuned methods).")
    lines += [f"Cells done: {len(res)} / {total}.", ""]
    methods = [m.label for m in spec.methods]
    if spec.evaluation is not None:
        ev = spec.evaluation
        present = [m for m in OBJECT_METRICS if any(r["metric"] == m for r in rows)]
        lines += [
            f"## {ev.protocol}: test images {ev.n_per_class} per object (seeds {ev.test_seed}..), "
            f"selection {ev.selection_n_per_class} per object (seeds {ev.selection_seed}..)",
            "",
            "Mean over concept sets (each set's value the mean over its training seeds) in %, with a 95% interval: "
            "Wilson for one cell, a bootstrap over cells for one set, a two-level bootstrap (sets, then seeds "
            "within a set) otherwise.",
            "",
            "| Method | " + " | ".join(LABEL[m] for m in present) + " | reached | operating point | cells |",
            "|---|" + "---|" * len(present) + "---|---|---|",
        ]
        grouped = group_rows([r for r in rows if r["metric"] in present], "method", "metric")
        for m in methods:
            mres = [r for r in res if r["method"] == m]
            if not mres:
                continue
            cells_ = _rates(grouped, m, present, by="concept")
            ops = [r["operating_point"] for r in mres]
            reached = [o.get("reached") for o in ops if o.get("reached") is not None]
            reach = f"{sum(reached)}/{len(reached)}" if reached else "-"
            where = _where(ops)
            lines.append(f"| {m} | " + " | ".join(cells_) + f" | {reach} | {where} | {len(mres)} |")
        misses = [r for r in res if r["operating_point"].get("reached") is False]
        if misses:
            lines += ["", "Cells that did not reach the target (evaluated at their best check):", ""]
            for r in misses:
                o = r["operating_point"]
                lines.append(
                    f"- {r['cell']}: best selection {LABEL.get(o['metric'], o['metric'])} "
                    f"{100 * o['selection'][o['metric']]:.1f}% at {_where([o])} after {o['checks']} checks"
                )
        lines += _seed_tables(rows, methods, present)
        lines.append("")
    if spec.attacks is not None:
        at = spec.attacks
        for concept in [c.label for c in spec.concepts]:
            crow = [r for r in rows if r["concept"] == concept]
            if not crow:
                continue
            orig = [r["rate"] for r in crow if r["metric"] == "original_rate"]
            lines += [
                f"## Attacks on {concept!r}: ASR in % ({at.n_prompts} prompts x {at.n_images} images; 95% Wilson "
                "interval over prompts, bootstrap over seeds)",
                "",
                f"Original model on the plain prompts: {100 * orig[0]:.0f}%." if orig else "",
                "",
                "| Method | pre-attack | " + " | ".join(at.names) + " |",
                "|---|---|" + "---|" * len(at.names),
            ]
            g = group_rows(crow, "method", "metric")
            for m in methods:
                if (m, "pre_attack") not in g:
                    continue
                vals = _rates(g, m, ["pre_attack", *[f"asr:{a}" for a in at.names]])
                lines.append(f"| {m} | " + " | ".join(vals) + " |")
            lines.append("")
    failed = _failed(spec, study_dir)
    if failed:
        lines += ["## Failed cells (retried on the next run)", ""] + [f"- {k}: {e}" for k, e in failed] + [""]
    return "\n".join(lines)


def _rates(
    grouped: dict[tuple, list[dict[str, Any]]], method: str, metrics: list[str], by: str | None = None
) -> list[str]:
    """The table cells of ``method``: each metric's mean and 95% interval over its rows in ``grouped``
    (``group_rows(rows, "method", "metric")``), :func:`mean_interval` with ``by``."""
    return [_pct(mean_interval(grouped.get((method, k), []), by=by)) for k in metrics]


def _seed_tables(rows: list[dict[str, Any]], methods: list[str], present: list[str]) -> list[str]:
    """One table per concept set trained with several seeds: each method's mean over that set's seeds
    (the training-seed spread; a deterministic method has one cell there)."""
    lines: list[str] = []
    seeds_of = group_rows(rows, "concept")
    for (concept,), crows in seeds_of.items():
        if len({r["seed"] for r in crows}) < 2:
            continue
        lines += [
            "",
            f"### Training seeds on {concept}: mean over seeds in %, 95% interval (bootstrap over seeds; Wilson "
            "for a method with one cell)",
            "",
            "| Method | " + " | ".join(LABEL[m] for m in present) + " | seeds |",
            "|---|" + "---|" * len(present) + "---|",
        ]
        grouped = group_rows([r for r in crows if r["metric"] in present], "method", "metric")
        for m in methods:
            mrows = [r for r in crows if r["method"] == m]
            if not mrows:
                continue
            seeds = sorted({r["seed"] for r in mrows})
            lines.append(
                f"| {m} | " + " | ".join(_rates(grouped, m, present)) + f" | {', '.join(str(x) for x in seeds)} |"
            )
    return lines


def _where(ops: list[dict[str, Any]]) -> str:
    steps = [o["step"] for o in ops if o.get("step") is not None]
    values = [o["value"] for o in ops if o.get("value") is not None]
    if steps:
        return "steps " + ", ".join(str(s) for s in steps)
    if values:
        return (
            ops[0].get("option", "value")
            + " "
            + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        )
    return "-"


def _failed(spec: StudySpec, study_dir: Path) -> list[tuple[str, str]]:
    out = []
    for c in cells(spec):
        st = cell_status(study_dir, c, spec)
        if st["state"] == "failed":
            out.append((c.key, st.get("error", "")))
    return out


def timing(spec: StudySpec, study_dir: Path) -> str:
    """Wall time per method: training, selection checks, test evaluation, attacks, and remaking a best
    check's edit (``best.json["remade"]``: training to it again and one selection check), in seconds,
    and the shares."""
    res = results(spec, study_dir)
    keys = ("train", "selection_eval", "test_eval", "attacks", "remake")
    lines = [
        f"# Study {spec.name!r}: wall time of the done cells (s)",
        "",
        "| Method | cells | train | selection eval | test eval | attacks | remake | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    grand = dict.fromkeys(keys, 0.0)
    for m in [x.label for x in spec.methods]:
        mres = [r for r in res if r["method"] == m]
        if not mres:
            continue
        s = {k: float(sum(_seconds(r, k) for r in mres)) for k in keys}
        for k in keys:
            grand[k] += s[k]
        lines.append(
            f"| {m} | {len(mres)} | " + " | ".join(f"{s[k]:.0f}" for k in keys) + f" | {sum(s.values()):.0f} |"
        )
    tot = sum(grand.values())
    lines.append("| all | " + str(len(res)) + " | " + " | ".join(f"{grand[k]:.0f}" for k in keys) + f" | {tot:.0f} |")
    if tot > 0:
        lines += [
            "",
            "Share: " + ", ".join(f"{k} {100 * grand[k] / tot:.1f}%" for k in keys) + ".",
            "",
            f"Cell time: {tot / 3600:.1f} h (the sum over cells, each timed on its own worker); a run with W "
            "workers on W cores takes about that / W of wall time.",
        ]
    resumed = [
        (r["cell"], r["attacks"]["resumed_prompts"]) for r in res if (r.get("attacks") or {}).get("resumed_prompts")
    ]
    if resumed and spec.attacks is not None:  # only an attacked study has attack results
        n = len(spec.attacks.names) * spec.attacks.n_prompts
        lines += [
            "",
            "Attacks resumed after an interruption: their time counts only the part after it (prompts done "
            "before, of " + str(n) + "): " + ", ".join(f"{c} ({k})" for c, k in resumed) + ".",
        ]
    return "\n".join(lines) + "\n"


def _seconds(result: dict[str, Any], key: str) -> float:
    if key == "remake":  # recorded with the operating point (cells remade before results carried it too)
        return float((result.get("operating_point") or {}).get("remade", {}).get("seconds", 0.0))
    return float(result["seconds"].get(key, 0.0))


def curves(spec: StudySpec, study_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{cell key: curve records}`` of the done or started cells (the ESR-PSR trade-off)."""
    out = {}
    for c in cells(spec):
        d = cell_dir(study_dir, c)
        if cell_status(study_dir, c, spec)["state"] not in ("todo", "stale"):
            recs = RunDir.open(d).records("curve.jsonl")
            if recs:
                out[c.key] = [{**r, "method": c.method.label, "concept": c.concept.label, "seed": c.seed} for r in recs]
    return out


def write_tables(spec: StudySpec, study_dir: Path, out: Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``table.md``, ``timing.md``, ``curves.json`` under ``out``."""
    out = Path(out)
    rows = tidy(spec, study_dir)
    paths = {
        "csv": out / "results.csv",
        "json": out / "results.json",
        "markdown": out / "table.md",
        "timing": out / "timing.md",
        "curves": out / "curves.json",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths["csv"], to_csv(rows))
    write_json_atomic(paths["json"], {"study": spec.name, "spec": spec.identity(), "rows": rows})
    write_text_atomic(paths["markdown"], markdown(spec, study_dir))
    write_text_atomic(paths["timing"], timing(spec, study_dir))
    write_json_atomic(paths["curves"], curves(spec, study_dir))
    return paths
