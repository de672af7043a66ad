"""AGE: Adversarial Guide Erasure, "fantastic targets" (Bui et al., ICLR 2025; talk slides eq. 14).

Instead of mapping an erased concept to a fixed neutral target, AGE chooses the target ``c_t``
adversarially among the concepts close to ``c_e``::

    min_theta'  E_{c_e}  max_{c_t in R(c_e)}  ||eps_theta'(c_e) - eps_theta(c_t)||^2        (L1)
                                        + lambda ||eps_theta'(c_t) - eps_theta(c_t)||^2     (L2)

Maximising L1 over ``c_t`` keeps the target away from ``c_e``'s synonyms (a synonym is the worst
target for erasing); maximising L2 picks the concept the erasure disturbs most, which the descent
step then preserves. ``R(c_e)`` is the K nearest concepts (as in AP), relaxed by a Gumbel-Softmax
whose ``topk`` (default 5) largest weights are kept and renormalised, the authors' relaxation, so
the target is a mixture of a few close concepts. Each step: ``n_iter`` ascent steps on the logits,
a fresh sample ``c_t``, then one descent step on the model with the same objective (``c_e`` is mapped
to ``eps_theta(c_t)`` and ``c_t`` is preserved). The chosen targets are logged at every step.

The request's ``anchor`` is not used: AGE chooses the targets itself. The search code is AP's (:mod:`erasekit.methods.ap`), reused, not copied; only the objective
differs. The L1 term of the ascent only depends on ``c_t`` through the frozen model, so the
edited model's ``eps_theta'(c_e)`` is computed once per step, without gradient, for the ascent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasekit.edit import Edit, EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, StepOutput, finetune
from erasekit.methods.ap import APConfig, Relaxation, SearchLoss
from erasekit.methods.base import register


@dataclass
class AGEConfig(APConfig):
    """AGE hyperparameters: AP's (1000 steps, lr 1e-5, K = 100, N_iter = 2, temperature 2, lambda 1) with
    the authors' top-k relaxation of 5 target candidates."""

    relaxation: Relaxation = field(default="topk", metadata={"help": "topk (authors'), hard or soft"})
    topk: int = field(default=5, metadata={"help": "target candidates mixed by the topk relaxation"})


def age_objective(
    eps_edit_e: torch.Tensor, eps_orig_t: torch.Tensor, eps_edit_t: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slides eq. 14: ``(L1 + lambda L2, L1, L2)`` with L1 = ||eps'(c_e) - eps(c_t)||^2, L2 = ||eps'(c_t) - eps(c_t)||^2
    (mean squared errors)."""
    l1 = F.mse_loss(eps_edit_e, eps_orig_t)
    l2 = F.mse_loss(eps_edit_t, eps_orig_t)
    return l1 + lam * l2, l1, l2


class AGELoss(SearchLoss):
    """Per-step AGE: ascend eq. 14 on the target's logits, then descend it on the model."""

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        cfg, z, t = self.config, batch.z_t, batch.t
        rows = [self.rows[c] for c in batch.concepts]

        # 1. Choose the target: maximise L1 + lambda L2 over the relaxation of R(c_e).
        with torch.no_grad():
            e_edit_e = ctx.eps(z, t, batch.cond_e)

        def objective(cond: torch.Tensor) -> torch.Tensor:
            return age_objective(e_edit_e, ctx.eps_frozen(z, t, cond), ctx.eps(z, t, cond), cfg.lam)[0]

        ascent = self.search.ascend(objective, rows, batch.generator)
        c_t, records = self.search.choose(rows, batch.generator)

        # 2. Descent: one frozen call (c_t), one batched trainable call (c_e and c_t rows).
        with torch.no_grad():
            e_orig_t = ctx.eps_frozen(z, t, c_t)
        new_e, new_t = ctx.eps(torch.cat([z, z]), torch.cat([t, t]), torch.cat([batch.cond_e, c_t])).chunk(2)
        loss, l1, l2 = age_objective(new_e, e_orig_t, new_t, cfg.lam)
        logs = {"l1": float(l1.detach()), "l2": float(l2.detach())}
        if ascent:
            logs["objective_search"] = ascent[-1]
        record = {"targets": [{"erase": c, **r} for c, r in zip(batch.concepts, records, strict=True)]}
        return StepOutput(loss=loss, logs=logs, record=record)


@register(
    "age",
    AGEConfig,
    "Adversarial Guide Erasure: map each erased concept to an adversarially chosen close target",
    presets={
        "paper": ("AGE (slides eq. 14)", {}),
        "authors": ("the authors' code (its differences from the paper are not yet separate options)", {}),
    },
    default_preset="paper",
)
def erase_age(
    pipe, request: EraseRequest, config: AGEConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> Edit:
    """Erase ``request.erase`` with AGE (slides eq. 14); the pipeline is left unchanged.

    ``edit.trace["log"][i]["targets"]`` lists the target mixture chosen for each erased concept at step i.
    """
    return finetune(
        pipe, request, config, AGELoss(request, config), method="age", generator=generator, progress=progress
    ).edit
