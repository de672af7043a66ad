"""The fine-tuning core shared by every output-based erasure method (ESD, AP, AGE, knowledge hiding).

One loop, shared. A method plugs in a :class:`LossFunction` whose ``step`` returns the loss to
minimise at one step; the core does everything else:

1. **Parameters.** ``train_method`` picks the UNet parameters to fine-tune (:func:`resolve_target`:
   ``xattn`` = cross-attention, ESD-x; ``noxattn`` = everything else, ESD-u, exactly as ESD's code
   selects it; ``kv``; ``full``; or a regex).
2. **A frozen original without a second UNet.** The core trains a *structural* copy of the caller's
   UNet in which only the trainable parameters are new tensors; every other parameter shares the
   caller's storage (read-only). The frozen original ``eps_theta`` is the same module called with
   the caller's untouched values of the trainable parameters swapped in by
   :func:`torch.func.functional_call`, so memory grows by the trainable parameters (and Adam's
   state) only, and the caller's pipeline is never written, not even temporarily.
3. **z_t as ESD samples it** (Gandikota et al. 2023, Algorithm 1 / ``quick_sample_till_t``): draw a
   DDIM step index ``i`` uniformly in ``[0, ddim_steps)``, start from Gaussian noise and run ``i``
   DDIM steps (eta 0) of the frozen model (or the one being trained, ``zt_producer="trained"``, as
   ESD's script does) with classifier-free guidance ``start_guidance`` on the erased concept. The latent
   is then evaluated at the timestep it actually has, ``timesteps[i]`` (ESD's CompVis script draws a
   DDPM timestep from ``i / ddim_steps * 1000`` instead, which does not match the latent's noise
   level; its diffusers port uses the matching timestep, as we do).
4. **Determinism and exact resume.** All randomness of step ``s`` comes from a generator seeded by
   ``(seed, s)`` alone, so a run resumed from a checkpoint at step ``s`` draws exactly what the
   uninterrupted run drew. A checkpoint holds the trainable tensors, the optimizer's state, the
   method's own state (e.g. AP's logits and their optimizer) and the step log.
5. **Run directories.** ``run_dir`` gets ``run.json`` (config, its hash, request, base model),
   ``checkpoints/step-XXXXXXXX/`` every ``checkpoint_every`` steps (written to a temporary folder,
   then renamed, so a crash never leaves half a checkpoint), ``log.jsonl`` (one record per step:
   concepts, timestep, losses and the method's records, e.g. AP's adversarial concept) and the
   final ``edit/``. Resuming with a different config is a ``ValueError`` and nothing is written.

Several erased concepts are used per step (``concepts_per_step``; the papers use one, batch size 1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from tqdm.auto import tqdm

from erasekit.edit import Edit, EraseRequest
from erasekit.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from erasekit.pipeline import base_info, encode_prompts
from erasekit.targets import select_parameters

# ESD-u as ESD's code selects it: everything except cross-attention, the global time embedding MLP
# (LDM ``time_embed`` = diffusers ``time_embedding``) and the output layers (LDM ``out.`` =
# diffusers ``conv_norm_out`` / ``conv_out``). The resnets' ``time_emb_proj`` (LDM ``emb_layers``) stay in.
ESD_U_REGEX = r"^(?!time_embedding\.|conv_norm_out\.|conv_out\.)(?!.*\.attn2\.)"
TRAIN_METHODS: dict[str, str] = {"xattn": "xattn", "kv": "kv", "noxattn": ESD_U_REGEX, "full": "full"}

ZT_PRODUCERS = ("exact", "trained")

RUN_JSON = "run.json"
LOG_JSONL = "log.jsonl"
CHECKPOINTS = "checkpoints"
EDIT_DIR = "edit"


def resolve_target(train_method: str) -> str:
    """The :func:`erasekit.targets.select_parameters` target for a ``train_method`` name or regex."""
    return TRAIN_METHODS.get(train_method, train_method)


def run_field(default: Any, help: str) -> Any:  # noqa: A002 - "help" mirrors dataclass metadata
    """A config field that controls *how* a run is executed (not hashed: resuming may change it)."""
    return field(default=default, metadata={"help": help, "run": True})


@dataclass
class FinetuneConfig:
    """Settings every output-based method shares. Defaults are ESD's and AP's (1000 steps, Adam lr 1e-5,
    DDIM 50 steps, start guidance 3, batch size 1)."""

    steps: int = field(default=1000, metadata={"help": "number of descent steps on the model"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the fine-tuned UNet parameters"})
    train_method: str = field(
        default="xattn",
        metadata={"help": "parameters to fine-tune: xattn (ESD-x), noxattn (ESD-u), kv, full, or a regex"},
    )
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the sampler that produces z_t"})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the sampler that produces z_t"})
    zt_producer: Literal["exact", "trained"] = field(
        default="exact",
        metadata={
            "help": "how z_t is produced: exact (a DDIM run of the frozen original per step) or trained "
            "(the same run with the model being trained, as CompVis ESD and the AP/AGE scripts sample)"
        },
    )
    concepts_per_step: int = field(default=1, metadata={"help": "erased concepts (batch rows) per step"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw (per step: seed and step index)"})
    run_dir: str | None = run_field(None, "directory for checkpoints, the step log and the final edit")
    checkpoint_every: int = run_field(100, "write a checkpoint every N steps (needs run_dir)")
    resume: bool = run_field(False, "continue the run in run_dir from its latest checkpoint")
    keep_checkpoints: int = run_field(1, "how many of the latest checkpoints to keep")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"`steps` must be > 0, got {self.steps}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")
        if self.ddim_steps <= 0:
            raise ValueError(f"`ddim_steps` must be > 0, got {self.ddim_steps}.")
        if self.start_guidance < 0:
            raise ValueError(f"`start_guidance` must be >= 0, got {self.start_guidance}.")
        if self.zt_producer not in ZT_PRODUCERS:
            raise ValueError(f"`zt_producer` must be one of {', '.join(ZT_PRODUCERS)}, got {self.zt_producer!r}.")
        if self.concepts_per_step <= 0:
            raise ValueError(f"`concepts_per_step` must be > 0, got {self.concepts_per_step}.")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("`checkpoint_every` must be >= 0 and `keep_checkpoints` >= 1.")
        if self.resume and self.run_dir is None:
            raise ValueError("`resume=True` needs `run_dir`: the directory of the run to continue.")
        target = resolve_target(self.train_method)
        if target not in ("xattn", "kv", "noxattn", "full"):
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(
                    f"`train_method` {self.train_method!r} is not a known name or a valid regex: {e}."
                ) from e


def hashed_config(config: Any) -> dict[str, Any]:
    """The config fields that determine a run's result (run-control fields such as ``run_dir`` left out)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if not f.metadata.get("run")}


