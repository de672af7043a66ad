"""The concept-sensitivity spectrum of an erasure (AP paper, Bui et al. NeurIPS 2024, section 3.2).

For an erased concept ``c_e``, the original model ``theta`` and the sanitized model
``theta'_{c_e}``, generate ``k`` images of every concept ``c`` of a concept set from the same
``k`` fixed initial noises ``z_T^i`` with both models, and score each against ``c`` with CLIP::

    S_{theta,i,c} = S(G(theta, c, z_T^i), c)
    delta_{c_e}(c) = 1/k sum_i (S_{theta,i,c} - S_{theta'_{c_e},i,c})

A large ``delta`` means erasing ``c_e`` hurt the model's ability to generate ``c``. Sorting the
concepts by ``delta`` gives the paper's Fig. 1 (bar chart of the most and least affected concepts);
the histogram of ``delta`` over a whole vocabulary gives Fig. 2.

The scores of the original model do not depend on the erasure, so :func:`concept_scores` can be run
once and passed to every spectrum of the same base model (the concept graph does this).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from erasekit.analysis import plots, report_sections
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.io import atomic_path, write_json_atomic, write_text_atomic
from erasekit.options import compose
from erasekit.pipeline import base_info

ImageSource = Callable[[list[str], list[int]], np.ndarray]
"""Anything that turns (prompts, seeds) into uint8 (N, H, W, 3) images, one per (prompt, seed) pair."""


def json_safe(o: Any) -> Any:
    """``o`` with every NaN/inf float replaced by None (standard JSON has no NaN)."""
    if isinstance(o, float | np.floating):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_safe(v) for v in o]
    return o


@dataclass
class SpectrumConfig:
    """How a spectrum is measured: the seeds, the prompt templates, and the sampler (a
    :class:`~erasekit.eval.generate.SamplingConfig`: the same settings ``erasekit generate`` takes).

    Example: ``SpectrumConfig(n_seeds=200, sampling=SamplingConfig(steps=50, guidance_scale=7.5))``.
    """

    n_seeds: int = field(default=8, metadata={"help": "k: images per concept and model (the paper uses 200)."})
    first_seed: int = field(default=0, metadata={"help": "Seeds are first_seed, ..., first_seed + k - 1."})
    prompt_template: str = field(default="{}", metadata={"help": "Generation prompt for concept c; '{}' is c."})
    score_template: str | None = field(
        default=None, metadata={"help": "Text CLIP scores against; None = the prompt (the paper's S(G(c), c))."}
    )
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig,
        metadata={"help": "Sampler steps, CFG scale and images per batch (None: the pipeline's defaults)."},
    )

    def __post_init__(self) -> None:
        compose(self, "Spectrum")  # `sampling` from a saved result's dict
        if self.n_seeds < 1:
            raise ValueError(f"`n_seeds` must be >= 1, got {self.n_seeds}.")
        for name in ("prompt_template", "score_template"):
            t = getattr(self, name)
            if t is not None and t.count("{}") != 1:
                raise ValueError(f"`{name}` must contain '{{}}' exactly once (where the concept goes), got {t!r}.")

    @property
    def seeds(self) -> list[int]:
        """The k fixed seeds of the initial noises z_T^i."""
        return list(range(self.first_seed, self.first_seed + self.n_seeds))

    def prompt(self, concept: str) -> str:
        """Generation prompt of ``concept``."""
        return self.prompt_template.format(concept).strip()

    def text(self, concept: str) -> str:
        """The text CLIP scores the images of ``concept`` against."""
        return (self.score_template or self.prompt_template).format(concept).strip()


def as_concept_list(concepts: Iterable[str] | Any) -> list[str]:
    """A concept set as a list of unique strings (order kept); accepts lists and objects with ``.concepts``."""
    if isinstance(concepts, str):
        raise ValueError(
            f"`concepts` must be a list of concepts, not the single string {concepts!r}; wrap it in a list."
        )
    items = list(getattr(concepts, "concepts", concepts))
    bad = [c for c in items if not isinstance(c, str)]
    if bad:
        raise ValueError(f"`concepts` must hold strings; got {type(bad[0]).__name__} {bad[0]!r}.")
    out = list(dict.fromkeys(items))
    if not out:
        raise ValueError("`concepts` is empty: give at least one concept.")
    return out


def pipeline_source(pipe, sampling=None) -> ImageSource:
    """An :data:`ImageSource` backed by :func:`erasekit.eval.generate.generate_images` on ``pipe``."""

    def source(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate_images(pipe, prompts, seeds, sampling)

    return source


def _as_source(obj, config: SpectrumConfig) -> ImageSource:
    if hasattr(obj, "unet") and hasattr(obj, "text_encoder"):
        return pipeline_source(obj, config.sampling)
    if callable(obj):
        return obj
    raise ValueError(
        f"Expected a Stable Diffusion pipeline or a callable (prompts, seeds) -> images, got {type(obj).__name__}."
    )


@contextmanager
def edit_applied(pipe, edit) -> Iterator[Any]:
    """Temporarily write ``edit``'s tensors into ``pipe``: :meth:`erasekit.edit.Edit.applied` (kept
    under this name for existing callers)."""
    with edit.applied(pipe):
        yield pipe


def edit_digest(edit) -> str:
    """A short hash of an edit's tensors (identifies the sanitized model in results and caches)."""
    h = hashlib.sha256()
    for name, t in sorted(edit.tensors.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def concept_scores(
    source,
    concepts: Sequence[str],
    scorer,
    config: SpectrumConfig | None = None,
    *,
    progress: bool = True,
    desc: str = "CLIP scores",
    timing: dict[str, float] | None = None,
) -> np.ndarray:
    """CLIP alignment scores ``S_{theta,i,c}`` (AP paper sec. 3.2) of a model: float64 (C, k).

    Row ``c`` holds the scores of the images of concept ``c`` generated from the ``k`` fixed seeds
    of ``config``, each scored against ``config.text(c)`` by ``scorer`` (anything with
    ``score(images, texts) -> (N,)``, e.g. :class:`~erasekit.eval.clip_score.ClipScorer`).
    ``source`` is a pipeline or an :data:`ImageSource`. ``timing`` (if given) accumulates
    ``generate_s`` and ``score_s``.
    """
    config = config or SpectrumConfig()
    concepts = as_concept_list(concepts)
    src = _as_source(source, config)
    seeds = config.seeds
    k = len(seeds)
    pairs = [(ci, s) for ci in range(len(concepts)) for s in seeds]
    scores = np.empty(len(pairs), dtype=np.float64)
    timing = timing if timing is not None else {}
    timing.setdefault("generate_s", 0.0)
    timing.setdefault("score_s", 0.0)
    bar = tqdm(total=len(pairs), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(pairs), config.sampling.batch_size):
        chunk = pairs[start : start + config.sampling.batch_size]
        t0 = time.perf_counter()
        images = src([config.prompt(concepts[ci]) for ci, _ in chunk], [s for _, s in chunk])
        t1 = time.perf_counter()
        if len(images) != len(chunk):
            raise ValueError(f"The image source returned {len(images)} images for {len(chunk)} (prompt, seed) pairs.")
        scores[start : start + len(chunk)] = scorer.score(images, [config.text(concepts[ci]) for ci, _ in chunk])
        timing["generate_s"] += t1 - t0
        timing["score_s"] += time.perf_counter() - t1
        bar.update(len(chunk))
    bar.close()
    return scores.reshape(len(concepts), k)


@dataclass
class Spectrum:
    """The sensitivity spectrum ``delta_{c_e}(c)`` of one erasure over a concept set (AP paper sec. 3.2).

    ``original`` and ``edited`` are the per-seed CLIP scores ``S_{theta,i,c}`` and
    ``S_{theta',i,c}``, float (C, k); ``config`` records how they were measured.
    """

    concepts: list[str]
    seeds: list[int]
    original: np.ndarray
    edited: np.ndarray
    erased: list[str] = field(default_factory=list)
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.original = np.asarray(self.original, dtype=np.float64)
        self.edited = np.asarray(self.edited, dtype=np.float64)
        shape = (len(self.concepts), len(self.seeds))
        if self.original.shape != shape or self.edited.shape != shape:
            raise ValueError(
                f"Score arrays must be (concepts, seeds) = {shape}; got original {self.original.shape}, edited {self.edited.shape}."
            )

    @property
    def delta(self) -> np.ndarray:
        """``delta_{c_e}(c) = 1/k sum_i (S_{theta,i,c} - S_{theta',i,c})`` per concept, (C,)."""
        return (self.original - self.edited).mean(axis=1)

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of ``delta`` over the k paired seeds (0 when k = 1), (C,)."""
        k = len(self.seeds)
        if k < 2:
            return np.zeros(len(self.concepts))
        return (self.original - self.edited).std(axis=1, ddof=1) / np.sqrt(k)

    @property
    def g0(self) -> np.ndarray:
        """``G_0(c)``: the original model's mean CLIP score per concept, (C,)."""
        return self.original.mean(axis=1)

    @property
    def g_edited(self) -> np.ndarray:
        """``G_{c_e}(c)``: the sanitized model's mean CLIP score per concept, (C,)."""
        return self.edited.mean(axis=1)

    def order(self) -> np.ndarray:
        """Concept indices from most to least hurt (ties keep the concept order)."""
        return np.argsort(-self.delta, kind="stable")

    def ranked(self, top: int | None = None) -> list[dict[str, Any]]:
        """Concepts from most to least hurt: ``{"rank", "concept", "delta", "stderr", "g0", "g_edited", "erased"}``."""
        d, se, g0, g1 = self.delta, self.stderr, self.g0, self.g_edited
        rows = []
        for r, i in enumerate(self.order()[: top if top is not None else None]):
            c = self.concepts[i]
            rows.append(
                {
                    "rank": r + 1,
                    "concept": c,
                    "delta": float(d[i]),
                    "stderr": float(se[i]),
                    "g0": float(g0[i]),
                    "g_edited": float(g1[i]),
                    "erased": c in self.erased,
                }
            )
        return rows

    def percentile(self, concept: str) -> float:
        """Share of the concepts hurt less than ``concept`` (1.0: the most hurt, 0.0: the least)."""
        if concept not in self.concepts:
            raise ValueError(f"{concept!r} is not in this spectrum's concepts.")
        d = self.delta
        v = d[self.concepts.index(concept)]
        others = np.delete(d, self.concepts.index(concept))
        return float((others < v).mean()) if len(others) else 1.0

    def summary(self, top: int = 10, neutral: Sequence[str] = ("", "a photo")) -> dict[str, Any]:
        """Numbers that describe the spectrum's shape, computed over the concepts that were not erased.

        ``top_mean_delta`` (the mean of the ``top`` largest deltas) measures the height of the top of
        the spectrum: a method that protects the most sensitive concepts (AP, Fig. 1b) lowers it.
        ``neutral_percentile`` places neutral concepts (if measured) in the spectrum (Fig. 2).
        """
        keep = np.array([c not in self.erased for c in self.concepts])
        d = self.delta[keep]
        names = [c for c, k in zip(self.concepts, keep, strict=True) if k]
        order = np.argsort(-d, kind="stable")
        out: dict[str, Any] = {
            "n_concepts": int(keep.sum()),
            "n_seeds": len(self.seeds),
            "mean_delta": float(d.mean()) if len(d) else float("nan"),
            "median_delta": float(np.median(d)) if len(d) else float("nan"),
            "max_delta": float(d.max()) if len(d) else float("nan"),
            "top_mean_delta": float(d[order[:top]].mean()) if len(d) else float("nan"),
            "top": top,
            "most_hurt": [names[i] for i in order[:5]],
            "least_hurt": [names[i] for i in order[::-1][:5]],
            "erased_delta": {c: float(self.delta[self.concepts.index(c)]) for c in self.erased if c in self.concepts},
            "neutral_percentile": {c: self.percentile(c) for c in neutral if c in self.concepts},
        }
        return out

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: scores, deltas, summary and the full config."""
        return {
            "label": self.label,
            "erased": self.erased,
            "concepts": self.concepts,
            "seeds": self.seeds,
            "original": self.original.tolist(),
            "edited": self.edited.tolist(),
            "delta": self.delta.tolist(),
            "summary": self.summary(),
            "config": self.config,
        }

    def save(self, path: str | Path) -> Path:
        """Write the spectrum as sorted JSON, atomically."""
        write_json_atomic(path, json_safe(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Spectrum:
        """Read a spectrum written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(
            concepts=d["concepts"],
            seeds=d["seeds"],
            original=np.array(d["original"]),
            edited=np.array(d["edited"]),
            erased=d.get("erased", []),
            label=d.get("label", ""),
            config=d.get("config", {}),
        )


def sensitivity_spectrum(
    original,
    edited,
    concepts: Iterable[str],
    scorer,
    config: SpectrumConfig | None = None,
    *,
    erased: Sequence[str] = (),
    original_scores: np.ndarray | None = None,
    label: str = "",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> Spectrum:
    """The spectrum ``delta_{c_e}(c)`` of an erasure over ``concepts`` (AP paper sec. 3.2, Figs. 1-2).

    ``original`` and ``edited`` are pipelines or :data:`ImageSource` callables (the original model
    theta and the sanitized model theta'). ``original_scores`` (C, k) from :func:`concept_scores`
    with the same concepts and config skips regenerating the original's images. ``metadata`` is
    stored in ``Spectrum.config`` (e.g. the edit's method and request).
    """
    config = config or SpectrumConfig()
    concepts = as_concept_list(concepts)
    timing: dict[str, float] = {}
    if original_scores is None:
        t = {}
        original_scores = concept_scores(
            original, concepts, scorer, config, progress=progress, desc="original", timing=t
        )
        timing.update({f"original_{k}": v for k, v in t.items()})
    original_scores = np.asarray(original_scores, dtype=np.float64)
    if original_scores.shape != (len(concepts), config.n_seeds):
        raise ValueError(
            f"`original_scores` must be (concepts, seeds) = {(len(concepts), config.n_seeds)}, got {original_scores.shape}."
        )
    t = {}
    edited_scores = concept_scores(edited, concepts, scorer, config, progress=progress, desc="edited", timing=t)
    timing.update({f"edited_{k}": v for k, v in t.items()})
    info = scorer.info() if hasattr(scorer, "info") else {"name": type(scorer).__name__}
    cfg = {"spectrum": asdict(config), "scorer": info, "timing": timing, **(metadata or {})}
    return Spectrum(concepts, config.seeds, original_scores, edited_scores, list(erased), label, cfg)


def spectrum_for_edit(
    pipe,
    edit,
    concepts: Iterable[str],
    scorer,
    config: SpectrumConfig | None = None,
    *,
    original_scores: np.ndarray | None = None,
    label: str | None = None,
    progress: bool = True,
) -> Spectrum:
    """The spectrum of an :class:`~erasekit.edit.Edit` on its base pipeline (one pipeline in memory).

    Generates the original model's images first, then applies the edit temporarily
    (:func:`edit_applied`) for the sanitized model's; ``pipe`` is unchanged afterwards. The
    spectrum's config records the edit (method, config, request, base model, tensor digest).
    """
    config = config or SpectrumConfig()
    concepts = as_concept_list(concepts)
    edit.check_base(pipe)
    base = dict(base_info(pipe))  # read before the edit is applied
    timing: dict[str, float] = {}
    if original_scores is None:
        original_scores = concept_scores(
            pipe, concepts, scorer, config, progress=progress, desc="original", timing=timing
        )
    with edit_applied(pipe, edit):
        spec = sensitivity_spectrum(
            None,
            pipe,
            concepts,
            scorer,
            config,
            erased=edit.request.erase,
            original_scores=original_scores,
            label=label if label is not None else edit.method,
            metadata={
                "edit": {
                    "method": edit.method,
                    "config": edit.config,
                    "request": asdict(edit.request),
                    "base": edit.base,
                    "digest": edit_digest(edit),
                },
                "base": base,
            },
            progress=progress,
        )
    spec.config["timing"].update({f"original_{k}": v for k, v in timing.items()})
    return spec


def run_spectra(
    pipe,
    edits: Mapping[str, Any],
    concepts: Iterable[str],
    scorer,
    config: SpectrumConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    top: int = 20,
    mark: Sequence[str] = ("", "a photo"),
    progress: bool = True,
) -> dict[str, Spectrum]:
    """Spectra of several edits of one base model (e.g. ``{"esd": ..., "ap": ...}``), sharing one
    measurement of the original model; what ``erasekit analyze spectrum`` runs.

    With ``out_dir``, writes ``spectrum-<label>.json`` per edit, ``spectrum_bars.png`` (Fig. 1),
    ``spectrum_hist.png`` (Fig. 2) and ``spectrum.html`` (the report fragment).
    """
    if not edits:
        raise ValueError("`edits` is empty: give at least one {label: Edit}.")
    config = config or SpectrumConfig()
    concepts = as_concept_list(concepts)
    first = next(iter(edits.values()))
    first.check_base(pipe)
    timing: dict[str, float] = {}
    original = concept_scores(pipe, concepts, scorer, config, progress=progress, desc="original", timing=timing)
    out: dict[str, Spectrum] = {}
    for label, edit in edits.items():
        spec = spectrum_for_edit(
            pipe, edit, concepts, scorer, config, original_scores=original, label=label, progress=progress
        )
        spec.config["timing"].update({f"original_{k}": v for k, v in timing.items()})
        out[label] = spec
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for label, spec in out.items():
            spec.save(d / f"spectrum-{_safe_name(label)}.json")
        for name, png in (
            ("spectrum_bars.png", plots.spectrum_bar_chart(out, top=top)),
            ("spectrum_hist.png", plots.spectrum_histogram(out, mark=mark)),
        ):
            with atomic_path(d / name) as tmp:
                tmp.write_bytes(png)
        write_text_atomic(d / "spectrum.html", report_sections.spectrum_section(out, top=top, mark=mark))
    return out


def _safe_name(label: str) -> str:
    """A label usable as part of a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label) or "spectrum"


__all__ = [
    "ImageSource",
    "Spectrum",
    "SpectrumConfig",
    "as_concept_list",
    "concept_scores",
    "edit_applied",
    "edit_digest",
    "json_safe",
    "pipeline_source",
    "run_spectra",
    "sensitivity_spectrum",
    "spectrum_for_edit",
]
