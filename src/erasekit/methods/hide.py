"""Knowledge hiding and recovery with learnable prompts (Bui et al., ICLR 2025 Delta workshop; slides eqs. 15-16).

A hidden concept is not removed: the knowledge is moved behind a secret prompt ``p_{c_e}`` (a few
soft token embeddings) that acts as an external memory.

**Stage 1, hiding** (slides eq. 15) fine-tunes the UNet *and* learns ``p`` so that ``c_e`` alone
maps to the target while ``c_e`` followed by ``p`` still gives the original model's output::

    min_{theta', p}  E_{c_e}  ||eps_theta'(c_e) - eps_theta(c_t)||^2 + lambda ||eps_theta'(c_e, p) - eps_theta(c_e)||^2

(plus ``preserve_lam * ||eps_theta'(c_p) - eps_theta(c_p)||^2`` for the request's preserved concepts,
the slides' "Ours*" setting with knowledge of the concepts to keep).

**Stage 2, recovery** (slides eq. 16) finds a prompt for a hidden concept against the finished edit::

    p = argmin_{||p - c_e||_2 <= rho}  ||eps_theta'(c_e, p) - eps_theta(c_e)||^2

by projected gradient descent (Adam steps, then projection onto the ball), ``c_e`` being the
concept's token embedding (the mean of its word pieces' input embeddings, repeated for each of the
``n_tokens`` soft tokens) and the norm the Frobenius norm of the whole prompt.

**Soft tokens.** ``c_e, p`` is the prompt ``c_e`` with ``n_tokens`` extra token positions right after
the concept's last word piece, whose *input* embeddings (before the text encoder) are ``p``; the
text encoder then runs as usual, so the conditioning is an ordinary (77, D) ``prompt_embeds``.

**The key is a secret.** The :class:`RecoveryKey` is saved apart from the edit (its own
``key.safetensors`` + ``key.json``) and records the edit's digest and the base model's fingerprint;
loading it for another edit or base model is refused. :meth:`RecoveryKey.prompt_embeds` turns a key
and prompts into ``prompt_embeds`` for :func:`erasekit.eval.generate.generate_images`.

**Presets.** ``paper`` (the default) is eqs. 15-16 as the slides print them, with the fine-tuning
defaults of ESD/AP (1000 steps, Adam lr 1e-5, ``z_t`` from the frozen original). No public code of
the hiding paper exists as far as the seeds and the authors' public repositories show
(tuananhbui89/*: AP, AGE and others, none for hiding), so ``authors`` equals ``paper`` and says so.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from erasekit.edit import Edit, EraseRequest
from erasekit.finetune import FinetuneConfig, FinetuneContext, LossFunction, StepBatch, StepOutput, finetune, run_field
from erasekit.io import save_safetensors_atomic, write_json_atomic
from erasekit.methods.base import register
from erasekit.pipeline import base_info

KEY_TENSORS = "key.safetensors"
KEY_META = "key.json"
_PLACEHOLDER_ID = 0  # any id but end-of-text: its input embedding is overwritten by the soft token


# ------------------------------------------------------------------------------------------ soft tokens
def concept_token_ids(pipe, concept: str) -> list[int]:
    """The word-piece ids of ``concept`` (no start/end tokens)."""
    ids = pipe.tokenizer(concept, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"Concept {concept!r} has no tokens.")
    return list(ids)


def token_center(pipe, concept: str, n_tokens: int) -> torch.Tensor:
    """``c_e`` in the token-embedding space: the mean input embedding of its word pieces, repeated (n_tokens, D)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = torch.tensor(concept_token_ids(pipe, concept), device=table.device)
    return table[ids].detach().float().mean(0, keepdim=True).repeat(n_tokens, 1)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def _ids_with_slots(pipe, prompt: str, concept: str, n_tokens: int) -> tuple[list[int], int]:
    """Token ids of ``prompt`` (start/end/padding to 77) with ``n_tokens`` slots after ``concept``; slot start."""
    tok = pipe.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    sub = concept_token_ids(pipe, concept)
    at = _find(ids, sub)
    if at < 0:
        raise ValueError(f"Prompt {prompt!r} does not contain the hidden concept {concept!r}.")
    cut = at + len(sub)
    body = ids[:cut] + [_PLACEHOLDER_ID] * n_tokens + ids[cut:]
    max_len = tok.model_max_length
    body = body[: max_len - 2]
    if cut + n_tokens > len(body):
        raise ValueError(f"Prompt {prompt!r} is too long to hold {n_tokens} key tokens after {concept!r}.")
    full = [tok.bos_token_id, *body, tok.eos_token_id]
    full += [tok.pad_token_id] * (max_len - len(full))
    return full, 1 + cut