def config_hash(payload: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a JSON-ready payload, keys sorted."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``: a function of ``(seed, step)`` only (what makes resume exact)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(step)]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] % np.uint64(2**63)))


def effective_seed(config: FinetuneConfig, generator: torch.Generator | None) -> int:
    """``config.seed``, or a seed drawn from ``generator`` when one is passed (recorded in the run)."""
    if generator is None:
        return int(config.seed)
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


# ------------------------------------------------------------------------------------------ context
class FinetuneContext:
    """The trainable UNet, the frozen original and cached text embeddings for one run.

    ``eps(z, t, cond)`` is eps_theta' (the model being fine-tuned, with gradients); ``eps_frozen`` is
    eps_theta (the original: the caller's own tensors swapped in, no parameter gradients, but inputs
    such as a learnable embedding still get gradients when they require them).
    """

    def __init__(self, pipe, train_method: str, *, ddim_steps: int = 50) -> None:
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.target = resolve_target(train_method)
        chosen = select_parameters(pipe.unet, self.target)
        self.originals: dict[str, torch.Tensor] = {n: p.detach() for n, p in chosen.items()}
        self.unet = _structural_copy(pipe.unet, set(chosen))
        self.params: dict[str, torch.nn.Parameter] = {n: self.unet.get_parameter(n) for n in chosen}
        self.unet.train(False)  # the UNet has no dropout/BN by default; eval mode keeps any deterministic
        self.device = next(pipe.unet.parameters()).device
        self.dtype = next(pipe.unet.parameters()).dtype
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(ddim_steps, device=self.device)
        self._embed_cache: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- model calls
    def eps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta'(z_t, c, t) of the model being fine-tuned."""
        return self.unet(z, t, encoder_hidden_states=cond).sample

    def eps_frozen(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta(z_t, c, t) of the original model (the caller's tensors, never trained)."""
        return functional_call(self.unet, self.originals, (z, t), {"encoder_hidden_states": cond}).sample

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder embeddings (B, 77, D) of ``prompts``, cached per prompt (the encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            emb = encode_prompts(self.pipe, missing).to(self.device, self.dtype)
            self._embed_cache.update(zip(missing, emb, strict=True))
        return torch.stack([self._embed_cache[p] for p in prompts])

    def current_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters' current values, named as in the pipeline (``unet.<name>``)."""
        return {f"unet.{n}": p.detach().clone() for n, p in self.params.items()}

    # -------------------------------------------------------------- z_t
    @torch.no_grad()
    def sample_zt(
        self,
        cond: torch.Tensor,
        n_steps: int,
        generator: torch.Generator,
        *,
        guidance: float,
        frozen: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``n_steps`` DDIM steps from noise with CFG ``guidance`` on ``cond`` (B, 77, D).

        Returns ``(z_t, t)``: the latent (B, C, h, w) and its timestep (B,) (``timesteps[n_steps]``).
        """
        b = cond.shape[0]
        cfg = self.pipe.unet.config
        shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        z = torch.randn(shape, generator=generator).to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        uncond = self.embed([""]).expand(b, -1, -1)
        both = torch.cat([uncond, cond])
        model = self.eps_frozen if frozen else self.eps
        for k in range(n_steps):
            t = self.scheduler.timesteps[k]
            e_u, e_c = model(torch.cat([z, z]), t.expand(2 * b), both).chunk(2)
            z = self.scheduler.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
        t = self.scheduler.timesteps[n_steps].expand(b).to(self.device)
        return z, t


def _structural_copy(unet: torch.nn.Module, trainable: set[str]) -> torch.nn.Module:
    """A copy of ``unet`` whose ``trainable`` parameters are fresh tensors and whose other parameters
    and buffers share the original storage (as parameters that do not require grad)."""
    memo: dict[int, Any] = {}
    for name, p in unet.named_parameters():
        if name not in trainable:
            memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    for b in unet.buffers():
        memo[id(b)] = b
    clone = copy.deepcopy(unet, memo)
    for name, p in clone.named_parameters():
        if name in trainable:
            p.requires_grad_(True)
    return clone


# ------------------------------------------------------------------------------------------ plug-in
@dataclass
class StepBatch:
    """What the core hands a method at one step."""

    step: int
    concepts: list[str]  # erased concept of each row
    z_t: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,) timesteps
    cond_e: torch.Tensor  # (B, 77, D) embeddings of ``concepts``
    generator: torch.Generator  # the step's generator, for the method's own randomness (e.g. Gumbel noise)


@dataclass
class StepOutput:
    """A method's answer at one step: the loss to minimise, scalars to log, and a JSON-ready record."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class LossFunction:
    """Base class of a method's per-step loss. Subclasses implement :meth:`step`; those with their own
    learnable state (logits, soft prompts) also override the state methods so checkpoints carry it.

    ``train_unet = False`` keeps the UNet fixed (only :meth:`param_groups` are optimised), for
    optimisations against a finished edit such as recovering a hidden concept's prompt.
    """

    train_unet: bool = True

    def setup(self, ctx: FinetuneContext) -> None:
        """Called once before the first step (precompute embeddings, build the search space, load an edit)."""

    def after_step(self, ctx: FinetuneContext) -> None:
        """Called after every optimizer step, without gradients (e.g. a projection onto a constraint set)."""

    def step(self, ctx: FinetuneContext, batch: StepBatch) -> StepOutput:
        """The loss to minimise on the model at this step."""
        raise TypeError(f"{type(self).__name__} must implement step(ctx, batch).")

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra tensors the core's optimizer updates with the UNet (each a torch.optim param group)."""
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the step index, fully describe the method's state (saved in checkpoints)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""

    def trace(self) -> dict[str, Any]:
        """JSON-ready facts for the Edit's trace (e.g. the search space)."""
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors produced beside the edit (e.g. a recovery key); returned by :func:`finetune`."""
        return {}


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the edit, and tensors a method keeps apart from it."""

    edit: Edit
    extra: dict[str, torch.Tensor]
    run_dir: Path | None


# ------------------------------------------------------------------------------------------ the loop
def finetune(
    pipe,
    request: EraseRequest,
    config: FinetuneConfig,
    loss_fn: LossFunction,
    *,
    method: str,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``pipe``'s UNet with ``loss_fn`` (the shared loop; see the module docstring).

    The caller's pipeline is not modified. Returns the :class:`~erasekit.edit.Edit` of the trainable
    parameters, with the step log and the method's trace in ``edit.trace``.
    """
    seed = effective_seed(config, generator)
    base = dict(base_info(pipe))
    identity = {
        "method": method,
        "config": hashed_config(config),
        "request": asdict(request),
        "base_fingerprint": base.get("fingerprint"),
        "seed": seed,
    }
    digest = config_hash(identity)
    run_dir = Path(config.run_dir) if config.run_dir else None
    if run_dir is not None:
        _check_run_dir(run_dir, identity, digest, config.resume)

    ctx = FinetuneContext(pipe, config.train_method, ddim_steps=config.ddim_steps)
    loss_fn.setup(ctx)
    groups = [{"params": list(ctx.params.values()), "lr": config.lr}] if loss_fn.train_unet else []
    if not loss_fn.train_unet:
        for p in ctx.params.values():
            p.requires_grad_(False)
    groups += loss_fn.param_groups()
    if not groups:
        raise ValueError(f"{type(loss_fn).__name__} trains nothing: it keeps the UNet fixed and has no param_groups().")
    opt = torch.optim.Adam(groups)
    log: list[dict[str, Any]] = []
    start = 0
    if run_dir is not None and config.resume:
        start, log = _load_latest_checkpoint(run_dir, ctx, opt, loss_fn)
    if run_dir is not None:
        write_json_atomic(
            run_dir / RUN_JSON, {**identity, "config_hash": digest, "base": base, "config_all": asdict(config)}
        )
        _write_log(run_dir, log)

    # 1. The loop: sample concepts and z_t, ask the method for a loss, one optimizer step.
    t0 = time.time()
    running: dict[str, float] = {}
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=method, disable=not progress)
    log_file = open(run_dir / LOG_JSONL, "a", encoding="utf-8") if run_dir is not None else None  # noqa: SIM115
    try:
        for step in bar:
            batch = _make_batch(ctx, request, config, seed, step)
            out = loss_fn.step(ctx, batch)
            trained = [p for group in opt.param_groups for p in group["params"]]
            for p, grad in zip(trained, torch.autograd.grad(out.loss, trained, allow_unused=True), strict=True):
                p.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                loss_fn.after_step(ctx)
            logs = {"loss": float(out.loss.detach()), **out.logs}
            rec = {"step": step, "erase": batch.concepts, "t": int(batch.t[0]), **_round(logs), **out.record}
            log.append(rec)
            if log_file is not None:
                log_file.write(json.dumps(rec, sort_keys=True) + "\n")
                log_file.flush()
            for k, v in logs.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
            done = step + 1
            if run_dir is not None and (
                done == config.steps or config.checkpoint_every and done % config.checkpoint_every == 0
            ):
                _save_checkpoint(run_dir, done, ctx, opt, loss_fn, log, config.keep_checkpoints)
    finally:
        if log_file is not None:
            log_file.close()
        bar.close()
    seconds = time.time() - t0

    # 2. The edit: the trainable tensors, with the run's record.
    trace: dict[str, Any] = {
        "train_method": config.train_method,
        "target": ctx.target,
        "n_tensors": len(ctx.params),
        "n_parameters": int(sum(p.numel() for p in ctx.params.values())),
        "seed": seed,
        "config_hash": digest,
        "steps_this_call": config.steps - start,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, config.steps - start), 5),
        "log": log,
        **loss_fn.trace(),
    }
    if run_dir is not None:
        trace["run_dir"] = str(run_dir)
        trace["log_path"] = str(run_dir / LOG_JSONL)
    edit = Edit(
        tensors=ctx.current_tensors(), method=method, config=asdict(config), request=request, base=base, trace=trace
    )
    if run_dir is not None:
        edit.save(run_dir / EDIT_DIR)
    return FinetuneResult(
        edit=edit, extra={k: v.detach().clone() for k, v in loss_fn.extra_tensors().items()}, run_dir=run_dir
    )


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


def _make_batch(ctx: FinetuneContext, request: EraseRequest, config: FinetuneConfig, seed: int, step: int) -> StepBatch:
    """Draw the step's erased concepts, DDIM step and z_t from the step's generator."""
    gen = step_generator(seed, step)
    n, b = len(request.erase), config.concepts_per_step
    if b <= n:
        idx = torch.randperm(n, generator=gen)[:b].tolist()
    else:
        idx = torch.randint(0, n, (b,), generator=gen).tolist()
    concepts = [request.erase[i] for i in idx]
    cond_e = ctx.embed(concepts)
    n_steps = int(torch.randint(0, config.ddim_steps, (1,), generator=gen))
    z_t, t = ctx.sample_zt(cond_e, n_steps, gen, guidance=config.start_guidance, frozen=config.zt_producer != "trained")
    return StepBatch(step=step, concepts=concepts, z_t=z_t, t=t, cond_e=cond_e, generator=gen)


# ------------------------------------------------------------------------------------------ checkpoints
def _check_run_dir(run_dir: Path, identity: dict[str, Any], digest: str, resume: bool) -> None:
    """Refuse a run directory that holds a different run, or any run when not resuming (writes nothing)."""
    meta_path = run_dir / RUN_JSON
    if not meta_path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"`run_dir` {str(run_dir)!r} is not empty and holds no run ({RUN_JSON} missing); choose a new directory."
            )
        return
    meta = json.loads(meta_path.read_text())
    if not resume:
        raise ValueError(
            f"`run_dir` {str(run_dir)!r} already holds a run (config hash {meta.get('config_hash')}). "
            "Pass resume=True to continue it, or choose another run_dir; nothing was overwritten."
        )
    if meta.get("config_hash") != digest:
        diff = _diff(meta, identity)
        raise ValueError(
            f"Cannot resume {str(run_dir)!r}: it was started with a different configuration "
            f"(hash {meta.get('config_hash')} != {digest}; differing: {diff}). Use the original settings or a new "
            "run_dir; nothing was overwritten."
        )


def _diff(meta: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    out = []
    for k, v in identity.items():
        old = meta.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out += [
                f"{k}.{kk}: {old.get(kk)!r} -> {vv!r}"
                for kk, vv in v.items()
                if json.dumps(old.get(kk), default=str) != json.dumps(vv, default=str)
            ]
        elif json.dumps(old, default=str) != json.dumps(v, default=str):
            out.append(f"{k}: {old!r} -> {v!r}")
    return out


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _save_checkpoint(
    run_dir: Path,
    step: int,
    ctx: FinetuneContext,
    opt: torch.optim.Optimizer,
    loss_fn: LossFunction,
    log: list,
    keep: int,
) -> None:
    """Write ``checkpoints/step-XXXXXXXX`` atomically (a temporary folder renamed into place)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors_atomic({n: p.detach() for n, p in ctx.params.items()}, tmp / "trainable.safetensors")
    save_safetensors_atomic(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
    save_safetensors_atomic(loss_fn.state_tensors(), tmp / "method.safetensors")
    write_json_atomic(tmp / "state.json", {"step": step, "log": log})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None``."""
    root = Path(run_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


@torch.no_grad()
def _load_latest_checkpoint(
    run_dir: Path, ctx: FinetuneContext, opt: torch.optim.Optimizer, loss_fn: LossFunction
) -> tuple[int, list[dict[str, Any]]]:
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return 0, []
    weights = load_file(ck / "trainable.safetensors")
    if set(weights) != set(ctx.params):
        raise ValueError(f"Checkpoint {str(ck)!r} holds different parameters than this run trains; use a new run_dir.")
    for n, p in ctx.params.items():
        p.copy_(weights[n].to(p.device, p.dtype))
    loss_fn.load_state_tensors(load_file(ck / "method.safetensors"))
    _load_optimizer_tensors(opt, load_file(ck / "optimizer.safetensors"))
    state = json.loads((ck / "state.json").read_text())
    return int(state["step"]), list(state["log"])


def _write_log(run_dir: Path, log: list[dict[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` with the records up to the checkpoint (later ones are recomputed)."""
    write_text_atomic(run_dir / LOG_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of a run's ``log.jsonl``."""
    path = Path(run_dir) / LOG_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
