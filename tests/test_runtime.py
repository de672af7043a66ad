"""Memory/speed switches on CPU: dtype, attention implementation, scheduler."""

import numpy as np
import pytest
import torch

from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.eval.runtime import configure_pipeline, parse_dtype, runtime_info

CFG = SamplingConfig(steps=2, guidance_scale=4.0, batch_size=2)


@pytest.fixture(scope="module")
def base():
    from erasekit.testing import tiny_pipeline

    return tiny_pipeline(0)


@pytest.fixture
def tiny_pipe(base):
    """A private copy of the module's pipeline (these tests change dtypes and processors)."""
    import copy

    from diffusers import StableDiffusionPipeline

    parts = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in base.components.items()}
    parts["scheduler"] = copy.deepcopy(base.scheduler)
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_parse_dtype():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype(None) is None and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")


def test_bf16_on_cpu_runs_and_stays_close(tiny_pipe):
    ref = generate_images(tiny_pipe, ["a cat", "a dog"], [0, 1], CFG)
    configure_pipeline(tiny_pipe, dtype="bf16", device="cpu")
    assert tiny_pipe.unet.dtype == tiny_pipe.vae.dtype == tiny_pipe.text_encoder.dtype == torch.bfloat16
    out = generate_images(tiny_pipe, ["a cat", "a dog"], [0, 1], CFG)
    assert out.dtype == np.uint8 and out.shape == ref.shape
    assert np.abs(out.astype(int) - ref).mean() < 8  # a few grey levels of rounding, not another image
    assert runtime_info(tiny_pipe)["dtype"] == "bfloat16"


def test_attention_switches_keep_the_images(tiny_pipe):
    ref = generate_images(tiny_pipe, ["a cat"], [0], CFG)
    configure_pipeline(tiny_pipe, sdpa=False)
    assert runtime_info(tiny_pipe)["attention"] == ["AttnProcessor"]
    plain = generate_images(tiny_pipe, ["a cat"], [0], CFG)
    configure_pipeline(tiny_pipe, attention_slicing=True, vae_slicing=True)
    assert runtime_info(tiny_pipe)["attention"] == ["SlicedAttnProcessor"]
    sliced = generate_images(tiny_pipe, ["a cat"], [0], CFG)
    configure_pipeline(tiny_pipe, sdpa=True)
    assert runtime_info(tiny_pipe)["attention"] == ["AttnProcessor2_0"]
    assert np.abs(plain.astype(int) - ref).max() <= 1 and np.abs(sliced.astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="not both"):
        configure_pipeline(tiny_pipe, attention_slicing=True, sdpa=True)
    with pytest.raises(ValueError, match="slice size"):
        configure_pipeline(tiny_pipe, attention_slicing=0)


def test_scheduler_switch_is_deterministic(tiny_pipe):
    configure_pipeline(tiny_pipe, scheduler="pndm")
    assert runtime_info(tiny_pipe)["scheduler"] == "PNDMScheduler"
    a = generate_images(tiny_pipe, ["a cat"], [3], CFG)
    b = generate_images(tiny_pipe, ["a cat"], [3], CFG)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="scheduler"):
        configure_pipeline(tiny_pipe, scheduler="euler")


def test_lms_needs_scipy(tiny_pipe):
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:
        configure_pipeline(tiny_pipe, scheduler="lms")
        assert runtime_info(tiny_pipe)["scheduler"] == "LMSDiscreteScheduler"
    else:
        with pytest.raises(ImportError, match="scipy"):
            configure_pipeline(tiny_pipe, scheduler="lms")


def test_cuda_device_without_cuda_is_a_clear_error(tiny_pipe):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        configure_pipeline(tiny_pipe, device="cuda")
