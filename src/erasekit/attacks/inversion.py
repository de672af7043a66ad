"""Embedding inversion: find the prompt embedding that makes the EDITED model behave like the
original does for the concept (white-box).

* **Closed form** (RECE paper, eqs. 4-8; its Fig. 2 finding). For an edit that changed only the
  cross-attention key/value projections, the embedding ``c'`` minimising
  ``sum_i ||W_i^new c' - W_i^old c||^2 + lamb ||c'||^2`` over every ``attn2.to_k``/``to_v``
  reproduces the original keys and values of ``c`` (the original text encoder's embedding of the
  prompt) as closely as one embedding can; it is applied to all 77 token positions. ``lamb = 0``
  (eq. 5, the default) gives the best fit; RECE itself erases the eq. 8 version, so an attack with
  another ``lamb`` also tests whether RECE's erasure generalises. Reuses
  :func:`erasekit.methods.rece.derivation_matrix`.
* **Gradient** (the generalisation to any edit: ESD, AP, fine-tuned text encoders...). Optimise a
  soft embedding ``e`` (1, 77, D), initialised from ``c``, so that the edited UNet's noise
  prediction matches the original's for the prompt::

      min_e  E_{z_0, t, eps} || eps_edited(z_t, e, t) - eps_original(z_t, c, t) ||^2

  with ``z_0`` the original model's own latents for the prompt (its picture of the concept) and
  ``z_t`` their forward-noised versions at uniform random training timesteps.

``mode="auto"`` uses the closed form when the two UNets differ only in cross-attention K/V, the
gradient otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from erasekit.attacks.base import (
    Attack,
    AttackContext,
    AttackOutput,
    concept_latents,
    kv_only_difference,
    noisy_latents,
    original_embeds,
    register_attack,
)
from erasekit.methods.rece import derivation_matrix, kv_residual, kv_weights
from erasekit.pipeline import eps


@dataclass
class InversionConfig:
    """Settings of the embedding-inversion attack."""

    mode: Literal["auto", "closed_form", "gradient"] = field(
        default="auto", metadata={"help": "closed_form (RECE eq. 8, K/V edits only), gradient (any edit), or auto"}
    )
    lamb: float = field(default=0.0, metadata={"help": "lambda of RECE eq. 7 for the closed form (0 = eq. 5)"})
    steps: int = field(default=50, metadata={"help": "gradient mode: Adam steps on the soft embedding"})
    lr: float = field(default=1e-2, metadata={"help": "gradient mode: Adam learning rate"})
    batch: int = field(default=2, metadata={"help": "gradient mode: noisy latents (z_t, t) per step"})
    n_latents: int = field(default=2, metadata={"help": "gradient mode: original-model images z_0 per prompt"})
    init: Literal["prompt", "closed_form"] = field(
        default="prompt", metadata={"help": "gradient mode: start from the prompt's embedding or the closed form"}
    )

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "closed_form", "gradient"):
            raise ValueError(f"`mode` must be 'auto', 'closed_form' or 'gradient', got {self.mode!r}.")
        if self.init not in ("prompt", "closed_form"):
            raise ValueError(f"`init` must be 'prompt' or 'closed_form', got {self.init!r}.")
        if self.lamb < 0:
            raise ValueError(f"`lamb` must be >= 0, got {self.lamb}.")
        for name in ("steps", "batch", "n_latents"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}.")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")


@register_attack("inversion", InversionConfig, "embedding inversion: closed form of RECE eq. 8 (K/V edits) or gradient")
class InversionAttack(Attack):
    """Embedding inversion (RECE eqs. 4-8 in closed form; noise-matching gradient descent otherwise)."""

    white_box = True

    def prepare(self, ctx: AttackContext) -> None:
        """Decide the mode and, for the closed form, build the (D, D) map of eq. 8 once."""
        kv_only, diff = kv_only_difference(ctx.edited, ctx.original)
        mode = self.config.mode
        if mode == "closed_form" and not kv_only:
            raise ValueError(
                f"The edit changes UNet parameters outside cross-attention K/V ({', '.join(diff[:3])}...), so the "
                "closed form of RECE eq. 8 does not invert it; use mode='gradient' or 'auto'."
            )
        self.mode = ("closed_form" if kv_only else "gradient") if mode == "auto" else mode
        self.matrix = None
        if self.mode == "closed_form" or self.config.init == "closed_form":
            if not kv_only:
                raise ValueError("init='closed_form' needs an edit of cross-attention K/V only; use init='prompt'.")
            self.w_old = kv_weights(ctx.original.unet)
            self.w_new = kv_weights(ctx.edited.unet)
            names = list(self.w_old)
            self.matrix = derivation_matrix(
                [self.w_old[k] for k in names], [self.w_new[k] for k in names], self.config.lamb
            )

    def _closed_form(self, c: torch.Tensor) -> torch.Tensor:
        m = self.matrix.to(c.device)
        return (c.double() @ m.T).float()

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The inverted embedding (1, 77, D) for ``prompt``."""
        c = original_embeds(ctx.original, [prompt])  # (1, 77, D)
        if self.mode == "closed_form":
            cp = self._closed_form(c)
            meta = {
                "mode": "closed_form",
                "residual": kv_residual(self.w_old, self.w_new, c[0], cp[0]),
                "residual_prompt": kv_residual(self.w_old, self.w_new, c[0], c[0]),
            }
            return AttackOutput(prompt_embeds=cp, meta=meta)
        return self._gradient(ctx, prompt, c, generator)

    def _gradient(self, ctx: AttackContext, prompt: str, c: torch.Tensor, generator: torch.Generator) -> AttackOutput:
        cfg = self.config
        edited, original = ctx.edited, ctx.original
        dev, dtype = edited.unet.device, edited.unet.dtype
        seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (cfg.n_latents,), generator=generator)]
        z0 = concept_latents(original, prompt, seeds, ctx.sampling)
        c = c.to(original.unet.device)
        start = self._closed_form(c) if cfg.init == "closed_form" else c.clone()
        e = start.detach().to(dev, torch.float32).requires_grad_(True)
        opt = torch.optim.Adam([e], lr=cfg.lr)
        losses = []
        for _ in range(cfg.steps):
            z_t, t, _ = noisy_latents(original.scheduler, z0, cfg.batch, generator)
            with torch.no_grad():
                target = eps(
                    original.unet, z_t.to(original.unet.dtype), t, c.expand(cfg.batch, -1, -1).to(original.unet.dtype)
                )
            pred = eps(edited.unet, z_t.to(dev, dtype), t.to(dev), e.to(dtype).expand(cfg.batch, -1, -1))
            loss = torch.nn.functional.mse_loss(pred.float(), target.float().to(dev))
            (grad,) = torch.autograd.grad(loss, [e])
            opt.zero_grad(set_to_none=True)
            e.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
        meta = {
            "mode": "gradient",
            "init": cfg.init,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "latent_seeds": seeds,
        }
        return AttackOutput(prompt_embeds=e.detach().float().cpu(), meta=meta)
