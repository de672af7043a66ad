"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

ESD fine-tunes the UNet so that its prediction for the erased concept ``c_e`` follows *negative*
guidance away from it (ESD eq. 3 / eq. 4)::

    eps_theta'(z_t, c_e, t)  <-  eps_theta(z_t, c_0, t) - eta * (eps_theta(z_t, c_e, t) - eps_theta(z_t, c_0, t))

with ``c_0`` the empty prompt (or the request's anchor, when one is given), ``theta`` the frozen
original and ``z_t`` sampled by the frozen model with guidance ``start_guidance`` on ``c_e`` (see
:mod:`erasekit.finetune`). The loss is the mean squared error (ESD's ``nn.MSELoss``).

Variants by ``train_method``: ``xattn`` (ESD-x: cross-attention only, for styles and objects),
``noxattn`` (ESD-u: everything but cross-attention, time embedding and output layers, for nudity),
``full``. Defaults from the paper: 1000 steps, Adam lr 1e-5, eta 1, start guidance 3, DDIM 50.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasekit.edit import Edit, EraseRequest
from erasekit.finetune import FinetuneConfig, FinetuneContext, LossFunction, StepBatch, StepOutput, finetune
from erasekit.methods.base import register


@dataclass
class ESDConfig(FinetuneConfig):
    """ESD hyperparameters; the defaults are the paper's (1000 steps, lr 1e-5, eta 1, start guidance 3)."""

    eta: float = field(default=1.0, metadata={"help": "negative guidance scale eta of the training target (ESD eq. 4)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta < 0:
            raise ValueError(f"ESD `eta` (negative guidance) must be >= 0, got {self.eta}.")


def esd_target(eps_anchor: torch.Tensor, eps_erase: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD eq. 4's target: ``eps(c_0) - eta * (eps(c_e) - eps(c_0))`` (frozen predictions)."""
    return eps_anchor - eta * (eps_erase - eps_anchor)


def esd_loss(eps_edited: torch.Tensor, eps_anchor: torch.Tensor, eps_erase: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's loss: mean squared error between eps_theta'(c_e) and :func:`esd_target`."""
    return F.mse_loss(eps_edited, esd_target(eps_anchor, eps_erase, eta))


class ESDLoss(LossFunction):
    """Per-step ESD loss: one batched frozen call (anchor and erased rows), one trainable call."""

    def __init__(self, config: ESDConfig, anchor: str) -> None:
        self.config = config
        self.anchor = anchor

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        b = len(batch.concepts)
        anchor = ctx.embed([self.anchor]).expand(b, -1, -1)
        with torch.no_grad():
            e_0, e_e = ctx.eps_frozen(
                torch.cat([batch.z_t, batch.z_t]), torch.cat([batch.t, batch.t]), torch.cat([anchor, batch.cond_e])
            ).chunk(2)
        e_new = ctx.eps(batch.z_t, batch.t, batch.cond_e)
        return StepOutput(loss=esd_loss(e_new, e_0, e_e, self.config.eta))


@register(
    "esd",
    ESDConfig,
    "Erased Stable Diffusion: fine-tune towards negative guidance (ESD-x / ESD-u / full)",
    presets={
        "paper": ("ESD paper, Algorithm 1", {}),
        "authors": ("the authors' code (its differences from the paper are not yet separate options)", {}),
    },
    default_preset="paper",
)
def erase_esd(
    pipe, request: EraseRequest, config: ESDConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> Edit:
    """Erase ``request.erase`` with ESD (Gandikota et al. 2023, eq. 4); the pipeline is left unchanged."""
    result = finetune(
        pipe, request, config, ESDLoss(config, request.target), method="esd", generator=generator, progress=progress
    )
    return result.edit
