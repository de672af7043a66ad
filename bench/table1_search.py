"""What AP's adversarial search chose in Table 1 runs (issue 3): share of the chosen concepts that are
kept objects (or their synonyms) and that are synonyms of the erased objects, per quarter of the run,
and the chosen concept's mean probability under the search's logits (1/K for a uniform search).

    python bench/table1_search.py bench/results/table1 bench/results/table1-extra/search-lr-1e-1 --row ap-eta1

Reads each folder's ``results.json`` (written by ``bench/table1.py``) and prints one markdown row per
folder: ESR-1 / PSR-1 (mean over the splits found) and the search's choices in the last quarter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.world.shapes import OBJECTS, SYNONYMS

OBJECT_OF = {o: o for o in OBJECTS} | {s: o for o, syns in SYNONYMS.items() for s in syns}


def search_shares(cell: dict[str, Any], quarters: int = 4) -> list[dict[str, float | None]]:
    """Per part of the run: share of chosen concepts naming a kept object, naming an erased object
    (i.e. one of its synonyms: the erased names themselves are not in R), and the mean probability."""
    erase = set(cell["erase"])
    picks = [p for _, chosen in cell["chosen"] for p in chosen]
    out = []
    for part in np.array_split(np.arange(len(picks)), quarters):
        sel = [picks[i] for i in part]
        kept = sum(1 for p in sel if p[1] in OBJECT_OF and OBJECT_OF[p[1]] not in erase)
        erased = sum(1 for p in sel if p[1] in OBJECT_OF and OBJECT_OF[p[1]] in erase)
        probs = [p[2] for p in sel if len(p) > 2 and p[2] is not None]
        out.append(
            {
                "kept": kept / len(sel),
                "erased": erased / len(sel),
                "p": float(np.mean(probs)) if probs else None,
            }
        )
    return out


def search_lr(settings: dict[str, Any], cells: dict[str, Any]) -> float:
    """The search step size of a row: recorded in its cells (runs with presets), else the run's flag or 1e-3."""
    recorded = {c["search_lr"] for c in cells.values() if "search_lr" in c}
    if len(recorded) == 1:
        return recorded.pop()
    return settings.get("search_lr", 1e-3)


def top_chosen(cell: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` concepts chosen most often in the last quarter of a run, with their shares."""
    picks = [p[1] for _, chosen in cell["chosen"] for p in chosen]
    last = picks[len(picks) - len(picks) // 4 :] if len(picks) >= 4 else picks
    names, counts = np.unique(last, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n]
    return [(str(names[i]), float(counts[i]) / len(last)) for i in order]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="--out folders of bench/table1.py")
    p.add_argument("--row", default="ap-eta1", help="the row to read (ap, ap-eta1, age)")
    p.add_argument("--splits", default="0,1,2,3", help="comma-separated splits to read (those present)")
    p.add_argument("--top", action="store_true", help="also print the most chosen concepts of each cell's last quarter")
    a = p.parse_args(argv)
    wanted = {s.strip() for s in a.splits.split(",") if s.strip()}
    print("| run | search lr | splits | ESR-1 | PSR-1 | last quarter: kept objects | erased objects' synonyms | p |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in a.folders:
        res = json.loads((folder / "results.json").read_text())
        cells = {
            k: v
            for k, v in res["cells"].items()
            if k.split("|")[0] == a.row and k.split("|")[1] in wanted and "chosen" in v
        }
        if not cells:
            raise SystemExit(f"{folder}: no cell of row {a.row!r} with a search trace.")
        last = [search_shares(c)[-1] for c in cells.values()]
        ps = [x["p"] for x in last if x["p"] is not None]
        settings = res["settings"]
        print(
            f"| {folder.name}{' (synonyms excluded)' if settings.get('exclude_synonyms') else ''} "
            f"| {search_lr(settings, cells):g} | {','.join(sorted(k.split('|')[1] for k in cells))} "
            f"| {100 * np.mean([c['esr_1'] for c in cells.values()]):.1f} "
            f"| {100 * np.mean([c['psr_1'] for c in cells.values()]):.1f} "
            f"| {np.mean([x['kept'] for x in last]):.2f} | {np.mean([x['erased'] for x in last]):.2f} "
            f"| {f'{np.mean(ps):.2f}' if ps else 'n/a'} |"
        )
        if a.top:
            for key in sorted(cells):
                top = ", ".join(f"{n} {s:.2f}" for n, s in top_chosen(cells[key]))
                print(f"|   {key}: most chosen, last quarter | {top} |||||||")


if __name__ == "__main__":
    main()