@contextmanager
def _soft_token_hook(text_encoder, starts: list[int], soft: list[torch.Tensor]) -> Iterator[None]:
    """While active, the text encoder's input embeddings at ``starts[b] : starts[b] + n`` are ``soft[b]``."""

    def hook(module, inputs, output):
        out = output.clone()
        for b, (s, p) in enumerate(zip(starts, soft, strict=True)):
            out[b, s : s + p.shape[0]] = p.to(out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_soft_tokens(
    pipe, prompts: Sequence[str], concepts: Sequence[str], soft: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Text-encoder states (B, 77, D) of each prompt with ``soft[b]`` (n, D_tok) inserted after ``concepts[b]``.

    Differentiable with respect to ``soft`` (the text encoder itself stays fixed).
    """
    enc = pipe.text_encoder
    rows = [_ids_with_slots(pipe, p, c, s.shape[0]) for p, c, s in zip(prompts, concepts, soft, strict=True)]
    ids = torch.tensor([r[0] for r in rows], device=enc.device)
    dev = enc.get_input_embeddings().weight.device
    with _soft_token_hook(enc, [r[1] for r in rows], [s.to(dev) for s in soft]):
        return enc(ids)[0]


def project_ball(p: torch.Tensor, center: torch.Tensor, rho: float) -> torch.Tensor:
    """Projection of ``p`` onto ``{x : ||x - center||_2 <= rho}`` (Frobenius norm over the whole prompt)."""
    d = p - center
    n = d.norm()
    return p if n <= rho else center + d * (rho / n)


# ------------------------------------------------------------------------------------------ the key
def edit_digest(edit: Edit) -> str:
    """A content digest of an edit's tensors (names, shapes, values): its identity for a recovery key."""
    h = hashlib.sha256()
    for name in sorted(edit.tensors):
        t = edit.tensors[name].detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RecoveryKey:
    """The secret prompt of each hidden concept, bound to one edit and one base model."""

    tokens: dict[str, torch.Tensor]  # concept -> (n_tokens, D_tok) input embeddings
    edit_digest: str
    base: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        """The hidden concepts this key recovers."""
        return sorted(self.tokens)

    def check(self, *, edit: Edit | None = None, pipe=None) -> None:
        """Raise ``ValueError`` if ``edit`` is not the key's edit or ``pipe`` not its base model."""
        if edit is not None and edit_digest(edit) != self.edit_digest:
            raise ValueError(
                f"This recovery key belongs to edit {self.edit_digest}, not to the given edit ({edit_digest(edit)}). "
                "Use the key saved with that edit."
            )
        if pipe is not None:
            fp = base_info(pipe).get("fingerprint")
            if fp != self.base.get("fingerprint"):
                raise ValueError(
                    f"This recovery key was made on base model {self.base.get('id')!r} (fingerprint "
                    f"{self.base.get('fingerprint')}), but the pipeline's base is {base_info(pipe).get('id')!r} ({fp})."
                )

    def save(self, directory: str | Path) -> Path:
        """Write ``key.safetensors`` and ``key.json`` into ``directory`` (keep it apart from the edit)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        names = self.concepts
        save_safetensors_atomic({f"p{i}": self.tokens[c] for i, c in enumerate(names)}, d / KEY_TENSORS)
        write_json_atomic(
            d / KEY_META, {"concepts": names, "edit_digest": self.edit_digest, "base": self.base, "meta": self.meta}
        )
        return d

    @classmethod
    def load(cls, directory: str | Path, *, edit: Edit | None = None, pipe=None) -> RecoveryKey:
        """Read a key written by :meth:`save`; with ``edit`` / ``pipe``, refuse a key made for others."""
        d = Path(directory)
        if not (d / KEY_META).exists() or not (d / KEY_TENSORS).exists():
            raise FileNotFoundError(f"No recovery key in {str(d)!r}: expected {KEY_META} and {KEY_TENSORS}.")
        meta = json.loads((d / KEY_META).read_text())
        t = load_file(d / KEY_TENSORS)
        key = cls(
            {c: t[f"p{i}"] for i, c in enumerate(meta["concepts"])},
            meta["edit_digest"],
            meta["base"],
            meta.get("meta", {}),
        )
        key.check(edit=edit, pipe=pipe)
        return key

    def concept_in(self, pipe, prompt: str) -> str:
        """The hidden concept that ``prompt`` mentions (the longest, if several)."""
        ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
        found = [c for c in self.concepts if _find(ids, concept_token_ids(pipe, c)) >= 0]
        if not found:
            raise ValueError(f"Prompt {prompt!r} mentions none of the key's hidden concepts {self.concepts}.")
        return max(found, key=lambda c: len(concept_token_ids(pipe, c)))

    @torch.no_grad()
    def prompt_embeds(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        """``prompt_embeds`` (B, 77, D) for ``generate_images(pipe, None, seeds, prompt_embeds=...)``: each prompt
        with its hidden concept's key tokens inserted after the concept."""
        self.check(pipe=pipe)
        concepts = [self.concept_in(pipe, p) for p in prompts]
        return encode_with_soft_tokens(pipe, prompts, concepts, [self.tokens[c] for c in concepts])


# ------------------------------------------------------------------------------------------ stage 1: hiding
@dataclass
class HideConfig(FinetuneConfig):
    """Knowledge hiding (slides eq. 15): the fine-tuning defaults of ESD/AP plus the key's settings."""

    lam: float = field(default=1.0, metadata={"help": "lambda: weight of ||eps'(c_e, p) - eps(c_e)||^2"})
    preserve_lam: float = field(default=1.0, metadata={"help": "weight of preserving the request's preserve concepts"})
    n_tokens: int = field(default=4, metadata={"help": "soft tokens in each concept's recovery prompt"})
    key_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the recovery prompt p"})
    key_dir: str | None = run_field(None, "where to save the recovery key (keep it apart from the edit)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0 or self.preserve_lam < 0:
            raise ValueError("`lam` and `preserve_lam` must be >= 0.")
        if self.n_tokens <= 0:
            raise ValueError(f"`n_tokens` must be > 0, got {self.n_tokens}.")
        if not self.key_lr > 0:
            raise ValueError(f"`key_lr` must be > 0, got {self.key_lr}.")


class HideLoss(LossFunction):
    """Per-step eq. 15: L1 on ``c_e`` alone, L2 on ``c_e`` with its key ``p`` (p and theta' both learn)."""

    def __init__(self, request: EraseRequest, config: HideConfig) -> None:
        self.request, self.config = request, config
        self.p = torch.nn.ParameterDict()
        self.centers: dict[str, torch.Tensor] = {}
        self._names = {c: f"p{i}" for i, c in enumerate(request.erase)}

    def setup(self, ctx: FinetuneContext) -> None:
        for c, name in self._names.items():
            self.centers[c] = token_center(ctx.pipe, c, self.config.n_tokens)
            self.p[name] = torch.nn.Parameter(self.centers[c].clone())

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.p.values()), "lr": self.config.key_lr}]

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        cfg, z, t, b = self.config, batch.z_t, batch.t, len(batch.concepts)
        cond_key = encode_with_soft_tokens(
            ctx.pipe, batch.concepts, batch.concepts, [self.p[self._names[c]] for c in batch.concepts]
        ).to(ctx.dtype)
        anchor = ctx.embed([self.request.target]).expand(b, -1, -1)
        frozen_conds, edit_conds = [anchor, batch.cond_e], [batch.cond_e, cond_key]
        if self.request.preserve:
            idx = torch.randint(0, len(self.request.preserve), (b,), generator=batch.generator).tolist()
            c_p = ctx.embed([self.request.preserve[i] for i in idx])
            frozen_conds.append(c_p)
            edit_conds.append(c_p)
        n, m = len(frozen_conds), len(edit_conds)
        with torch.no_grad():
            frozen = ctx.eps_frozen(torch.cat([z] * n), torch.cat([t] * n), torch.cat(frozen_conds)).chunk(n)
        edited = ctx.eps(torch.cat([z] * m), torch.cat([t] * m), torch.cat(edit_conds)).chunk(m)
        l1 = F.mse_loss(edited[0], frozen[0])
        l2 = F.mse_loss(edited[1], frozen[1])
        loss = l1 + cfg.lam * l2
        logs = {"l1": float(l1.detach()), "l2_key": float(l2.detach())}
        if self.request.preserve:
            l3 = F.mse_loss(edited[2], frozen[2])
            loss = loss + cfg.preserve_lam * l3
            logs["l_preserve"] = float(l3.detach())
        return StepOutput(loss=loss, logs=logs)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.p.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in self.p.items():
            v.copy_(tensors[k])

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {c: self.p[name].detach() for c, name in self._names.items()}

    def trace(self) -> dict[str, Any]:
        return {"recovery_key": "saved apart from the edit (never in it)", "n_tokens": self.config.n_tokens}


