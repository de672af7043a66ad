"""Stable Diffusion 3 (Esser et al. 2024): a joint-attention transformer (MMDiT) trained by rectified flow.

Why SD3 and not FLUX: both transformers build tiny and offline from their diffusers classes, but
FLUX's pipeline cannot run without its T5 encoder and T5's SentencePiece tokenizer, which cannot
be built offline (its vocabulary file is a download); SD3's pipeline runs with ``text_encoder_3``
absent (its T5 tokens are then zeros, a configuration Stability documents) and both CLIP encoders
use the CLIP BPE tokenizer EraseKit ships. So the tests build a full SD3 pipeline offline; with
a real SD3 folder the T5 encoder is used when present.

- **Text conditioning**: ``encode_prompt``'s ``prompt_embeds``: CLIP-L and CLIP-G penultimate
  states concatenated (77 tokens), zero-padded to T5's width, followed by T5's tokens
  (``max_sequence_length``, 256 by default, as the pipeline samples).
- **Pooled**: CLIP-L and CLIP-G projected end-of-text embeddings concatenated (``pooled_projections``).
- **The K/V projections that read text**: each joint block's text-stream ``attn.add_k_proj`` /
  ``attn.add_v_proj``. Unlike a UNet's ``attn2``, they do not read the text encoder's output: block
  ``l`` reads ``norm1_context(h_l, temb)``, the text stream after ``context_embedder`` and ``l - 1``
  joint blocks, modulated by the timestep (AdaLN-Zero) and mixed with the image tokens by every
  earlier joint attention. There is therefore no single embedding that all of them read
  (:meth:`shared_kv_inputs` is False): closed forms get one input matrix per block from
  :meth:`kv_inputs`, which records what each projection reads on one forward pass at a reference
  timestep (``KV_REFERENCE_SIGMA`` = 0.5, the middle of the flow) with zero latents. This is a
  linearisation EraseKit chooses, not a published one: the edit is exact at that (t, z) and
  approximate elsewhere.
- **Prediction**: the flow velocity ``u = eps - x0``; conversions in :mod:`erasekit.families.base`.
- **z_t sampling**: Euler steps of the flow ODE on the pipeline's ``FlowMatchEulerDiscreteScheduler``
  grid (with its ``shift``), ``z_{s'} = z_s + (s' - s) u``; the step index is drawn as in ESD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from erasekit.families.base import FamilyAdapter, _rows

KV_REFERENCE_SIGMA = 0.5
# ESD-u on a transformer: every joint block's parameters except attention (the analogue of ESD-u's
# "everything but cross-attention"), leaving out the embedders and output layers as ESD-u does on a UNet.
SD3_NOXATTN_REGEX = r"^transformer_blocks\.(?!\d+\.attn\.)"


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    kv_names = ("add_k_proj", "add_v_proj")
    flow = True
    max_sequence_length = 256

    def prediction_type(self, pipe) -> str:
        return "flow"

    # ------------------------------------------------------------------ text
    def _encode(self, pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode_text(self, pipe, prompts: Sequence[str], *, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return self._encode(pipe, prompts)[0]

    @torch.no_grad()
    def encode_condition(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        return self.pack(*self._encode(pipe, prompts))

    def unpack(self, pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = pipe.tokenizer.model_max_length + self.max_sequence_length
        pooled_dim = self.denoiser(pipe).config.pooled_projection_dim
        return cond[:, :n], cond[:, n:].reshape(cond.shape[0], -1)[:, :pooled_dim]

    def model_kwargs(self, pipe, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> dict[str, Any]:
        hidden, pooled = self.unpack(pipe, cond)
        return {"hidden_states": z, "timestep": t, "encoder_hidden_states": hidden, "pooled_projections": pooled}

    # ------------------------------------------------------------------ K/V
    def kv_modules(self, pipe) -> dict[str, torch.nn.Module]:
        return {
            n: m
            for n, m in self.denoiser(pipe).named_modules()
            if n.endswith(".attn") and getattr(m, "add_k_proj", None) is not None
        }

    def shared_kv_inputs(self) -> bool:
        return False

    @torch.no_grad()
    def kv_inputs(self, pipe, prompts: Sequence[str], *, batch_size: int = 16) -> dict[str, torch.Tensor]:
        """What each text-stream K/V projection reads for ``prompts`` (module docstring): by module name
        (inside the transformer), (B, T, d_inner) float32, on one forward at sigma ``KV_REFERENCE_SIGMA``."""
        model = self.denoiser(pipe)
        mods = self.kv_modules(pipe)
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
        hooks = [
            m.add_k_proj.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach().float().cpu()))
            for n, m in mods.items()
        ]
        try:
            prompts = list(prompts)
            for s in range(0, len(prompts), batch_size):
                cond = self.encode_condition(pipe, prompts[s : s + batch_size])
                b = cond.shape[0]
                p = next(model.parameters())
                z = torch.zeros(self.latent_shape(pipe, b), device=p.device, dtype=p.dtype)
                t = torch.full((b,), KV_REFERENCE_SIGMA * 1000.0, device=p.device, dtype=p.dtype)
                model(**self.model_kwargs(pipe, z, t, cond.to(p.dtype)))
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(v) for n, v in seen.items()}

    # ------------------------------------------------------------------ targets
    def train_target(self, train_method: str) -> str:
        """``xattn``: the joint attention layers (where text meets image); ``kv``: the text-stream K/V;
        ``noxattn``: every joint block parameter outside attention; ``full``; or a regex."""
        return {
            "xattn": r"\.attn\.",
            "kv": r"\.attn\.add_(k|v)_proj\.",
            "noxattn": SD3_NOXATTN_REGEX,
        }.get(train_method, train_method)

    # ------------------------------------------------------------------ sampling
    def train_scheduler(self, pipe, steps: int, device: torch.device):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps, device=device)
        return sched

    def _sigma(self, sched, t: torch.Tensor) -> torch.Tensor:
        return t.double().cpu() / float(sched.config.num_train_timesteps)

    def scheduler_step(self, sched, out: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Euler step of the flow ODE to the next grid point (stateless: the scheduler's own ``step``
        keeps a step counter that batched runs with rows at different steps cannot share)."""
        ts = sched.timesteps.to(t.device)
        t_rows = t.reshape(-1).expand(z.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        idx = torch.stack([(ts == v).nonzero()[0, 0] for v in t_rows]).cpu()
        sig, nxt = sched.sigmas.cpu()[idx], sched.sigmas.cpu()[idx + 1]
        return z + _rows(nxt - sig, z) * out

    def alpha_sigma(self, sched, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._sigma(sched, t)
        return 1 - s, s

    def to_eps(self, pipe, sched, out, z, t):
        s = self._sigma(sched, t)
        return z + _rows(1 - s, out) * out  # eps = z_t + (1 - s) u

    def to_x0(self, pipe, sched, out, z, t):
        s = self._sigma(sched, t)
        return z - _rows(s, out) * out  # x0 = z_t - s u

    def from_eps(self, pipe, sched, eps, z, t):
        s = self._sigma(sched, t)
        if bool((s >= 1).any()):
            raise ValueError("The flow velocity is not determined by eps at s = 1 (the pure-noise latent).")
        return (eps - z) / _rows(1 - s, eps)  # u = (eps - z_t) / (1 - s)

    # ------------------------------------------------------------------ the pipeline's sampler, step by step
    def sampler_guided(self, pipe, guidance: float) -> bool:
        """``StableDiffusion3Pipeline``: guidance whenever the scale exceeds 1."""
        return guidance > 1

    def sampler_condition(self, pipe, prompts: Sequence[str], guided: bool, height: int, width: int) -> dict[str, Any]:
        """``StableDiffusion3Pipeline.__call__``'s joint-attention context and pooled projections (the three
        encoders read the same prompt; empty negative prompt), negative rows first when ``guided``."""
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.denoiser(pipe).device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            max_sequence_length=self.max_sequence_length,
        )
        if guided:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sampler_output(self, pipe, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The transformer call of ``StableDiffusion3Pipeline.__call__`` (the timestep expanded to the batch)."""
        net = self.denoiser(pipe)
        return net(
            hidden_states=x, timestep=t.expand(x.shape[0]), joint_attention_kwargs=None, return_dict=False, **cond
        )[0]

    def sampler_schedule_kwargs(self, pipe, height: int, width: int) -> dict[str, Any]:
        """``mu`` of the scheduler's dynamic shifting where it is on (SD3.5-style configs), as the pipeline computes it."""
        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.denoiser(pipe).config.patch_size
        seq = (height // pipe.vae_scale_factor // p) * (width // pipe.vae_scale_factor // p)
        mu = calculate_shift(
            seq,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def _vae_in(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor

    def _vae_out(self, pipe, z: torch.Tensor) -> torch.Tensor:
        return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, pipe, latents: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        """As ``StableDiffusion3Pipeline.__call__``: undo scaling and shift, decode (no safety checker)."""
        image = pipe.vae.decode(self._vae_in(pipe, latents), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")
