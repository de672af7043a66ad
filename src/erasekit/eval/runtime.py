"""Memory and speed switches for sampling: dtype, device, attention implementation.

Stable Diffusion 1.4 at 512x512 needs about 2.6 GB of weights in float32 and 1.3 GB in float16.
What a GPU user turns on, and what it costs:

* ``dtype="float16"`` (or ``"bfloat16"``): half the memory and, on tensor-core GPUs, about twice the
  speed. Images change by a few grey levels against float32, so compare an erased model with its
  original at the **same** dtype. bfloat16 also runs on CPU (slowly); float16 on CPU is slower still.
* ``sdpa=True``: PyTorch's fused ``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``),
  the diffusers default on torch 2; ``sdpa=False`` selects the plain matmul-softmax processor.
* ``attention_slicing``: compute attention one slice of heads at a time (``True`` = diffusers'
  ``"auto"``, half the heads; an int = that slice size; ``"max"`` = one head at a time). Lowers
  peak memory, costs speed, and replaces the SDPA processor.
* ``scheduler``: swap the sampler, keeping the checkpoint's noise schedule: ``"ddim"``, ``"pndm"``
  (SD 1.x's default) or ``"lms"`` (what ESD's ``generate-images.py`` used for the AP/RECE numbers,
  100 steps; needs scipy). All three are deterministic, so images still depend only on (prompt, seed).
* the batch size is :class:`erasekit.eval.generate.SamplingConfig`'s ``batch_size``.

Setting an attention processor replaces whatever processors were installed before (e.g. an
inspection hook), so call :func:`configure_pipeline` first.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from erasekit.pipeline import denoiser

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"float16"``/``torch.float16`` -> ``torch.float16`` (and so on); ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ValueError(f"`dtype` {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"`dtype` {dtype!r} is not one of {sorted(set(DTYPES))}.")
    return DTYPES[key]


def default_device(device: str | None = None) -> str:
    """``device``, or the one default of every command and job: ``"cuda"`` when a GPU is available, else ``"cpu"``."""
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' 'modules that should be kept in float32: []' notice while casting."""
    log = logging.getLogger("diffusers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def configure_pipeline(
    pipe,
    dtype: str | torch.dtype | None = None,
    attention_slicing: bool | int | Literal["auto", "max"] = False,
    device: str | torch.device | None = None,
    *,
    sdpa: bool | None = None,
    vae_slicing: bool = False,
    scheduler: Literal["ddim", "pndm", "lms"] | None = None,
):
    """Move ``pipe`` to ``device`` / ``dtype`` and pick its attention implementation, in place.

    ``None`` / ``False`` leave the corresponding setting as it is. Returns ``pipe``. See the module
    docstring for what each switch trades.
    """
    dt = parse_dtype(dtype)
    new_scheduler = make_scheduler(scheduler, pipe.scheduler.config) if scheduler is not None else None
    if attention_slicing is not False and sdpa:
        raise ValueError("`attention_slicing` replaces the SDPA processor; pass one of them, not both.")
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device` {str(device)!r} asked for, but CUDA is not available here; use --device cpu.")
    with _quiet_diffusers():
        if dt is not None:
            pipe.to(dtype=dt)
        if device is not None:
            pipe.to(device)
    if sdpa is not None:
        proc_cls = AttnProcessor2_0 if sdpa else AttnProcessor
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "set_attn_processor"):
                module.set_attn_processor(proc_cls())
    if attention_slicing is not False:
        if attention_slicing is True:
            attention_slicing = "auto"
        if isinstance(attention_slicing, int) and attention_slicing < 1:
            raise ValueError(
                f"`attention_slicing` must be True, 'auto', 'max' or a slice size >= 1, got {attention_slicing}."
            )
        pipe.enable_attention_slicing(attention_slicing)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if new_scheduler is not None:
        pipe.scheduler = new_scheduler
    return pipe


def make_scheduler(name: str, config: Any):
    """A deterministic diffusers scheduler ``name`` built from a checkpoint's scheduler ``config``."""

    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "lms": LMSDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"`scheduler` must be one of {sorted(classes)}, got {name!r}.")
    if name == "lms":
        if importlib.util.find_spec("scipy") is None:
            raise ImportError("The LMS scheduler needs scipy: pip install scipy (or 'erasekit[real]').")
    # SD 1.x samples with PLMS (PNDM without its Runge-Kutta warm-up steps)
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    return classes[name].from_config(config, **overrides)


def runtime_info(pipe) -> dict[str, Any]:
    """What a results file records about how the pipeline ran: dtype, device, attention processor."""
    net = denoiser(pipe)  # the UNet, or SD3's transformer
    procs = getattr(net, "attn_processors", {})
    kinds = sorted({type(p).__name__ for p in procs.values()})
    return {
        "dtype": str(net.dtype).removeprefix("torch."),
        "device": str(net.device),
        "attention": kinds,
        "scheduler": type(pipe.scheduler).__name__,
    }


__all__ = ["DTYPES", "configure_pipeline", "make_scheduler", "parse_dtype", "runtime_info"]
