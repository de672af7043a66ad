"""Memory options the large families need when fine-tuning: half-precision weights with fp32 master
parameters, gradient checkpointing, and 8-bit Adam (when bitsandbytes is importable).

- **Half-precision weights** come from ``load_pipeline(..., dtype=torch.bfloat16)`` (or float16). When
  the denoiser is in half precision, the fine-tuning core keeps an fp32 *master* copy of every
  trainable tensor (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1): the forward and
  backward passes run on the half-precision weights, each gradient is cast to fp32 onto its master,
  the optimizer updates the masters, and the masters are rounded back into the model. Updates of
  size ~lr * 1e-5 that bf16's 8-bit mantissa would round to zero thus accumulate. Checkpoints hold
  the masters, so a resumed run continues from the fp32 values.
- **Gradient checkpointing** (``gradient_checkpointing=True``) recomputes the denoiser's block
  activations in the backward pass instead of storing them (diffusers'
  ``enable_gradient_checkpointing``): the same gradients, less activation memory, ~30% more compute.
- **8-bit Adam** (``optimizer="adam8bit"``, Dettmers et al. 2022) stores Adam's moments in 8 bits
  (``bitsandbytes.optim.Adam8bit``); refused with an error naming the fix when bitsandbytes is not
  importable. It changes the result, so a run records it in its identity (and config hash).

Set them on a pipeline with :func:`set_memory_options`; :func:`memory_options` reads them back
(defaults: no checkpointing, plain Adam). Only the fine-tuning loop reads them: :func:`check_applies`
refuses them for a closed-form method, both in ``erasekit erase --gradient-checkpointing / --optimizer``
and in the library's :func:`erasekit.erase` (``methods.base.check_memory_options``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

OPTIMIZERS = ("adam", "adam8bit")
_ATTR = "_erasekit_memory"


@dataclass(frozen=True)
class MemoryOptions:
    """How a fine-tuning run spends memory (none of these is a method hyperparameter)."""

    gradient_checkpointing: bool = False
    optimizer: Literal["adam", "adam8bit"] = "adam"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.optimizer == "adam8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "`optimizer` 'adam8bit' needs bitsandbytes, which is not installed here: `pip install bitsandbytes` "
                "(a CUDA machine), or use optimizer='adam' (--optimizer adam)."
            )

    def identity(self) -> dict[str, Any]:
        """What changes a run's result: the optimizer, when it is not the default (checkpointing does not)."""
        return {"optimizer": self.optimizer} if self.optimizer != "adam" else {}


def check_applies(options: MemoryOptions, method: str, fine_tuned: Sequence[str], *, given: Sequence[str] = ()) -> None:
    """Refuse ``options`` that differ from the defaults (or are named in ``given``: set explicitly, e.g. a
    command-line flag) for ``method`` unless it is one of the ``fine_tuned`` methods (those that run
    :func:`erasekit.finetune.finetune`): a closed-form method would silently ignore them."""
    if method in fine_tuned:
        return
    default = MemoryOptions()
    names = [n for n, v in asdict(options).items() if n in given or v != getattr(default, n)]
    if names:
        flags = ", ".join(f"`{n}` (--{n.replace('_', '-')})" for n in names)
        raise ValueError(
            f"{flags} applies to fine-tuning only, and method {method!r} does not fine-tune (closed form): drop it, "
            f"or choose a fine-tuned method ({', '.join(fine_tuned)})."
        )


def set_memory_options(pipe, **options: Any) -> MemoryOptions:
    """Attach :class:`MemoryOptions` to ``pipe`` (validated now, so a bad one fails before any run)."""
    opts = MemoryOptions(**options)
    setattr(pipe, _ATTR, opts)
    return opts


def memory_options(pipe) -> MemoryOptions:
    """The pipeline's :class:`MemoryOptions` (defaults when none were set)."""
    return getattr(pipe, _ATTR, None) or MemoryOptions()


def make_optimizer(groups: list[dict[str, Any]], options: MemoryOptions) -> torch.optim.Optimizer:
    """Adam over ``groups`` (torch's, or bitsandbytes' 8-bit Adam)."""
    if options.optimizer == "adam8bit":
        import bitsandbytes as bnb

        return bnb.optim.Adam8bit(groups)
    return torch.optim.Adam(groups)


class MasterWeights:
    """fp32 master copies of half-precision trainable parameters (module docstring).

    ``masters[name]`` is what the optimizer updates; :meth:`graph_tensor` maps a master to the model
    parameter that appears in the loss's graph; :meth:`sync_` rounds the masters into the model.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.masters = {n: p.detach().float().clone().requires_grad_(True) for n, p in params.items()}
        self._to_param = {id(self.masters[n]): p for n, p in params.items()}

    @staticmethod
    def needed(params: dict[str, torch.nn.Parameter]) -> bool:
        return any(p.dtype in (torch.float16, torch.bfloat16) for p in params.values())

    def graph_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return self._to_param.get(id(t), t)

    @torch.no_grad()
    def sync_(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.masters[n].to(p.dtype))

    @torch.no_grad()
    def load_(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the masters (and the model) from checkpointed values."""
        for n, m in self.masters.items():
            m.copy_(weights[n].float())
        self.sync_()

    def describe(self) -> dict[str, Any]:
        return {"master_dtype": "float32", "n_tensors": len(self.masters)}


def describe(options: MemoryOptions, masters: MasterWeights | None) -> dict[str, Any]:
    """JSON-ready record of the memory settings of a run (its trace)."""
    return {**asdict(options), "fp32_master_weights": masters is not None}
