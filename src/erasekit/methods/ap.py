"""Adversarial Preservation (Bui et al., NeurIPS 2024): erase while preserving the concept the erasure hurts most.

The objective (paper eq. 5; slides eq. 10)::

    min_theta'  max_{pi in simplex}  E_{c_e}  ||eps_theta'(c_e) - eps_theta(c_t)||^2                 (L1)
                                         + lambda ||eps_theta'(G(pi) . R) - eps_theta(G(pi) . R)||^2   (L2)

``R`` is the concept space: the ``K`` concepts nearest to ``c_e`` in a vocabulary by cosine
similarity of text embeddings (:func:`erasekit.concepts.nearest_concepts`; appendix B.1). ``G`` is
the Gumbel-Softmax (slides eq. 11) of learnable logits with temperature ``tau``; ``hard`` is the
straight-through one-hot (eq. 12: forward = one concept, backward = the soft gradient), ``soft`` the
mixture. ``G(pi) . R`` mixes the candidates' text-encoder outputs (each (77, D)), as the authors'
code does. Each step (Algorithms 1-2): ``n_iter`` ascent steps on the logits to maximise L2 with step
size ``search_lr``, then a fresh Gumbel sample ``c_a`` and one descent step on the model with
``L1 + lambda * L2(c_a)``. The chosen concept is logged at every step (the paper's Fig. 4 and 6).

``search="pgd"`` is the continuous alternative of the paper's Fig. 4 (top row): ``c_a`` starts at
``c_e``'s embedding and moves by projected gradient ascent on L2 inside an L-infinity ball of radius
``pgd_radius``. ``search="fixed"`` preserves one fixed concept (``""``, ``"a photo"``, a named one),
the comparisons of Fig. 1b and 3.

Implementation notes, where the paper and the authors' code differ:

* Alg. 1 writes plain gradient ascent ``pi <- pi + eta grad``; the authors' code uses Adam on the
  logits (lr 1e-3 in the paper's appendix, 1e-2 in their scripts). At step 0 the edited and original
  models coincide, so L2 and its gradient start at zero and grow slowly: plain ascent with eta 1e-3
  would leave the logits where they started for most of the run, whereas Adam's normalised steps move
  them by about eta per step. We default to Adam (``search_optimizer="sgd"`` gives Alg. 1 literally).
* The logits persist across steps, one row per erased concept (authors' code), initialised uniform.
* L1's target is ``eps_theta(c_t)`` (paper eq. 5, ``c_t`` = the request's anchor, ``""`` by default);
  the authors' script uses ESD's negative-guidance target instead, available as
  ``negative_guidance > 0``. Their script also compares predicted ``x_0`` rather than noise and
  samples a second ``z_t`` for ``c_a``; we follow the paper (noise space, the same ``z_t``).
* For speed the descent step makes one batched frozen call (``c_t`` and ``c_a`` rows) and one batched
  trainable call (``c_e`` and ``c_a`` rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from erasekit.concepts import load_vocabulary, nearest_concepts
from erasekit.edit import Edit, EraseRequest
from erasekit.finetune import FinetuneConfig, FinetuneContext, LossFunction, StepBatch, StepOutput, finetune
from erasekit.methods.base import register
from erasekit.pipeline import base_info

Relaxation = Literal["hard", "soft", "topk"]
PAPER_K = 100  # appendix B.1: K = 100 (50 for nudity)


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
    and renormalises them (the AGE authors' relaxation).
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
    erased concepts; ``names`` the candidates' names (E lists of K).
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
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.names = names
        self.embeddings = embeddings
        self.temperature, self.relaxation, self.topk, self.n_iter = temperature, relaxation, topk, n_iter
        e, k = embeddings.shape[:2]
        self.logits = torch.zeros(e, k, device=embeddings.device, dtype=torch.float32, requires_grad=True)
        self.opt = _make_optimizer([self.logits], optimizer, lr)

    def _mix(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        w = gumbel_softmax(self.logits[rows], self.temperature, self.relaxation, topk=self.topk, generator=generator)
        cond = torch.einsum("bk,bkld->bld", w.to(self.embeddings.dtype), self.embeddings[rows])  # (B, 77, D)
        return w, cond

    def ascend(self, objective: Objective, rows: list[int], generator: torch.Generator) -> list[float]:
        values = []
        for _ in range(self.n_iter):
            _, cond = self._mix(rows, generator)
            value = objective(cond)
            (grad,) = torch.autograd.grad(value, [self.logits])
            self.logits.grad = -grad  # maximise
            self.opt.step()
            self.logits.grad = None
            values.append(float(value.detach()))
        return values

    @torch.no_grad()
    def choose(self, rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        w, cond = self._mix(rows, generator)
        probs = torch.softmax(self.logits[rows], dim=-1)
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
        return {"logits": self.logits.detach(), **_optimizer_state("search_opt", self.opt)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.logits.copy_(tensors["logits"])
        _load_optimizer_state("search_opt", self.opt, tensors)


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
@dataclass
class APConfig(FinetuneConfig):
    """Adversarial Preservation. Defaults: paper appendix B.1 and the authors' scripts (1000 steps, Adam
    lr 1e-5, cross-attention, K = 100, N_iter = 2, eta = 1e-3, lambda = 1, temperature 2, hard)."""

    lam: float = field(default=1.0, metadata={"help": "lambda: weight of the preservation loss L2"})
    search: Literal["gumbel", "pgd", "fixed"] = field(
        default="gumbel", metadata={"help": "gumbel (discrete, paper), pgd (continuous, Fig. 4 top) or fixed"}
    )
    vocabulary: str = field(
        default="auto",
        metadata={
            "help": "concept space: clip, shapes, wordfreq[:N], a file; auto = shapes on the miniature, else clip"
        },
    )
    k: int | None = field(
        default=None,
        metadata={"help": "K nearest concepts per erased concept; None = 100, or the whole vocabulary if smaller"},
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={
            "help": "concepts kept out of R besides the erased ones, e.g. their synonyms (AGE paper, 'fantastic "
            "targets': closely related to c_e but not its synonyms; a preserved synonym keeps c_e alive)"
        },
    )
    n_iter: int = field(default=2, metadata={"help": "N_iter: ascent steps of the search before each descent step"})
    search_lr: float = field(
        default=1e-3, metadata={"help": "eta: step size of the search (the logits' learning rate)"}
    )
    search_optimizer: Literal["adam", "sgd"] = field(
        default="adam", metadata={"help": "adam (authors' code) or sgd (Alg. 1's plain ascent)"}
    )
    temperature: float = field(default=2.0, metadata={"help": "Gumbel-Softmax temperature tau (> 0)"})
    relaxation: Relaxation = field(
        default="hard", metadata={"help": "hard (straight-through one-hot), soft (mixture), topk"}
    )
    topk: int = field(default=5, metadata={"help": "candidates kept by the topk relaxation"})
    pgd_radius: float = field(default=1.0, metadata={"help": "L-inf radius of the pgd search around c_e's embedding"})
    fixed_concept: str = field(default="", metadata={"help": "the concept preserved by search='fixed'"})
    negative_guidance: float = field(
        default=0.0, metadata={"help": "0 = paper eq. 5's L1 target eps(c_t); > 0 = ESD's target (authors' script)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {self.lam}.")
        if self.search not in ("gumbel", "pgd", "fixed"):
            raise ValueError(f"`search` must be 'gumbel', 'pgd' or 'fixed', got {self.search!r}.")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"`k` must be > 0 (or None for the default), got {self.k}.")
        if isinstance(self.exclude, str) or not all(isinstance(c, str) for c in self.exclude):
            raise ValueError(f"`exclude` must be a list of concept strings, e.g. ['pyramid'], got {self.exclude!r}.")
        self.exclude = list(self.exclude)
        if self.n_iter < 0:
            raise ValueError(f"`n_iter` must be >= 0, got {self.n_iter}.")
        if not self.search_lr > 0:
            raise ValueError(f"`search_lr` must be > 0, got {self.search_lr}.")
        if self.search_optimizer not in ("adam", "sgd"):
            raise ValueError(f"`search_optimizer` must be 'adam' or 'sgd', got {self.search_optimizer!r}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0 (Gumbel-Softmax divides by it), got {self.temperature}.")
        if self.relaxation not in ("hard", "soft", "topk"):
            raise ValueError(f"`relaxation` must be 'hard', 'soft' or 'topk', got {self.relaxation!r}.")
        if self.topk <= 0:
            raise ValueError(f"`topk` must be > 0, got {self.topk}.")
        if not self.pgd_radius > 0:
            raise ValueError(f"`pgd_radius` must be > 0, got {self.pgd_radius}.")
        if self.negative_guidance < 0:
            raise ValueError(f"`negative_guidance` must be >= 0, got {self.negative_guidance}.")


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

    def trace(self, erase: list[str]) -> dict[str, Any]:
        """JSON-ready summary for the Edit's trace."""
        return {
            "vocabulary": self.vocabulary,
            "vocabulary_size": self.vocabulary_size,
            "k": self.k,
            "search_space": {
                c: [[n, round(s, 4)] for n, s in zip(ns, ss, strict=True)]
                for c, ns, ss in zip(erase, self.names, self.similarities, strict=True)
            },
        }


