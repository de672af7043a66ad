"""Stable Diffusion 1.x and 2.x: one CLIP-family text encoder, a UNet with ``attn2`` cross-attention.

SD 2.x differs from 1.x, for EraseKit, only in its text encoder (OpenCLIP ViT-H, 1024-d, GELU) and,
for the 768-px checkpoints (``stabilityai/stable-diffusion-2``, ``-2-1``), v-prediction, read from
``pipe.scheduler.config.prediction_type``; the conversions live in :class:`FamilyAdapter`.
"""

from __future__ import annotations

from erasekit.families.base import FamilyAdapter


class SD1Adapter(FamilyAdapter):
    """SD 1.x (CLIP ViT-L/14 text encoder, 768-d; epsilon prediction, or v where a scheduler says so)."""

    name = "sd1"
    title = "Stable Diffusion 1.x"


class SD2Adapter(FamilyAdapter):
    """SD 2.x (OpenCLIP ViT-H/14 text encoder, 1024-d; epsilon or v-prediction)."""

    name = "sd2"
    title = "Stable Diffusion 2.x"


def is_sd2(pipe) -> bool:
    """An SD 2.x pipeline: 1024-d cross-attention (OpenCLIP ViT-H) or a GELU text encoder (OpenCLIP's
    activation; CLIP ViT-L of SD 1.x uses quick_gelu)."""
    dim = pipe.unet.config.cross_attention_dim
    act = getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu")
    return dim == 1024 or act == "gelu"
