"""Model-difference inspection (slides eq. 19) against a brute-force computation on a tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import erasekit
from erasekit.analysis import report_sections
from erasekit.analysis.diff import (
    DiffConfig,
    DiffResult,
    _Model,
    diff_images,
    edited_copy,
    inspect_difference,
    sample_latents,
)
from erasekit.edit import get_parameter
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.pipeline import encode_prompts, eps

SPACE = ["circle", "square", "dog"]


@pytest.fixture
def edit(tiny_pipe):
    return erasekit.erase(tiny_pipe, erasekit.EraseRequest(["circle"]), method="uce", progress=False)


def test_objective_matches_brute_force(tiny_pipe, edit):
    cfg = DiffConfig(lam=0.7, n_samples=2, ddim_steps=2, batch_size=2)
    res = inspect_difference(tiny_pipe, edit, SPACE, cfg, progress=False)
    assert res.config["diff"]["changed"] == "circle"  # defaults to the edit's erased concept
    # Brute force: a second, edited pipeline called with plain UNet calls; eq. 19 term by term.
    other = edited_copy(tiny_pipe, edit)
    total = res.config["ddim_steps"]
    l1 = {c: [] for c in SPACE}
    l2 = {c: [] for c in SPACE}
    with torch.no_grad():
        for smp in res.config["samples"]:
            z, t = sample_latents(
                _Model(tiny_pipe), encode_prompts(tiny_pipe, ["circle"]), smp["seed"], smp["ddim_step"], total, 3.0
            )
            assert int(t[0]) == smp["t"]
            e_ce = eps(other.unet, z, t, encode_prompts(other, ["circle"]))
            for c in SPACE:
                e_o = eps(tiny_pipe.unet, z, t, encode_prompts(tiny_pipe, [c]))
                e_e = eps(other.unet, z, t, encode_prompts(other, [c]))
                l1[c].append(((e_ce - e_o) ** 2).mean().item())
                l2[c].append(((e_e - e_o) ** 2).mean().item())
    by = {e.concept: e for e in res.entries}
    for c in SPACE:
        assert by[c].l1 == pytest.approx(np.mean(l1[c]), rel=1e-4, abs=1e-9)
        assert by[c].l2 == pytest.approx(np.mean(l2[c]), rel=1e-4, abs=1e-9)
        assert by[c].objective == pytest.approx(np.mean(l1[c]) + 0.7 * np.mean(l2[c]), rel=1e-4)
    assert [e.objective for e in res.entries] == sorted((e.objective for e in res.entries), reverse=True)
    assert by["circle"].is_changed and not by["dog"].is_changed


def test_edit_and_pipeline_give_the_same_result_and_nothing_is_written(tiny_pipe, edit):
    name = next(iter(edit.tensors))
    before = get_parameter(tiny_pipe, name).detach().clone()
    cfg = DiffConfig(n_samples=1, ddim_steps=2)
    a = inspect_difference(tiny_pipe, edit, SPACE, cfg, progress=False)
    torch.testing.assert_close(get_parameter(tiny_pipe, name), before, atol=0, rtol=0)
    b = inspect_difference(
        tiny_pipe,
        edited_copy(tiny_pipe, edit),
        SPACE,
        DiffConfig(n_samples=1, ddim_steps=2, changed="circle"),
        progress=False,
    )
    for x, y in zip(a.entries, b.entries, strict=True):
        assert x.concept == y.concept
        assert x.objective == pytest.approx(y.objective, rel=1e-5)


def test_identical_models_have_zero_change(tiny_pipe):
    res = inspect_difference(tiny_pipe, tiny_pipe, SPACE, DiffConfig(n_samples=1, ddim_steps=2), progress=False)
    assert all(e.l2 == 0.0 and e.l1 is None for e in res.entries)
    with pytest.raises(ValueError, match="lam"):
        inspect_difference(tiny_pipe, tiny_pipe, SPACE, DiffConfig(lam=0.0), progress=False)


def test_lambda_extremes_rank_by_one_term(tiny_pipe, edit):
    """lambda -> infinity ranks by L2 (change of c_t); lambda = 0 ranks by L1 (distance from eps'(c_e))."""
    res = inspect_difference(tiny_pipe, edit, SPACE, DiffConfig(n_samples=1, ddim_steps=2), progress=False)
    by_l2 = [e.concept for e in sorted(res.entries, key=lambda e: -e.l2)]
    by_l1 = [e.concept for e in sorted(res.entries, key=lambda e: -e.l1)]
    assert [e.concept for e in res.rerank(1e12).entries] == by_l2
    assert [e.concept for e in res.rerank(0.0).entries] == by_l1
    assert len({e.l2 for e in res.entries}) == len(SPACE)  # the terms differ, so the orders are meaningful


def test_rerank_equals_a_fresh_search(tiny_pipe, edit):
    base = DiffConfig(lam=1.0, n_samples=1, ddim_steps=2)
    res = inspect_difference(tiny_pipe, edit, SPACE, base, progress=False)
    fresh = inspect_difference(tiny_pipe, edit, SPACE, DiffConfig(lam=0.0, n_samples=1, ddim_steps=2), progress=False)
    re = res.rerank(0.0)
    assert [e.concept for e in re.entries] == [e.concept for e in fresh.entries]
    for x, y in zip(re.entries, fresh.entries, strict=True):
        assert x.objective == pytest.approx(y.objective, rel=1e-6)
    assert re.config["diff"]["lam"] == 0.0


def test_concept_latents_mode_runs_and_is_deterministic(tiny_pipe, edit):
    cfg = DiffConfig(n_samples=1, ddim_steps=2, latents="concept")
    a = inspect_difference(tiny_pipe, edit, SPACE, cfg, progress=False)
    b = inspect_difference(tiny_pipe, edit, SPACE, cfg, progress=False)
    assert [e.objective for e in a.entries] == [e.objective for e in b.entries]


def test_sample_latents_with_zero_steps_is_the_seed_noise(tiny_pipe):
    m = _Model(tiny_pipe)
    z, t = sample_latents(
        m, encode_prompts(tiny_pipe, ["a", "b"]), seed=5, n_steps=0, total_steps=4, guidance_scale=3.0
    )
    cfg = tiny_pipe.unet.config
    ref = torch.randn(
        (1, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(z, ref.expand(2, -1, -1, -1))
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(4)
    assert t.tolist() == [int(sched.timesteps[0])] * 2


def test_save_load_and_config_validation(tmp_path, tiny_pipe, edit):
    res = inspect_difference(tiny_pipe, edit, SPACE, DiffConfig(n_samples=1, ddim_steps=2), progress=False)
    res.save(tmp_path / "diff.json")
    back = DiffResult.load(tmp_path / "diff.json")
    assert [e.concept for e in back.entries] == [e.concept for e in res.entries]
    assert back.config["edit"]["method"] == "uce"
    with pytest.raises(ValueError, match="latents"):
        DiffConfig(latents="noise")
    with pytest.raises(ValueError, match="lam"):
        DiffConfig(lam=-1)
    with pytest.raises(ValueError, match="Edit or a Stable Diffusion pipeline"):
        inspect_difference(tiny_pipe, "nope", SPACE)


def test_diff_images_and_report(tiny_pipe, edit):
    sampling = SamplingConfig(steps=2, guidance_scale=3.0)
    imgs = diff_images(tiny_pipe, edit, ["circle", "dog"], seeds=[0, 1], sampling=sampling)
    assert imgs["circle"]["original"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(imgs["dog"]["original"], generate_images(tiny_pipe, ["dog", "dog"], [0, 1], sampling))
    other = edited_copy(tiny_pipe, edit)
    np.testing.assert_array_equal(
        imgs["circle"]["edited"], generate_images(other, ["circle", "circle"], [0, 1], sampling)
    )
    res = inspect_difference(tiny_pipe, edit, SPACE, DiffConfig(n_samples=1, ddim_steps=2), progress=False)
    html = report_sections.diff_section(res, top=3, images=imgs)
    assert html.count("data:image/png;base64,") == 1 + 2  # ranking chart + one strip per concept
    assert "(c_e)" in html


def test_run_diff_writes_json_png_and_html(tmp_path, tiny_pipe, edit):
    import json

    from erasekit.analysis.diff import run_diff

    res = run_diff(
        tiny_pipe,
        edit,
        SPACE,
        DiffConfig(n_samples=1, ddim_steps=2),
        tmp_path,
        top=2,
        image_seeds=[0],
        sampling=SamplingConfig(steps=2),
        progress=False,
    )
    assert json.loads((tmp_path / "diff.json").read_text())["entries"][0]["concept"] == res.entries[0].concept
    assert (tmp_path / "diff.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "diff.html").read_text().count("data:image/png;base64,") == 1 + 2