def build_search_space(
    ctx: FinetuneContext, erase: list[str], vocabulary: str, k: int | None, exclude: Sequence[str] = ()
) -> SearchSpace:
    """R for every erased concept: its K nearest vocabulary concepts (AP appendix B.1), the erased
    concepts and ``exclude`` left out."""
    spec = resolve_vocabulary(ctx.pipe, vocabulary)
    words = load_vocabulary(spec, tokenizer=ctx.pipe.tokenizer)
    dropped = [*erase, *exclude]
    available = len({w.strip().lower() for w in words} - {c.strip().lower() for c in dropped})
    k_eff = k if k is not None else min(PAPER_K, available)
    names, sims = [], []
    for c in erase:
        near = nearest_concepts(ctx.pipe, c, words, k_eff, exclude=dropped)
        names.append([n for n, _ in near])
        sims.append([s for _, s in near])
    emb = torch.stack([ctx.embed(ns) for ns in names])  # (E, K, 77, D)
    return SearchSpace(spec, len(words), k_eff, names, sims, emb)


def make_search(ctx: FinetuneContext, request: EraseRequest, config: APConfig) -> tuple[Search, dict[str, Any]]:
    """The search of ``config.search`` for ``request``, and its trace (the search space)."""
    if config.search == "fixed":
        return FixedSearch(config.fixed_concept, ctx.embed([config.fixed_concept])[0]), {
            "fixed_concept": config.fixed_concept
        }
    space = build_search_space(ctx, request.erase, config.vocabulary, config.k, config.exclude)
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


