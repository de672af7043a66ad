"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), the closed-form cross-attention edit.

For every cross-attention key/value projection ``W_old`` (``attn2.to_k`` / ``attn2.to_v``), UCE
solves (RECE paper, eq. 2, with the erase term written as UCE's paper has it)::

    min_W  s_e * sum_{c_i in E} ||W c_i - W_old c_i*||^2  +  s_p * sum_{c_j in P} ||W c_j - W_old c_j||^2
           + lam * ||W - W_old||_F^2

whose minimiser is (RECE eq. 3)::

    W = W_old (s_e sum c_i* c_i^T + s_p sum c_j c_j^T + lam I) (s_e sum c_i c_i^T + s_p sum c_j c_j^T + lam I)^-1

Note: the RECE paper prints the first term of the left factor as ``c_i* c_i*^T``; the minimiser of
its own objective (and UCE's paper and code) has ``c_i* c_i^T``. We implement the minimiser, and
``tests/test_uce.py`` checks it against ``torch.linalg.lstsq``.

**Token positions.** The vectors ``c`` are text-encoder outputs (one per token position). Erased
prompts pair with their targets position by position, ``erase_positions``:

- ``"from_last_word"``: from each prompt's last word token to the end of the padded sequence, cut
  to equal length (position ``k`` of the source after its last word pairs with position ``k`` of
  the target after *its* last word; the end-of-text tokens carry most of a concept). This is what
  UCE's code does for the erase term (``train-scripts/train_erase.py``, ``edit_model``: the
  ``final_token_idx`` slices) and what both presets use.
- ``"all"``: all 77 positions, position ``i`` with position ``i`` (start token included; what the
  RECE code does for its derived embeddings, see :mod:`erasekit.methods.rece`).

Preserved prompts use ``preserve_positions``: ``"from_last_word"`` (the same slice) or ``"all"``
(all 77 positions, as UCE's code feeds its retained texts). For the empty prompt ``""`` the two
coincide (its last word token is the start token).

**Presets** (``erasekit methods``). ``authors`` (the default) is UCE's paper-era public code,
``train_erase.py`` (commit bd5fb51): the empty prompt ``""`` is always retained
(``retain_texts = [''] + preserve_concepts``), retained texts enter at all 77 positions, lambda
0.5, erase scale 1 and, unless given, preserve scale ``max(0.1, 1 / (1 + |P|))`` (1.0 when only
``""`` is retained). It is the default because the UCE paper's numbers were produced by that code.
``paper`` is the objective above as printed, with nothing preserved but ``P``, the
``from_last_word`` slice for preserved prompts too and preserve scale 1. Where the code's target
is ``""`` it substitutes ``" "``; CLIP's tokenizer strips whitespace, so the two are the same
tokens and no option is needed. The code's ``technique="tensor"`` (an alternative target, not its
default) is not implemented.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from erasekit.edit import Edit, EraseRequest
from erasekit.families import family_of
from erasekit.families.closed_forms import per_block_uce
from erasekit.methods.base import register
from erasekit.methods.closed_form import PromptEmbeddings, shared_closed_form_edit, uce_edit_weights
from erasekit.pipeline import base_info, encode_prompts, last_token_index

POSITIONS = ("from_last_word", "all")
Positions = Literal["from_last_word", "all"]


def authors_preserve_scale(n_retained: int) -> float:
    """UCE's code's default preserve scale, ``max(0.1, 1 / n_retained)`` (``train_erase.py``; ``n_retained``
    counts the retained texts, ``""`` included)."""
    return max(0.1, 1.0 / max(n_retained, 1))


def check_positions(name: str, value: str) -> None:
    """Refuse a token-position mode other than ``"from_last_word"`` / ``"all"``, naming the option."""
    if value not in POSITIONS:
        raise ValueError(f"`{name}` must be one of {', '.join(POSITIONS)}, got {value!r}.")


@dataclass
class UCEConfig:
    """UCE hyperparameters; the defaults are the ``authors`` preset (UCE's paper-era code, see the module docstring)."""

    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float | None = field(
        default=None,
        metadata={"help": "lambda_1 / s_p: weight of the preserve terms; None: the authors' max(0.1, 1/#retained)"},
    )
    lamb: float = field(default=0.5, metadata={"help": "lambda_2: weight of ||W - W_old||_F^2"})
    preserve_empty: bool = field(
        default=True, metadata={"help": "also preserve the empty prompt '' (UCE's code always retains it)"}
    )
    erase_positions: Positions = field(
        default="from_last_word",
        metadata={"help": "token positions of the erase pairs: from_last_word (UCE's code) or all (i with i)"},
    )
    preserve_positions: Positions = field(
        default="all", metadata={"help": "token positions of preserved prompts: all (UCE's code) or from_last_word"}
    )
    templates: list[str] = field(
        default_factory=lambda: ["{}"],
        metadata={"help": "prompt templates each concept is expanded with, e.g. ['{}', 'a picture of a {}']"},
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "cross-attention projections to edit"}
    )

    def __post_init__(self) -> None:
        if self.lamb < 0 or self.erase_scale < 0 or (self.preserve_scale is not None and self.preserve_scale < 0):
            raise ValueError(
                "UCE `lamb`, `erase_scale` and `preserve_scale` must be >= 0 (`preserve_scale` may be None)."
            )
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"UCE `templates` must be non-empty and each contain '{{}}', got {self.templates}.")
        bad = set(self.projections) - {"to_k", "to_v"}
        if bad or not self.projections:
            raise ValueError(f"UCE `projections` must be a subset of ('to_k', 'to_v'), got {self.projections}.")
        check_positions("erase_positions", self.erase_positions)
        check_positions("preserve_positions", self.preserve_positions)
        self.projections = tuple(self.projections)

    def resolved_preserve_scale(self, n_retained: int) -> float:
        """``preserve_scale``, or the authors' rule for ``n_retained`` retained prompts when it is None."""
        return authors_preserve_scale(n_retained) if self.preserve_scale is None else float(self.preserve_scale)


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


