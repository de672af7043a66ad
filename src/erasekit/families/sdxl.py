"""SDXL: two text encoders, pooled embeddings and size/crop time ids (Podell et al. 2023, sec. 2.1-2.2).

- **Text conditioning** (what every ``attn2.to_k`` / ``to_v`` reads): the penultimate hidden states
  of CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) concatenated along the feature axis: (B, 77,
  2048), exactly what ``StableDiffusionXLPipeline.encode_prompt`` returns as ``prompt_embeds``.
- **Pooled embedding**: OpenCLIP-bigG's projected end-of-text embedding (B, 1280), fed to the UNet as
  ``added_cond_kwargs["text_embeds"]``; packed into an extra row of the conditioning (see
  :mod:`erasekit.families.base`).
- **Time ids**: ``(original_h, original_w, crop_top, crop_left, target_h, target_w)``; EraseKit uses
  the pipeline's defaults for the latent's size (original = target = the image size, no crop).
- **The unconditional branch**: SDXL base's pipeline feeds zeros, not the encoded ``""``, for an
  empty negative prompt (``force_zeros_for_empty_prompt``); :meth:`encode_condition` does the same
  for ``""`` so the sampler of z_t and ESD's anchor see the unconditional the model is sampled with.
  The K/V text conditioning of closed forms (:meth:`encode_text`) keeps the encoded ``""``: UCE maps
  a concept onto the anchor's *keys*, which the zero vector would send to the projection's bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from erasekit.families.base import FamilyAdapter


class SDXLAdapter(FamilyAdapter):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def _encode(self, pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = pipe.text_encoder_2.device
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def encode_text(self, pipe, prompts: Sequence[str], *, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return self._encode(pipe, prompts)[0]

    @torch.no_grad()
    def encode_condition(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        embeds, pooled = self._encode(pipe, prompts)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return self.pack(embeds, pooled)

    def unpack(self, pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = pipe.tokenizer.model_max_length
        pooled_dim = pipe.text_encoder_2.config.projection_dim
        return cond[:, :tokens], cond[:, tokens:].reshape(cond.shape[0], -1)[:, :pooled_dim]

    def time_ids(self, pipe, z: torch.Tensor) -> torch.Tensor:
        """``(h, w, 0, 0, h, w)`` in pixels for latents ``z`` (B, C, h/8, w/8), per row (B, 6)."""
        h, w = z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=z.dtype, device=z.device)
        return ids.expand(z.shape[0], -1)

    def model_kwargs(self, pipe, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> dict[str, Any]:
        hidden, pooled = self.unpack(pipe, cond)
        return {
            "sample": z,
            "timestep": t,
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(pipe, z)},
        }

    # ------------------------------------------------------------------ the pipeline's sampler, step by step
    def sampler_condition(self, pipe, prompts: Sequence[str], guided: bool, height: int, width: int) -> dict[str, Any]:
        """``StableDiffusionXLPipeline.__call__``'s conditioning: both encoders' states, the pooled embedding
        and the time ids ``(h, w, 0, 0, h, w)`` (original = target = the image size, no crop), with the
        zero (or encoded ``""``) negative rows first when ``guided``."""
        device = self.denoiser(pipe).device
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided
        )
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=proj
        )
        if guided:
            embeds, pooled, ids = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), torch.cat([ids, ids])
        return {
            "encoder_hidden_states": embeds.to(device),
            "added_cond_kwargs": {
                "text_embeds": pooled.to(device),
                "time_ids": ids.to(device).repeat(len(prompts), 1),
            },
        }

    def _latent_stats(self, pipe, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = pipe.vae.config
        if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
            return None
        c = latents.shape[1]
        mean = torch.tensor(cfg.latents_mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
        return mean, torch.tensor(cfg.latents_std).view(1, c, 1, 1).to(latents.device, latents.dtype)

    def _vae_in(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(pipe, latents)
        if stats is None:
            return latents / pipe.vae.config.scaling_factor
        return latents * stats[1] / pipe.vae.config.scaling_factor + stats[0]

    def _vae_out(self, pipe, z: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(pipe, z)
        if stats is None:
            return z * pipe.vae.config.scaling_factor
        return (z - stats[0]) * pipe.vae.config.scaling_factor / stats[1]

    @torch.no_grad()
    def decode_latents(self, pipe, latents: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        """As ``StableDiffusionXLPipeline.__call__``: a float16 VAE with ``force_upcast`` decodes in float32
        (SDXL's VAE overflows in float16), then the watermark where the pipeline has one."""
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            x = self._vae_in(pipe, latents.to(torch.float32) if upcast else latents)
            image = vae.decode(x, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="np")
