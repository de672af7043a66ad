"""Adversarial Preservation (Bui et al., NeurIPS 2024): erase while preserving the concept the erasure hurts most.

The objective (paper eq. 5; slides eq. 10)::

    min_theta'  max_{pi in simplex}  E_{c_e}  ||eps_theta'(c_e) - eps_theta(c_t)||^2                 (L1)
                                         + lambda ||eps_theta'(G(pi) . R) - eps_theta(G(pi) . R)||^2   (L2)

``R`` is the concept space of each erased concept, ``G`` the Gumbel-Softmax (slides eq. 11) of
learnable logits with temperature ``tau`` (``hard``: the straight-through one-hot of eq. 12;
``soft``: the mixture); ``G(pi) . R`` mixes the candidates' (77, D) text-encoder outputs, as the
authors' code does. Each step (Algorithms 1-2): ``n_iter`` ascent steps on the logits to maximise L2
(step size ``search_lr``), then a fresh Gumbel sample ``c_a`` and one descent step on the model with
``L1 + lambda * L2(c_a)``. The chosen concept is logged at every step (the paper's Fig. 4 and 6).
``search="pgd"`` is the continuous search of Fig. 4 (top row) and ``search="fixed"`` preserves one
fixed concept (Fig. 1b and 3).

**Two presets.** ``paper`` is eq. 5 and Algorithms 1-2 as printed; ``authors`` (the default, since the
paper's Table 1 was made with it) is what ``train_adversarial_gumbel.py`` of
tuananhbui89/Erasing-Adversarial-Preservation does. Each difference is an option:

==================  ===================================  ==============================================
option              paper                                authors (and why it matters)
==================  ===================================  ==============================================
``search_space``    ``nearest``: cosine top-K of pooled  ``stratified``: L2 on the whole 77-token
                    embeddings (appendix B.1)            sequence, the ``pool`` = 1000 closest, ``k`` =
                                                         100 spread near to far by 1-D k-means
                                                         (:func:`erasekit.concepts.stratified_concepts`);
                                                         the nearest set is mostly synonyms
``search_gradient`` ``exact``: eq. 5's gradient through  ``semi``: the frozen model's output is a
                    both the edited and frozen model     constant (computed under no_grad)
``loss_space``      ``eps``: noise predictions           ``x0``: the predicted ``x_0 = (z - sqrt(1-abar)
                                                         eps) / sqrt(abar)``, which weights timestep t
                                                         by (1-abar)/abar (1.7e-3 at t=1, 172 at t=981)
``search_loop``     ``same``: ``n_iter`` = 2 ascents on  ``fresh`` with ``n_iter`` = 1: descent and
                    the descent's z_t                    ascent alternate 1:1, every ascent with its own
                                                         DDIM step, z_t and Gumbel noise
``l2_latent``       ``erased``: L2 on c_e's z_t          ``own``: L2 on a z_t sampled with c_a itself
``search_state``    ``shared``: one Adam over all rows   ``per_concept``: one Adam per erased concept, a
                                                         row not drawn does not move
``negative_guidance`` 0: L1's target eps(c_t)            1: ESD's target eps(c_t) - (eps(c_e) - eps(c_t))
``search_lr``       1e-3 (appendix)                      1e-2 (the scripts)
``zt_producer``     ``exact`` (frozen model)             ``trained``: z_t sampled by the model being trained
==================  ===================================  ==============================================

``zt_producer="pooled"`` (neither preset's; issue 13) serves the erased concepts' z_t from the core's
pool of frozen trajectories and the latents sampled with ``c_a`` from :class:`ConceptTrajectories`
(frozen trajectories per candidate concept): no step runs a DDIM run of its own. AP's fast setting:
2.5x faster than ``exact`` for the ``authors`` preset, and, by a rule fixed before the study, no worse
at the operating point on the miniature than the preset's ``trained`` sampler (3 seeds: test PSR-1
81.1 vs 71.6, ESR-1 95.6 vs 96.9; ESR-3 lower, 66.7 vs 78.5; about twice the steps to the target;
``bench/results/ap_concept_pool``).

Which differences make the ``authors`` preset erase: on the miniature's Table 1 (split 0), ``paper``
reaches test ESR-1 6.4%. Setting one option to the ``authors`` value gives 81.6% (``negative_guidance``),
63.6% (``zt_producer``) or 30.0% (``loss_space``), and none reaches the 95% target alone.
``negative_guidance`` and ``zt_producer`` together reach it with the paper's search: 100.0%
(``bench/results/ap_paper_ablation``).

Details of the ``authors`` preset, and where it is not the code line by line:

* The loop: their ``i``-th of ``2 x iterations`` iterations is a descent when ``i`` is even, an
  ascent otherwise (``pgd_num_steps = 2``), each with a fresh word, DDIM step, start code and Gumbel
  sample. Here step ``s`` runs the ascent that follows descent ``s - 1`` and then descent ``s`` (no
  ascent at step 0: their iteration 0 is a descent), on the step's erased concept rather than a
  fresh draw (the same uniform law per iteration).
* Their ``z_r`` starts from the same noise as the erased concept's ``z``; the core does not expose
  that noise, so ``z_r`` starts from an independent draw of the step's generator (same DDIM step).
* x0 uses ``abar`` of the timestep the model is evaluated at; their code evaluates at a DDPM timestep
  drawn in ``[20 i, 20 (i + 1))`` and converts with the DDIM ``abar`` of grid index ``i`` (the finetune
  core's docstring explains why its timestep is the latent's own).
* Per-concept optimizer state: their one Adam holds one tensor per erased word; with
  ``zero_grad()`` setting gradients to None (torch >= 2.0) a word not drawn is skipped. With the
  torch 1.x default (zeroed gradients) it would keep moving on its momentum, as ``shared`` does.
* Their search space keeps the erased word itself when the vocabulary holds it; we never do.
* Nudity in their scripts: ``k`` = 50 from ``pool`` = 2000 and ``train_method="noxattn"``; set them.

Plain ascent vs Adam: Alg. 1 writes ``pi <- pi + eta grad``; both presets use Adam on the logits as
the code does (``search_optimizer="sgd"`` gives Alg. 1 literally). At step 0 the edited and original
models coincide, so L2 and its gradient are 0 and plain ascent with a small eta would barely move.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from erasekit.concepts import load_vocabulary, nearest_concepts, stratified_concepts
from erasekit.edit import Edit, EraseRequest, tensors_digest
from erasekit.finetune import (
    FinetuneConfig,
    FinetuneContext,
    LossFunction,
    StepBatch,
    StepOutput,
    ZtProducerName,
    finetune,
)
from erasekit.lora_train import check_lora_rank
from erasekit.methods.base import register
from erasekit.pipeline import base_info

Relaxation = Literal["hard", "soft", "topk"]
PAPER_K = 100  # appendix B.1: K = 100 (50 for nudity)
AUTHORS_POOL = 1000  # the scripts' --gumbel_k_closest (2000 for nudity)
SEARCHING = ("gumbel", "pgd")  # the searches that have a concept space, logits or a delta to ascend


# ------------------------------------------------------------------------------------------ Gumbel-Softmax
def gumbel_softmax(
    logits: torch.Tensor,
    temperature: float,
    mode: Relaxation = "hard",
    *,
    topk: int = 5,
    generator: torch.Generator | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Gumbel-Softmax weights over the last dimension (slides eqs. 11-12).

    ``y = softmax((l + g) / tau)`` with Gumbel noise ``g = -log(-log u)``; ``hard`` returns the
    straight-through one-hot ``onehot(argmax y) + (y - sg(y))`` (exactly one-hot forward, the soft
    gradient backward); ``soft`` returns ``y``; ``topk`` keeps the ``topk`` largest weights of ``y``
    and renormalises them (the AGE code's default relaxation).
    """
    if not temperature > 0:
        raise ValueError(f"Gumbel-Softmax `temperature` must be > 0, got {temperature}.")
    u = torch.rand(logits.shape, generator=generator).to(logits.device, logits.dtype)
    g = -torch.log(-torch.log(u + eps) + eps)
    y = torch.softmax((logits + g) / temperature, dim=-1)
    if mode == "soft":
        return y
    if mode == "hard":
        one_hot = F.one_hot(y.argmax(dim=-1), y.shape[-1]).to(y.dtype)
        return one_hot + (y - y.detach())
    if mode == "topk":
        k = min(int(topk), y.shape[-1])
        if k <= 0:
            raise ValueError(f"`topk` must be > 0, got {topk}.")
        kth = torch.topk(y, k, dim=-1).values[..., -1:]
        masked = y * (y >= kth).to(y.dtype)
        return masked / masked.sum(dim=-1, keepdim=True)
    raise ValueError(f"Gumbel-Softmax `mode` must be 'hard', 'soft' or 'topk', got {mode!r}.")