def hide(
    pipe, request: EraseRequest, config: HideConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> tuple[Edit, RecoveryKey]:
    """Stage 1 (slides eq. 15): hide ``request.erase`` behind learnable prompts. Returns the edit and its
    :class:`RecoveryKey` (also saved to ``config.key_dir`` when given). The pipeline is left unchanged."""
    loss_fn = HideLoss(request, config)
    # the edit must not point at its key: record the config without key_dir (not part of the run's hash)
    run_config = dataclasses.replace(config, key_dir=None)
    result = finetune(pipe, request, run_config, loss_fn, method="hide", generator=generator, progress=progress)
    dist = {c: round(float((p - loss_fn.centers[c]).norm()), 6) for c, p in result.extra.items()}
    key = RecoveryKey(
        tokens=result.extra,
        edit_digest=edit_digest(result.edit),
        base={k: result.edit.base.get(k) for k in ("id", "revision", "fingerprint")},
        meta={"stage": "hide", "n_tokens": config.n_tokens, "distance_from_concept": dist, "created": _now()},
    )
    if config.key_dir:
        key.save(config.key_dir)
    return result.edit, key


@register(
    "hide",
    HideConfig,
    "Knowledge hiding: erase behind a secret learnable prompt that recovers it (slides eq. 15)",
    presets={
        "paper": ("slides eqs. 15-16 (Bui et al., ICLR 2025 Delta workshop)", {}),
        "authors": (
            "equal to paper: no public code of the hiding paper was found (seeds, the authors' repositories), "
            "so there is nothing to depart from",
            {},
        ),
    },
    default_preset="paper",
)
def erase_hide(
    pipe, request: EraseRequest, config: HideConfig, *, generator: torch.Generator | None = None, progress: bool = True
) -> Edit:
    """Hide ``request.erase`` (slides eq. 15); the recovery key goes to ``config.key_dir`` (required here,
    so the secret is never lost; :func:`hide` returns it in memory instead)."""
    if not config.key_dir:
        raise ValueError(
            "Method 'hide' needs `key_dir`: the folder for the secret recovery key, kept apart from the edit "
            "(or call erasekit.methods.hide.hide(...) to get the key in memory)."
        )
    check_key_dir(config.key_dir)
    return hide(pipe, request, config, generator=generator, progress=progress)[0]


def check_key_dir(key_dir: str | Path, run_dir: str | Path | None = None) -> None:
    """Refuse a ``key_dir`` that already holds files (another edit's key would be overwritten and that
    edit's hidden concept lost for good) or that lies inside ``run_dir``, the folder that is shipped."""
    d = Path(key_dir)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise ValueError(
            f"`key_dir` {str(d)!r} already exists and is not empty (it may hold another edit's recovery key, "
            "which would be lost); choose a new key_dir."
        )
    if run_dir is not None:
        run, key = Path(run_dir).resolve(), d.resolve()
        if key == run or run in key.parents:
            raise ValueError(
                f"`key_dir` {str(d)!r} is inside the run directory {str(run_dir)!r}, which is what gets shipped; "
                "the recovery key is a secret: put it elsewhere, e.g. --set key_dir=keys/NAME."
            )


# ------------------------------------------------------------------------------------------ stage 2: recovery
@dataclass
class RecoverConfig:
    """Recovery (slides eq. 16): projected gradient descent on the prompt inside an L2 ball."""

    rho: float = field(default=1.0, metadata={"help": "radius of the L2 ball around c_e's token embedding (> 0)"})
    epochs: int = field(default=200, metadata={"help": "optimisation steps; each visits every hidden concept once"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the prompt"})
    n_tokens: int = field(default=4, metadata={"help": "soft tokens (ignored when starting from a key)"})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the sampler that produces z_t"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the sampler that produces z_t"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"`rho` must be > 0 (the radius of the ball around the concept), got {self.rho}.")
        if self.epochs <= 0:
            raise ValueError(f"`epochs` must be > 0, got {self.epochs}.")
        if not self.lr > 0 or self.n_tokens <= 0:
            raise ValueError("`lr` and `n_tokens` must be > 0.")


class RecoverLoss(LossFunction):
    """Per-step eq. 16 against a fixed edit: ||eps_theta'(c_e, p) - eps_theta(c_e)||^2, then projection."""

    train_unet = False

    def __init__(self, edit: Edit, concepts: list[str], config: RecoverConfig, init: RecoveryKey | None) -> None:
        self.edit, self.concepts, self.config, self.init = edit, concepts, config, init
        self.p = torch.nn.ParameterDict()
        self.centers: dict[str, torch.Tensor] = {}
        self._names = {c: f"p{i}" for i, c in enumerate(concepts)}

    @torch.no_grad()
    def setup(self, ctx: FinetuneContext) -> None:
        for n, p in ctx.params.items():  # theta' = the edit
            p.copy_(self.edit.tensors[f"unet.{n}"].to(p.device, p.dtype))
        for c, name in self._names.items():
            n_tok = self.init.tokens[c].shape[0] if self.init is not None else self.config.n_tokens
            self.centers[c] = token_center(ctx.pipe, c, n_tok)
            start = self.init.tokens[c].to(self.centers[c]) if self.init is not None else self.centers[c]
            self.p[name] = torch.nn.Parameter(project_ball(start.clone(), self.centers[c], self.config.rho))

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.p.values()), "lr": self.config.lr}]

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        z, t = batch.z_t, batch.t
        cond_key = encode_with_soft_tokens(
            ctx.pipe, batch.concepts, batch.concepts, [self.p[self._names[c]] for c in batch.concepts]
        ).to(ctx.dtype)
        with torch.no_grad():
            target = ctx.eps_frozen(z, t, batch.cond_e)
        return StepOutput(loss=F.mse_loss(ctx.eps(z, t, cond_key), target))

    def after_step(self, ctx: FinetuneContext) -> None:
        for c, name in self._names.items():
            self.p[name].copy_(project_ball(self.p[name], self.centers[c], self.config.rho))

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {c: self.p[name].detach() for c, name in self._names.items()}