def aligned_token_embeddings(
    pipe, sources: list[str], targets: list[str], positions: Positions = "from_last_word"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings of ``sources`` and ``targets`` paired position by position: (n, d) each.

    ``positions="from_last_word"`` (UCE's code, the module docstring): from each one's last word token
    to the end, cut to equal length. ``"all"``: all 77 positions of each prompt, ``i`` with ``i``.
    """
    check_positions("positions", positions)
    if len(sources) != len(targets):
        raise ValueError(f"`sources` and `targets` must pair up, got {len(sources)} and {len(targets)} prompts.")
    emb_s = encode_prompts(pipe, sources)
    emb_t = encode_prompts(pipe, targets)
    if positions == "all":
        return emb_s.reshape(-1, emb_s.shape[-1]).float(), emb_t.reshape(-1, emb_t.shape[-1]).float()
    idx_s, idx_t = last_token_index(pipe, sources), last_token_index(pipe, targets)
    length = emb_s.shape[1]
    xs, ys = [], []
    for k in range(len(sources)):
        n = length - max(idx_s[k], idx_t[k])
        xs.append(emb_s[k, idx_s[k] : idx_s[k] + n])
        ys.append(emb_t[k, idx_t[k] : idx_t[k] + n])
    return torch.cat(xs).float(), torch.cat(ys).float()


def preserve_embeddings(pipe, prompts: list[str], positions: Positions, dim: int) -> torch.Tensor:
    """The preserved vectors ``c_j`` of ``prompts`` at ``positions`` (see :func:`aligned_token_embeddings`): (m, dim)."""
    if not prompts:
        return torch.zeros((0, dim))
    return aligned_token_embeddings(pipe, prompts, prompts, positions)[0]


def closed_form_edit(
    pipe,
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    config: UCEConfig,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    preserve_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`uce_closed_form` for every cross-attention projection of ``pipe``'s current weights (or,
    for a name in ``weights``, that tensor instead); returns the new tensors by parameter name.
    ``preserve_scale`` (default: the config's, which must then be a number) weights the preserve terms.

    Every projection reads the same text embeddings, so ``W_new = W_old M`` with one (d, d) factor
    ``M = L R^-1`` for all of them: one Cholesky factorisation of ``R`` per edit, in float64, then one
    float64 product per projection (:func:`erasekit.methods.closed_form.shared_closed_form_edit`;
    equal to the per-projection solve, ``tests/test_closed_form.py``).
    """
    return shared_closed_form_edit(
        pipe, erase_in, erase_target, preserve, config, weights, preserve_scale=preserve_scale
    )


def uce_embeddings(
    table: PromptEmbeddings, erased: list[str], targets: list[str], preserved: list[str], config: UCEConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_i, c_i*, c_j)`` of UCE's eq. 3 from an encoded ``table`` at the config's token positions."""
    c_in, c_tgt = table.pairs(erased, targets, config.erase_positions)
    return c_in, c_tgt, table.rows(preserved, config.preserve_positions, c_in.shape[1])


def uce_prompts(
    request: EraseRequest, config: UCEConfig, *, preserve_empty: bool | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(erased prompts, their target prompts, preserved prompts) after template expansion.

    The empty prompt is never template-expanded: a ``""`` in ``request.preserve`` is kept as ``""``,
    and ``preserve_empty`` (default: ``config.preserve_empty``, when the config has it) adds it once.
    """
    erased = expand(request.erase, config.templates)
    targets = [" ".join(t.format(request.target).split()) for _ in request.erase for t in config.templates]
    preserved = expand([c for c in request.preserve if c], config.templates)
    keep_empty = getattr(config, "preserve_empty", False) if preserve_empty is None else preserve_empty
    if "" in request.preserve or keep_empty:
        preserved = ["", *preserved]
    return erased, targets, preserved


@register(
    "uce",
    UCEConfig,
    "Unified Concept Editing: closed-form edit of cross-attention K/V (RECE eq. 3)",
    presets={
        "paper": (
            "RECE eq. 3 as printed: preserve only P, at the from-last-word slice, preserve scale 1",
            {"preserve_empty": False, "preserve_positions": "from_last_word", "preserve_scale": 1.0},
        ),
        "authors": (
            "UCE's paper-era train_erase.py: '' always retained, retained texts at all 77 positions, lambda 0.5, "
            "preserve scale max(0.1, 1/#retained); the default: the paper's numbers came from it",
            {},
        ),
    },
    default_preset="authors",
)
@torch.no_grad()
def erase_uce(pipe, request: EraseRequest, config: UCEConfig, *, generator=None, progress: bool = True) -> Edit:
    """Erase ``request.erase`` with UCE (RECE paper eq. 3; the module docstring says where the ``authors``
    preset departs from the paper); the pipeline is left unchanged."""
    t0, p0 = time.perf_counter(), time.process_time()
    erased, targets, preserved = uce_prompts(request, config)
    scale = config.resolved_preserve_scale(len(preserved))
    fam = family_of(pipe)
    if not fam.shared_kv_inputs():  # SD3: each block's K/V read their own text stream (erasekit.families)
        t_text, p_text = 0.0, 0.0  # the per-block solve encodes inside; its time is all "closed_form"
        tensors = per_block_uce(
            pipe, fam, erased, targets, preserved, config, preserve_scale=scale, solve=uce_edit_weights
        )
    else:
        table = PromptEmbeddings(pipe, erased + targets + preserved)  # each distinct prompt encoded once
        c_in, c_tgt, c_pres = uce_embeddings(table, erased, targets, preserved, config)
        t_text, p_text = time.perf_counter() - t0, time.process_time() - p0
        tensors = closed_form_edit(pipe, c_in, c_tgt, c_pres, config, preserve_scale=scale)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - p0
    return Edit(
        tensors=tensors,
        method="uce",
        config=asdict(config),
        request=request,
        base=dict(base_info(pipe)),
        trace={
            "erase_prompts": erased,
            "target_prompts": targets,
            "preserve_prompts": preserved,
            "preserve_scale": scale,
            "seconds": {
                "text": round(t_text, 4),
                "closed_form": round(seconds - t_text, 4),
                "total": round(seconds, 4),
                "text_cpu": round(p_text, 4),
                "closed_form_cpu": round(cpu - p_text, 4),
            },
        },
    )
