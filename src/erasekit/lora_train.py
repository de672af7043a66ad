"""LoRA as the training parameterisation of the fine-tuning core (issue 16: ``--set lora_rank=R``).

With ``lora_rank=R`` an output-based method (ESD, AP, AGE) does not train the UNet weights that
its ``train_method`` selects; it trains a rank-``R`` LoRA on each Linear layer among them (Hu et
al., 2021, eq. 3)::

    h = W_0 x + (alpha / r) B A x,    A (r, in) Kaiming-uniform,  B (out, r) zeros

through peft (``LoraConfig`` + ``inject_adapter_in_model`` on the core's structural copy of the
UNet; the caller's UNet is never wrapped). ``alpha = r``, so the scale is 1 and the edit is
``W_0 + B A``: exactly the factorisation :mod:`erasekit.export` writes (``lora_alpha`` = rank), so
the edit exports as a rank-``R`` LoRA with no truncation (``tests/test_lora_train.py``). Only the
factors are trained and held by Adam: ``R (in + out)`` numbers per layer instead of ``in x out``,
which is what makes fine-tuning large models fit in memory.

What changes against full fine-tuning: the selected *Linear weights* get the low-rank update; the
selected biases, norms, convolutions and embeddings stay frozen (ESD-x's ``xattn`` target trains
``attn2.to_out.0.bias`` in full fine-tuning; with a LoRA it does not). A target with no Linear
layer is refused. The frozen original is the same module with every ``lora_B`` swapped for zeros
(``W_0 x + 0`` exactly), so the core's frozen predictions are unchanged.

The edit holds the merged weights ``W_0 + B A`` (computed in float64, stored in the weights' dtype)
under their ordinary names, so it applies, saves and loads like any edit; the factors themselves
are kept in ``edit.aux`` (``lora.<module>.lora_A`` / ``lora_B``) and the rank in its trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

AUX_PREFIX = "lora."


def lora_modules(unet: torch.nn.Module, chosen: Iterable[str]) -> list[str]:
    """Names of the Linear modules of ``unet`` whose ``.weight`` is among the ``chosen`` parameter names."""
    chosen = set(chosen)
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in chosen]


def check_lora_rank(rank: Any) -> None:
    """Refuse a ``lora_rank`` that is not None or an integer >= 1 (naming the option)."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"`lora_rank` must be an integer >= 1 (or None to train the weights themselves), got {rank!r}."
        )


def check_rank_fits(unet: torch.nn.Module, modules: list[str], rank: int, train_method: str) -> None:
    """Refuse a rank larger than the smallest target layer allows (``min(out, in)``): its B A could not be rank R."""
    if not modules:
        raise ValueError(
            f"`train_method` {train_method!r} selects no Linear layer, so `lora_rank` has nothing to adapt; use "
            "train_method xattn, kv, full or a regex matching Linear weights, or leave lora_rank unset."
        )
    shapes = {n: tuple(unet.get_submodule(n).weight.shape) for n in modules}
    name, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
    if rank > min(shape):
        raise ValueError(
            f"`lora_rank` {rank} is too large: target layer {name!r} is {shape} (out, in), so a LoRA there has "
            f"rank at most {min(shape)}. Set lora_rank <= {min(shape)} (or train the weights: leave it unset)."
        )


def inject_lora(clone: torch.nn.Module, modules: list[str], rank: int, seed: int) -> dict[str, torch.nn.Parameter]:
    """Wrap ``modules`` of ``clone`` with peft LoRA layers (rank ``rank``, alpha ``rank``, no dropout);
    A is drawn from a generator seeded by ``seed`` (peft's init reads the global RNG, which is forked).
    Returns the trainable factors by parameter name."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, clone)
    params = {n: p for n, p in clone.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    for n, p in clone.named_parameters():
        p.requires_grad_(n in params)
    return params


def _factors(clone: torch.nn.Module, module: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    layer = clone.get_submodule(module)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    return a, b, float(layer.scaling["default"]), layer.base_layer.weight


@torch.no_grad()
def merged_tensors(clone: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """``unet.<module>.weight`` = ``W_0 + scale B A`` for every adapted module (float64 product, weight dtype)."""
    out = {}
    for m in modules:
        a, b, scale, w0 = _factors(clone, m)
        out[f"unet.{m}.weight"] = (w0.double() + scale * (b.double() @ a.double())).to(w0.dtype).clone()
    return out


@torch.no_grad()
def factor_tensors(clone: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """The trained factors for ``edit.aux``: ``lora.unet.<module>.lora_A`` (r, in) and ``.lora_B`` (out, r),
    with the scale folded into B (so ``W_0 + B A`` is the edit)."""
    out = {}
    for m in modules:
        a, b, scale, _ = _factors(clone, m)
        out[f"{AUX_PREFIX}unet.{m}.lora_A"] = a.detach().clone()
        out[f"{AUX_PREFIX}unet.{m}.lora_B"] = (scale * b.detach()).clone()
    return out
