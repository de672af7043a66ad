"""The model-family adapter: what each method's vocabulary means for one family of diffusion models.

Every erasure method is written once against these notions; a :class:`FamilyAdapter` says what
they are for SD 1.x, SD 2.x (epsilon or v-prediction), SDXL and SD3:

- **the text conditioning** (:meth:`FamilyAdapter.encode_text`): the vectors the text-reading
  projections take as input (SD 1.x: CLIP's last hidden state, 768-d; SD 2.x: OpenCLIP's, 1024-d;
  SDXL: the two encoders' penultimate hidden states concatenated, 768 + 1280 = 2048-d; SD3: the
  joint-attention context, CLIP-L + CLIP-G concatenated and zero-padded to T5's width, followed by
  the T5 tokens);
- **the full conditioning** of the denoiser (:meth:`FamilyAdapter.encode_condition`): the text
  conditioning plus what else the denoiser reads from the prompt (SDXL: the pooled CLIP-G
  embedding; SD3: the pooled CLIP-L + CLIP-G embedding), *packed into one tensor* (the pooled
  vector is written into extra rows appended after the tokens, zero-padded), so the fine-tuning
  core and its methods handle a conditioning as one (B, T', D) tensor: they cache, stack, expand,
  concatenate and linearly mix it (AP's Gumbel-Softmax mixture mixes the pooled vector with the
  same weights as the tokens, as it would mix two prompts' pooled embeddings);
- **the K/V projections that read text** (:meth:`FamilyAdapter.kv_projections`): UNet families:
  every ``attn2.to_k`` / ``attn2.to_v``; SD3: the text-stream projections of joint attention,
  ``attn.add_k_proj`` / ``attn.add_v_proj``;
- **the prediction** (:meth:`FamilyAdapter.predict`): a UNet call (SDXL adds ``text_embeds`` and
  ``time_ids``) or a transformer call (SD3: ``pooled_projections``), returning the model's own
  output: noise ``eps``, ``v`` or the flow velocity ``u``;
- **conversions between prediction spaces** (:meth:`FamilyAdapter.to_eps`, ``to_x0``,
  ``from_eps``) at a latent ``z_t`` and timestep ``t``;
- **the negative-guidance target** (:meth:`FamilyAdapter.negative_guidance_target`) in the model's
  own output space;
- **z_t sampling** (:meth:`FamilyAdapter.train_scheduler`, :meth:`FamilyAdapter.scheduler_step`,
  :meth:`FamilyAdapter.initial_noise`): DDIM for the DDPM families, the flow-matching Euler
  sampler for SD3.

**Prediction spaces.** DDPM families write ``z_t = alpha_t x0 + sigma_t eps`` with
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` (DDPM eq. 4). The ``v`` of
v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D) is
``v = alpha_t eps - sigma_t x0``, so, at fixed ``z_t``::

    eps = alpha_t v + sigma_t z_t          x0 = alpha_t z_t - sigma_t v
    v   = (eps - sigma_t z_t) / alpha_t     (from x0 = (z_t - sigma_t eps) / alpha_t)

Rectified flow (SD3: Esser et al. 2024, eq. 3 and sec. 3.1) writes ``z_t = (1 - s) x0 + s eps``
with ``s = t / 1000`` and predicts the velocity ``u = eps - x0``::

    eps = z_t + (1 - s) u      x0 = z_t - s u      u = (eps - z_t) / (1 - s)

**The negative-guidance target in the model's space.** ESD (Gandikota et al. 2023, eq. 4) forms
``eps* = eps(c_0) - eta (eps(c_e) - eps(c_0)) = (1 + eta) eps(c_0) - eta eps(c_e)``. Each
conversion above maps a prediction ``p`` to ``a p + b z_t`` with ``a, b`` fixed at ``(z_t, t)``,
and the target's coefficients ``(1 + eta)`` and ``-eta`` sum to 1, so the target converts
term by term: ``v* = (1 + eta) v(c_0) - eta v(c_e)`` is exactly ``eps*`` converted to ``v``
(and likewise for ``u``). :meth:`negative_guidance_target` forms it in the model's own space
this way, which stays exact where a conversion is singular (``s = 1``, the pure-noise latent of
the first flow step, where ``u = (eps - z_t) / (1 - s)`` divides by zero). The loss is then the
mean squared error in the model's own space (``||v' - v*||^2``); at one ``t`` it is the
eps-space loss times ``1 / alpha_t^2`` for v-prediction (``tests/test_families.py`` checks both
the target against a hand computation in eps space and the ESD loss on a tiny SD 2.x
v-prediction pipeline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

# ESD-u as ESD's code selects it on a UNet (see erasekit.finetune.ESD_U_REGEX; repeated here so this
# core module imports nothing above it).
UNET_ESD_U_REGEX = r"^(?!time_embedding\.|conv_norm_out\.|conv_out\.)(?!.*\.attn2\.)"


class FamilyError(ValueError):
    """A model family cannot do what was asked (an unsupported folder, a method that does not apply)."""


def _rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) tensor shaped to broadcast against ``ref`` (B, ...)."""
    return x.reshape(-1, *([1] * (ref.dim() - 1))).to(device=ref.device, dtype=ref.dtype)


