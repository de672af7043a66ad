"""Readers for the public prompt files of the papers' protocols, as :class:`PromptItem` lists.

Every reader keeps each row's seed, so an image depends only on (prompt, seed) and any model
evaluated with the same file gets the same starting noise. Formats (see docs/reproducing-sd14.md):

* **I2P** (Schramowski et al. 2023, https://huggingface.co/datasets/AIML-TUDA/i2p, 4,703 rows):
  ``prompt, categories, hard, inappropriate_percentage, nudity_percentage, q16_percentage,
  sd_safety_percentage, prompt_toxicity, lexica_url, sd_seed, sd_guidance_scale, sd_image_width,
  sd_image_height, sd_model``. ESD's copy (``data/unsafe-prompts4703.csv`` in rohitgandikota/erasing,
  used by the AP and RECE papers) renames ``sd_seed`` -> ``evaluation_seed`` and
  ``sd_guidance_scale`` -> ``evaluation_guidance``, adds ``case_number`` and a leading unnamed index.
* **Artists** (ESD's ``data/*_art_prompts.csv``; AP's ``data/long_niche_art_prompts.csv``):
  ``case_number, prompt, evaluation_seed, artist`` (plus an optional unnamed index column).
* **Imagenette** (ESD's ``data/small_imagenet_prompts.csv``: ``case_number, prompt, evaluation_seed,
  class``; AP's ``data/imagenette.csv``: ``case_number, prompt, label_str, evaluation_seed``).
* **COCO captions**: ESD's ``data/coco_30k.csv`` (``image_id, source, prompt, evaluation_seed``),
  any CSV with a ``prompt`` or ``caption`` column (seed column optional), COCO's own
  ``captions_val2014.json`` annotation file, or a text file with one caption per line.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erasekit.eval.generate import PromptItem
from erasekit.io import file_digest

# The 10 Imagenette classes (fastai/imagenette) and their ImageNet-1k class indices (torchvision order).
IMAGENETTE: dict[str, int] = {
    "tench": 0,
    "english springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "french horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}
_ALIASES = {"chainsaw": "chain saw", "english springer spaniel": "english springer", "springer": "english springer"}

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance")
PROMPT_COLUMNS = ("prompt", "caption", "text")


def imagenette_class(name: str) -> str:
    """Canonical Imagenette class name: ``"Cassette Player"``, ``"cassette_player"`` -> ``"cassette player"``."""
    key = re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name))).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in IMAGENETTE:
        raise ValueError(f"{name!r} is not an Imagenette class; the classes are: {', '.join(IMAGENETTE)}.")
    return key


def prompts_info(path: str | Path, fmt: str, n_rows: int) -> dict[str, Any]:
    """What ``metrics.json`` records about a prompt file: resolved path, SHA-256, format, rows read."""
    p = Path(path)
    return {"path": str(p.resolve()), "sha256": file_digest(p, 64), "format": fmt, "rows": n_rows}


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts with stripped, lower-cased column names (pandas' index column dropped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Prompt file {str(p)!r} does not exist.")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"Prompt file {str(p)!r} is empty; expected a CSV with a header row.")
        rows = []
        for row in reader:
            clean = {}
            for k, v in row.items():
                if k is None:  # more cells than header columns
                    continue
                key = k.strip().lower()
                if key in ("", "unnamed: 0"):
                    continue
                clean[key] = (v or "").strip() if key not in PROMPT_COLUMNS else (v or "")
            rows.append(clean)
    return rows


def _column(rows: list[dict[str, str]], names: Sequence[str], path: str | Path, *, required: bool = True) -> str | None:
    """The first of ``names`` present in the file's header."""
    header = rows[0].keys() if rows else ()
    for n in names:
        if n in header:
            return n
    if required:
        raise ValueError(
            f"Prompt file {str(path)!r} has none of the columns {list(names)}; its columns are {sorted(header)}."
        )
    return None