class SearchLoss(LossFunction):
    """Shared base of AP and AGE: a :class:`Search` built at setup, its state in checkpoints."""

    def __init__(self, request: EraseRequest, config: APConfig) -> None:
        self.request, self.config = request, config
        self.rows = {c: i for i, c in enumerate(request.erase)}
        self.search: Search = Search()
        self._trace: dict[str, Any] = {}

    def setup(self, ctx: FinetuneContext) -> None:
        self.search, self._trace = make_search(ctx, self.request, self.config)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.search.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.search.load_state_tensors(tensors)

    def trace(self) -> dict[str, Any]:
        return {"search": self.config.search, **self._trace}


class APLoss(SearchLoss):
    """Per-step AP: ascend L2 on the search, then the descent loss L1 + lambda * L2(c_a)."""

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        cfg, z, t = self.config, batch.z_t, batch.t
        rows = [self.rows[c] for c in batch.concepts]
        b = len(rows)

        # 1. Find the adversarial concept (Alg. 1): maximise L2 = ||eps'(c_a) - eps(c_a)||^2.
        def l2(cond: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(ctx.eps(z, t, cond), ctx.eps_frozen(z, t, cond))

        ascent = self.search.ascend(l2, rows, batch.generator)
        c_a, records = self.search.choose(rows, batch.generator)

        # 2. Descent (Alg. 2): one batched frozen call, one batched trainable call.
        anchor = ctx.embed([self.request.target]).expand(b, -1, -1)
        frozen_conds = [anchor, c_a] + ([batch.cond_e] if cfg.negative_guidance > 0 else [])
        n = len(frozen_conds)
        with torch.no_grad():
            frozen = ctx.eps_frozen(torch.cat([z] * n), torch.cat([t] * n), torch.cat(frozen_conds)).chunk(n)
        e_t, e_a = frozen[0], frozen[1]
        target = e_t - cfg.negative_guidance * (frozen[2] - e_t) if cfg.negative_guidance > 0 else e_t
        new_e, new_a = ctx.eps(torch.cat([z, z]), torch.cat([t, t]), torch.cat([batch.cond_e, c_a])).chunk(2)
        loss1 = F.mse_loss(new_e, target)
        loss2 = F.mse_loss(new_a, e_a)
        logs = {"l1": float(loss1.detach()), "l2": float(loss2.detach())}
        if ascent:
            logs["l2_search"] = ascent[-1]
        record = {"adversarial": [{"erase": c, **r} for c, r in zip(batch.concepts, records, strict=True)]}
        return StepOutput(loss=loss1 + cfg.lam * loss2, logs=logs, record=record)


def chosen_concepts(log: list[dict[str, Any]], key: str = "adversarial") -> list[tuple[int, str, str]]:
    """``(step, erased concept, chosen concept)`` for every row of a run's step log (AP's Fig. 4/6; AGE's targets)."""
    return [(r["step"], a["erase"], a.get("concept", "")) for r in log for a in r.get(key, [])]


@register(
    "ap",
    APConfig,
    "Adversarial Preservation: erase while preserving the most sensitive concept (Gumbel search)",
    presets={
        "paper": ("AP paper eq. 5, Algorithms 1-2", {}),
        "authors": ("the authors' code (its differences from the paper are not yet separate options)", {}),
    },
    default_preset="paper",
)
def erase_ap(
    pipe, request: EraseRequest, config: APConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> Edit:
    """Erase ``request.erase`` with Adversarial Preservation (Bui et al. 2024, eq. 5, Algorithms 1-2).

    The pipeline is left unchanged; ``edit.trace["log"]`` holds the adversarial concept of every step
    (also in ``run_dir/log.jsonl`` when a run directory is given) and ``edit.trace["search_space"]``
    the candidates of each erased concept.
    """
    return finetune(
        pipe, request, config, APLoss(request, config), method="ap", generator=generator, progress=progress
    ).edit
