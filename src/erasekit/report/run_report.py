"""One self-contained HTML report per erase run: what was asked, what changed, what it cost.

:func:`build_run_report` reads a run directory through :class:`erasekit.rundir.RunDir` (its ``edit/``,
``run.json``, ``eval/<protocol>/metrics.json`` from ``erasekit evaluate --edit RUN``, the demo's
``metrics.json`` beside them, and the spectra under ``analysis/``) and writes ``RUN/report.html``. A
folder of the layout before ``run.json`` (an edit saved flat with ``config.json``, results wherever
``--out`` put them) is still read: there the result files are searched for, :data:`SEARCH_DEPTH`
folders deep.

1. the request (erase / preserve / target), the full config and the base model;
2. before/after images on the same prompts and seeds, for every erased concept and up to four
   preserved ones;
3. the metrics table (ESR / PSR / RSR / NER / ASR, original vs edited where both were measured);
4. the method's own trace: the concept AP / AGE chose at each step (AP paper, Figs. 4 and 6), the
   images of RECE's derived embeddings per epoch (RECE paper, Fig. 5), the recovery key of a hiding
   edit (its presence only: the key itself is a secret and never enters the page);
5. the sensitivity spectrum (AP paper, sec. 3.2, Figs. 1-2) if one was measured.

Every image is embedded as a base64 PNG, so the page opens in a browser with no server and no files
beside it.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from erasekit.analysis.rece_images import derived_embedding_images
from erasekit.analysis.report_sections import method_trace_section, spectrum_section
from erasekit.analysis.spectrum import Spectrum, edit_applied
from erasekit.edit import EDIT_META, EDIT_TENSORS, Edit, edit_folder
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.html import Markup, config_block, image_grid, png_data_uri, table, write_report
from erasekit.methods.ap import chosen_concepts
from erasekit.methods.hide import KEY_META, RecoveryKey, edit_digest
from erasekit.pipeline import load_pipeline
from erasekit.rundir import RUN_JSON, RunDir
from erasekit.world.shapes import OBJECTS

REPORT_NAME = "report.html"
CELL_PX = 96
"""Displayed size of one generated image in the before/after grids (small images are upscaled by an
integer factor, pixel-exact; large ones are downscaled)."""
MINIATURE_PRESERVE = 4
"""Preserved concepts shown when the request names none and the base model is the miniature."""
SKIP_DIRS = frozenset({"images", "checkpoints", "__pycache__"})
"""Folders not searched for result files (thousands of images, training checkpoints)."""
SEARCH_DEPTH = 3
"""How deep below a run of the layout before ``run.json`` result files are looked for (and, in any run,
recovery keys left inside it: a secret found anywhere is worth a warning)."""
METRICS = "metrics.json"
SPECTRA = ("spectrum.json", "spectrum-*")
ERASED, PRESERVED = "erased", "preserved"


# ------------------------------------------------------------------------------------------ reading a run
def find_edit_dir(run_dir: str | Path) -> Path:
    """The folder holding the run's edit: ``run_dir/edit`` (:class:`erasekit.rundir.RunDir`) or, in the
    layout before ``run.json``, ``run_dir`` itself. Raises ``FileNotFoundError`` saying what was expected."""
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"Run directory {str(d)!r} does not exist; pass the --out of `erasekit erase`.")
    if not d.is_dir():
        raise NotADirectoryError(f"Run directory {str(d)!r} is a file; pass the folder `erasekit erase --out` wrote.")
    found = edit_folder(d)
    if found is not None and (found / EDIT_TENSORS).exists():
        return found
    raise FileNotFoundError(
        f"{str(d)!r} is not a run directory: it holds no {EDIT_META} + {EDIT_TENSORS} (nor does {str(d / 'edit')!r}). "
        "Make one with `erasekit erase --out RUN_DIR` (or Edit.save(RUN_DIR))."
    )


def find_files(run_dir: str | Path, match: Iterable[str], depth: int = SEARCH_DEPTH) -> list[Path]:
    """Files below ``run_dir`` (down to ``depth`` folders, skipping :data:`SKIP_DIRS`) whose name is
    one of ``match`` or, for entries ending in ``*``, starts with the part before it; sorted."""
    exact = {m for m in match if not m.endswith("*")}
    prefixes = tuple(m[:-1] for m in match if m.endswith("*"))
    root = Path(run_dir)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        level = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = [] if level >= depth else sorted(n for n in dirnames if n not in SKIP_DIRS)
        for name in filenames:
            if name in exact or (prefixes and name.startswith(prefixes) and name.endswith(".json")):
                found.append(Path(dirpath) / name)
    return sorted(found)


@dataclass(frozen=True)
class MetricsFile:
    """One measured model: where its metrics came from, which side it is, and its headline numbers."""

    path: Path
    protocol: str
    side: Literal["original", "edited"]
    values: dict[str, float | None]


def headline_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """The headline rates of one protocol result, by display name, in a fixed order.

    ``esr_k`` / ``psr_k`` / ``rsr_k`` -> ESR-k / PSR-k / RSR-k (AP paper, sec. 5.1: erasure, preservation,
    recovery success rates at top-k); ``ner`` {t: rate} -> NER@t (AP Table 2, NudeNet exposure rate);
    ``asr`` -> ASR and an attack run's ``attacks`` {name: {asr}} -> ASR (name), with its
    ``pre_attack_rate`` as ASR (no attack). Other keys are left to the full JSON.
    """
    out: dict[str, float | None] = {}
    for prefix, name in (("esr_", "ESR"), ("psr_", "PSR"), ("rsr_", "RSR")):
        keys = sorted(
            (k for k in res if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[len(prefix) :])
        )
        for k in keys:
            out[f"{name}-{k[len(prefix) :]}"] = _num(res[k])
    if isinstance(res.get("ner"), dict):
        for t, v in sorted(res["ner"].items(), key=lambda kv: float(kv[0])):
            out[f"NER@{t}"] = _num(v)
    if "asr" in res:
        out["ASR"] = _num(res["asr"])
    if "pre_attack_rate" in res:
        out["ASR (no attack)"] = _num(res["pre_attack_rate"])
    if isinstance(res.get("attacks"), dict):
        for name, a in res["attacks"].items():
            if isinstance(a, dict) and "asr" in a:
                out[f"ASR ({name})"] = _num(a["asr"])
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else None


def metrics_paths(run_dir: str | Path) -> list[Path]:
    """The run's metrics files: in a :class:`~erasekit.rundir.RunDir`, ``eval/<protocol>/metrics.json`` of
    every evaluated protocol and the top-level ``metrics.json`` (the demo's, both sides); in a folder of
    the layout before ``run.json``, every ``metrics.json`` below it (:func:`find_files`)."""
    if not RunDir.is_run(run_dir):
        return find_files(run_dir, [METRICS])
    rd = RunDir.open(run_dir)
    top = [rd.file(METRICS)] if rd.file(METRICS).is_file() else []
    return top + [rd.eval_dir(p) / METRICS for p in rd.evaluated()]


def spectrum_paths(run_dir: str | Path) -> list[Path]:
    """The run's saved spectra: in a :class:`~erasekit.rundir.RunDir`, those in ``analysis/`` and its
    sub-folders (one folder per measurement); in a folder of the layout before ``run.json``, those below it."""
    if not RunDir.is_run(run_dir):
        return find_files(run_dir, SPECTRA)
    return find_files(RunDir.open(run_dir).analysis_dir, SPECTRA, depth=1)


def find_metrics(run_dir: str | Path) -> list[MetricsFile]:
    """Every metrics file of the run (:func:`metrics_paths`) with its side.

    ``erasekit evaluate --out DIR`` writes ``DIR/metrics.json`` (and ``DIR/evaluate.json`` with the
    options): it measured the edited model when ``--edit`` was given (``"edit"`` in either file), the
    original one otherwise. ``erasekit demo`` writes one ``metrics.json`` holding both
    (``{"original": ..., "edited": ...}``). An attack run's metrics are of the edited model, with the
    original model's rate of the plain prompts (``original_rate``) on the original side.
    """
    out: list[MetricsFile] = []
    for path in metrics_paths(run_dir):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)} is not valid JSON ({e}); re-run the evaluation that wrote it.") from e
        if not isinstance(res, dict):
            continue
        if isinstance(res.get("original"), dict) and isinstance(res.get("edited"), dict):  # the demo's file
            for side in ("original", "edited"):
                sub = res[side]
                out.append(MetricsFile(path, str(sub.get("protocol", "?")), side, headline_metrics(sub)))
            continue
        values = headline_metrics(res)
        if not values:
            continue
        protocol = str(res.get("protocol", "?"))
        if "attacks" in res:  # an attack run: the edited model, beside the original's plain-prompt rate
            out.append(MetricsFile(path, protocol, "edited", values))
            if _num(res.get("original_rate")) is not None:
                out.append(MetricsFile(path, protocol, "original", {"ASR (no attack)": _num(res["original_rate"])}))
            continue
        options = path.parent / "evaluate.json"
        edit = res.get("edit")
        if options.exists():
            try:
                edit = json.loads(options.read_text()).get("edit", edit)
            except (OSError, json.JSONDecodeError):
                pass
        out.append(MetricsFile(path, protocol, "edited" if edit else "original", values))
    return out


def metrics_section(files: Sequence[MetricsFile], run_dir: str | Path) -> str:
    """Tables of :func:`find_metrics`' results: one per protocol, original vs edited (and the change in
    points) when both were measured once; one column per file otherwise."""
    root = Path(run_dir)
    parts = []
    for protocol in dict.fromkeys(f.protocol for f in files):
        group = [f for f in files if f.protocol == protocol]
        names = list(dict.fromkeys(k for f in group for k in f.values))
        orig = [f for f in group if f.side == "original"]
        edit = [f for f in group if f.side == "edited"]
        if len(orig) <= 1 and len(edit) <= 1:
            cols = [("original", orig[0] if orig else None), ("edited", edit[0] if edit else None)]
            cols = [(n, f) for n, f in cols if f is not None]
        else:
            cols = [(f"{f.side}: {f.path.parent.relative_to(root)}", f) for f in group]
        both = len(cols) == 2 and cols[0][0] == "original" and cols[1][0] == "edited"
        rows = []
        for m in names:
            vals = [f.values.get(m) for _, f in cols]
            row: list[Any] = [m, *("–" if v is None else v for v in vals)]
            if both:
                row.append("–" if None in vals else Markup(f"{100 * (vals[1] - vals[0]):+.1f}"))
            rows.append(row)
        sources = sorted({str(f.path.relative_to(root)) for f in group})
        parts.append(f"<p>Protocol <b>{html.escape(protocol)}</b> ({html.escape(', '.join(sources))}):</p>")
        parts.append(table(["metric", *(n for n, _ in cols), *(["Δ points"] if both else [])], rows))
    return "".join(parts)


def find_spectra(run_dir: str | Path) -> dict[Path, dict[str, Any]]:
    """The run's saved spectra (:func:`spectrum_paths`: ``spectrum-<label>.json`` by
    :func:`~erasekit.analysis.spectrum.run_spectra`, or ``spectrum.json``), grouped by folder as
    ``{folder: {label: Spectrum}}`` (one folder: one measurement, e.g. ESD beside AP)."""

    groups: dict[Path, dict[str, Any]] = {}
    for path in spectrum_paths(run_dir):
        try:
            spec = Spectrum.load(path)
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{str(path)} is not a spectrum written by Spectrum.save ({e}).") from e
        g = groups.setdefault(path.parent, {})
        label = spec.label or path.stem.removeprefix("spectrum-")
        g[label if label not in g else path.stem] = spec
    return groups


# ------------------------------------------------------------------------------------------ images
def _fit(images: np.ndarray, cell: int = CELL_PX) -> tuple[list[np.ndarray], int]:
    """Images and the integer upscale that shows them about ``cell`` pixels tall (large ones are resized down)."""
    h, w = images.shape[1:3]
    if h <= cell:
        return list(images), max(1, cell // h)
    size = (max(1, round(w * cell / h)), cell)
    return [np.asarray(Image.fromarray(im).resize(size, Image.LANCZOS)) for im in images], 1


def image_strip(images: np.ndarray, cell: int = CELL_PX) -> Image.Image:
    """One row of uint8 (N, H, W, 3) images as a PIL image, each about ``cell`` pixels tall."""
    ims, scale = _fit(np.asarray(images), cell)
    return image_grid(ims, cols=len(ims), scale=scale, pad=1)


def _img(img: Image.Image, alt: str) -> Markup:
    return Markup(f'<img class="grid" src="{png_data_uri(img)}" alt="{html.escape(alt)}" style="max-width:100%">')


def default_preserve(edit, preserve: Sequence[str] | None, limit: int = MINIATURE_PRESERVE) -> list[str]:
    """The preserved concepts shown: ``preserve``, else the request's (first ``limit``), else on the
    miniature the first ``limit`` objects that were not erased."""
    if isinstance(preserve, str):
        raise ValueError(
            f"`preserve` must be a list of concepts, got the string {preserve!r}; wrap it: [{preserve!r}]."
        )
    if preserve is not None:
        erased = set(edit.request.erase)
        return list(dict.fromkeys(c for c in (p.strip() for p in preserve) if c and c not in erased))
    if edit.request.preserve:
        return list(edit.request.preserve[:limit])

    if edit.base.get("id") == "shapes" or all(c in OBJECTS for c in edit.request.erase):
        return [o for o in OBJECTS if o not in edit.request.erase][:limit]
    return []


def before_after(
    pipe,
    edit,
    concepts: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    sampling,
    prompt_template: str,
    progress: bool,
) -> str:
    """A table with one row per ``(concept, role)``: the original model's and the edited model's images
    of ``prompt_template.format(concept)`` on the same ``seeds`` (same initial noise per column)."""

    prompts = [prompt_template.format(c).strip() for c, _ in concepts]
    n = len(seeds)

    def images(which: str) -> np.ndarray:  # (P, N, H, W, 3): every prompt on every seed, batched
        if progress:
            print(f"report: {len(prompts)} prompts x {n} seeds from the {which} model")
        flat = generate_images(
            pipe, [p for p in prompts for _ in seeds], list(seeds) * len(prompts), sampling, progress=progress
        )
        return flat.reshape(len(prompts), n, *flat.shape[1:])

    before = images("original")
    with edit_applied(pipe, edit):
        after = images("edited")
    rows, classes = [], []
    for (c, role), p, b, a in zip(concepts, prompts, before, after, strict=True):
        rows.append([Markup(f"<b>{html.escape(c)}</b><br><small>“{html.escape(p)}”</small>"), role])
        rows[-1] += [_img(image_strip(b), f"original: {p}"), _img(image_strip(a), f"edited: {p}")]
        classes.append(ERASED if role == ERASED else "")
    note = (
        f"<p>Prompt “{html.escape(prompt_template)}” with the concept; columns of each strip: seeds "
        f"{html.escape(_seeds_text(seeds))}. Both models start every column from the same noise.</p>"
    )
    return note + table(["concept", "role", "original", "edited"], rows, classes)


def _seeds_text(seeds: Sequence[int]) -> str:
    s = list(seeds)
    return f"{s[0]}–{s[-1]}" if s == list(range(s[0], s[0] + len(s))) and len(s) > 2 else ", ".join(map(str, s))


# ------------------------------------------------------------------------------------------ traces
def chosen_concept_sections(edit) -> list[tuple[str, str]]:
    """AP / AGE: the concept chosen at each step for each erased concept (AP paper, Figs. 4 and 6),
    from the step log's per-concept records (``{"erase": c_e, "concept": chosen, ...}``), and the
    search space (the K nearest vocabulary concepts of each erased concept)."""

    log = edit.trace.get("log") or []
    key = next(
        (
            k
            for k in ("adversarial", "targets")
            if any(isinstance(r.get(k), list) and r[k] and isinstance(r[k][0], dict) for r in log)
        ),
        None,
    )
    if key is None:
        return []
    picks = chosen_concepts(log, key)
    what = "adversarial concept c_a (AP eq. 5)" if key == "adversarial" else "target concept c_t (AGE, slides eq. 14)"
    out = []
    for c in edit.request.erase:
        recs = [{"step": s, "concept": ch} for s, e, ch in picks if e == c and ch != ""]
        if recs:
            body = f"<p>The {html.escape(what)} chosen for <b>{html.escape(c)}</b> at each training step.</p>"
            heading = f"Method trace: {what.split()[0]} concept for “{c}”"
            out.append((heading, body + method_trace_section(log=recs, key="concept")))
    space = edit.trace.get("search_space")
    if isinstance(space, dict) and space:
        rows = [
            [c, ", ".join(f"{n} ({s:.2f})" for n, s in cands[:12]) + (" …" if len(cands) > 12 else "")]
            for c, cands in space.items()
        ]
        head = (
            f"<p>Vocabulary {html.escape(str(edit.trace.get('vocabulary')))} "
            f"({edit.trace.get('vocabulary_size')} concepts); K = {edit.trace.get('k')} candidates per erased "
            "concept (cosine similarity of the text embeddings).</p>"
        )
        out.append(("Method trace: search space", head + table(["erased", "candidates"], rows)))
    return out


def rece_section(
    pipe, edit, seeds: Sequence[int], sampling, model: Literal["epoch", "final"], progress: bool
) -> tuple[str, str]:
    """RECE: images of every epoch's derived embedding (RECE paper, Fig. 5) for each erased concept,
    via :func:`~erasekit.analysis.rece_images.derived_embedding_images`, and the per-epoch residuals."""

    epochs = int(edit.config.get("epochs", 0))
    rendered = "the model after t rounds (the paper's Fig. 5)" if model == "epoch" else "the final edited model"
    parts = [
        f"<p>RECE derives, after each erasing round t (0 = right after the UCE step), the embedding c′ (eq. 8) "
        f"that still makes the edited cross-attention reproduce the concept, then erases it. Each row: images "
        f"that {rendered} generates from epoch t's c′ (seeds {html.escape(_seeds_text(seeds))}). The last row "
        f"(epoch {epochs}) is derived from the final model and never erased: a probe of what is left.</p>"
    ]
    for c in edit.request.erase:
        if progress:
            print(f"report: RECE derived embeddings of {c!r} ({epochs + 1} epochs x {len(seeds)} seeds)")
        imgs = derived_embedding_images(pipe, edit, list(seeds), sampling, concept=c, model=model)
        labels = [f"epoch {t}" + (" (probe)" if t == epochs else "") for t in range(len(imgs))]
        parts.append(f"<p><b>{html.escape(c)}</b></p>")
        parts.append(method_trace_section(epoch_images=dict(zip(labels, imgs, strict=True))))
    log = edit.trace.get("epochs_log") or []
    if log:
        rows = [
            [
                str(r["epoch"]),
                "yes" if r.get("erased") else "no (probe)",
                f"{r['residual_derived']:.4g}",
                f"{r['residual_concept']:.4g}",
                f"{r['derived_norm_ratio']:.3f}",
            ]
            for r in log
        ]
        parts.append(
            "<p>‖W′c′ − Wc‖² summed over the edited projections (how well c′ restores the original keys and "
            "values), the same for the concept itself, and ‖c′‖ / ‖c‖.</p>"
        )
        parts.append(table(["epoch", "erased", "residual of c′", "residual of c", "‖c′‖ / ‖c‖"], rows))
    return ("Method trace: RECE derived embeddings per epoch", "".join(parts))


def hiding_section(edit, run_dir: Path, recovery_key: str | Path | None) -> tuple[str, str]:
    """Knowledge hiding: whether a recovery key exists and matches this edit. The key's tensors are never
    read into the page; only its metadata (concepts, number of soft tokens, its edit's digest) is."""

    n_tokens = edit.trace.get("n_tokens", edit.config.get("n_tokens"))
    rows: list[list[Any]] = [
        ["hidden concepts", ", ".join(edit.request.erase)],
        ["soft tokens per key", str(n_tokens)],
        ["this edit's digest", edit_digest(edit)],
    ]
    inside = sorted(str(p.parent.relative_to(run_dir)) for p in find_files(run_dir, [KEY_META]))
    if recovery_key is not None:
        try:
            key = RecoveryKey.load(recovery_key, edit=edit)
            rows.append(["recovery key", Markup("<span class='good'>present and made for this edit</span>")])
            rows.append(["key recovers", ", ".join(key.concepts)])
            rows.append(["key made by", str(key.meta.get("stage", "?"))])
        except (FileNotFoundError, ValueError) as e:
            rows.append(["recovery key", Markup(f"<span class='bad'>not usable: {html.escape(str(e))}</span>")])
    else:
        rows.append(["recovery key", "not checked (pass the key's folder to check that it matches this edit)"])
    if inside:
        warn = f"a key is stored inside the run directory ({', '.join(inside)}): whoever has the run can recover"
        rows.append(["warning", Markup(f"<span class='bad'>{html.escape(warn)}</span>")])
    body = (
        "<p>A hiding edit moves the concept behind a secret prompt (slides eq. 15) instead of removing it. "
        "The key is a secret: this page says only whether it exists, never its values.</p>"
    )
    return ("Method trace: recovery key", body + table(["field", "value"], rows))


# ------------------------------------------------------------------------------------------ the report
def build_run_report(
    run_dir: str | Path,
    *,
    pipe=None,
    model: str | None = "shapes",
    seeds: Iterable[int] = range(6),
    preserve: Sequence[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    sampling=None,
    prompt_template: str = "{}",
    recovery_key: str | Path | None = None,
    rece_model: Literal["epoch", "final"] = "epoch",
) -> Path:
    """Write one self-contained HTML report of an erase run and return its path (``run_dir/report.html``
    unless ``out`` is given).

    ``pipe`` is the *unedited* base pipeline (left unchanged afterwards); without it ``model`` is
    loaded (``None``: the edit's own base, its local path or hub id). Images use ``seeds`` (one
    column each) and ``sampling`` (a :class:`~erasekit.eval.generate.SamplingConfig`; default the
    model's sampler with 20 steps), with prompt ``prompt_template.format(concept)``. ``preserve``
    overrides the preserved concepts shown (default: :func:`default_preserve`). ``recovery_key``
    (a hiding edit's key folder) is checked against the edit, never shown. ``rece_model``: which
    model renders RECE's derived embeddings, see :func:`~erasekit.analysis.rece_images.derived_embedding_images`.
    """

    # 1. The run: its edit and config.
    run = Path(run_dir)
    edit_dir = find_edit_dir(run)
    edit = Edit.load(edit_dir)
    # run.json (RunDir: identity, stages); config.json in the layout before it
    run_config = _read_json(run / RUN_JSON) or _read_json(run / "config.json") or _read_json(edit_dir / "config.json")
    if isinstance(seeds, int | str):
        raise ValueError(f"`seeds` must be a sequence of integers, e.g. range(6); got {seeds!r}.")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one seed, e.g. seeds=range(6).")
    if prompt_template.count("{}") != 1:
        raise ValueError(f"`prompt_template` must contain '{{}}' exactly once, got {prompt_template!r}.")
    if rece_model not in ("epoch", "final"):
        raise ValueError(f"`rece_model` must be 'epoch' or 'final', got {rece_model!r}.")
    sampling = sampling if sampling is not None else SamplingConfig(steps=20)
    if pipe is None:
        source = model if model is not None else (edit.base.get("path") or edit.base.get("id"))
        pipe = load_pipeline(source)
    try:
        edit.check_base(pipe)
    except ValueError as e:
        raise ValueError(f"{e} (pass `model` or `pipe`: the unedited base model of this run).") from None
    resolved = sampling.resolved(pipe)

    # 2. Header, request and config.
    req = edit.request
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    title = f"EraseKit run: {edit.method} erasing {', '.join(req.erase)}"
    subtitle = (
        f"Base model {edit.base.get('id')} (fingerprint {edit.base.get('fingerprint')}); edit made {edit.created} "
        f"with erasekit {edit.version}; report written {now} from {run.resolve()}."
    )
    request_rows = [
        ["erase", ", ".join(req.erase)],
        ["preserve", ", ".join(req.preserve) or "–"],
        ["target (anchor)", repr(req.target) if not req.target else req.target],
        ["method", edit.method],
        ["changed tensors", f"{len(edit.tensors)} ({sum(t.numel() for t in edit.tensors.values()):,} values)"],
    ]
    sections: list[tuple[str, str]] = [("Request", table(["field", "value"], request_rows))]

    # 3. Before / after.
    shown = [(c, ERASED) for c in req.erase] + [(c, PRESERVED) for c in default_preserve(edit, preserve)]
    sections.append(("Before / after", before_after(pipe, edit, shown, seeds, sampling, prompt_template, progress)))

    # 4. Metrics.
    metrics = find_metrics(run)
    if metrics:
        sections.append(("Metrics", metrics_section(metrics, run)))

    # 5. The method's own trace.
    sections += chosen_concept_sections(edit)
    if edit.method == "rece" and edit.aux:
        sections.append(rece_section(pipe, edit, seeds, sampling, rece_model, progress))
    if edit.method == "hide":
        sections.append(hiding_section(edit, run, recovery_key))

    # 6. Spectra.
    for folder, spectra in find_spectra(run).items():
        where = folder.relative_to(run).as_posix()
        heading = "Sensitivity spectrum" + ("" if where == "." else f" ({where})")
        sections.append((heading, spectrum_section(spectra)))

    # 7. Everything needed to redo it.
    trace = {k: v for k, v in edit.trace.items() if k not in ("log", "search_space", "epochs_log")}
    if edit.trace.get("log"):
        trace["log"] = f"{len(edit.trace['log'])} step records (in edit.json)"
    config = {
        "method": edit.method,
        "config": edit.config,
        "request": asdict(req),
        "base": edit.base,
        "trace": trace,
        "run_config": run_config,
        "report": {"seeds": seeds, "sampling": asdict(resolved), "prompt_template": prompt_template},
    }
    sections.append(("Config and base model", config_block(config)))

    path = Path(out) if out is not None else run / REPORT_NAME
    page = write_report(path, title, subtitle, sections)
    if RunDir.is_run(run):
        RunDir.open(run).mark("report", "done", path=str(page), seeds=seeds)
    return page


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)} is not valid JSON ({e}).") from e


__all__ = [
    "MetricsFile",
    "before_after",
    "build_run_report",
    "default_preserve",
    "find_edit_dir",
    "find_files",
    "find_metrics",
    "find_spectra",
    "headline_metrics",
    "image_strip",
    "metrics_paths",
    "metrics_section",
    "spectrum_paths",
]
