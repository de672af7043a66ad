"""Concept graph (slides "The Concept Graph"): properties on a hand-made impact matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.analysis import plots, report_sections
from erasekit.analysis.graph import ConceptGraph, locality_agreement, rankdata, spearman, text_distances
from erasekit.analysis.spectrum import Spectrum
from erasekit.eval.generate import SamplingConfig

ERASURES = ["a", "b"]
CONCEPTS = ["a", "b", "c", "d"]
G0 = [30.0, 28.0, 10.0, 29.0]
IMPACT = [[9.0, 5.0, 1.0, 0.0], [2.0, 8.0, 8.0, 0.0]]
DIST = [[0.0, 0.2, 0.5, 0.9], [0.1, 0.0, 0.3, 0.2]]


def graph() -> ConceptGraph:
    return ConceptGraph(ERASURES, CONCEPTS, G0, IMPACT)


def test_rankdata_and_spearman_by_hand():
    np.testing.assert_array_equal(rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks [2, 3, 1] vs [1, 3, 2]: centred [0, 1, -1] . [-1, 1, 0] = 1, norms sqrt(2) each -> 0.5
    assert spearman([2, 4, 0], [0.1, 0.3, 0.2]) == pytest.approx(0.5)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_locality_by_hand():
    loc = graph().locality(np.array(DIST))
    a, b = loc["per_erasure"]
    # erasing a, concepts b, c, d: impact 5, 1, 0 at distance 0.2, 0.5, 0.9 -> perfectly local
    assert a["spearman"] == pytest.approx(-1.0) and a["pair_agreement"] == pytest.approx(1.0)
    # erasing b, concepts a, c, d: impact 2, 8, 0 at distance 0.1, 0.3, 0.2
    # ranks [2, 3, 1] vs [1, 3, 2] -> 0.5; pairs closer-first: (a,c): 2>=8 no, (a,d): 2>=0 yes, (d,c): 0>=8 no -> 1/3
    assert b["spearman"] == pytest.approx(0.5) and b["pair_agreement"] == pytest.approx(1 / 3)
    assert loc["mean_spearman"] == pytest.approx(-0.25)
    assert loc["mean_pair_agreement"] == pytest.approx(2 / 3)


def test_locality_agreement_ignores_ties_in_distance():
    assert locality_agreement([3, 2, 1], [0.5, 0.5, 0.9]) == pytest.approx(1.0)  # pairs (0,2), (1,2) only
    assert np.isnan(locality_agreement([1, 2], [0.3, 0.3]))


def test_asymmetry_by_hand():
    asym = graph().asymmetry()
    assert asym["n_pairs"] == 1
    p = asym["pairs"][0]
    assert (p["a"], p["b"], p["a_on_b"], p["b_on_a"]) == ("a", "b", 5.0, 2.0)
    assert asym["index"] == pytest.approx(3 / 7)  # |5 - 2| / (5 + 2)
    sym = ConceptGraph(ERASURES, CONCEPTS, G0, [[9, 4, 1, 0], [4, 8, 8, 0]]).asymmetry()
    assert sym["index"] == 0.0


def test_abnormal_by_hand():
    g = graph()
    # mean impact from the *other* erasures: a <- b: 2; b <- a: 5; c: (1 + 8) / 2; d: 0
    np.testing.assert_allclose(g.mean_impact(), [2.0, 5.0, 4.5, 0.0])
    ab = g.abnormal(quantile=0.5)
    # median G0 = 28.5 -> low: b, c; median impact = 3.25 -> high: b, c
    assert [r["concept"] for r in ab["flagged"]] == ["c", "b"]
    # G0 ranks [4, 2, 1, 3], impact ranks [2, 4, 3, 1]: centred products sum to -3, norms 5 -> -0.6
    assert ab["spearman_g0_vs_impact"] == pytest.approx(-0.6)
    with pytest.raises(ValueError, match="quantile"):
        g.abnormal(quantile=1.0)


def _spectrum(edited_delta, erased, original=None) -> Spectrum:
    orig = np.tile(np.array(G0)[:, None], (1, 2)) if original is None else original
    return Spectrum(CONCEPTS, [0, 1], orig, orig - np.array(edited_delta)[:, None], erased=[erased])


def test_from_spectra_builds_the_impact_matrix():
    g = ConceptGraph.from_spectra([_spectrum(IMPACT[0], "a"), _spectrum(IMPACT[1], "b")])
    assert g.erasures == ERASURES
    np.testing.assert_allclose(g.impact, IMPACT)
    np.testing.assert_allclose(g.g0, G0)
    other = np.tile(np.array(G0)[:, None] + 1, (1, 2))
    with pytest.raises(ValueError, match="original-model scores differ"):
        ConceptGraph.from_spectra([_spectrum(IMPACT[0], "a"), _spectrum(IMPACT[1], "b", other)])


def test_validation():
    with pytest.raises(ValueError, match="impact"):
        ConceptGraph(ERASURES, CONCEPTS, G0, [[1, 2, 3]])
    with pytest.raises(ValueError, match="duplicates"):
        ConceptGraph(["a", "a"], CONCEPTS, G0, IMPACT)
    with pytest.raises(ValueError, match="distance"):
        graph().locality(np.zeros((1, 4)))


class VectorEmbedder:
    """embed_texts returns fixed unit vectors."""

    vecs = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8], "d": [-1.0, 0.0]}

    def embed_texts(self, texts):
        return torch.tensor([self.vecs[t] for t in texts])


def test_text_distances_are_one_minus_cosine():
    d = text_distances(VectorEmbedder(), ["a"], CONCEPTS)
    np.testing.assert_allclose(d, [[0.0, 1.0, 0.4, 2.0]])


def test_text_distances_from_a_pipeline(tiny_pipe):
    d = text_distances(tiny_pipe, ["circle"], ["circle", "square"])
    assert d.shape == (1, 2) and d[0, 0] == pytest.approx(0.0, abs=1e-6) and d[0, 1] > 0


def test_save_load_and_report(tmp_path):
    g = graph()
    g.save(tmp_path / "graph.json", distance=np.array(DIST))
    d = json.loads((tmp_path / "graph.json").read_text())
    assert d["properties"]["asymmetry"]["index"] == pytest.approx(3 / 7)
    assert d["properties"]["locality"]["mean_spearman"] == pytest.approx(-0.25)
    back = ConceptGraph.load(tmp_path / "graph.json")
    np.testing.assert_array_equal(back.impact, g.impact)
    png = plots.impact_heatmap(g)
    assert png[:4] == b"\x89PNG"
    html = report_sections.graph_section(g, distance=np.array(DIST), quantile=0.5)
    assert "0.43" in html and "-0.25" in html and "data:image/png;base64," in html


def test_nan_properties_are_saved_as_null(tmp_path):
    g = ConceptGraph(["x"], ["y", "z"], [1.0, 1.0], [[0.0, 0.0]])  # no pairs, constant columns
    g.save(tmp_path / "g.json")
    text = (tmp_path / "g.json").read_text()
    assert "NaN" not in text and json.loads(text)["properties"]["asymmetry"]["index"] is None


class PixelScorer:
    """Scores an image by its mean brightness."""

    def score(self, images, texts):
        return images.reshape(len(images), -1).mean(1).astype(np.float64)


def test_run_graph_writes_everything(tmp_path, tiny_pipe):
    import erasekit
    from erasekit.analysis.graph import run_graph
    from erasekit.analysis.spectrum import SpectrumConfig

    edits = {
        "uce-circle": erasekit.erase(tiny_pipe, erasekit.EraseRequest(["circle"]), method="uce", progress=False),
        "uce-square": erasekit.erase(tiny_pipe, erasekit.EraseRequest(["square"]), method="uce", progress=False),
    }
    cfg = SpectrumConfig(n_seeds=1, sampling=SamplingConfig(steps=2))
    g, dist = run_graph(
        tiny_pipe,
        edits,
        ["circle", "square", "dog"],
        PixelScorer(),
        cfg,
        tmp_path,
        distance_source=tiny_pipe,
        progress=False,
    )
    assert g.erasures == ["circle", "square"] and dist.shape == (2, 3)
    for f in (
        "graph.json",
        "graph_heatmap.png",
        "graph.html",
        "spectrum-uce-circle.json",
        "spectrum_bars.png",
        "spectrum.html",
    ):
        assert (tmp_path / f).stat().st_size > 0, f
    saved = json.loads((tmp_path / "graph.json").read_text())
    assert saved["properties"]["asymmetry"]["n_pairs"] == 1 and "locality" in saved["properties"]