def recover(
    pipe,
    edit: Edit,
    config: RecoverConfig | None = None,
    *,
    concepts: Sequence[str] | None = None,
    init: RecoveryKey | None = None,
    progress: bool = True,
) -> RecoveryKey:
    """Stage 2 (slides eq. 16): a recovery prompt for each hidden concept of ``edit`` (default: all of
    ``edit.request.erase``), optimised within the L2 ball of radius ``config.rho`` around the concept's
    embedding, starting from the concept (or from ``init``'s prompt, projected into the ball).

    ``pipe`` is the *base* pipeline the edit was made from (unchanged); the edit is applied internally.
    """
    config = config or RecoverConfig()
    edit.check_base(pipe)
    if init is not None:
        init.check(edit=edit, pipe=pipe)
    concepts = list(concepts) if concepts is not None else list(edit.request.erase)
    bad = [n for n in edit.tensors if not n.startswith("unet.")]
    if bad:
        raise ValueError(f"Recovery works on UNet edits; this edit also changes {bad[:3]}.")
    if not edit.tensors:
        raise ValueError("The edit changes no tensor: there is nothing to recover from.")
    regex = "^(" + "|".join(re.escape(n.removeprefix("unet.")) for n in sorted(edit.tensors)) + ")$"
    run = FinetuneConfig(
        steps=config.epochs,
        lr=config.lr,
        train_method=regex,
        ddim_steps=config.ddim_steps,
        start_guidance=config.start_guidance,
        concepts_per_step=len(concepts),
        seed=config.seed,
    )
    loss_fn = RecoverLoss(edit, concepts, config, init)
    result = finetune(pipe, EraseRequest(concepts), run, loss_fn, method="hide-recover", progress=progress)
    losses = [r["loss"] for r in result.edit.trace["log"]]
    return RecoveryKey(
        tokens=result.extra,
        edit_digest=edit_digest(edit),
        base={k: edit.base.get(k) for k in ("id", "revision", "fingerprint")},
        meta={
            "stage": "recover",
            "rho": config.rho,
            "epochs": config.epochs,
            "final_loss": losses[-1] if losses else None,
            "distance_from_concept": {
                c: round(float((p - loss_fn.centers[c]).norm()), 6) for c, p in result.extra.items()
            },
            "created": _now(),
        },
    )


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
