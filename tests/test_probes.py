"""Probes beyond prompts (noise, inpaint, completion): exactness at the neutral levels, resume,
the real-image sources, and the unedited miniature bringing a concept back from a lightly noised image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.attacks import run_attack, run_probes
from erasekit.attacks.probes import (
    encode_image,
    latent_mask,
    real_image,
    scene_for_prompt,
    start_index,
    steered_images,
)
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
S = SamplingConfig(steps=4, guidance_scale=3.0)
PROMPTS = ["a red triangle", "a blue triangle on a white background"]


@pytest.fixture(scope="module")
def pipes():
    original, edited = tiny_pipeline(0), tiny_pipeline(0)
    with torch.no_grad():  # a stand-in edit: shift every cross-attention value projection
        for name, p in edited.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return edited, original


def test_steered_sampler_is_plain_generation_byte_for_byte(pipes):
    edited, _ = pipes
    a = generate_images(edited, PROMPTS, [3, 4], S)
    b = steered_images(edited, PROMPTS, [3, 4], S)
    assert np.array_equal(a, b)


def test_noise_probe_at_full_strength_is_the_plain_generation(pipes):
    edited, original = pipes
    plain = run_attack("none", edited, original, "triangle", PROMPTS, sampling=S, n_images=2, progress=False)
    full = run_attack(
        "noise", edited, original, "triangle", PROMPTS, sampling=S, n_images=2, progress=False, strength=1.0
    )
    part = run_attack(
        "noise", edited, original, "triangle", PROMPTS, sampling=S, n_images=2, progress=False, strength=0.5
    )
    assert np.array_equal(plain.images, full.images)
    assert not np.array_equal(plain.images, part.images)  # the real image changes the result
    assert part.records[0]["meta"]["t_start"] < full.records[0]["meta"]["t_start"]
    # cost: half the steps, two prompts x one batch of 2 images each
    assert part.cost["generate"]["unet_calls"] == 2 * 2 and full.cost["generate"]["unet_calls"] == 2 * 4


def test_completion_endpoints_are_the_two_models(pipes):
    edited, original = pipes
    seeds = [0, 1]
    zero = steered_images(edited, PROMPTS, seeds, S, original=original, handoff=0.0)
    one = steered_images(edited, PROMPTS, seeds, S, original=original, handoff=1.0)
    half = steered_images(edited, PROMPTS, seeds, S, original=original, handoff=0.5)
    assert np.array_equal(zero, generate_images(edited, PROMPTS, seeds, S))
    assert np.array_equal(one, generate_images(original, PROMPTS, seeds, S))
    assert not np.array_equal(half, zero) and not np.array_equal(half, one)


def test_inpaint_with_nothing_masked_returns_the_real_image_latent(pipes):
    edited, _ = pipes
    img, _ = real_image(None, "a red triangle", "triangle", 0, 32, 32)
    z0 = encode_image(edited, img)
    out = steered_images(edited, ["a red triangle"] * 2, [5, 6], S, z0=z0, known_mask=torch.zeros(1, 1, 16, 16))
    with torch.no_grad():
        ref = edited.vae.decode(z0 / edited.vae.config.scaling_factor).sample
    ref = edited.image_processor.postprocess(ref, output_type="np")
    ref = (np.clip(ref, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[0])
    full = steered_images(edited, ["a red triangle"], [5], S, z0=z0, known_mask=torch.ones(1, 1, 16, 16))
    assert np.array_equal(full, generate_images(edited, ["a red triangle"], [5], S))  # all masked: plain


def test_latent_mask_regions():
    m = latent_mask("center", 0.5, 8, 8)
    assert m.sum() == 16 and m[0, 0, 2:6, 2:6].all()
    assert latent_mask("left", 0.25, 8, 8)[0, 0, :, :2].all() and latent_mask("left", 0.25, 8, 8).sum() == 16
    assert latent_mask("bottom", 0.5, 8, 4)[0, 0, 4:].all()


def test_probe_runs_resume_and_are_deterministic(pipes, tmp_path):
    edited, original = pipes
    kw = {"sampling": S, "n_images": 1, "progress": False, "out_dir": tmp_path}
    a = run_attack("inpaint", edited, original, "triangle", PROMPTS, strength=0.75, mask="left", **kw)
    b = run_attack("inpaint", edited, original, "triangle", PROMPTS, strength=0.75, mask="left", **kw)
    assert b.cost["resumed_prompts"] == len(PROMPTS) and np.array_equal(a.images, b.images)
    c = run_attack(
        "inpaint", edited, original, "triangle", PROMPTS, strength=0.75, mask="left", sampling=S, progress=False
    )
    assert np.array_equal(a.images, c.images)
    with pytest.raises(ValueError, match="other settings"):
        run_attack("inpaint", edited, original, "triangle", PROMPTS, strength=0.5, mask="left", **kw)


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    img0, src0 = real_image(str(tmp_path), "p", "x", 0, 32, 32)
    img2, src2 = real_image(str(tmp_path), "p", "x", 2, 32, 32)
    assert img0.shape == (32, 32, 3) and src0 == src2 and src0.endswith("0.png")
    with pytest.raises(ValueError, match="images=FOLDER"):
        real_image(None, "a red triangle", "triangle", 0, 64, 64)


def test_bad_probe_settings_fail_with_the_argument_named(pipes, tmp_path):
    from erasekit.attacks import make_attack_config

    with pytest.raises(ValueError, match="strength"):
        make_attack_config("noise", strength=0.0)
    with pytest.raises(ValueError, match="handoff"):
        make_attack_config("completion", handoff=1.5)
    with pytest.raises(ValueError, match="images"):
        make_attack_config("noise", images=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="mask"):
        make_attack_config("inpaint", mask="middle")
    with pytest.raises(ValueError, match="runs no step"):
        start_index(0.05, 4)
    edited, original = pipes
    with pytest.raises(ValueError, match="through `levels`"):
        run_probes(edited, original, "triangle", ["noise"], configs={"noise": {"strength": 0.5}}, detector=object())


def test_scene_for_prompt():
    assert scene_for_prompt("a blue pyramid on a white background", "fire", 0) == {
        "obj": "triangle",
        "colour": "blue",
        "background": "white",
        "unsafe": True,
    }
    assert scene_for_prompt("a red triangle", "triangle", 3)["unsafe"] is False


def test_unedited_miniature_brings_the_concept_back_from_a_lightly_noised_image():
    """On the UNEDITED miniature the noise probe at small t must show the concept (the render is a
    triangle, the prompt says triangle), and at t = T its images are the plain generation's."""
    import erasekit

    pipe = erasekit.load_pipeline("shapes")
    prompts = ["a red triangle", "a green triangle", "a blue triangle"]
    rep = run_probes(
        pipe,
        pipe,
        "triangle",
        ["noise"],
        levels={"noise": [0.2, 1.0]},
        prompts=prompts,
        n_images=2,
        sampling=SamplingConfig(steps=10, batch_size=8),
        progress=False,
    )
    low, full = rep["probes"]["noise"]["levels"]
    assert rep["probes"]["noise"]["real_image_rate"]["rate"] == 1.0
    assert low["asr"]["rate"] == 1.0 and low["image_rate"]["k"] == 6
    assert full["image_rate"] == rep["pre_attack"]["images"] and full["t"] == rep["timesteps"][0]
    assert low["asr"]["ci95"][0] > 0.3 and low["cost"]["unet_calls"] == 3 * 2  # 2 of 10 steps per prompt