def _int(value: str, what: str, row: int, path: str | Path) -> int:
    try:
        return int(float(value)) if "." in value or "e" in value.lower() else int(value)
    except ValueError:
        raise ValueError(f"Row {row} of {str(path)!r}: {what} {value!r} is not a number.") from None


def _check_nonempty(rows: list, path: str | Path) -> None:
    if not rows:
        raise ValueError(f"Prompt file {str(path)!r} has a header but no rows.")


def i2p_items(
    path: str | Path,
    *,
    categories: Sequence[str] | None = None,
    guidance_from_file: bool = False,
    limit: int | None = None,
) -> list[PromptItem]:
    """One item per I2P row: its prompt and its seed (``sd_seed`` or ESD's ``evaluation_seed``).

    ``categories`` keeps rows whose ``categories`` cell names any of them (e.g. ``["sexual"]``).
    ``guidance_from_file`` samples each row at its own guidance scale (``sd_guidance_scale`` /
    ``evaluation_guidance``); the AP and RECE papers used ESD's script, which samples every row at
    one scale (7.5), so the default is ``False`` (the sampling config's scale for all rows).
    """
    rows = read_csv_rows(path)
    _check_nonempty(rows, path)
    pcol = _column(rows, ("prompt",), path)
    scol = _column(rows, SEED_COLUMNS, path)
    gcol = _column(rows, GUIDANCE_COLUMNS, path, required=guidance_from_file)
    wanted = {c.strip().lower() for c in categories} if categories else None
    items = []
    n_empty = 0
    for i, r in enumerate(rows):
        cats = [c.strip().lower() for c in r.get("categories", "").split(",") if c.strip()]
        if wanted is not None and not wanted.intersection(cats):
            continue
        prompt = r[pcol]
        n_empty += not prompt.strip()
        meta: dict[str, Any] = {
            "row": i,
            "case_number": _int(r["case_number"], "case_number", i, path) if r.get("case_number") else i,
        }
        if "categories" in r:
            meta["categories"] = r["categories"]
        if guidance_from_file:
            meta["guidance_scale"] = float(r[gcol])  # type: ignore[index]
        items.append(PromptItem(prompt, _int(r[scol], scol, i, path), meta))  # type: ignore[index]
        if limit is not None and len(items) >= limit:
            break
    if n_empty:
        warnings.warn(
            f"{n_empty} rows of {str(path)!r} have an empty prompt; they are sampled unconditionally.", stacklevel=2
        )
    if not items:
        raise ValueError(f"No rows of {str(path)!r} match `categories` {sorted(wanted or [])}.")
    return items


def artist_items(path: str | Path, *, n_samples: int = 5, artists: Sequence[str] | None = None) -> list[PromptItem]:
    """``n_samples`` items per row of an ESD artist CSV, seeds ``evaluation_seed + j`` (j < n_samples).

    ESD's script draws a row's samples from one generator seeded with ``evaluation_seed``; EraseKit
    gives each sample its own seed so an image depends only on (prompt, seed) (AP: 5 per prompt).
    """
    if n_samples < 1:
        raise ValueError(f"`n_samples` must be >= 1, got {n_samples}.")
    rows = read_csv_rows(path)
    _check_nonempty(rows, path)
    pcol = _column(rows, ("prompt",), path)
    scol = _column(rows, SEED_COLUMNS, path)
    acol = _column(rows, ("artist",), path)
    keep = {a.strip().lower() for a in artists} if artists else None
    items = []
    for i, r in enumerate(rows):
        artist = r[acol]  # type: ignore[index]
        if keep is not None and artist.lower() not in keep:
            continue
        seed = _int(r[scol], scol, i, path)  # type: ignore[index]
        case = _int(r["case_number"], "case_number", i, path) if r.get("case_number") else i
        for j in range(n_samples):
            items.append(PromptItem(r[pcol], seed + j, {"row": i, "case_number": case, "artist": artist, "sample": j}))
    return items


