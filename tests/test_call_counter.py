"""CallCounter (erasekit.attacks.base): the attack cost accounting on every model family (issue 17).

A plain generation of B prompts with S sampler steps and guidance makes, per batch, S denoiser calls
of 2 x (batch) rows (CFG batched), the text-encoder calls of the family's ``encode_prompt`` and one
VAE decode; the counter must see all of them on SD 1.x (UNet, one CLIP), SDXL (UNet, two CLIPs, zero
negative embeddings: ``force_zeros_for_empty_prompt``) and SD3 (transformer, two CLIPs, no T5,
the empty negative prompt encoded by both CLIPs), and leave the pipeline exactly as it was.
"""

import numpy as np
import pytest
import torch

from erasekit.attacks import run_attack
from erasekit.attacks.base import CallCounter
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.families import family_of
from erasekit.testing import tiny_family_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sd1", "sdxl", "sd3")
PROMPTS = ["a red triangle", "a blue square", "a circle"]  # B = 3
STEPS = 2  # S

# Text-encoder calls of one guided batch, per encoder: (prompt, negative prompt) encodings.
GUIDED_TEXT_CALLS = {
    "sd1": {"text_encoder": 2},  # the prompts, then [""] * B
    "sdxl": {"text_encoder": 1, "text_encoder_2": 1},  # negatives are zeros (force_zeros_for_empty_prompt)
    "sd3": {"text_encoder": 2, "text_encoder_2": 2},  # both CLIPs read prompt and "", T5 is None
}
DENOISER = {"sd1": "unet", "sdxl": "unet", "sd3": "transformer"}


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per family, built once for the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {f: tiny_family_pipeline(f) for f in FAMILIES}
    torch.set_num_threads(n)
    return out


def _generate(pipe, batch_size: int, guidance: float) -> np.ndarray:
    cfg = SamplingConfig(steps=STEPS, guidance_scale=guidance, batch_size=batch_size, height=32, width=32)
    return generate_images(pipe, PROMPTS, list(range(len(PROMPTS))), cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_generation_counts_every_component(pipes, family):
    pipe = pipes[family]
    b, s = len(PROMPTS), STEPS
    with CallCounter(pipe) as c:
        imgs = _generate(pipe, batch_size=b, guidance=3.0)  # one batch of B prompts
    assert imgs.shape[0] == b
    text = GUIDED_TEXT_CALLS[family]
    assert c.counts() == {
        "unet_calls": s,  # the denoiser, a UNet or SD3's transformer: one CFG-batched call per step
        "unet_items": 2 * b * s,
        "text_encoder_calls": sum(text.values()),
        "vae_calls": 1,  # vae.decode, which the module's forward hook never saw
    }
    assert c.by_component() == {DENOISER[family]: s, **text, "vae.encode": 0, "vae.decode": 1}
    if family == "sd3":
        assert pipe.text_encoder_3 is None  # absent: neither counted nor an error


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_scale_with_batches_and_guidance(pipes, family):
    pipe = pipes[family]
    b, s = len(PROMPTS), STEPS
    with CallCounter(pipe) as c:
        _generate(pipe, batch_size=2, guidance=3.0)  # batches of 2 and 1
    text = GUIDED_TEXT_CALLS[family]
    assert c.counts() == {
        "unet_calls": 2 * s,
        "unet_items": 2 * b * s,
        "text_encoder_calls": 2 * sum(text.values()),
        "vae_calls": 2,
    }
    assert c.by_component() == {
        DENOISER[family]: 2 * s,
        **{k: 2 * v for k, v in text.items()},
        "vae.encode": 0,
        "vae.decode": 2,
    }
    with CallCounter(pipe) as c:
        _generate(pipe, batch_size=b, guidance=1.0)  # no guidance: B rows per call, no negative prompt
    assert c.counts()["unet_calls"] == s and c.counts()["unet_items"] == b * s
    encoders = [n for n in family_of(pipe).text_encoder_names if getattr(pipe, n, None) is not None]
    assert {k: v for k, v in c.by_component().items() if k.startswith("text_encoder")} == {n: 1 for n in encoders}


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_encode_is_counted(pipes, family):
    pipe = pipes[family]
    images = torch.zeros(2, 3, 32, 32)
    with CallCounter(pipe) as c:
        family_of(pipe).image_latents(pipe, images)
    assert c.counts() == {"unet_calls": 0, "unet_items": 0, "text_encoder_calls": 0, "vae_calls": 1}
    assert c.by_component()["vae.encode"] == 1 and c.by_component()["vae.decode"] == 0


def _state(pipe):
    vae = pipe.vae
    modules = [family_of(pipe).denoiser(pipe), vae] + [
        getattr(pipe, n) for n in family_of(pipe).text_encoder_names if getattr(pipe, n, None) is not None
    ]
    return (
        {k: vae.__dict__.get(k, "absent") for k in ("encode", "decode", "forward")},
        [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pipeline_is_restored_after_the_block(pipes, family):
    pipe = pipes[family]
    vae = pipe.vae
    before = _state(pipe)
    decode, encode = vae.decode, vae.encode
    assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__
    with CallCounter(pipe):
        assert "decode" in vae.__dict__ and vae.decode != decode  # the counting wrapper is in place
    assert _state(pipe) == before
    assert vae.decode == decode and vae.encode == encode  # the class's bound methods again
    assert vae.decode.__func__ is type(vae).decode

    with pytest.raises(RuntimeError, match="boom"), CallCounter(pipe):  # restored on error too
        raise RuntimeError("boom")
    assert _state(pipe) == before and vae.decode == decode


def test_an_instance_method_already_set_is_put_back_exactly(pipes):
    pipe = pipes["sd1"]
    vae = pipe.vae
    seen = []

    def own_decode(*args, **kwargs):  # e.g. another tool's wrapper, set on the instance
        seen.append(1)
        return type(vae).decode(vae, *args, **kwargs)

    vae.decode = own_decode
    try:
        with CallCounter(pipe) as outer:
            with CallCounter(pipe) as inner:  # nested counters: both count, each restores its own
                _generate(pipe, batch_size=3, guidance=3.0)
            assert vae.__dict__["decode"] is not own_decode  # the outer counter's wrapper is back
        assert vae.__dict__["decode"] is own_decode
        assert seen == [1]  # the wrappers delegated to it, once
        assert inner.counts() == outer.counts() and outer.counts()["vae_calls"] == 1
    finally:
        del vae.decode
    assert "decode" not in vae.__dict__


def test_a_module_shared_by_two_pipelines_is_counted_once(pipes):
    pipe = pipes["sd1"]
    with CallCounter(pipe, pipe) as c:
        _generate(pipe, batch_size=3, guidance=3.0)
    assert c.counts() == {"unet_calls": STEPS, "unet_items": 2 * 3 * STEPS, "text_encoder_calls": 2, "vae_calls": 1}


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_attack_cost_records_the_denoiser_and_vae(pipes, family):
    """The driver's cost of the plain prompts on a non-SD1 family: no longer zero denoiser/VAE calls."""
    pipe = pipes[family]
    res = run_attack(
        "none",
        pipe,
        pipe,
        "triangle",
        ["a red triangle"],
        sampling=SamplingConfig(steps=STEPS, guidance_scale=3.0),
        progress=False,
    )
    gen = res.cost["generate"]
    text = GUIDED_TEXT_CALLS[family]
    assert gen["unet_calls"] == STEPS and gen["unet_items"] == 2 * STEPS
    assert gen["text_encoder_calls"] == sum(text.values()) and gen["vae_calls"] == 1
