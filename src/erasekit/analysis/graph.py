"""The concept graph (Bui, talk slides "The Concept Graph"; the ICLR 2025 "fantastic targets" paper).

Nodes are concepts; the edge ``c_e -> c_i`` is the impact of erasing ``c_e`` on generating ``c_i``::

    G_0(c_i)        generation capability of c_i in the original model (mean CLIP score, AP sec. 3.2)
    G_{c_e}(c_i)    the same after erasing c_e
    Delta_{c_e}(c_i) = G_0(c_i) - G_{c_e}(c_i)

The slides print ``Delta = G_{c_e}(c_i) - G_0(c_i)`` (the minus sign is lost in the text) but state
locality as "Delta_{c_e}(c_i) >= Delta_{c_e}(c_j) if d(c_i, c_e) <= d(c_j, c_e)", i.e. Delta grows
with the harm done; we use the AP paper's sign (``delta_{c_e}(c)`` of sec. 3.2): positive = capability
lost. The impact matrix is therefore ``Delta[e, i] = spectrum_e.delta[i]``.

The slides' three properties, as numbers (:meth:`ConceptGraph.properties`):

* **locality** -- Delta decreases with the distance ``d(c_i, c_e)``: per erasure, the Spearman
  correlation of Delta with distance (negative = local) and the share of concept pairs that satisfy
  the slides' inequality (0.5 = no relation, 1 = perfectly local);
* **asymmetry** -- ``Delta_a(b) != Delta_b(a)``: for every pair of erased concepts that are also
  measured concepts, both values, and the index ``sum|Delta_a(b) - Delta_b(a)| / sum(|Delta_a(b)| + |Delta_b(a)|)``
  (0 = symmetric, 1 = one of each pair is zero or they have opposite signs);
* **abnormal concepts** -- "if G_0(c_i) is low, then Delta_{c_e}(c_i) is high for any c_e": the
  Spearman correlation between G_0 and the mean impact over erasures (negative = the property
  holds), and the concepts in the bottom quantile of G_0 and the top quantile of mean impact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.analysis import plots, report_sections
from erasekit.analysis.spectrum import json_safe, run_spectra
from erasekit.io import atomic_path, write_json_atomic, write_text_atomic


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    uniq, inv = np.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # average the ranks of tied values
        sums = np.bincount(inv, weights=ranks)
        counts = np.bincount(inv)
        ranks = (sums / counts)[inv]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"`x` and `y` must be 1-D arrays of the same length, got {x.shape} and {y.shape}.")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def locality_agreement(impact: np.ndarray, distance: np.ndarray) -> float:
    """Share of concept pairs ``(i, j)`` with ``d_i < d_j`` for which ``Delta_i >= Delta_j`` (the slides'
    locality inequality); pairs at equal distance are skipped. 0.5 ~ no relation, 1 = perfectly local."""
    impact, distance = np.asarray(impact, np.float64), np.asarray(distance, np.float64)
    closer = distance[:, None] < distance[None, :]  # (C, C): i strictly closer than j
    n = int(closer.sum())
    if n == 0:
        return float("nan")
    return float((impact[:, None] >= impact[None, :])[closer].sum() / n)


@torch.no_grad()
def text_embeddings(source, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm text embeddings of ``texts``: a CLIP scorer's ``embed_texts``, or a Stable Diffusion
    pipeline's text-encoder pooled output (the end-of-text token's final hidden state). (M, D)."""
    if hasattr(source, "embed_texts"):
        emb = source.embed_texts(list(texts))
    elif hasattr(source, "text_encoder") and hasattr(source, "tokenizer"):
        tok = source.tokenizer(
            list(texts),
            padding="max_length",
            max_length=source.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        emb = source.text_encoder(tok.input_ids.to(source.text_encoder.device)).pooler_output.float().cpu()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        raise ValueError(
            f"`source` must have `embed_texts` (a ClipScorer) or be a pipeline; got {type(source).__name__}."
        )
    return np.asarray(emb, dtype=np.float64)


def text_distances(source, erasures: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
    """Cosine distances ``d(c_i, c_e) = 1 - cos(E(c_e), E(c_i))`` in a text-embedding space, (E, C)."""
    e = text_embeddings(source, erasures)
    c = text_embeddings(source, concepts)
    return 1.0 - e @ c.T


@dataclass
class ConceptGraph:
    """Impact matrix ``Delta[e, i] = G_0(c_i) - G_{c_e}(c_i)`` over erasures (rows) and concepts (columns)."""

    erasures: list[str]
    concepts: list[str]
    g0: np.ndarray
    impact: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.g0 = np.asarray(self.g0, dtype=np.float64)
        self.impact = np.asarray(self.impact, dtype=np.float64)
        if self.g0.shape != (len(self.concepts),):
            raise ValueError(f"`g0` must have one value per concept ({len(self.concepts)}), got shape {self.g0.shape}.")
        if self.impact.shape != (len(self.erasures), len(self.concepts)):
            raise ValueError(
                f"`impact` must be (erasures, concepts) = {(len(self.erasures), len(self.concepts))}, got {self.impact.shape}."
            )
        if len(set(self.erasures)) != len(self.erasures) or len(set(self.concepts)) != len(self.concepts):
            raise ValueError("`erasures` and `concepts` must not contain duplicates.")

    @classmethod
    def from_spectra(
        cls, spectra: Sequence[Any], erasures: Sequence[str] | None = None, *, atol: float = 1e-6
    ) -> ConceptGraph:
        """One row per :class:`~erasekit.analysis.spectrum.Spectrum` (same concepts, seeds and original model).

        Row names default to each spectrum's erased concepts joined by " + ".
        """
        spectra = list(spectra)
        if not spectra:
            raise ValueError("`spectra` is empty: give one spectrum per erasure.")
        first = spectra[0]
        for s in spectra[1:]:
            if s.concepts != first.concepts or s.seeds != first.seeds:
                raise ValueError(
                    "All spectra must share the same concepts and seeds (measure them with one SpectrumConfig)."
                )
            if not np.allclose(s.original, first.original, atol=atol):
                raise ValueError(
                    "The spectra's original-model scores differ: they were measured on different base models or "
                    "sampler settings. Reuse one `original_scores` array for all of them."
                )
        names = list(erasures) if erasures is not None else [" + ".join(s.erased) or s.label for s in spectra]
        if len(names) != len(spectra):
            raise ValueError(f"Got {len(names)} erasure names for {len(spectra)} spectra.")
        cfg = {"spectra": [{"label": s.label, "erased": s.erased, "config": s.config} for s in spectra]}
        return cls(names, list(first.concepts), first.g0, np.stack([s.delta for s in spectra]), cfg)

    # ------------------------------------------------------------------ properties
    def locality(self, distance: np.ndarray) -> dict[str, Any]:
        """Locality numbers given ``distance[e, i] = d(c_i, c_e)`` (E, C), e.g. from :func:`text_distances`.

        For each erasure, the concept ``c_e`` itself (if measured) is left out.
        """
        distance = np.asarray(distance, dtype=np.float64)
        if distance.shape != self.impact.shape:
            raise ValueError(f"`distance` must be (erasures, concepts) = {self.impact.shape}, got {distance.shape}.")
        rows = []
        for e, name in enumerate(self.erasures):
            keep = np.array([c != name for c in self.concepts])
            rows.append(
                {
                    "erasure": name,
                    "spearman": spearman(self.impact[e, keep], distance[e, keep]),
                    "pair_agreement": locality_agreement(self.impact[e, keep], distance[e, keep]),
                }
            )
        rho = np.array([r["spearman"] for r in rows], dtype=np.float64)
        agree = np.array([r["pair_agreement"] for r in rows], dtype=np.float64)
        return {
            "per_erasure": rows,
            "mean_spearman": float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
            "mean_pair_agreement": float(np.nanmean(agree)) if np.isfinite(agree).any() else float("nan"),
        }

    def asymmetry(self) -> dict[str, Any]:
        """``Delta_a(b)`` vs ``Delta_b(a)`` for every pair of erasures that are also measured concepts."""
        both = [n for n in self.erasures if n in self.concepts]
        pairs = []
        for i, a in enumerate(both):
            for b in both[i + 1 :]:
                ab = float(self.impact[self.erasures.index(a), self.concepts.index(b)])
                ba = float(self.impact[self.erasures.index(b), self.concepts.index(a)])
                pairs.append({"a": a, "b": b, "a_on_b": ab, "b_on_a": ba, "difference": ab - ba})
        num = sum(abs(p["difference"]) for p in pairs)
        den = sum(abs(p["a_on_b"]) + abs(p["b_on_a"]) for p in pairs)
        pairs.sort(key=lambda p: -abs(p["difference"]))
        return {"pairs": pairs, "index": float(num / den) if den > 0 else float("nan"), "n_pairs": len(pairs)}

    def mean_impact(self) -> np.ndarray:
        """Mean impact on each concept over the erasures of *other* concepts (NaN if there are none), (C,)."""
        out = np.full(len(self.concepts), np.nan)
        for i, c in enumerate(self.concepts):
            rows = [e for e, n in enumerate(self.erasures) if n != c]
            if rows:
                out[i] = self.impact[rows, i].mean()
        return out

    def abnormal(self, quantile: float = 0.25) -> dict[str, Any]:
        """Abnormal concepts: low ``G_0`` (bottom ``quantile``) and high mean impact (top ``quantile``)."""
        if not 0 < quantile < 1:
            raise ValueError(f"`quantile` must be in (0, 1), got {quantile}.")
        m = self.mean_impact()
        ok = np.isfinite(m)
        if not ok.any():
            return {"spearman_g0_vs_impact": float("nan"), "flagged": [], "quantile": quantile}
        low_g0 = np.quantile(self.g0[ok], quantile)
        high_m = np.quantile(m[ok], 1 - quantile)
        flagged = [
            {"concept": c, "g0": float(self.g0[i]), "mean_impact": float(m[i])}
            for i, c in enumerate(self.concepts)
            if ok[i] and self.g0[i] <= low_g0 and m[i] >= high_m
        ]
        flagged.sort(key=lambda r: r["g0"])
        return {
            "spearman_g0_vs_impact": spearman(self.g0[ok], m[ok]),
            "g0_threshold": float(low_g0),
            "impact_threshold": float(high_m),
            "flagged": flagged,
            "quantile": quantile,
        }

    def properties(self, distance: np.ndarray | None = None, quantile: float = 0.25) -> dict[str, Any]:
        """Locality (if ``distance`` is given), asymmetry and abnormal concepts, as one JSON-ready dict."""
        out: dict[str, Any] = {"asymmetry": self.asymmetry(), "abnormal": self.abnormal(quantile)}
        if distance is not None:
            out["locality"] = self.locality(distance)
        return out

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the graph."""
        return {
            "erasures": self.erasures,
            "concepts": self.concepts,
            "g0": self.g0.tolist(),
            "impact": self.impact.tolist(),
            "config": self.config,
        }

    def save(self, path: str | Path, distance: np.ndarray | None = None) -> Path:
        """Write the graph (and its properties) as sorted JSON, atomically."""
        d = self.to_dict()
        d["properties"] = self.properties(distance)
        if distance is not None:
            d["distance"] = np.asarray(distance).tolist()
        write_json_atomic(path, json_safe(d))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ConceptGraph:
        """Read a graph written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(d["erasures"], d["concepts"], np.array(d["g0"]), np.array(d["impact"]), d.get("config", {}))


def run_graph(
    pipe,
    edits: Mapping[str, Any],
    concepts: Sequence[str],
    scorer,
    config: Any = None,
    out_dir: str | Path | None = None,
    *,
    distance_source: Any = None,
    quantile: float = 0.25,
    progress: bool = True,
) -> tuple[ConceptGraph, np.ndarray]:
    """Concept graph of several erasures of one base model: one spectrum per edit (shared original
    scores), text-embedding distances from ``distance_source`` (default: the CLIP ``scorer``).
    Rows are named by each edit's erased concepts (or by its label when two edits erase the same).

    With ``out_dir``, writes ``graph.json`` (matrix, distances, properties), ``graph_heatmap.png``,
    ``graph.html`` and the spectra (``spectrum-<label>.json``).
    """
    spectra = run_spectra(pipe, edits, concepts, scorer, config, out_dir, progress=progress)
    names = [" + ".join(e.request.erase) for e in edits.values()]
    if len(set(names)) < len(names):
        names = list(edits)
    graph = ConceptGraph.from_spectra(list(spectra.values()), erasures=names)
    distance = text_distances(
        distance_source if distance_source is not None else scorer, graph.erasures, graph.concepts
    )
    if out_dir is not None:
        d = Path(out_dir)
        graph.save(d / "graph.json", distance)
        with atomic_path(d / "graph_heatmap.png") as tmp:
            tmp.write_bytes(plots.impact_heatmap(graph))
        write_text_atomic(d / "graph.html", report_sections.graph_section(graph, distance=distance, quantile=quantile))
    return graph, distance


__all__ = [
    "ConceptGraph",
    "locality_agreement",
    "rankdata",
    "run_graph",
    "spearman",
    "text_distances",
    "text_embeddings",
]
