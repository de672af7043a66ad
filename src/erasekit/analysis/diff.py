"""Model-difference inspection (Bui, talk slides, eq. 19): which concepts did a fine-tune change most?

Given the original model ``theta`` and a fine-tuned ``theta'``, search an inspection space of
concepts ``C`` for::

    max_{c_t in C}  || eps_theta'(c_e) - eps_theta(c_t) ||_2^2  +  lambda || eps_theta'(c_t) - eps_theta(c_t) ||_2^2      (19)
                    `------------- L_1 -------------'             `--------------- L_2 ---------------'

``L_2`` is large for concepts whose output the fine-tune changed; ``L_1`` is large for concepts whose
original output is far from what the fine-tuned model now produces for the changed concept ``c_e``,
which keeps ``c_e`` itself and its synonyms out of the top ("the most sensitive concepts, but not
the ones that are changed"). ``lambda`` trades the two: a large ``lambda`` ranks by change alone and
favours concepts similar to ``c_e``; a small one favours concepts far from it. Without a known
``c_e`` only ``L_2`` is defined and the ranking is by change.

Both terms are averaged over ``n_samples`` pairs ``(z_t, t)`` drawn as ESD and AP draw them
(:mod:`erasekit.finetune`): DDIM from the seed's noise for a uniform number of steps with guidance
``guidance_scale`` on ``c_e`` (or on each ``c_t``, ``latents="concept"``) by the original model.
Squared norms are taken as means over latent elements (the authors' MSE losses), so ``lambda`` is
independent of resolution. ``L_1`` and ``L_2`` are stored per concept, so a ``lambda`` sweep
(:meth:`DiffResult.rerank`) costs no model calls.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch.func import functional_call
from tqdm.auto import tqdm

from erasekit.analysis import plots, report_sections
from erasekit.analysis.spectrum import as_concept_list, edit_applied, edit_digest, json_safe
from erasekit.edit import Edit
from erasekit.eval.generate import generate_images, sampling_defaults
from erasekit.io import atomic_path, write_json_atomic, write_text_atomic


@dataclass
class DiffConfig:
    """Settings of the eq. 19 search."""

    lam: float = field(default=1.0, metadata={"help": "lambda of eq. 19: weight of L2 (change of c_t) against L1."})
    changed: str | None = field(
        default=None,
        metadata={"help": "c_e, the concept the fine-tune changed (default: the edit's first erased concept)."},
    )
    n_samples: int = field(default=4, metadata={"help": "(z_t, t) samples the losses are averaged over."})
    first_seed: int = field(default=0, metadata={"help": "Sample j starts from seed first_seed + j."})
    ddim_steps: int | None = field(
        default=None, metadata={"help": "DDIM steps for sampling z_t (None: the pipeline's default)."}
    )
    guidance_scale: float = field(
        default=3.0, metadata={"help": "CFG scale while sampling z_t (ESD's start guidance)."}
    )
    latents: Literal["changed", "concept"] = field(
        default="changed", metadata={"help": "Sample z_t on c_e, shared by all concepts (as AP), or on each c_t."}
    )
    prompt_template: str = field(default="{}", metadata={"help": "Prompt of a concept; '{}' is the concept."})
    batch_size: int = field(default=16, metadata={"help": "Concepts per UNet batch."})

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {self.lam}.")
        if self.n_samples < 1:
            raise ValueError(f"`n_samples` must be >= 1, got {self.n_samples}.")
        if self.ddim_steps is not None and self.ddim_steps < 1:
            raise ValueError(f"`ddim_steps` must be >= 1, got {self.ddim_steps}.")
        if self.latents not in ("changed", "concept"):
            raise ValueError(f"`latents` must be 'changed' or 'concept', got {self.latents!r}.")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(f"`prompt_template` must contain '{{}}' exactly once, got {self.prompt_template!r}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}.")


@dataclass
class DiffEntry:
    """One inspected concept: eq. 19's objective and its two terms (means over the samples)."""

    concept: str
    objective: float
    l1: float | None
    l2: float
    is_changed: bool = False


