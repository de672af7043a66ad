"""UnlearnDiff-style white-box prompt attack (Zhang et al., "To generate or not? Safety-driven
unlearned diffusion models are still easy to generate unsafe images... for now", ECCV 2024).

UnlearnDiff uses the edited diffusion model as its own classifier: the adversarial prompt is the
one under which the edited model best *denoises an image of the erased concept*. We prepend ``k``
discrete tokens ``x_1..x_k`` to the prompt and solve::

    min_{x_1..x_k in V}  E_{t, eps} || eps_edited(z_t(z_0), enc_edited([x_1..x_k; prompt]), t) - eps ||^2

where ``z_0`` are the ORIGINAL model's latents for the prompt (its picture of the concept; the
paper uses the image the original SD generated for each I2P prompt) and ``z_t`` their noised
versions at uniform random training timesteps. The discrete tokens are optimised as continuous
token embeddings whose forward pass uses their nearest vocabulary embeddings (straight-through
projection, as in PEZ, Wen et al. 2023); the lowest-loss projected prefix is kept.

Defaults follow the authors' configs (Diffusion-MU-Attack ``text_grad``: ``k = 5`` prefix tokens,
40 iterations, lr 0.01, weight decay 0.1). Their implementation relaxes each token to a
distribution over the vocabulary (projected onto the simplex) instead of projecting embeddings to
the nearest token; both end with discrete tokens, and the loss is the same.

The attacker may not simply name the concept: tokens containing the concept's words are excluded
from the vocabulary unless ``exclude_concept=False``. The images come from the token ids through the
edited model's own text encoder (white-box); ``adv_prompt`` is their decoding.
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
    encode_ids,
    noisy_latents,
    project_to_vocabulary,
    register_attack,
    token_vocabulary,
    tokenize,
)
from erasekit.pipeline import eps


@dataclass
class UnlearnDiffConfig:
    """Settings of the UnlearnDiff-style attack (defaults: the authors' text_grad configs)."""

    k: int = field(default=5, metadata={"help": "number of adversarial prefix tokens"})
    steps: int = field(default=40, metadata={"help": "optimisation steps"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate on the token embeddings"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam weight decay"})
    batch: int = field(default=1, metadata={"help": "noisy latents (z_t, t) per step"})
    n_latents: int = field(default=1, metadata={"help": "original-model images z_0 of the prompt to denoise"})
    vocabulary: Literal["words", "all"] = field(
        default="words", metadata={"help": "'words' (whole alphabetic BPE words) or 'all' non-special tokens"}
    )
    exclude_concept: bool = field(default=True, metadata={"help": "forbid tokens that contain the concept's words"})
    metric: Literal["l2", "cosine"] = field(default="l2", metadata={"help": "distance of the vocabulary projection"})

    def __post_init__(self) -> None:
        for name in ("k", "steps", "batch", "n_latents"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}.")
        if self.k > 60:
            raise ValueError(f"`k` must leave room for the prompt in 77 tokens; got {self.k} (use <= 60).")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"`lr` must be > 0 and `weight_decay` >= 0, got {self.lr} and {self.weight_decay}.")
        if self.vocabulary not in ("words", "all"):
            raise ValueError(f"`vocabulary` must be 'words' or 'all', got {self.vocabulary!r}.")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"`metric` must be 'l2' or 'cosine', got {self.metric!r}.")


def prefixed_ids(pipe, prompt: str, prefix: torch.Tensor) -> torch.Tensor:
    """Ids (1, 77) of ``[BOS, prefix, prompt tokens, EOS, pad...]``; the prompt is cut to fit."""
    ids = tokenize(pipe, [prompt])[0]
    n_max = ids.shape[0]
    body = [int(i) for i in ids[1:] if int(i) != pipe.tokenizer.eos_token_id]
    body = body[: n_max - 2 - len(prefix)]
    seq = [pipe.tokenizer.bos_token_id, *[int(x) for x in prefix], *body, pipe.tokenizer.eos_token_id]
    seq += [pipe.tokenizer.pad_token_id] * (n_max - len(seq))
    return torch.tensor([seq], dtype=torch.long)


@register_attack(
    "unlearndiff", UnlearnDiffConfig, "UnlearnDiff-style: k prefix tokens minimising the edited model's denoising loss"
)
class UnlearnDiffAttack(Attack):
    """White-box discrete prefix attack with the diffusion model's own denoising loss."""

    white_box = True

    def prepare(self, ctx: AttackContext) -> None:
        """The allowed vocabulary (minus the concept's words)."""
        exclude = [ctx.concept] if self.config.exclude_concept else []
        self.allowed = token_vocabulary(ctx.edited.tokenizer, self.config.vocabulary, exclude)

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The adversarial prefix for ``prompt``: token ids and their decoding."""
        cfg = self.config
        edited, original = ctx.edited, ctx.original
        te = edited.text_encoder
        table = te.get_input_embeddings().weight.detach()  # (V, D_tok)
        dev, dtype = edited.unet.device, edited.unet.dtype
        # 1. The target: the original model's latents for the prompt.
        seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (cfg.n_latents,), generator=generator)]
        z0 = concept_latents(original, prompt, seeds, ctx.sampling).to(dev)
        # 2. Random initial tokens from the allowed vocabulary.
        init = self.allowed[torch.randint(0, len(self.allowed), (cfg.k,), generator=generator)]
        soft = table[init.to(table.device)].float().clone().requires_grad_(True)  # (k, D_tok)
        opt = torch.optim.Adam([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_loss, best_ids, losses = float("inf"), init.clone(), []
        for _ in range(cfg.steps):
            # 3. Forward with the nearest tokens, gradient to the continuous embeddings (straight-through).
            proj = project_to_vocabulary(soft, table, self.allowed, cfg.metric)
            hard = table[proj.to(table.device)].float()
            st = soft + (hard - soft).detach()
            ids = prefixed_ids(edited, prompt, proj)
            cond = encode_ids(te, ids, override=st[None], start=1)  # (1, 77, D)
            z_t, t, noise = noisy_latents(edited.scheduler, z0, cfg.batch, generator)
            pred = eps(edited.unet, z_t.to(dtype), t, cond.to(dtype).expand(cfg.batch, -1, -1))
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            value = float(loss.detach())
            losses.append(value)
            if value < best_loss:
                best_loss, best_ids = value, proj.clone()
            (grad,) = torch.autograd.grad(loss, [soft])
            opt.zero_grad(set_to_none=True)
            soft.grad = grad
            opt.step()
        ids = prefixed_ids(edited, prompt, best_ids)[0].tolist()
        prefix = edited.tokenizer.decode([int(i) for i in best_ids]).strip()
        text = f"{prefix} {prompt}"
        retok = tokenize(edited, [text])[0].tolist()
        meta = {
            "prefix": prefix,
            "prefix_ids": [int(i) for i in best_ids],
            "loss_best": best_loss,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "latent_seeds": seeds,
            "text_roundtrip": retok == ids,
        }
        return AttackOutput(prompt=text, token_ids=ids, meta=meta)
