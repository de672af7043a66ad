"""UCE: Unified Concept Editing (Gandikota et al., 2024), the closed-form cross-attention edit.

For every cross-attention key/value projection ``W_old`` (``attn2.to_k`` / ``attn2.to_v``), UCE
solves (RECE paper, eq. 2, with the erase term written as UCE's paper has it)::

    min_W  s_e * sum_{c_i in E} ||W c_i - W_old c_i*||^2  +  s_p * sum_{c_j in P} ||W c_j - W_old c_j||^2
           + lam * ||W - W_old||_F^2

whose minimiser is (RECE eq. 3)::

    W = W_old (s_e sum c_i* c_i^T + s_p sum c_j c_j^T + lam I) (s_e sum c_i c_i^T + s_p sum c_j c_j^T + lam I)^-1

Note: the RECE paper prints the first term of the left factor as ``c_i* c_i*^T``; the minimiser of
its own objective (and UCE's paper and code) has ``c_i* c_i^T``. We implement the minimiser, and
``tests/test_uce.py`` checks it against ``torch.linalg.lstsq``.

The vectors ``c`` are text-encoder outputs at the token positions UCE's code uses: from a prompt's
last word token to the end of the padded sequence (the end-of-text tokens carry most of a
concept), aligned position by position between an erased prompt and its target prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from erasekit.edit import Edit, EraseRequest
from erasekit.methods.base import register
from erasekit.pipeline import base_info, cross_attention_modules, encode_prompts, last_token_index


@dataclass
class UCEConfig:
    """UCE hyperparameters (defaults of the authors' code: erase scale 1, preserve scale 1, lambda 0.5)."""

    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "lambda_1 / s_p: weight of the preserve terms"})
    lamb: float = field(default=0.5, metadata={"help": "lambda_2: weight of ||W - W_old||_F^2"})
    templates: list[str] = field(
        default_factory=lambda: ["{}"],
        metadata={"help": "prompt templates each concept is expanded with, e.g. ['{}', 'a picture of a {}']"},
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "cross-attention projections to edit"}
    )

    def __post_init__(self) -> None:
        if self.lamb < 0 or self.erase_scale < 0 or self.preserve_scale < 0:
            raise ValueError("UCE `lamb`, `erase_scale` and `preserve_scale` must be >= 0.")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"UCE `templates` must be non-empty and each contain '{{}}', got {self.templates}.")
        bad = set(self.projections) - {"to_k", "to_v"}
        if bad or not self.projections:
            raise ValueError(f"UCE `projections` must be a subset of ('to_k', 'to_v'), got {self.projections}.")
        self.projections = tuple(self.projections)


def uce_closed_form(
    w_old: torch.Tensor,
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> torch.Tensor:
    """RECE eq. 3 (UCE): the ``W`` minimising the objective in the module docstring.

    Shapes: ``w_old`` (out, d); ``erase_in`` and ``erase_target`` (n, d), row i = c_i and c_i*;
    ``preserve`` (m, d). Solved in float64, returned in ``w_old``'s dtype.
    """
    d = w_old.shape[1]
    w = w_old.double()
    ci, ct, cp = erase_in.double(), erase_target.double(), preserve.double()
    eye = torch.eye(d, dtype=torch.float64, device=w.device)
    pres = cp.T @ cp  # (d, d) = sum c_j c_j^T
    left = erase_scale * (ct.T @ ci) + preserve_scale * pres + lamb * eye  # sum c_i* c_i^T + ...
    right = erase_scale * (ci.T @ ci) + preserve_scale * pres + lamb * eye
    # W = W_old L R^-1  <=>  R^T W^T = (W_old L)^T ; R is symmetric.
    return torch.linalg.solve(right, (w @ left).T).T.to(w_old.dtype)


def expand(concepts: list[str], templates: list[str]) -> list[str]:
    """Every concept in every template, whitespace-normalised."""
    return [" ".join(t.format(c).split()) for c in concepts for t in templates]


def aligned_token_embeddings(pipe, sources: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of ``sources`` and ``targets`` from each one's last word token to the end,
    cut to equal length so position k of a source pairs with position k of its target: (n, d) each."""
    emb_s = encode_prompts(pipe, sources)
    emb_t = encode_prompts(pipe, targets)
    idx_s, idx_t = last_token_index(pipe, sources), last_token_index(pipe, targets)
    length = emb_s.shape[1]
    xs, ys = [], []
    for k in range(len(sources)):
        n = length - max(idx_s[k], idx_t[k])
        xs.append(emb_s[k, idx_s[k] : idx_s[k] + n])
        ys.append(emb_t[k, idx_t[k] : idx_t[k] + n])
    return torch.cat(xs).float(), torch.cat(ys).float()


def closed_form_edit(
    pipe,
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    config: UCEConfig,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply :func:`uce_closed_form` to every cross-attention projection of ``pipe``'s current
    weights (or, for a name in ``weights``, to that tensor instead: RECE edits its own running
    copy); returns the new tensors by parameter name."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, attn in cross_attention_modules(pipe.unet).items():
        for proj in config.projections:
            name = f"unet.{mod_name}.{proj}.weight"
            w_old = weights[name] if weights is not None and name in weights else getattr(attn, proj).weight.detach()
            w_new = uce_closed_form(
                w_old,
                erase_in.to(w_old.device),
                erase_target.to(w_old.device),
                preserve.to(w_old.device),
                erase_scale=config.erase_scale,
                preserve_scale=config.preserve_scale,
                lamb=config.lamb,
            )
            out[name] = w_new
    return out


def uce_prompts(request: EraseRequest, config: UCEConfig) -> tuple[list[str], list[str], list[str]]:
    """(erased prompts, their target prompts, preserved prompts) after template expansion."""
    erased = expand(request.erase, config.templates)
    targets = [" ".join(t.format(request.target).split()) for _ in request.erase for t in config.templates]
    preserved = expand(request.preserve, config.templates)
    return erased, targets, preserved


@register(
    "uce",
    UCEConfig,
    "Unified Concept Editing: closed-form edit of cross-attention K/V (RECE eq. 3)",
    presets={
        "paper": ("UCE paper / RECE eq. 3 as printed", {}),
        "authors": ("the authors' code (its differences from the paper are not yet separate options)", {}),
    },
    default_preset="paper",
)
@torch.no_grad()
def erase_uce(pipe, request: EraseRequest, config: UCEConfig, *, generator=None, progress: bool = True) -> Edit:
    """Erase ``request.erase`` with UCE (RECE paper eq. 3); the pipeline is left unchanged."""
    erased, targets, preserved = uce_prompts(request, config)
    c_in, c_tgt = aligned_token_embeddings(pipe, erased, targets)
    if preserved:
        c_pres, _ = aligned_token_embeddings(pipe, preserved, preserved)
    else:
        c_pres = c_in.new_zeros((0, c_in.shape[1]))
    tensors = closed_form_edit(pipe, c_in, c_tgt, c_pres, config)
    return Edit(
        tensors=tensors,
        method="uce",
        config=asdict(config),
        request=request,
        base=dict(base_info(pipe)),
        trace={"erase_prompts": erased, "target_prompts": targets, "preserve_prompts": preserved},
    )