@dataclass
class DiffResult:
    """Inspection space ranked by eq. 19's objective, highest first."""

    entries: list[DiffEntry]
    config: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10, *, include_changed: bool = False) -> list[DiffEntry]:
        """The ``n`` highest-ranked concepts (``c_e`` itself left out unless ``include_changed``)."""
        return [e for e in self.entries if include_changed or not e.is_changed][:n]

    def rerank(self, lam: float) -> DiffResult:
        """The same search with another ``lambda`` (no model calls: the terms are stored)."""
        if lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {lam}.")
        entries = [
            DiffEntry(
                e.concept, (e.l1 or 0.0) + lam * e.l2 if e.l1 is not None else lam * e.l2, e.l1, e.l2, e.is_changed
            )
            for e in self.entries
        ]
        entries.sort(key=lambda e: -e.objective)
        cfg = copy.deepcopy(self.config)
        cfg.setdefault("diff", {})["lam"] = lam
        return DiffResult(entries, cfg)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"entries": [asdict(e) for e in self.entries], "config": self.config}

    def save(self, path: str | Path) -> Path:
        """Write the ranking and config as sorted JSON, atomically."""
        write_json_atomic(path, json_safe(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DiffResult:
        """Read a result written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls([DiffEntry(**e) for e in d["entries"]], d.get("config", {}))


# ------------------------------------------------------------------------------------ models
class _Model:
    """eps and text embeddings of a pipeline, optionally with an edit's tensors swapped in by
    :func:`torch.func.functional_call` (the pipeline itself is never written)."""

    def __init__(self, pipe, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.pipe = pipe
        p = next(pipe.unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        tensors = tensors or {}
        bad = sorted({n.split(".", 1)[0] for n in tensors} - {"unet", "text_encoder"})
        if bad:
            raise ValueError(
                f"Cannot inspect an edit of component(s) {bad}; only unet and text_encoder edits are supported."
            )

        def part(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
            ref = dict(module.named_parameters())
            n = len(prefix) + 1
            return {
                k[n:]: v.to(ref[k[n:]].device, ref[k[n:]].dtype)
                for k, v in tensors.items()
                if k.startswith(prefix + ".")
            }

        self.unet_tensors = part("unet", pipe.unet)
        self.text_tensors = part("text_encoder", pipe.text_encoder)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def eps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps(z_t, c, t)."""
        if self.unet_tensors:
            return functional_call(self.pipe.unet, self.unet_tensors, (z, t), {"encoder_hidden_states": cond}).sample
        return self.pipe.unet(z, t, encoder_hidden_states=cond).sample

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder last hidden states (B, 77, D), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            tok = self.pipe.tokenizer(
                missing,
                padding="max_length",
                max_length=self.pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = tok.input_ids.to(self.pipe.text_encoder.device)
            if self.text_tensors:
                out = functional_call(self.pipe.text_encoder, self.text_tensors, (ids,))[0]
            else:
                out = self.pipe.text_encoder(ids)[0]
            self._cache.update(zip(missing, out.to(self.device, self.dtype), strict=True))
        return torch.stack([self._cache[p] for p in prompts])


def _resolve(original, edited) -> tuple[_Model, _Model, Any]:
    """(theta, theta', edit or None) from a pipeline and either a second pipeline or an Edit."""
    if isinstance(edited, Edit):
        edited.check_base(original)
        return _Model(original), _Model(original, edited.tensors), edited
    if hasattr(edited, "unet") and hasattr(edited, "text_encoder"):
        return _Model(original), _Model(edited), None
    raise ValueError(f"`edited` must be an erasekit Edit or a Stable Diffusion pipeline, got {type(edited).__name__}.")


@torch.no_grad()
def sample_latents(
    model: _Model, cond: torch.Tensor, seed: int, n_steps: int, total_steps: int, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD's ``quick_sample_till_t``: ``n_steps`` DDIM steps (eta 0) of ``total_steps`` from the noise of
    ``seed`` with CFG on ``cond`` (B, 77, D). Returns ``(z_t, t)`` with ``t = timesteps[n_steps]`` (B,)."""
    pipe = model.pipe
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(total_steps, device=model.device)
    b = cond.shape[0]
    cfg = pipe.unet.config
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(model.device, model.dtype)
    z = z.expand(b, -1, -1, -1) * sched.init_noise_sigma
    both = torch.cat([model.embed([""]).expand(b, -1, -1), cond])
    for k in range(n_steps):
        t = sched.timesteps[k]
        e_u, e_c = model.eps(torch.cat([z, z]), t.expand(2 * b), both).chunk(2)
        z = sched.step(e_u + guidance_scale * (e_c - e_u), t, z).prev_sample
    return z, sched.timesteps[n_steps].expand(b).to(model.device)


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared difference, float64 (B,)."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def inspect_difference(
    original,
    edited,
    space: Sequence[str],
    config: DiffConfig | None = None,
    *,
    progress: bool = True,
) -> DiffResult:
    """Rank the inspection ``space`` by eq. 19 of the slides (model-difference inspection).

    ``original`` is a pipeline (theta); ``edited`` is an :class:`~erasekit.edit.Edit` of it (its
    tensors are swapped in functionally: no second model in memory) or a second pipeline (theta').
    ``config.changed`` is ``c_e``; with an Edit it defaults to the edit's first erased concept.
    """
    config = config or DiffConfig()
    space = as_concept_list(space)
    theta, theta_p, edit = _resolve(original, edited)
    changed = config.changed if config.changed is not None else (edit.request.erase[0] if edit is not None else None)
    if changed is None and config.lam == 0:
        raise ValueError("With no `changed` concept only L2 is defined, so `lam` must be > 0 (or pass `changed`).")
    total = config.ddim_steps or int(sampling_defaults(original)["steps"])
    rng = np.random.default_rng(config.first_seed)
    seeds = [config.first_seed + j for j in range(config.n_samples)]
    n_steps = [int(rng.integers(total)) for _ in seeds]  # uniform DDIM step index in [0, total)
    prompt = config.prompt_template.format
    c_e_prompt = prompt(changed).strip() if changed is not None else ""

    l1 = np.zeros((len(space), config.n_samples))
    l2 = np.zeros((len(space), config.n_samples))
    timesteps: list[int] = []
    bar = tqdm(total=len(space) * config.n_samples, desc="eq. 19", unit="concept", disable=not progress)
    for j, (seed, n) in enumerate(zip(seeds, n_steps, strict=True)):
        shared, e_ce_shared = None, None
        if config.latents == "changed":
            shared = sample_latents(theta, theta.embed([c_e_prompt]), seed, n, total, config.guidance_scale)
            timesteps.append(int(shared[1][0]))
            if changed is not None:
                e_ce_shared = theta_p.eps(shared[0], shared[1], theta_p.embed([c_e_prompt]))  # eps_theta'(z_t, c_e)
        for s in range(0, len(space), config.batch_size):
            batch = [prompt(c).strip() for c in space[s : s + config.batch_size]]
            b = len(batch)
            cond = theta.embed(batch)  # (B, 77, D) of theta
            if shared is not None:
                z, t = shared[0].expand(b, -1, -1, -1), shared[1][:1].expand(b)
            else:
                z, t = sample_latents(theta, cond, seed, n, total, config.guidance_scale)
                if s == 0:
                    timesteps.append(int(t[0]))
            e_orig = theta.eps(z, t, cond)  # eps_theta(z_t, c_t)
            e_edit = theta_p.eps(z, t, theta_p.embed(batch))  # eps_theta'(z_t, c_t)
            l2[s : s + b, j] = _sq(e_edit, e_orig).cpu().numpy()
            if changed is not None:
                if e_ce_shared is not None:
                    e_ce = e_ce_shared.expand(b, -1, -1, -1)
                else:
                    e_ce = theta_p.eps(z, t, theta_p.embed([c_e_prompt] * b))  # eps_theta'(z_t, c_e)
                l1[s : s + b, j] = _sq(e_ce, e_orig).cpu().numpy()
            bar.update(b)
    bar.close()

    m1, m2 = l1.mean(1), l2.mean(1)
    entries = []
    for i, c in enumerate(space):
        obj = (m1[i] + config.lam * m2[i]) if changed is not None else config.lam * m2[i]
        entries.append(
            DiffEntry(c, float(obj), float(m1[i]) if changed is not None else None, float(m2[i]), c == changed)
        )
    entries.sort(key=lambda e: -e.objective)
    cfg: dict[str, Any] = {
        "diff": {**asdict(config), "changed": changed},
        "samples": [{"seed": s, "ddim_step": n, "t": t} for s, n, t in zip(seeds, n_steps, timesteps, strict=True)],
        "ddim_steps": total,
    }
    if edit is not None:
        cfg["edit"] = {
            "method": edit.method,
            "request": asdict(edit.request),
            "base": edit.base,
            "digest": edit_digest(edit),
        }
    return DiffResult(entries, cfg)


# ------------------------------------------------------------------------------------ images
def edited_copy(pipe, edit):
    """A second pipeline with ``edit`` applied; components the edit does not touch are shared, not copied."""
    comps = dict(pipe.components)
    for name in sorted({n.split(".", 1)[0] for n in edit.tensors}):
        if name not in comps or not isinstance(comps[name], torch.nn.Module):
            raise ValueError(f"The edit changes {name!r}, which is not a model component of this pipeline.")
        comps[name] = copy.deepcopy(comps[name])
    params = inspect.signature(type(pipe).__init__).parameters
    comps = {k: v for k, v in comps.items() if k in params}
    if "requires_safety_checker" in params:
        comps["requires_safety_checker"] = (
            bool(pipe.config.get("requires_safety_checker", False)) and comps.get("safety_checker") is not None
        )
    edit.check_base(pipe)
    new = type(pipe)(**comps)
    new.set_progress_bar_config(disable=True)
    for attr in ("_erasekit_base",):  # the copy starts as the same base model, so the edit's check passes
        if hasattr(pipe, attr):
            setattr(new, attr, dict(getattr(pipe, attr)))
    return edit.apply_(new)


def diff_images(
    original,
    edited,
    concepts: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2, 3),
    sampling=None,
    *,
    prompt_template: str = "{}",
) -> dict[str, dict[str, np.ndarray]]:
    """Images of ``concepts`` from both models on the same seeds: ``{concept: {"original", "edited"}}``,
    each uint8 (len(seeds), H, W, 3). ``edited`` is a pipeline or an Edit of ``original`` (applied
    temporarily)."""
    concepts = as_concept_list(concepts)
    seeds = list(seeds)
    prompts = [prompt_template.format(c).strip() for c in concepts for _ in seeds]
    all_seeds = seeds * len(concepts)
    before = generate_images(original, prompts, all_seeds, sampling)
    if isinstance(edited, Edit):
        with edit_applied(original, edited):
            after = generate_images(original, prompts, all_seeds, sampling)
    else:
        after = generate_images(edited, prompts, all_seeds, sampling)
    k = len(seeds)
    return {
        c: {"original": before[i * k : (i + 1) * k], "edited": after[i * k : (i + 1) * k]}
        for i, c in enumerate(concepts)
    }


def run_diff(
    original,
    edited,
    space: Sequence[str],
    config: DiffConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    top: int = 10,
    image_seeds: Sequence[int] = (0, 1, 2, 3),
    sampling=None,
    progress: bool = True,
) -> DiffResult:
    """Eq. 19 search plus images of the top concepts; what ``erasekit analyze diff`` runs.

    With ``out_dir``, writes ``diff.json``, ``diff.png`` (the ranking) and ``diff.html`` (the report
    fragment, with images of the ``top`` concepts from both models on ``image_seeds``; none if empty).
    """
    result = inspect_difference(original, edited, space, config, progress=progress)
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        result.save(d / "diff.json")
        with atomic_path(d / "diff.png") as tmp:
            tmp.write_bytes(plots.diff_bar_chart(result, top=top))
        images = None
        if image_seeds:
            names = [e.concept for e in result.top(top, include_changed=True)]
            prompt = (config or DiffConfig()).prompt_template
            images = diff_images(original, edited, names, image_seeds, sampling, prompt_template=prompt)
        write_text_atomic(d / "diff.html", report_sections.diff_section(result, top=top, images=images))
    return result


__all__ = [
    "DiffConfig",
    "DiffEntry",
    "DiffResult",
    "diff_images",
    "edited_copy",
    "inspect_difference",
    "sample_latents",
]
