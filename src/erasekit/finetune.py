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
   DDIM steps (eta 0) with classifier-free guidance ``start_guidance`` on the erased concept. The
   latent is then evaluated at the timestep it actually has, ``timesteps[i]`` (ESD's CompVis script
   draws a DDPM timestep from ``i / ddim_steps * 1000`` instead, which does not match the latent's
   noise level; its diffusers port uses the matching timestep, as we do). A :class:`ZtProducer`
   makes the step's concepts and z_t (``zt_producer``, recorded in the edit's config and trace):

   - ``exact``: one DDIM run of the frozen original per step (the paper's sampler; the reference).
   - ``batched``: the same draws and runs, ``zt_batch_steps`` steps at a time in one batched DDIM run;
     the frozen model does not change, so the z_t equal ``exact``'s (to float rounding).
   - ``pooled``: whole frozen trajectories, each of whose ``ddim_steps`` latents serves one step, in
     an order shuffled across trajectories and concepts (:class:`PooledProducer`). Each z_t has
     exactly ``exact``'s distribution; steps become correlated through shared trajectories. About
     one UNet forward a step for z_t instead of ``~ddim_steps``.
   - ``trained``: a DDIM run per step with the model being trained, as the CompVis ESD script and the
     AP/AGE scripts sample (a departure from the papers' frozen sampler, for the ``authors`` presets).

   Frozen passes that need no gradient run under :func:`torch.inference_mode`. What "the UNet",
   "the conditioning", the sampler and its grid are on SDXL (pooled embeddings, time ids) and SD3 (a
   transformer, flow-matching Euler steps) comes from the pipeline's family adapter
   (:mod:`erasekit.families`); half-precision weights train with fp32 masters
   (:mod:`erasekit.families.memory`).
4. **Determinism and exact resume.** All randomness of step ``s`` comes from a generator seeded by
   ``(seed, s)`` alone, so a run resumed from a checkpoint at step ``s`` draws exactly what the
   uninterrupted run drew. A checkpoint holds the trainable tensors, the optimizer's state, the
   method's own state (e.g. AP's logits and their optimizer), the producer's state (the pooled
   producer's remaining latents) and the step log; resuming with another producer is refused.
5. **Run directories.** ``run_dir`` is a run directory (:class:`erasekit.rundir.RunDir`; its
   ``run.json`` is made if it has none). The fine-tuning goes to its ``train/``: ``train.json`` (the
   run's identity: method, config, request, base fingerprint, seed; and its hash),
   ``checkpoints/step-XXXXXXXX/`` every ``checkpoint_every`` steps (written to a temporary folder,
   then renamed, so a crash never leaves half a checkpoint), ``log.jsonl`` (one record per step:
   concepts, timestep, losses and the method's records, e.g. AP's adversarial concept); the final
   edit goes to ``edit/``. Resuming with a different config is a ``ValueError`` naming the differing
   keys, and nothing is written.

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

from erasekit import lora_train
from erasekit.edit import Edit, EraseRequest
from erasekit.families import family_of
from erasekit.families.memory import MasterWeights, describe, make_optimizer, memory_options
from erasekit.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from erasekit.options import is_read
from erasekit.pipeline import base_info
from erasekit.rundir import ResumableDir, RunDir, RunDirMismatch
from erasekit.runs import locked
from erasekit.targets import select_parameters

# ESD-u as ESD's code selects it: everything except cross-attention, the global time embedding MLP
# (LDM ``time_embed`` = diffusers ``time_embedding``) and the output layers (LDM ``out.`` =
# diffusers ``conv_norm_out`` / ``conv_out``). The resnets' ``time_emb_proj`` (LDM ``emb_layers``) stay in.
ESD_U_REGEX = r"^(?!time_embedding\.|conv_norm_out\.|conv_out\.)(?!.*\.attn2\.)"
TRAIN_METHODS: dict[str, str] = {"xattn": "xattn", "kv": "kv", "noxattn": ESD_U_REGEX, "full": "full"}

ZT_PRODUCERS = ("exact", "batched", "pooled", "trained")
ZtProducerName = Literal["exact", "batched", "pooled", "trained"]  # methods that redeclare the default use it

TRAIN_DIR = "train"  # inside the run directory (RunDir.train_dir)
TRAIN_LOCK = ".train.lock"  # in the run directory, held by finetune() for the whole run
TRAIN_JSON = "train.json"
LOG_JSONL = "log.jsonl"
CHECKPOINTS = "checkpoints"
PRODUCER_FILE = "producer.safetensors"


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
    zt_producer: ZtProducerName = field(
        default="exact",
        metadata={
            "help": "how z_t is produced: exact (a DDIM run of the frozen original per step), batched (the same "
            "runs for zt_batch_steps upcoming steps in one batched DDIM run: the same z_t), pooled (whole frozen "
            "DDIM trajectories, every latent of each used once, shuffled; ~1 UNet forward a step instead of "
            "~ddim_steps) or trained (a DDIM run per step with the model being trained, as CompVis ESD and the "
            "AP/AGE scripts sample)"
        },
    )
    zt_batch_steps: int = field(
        default=16,
        metadata={
            "help": "batched: steps whose z_t one batched DDIM run computes (memory grows with it)",
            "used_when": {"zt_producer": ("batched",)},
        },
    )
    zt_pool_size: int = field(
        default=16,
        metadata={
            "help": "pooled: DDIM trajectories computed together at each refresh of the pool (each gives "
            "ddim_steps latents; more = less correlation between steps, more memory)",
            "used_when": {"zt_producer": ("pooled",)},
        },
    )
    concepts_per_step: int = field(default=1, metadata={"help": "erased concepts (batch rows) per step"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw (per step: seed and step index)"})
    run_dir: str | None = run_field(None, "directory for checkpoints, the step log and the final edit")
    checkpoint_every: int = run_field(100, "write a checkpoint every N steps (needs run_dir)")
    resume: bool = run_field(False, "continue the run in run_dir from its latest checkpoint")
    keep_checkpoints: int = run_field(1, "how many of the latest checkpoints to keep")
    stop_at: int | None = run_field(
        None,
        "stop after this many steps (a checkpoint is written there) and return that edit; resume towards `steps` later",
    )

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
        if self.zt_batch_steps < 1 or self.zt_pool_size < 1:
            raise ValueError(
                f"`zt_batch_steps` and `zt_pool_size` must be >= 1, got {self.zt_batch_steps} and {self.zt_pool_size}."
            )
        if self.concepts_per_step <= 0:
            raise ValueError(f"`concepts_per_step` must be > 0, got {self.concepts_per_step}.")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("`checkpoint_every` must be >= 0 and `keep_checkpoints` >= 1.")
        if self.resume and self.run_dir is None:
            raise ValueError("`resume=True` needs `run_dir`: the directory of the run to continue.")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"`stop_at` must be in 1..steps ({self.steps}), got {self.stop_at}.")
        target = resolve_target(self.train_method)
        if target not in ("xattn", "kv", "noxattn", "full"):
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(
                    f"`train_method` {self.train_method!r} is not a known name or a valid regex: {e}."
                ) from e


def hashed_config(config: Any) -> dict[str, Any]:
    """The config fields that determine a run's result: run-control fields such as ``run_dir`` and the
    options this config does not read (``used_when`` metadata, e.g. ``zt_pool_size`` of a non-pooled
    run) are left out, so adding such an option does not change the hash of the runs that ignore it."""
    return {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if not f.metadata.get("run")
        and is_read(config, f)
        and not (f.metadata.get("hash_omit_default") and getattr(config, f.name) == f.default)  # e.g. lora_rank None
    }


def config_hash(payload: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a JSON-ready payload, keys sorted."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_generator(seed: int, step: int, *stream: int) -> torch.Generator:
    """The CPU generator of step ``step``: a function of ``(seed, step)`` only (what makes resume exact).

    ``stream`` (extra integers) names an independent generator of the same step, e.g. the pooled
    producer's refresh draws, so that adding one never shifts the draws of another.
    """
    entropy = [int(seed) % 2**63, int(step), *(int(x) for x in stream)]
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
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

    def __init__(
        self, pipe, train_method: str, *, ddim_steps: int = 50, lora_rank: int | None = None, seed: int = 0
    ) -> None:
        self.pipe = pipe
        self.family = family_of(pipe)  # what conditioning, prediction and z_t sampling mean (erasekit.families)
        self.denoiser = self.family.denoiser(pipe)  # the caller's UNet (or SD3 transformer), never written
        self.target = self.family.train_target(train_method)
        chosen = select_parameters(self.denoiser, self.target)
        self.lora_rank, self.lora_modules = lora_rank, []
        if lora_rank is None:
            self.originals: dict[str, torch.Tensor] = {n: p.detach() for n, p in chosen.items()}
            self.unet = _structural_copy(self.denoiser, set(chosen))
            self.params: dict[str, torch.nn.Parameter] = {n: self.unet.get_parameter(n) for n in chosen}
        else:  # a rank-R LoRA on the chosen Linear layers (erasekit.lora_train); frozen original: lora_B = 0
            self.lora_modules = lora_train.lora_modules(self.denoiser, chosen)
            lora_train.check_rank_fits(self.denoiser, self.lora_modules, lora_rank, train_method)
            self.unet = _structural_copy(self.denoiser, set())
            self.params = lora_train.inject_lora(self.unet, self.lora_modules, lora_rank, seed)
            self.originals = {n: torch.zeros_like(p) for n, p in self.params.items() if ".lora_B." in n}
        self.unet.train(False)  # the UNet has no dropout/BN by default; eval mode keeps any deterministic
        self.device = next(self.denoiser.parameters()).device
        self.dtype = next(self.denoiser.parameters()).dtype
        self.scheduler = self.family.train_scheduler(pipe, ddim_steps, self.device)
        self._embed_cache: dict[str, torch.Tensor] = {}
        self.masters: MasterWeights | None = None  # fp32 masters of half-precision weights (families.memory)

    # -------------------------------------------------------------- model calls
    def eps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta'(z_t, c, t) of the model being fine-tuned."""
        return self.family.predict(self.pipe, self.unet, z, t, cond)

    def eps_frozen(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps_theta(z_t, c, t) of the original model (the caller's tensors, never trained).

        When gradients are on and an input requires them (AP's search differentiates through this call
        with respect to a relaxed embedding), the structural copy is called with the original tensors
        swapped in (:func:`torch.func.functional_call`), so no gradient can reach the caller's parameters;
        otherwise the caller's UNet itself is called, read-only, under :func:`torch.inference_mode` (no
        graph, no version counters, no parameter swap) and an ordinary tensor is returned.
        """
        if torch.is_grad_enabled() and (z.requires_grad or cond.requires_grad):
            kwargs = self.family.model_kwargs(self.pipe, z, t, cond)
            return functional_call(self.unet, self.originals, (), kwargs).sample
        with torch.inference_mode():  # read-only: the caller's own UNet holds exactly the original tensors
            out = self.family.predict(self.pipe, self.denoiser, z, t, cond)
        return out.clone()  # an inference tensor cannot be saved for backward (ESD's loss uses it as a target)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder embeddings (B, 77, D) of ``prompts``, cached per prompt (the encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embed_cache]
        if missing:
            emb = self.family.encode_condition(self.pipe, missing).to(self.device, self.dtype)
            self._embed_cache.update(zip(missing, emb, strict=True))
        return torch.stack([self._embed_cache[p] for p in prompts])

    def current_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters' current values, named as in the pipeline (``unet.<name>``); with a
        LoRA, the merged weights ``W_0 + B A`` of the adapted layers."""
        if self.lora_rank is not None:
            return lora_train.merged_tensors(self.unet, self.lora_modules)
        return {f"{self.family.denoiser_name}.{n}": p.detach().clone() for n, p in self.params.items()}

    # -------------------------------------------------------------- z_t
    def initial_noise(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """The DDIM run's starting latents (b, C, h, w): Gaussian noise from ``generator`` (drawn on the CPU,
        so a seed gives the same noise on every device) times the scheduler's ``init_noise_sigma``."""
        return self.family.initial_noise(self.pipe, self.scheduler, b, generator, self.device, self.dtype)

    def ddim_latents(
        self,
        cond: torch.Tensor,
        z: torch.Tensor,
        n_steps: Sequence[int],
        *,
        guidance: float,
        frozen: bool = True,
        keep_all: bool = False,
        keep_eps: bool = False,
        start: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched DDIM (eta 0) with CFG ``guidance`` from latents ``z`` (B, C, h, w): row ``r`` runs
        ``n_steps[r]`` steps of the grid, conditioned on ``cond[r]``, and then stays put.

        ESD, Algorithm 1 (``quick_sample_till_t``), for many rows at once; the one DDIM loop of the core.
        Returns the latents after each row's steps (B, C, h, w) or, with ``keep_all``, every latent of
        the runs (B, max(n_steps) + 1, C, h, w; index k = after k steps). Runs under
        :func:`torch.inference_mode` (z_t is an input of the loss, never differentiated); ``frozen=False``
        samples with the model being trained (``zt_producer="trained"``).

        ``keep_eps`` (with ``keep_all``) also returns the two predictions the guidance combined at every
        kept latent, ``(latents, eps_uncond, eps_cond)``, each (B, max(n_steps) + 1, C, h, w): index k is
        eps(z_k, "", t_k) and eps(z_k, cond, t_k), the model evaluated once more at the last latent (a
        forward that is not followed by a step). A method whose loss needs exactly these predictions
        (ESD's frozen targets, eq. 4) reads them instead of recomputing them.

        ``start`` continues runs already ``start`` steps along: ``z`` is the latent after ``start`` steps,
        ``n_steps`` count from the grid's start (each >= ``start``), and ``keep_all`` returns the latents
        after ``start .. max(n_steps)`` steps (the steps are stateless, so a run continued is the run).
        """
        b = cond.shape[0]
        if len(n_steps) != b or z.shape[0] != b:
            raise ValueError(
                f"`n_steps` ({len(n_steps)}) and `z` ({z.shape[0]}) need one entry per row of `cond` ({b})."
            )
        todo = torch.as_tensor(list(n_steps), dtype=torch.long)
        if start and (keep_eps or (b and int(todo.min()) < start)):
            raise ValueError(
                f"With `start`={start}, every `n_steps` must be >= start, and `keep_eps` is not supported."
            )
        model = self.eps_frozen if frozen else self.eps
        if keep_eps and not (keep_all and len(set(n_steps)) <= 1):
            raise ValueError("`keep_eps` needs `keep_all` and rows that all run the same number of steps.")
        uncond = self.embed([""])  # outside inference mode: the cache must hold ordinary tensors
        with torch.inference_mode():
            seen, eps_u, eps_c = ([z] if keep_all else []), [], []
            last = int(todo.max()) if b else 0
            for k in range(start, last + 1 if keep_eps else last):
                t = self.scheduler.timesteps[k]
                rows = (todo > k).nonzero().squeeze(1)
                full = len(rows) == b or keep_eps
                z_a, c_a = (z, cond) if full else (z[rows], cond[rows])
                n = z_a.shape[0]
                e_u, e_c = model(
                    torch.cat([z_a, z_a]), t.expand(2 * n), torch.cat([uncond.expand(n, -1, -1), c_a])
                ).chunk(2)
                if keep_eps:
                    eps_u.append(e_u)
                    eps_c.append(e_c)
                    if k == last:
                        break
                new = self.family.scheduler_step(self.scheduler, e_u + guidance * (e_c - e_u), t, z_a)
                z = new if full else z.index_copy(0, rows.to(z.device), new)
                if keep_all:
                    seen.append(z)
            out = torch.stack(seen, 1) if keep_all else z
            if keep_eps:
                return out.clone(), torch.stack(eps_u, 1).clone(), torch.stack(eps_c, 1).clone()
        return out.clone()  # an ordinary tensor: the loss's graph may save it

    def timesteps_at(self, n_steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The timestep of the latent after ``n_steps[r]`` DDIM steps, per row (B,): ``timesteps[n_steps[r]]``."""
        idx = torch.as_tensor(n_steps, dtype=torch.long, device=self.scheduler.timesteps.device)
        return self.scheduler.timesteps[idx].to(self.device)

    def sample_zt(
        self,
        cond: torch.Tensor,
        n_steps: int,
        generator: torch.Generator,
        *,
        guidance: float,
        frozen: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``n_steps`` DDIM steps from noise drawn from ``generator`` with CFG ``guidance`` on ``cond`` (B, 77, D).

        Returns ``(z_t, t)``: the latent (B, C, h, w) and its timestep (B,) (``timesteps[n_steps]``).
        """
        b = cond.shape[0]
        z = self.ddim_latents(cond, self.initial_noise(b, generator), [n_steps] * b, guidance=guidance, frozen=frozen)
        return z, self.timesteps_at([n_steps] * b)


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
    # the frozen original's eps(z_t, "", t) and eps(z_t, cond_e, t), when the producer computed them anyway
    # (``pooled`` for a loss with ``uses_frozen_eps``); None otherwise
    frozen_eps: tuple[torch.Tensor, torch.Tensor] | None = None


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
    # True when the loss needs the frozen original's eps(z_t, "", t) and eps(z_t, c_e, t): a producer that
    # computes them on the way (``pooled``) then hands them over in ``StepBatch.frozen_eps``
    uses_frozen_eps: bool = False

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


# ------------------------------------------------------------------------------------------ z_t producers
def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (CUDA OOM, or the CPU allocator's "can't allocate memory")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate" in str(e).lower())


class ZtProducer:
    """Where a step's erased concepts and z_t come from: the interface of the ``zt_producer`` options.

    One producer serves one run. :meth:`prepare` is called once before the first step of a call (after
    a resumed run's state is loaded), :meth:`batch` at every step, in order. All randomness comes from
    :func:`step_generator` (seed, step[, stream]), and whatever a producer carries from one step to the
    next is in :meth:`state_tensors`, which checkpoints save: a resumed run draws what the uninterrupted
    one drew, bit for bit.
    """

    name = ""

    def __init__(self, ctx: FinetuneContext, config: FinetuneConfig, erase: Sequence[str], seed: int) -> None:
        self.ctx, self.config, self.erase, self.seed = ctx, config, list(erase), seed

    def prepare(self, start: int) -> None:
        """Precompute what step ``start`` needs (errors such as running out of memory come here, before
        the run writes anything)."""

    def batch(self, step: int) -> StepBatch:
        """The :class:`StepBatch` of step ``step``."""
        raise TypeError(f"{type(self).__name__} must implement batch(step).")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The producer's state between steps (saved in checkpoints; empty for stateless producers)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""

    def _draw(self, gen: torch.Generator) -> tuple[list[str], int]:
        """A step's erased concepts (``concepts_per_step``, distinct when there are enough) and DDIM step
        index ``i`` uniform in ``[0, ddim_steps)``, drawn from the step's generator (ESD, Algorithm 1)."""
        n, b = len(self.erase), self.config.concepts_per_step
        idx = (
            torch.randperm(n, generator=gen)[:b].tolist()
            if b <= n
            else torch.randint(0, n, (b,), generator=gen).tolist()
        )
        return [self.erase[i] for i in idx], int(torch.randint(0, self.config.ddim_steps, (1,), generator=gen))


class ExactProducer(ZtProducer):
    """``exact``: a DDIM run of the frozen original per step, from the step's own noise to its drawn
    step index (ESD, Algorithm 1, with the paper's frozen sampler). The reference of the others."""

    name = "exact"
    frozen = True

    def batch(self, step: int) -> StepBatch:
        gen = step_generator(self.seed, step)
        concepts, n_steps = self._draw(gen)
        cond_e = self.ctx.embed(concepts)
        z_t, t = self.ctx.sample_zt(cond_e, n_steps, gen, guidance=self.config.start_guidance, frozen=self.frozen)
        return StepBatch(step=step, concepts=concepts, z_t=z_t, t=t, cond_e=cond_e, generator=gen)


class TrainedProducer(ExactProducer):
    """``trained``: as ``exact`` but sampled with the model being trained (at its current weights), as
    the CompVis ESD script and the AP/AGE scripts do (their ``authors`` presets). The model changes at
    every step, so the runs cannot be precomputed; the concepts of one step are one batch."""

    name = "trained"
    frozen = False


class BatchedProducer(ZtProducer):
    """``batched``: the draws of ``exact`` (same generator, same order: concepts, step index, noise),
    but the DDIM runs of ``zt_batch_steps`` consecutive steps are computed as one batch (each row stops
    at its own step index). The frozen model does not change during the run, so each z_t equals
    ``exact``'s up to float rounding; the FLOPs are the same, only per-call overhead goes. Chunks are
    aligned to multiples of ``zt_batch_steps``, so a resumed run recomputes exactly the same batches.
    """

    name = "batched"

    def __init__(self, ctx: FinetuneContext, config: FinetuneConfig, erase: Sequence[str], seed: int) -> None:
        super().__init__(ctx, config, erase, seed)
        self._ready: dict[int, StepBatch] = {}

    def prepare(self, start: int) -> None:
        self._fill(start)

    def _fill(self, step: int) -> None:
        size = self.config.zt_batch_steps
        first = step - step % size
        steps = range(first, min(first + size, self.config.steps))
        drawn = []
        for s in steps:
            gen = step_generator(self.seed, s)
            concepts, n_steps = self._draw(gen)
            drawn.append((s, gen, concepts, n_steps, self.ctx.initial_noise(len(concepts), gen)))
        concepts_all = [c for d in drawn for c in d[2]]
        rows = [d[3] for d in drawn for _ in d[2]]
        cond = self.ctx.embed(concepts_all)
        try:
            z = self.ctx.ddim_latents(cond, torch.cat([d[4] for d in drawn]), rows, guidance=self.config.start_guidance)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _out_of_memory(e):
                raise
            raise ValueError(
                f"zt_producer='batched': the DDIM runs of `zt_batch_steps`={size} steps ({len(rows)} rows) do not "
                f"fit in memory; lower `zt_batch_steps`. ({e})"
            ) from e
        t = self.ctx.timesteps_at(rows)
        at = 0
        for s, gen, concepts, _, _ in drawn:
            b = len(concepts)
            self._ready[s] = StepBatch(
                step=s, concepts=concepts, z_t=z[at : at + b], t=t[at : at + b], cond_e=cond[at : at + b], generator=gen
            )
            at += b

    def batch(self, step: int) -> StepBatch:
        if step not in self._ready:
            self._ready.clear()
            self._fill(step)
        return self._ready.pop(step)


class PooledProducer(ZtProducer):
    """``pooled``: whole frozen DDIM trajectories, every latent of each used once.

    One DDIM run from noise passes through z_t for *every* step index of the grid, so a refresh runs
    ``zt_pool_size`` trajectories (concepts balanced: successive random permutations of the erased
    concepts) for ``ddim_steps - 1`` steps in one batch and keeps all ``ddim_steps`` latents of each
    (index 0 = the noise). The pool's entries are shuffled across trajectories and concepts, and each
    step takes the next ``concepts_per_step``; an empty pool is refreshed. Each entry has exactly the
    distribution ``exact`` draws z_t from (concept uniform, step index uniform, z_t = DDIM of fresh
    noise); what changes is that entries of one trajectory are correlated (the same noise), which the
    shuffle spreads over ``zt_pool_size x ddim_steps`` steps. Cost: ``ddim_steps - 1`` CFG forwards per
    ``ddim_steps`` z_t, about one batched forward a step instead of ``~ddim_steps``. A refresh runs no
    more trajectories than the remaining steps can use (``ceil(remaining rows / ddim_steps)``). Rows of one step
    may share a concept (``exact`` draws distinct ones). Refresh draws come from
    ``step_generator(seed, step, 1, k)`` (k-th refresh within a step), the pool's remaining entries are
    checkpointed: resume is exact.

    With ``frozen_eps`` (a loss with ``uses_frozen_eps``, such as ESD's), the pool also keeps the two
    frozen predictions the trajectory's guidance computed at each latent, eps(z_k, "") and
    eps(z_k, c_e) (one more forward per trajectory, at its last latent), and hands them to the step
    in :attr:`StepBatch.frozen_eps`: ESD's targets then cost nothing, and a step is one trained forward
    and its backward plus ~one amortised frozen forward. They are the same function of the same inputs
    as the step's own frozen call (equal up to float rounding of the batch composition; tested).
    """

    name = "pooled"

    def __init__(
        self, ctx: FinetuneContext, config: FinetuneConfig, erase: Sequence[str], seed: int, *, frozen_eps: bool = False
    ) -> None:
        super().__init__(ctx, config, erase, seed)
        self.keep_eps = frozen_eps
        self.z = torch.empty(0)
        self.grid = torch.empty(0, dtype=torch.long)
        self.concept = torch.empty(0, dtype=torch.long)
        self.eps_u: torch.Tensor | None = None
        self.eps_c: torch.Tensor | None = None

    def _refresh(self, step: int, k: int) -> None:
        gen = step_generator(self.seed, step, 1, k)
        d, n, b = self.config.ddim_steps, len(self.erase), self.config.concepts_per_step
        # no more trajectories than the remaining steps can use (a short run does not pay for a full pool)
        size = min(self.config.zt_pool_size, -(-(self.config.steps - step) * b // d))
        idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-size // n))])[:size]
        noise = self.ctx.initial_noise(size, gen)
        cond = self.ctx.embed([self.erase[i] for i in idx.tolist()])
        try:
            out = self.ctx.ddim_latents(
                cond, noise, [d - 1] * size, guidance=self.config.start_guidance, keep_all=True, keep_eps=self.keep_eps
            )
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _out_of_memory(e):
                raise
            raise ValueError(
                f"zt_producer='pooled': a pool of `zt_pool_size`={size} trajectories ({2 * size} UNet rows per call, "
                f"{size * d} latents) does not fit in memory; lower `zt_pool_size`. ({e})"
            ) from e
        traj, eps_u, eps_c = out if self.keep_eps else (out, None, None)
        order = torch.randperm(size * d, generator=gen).to(traj.device)
        flat = lambda x: x.reshape(size * d, *x.shape[2:])[order]  # noqa: E731
        self.z = flat(traj)
        self.eps_u, self.eps_c = (flat(eps_u), flat(eps_c)) if self.keep_eps else (None, None)
        self.grid = torch.arange(d).repeat(size)[order.cpu()]
        self.concept = idx.repeat_interleave(d)[order.cpu()]

    def prepare(self, start: int) -> None:
        if len(self.grid) == 0:
            self._refresh(start, 0)

    def batch(self, step: int) -> StepBatch:
        b, parts, k = self.config.concepts_per_step, [], 0
        while b > 0:
            if len(self.grid) == 0:
                self._refresh(step, k)
                k += 1
            take = min(b, len(self.grid))
            eps = (self.eps_u[:take], self.eps_c[:take]) if self.keep_eps else (None, None)
            parts.append((self.z[:take], self.grid[:take], self.concept[:take], *eps))
            self.z, self.grid, self.concept = self.z[take:], self.grid[take:], self.concept[take:]
            if self.keep_eps:
                self.eps_u, self.eps_c = self.eps_u[take:], self.eps_c[take:]
            b -= take
        z_t, grid, concept = (torch.cat(x) for x in list(zip(*parts, strict=True))[:3])
        frozen = (torch.cat([p[3] for p in parts]), torch.cat([p[4] for p in parts])) if self.keep_eps else None
        concepts = [self.erase[i] for i in concept.tolist()]
        return StepBatch(
            step=step,
            concepts=concepts,
            z_t=z_t,
            t=self.ctx.timesteps_at(grid),
            cond_e=self.ctx.embed(concepts),
            generator=step_generator(self.seed, step),
            frozen_eps=frozen,
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if len(self.grid) == 0:
            return {}
        state = {"z": self.z.contiguous(), "grid": self.grid.contiguous(), "concept": self.concept.contiguous()}
        if self.keep_eps:
            state |= {"eps_u": self.eps_u.contiguous(), "eps_c": self.eps_c.contiguous()}
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:  # the pool was empty at the checkpoint
            self.z, self.grid, self.concept = torch.empty(0), torch.empty(0, dtype=torch.long), self.grid[:0]
            self.eps_u = self.eps_c = None
            return
        self.z = tensors["z"].to(self.ctx.device, self.ctx.dtype)
        self.grid, self.concept = tensors["grid"].long(), tensors["concept"].long()
        if self.keep_eps:
            if "eps_u" not in tensors:
                raise ValueError(
                    "zt_producer='pooled': the checkpoint's pool holds no frozen predictions, but this loss reads "
                    "them; resume with the method that wrote the run."
                )
            self.eps_u = tensors["eps_u"].to(self.ctx.device, self.ctx.dtype)
            self.eps_c = tensors["eps_c"].to(self.ctx.device, self.ctx.dtype)


PRODUCERS: dict[str, type[ZtProducer]] = {
    p.name: p for p in (ExactProducer, BatchedProducer, PooledProducer, TrainedProducer)
}


def make_producer(
    ctx: FinetuneContext, config: FinetuneConfig, erase: Sequence[str], seed: int, *, frozen_eps: bool = False
) -> ZtProducer:
    """The :class:`ZtProducer` named by ``config.zt_producer``; ``frozen_eps``: the loss reads
    :attr:`StepBatch.frozen_eps` when a producer has them (only ``pooled`` computes them on the way)."""
    if config.zt_producer not in PRODUCERS:
        raise ValueError(f"`zt_producer` must be one of {', '.join(PRODUCERS)}, got {config.zt_producer!r}.")
    if config.zt_producer == PooledProducer.name:
        return PooledProducer(ctx, config, erase, seed, frozen_eps=frozen_eps)
    return PRODUCERS[config.zt_producer](ctx, config, erase, seed)


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
    parameters, with the step log and the method's trace in ``edit.trace``. A ``run_dir``'s training
    lock (``.train.lock``) is held for the whole run: a second training into it is refused, naming the
    PID of the first (:class:`erasekit.runs.RunDirInUse`).
    """
    if not config.run_dir:
        return _finetune(pipe, request, config, loss_fn, method=method, generator=generator, progress=progress)
    run_dir, existed = Path(config.run_dir), Path(config.run_dir).exists()
    with locked(run_dir, TRAIN_LOCK):
        try:
            return _finetune(pipe, request, config, loss_fn, method=method, generator=generator, progress=progress)
        except BaseException:
            if not existed and [p.name for p in run_dir.iterdir()] == [TRAIN_LOCK]:  # refused before any write
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def _finetune(
    pipe, request: EraseRequest, config: FinetuneConfig, loss_fn: LossFunction, *, method: str, generator, progress
) -> FinetuneResult:
    seed = effective_seed(config, generator)
    base = dict(base_info(pipe))
    identity = {
        "method": method,
        "config": hashed_config(config),
        "request": asdict(request),
        "base_fingerprint": base.get("fingerprint"),
        "seed": seed,
    }
    # erasekit.families.memory: checkpointing, 8-bit Adam (the latter is part of the run's identity)
    memory = memory_options(pipe)
    if memory.identity():
        identity["memory"] = memory.identity()
    digest = config_hash(identity)
    run_dir = Path(config.run_dir) if config.run_dir else None
    train_dir = run_dir / TRAIN_DIR if run_dir is not None else None
    if train_dir is not None:
        _check_train_dir(train_dir, identity, digest, config.resume)

    lora_rank = getattr(config, "lora_rank", None)  # ESD/AP/AGE declare it (erasekit.lora_train)
    ctx = FinetuneContext(pipe, config.train_method, ddim_steps=config.ddim_steps, lora_rank=lora_rank, seed=seed)
    if memory.gradient_checkpointing:
        ctx.unet.enable_gradient_checkpointing()
    if loss_fn.train_unet and MasterWeights.needed(ctx.params):
        ctx.masters = MasterWeights(ctx.params)
    loss_fn.setup(ctx)
    trained_unet = ctx.masters.masters if ctx.masters is not None else ctx.params
    groups = [{"params": list(trained_unet.values()), "lr": config.lr}] if loss_fn.train_unet else []
    if not loss_fn.train_unet:
        for p in ctx.params.values():
            p.requires_grad_(False)
    groups += loss_fn.param_groups()
    if not groups:
        raise ValueError(f"{type(loss_fn).__name__} trains nothing: it keeps the UNet fixed and has no param_groups().")
    opt = make_optimizer(groups, memory)
    producer = make_producer(ctx, config, request.erase, seed, frozen_eps=loss_fn.uses_frozen_eps)
    log: list[dict[str, Any]] = []
    start = 0
    if run_dir is not None and config.resume:
        start, log = _load_latest_checkpoint(run_dir, ctx, opt, loss_fn, producer)
    t0 = time.time()  # the producer's first batch is part of the run's time
    end = config.steps if config.stop_at is None else config.stop_at  # stop_at: same run, cut short (resumable)
    if start > end:
        raise ValueError(f"`run_dir`'s latest checkpoint is at step {start}, past stop_at={end}; raise stop_at.")
    if start < end:
        producer.prepare(start)  # e.g. the first pool: a batch too large for memory fails before anything is written
    if train_dir is not None:
        if not RunDir.is_run(run_dir):  # called from the API: the run directory is made here
            RunDir.create(run_dir, {"method": method, **identity})
        ResumableDir(train_dir, identity, meta=TRAIN_JSON, what="fine-tuning run").update_meta(
            config_hash=digest, base=base, config_all=asdict(config)
        )
        _write_log(run_dir, log)

    # 1. The loop: the producer's concepts and z_t, the method's loss, one optimizer step.
    running: dict[str, float] = {}
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc=method, disable=not progress)
    log_file = open(train_dir / LOG_JSONL, "a", encoding="utf-8") if train_dir is not None else None  # noqa: SIM115
    try:
        for step in bar:
            batch = producer.batch(step)
            out = loss_fn.step(ctx, batch)
            trained = [p for group in opt.param_groups for p in group["params"]]
            in_graph = [ctx.masters.graph_tensor(p) for p in trained] if ctx.masters is not None else trained
            for p, grad in zip(trained, torch.autograd.grad(out.loss, in_graph, allow_unused=True), strict=True):
                p.grad = grad if grad is None else grad.to(p.dtype)  # a half-precision gradient onto its fp32 master
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ctx.masters is not None:
                ctx.masters.sync_()
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
            if run_dir is not None and (done == end or config.checkpoint_every and done % config.checkpoint_every == 0):
                _save_checkpoint(run_dir, done, ctx, opt, loss_fn, producer, log, config.keep_checkpoints)
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
        "zt_producer": producer.name,
        "memory": describe(memory, ctx.masters),
        "config_hash": digest,
        "steps_this_call": max(0, end - start),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, end - start), 5),
        "log": log,
        **loss_fn.trace(),
    }
    if run_dir is not None:
        trace["run_dir"] = str(run_dir)
        trace["log_path"] = str(train_dir / LOG_JSONL)
    aux: dict[str, torch.Tensor] = {}
    if lora_rank is not None:
        trace["lora"] = {"rank": lora_rank, "modules": len(ctx.lora_modules)}
        aux = lora_train.factor_tensors(ctx.unet, ctx.lora_modules)
    edit = Edit(
        tensors=ctx.current_tensors(),
        method=method,
        config=asdict(config),
        request=request,
        base=base,
        trace=trace,
        aux=aux,
    )
    if run_dir is not None:
        RunDir.open(run_dir).save_edit(edit)
    return FinetuneResult(
        edit=edit, extra={k: v.detach().clone() for k, v in loss_fn.extra_tensors().items()}, run_dir=run_dir
    )


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ checkpoints
def _check_train_dir(train_dir: Path, identity: dict[str, Any], digest: str, resume: bool) -> None:
    """Refuse a ``train/`` folder that holds a different run, or any run when not resuming (writes nothing)."""
    if not (train_dir / TRAIN_JSON).exists():
        # a kill before the first write completed leaves only a lock or an atomic write's temporary file: not a run
        if train_dir.exists() and any(
            not (p.name.endswith(".lock") or (p.name.startswith(".") and p.name.endswith(".tmp")))
            for p in train_dir.iterdir()
        ):
            raise ValueError(
                f"`run_dir` {str(train_dir.parent)!r} has a non-empty {TRAIN_DIR}/ that holds no run ({TRAIN_JSON} "
                "missing); choose a new directory."
            )
        return
    meta = ResumableDir.read_meta(train_dir, TRAIN_JSON) or {}
    if not resume:
        raise ValueError(
            f"`run_dir` {str(train_dir.parent)!r} already holds a run (config hash {meta.get('config_hash')}). "
            "Pass resume=True to continue it, or choose another run_dir; nothing was overwritten."
        )
    try:
        ResumableDir.check(train_dir, identity, meta=TRAIN_JSON, what="fine-tuning run")
    except RunDirMismatch as e:
        run_dir, diff = train_dir.parent, e.differences
        old_p = ((meta.get("identity") or {}).get("config") or {}).get("zt_producer")
        new_p = identity["config"].get("zt_producer")
        if old_p != new_p:
            raise ValueError(
                f"Cannot resume {str(run_dir)!r} with zt_producer={new_p!r}: it was started with "
                f"zt_producer={old_p!r}, and its checkpoints hold that producer's state (e.g. the pooled latents), "
                f"so it continues only with the producer it started with (config hash {meta.get('config_hash')} != "
                f"{digest}; differing: {diff}). Resume with zt_producer={old_p!r}, or start a new run_dir; "
                "nothing was overwritten."
            ) from None
        raise ValueError(
            f"Cannot resume {str(run_dir)!r}: it was started with a different configuration "
            f"(hash {meta.get('config_hash')} != {digest}; differing: {diff}). Use the original settings or a new "
            "run_dir; nothing was overwritten."
        ) from None


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
    producer: ZtProducer,
    log: list,
    keep: int,
) -> None:
    """Write ``checkpoints/step-XXXXXXXX`` atomically (a temporary folder renamed into place)."""
    root = run_dir / TRAIN_DIR / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = ctx.masters.masters if ctx.masters is not None else ctx.params  # fp32 masters when training half weights
    save_safetensors_atomic({n: p.detach() for n, p in weights.items()}, tmp / "trainable.safetensors")
    save_safetensors_atomic(_optimizer_tensors(opt), tmp / "optimizer.safetensors")
    save_safetensors_atomic(loss_fn.state_tensors(), tmp / "method.safetensors")
    save_safetensors_atomic(producer.state_tensors(), tmp / PRODUCER_FILE)
    write_json_atomic(tmp / "state.json", {"step": step, "zt_producer": producer.name, "log": log})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None``."""
    root = Path(run_dir) / TRAIN_DIR / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


@torch.no_grad()
def _load_latest_checkpoint(
    run_dir: Path, ctx: FinetuneContext, opt: torch.optim.Optimizer, loss_fn: LossFunction, producer: ZtProducer
) -> tuple[int, list[dict[str, Any]]]:
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return 0, []
    weights = load_file(ck / "trainable.safetensors")
    if set(weights) != set(ctx.params):
        raise ValueError(f"Checkpoint {str(ck)!r} holds different parameters than this run trains; use a new run_dir.")
    for n, p in ctx.params.items():
        p.copy_(weights[n].to(p.device, p.dtype))
    if ctx.masters is not None:
        ctx.masters.load_(weights)
    loss_fn.load_state_tensors(load_file(ck / "method.safetensors"))
    _load_optimizer_tensors(opt, load_file(ck / "optimizer.safetensors"))
    state = json.loads((ck / "state.json").read_text())
    saved = state.get("zt_producer", producer.name)  # older checkpoints: the config hash already matched
    if saved != producer.name:
        raise ValueError(
            f"Checkpoint {str(ck)!r} was written with zt_producer={saved!r}, not {producer.name!r}: resume with "
            f"zt_producer={saved!r} or start a new run_dir."
        )
    if (ck / PRODUCER_FILE).exists():
        producer.load_state_tensors(load_file(ck / PRODUCER_FILE))
    return int(state["step"]), list(state["log"])


def _write_log(run_dir: Path, log: list[dict[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` with the records up to the checkpoint (later ones are recomputed)."""
    write_text_atomic(run_dir / TRAIN_DIR / LOG_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of a run's ``log.jsonl``."""
    path = Path(run_dir) / TRAIN_DIR / LOG_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