def imagenette_items(
    path: str | Path | None = None,
    *,
    classes: Sequence[str] | None = None,
    n_per_class: int = 500,
    seed: int = 0,
    template: str = "Image of {}",
) -> list[PromptItem]:
    """Imagenette prompts from an ESD/AP CSV (``class`` or ``label_str`` column), or, without a file,
    ``template`` x every class x seeds ``seed .. seed + n_per_class - 1`` (AP: 500 images per class)."""
    wanted = [imagenette_class(c) for c in classes] if classes else list(IMAGENETTE)
    items = []
    if path is None:
        if n_per_class < 1:
            raise ValueError(f"`n_per_class` must be >= 1, got {n_per_class}.")
        for c in wanted:
            for i in range(n_per_class):
                items.append(PromptItem(template.format(c), seed + i, {"concept": c, "label": IMAGENETTE[c]}))
        return items
    rows = read_csv_rows(path)
    _check_nonempty(rows, path)
    pcol = _column(rows, ("prompt",), path)
    scol = _column(rows, SEED_COLUMNS, path)
    ccol = _column(rows, ("class", "label_str", "label", "concept"), path)
    for i, r in enumerate(rows):
        c = imagenette_class(r[ccol])  # type: ignore[index]
        if c not in wanted:
            continue
        case = _int(r["case_number"], "case_number", i, path) if r.get("case_number") else i
        items.append(
            PromptItem(
                r[pcol], _int(r[scol], scol, i, path), {"concept": c, "label": IMAGENETTE[c], "case_number": case}
            )
        )  # type: ignore[index]
    return items


def coco_items(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[PromptItem]:
    """COCO captions from a CSV (``prompt``/``caption`` column, optional seed and ``image_id``), COCO's
    annotation JSON (``{"annotations": [{"image_id", "caption"}, ...]}``), or a text file (one per
    line). Rows without a seed column get seed ``seed + row``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Captions file {str(p)!r} does not exist.")
    records: list[tuple[str, int | None, dict[str, Any]]] = []
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        anns = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(anns, list):
            raise ValueError(f"{str(p)!r} is not a COCO captions file: expected {{'annotations': [...]}} or a list.")
        for a in anns:
            if isinstance(a, str):
                records.append((a, None, {}))
            elif isinstance(a, dict) and "caption" in a:
                records.append((a["caption"].strip(), None, {"image_id": a.get("image_id")}))
            else:
                raise ValueError(f"{str(p)!r}: an annotation without a 'caption' field: {a!r}.")
    elif p.suffix.lower() in (".txt", ".lst"):
        records = [(line.strip(), None, {}) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = read_csv_rows(p)
        _check_nonempty(rows, p)
        pcol = _column(rows, PROMPT_COLUMNS, p)
        scol = _column(rows, SEED_COLUMNS, p, required=False)
        for i, r in enumerate(rows):
            s = _int(r[scol], scol, i, p) if scol and r.get(scol) else None
            meta = {"image_id": r["image_id"]} if r.get("image_id") else {}
            records.append((r[pcol].strip(), s, meta))  # type: ignore[index]
    if not records:
        raise ValueError(f"No captions in {str(p)!r}.")
    items = []
    for i, (text, s, meta) in enumerate(records[:limit] if limit else records):
        items.append(PromptItem(text, seed + i if s is None else s, {"row": i, **meta}))
    return items


def lines_items(path: str | Path, *, seeds: Sequence[int] = (0,)) -> list[PromptItem]:
    """Every line of a text file (one prompt per line) x every seed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Prompt file {str(p)!r} does not exist.")
    texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"Prompt file {str(p)!r} has no prompts (one prompt per line expected).")
    if not seeds:
        raise ValueError("`seeds` is empty; give at least one seed.")
    return [PromptItem(t, int(s)) for t in texts for s in seeds]


FORMATS = {
    "i2p": i2p_items,
    "artists": artist_items,
    "imagenette": imagenette_items,
    "coco": coco_items,
    "lines": lines_items,
}

__all__ = [
    "FORMATS",
    "IMAGENETTE",
    "artist_items",
    "coco_items",
    "i2p_items",
    "imagenette_class",
    "imagenette_items",
    "lines_items",
    "prompts_info",
    "read_csv_rows",
]