# ------------------------------------------------------------------------------------------ losses
EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (z, t, cond) -> eps
PredictionLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x_0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` per row (DDPM eq. 15; the AP/AGE code's
    "DDIM inversion to x_0"); ``alpha_bar`` is (B,)."""
    a = alpha_bar.reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def prediction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    *,
    space: Literal["eps", "x0"],
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of two noise predictions made at latents ``z`` (B, ...) and timesteps ``t`` (B,).

    ``eps``: ``||pred - target||^2`` (paper eq. 5). ``x0``: the same for the ``x_0`` each implies
    (:func:`predicted_x0`), as the authors' code compares; since both share ``z``, the per-sample
    loss is the ``eps`` one times ``(1 - abar_t) / abar_t`` (``tests/test_ap.py`` checks it).
    """
    if space == "eps":
        return F.mse_loss(pred, target)
    if space == "x0":
        abar = alphas_cumprod.to(z.device)[t.long().cpu()].to(z.device)
        return F.mse_loss(predicted_x0(z, pred, abar), predicted_x0(z, target, abar))
    raise ValueError(f"`loss_space` must be 'eps' or 'x0', got {space!r}.")


def preservation_objective(
    edited: EpsModel,
    frozen: EpsModel,
    z: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    gradient: Literal["exact", "semi"],
    loss: PredictionLoss,
) -> torch.Tensor:
    """AP's search objective L2(cond) = ||eps_theta'(z, cond) - eps_theta(z, cond)||^2 (eq. 5), to maximise.

    ``exact`` differentiates both terms with respect to ``cond`` (the gradient of eq. 5);
    ``semi`` treats the frozen model's output as a constant (the authors compute it under no_grad),
    so ``d L2 / d cond = J_edited^T dL/d eps'`` only.
    """
    new = edited(z, t, cond)
    if gradient == "semi":
        with torch.no_grad():
            old = frozen(z, t, cond)
    elif gradient == "exact":
        old = frozen(z, t, cond)
    else:
        raise ValueError(f"`search_gradient` must be 'exact' or 'semi', got {gradient!r}.")
    return loss(new, old, z, t)


# ------------------------------------------------------------------------------------------ searches
Objective = Callable[[torch.Tensor], torch.Tensor]  # conditioning (B, 77, D) -> scalar to maximise


def _make_optimizer(params: list[torch.Tensor], kind: str, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"`search_optimizer` must be 'adam' or 'sgd', got {kind!r}.")


def _optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_optimizer_state(prefix: str, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        if key.startswith(prefix + "."):
            i, _, k = key[len(prefix) + 1 :].partition(".")
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


class Search:
    """Interface of a concept search: ascend an objective, then choose the conditioning for each row."""

    def ascend(self, objective: Objective, rows: list[int], generator: torch.Generator) -> list[float]:
        """Ascent steps on the search variables; returns the objective's values."""
        return []

    def choose(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The chosen conditioning (B, 77, D), detached, and one JSON-ready record per row."""
        raise TypeError(f"{type(self).__name__} must implement choose().")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        return None


class GumbelSearch(Search):
    """Learnable logits over each erased concept's candidate set ``R`` (AP eq. 5 and Alg. 1; AGE eq. 14).

    ``embeddings`` is (E, K, 77, D): the text-encoder outputs of the K candidates of each of the E
    erased concepts; ``names`` the candidates' names (E lists of K). ``state="shared"`` keeps all
    logits in one tensor under one optimizer (a row not drawn at a step gets a zero gradient and
    Adam still moves it on its momentum); ``"per_concept"`` gives every row its own tensor and
    optimizer, stepped only when the row is drawn (the authors' one tensor per erased word).
    """

    def __init__(
        self,
        names: list[list[str]],
        embeddings: torch.Tensor,
        *,
        temperature: float,
        relaxation: Relaxation,
        topk: int,
        n_iter: int,
        lr: float,
        optimizer: str,
        state: Literal["shared", "per_concept"] = "shared",
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if state not in ("shared", "per_concept"):
            raise ValueError(f"`search_state` must be 'shared' or 'per_concept', got {state!r}.")
        self.names = names
        self.embeddings = embeddings
        self.temperature, self.relaxation, self.topk, self.n_iter = temperature, relaxation, topk, n_iter
        self.state = state
        e, k = embeddings.shape[:2]
        dev = embeddings.device
        if state == "shared":
            self._leaves = [torch.zeros(e, k, device=dev, dtype=torch.float32, requires_grad=True)]
            self._opts = [_make_optimizer(self._leaves, optimizer, lr)]
        else:
            self._leaves = [torch.zeros(k, device=dev, dtype=torch.float32, requires_grad=True) for _ in range(e)]
            self._opts = [_make_optimizer([leaf], optimizer, lr) for leaf in self._leaves]

    @property
    def logits(self) -> torch.Tensor:
        """All logits (E, K) (the live tensor with ``shared``, a stacked copy with ``per_concept``)."""
        return self._leaves[0] if self.state == "shared" else torch.stack(self._leaves)

    def _rows_logits(self, rows: list[int]) -> torch.Tensor:
        if self.state == "shared":
            return self._leaves[0][rows]
        return torch.stack([self._leaves[r] for r in rows])

    def _mix(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        w = gumbel_softmax(
            self._rows_logits(rows), self.temperature, self.relaxation, topk=self.topk, generator=generator
        )
        cond = torch.einsum("bk,bkld->bld", w.to(self.embeddings.dtype), self.embeddings[rows])  # (B, 77, D)
        return w, cond

    def ascend(self, objective: Objective, rows: list[int], generator: torch.Generator) -> list[float]:
        values = []
        drawn = list(dict.fromkeys(rows))
        leaves = self._leaves if self.state == "shared" else [self._leaves[r] for r in drawn]
        opts = self._opts if self.state == "shared" else [self._opts[r] for r in drawn]
        for _ in range(self.n_iter):
            _, cond = self._mix(rows, generator)
            value = objective(cond)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = -grad if grad is not None else torch.zeros_like(leaf)  # maximise
            for opt in opts:
                opt.step()
            for leaf in leaves:
                leaf.grad = None
            values.append(float(value.detach()))
        return values

    @torch.no_grad()
    def choose(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        w, cond = self._mix(rows, generator)
        probs = torch.softmax(self._rows_logits(rows), dim=-1)
        records = []
        for b, r in enumerate(rows):
            top = torch.topk(w[b], min(3 if self.relaxation != "topk" else self.topk, w.shape[-1]))
            chosen = [
                (self.names[r][int(i)], round(float(v), 4))
                for v, i in zip(top.values, top.indices, strict=True)
                if v > 0
            ]
            records.append({"concept": chosen[0][0], "weights": chosen, "p": round(float(probs[b, top.indices[0]]), 4)})
        return cond.detach(), records

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.state == "shared":
            return {"logits": self.logits.detach(), **_optimizer_state("search_opt", self._opts[0])}
        out = {"logits": self.logits.detach()}
        for r, opt in enumerate(self._opts):
            out.update(_optimizer_state(f"search_opt.{r}", opt))
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.state == "shared":
            self._leaves[0].copy_(tensors["logits"])
            _load_optimizer_state("search_opt", self._opts[0], tensors)
            return
        for r, (leaf, opt) in enumerate(zip(self._leaves, self._opts, strict=True)):
            leaf.copy_(tensors["logits"][r])
            _load_optimizer_state(f"search_opt.{r}", opt, tensors)


class PGDSearch(Search):
    """Continuous search (AP paper Fig. 4, top row): ``c_a = c_e + delta``, delta by projected gradient
    ascent in an L-infinity ball of radius ``radius``; ``delta`` persists across steps per erased concept.
    The record names the candidate whose embedding is closest (cosine) to ``c_a``, for the log."""

    def __init__(
        self,
        centers: torch.Tensor,
        *,
        radius: float,
        n_iter: int,
        lr: float,
        optimizer: str,
        names: list[list[str]] | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> None:
        if not radius > 0:
            raise ValueError(f"`pgd_radius` must be > 0, got {radius}.")
        self.centers = centers  # (E, 77, D)
        self.radius, self.n_iter = radius, n_iter
        self.delta = torch.zeros_like(centers, dtype=torch.float32, requires_grad=True)
        self.opt = _make_optimizer([self.delta], optimizer, lr)
        self.names, self.embeddings = names, embeddings

    def ascend(self, objective: Objective, rows: list[int], generator: torch.Generator) -> list[float]:
        values = []
        for _ in range(self.n_iter):
            value = objective(self.centers[rows] + self.delta[rows].to(self.centers.dtype))
            (grad,) = torch.autograd.grad(value, [self.delta])
            self.delta.grad = -grad
            self.opt.step()
            self.delta.grad = None
            with torch.no_grad():
                self.delta.clamp_(-self.radius, self.radius)  # projection onto the L-inf ball
            values.append(float(value.detach()))
        return values

    @torch.no_grad()
    def choose(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        cond = self.centers[rows] + self.delta[rows].to(self.centers.dtype)
        records = []
        for b, r in enumerate(rows):
            rec: dict[str, Any] = {
                "delta_linf": round(float(self.delta[r].abs().max()), 5),
                "delta_l2": round(float(self.delta[r].norm()), 5),
            }
            if self.names is not None and self.embeddings is not None:
                sims = F.cosine_similarity(
                    self.embeddings[r].flatten(1).float(), cond[b].flatten().float()[None], dim=-1
                )
                i = int(sims.argmax())
                rec.update(
                    concept=f"~{self.names[r][i]}", nearest=self.names[r][i], similarity=round(float(sims[i]), 5)
                )
            records.append(rec)
        return cond.detach(), records

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.detach(), **_optimizer_state("search_opt", self.opt)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.delta.copy_(tensors["delta"])
        _load_optimizer_state("search_opt", self.opt, tensors)


class FixedSearch(Search):
    """No search: always the same concept (the neutral/fixed preservation of AP's Fig. 1b and 3)."""

    def __init__(self, concept: str, embedding: torch.Tensor) -> None:
        self.concept, self.embedding = concept, embedding  # (77, D)

    def choose(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        return self.embedding.expand(len(rows), -1, -1), [{"concept": self.concept} for _ in rows]


# ------------------------------------------------------------------------------------------ config
def option(default: Any = None, help: str = "", *, factory: Any = None, **used_when: tuple) -> Any:  # noqa: A002
    """A config field with help text and, when given, the settings under which it is read (``used_when``)."""
    meta: dict[str, Any] = {"help": help}
    if used_when:
        meta["used_when"] = used_when
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_ZT = FinetuneConfig.__dataclass_fields__["zt_producer"].metadata["help"]


@dataclass
class APConfig(FinetuneConfig):
    """Adversarial Preservation. Defaults: the ``authors`` preset (train_adversarial_gumbel.py and
    run_imagenette.sh: 1000 steps, Adam lr 1e-5, cross-attention, K = 100 of the 1000 nearest,
    1 ascent per descent, search lr 1e-2, temperature 2, hard, lambda 1, eta 1, x0 space)."""

    zt_producer: ZtProducerName = option("trained", _ZT)
    lam: float = option(1.0, "lambda: weight of the preservation loss L2")
    search: Literal["gumbel", "pgd", "fixed"] = option(
        "gumbel", "gumbel (discrete, paper), pgd (continuous, Fig. 4 top) or fixed"
    )
    vocabulary: str = option(
        "auto",
        "concept space: clip, shapes, wordfreq[:N], a file; auto = shapes on the miniature, else clip",
        search=SEARCHING,
    )
    k: int | None = option(
        None, "K concepts in R per erased concept; None = 100, or the whole vocabulary if smaller", search=SEARCHING
    )
    exclude: list[str] = option(
        help="concepts kept out of R besides the erased ones, e.g. their synonyms (AGE paper, 'fantastic "
        "targets': closely related to c_e but not its synonyms; a preserved synonym keeps c_e alive)",
        factory=list,
        search=SEARCHING,
    )
    search_space: Literal["nearest", "stratified"] = option(
        "stratified",
        "R: nearest (cosine top-K of pooled embeddings, paper B.1) or stratified (authors: L2 on the 77-token "
        "sequence, the `pool` closest, K of them spread near to far by 1-D k-means)",
        search=SEARCHING,
    )
    pool: int = option(
        AUTHORS_POOL,
        "stratified: how many nearest concepts (L2) are kept before K are picked (authors: 1000; 2000 nudity)",
        search=SEARCHING,
        search_space=("stratified",),
    )
    n_iter: int = option(
        1, "N_iter: ascent steps of the search per descent step (authors 1, paper 2)", search=SEARCHING
    )
    search_lr: float = option(
        1e-2, "eta: step size of the search (the logits' learning rate; paper 1e-3, scripts 1e-2)", search=SEARCHING
    )
    search_optimizer: Literal["adam", "sgd"] = option(
        "adam", "adam (authors' code) or sgd (Alg. 1's plain ascent)", search=SEARCHING
    )
    search_gradient: Literal["exact", "semi"] = option(
        "semi",
        "gradient of the search objective: exact (through the edited and the frozen model, eq. 5) or semi "
        "(the frozen output a constant, authors)",
        search=SEARCHING,
    )
    search_loop: Literal["same", "fresh"] = option(
        "fresh",
        "same (the n_iter ascents use the descent's z_t, paper) or fresh (each ascent draws its own DDIM step, "
        "z_t and Gumbel noise, and none at step 0: the authors' 1:1 alternation)",
        search=SEARCHING,
    )
    search_state: Literal["shared", "per_concept"] = option(
        "per_concept",
        "optimizer state of the logits: shared (one Adam over all rows; rows not drawn drift on momentum) or "
        "per_concept (one per erased concept, stepped only when drawn)",
        search=("gumbel",),
    )
    l2_latent: Literal["erased", "own"] = option(
        "own", "z_t of the preservation loss: erased (c_e's z_t, paper) or own (sampled with c_a itself, authors)"
    )
    loss_space: Literal["eps", "x0"] = option(
        "x0", "compare noise predictions (eps, paper) or the predicted x0 (authors; weights t by (1-abar)/abar)"
    )
    temperature: float = option(2.0, "Gumbel-Softmax temperature tau (> 0)", search=("gumbel",))
    relaxation: Relaxation = option("hard", "hard (straight-through one-hot), soft (mixture), topk", search=("gumbel",))
    topk: int = option(5, "candidates kept by the topk relaxation", search=("gumbel",), relaxation=("topk",))
    pgd_radius: float = option(1.0, "L-inf radius of the pgd search around c_e's embedding", search=("pgd",))
    fixed_concept: str = option("", "the concept preserved by search='fixed'", search=("fixed",))
    negative_guidance: float = option(
        1.0, "eta of L1's target eps(c_t) - eta (eps(c_e) - eps(c_t)): 0 = paper eq. 5, 1 = authors (ESD's)"
    )
    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "train a rank-R LoRA (peft, alpha R) on the Linear layers train_method selects instead of the "
            "weights; the edit is W + B A and exports as a rank-R LoRA exactly (None: train the weights)",
            "hash_omit_default": True,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_rank(self.lora_rank)
        if self.lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {self.lam}.")
        choices = {
            "search": ("gumbel", "pgd", "fixed"),
            "search_space": ("nearest", "stratified"),
            "search_optimizer": ("adam", "sgd"),
            "search_gradient": ("exact", "semi"),
            "search_loop": ("same", "fresh"),
            "search_state": ("shared", "per_concept"),
            "l2_latent": ("erased", "own"),
            "loss_space": ("eps", "x0"),
            "relaxation": ("hard", "soft", "topk"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"`{name}` must be one of {', '.join(valid)}; got {getattr(self, name)!r}.")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"`k` must be > 0 (or None for the default), got {self.k}.")
        if self.pool <= 0:
            raise ValueError(f"`pool` must be > 0, got {self.pool}.")
        if isinstance(self.exclude, str) or not all(isinstance(c, str) for c in self.exclude):
            raise ValueError(f"`exclude` must be a list of concept strings, e.g. ['pyramid'], got {self.exclude!r}.")
        self.exclude = list(self.exclude)
        if self.n_iter < 0:
            raise ValueError(f"`n_iter` must be >= 0, got {self.n_iter}.")
        if not self.search_lr > 0:
            raise ValueError(f"`search_lr` must be > 0, got {self.search_lr}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 (Gumbel-Softmax divides by it), got {self.temperature}.")
        if self.topk <= 0:
            raise ValueError(f"`topk` must be > 0, got {self.topk}.")
        if not self.pgd_radius > 0:
            raise ValueError(f"`pgd_radius` must be > 0, got {self.pgd_radius}.")
        if self.negative_guidance < 0:
            raise ValueError(f"`negative_guidance` must be >= 0, got {self.negative_guidance}.")


# The paper's AP (eq. 5, Algorithms 1-2, appendix B.1): every option where the authors' code differs.
AP_PAPER: dict[str, Any] = {
    "zt_producer": "exact",
    "search_space": "nearest",
    "n_iter": 2,
    "search_lr": 1e-3,
    "search_gradient": "exact",
    "search_loop": "same",
    "search_state": "shared",
    "l2_latent": "erased",
    "loss_space": "eps",
    "negative_guidance": 0.0,
}
AP_AUTHORS: dict[str, Any] = {
    "zt_producer": "trained",
    "search_space": "stratified",
    "pool": AUTHORS_POOL,
    "n_iter": 1,
    "search_lr": 1e-2,
    "search_gradient": "semi",
    "search_loop": "fresh",
    "search_state": "per_concept",
    "l2_latent": "own",
    "loss_space": "x0",
    "negative_guidance": 1.0,
}


def resolve_vocabulary(pipe, spec: str) -> str:
    """``auto`` -> ``shapes`` for the bundled miniature (its text encoder only knows its own words), else ``clip``."""
    if spec != "auto":
        return spec
    return "shapes" if base_info(pipe).get("id") == "shapes" else "clip"


@dataclass
class SearchSpace:
    """The candidates of each erased concept: names, similarities and (E, K, 77, D) embeddings."""

    vocabulary: str
    vocabulary_size: int
    k: int
    names: list[list[str]]
    similarities: list[list[float]]
    embeddings: torch.Tensor
    kind: str = "nearest"

    def trace(self, erase: list[str]) -> dict[str, Any]:
        """JSON-ready summary for the Edit's trace."""
        return {
            "vocabulary": self.vocabulary,
            "vocabulary_size": self.vocabulary_size,
            "k": self.k,
            "search_space_kind": self.kind,
            "search_space": {
                c: [[n, round(s, 4)] for n, s in zip(ns, ss, strict=True)]
                for c, ns, ss in zip(erase, self.names, self.similarities, strict=True)
            },
        }


def build_search_space(
    ctx: FinetuneContext,
    erase: list[str],
    vocabulary: str,
    k: int | None,
    exclude: Sequence[str] = (),
    *,
    kind: Literal["nearest", "stratified"] = "nearest",
    pool: int = AUTHORS_POOL,
) -> SearchSpace:
    """R for every erased concept, the erased concepts and ``exclude`` left out: its K nearest vocabulary
    concepts by cosine of pooled embeddings (``nearest``, AP appendix B.1), or K spread over the ``pool``
    nearest by L2 of the 77-token sequences (``stratified``, the authors' code;
    :func:`erasekit.concepts.stratified_concepts`)."""
    spec = resolve_vocabulary(ctx.pipe, vocabulary)
    words = load_vocabulary(spec, tokenizer=ctx.pipe.tokenizer)
    dropped = [*erase, *exclude]
    available = len({w.strip().lower() for w in words} - {c.strip().lower() for c in dropped})
    k_eff = k if k is not None else min(PAPER_K, available)
    names, sims = [], []
    for c in erase:
        if kind == "stratified":
            near = stratified_concepts(ctx.pipe, c, words, k_eff, pool=pool, exclude=dropped)
        else:
            near = nearest_concepts(ctx.pipe, c, words, k_eff, exclude=dropped)
        names.append([n for n, _ in near])
        sims.append([s for _, s in near])
    emb = torch.stack([ctx.embed(ns) for ns in names])  # (E, K, 77, D)
    return SearchSpace(spec, len(words), len(names[0]), names, sims, emb, kind)


def make_search(ctx: FinetuneContext, request: EraseRequest, config: APConfig) -> tuple[Search, dict[str, Any]]:
    """The search of ``config.search`` for ``request``, and its trace (the search space)."""
    if config.search == "fixed":
        return FixedSearch(config.fixed_concept, ctx.embed([config.fixed_concept])[0]), {
            "fixed_concept": config.fixed_concept
        }
    space = build_search_space(
        ctx, request.erase, config.vocabulary, config.k, config.exclude, kind=config.search_space, pool=config.pool
    )
    if config.search == "gumbel":
        search: Search = GumbelSearch(
            space.names,
            space.embeddings,
            temperature=config.temperature,
            relaxation=config.relaxation,
            topk=config.topk,
            n_iter=config.n_iter,
            lr=config.search_lr,
            optimizer=config.search_optimizer,
            state=config.search_state,
        )
    else:
        search = PGDSearch(
            ctx.embed(request.erase),
            radius=config.pgd_radius,
            n_iter=config.n_iter,
            lr=config.search_lr,
            optimizer=config.search_optimizer,
            names=space.names,
            embeddings=space.embeddings,
        )
    return search, space.trace(request.erase)


def ddim_index(ctx: FinetuneContext, t: torch.Tensor) -> int:
    """The DDIM step count ``n`` with ``timesteps[n] == t[0]`` (the batch's z_t was made by ``n`` steps)."""
    hit = (ctx.scheduler.timesteps.to(t.device) == t[0]).nonzero()
    if len(hit) != 1:
        raise ValueError(f"Timestep {int(t[0])} is not on the DDIM grid of {len(ctx.scheduler.timesteps)} steps.")
    return int(hit[0, 0])


class ConceptTrajectories:
    """``zt_producer="pooled"`` for the latents a search samples with its own concept (the authors'
    ``z_r`` of ``l2_latent="own"``: the ascents' and the preservation loss's z_t, conditioned on ``c_a``).

    The core's pool serves the erased concepts' z_t; ``c_a`` changes every step, so these latents were
    drawn one DDIM run each (70% of the ``authors`` step). Here each distinct conditioning row (a
    candidate concept of a hard Gumbel or a fixed search: its forward value is exactly one candidate's
    embedding) keeps frozen DDIM trajectories, "decks": the latents after 0, 1, ..., k steps from one
    noise, each usable once. A request for the latent after ``n`` steps takes it from the deck where
    it costs the fewest UNet calls: free where the deck has reached ``n`` and not used it, ``n - k``
    calls to continue a deck that stopped at ``k`` (:meth:`FinetuneContext.ddim_latents` with
    ``start``), else ``n`` calls for a new deck from fresh noise (the step's generator), what ``exact``
    pays every time. So no request costs more than ``exact``'s, and every served z_t has the law
    ``exact`` samples it from (the frozen model, DDIM from fresh noise, at the requested index); latents
    served for one concept from one deck share their noise (the correlation ``pooled`` accepts for the
    erased concepts). At most ``max_decks`` decks are kept per concept, and all decks with their
    concepts' rows hold at most ``budget_bytes`` (256 MiB: 76 full decks of SD 1.x at DDIM 50, 2641 on
    the miniature); beyond either, the deck with the fewest unused latents goes first, and a concept
    left without decks is forgotten. A mixture row (soft or top-k Gumbel, PGD) is a new concept at each
    request: correct, not faster. The decks are checkpointed (:meth:`state_tensors`): resume is exact.
    """

    def __init__(
        self, ctx: FinetuneContext, guidance: float, max_decks: int = 4, budget_bytes: int = 256 * 2**20
    ) -> None:
        self.ctx, self.guidance, self.max_decks, self.budget_bytes = ctx, guidance, max_decks, budget_bytes
        self.d = len(ctx.scheduler.timesteps)
        self.rows: dict[str, torch.Tensor] = {}  # digest -> conditioning row (77, D)
        # digest -> decks [latents after 0..k steps (k+1, C, h, w), unused (d,) bool]
        self.decks: dict[str, list[list[torch.Tensor]]] = {}
        self.unet_calls = 0  # CFG forwards run (exact would have run one per step of every served latent)
        self.exact_calls = 0
        self.served = 0

    def sample(self, cond: torch.Tensor, n_steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, t)`` for each row of ``cond`` (B, 77, D) after ``n_steps`` DDIM steps (see the class)."""
        out = [self._take(row.detach(), n_steps, generator) for row in cond]
        return torch.stack(out), self.ctx.timesteps_at([n_steps] * len(out))

    def _take(self, row: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        key = tensors_digest({"row": row})
        decks = self.decks.setdefault(key, [])
        self.rows.setdefault(key, row.clone())
        self.served += 1
        self.exact_calls += n
        usable = [(max(0, n - (len(dk[0]) - 1)), i) for i, dk in enumerate(decks) if dk[1][n]]
        cost, i = min(usable, default=(n + 1, -1))
        if i < 0 or cost >= n > 0:  # a new deck costs n; an existing one only if cheaper
            noise = self.ctx.initial_noise(1, generator)
            latents = noise if n == 0 else self._run(row, noise, 0, n)
            decks.append([latents, torch.ones(self.d, dtype=torch.bool)])
            i = len(decks) - 1
        elif cost > 0:
            deck = decks[i]
            k = len(deck[0]) - 1
            deck[0] = torch.cat([deck[0], self._run(row, deck[0][k:], k, n)[1:]])
        deck = decks[i]
        deck[1][n] = False
        z = deck[0][n].clone()
        if len(decks) > self.max_decks:
            del decks[min(range(len(decks)), key=lambda j: int(decks[j][1].sum()))]
        # a full deck and its concept's row (an upper bound: concepts with several decks keep one row)
        deck_bytes = z.numel() * z.element_size() * self.d + row.numel() * row.element_size()
        if sum(len(v) for v in self.decks.values()) > max(1, self.budget_bytes // deck_bytes):
            _, k, j = min((int(dk[1].sum()), k, j) for k, v in self.decks.items() for j, dk in enumerate(v))
            del self.decks[k][j]  # the least useful deck of any concept
            if not self.decks[k]:  # a concept without decks keeps nothing (mixture rows never come back)
                del self.decks[k], self.rows[k]
        return z

    def _run(self, row: torch.Tensor, z: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Latents after ``start .. n`` steps from ``z`` (the latent after ``start``): (n - start + 1, C, h, w)."""
        self.unet_calls += n - start
        return self.ctx.ddim_latents(row[None], z, [n], guidance=self.guidance, keep_all=True, start=start)[0]

    def state_tensors(self, prefix: str = "concept_pool.") -> dict[str, torch.Tensor]:
        """The decks in order (rows, latents padded to ``d``, their lengths, unused masks, owner rows)."""
        keys = [k for k, v in self.decks.items() if v]
        counts = torch.tensor([self.unet_calls, self.exact_calls, self.served], dtype=torch.long)
        if not keys:
            return {f"{prefix}counts": counts}
        decks = [(i, lat, un) for i, k in enumerate(keys) for lat, un in self.decks[k]]
        pad = lambda lat: torch.cat([lat, lat.new_zeros(self.d - len(lat), *lat.shape[1:])])  # noqa: E731
        return {
            f"{prefix}rows": torch.stack([self.rows[k] for k in keys]).contiguous(),
            f"{prefix}latents": torch.stack([pad(lat) for _, lat, _ in decks]).contiguous(),
            f"{prefix}length": torch.tensor([len(lat) for _, lat, _ in decks], dtype=torch.long),
            f"{prefix}unused": torch.stack([un for _, _, un in decks]).contiguous(),
            f"{prefix}owner": torch.tensor([i for i, _, _ in decks], dtype=torch.long),
            f"{prefix}counts": counts,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "concept_pool.") -> None:
        """Inverse of :meth:`state_tensors`."""
        self.rows, self.decks = {}, {}
        if f"{prefix}counts" in tensors:
            self.unet_calls, self.exact_calls, self.served = (int(x) for x in tensors[f"{prefix}counts"].tolist())
        if f"{prefix}rows" not in tensors:
            return
        rows = tensors[f"{prefix}rows"].to(self.ctx.device, self.ctx.dtype)
        keys = [tensors_digest({"row": r}) for r in rows]
        for k, r in zip(keys, rows, strict=True):
            self.rows[k], self.decks[k] = r, []
        latents = tensors[f"{prefix}latents"].to(self.ctx.device, self.ctx.dtype)
        parts = zip(
            tensors[f"{prefix}owner"].tolist(),
            latents,
            tensors[f"{prefix}length"].tolist(),
            tensors[f"{prefix}unused"].bool(),
            strict=True,
        )
        for owner, lat, length, un in parts:
            self.decks[keys[owner]].append([lat[:length].clone(), un.clone()])


class SearchLoss(LossFunction):
    """Shared base of AP and AGE: a :class:`Search` built at setup, its state in checkpoints, the
    ascent loop (``search_loop``), the latents of the preservation loss (``l2_latent``) and the loss
    space (``loss_space``)."""

    def __init__(self, request: EraseRequest, config: APConfig) -> None:
        self.request, self.config = request, config
        self.rows = {c: i for i, c in enumerate(request.erase)}
        self.search: Search = Search()
        self._trace: dict[str, Any] = {}
        self.concept_pool: ConceptTrajectories | None = None

    def setup(self, ctx: FinetuneContext) -> None:
        self.search, self._trace = make_search(ctx, self.request, self.config)
        if self.config.zt_producer == "pooled":
            self.concept_pool = ConceptTrajectories(ctx, self.config.start_guidance)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        pool = self.concept_pool.state_tensors() if self.concept_pool is not None else {}
        return {**self.search.state_tensors(), **pool}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.search.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("concept_pool.")})
        if self.concept_pool is not None:
            self.concept_pool.load_state_tensors(tensors)

    def trace(self) -> dict[str, Any]:
        out = {"search": self.config.search, **self._trace}
        if self.concept_pool is not None:
            p = self.concept_pool
            out["concept_pool"] = {
                "latents_served": p.served,
                "concepts": len(p.rows),
                "unet_calls": p.unet_calls,
                "exact_would_call": p.exact_calls,
            }
        return out

    # -------------------------------------------------------------- pieces shared by AP and AGE
    def loss(self, ctx: FinetuneContext) -> PredictionLoss:
        """``(pred, target, z, t) -> scalar`` in the config's ``loss_space``."""
        space, fam = self.config.loss_space, ctx.family
        if fam.prediction_type(ctx.pipe) != "epsilon":  # v / flow velocity: "eps" = the model's own output space
            return lambda pred, target, z, t: fam.prediction_loss(ctx.pipe, ctx.scheduler, pred, target, z, t, space)
        abar = ctx.scheduler.alphas_cumprod
        return lambda pred, target, z, t: prediction_loss(pred, target, z, t, space=space, alphas_cumprod=abar)

    def sample(
        self, ctx: FinetuneContext, cond: torch.Tensor, n_steps: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A z_t made by ``n_steps`` DDIM steps conditioned on ``cond`` (detached), by the config's producer
        (``pooled``: from :class:`ConceptTrajectories`)."""
        cfg = self.config
        if self.concept_pool is not None:
            return self.concept_pool.sample(cond.detach(), n_steps, generator)
        return ctx.sample_zt(
            cond.detach(), n_steps, generator, guidance=cfg.start_guidance, frozen=cfg.zt_producer != "trained"
        )

    def latents(
        self,
        ctx: FinetuneContext,
        batch: StepBatch,
        cond: torch.Tensor,
        n_steps: int | None,
        *,
        need_erased: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(z_e, t_e, z_l2, t_l2)``: the erased concepts' z_t and the preservation loss's z_t for ``cond``.

        ``n_steps=None``: the step's own DDIM step, ``z_e`` = the batch's z_t. Otherwise fresh latents
        made by ``n_steps`` DDIM steps (``z_e`` only when ``need_erased`` or ``l2_latent='erased'``, else
        ``None``). ``z_l2`` is ``z_e`` with ``l2_latent='erased'`` and a z_t sampled with ``cond`` itself
        with ``'own'`` (the authors' ``z_r``; same DDIM step, independent start noise).
        """
        gen, own = batch.generator, self.config.l2_latent == "own"
        if n_steps is None:
            z_e, t_e = batch.z_t, batch.t
            z_l2, t_l2 = self.sample(ctx, cond, ddim_index(ctx, t_e), gen) if own else (z_e, t_e)
            return z_e, t_e, z_l2, t_l2
        z_e, t_e = self.sample(ctx, batch.cond_e, n_steps, gen) if need_erased or not own else (None, None)
        z_l2, t_l2 = self.sample(ctx, cond, n_steps, gen) if own else (z_e, t_e)
        return z_e, t_e, z_l2, t_l2

    def search_objective(
        self, ctx: FinetuneContext, batch: StepBatch, cond: torch.Tensor, n_steps: int | None
    ) -> torch.Tensor:
        """The objective the search maximises at conditioning ``cond`` (subclasses)."""
        raise TypeError(f"{type(self).__name__} must implement search_objective().")

    def ascend(self, ctx: FinetuneContext, batch: StepBatch, rows: list[int]) -> tuple[list[float], list[int]]:
        """Run the search's ascent steps; returns their objective values and, with ``search_loop='fresh'``,
        the DDIM step each drew.

        ``same``: ``n_iter`` ascents on the step's z_t (paper Alg. 1). ``fresh``: each ascent draws its
        own DDIM step from the step's generator (as the core draws the batch's) and its own latents and
        Gumbel sample; none at step 0, where the authors' loop starts with a descent (the edited model
        is still the original there, so L2 and its gradient are 0 anyway).
        """
        cfg = self.config
        if cfg.search_loop == "same":
            return self.search.ascend(lambda c: self.search_objective(ctx, batch, c, None), rows, batch.generator), []
        if batch.step == 0:
            return [], []
        drawn: list[int] = []

        def objective(cond: torch.Tensor) -> torch.Tensor:
            drawn.append(int(torch.randint(0, cfg.ddim_steps, (1,), generator=batch.generator)))
            return self.search_objective(ctx, batch, cond, drawn[-1])

        return self.search.ascend(objective, rows, batch.generator), drawn


class APLoss(SearchLoss):
    """Per-step AP: ascend L2 on the search, then the descent loss L1 + lambda * L2(c_a)."""

    def __init__(self, request: EraseRequest, config: APConfig) -> None:
        super().__init__(request, config)
        # with the empty anchor, L1's frozen eps(z_t, c_t) (and the negative-guidance eps(z_t, c_e)) are the
        # predictions a frozen DDIM trajectory computed at z_t: the ``pooled`` producer hands them over
        self.uses_frozen_eps = request.target == ""

    def search_objective(
        self, ctx: FinetuneContext, batch: StepBatch, cond: torch.Tensor, n_steps: int | None
    ) -> torch.Tensor:
        _, _, z, t = self.latents(ctx, batch, cond, n_steps)
        return preservation_objective(
            ctx.eps, ctx.eps_frozen, z, t, cond, gradient=self.config.search_gradient, loss=self.loss(ctx)
        )

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        cfg, z, t = self.config, batch.z_t, batch.t
        rows = [self.rows[c] for c in batch.concepts]
        b = len(rows)
        loss = self.loss(ctx)

        # 1. Find the adversarial concept (Alg. 1): maximise L2 = ||eps'(c_a) - eps(c_a)||^2.
        ascent, drawn = self.ascend(ctx, batch, rows)
        c_a, records = self.search.choose(rows, batch.generator)
        _, _, z_a, t_a = self.latents(ctx, batch, c_a, None)

        # 2. Descent (Alg. 2): one batched frozen call, one batched trainable call.
        ng = cfg.negative_guidance > 0
        if batch.frozen_eps is not None and self.uses_frozen_eps:
            with torch.no_grad():
                e_a = ctx.eps_frozen(z_a, t_a, c_a)
            e_t, e_e = batch.frozen_eps
        else:
            anchor = ctx.embed([self.request.target]).expand(b, -1, -1)
            frozen_in = [(z, t, anchor), (z_a, t_a, c_a)] + ([(z, t, batch.cond_e)] if ng else [])
            with torch.no_grad():
                frozen = ctx.eps_frozen(*(torch.cat(x) for x in zip(*frozen_in, strict=True))).chunk(len(frozen_in))
            e_t, e_a, e_e = frozen[0], frozen[1], frozen[2] if ng else None
        target = e_t - cfg.negative_guidance * (e_e - e_t) if ng else e_t
        new_e, new_a = ctx.eps(torch.cat([z, z_a]), torch.cat([t, t_a]), torch.cat([batch.cond_e, c_a])).chunk(2)
        loss1 = loss(new_e, target, z, t)
        loss2 = loss(new_a, e_a, z_a, t_a)
        logs = {"l1": float(loss1.detach()), "l2": float(loss2.detach())}
        if ascent:
            logs["l2_search"] = ascent[-1]
        record: dict[str, Any] = {
            "adversarial": [{"erase": c, **r} for c, r in zip(batch.concepts, records, strict=True)]
        }
        if drawn:
            record["search_ddim_steps"] = drawn
        return StepOutput(loss=loss1 + cfg.lam * loss2, logs=logs, record=record)


def chosen_concepts(log: list[dict[str, Any]], key: str = "adversarial") -> list[tuple[int, str, str]]:
    """``(step, erased concept, chosen concept)`` for every row of a run's step log (AP's Fig. 4/6; AGE's targets)."""
    return [(r["step"], a["erase"], a.get("concept", "")) for r in log for a in r.get(key, [])]


@register(
    "ap",
    APConfig,
    "Adversarial Preservation: erase while preserving the most sensitive concept (Gumbel search)",
    presets={
        "paper": (
            "AP paper eq. 5, Algorithms 1-2, appendix B.1: cosine top-K, exact search gradient, eps space, "
            "2 ascents on the descent's z_t, eta_search 1e-3, L1 target eps(c_t), frozen-model z_t",
            AP_PAPER,
        ),
        "authors": (
            "train_adversarial_gumbel.py + run_imagenette.sh: stratified R (100 of the 1000 nearest by L2), "
            "semi-gradient, x0 space, 1:1 loop with fresh z_t and a z_t of c_a, per-concept Adam lr 1e-2, "
            "ESD target (eta 1), z_t from the model being trained",
            AP_AUTHORS,
        ),
    },
    default_preset="authors",
)
def erase_ap(
    pipe, request: EraseRequest, config: APConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> Edit:
    """Erase ``request.erase`` with Adversarial Preservation (Bui et al. 2024, eq. 5, Algorithms 1-2).

    The default ``authors`` preset departs from the printed equations where the authors' code does
    (search space, semi-gradient, x0 loss, 1:1 loop with fresh latents, per-concept optimizer state,
    ESD's L1 target, trained-model z_t; the module docstring lists each and why); ``preset="paper"``
    runs eq. 5 as printed. The pipeline is left unchanged; ``edit.trace["log"]`` holds the
    adversarial concept of every step (also in ``run_dir/log.jsonl`` when a run directory is given)
    and ``edit.trace["search_space"]`` the candidates of each erased concept.
    """
    return finetune(
        pipe, request, config, APLoss(request, config), method="ap", generator=generator, progress=progress
    ).edit
