"""Sensitivity spectrum (AP paper sec. 3.2): delta against hand computations, edits, plots, report."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import erasekit
from erasekit.analysis import plots, report_sections
from erasekit.analysis.spectrum import (
    Spectrum,
    SpectrumConfig,
    concept_scores,
    edit_applied,
    sensitivity_spectrum,
    spectrum_for_edit,
)
from erasekit.edit import Edit, get_parameter
from erasekit.eval.generate import SamplingConfig

CONCEPTS = ["a", "bb", "ccc"]


class Recorder:
    """Stub image source: image pixels = ``value(prompt, seed)``; records the prompts it was asked for."""

    def __init__(self, value):
        self.value, self.prompts = value, []

    def __call__(self, prompts, seeds):
        self.prompts += list(prompts)
        return np.stack([np.full((4, 4, 3), self.value(p, s), np.uint8) for p, s in zip(prompts, seeds, strict=True)])


class MeanScorer:
    """Stub scorer: S(image, text) = mean pixel value + len(text); records the texts."""

    def __init__(self):
        self.texts = []

    def score(self, images, texts):
        self.texts += list(texts)
        return images.reshape(len(images), -1).mean(1).astype(np.float64) + np.array([len(t) for t in texts])


def test_delta_by_hand():
    # original: pixel 10 + s; edited: "a" -> s (delta 10), "bb" -> 2s (delta 10 - mean s), "ccc" -> 10 + s (delta 0)
    orig = Recorder(lambda p, s: 10 + s)
    edit = Recorder(lambda p, s: {"a": s, "bb": 2 * s, "ccc": 10 + s}[p])
    scorer = MeanScorer()
    cfg = SpectrumConfig(n_seeds=4, sampling=SamplingConfig(batch_size=3))
    spec = sensitivity_spectrum(orig, edit, CONCEPTS, scorer, cfg, erased=["a"])
    np.testing.assert_allclose(spec.delta, [10.0, 8.5, 0.0])
    # differences of "bb" over seeds 0..3: 10, 9, 8, 7 -> sample std 1.29099 / sqrt(4)
    np.testing.assert_allclose(spec.stderr, [0.0, np.std([10, 9, 8, 7], ddof=1) / 2, 0.0])
    np.testing.assert_allclose(spec.original[1], [12 + s for s in range(4)])  # 10 + s + len("bb")
    assert [r["concept"] for r in spec.ranked()] == ["a", "bb", "ccc"]
    assert spec.ranked()[0]["erased"] is True
    sm = spec.summary(top=1)
    assert sm["top_mean_delta"] == pytest.approx(8.5)  # erased "a" is left out
    assert sm["most_hurt"][0] == "bb" and sm["erased_delta"] == {"a": 10.0}
    assert spec.percentile("a") == 1.0 and spec.percentile("ccc") == 0.0


def test_templates_reach_generator_and_scorer():
    orig, edit, scorer = Recorder(lambda p, s: 1), Recorder(lambda p, s: 1), MeanScorer()
    cfg = SpectrumConfig(n_seeds=2, prompt_template="a photo of {}", score_template="{}")
    sensitivity_spectrum(orig, edit, ["cat"], scorer, cfg)
    assert orig.prompts == ["a photo of cat"] * 2 and edit.prompts == ["a photo of cat"] * 2
    assert scorer.texts == ["cat"] * 4


def test_original_scores_are_reused_and_checked():
    orig = Recorder(lambda p, s: 5)
    cfg = SpectrumConfig(n_seeds=2)
    pre = concept_scores(orig, CONCEPTS, MeanScorer(), cfg, progress=False)
    n = len(orig.prompts)
    spec = sensitivity_spectrum(orig, Recorder(lambda p, s: 5), CONCEPTS, MeanScorer(), cfg, original_scores=pre)
    assert len(orig.prompts) == n  # the original model was not asked again
    np.testing.assert_allclose(spec.delta, 0.0)
    with pytest.raises(ValueError, match="original_scores"):
        sensitivity_spectrum(orig, orig, CONCEPTS, MeanScorer(), cfg, original_scores=pre[:2])


def test_save_load_roundtrip(tmp_path):
    spec = sensitivity_spectrum(
        Recorder(lambda p, s: 9),
        Recorder(lambda p, s: s),
        CONCEPTS,
        MeanScorer(),
        SpectrumConfig(n_seeds=3),
        erased=["a"],
        label="x",
    )
    spec.save(tmp_path / "spectrum.json")
    d = json.loads((tmp_path / "spectrum.json").read_text())
    assert d["config"]["spectrum"]["n_seeds"] == 3 and d["delta"] == pytest.approx(spec.delta.tolist())
    back = Spectrum.load(tmp_path / "spectrum.json")
    np.testing.assert_array_equal(back.delta, spec.delta)
    assert back.erased == ["a"] and back.label == "x" and back.concepts == CONCEPTS


def test_config_and_input_validation():
    with pytest.raises(ValueError, match="prompt_template"):
        SpectrumConfig(prompt_template="no slot")
    with pytest.raises(ValueError, match="n_seeds"):
        SpectrumConfig(n_seeds=0)
    with pytest.raises(ValueError, match="batch_size"):  # the sampler's own checks
        SpectrumConfig(sampling={"batch_size": 0})
    with pytest.raises(ValueError, match="sampling"):
        SpectrumConfig(sampling=3)
    # composed: a saved config (asdict) builds the same config again
    cfg = SpectrumConfig(n_seeds=2, sampling=SamplingConfig(steps=3, batch_size=4))
    assert SpectrumConfig(**asdict(cfg)) == cfg and asdict(cfg)["sampling"]["steps"] == 3
    with pytest.raises(ValueError, match="single string"):
        concept_scores(Recorder(lambda p, s: 0), "cat", MeanScorer())
    with pytest.raises(ValueError, match="empty"):
        concept_scores(Recorder(lambda p, s: 0), [], MeanScorer())
    with pytest.raises(ValueError, match="concepts, seeds"):
        Spectrum(["a"], [0, 1], np.zeros((1, 2)), np.zeros((2, 2)))


class PixelScorer:
    """Scores an image by its mean brightness (sensitive to any change of the image)."""

    def score(self, images, texts):
        return images.reshape(len(images), -1).mean(1).astype(np.float64)


def test_spectrum_of_a_real_edit_on_a_tiny_pipeline(tiny_pipe):
    edit = erasekit.erase(tiny_pipe, erasekit.EraseRequest(["circle"]), method="uce", progress=False)
    name = next(iter(edit.tensors))
    before = get_parameter(tiny_pipe, name).detach().clone()
    cfg = SpectrumConfig(n_seeds=2, sampling=SamplingConfig(steps=2, guidance_scale=3.0))
    spec = spectrum_for_edit(tiny_pipe, edit, ["circle", "square"], PixelScorer(), cfg, progress=False)
    torch.testing.assert_close(get_parameter(tiny_pipe, name), before, atol=0, rtol=0)  # pipe restored
    assert spec.erased == ["circle"] and spec.config["edit"]["method"] == "uce"
    assert np.abs(spec.delta).max() > 0  # the edit changed the images
    # the original scores are exactly the unedited pipeline's
    np.testing.assert_array_equal(
        spec.original, concept_scores(tiny_pipe, ["circle", "square"], PixelScorer(), cfg, progress=False)
    )
    # with the edit applied by hand, the edited scores are reproduced
    edit.apply_(tiny_pipe)
    np.testing.assert_array_equal(
        spec.edited, concept_scores(tiny_pipe, ["circle", "square"], PixelScorer(), cfg, progress=False)
    )


def test_identity_edit_gives_a_zero_spectrum(tiny_pipe):
    edit0 = erasekit.erase(tiny_pipe, erasekit.EraseRequest(["circle"]), method="uce", progress=False)
    same = {n: get_parameter(tiny_pipe, n).detach().clone() for n in edit0.tensors}
    identity = Edit(same, "identity", {}, edit0.request, edit0.base)
    spec = spectrum_for_edit(
        tiny_pipe,
        identity,
        ["circle", ""],
        PixelScorer(),
        SpectrumConfig(n_seeds=2, sampling=SamplingConfig(steps=2)),
        progress=False,
    )
    np.testing.assert_array_equal(spec.delta, [0.0, 0.0])


def test_edit_applied_restores_after_an_error(tiny_pipe):
    edit = erasekit.erase(tiny_pipe, erasekit.EraseRequest(["circle"]), method="uce", progress=False)
    name = next(iter(edit.tensors))
    before = get_parameter(tiny_pipe, name).detach().clone()
    with pytest.raises(RuntimeError), edit_applied(tiny_pipe, edit):
        assert not torch.equal(get_parameter(tiny_pipe, name), before)
        raise RuntimeError
    torch.testing.assert_close(get_parameter(tiny_pipe, name), before, atol=0, rtol=0)


def _two_spectra() -> dict[str, Spectrum]:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)] + ["", "a photo"]
    orig = rng.uniform(20, 30, (len(words), 3))
    return {
        "esd": Spectrum(words, [0, 1, 2], orig, orig - rng.uniform(0, 5, orig.shape), erased=["w0"], label="esd"),
        "ap": Spectrum(words, [0, 1, 2], orig, orig - rng.uniform(0, 2, orig.shape), erased=["w0"], label="ap"),
    }


def test_plots_are_png():
    specs = _two_spectra()
    for png in (
        plots.spectrum_bar_chart(specs, top=10),
        plots.spectrum_bar_chart(specs["esd"], concepts=["w3", "", "a photo"]),
        plots.spectrum_histogram(specs, mark=["", "a photo"]),
        plots.locality_scatter(specs["esd"].delta, np.linspace(0, 1, 32), specs["esd"].concepts),
    ):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert plots.spectrum_histogram(specs) == plots.spectrum_histogram(specs)  # deterministic bytes


def test_spectrum_section_html():
    html = report_sections.spectrum_section(_two_spectra(), top=8)
    assert html.count("data:image/png;base64,") == 2
    assert "top-8 mean δ" in html and "esd" in html and "ap" in html
    assert "<script" not in html


def test_method_trace_section(tmp_path):
    log = [
        {"step": i, "erase": ["circle"], "adversarial": c}
        for i, c in enumerate(["square", "square", "ring", "<b>", "ring"])
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    html = report_sections.method_trace_section(log=tmp_path)
    assert "&lt;b&gt;" in html and "<b>" not in html  # escaped
    assert html.count("<tr>") == 1 + 4  # header + 4 runs: square(0-1), ring, <b>, ring
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    html2 = report_sections.method_trace_section(epoch_images={"epoch 1": imgs, "epoch 2": imgs})
    assert html2.count("data:image/png;base64,") == 1
    with pytest.raises(ValueError, match="key"):
        report_sections.method_trace_section(log=[{"step": 0, "loss": 1.0}])