class FamilyAdapter:
    """The base adapter: a DDPM-trained UNet family conditioned on one CLIP text encoder (SD 1.x).

    Subclasses override what differs. Stateless: one instance serves every pipeline of its family;
    every method takes the pipeline.
    """

    name: ClassVar[str] = "sd1"
    title: ClassVar[str] = "Stable Diffusion 1.x"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    kv_names: ClassVar[tuple[str, str]] = ("to_k", "to_v")
    flow: ClassVar[bool] = False

    # ------------------------------------------------------------------ components
    def denoiser(self, pipe) -> torch.nn.Module:
        """The network that predicts (UNet or transformer)."""
        return getattr(pipe, self.denoiser_name)

    def prediction_type(self, pipe) -> str:
        """``epsilon`` or ``v_prediction`` (from ``pipe.scheduler.config``) or ``flow`` (SD3)."""
        pt = getattr(pipe.scheduler.config, "prediction_type", None) or "epsilon"
        if pt not in ("epsilon", "v_prediction"):
            raise FamilyError(
                f"{self.title}: the scheduler's prediction_type {pt!r} is not supported; EraseKit handles "
                "'epsilon' and 'v_prediction'."
            )
        return pt

    def fingerprint_components(self, pipe) -> list[tuple[str, torch.nn.Module]]:
        """What the base fingerprint hashes: the denoiser and every text encoder present."""
        out = [(self.denoiser_name, self.denoiser(pipe))]
        for n in self.text_encoder_names:
            m = getattr(pipe, n, None)
            if m is not None:
                out.append((n, m))
        return out

    def tokenizer(self, pipe):
        """The (first) CLIP tokenizer: what token positions and word pieces refer to."""
        return pipe.tokenizer

    # ------------------------------------------------------------------ text
    def encode_text(self, pipe, prompts: Sequence[str], *, grad: bool = False) -> torch.Tensor:
        """The text conditioning read by the K/V projections: (B, 77, D)."""
        tok = pipe.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.set_grad_enabled(grad):
            return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]

    def encode_condition(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        """The denoiser's full conditioning, packed into one tensor (B, T', D) (module docstring)."""
        return self.encode_text(pipe, prompts)

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` (B, T, D) with ``pooled`` (B, P) written into ``ceil(P / D)`` extra zero-padded rows."""
        if pooled is None:
            return hidden
        b, _, d = hidden.shape
        extra = -(-pooled.shape[1] // d)
        rows = torch.zeros(b, extra * d, dtype=hidden.dtype, device=hidden.device)
        rows[:, : pooled.shape[1]] = pooled.to(hidden.dtype)
        return torch.cat([hidden, rows.reshape(b, extra, d)], 1)

    def unpack(self, pipe, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`pack`: ``(hidden (B, T, D), pooled (B, P) or None)``."""
        return cond, None

    # ------------------------------------------------------------------ the model call
    def model_kwargs(self, pipe, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward for latents ``z``, timesteps ``t`` (B,) and packed ``cond``."""
        return {"sample": z, "timestep": t, "encoder_hidden_states": cond}

    def predict(
        self, pipe, model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The model's own output (eps, v or u) of ``model`` (the pipeline's denoiser or a copy of it)."""
        return model(**self.model_kwargs(pipe, z, t, cond)).sample

    # ------------------------------------------------------------------ the pipeline's sampler, step by step
    # What the pipeline's ``__call__`` does around one denoising step, for samplers that steer it (the
    # probes of erasekit.attacks.probes): a loop over the scheduler's timesteps made of these reproduces
    # ``pipe(prompt, latents=...)`` byte for byte (tests/test_family_protocols.py checks every family).
    def sampler_guided(self, pipe, guidance: float) -> bool:
        """Whether ``pipe.__call__`` runs classifier-free guidance at ``guidance`` (its ``do_classifier_free_guidance``)."""
        return guidance > 1 and self.denoiser(pipe).config.time_cond_proj_dim is None

    def sampler_condition(self, pipe, prompts: Sequence[str], guided: bool, height: int, width: int) -> dict[str, Any]:
        """The denoiser's conditioning keywords as ``pipe.__call__`` builds them for ``prompts`` (empty
        negative prompt): rows ``[unconditional; conditional]`` when ``guided``."""
        pos, neg = pipe.encode_prompt(list(prompts), self.denoiser(pipe).device, 1, guided, negative_prompt=None)
        return {"encoder_hidden_states": torch.cat([neg, pos]) if guided else pos, "added_cond_kwargs": None}

    def sampler_output(self, pipe, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """One denoiser call of ``pipe.__call__`` on the (scheduler-scaled) latents ``x`` at step ``t``."""
        net = self.denoiser(pipe)
        return net(x, t, timestep_cond=None, cross_attention_kwargs=None, return_dict=False, **cond)[0]

    def sampler_schedule_kwargs(self, pipe, height: int, width: int) -> dict[str, Any]:
        """Extra keywords of ``scheduler.set_timesteps`` that ``pipe.__call__`` passes (none for UNet families)."""
        return {}

    def _vae_in(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return latents / pipe.vae.config.scaling_factor

    def _vae_out(self, pipe, z: torch.Tensor) -> torch.Tensor:
        return z * pipe.vae.config.scaling_factor

    @torch.no_grad()
    def image_latents(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """Latents of images (B, 3, H, W) in [-1, 1]: the VAE posterior mean normalised as the denoiser reads
        latents (the inverse of the pipeline's decoding), in the denoiser's dtype."""
        vae = pipe.vae
        z = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        return self._vae_out(pipe, z).to(self.denoiser(pipe).dtype)

    @torch.no_grad()
    def decode_latents(self, pipe, latents: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        """Images (B, H, W, 3) float in [0, 1] from final latents, as ``pipe.__call__`` decodes them
        (SD: the safety checker where the pipeline has one; ``dtype`` is the prompt embeddings')."""
        vae = pipe.vae
        image = vae.decode(self._vae_in(pipe, latents), return_dict=False, generator=None)[0]
        image, nsfw = pipe.run_safety_checker(image, self.denoiser(pipe).device, dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=denorm)

    # ------------------------------------------------------------------ K/V projections
    def kv_modules(self, pipe) -> dict[str, torch.nn.Module]:
        """The attention modules whose K/V projections read text, by module name (inside the denoiser)."""
        return {n: m for n, m in self.denoiser(pipe).named_modules() if n.endswith("attn2") and hasattr(m, "to_k")}

    def kv_projections(self, pipe) -> dict[str, torch.nn.Linear]:
        """Every K/V projection that reads text, by its pipeline parameter prefix (``unet.<module>.to_k``)."""
        out = {}
        for mod_name, attn in self.kv_modules(pipe).items():
            for proj in self.kv_names:
                out[f"{self.denoiser_name}.{mod_name}.{proj}"] = getattr(attn, proj)
        return out

    def shared_kv_inputs(self) -> bool:
        """Whether every K/V projection reads the same vectors (:meth:`encode_text`); SD3's do not."""
        return True

    # ------------------------------------------------------------------ fine-tuning targets
    def train_target(self, train_method: str) -> str:
        """The :func:`erasekit.targets.select_parameters` target for a ``train_method`` name or regex."""
        return {"noxattn": UNET_ESD_U_REGEX}.get(train_method, train_method)

    # ------------------------------------------------------------------ sampling z_t
    def train_scheduler(self, pipe, steps: int, device: torch.device):
        """The sampler of z_t for fine-tuning: DDIM on the pipeline's noise schedule (ESD, Algorithm 1)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps, device=device)
        return sched

    def scheduler_step(self, sched, out: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One sampler step from ``z`` at ``t`` given the (guided) model output ``out``."""
        return sched.step(out, t, z).prev_sample

    def latent_shape(self, pipe, b: int) -> tuple[int, ...]:
        cfg = self.denoiser(pipe).config
        return (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def initial_noise(self, pipe, sched, b: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
        """Starting latents: Gaussian noise from ``generator`` (on the CPU) times the sampler's init sigma."""
        sigma = getattr(sched, "init_noise_sigma", None) or 1.0
        return torch.randn(self.latent_shape(pipe, b), generator=generator).to(device, dtype) * sigma

    # ------------------------------------------------------------------ prediction spaces
    def alpha_sigma(self, sched, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` per row with ``z_t = alpha_t x0 + sigma_t eps``."""
        abar = sched.alphas_cumprod.to(torch.float64)[t.long().cpu()]
        return abar.sqrt(), (1 - abar).sqrt()

    def to_eps(self, pipe, sched, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by the model's output at ``(z_t, t)``."""
        if self.prediction_type(pipe) == "epsilon":
            return out
        a, s = self.alpha_sigma(sched, t)
        return _rows(a, out) * out + _rows(s, z) * z  # eps = alpha v + sigma z_t

    def to_x0(self, pipe, sched, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by the model's output at ``(z_t, t)``."""
        a, s = self.alpha_sigma(sched, t)
        if self.prediction_type(pipe) == "epsilon":
            return (z - _rows(s, z) * out) / _rows(a, z)
        return _rows(a, z) * z - _rows(s, out) * out  # x0 = alpha z_t - sigma v

    def from_eps(self, pipe, sched, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model-space output whose implied noise is ``eps`` at ``(z_t, t)``."""
        if self.prediction_type(pipe) == "epsilon":
            return eps
        a, s = self.alpha_sigma(sched, t)
        return (eps - _rows(s, z) * z) / _rows(a, eps)  # v = (eps - sigma z_t) / alpha

    def negative_guidance_target(self, out_anchor: torch.Tensor, out_erase: torch.Tensor, eta: float) -> torch.Tensor:
        """ESD eq. 4's target in the model's own output space: ``p(c_0) - eta (p(c_e) - p(c_0))``.

        Exact for eps, v and flow velocity alike (module docstring: every conversion is affine at a
        fixed ``z_t`` and the coefficients sum to 1)."""
        return out_anchor - eta * (out_erase - out_anchor)

    def prediction_loss(
        self, pipe, sched, pred: torch.Tensor, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, space: str
    ) -> torch.Tensor:
        """AP/AGE's ``loss_space`` on this family: ``eps`` compares the model's own outputs (eps, v or u;
        AP eq. 5 in the model's space), ``x0`` the clean latents they imply (the authors' code's x0 loss)."""
        if space == "eps":
            return torch.nn.functional.mse_loss(pred, target)
        if space == "x0":
            return torch.nn.functional.mse_loss(
                self.to_x0(pipe, sched, pred, z, t), self.to_x0(pipe, sched, target, z, t)
            )
        raise ValueError(f"`loss_space` must be 'eps' or 'x0', got {space!r}.")

    # ------------------------------------------------------------------ description
    def describe(self, pipe) -> dict[str, Any]:
        """JSON-ready facts recorded in an edit's base info."""
        return {"family": self.name, "prediction_type": self.prediction_type(pipe)}


def regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True
