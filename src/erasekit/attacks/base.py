"""The common interface of red-teaming attacks, and the resumable driver that runs one.

An attack tries to bring an erased concept back. It sees the edited pipeline, the original one,
the erased concept and a set of prompts, and returns for every prompt an adversarial prompt, token
ids or a prompt embedding (:class:`AttackOutput`); the driver :func:`run_attack` then generates
the edited model's images from it. A white-box attack may read both models' weights; a black-box
one (Ring-A-Bell, paraphrases) uses only what a user of the edited model has: its text interface,
plus its own copy of the original text encoder.

Every attack is a class registered with :func:`register_attack` into :data:`ATTACKS` (a
:class:`erasekit.registry.Registry` whose discovery list :data:`ATTACK_MODULES` names the attack
modules); it gets its config dataclass, ``prepare(ctx)`` once (shared state: a concept direction, a vocabulary, a closed-form map) and
``attack(ctx, prompt, index, generator)`` per prompt. All randomness of prompt ``i`` comes from a
generator seeded by ``(seed, i)`` alone, so a run resumed after a crash gives exactly what an
uninterrupted run gives.

An attack folder (``out_dir/<attack>/``, a :class:`erasekit.rundir.ResumableDir`; in a run directory
``RunDir.attack_dir(name)``) holds ``attack.json`` (its identity: attack, concept, config, seeds,
sampler and both models' weight fingerprints; resuming with anything different is an error naming
what differs; and the one-off ``prepare_cost``),
``records.jsonl`` (one line per prompt: adversarial prompt/ids, image paths, cost), ``images/``
and ``embeds/`` (safetensors). Prompts already recorded are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from erasekit.eval.generate import SamplingConfig, generate_images, initial_latents
from erasekit.families import check_attack, family_of
from erasekit.io import save_safetensors_atomic
from erasekit.options import build_config
from erasekit.pipeline import encode_prompts, fingerprint
from erasekit.registry import Registry, origin_of
from erasekit.rundir import ResumableDir

RECORDS = "records.jsonl"
IDENTITY = "attack.json"
_MISSING = object()  # CallCounter: the VAE instance held no attribute of that name


# ---------------------------------------------------------------------------------------------
# Outputs, context, registry


@dataclass
class AttackOutput:
    """What an attack returns for one prompt: exactly one of an adversarial ``prompt`` (text a user
    types), ``token_ids`` (a (77,) id sequence fed to the edited text encoder) or ``prompt_embeds``
    ((1, 77, D), fed to the UNet directly); ``prompt`` may accompany ``token_ids`` as their decoding."""

    prompt: str | None = None
    token_ids: list[int] | None = None
    prompt_embeds: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt is None and self.token_ids is None and self.prompt_embeds is None:
            raise ValueError("An AttackOutput needs a `prompt`, `token_ids` or `prompt_embeds`.")
        if self.prompt_embeds is not None and self.prompt_embeds.dim() != 3:
            raise ValueError(f"`prompt_embeds` must be (1, 77, D), got shape {tuple(self.prompt_embeds.shape)}.")


@dataclass
class AttackContext:
    """Everything an attack may use: both pipelines, the concept, the prompt set and sampler."""

    edited: Any
    original: Any
    concept: str
    prompts: list[str]
    sampling: SamplingConfig
    seed: int = 0
    progress: bool = False


class Attack(ABC):
    """Base class: subclasses set ``white_box`` and implement :meth:`attack` (and maybe :meth:`prepare`)."""

    name: str = ""
    white_box: bool = True

    def __init__(self, config: Any) -> None:
        self.config = config

    def prepare(self, ctx: AttackContext) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Shared state computed once per run (before the first prompt); nothing by default."""

    @abstractmethod
    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The adversarial output for ``prompt`` (the ``index``-th of the prompt set)."""

    def generate(
        self, ctx: AttackContext, output: AttackOutput, seeds: list[int], sampling: SamplingConfig
    ) -> np.ndarray:
        """The edited model's images (uint8 (n, H, W, 3), one per seed) for ``output``: plain sampling
        from its prompt, ids or embeddings. Probes that steer the sampler itself (start from a noised
        real image, inpaint, hand over from the original model) override this."""
        return _images_for(output, ctx.edited, seeds, sampling)


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: name, class, config class, whether it needs the weights, a summary."""

    name: str
    cls: type[Attack]
    config_class: type
    white_box: bool
    summary: str


# The modules that register built-in attacks besides this one ("none"), the discovery list; add a new
# attack module here. By name: they import this module.
ATTACK_MODULES = tuple(
    f"erasekit.attacks.{m}" for m in ("inversion", "paraphrase", "probes", "ringabell", "unlearndiff")
)
ATTACKS: Registry[AttackSpec] = Registry(
    "attack", ATTACK_MODULES, unknown="Unknown attack {name!r}; available attacks: {valid}."
)


def register_attack(name: str, config_class: type, summary: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator registering an :class:`Attack` subclass under ``name`` (in :data:`ATTACKS`)."""

    def deco(cls: type[Attack]) -> type[Attack]:
        ATTACKS.register(name, AttackSpec(name, cls, config_class, cls.white_box, summary), origin=origin_of(cls))
        cls.name = name
        return cls

    return deco


def available_attacks() -> dict[str, AttackSpec]:
    """All registered attacks, by name."""
    return ATTACKS.as_dict()


def get_attack(name: str) -> AttackSpec:
    """Look an attack up by name; an unknown name is a ``ValueError`` listing the valid ones."""
    return ATTACKS.get(name)


def make_attack_config(name: str, **overrides: Any) -> Any:
    """The attack's config dataclass with ``overrides``, built as a method's is
    (:func:`erasekit.options.build_config`): unknown keys are an error listing valid ones."""
    return build_config(get_attack(name).config_class, overrides, owner=f"attack {name!r}")


# ---------------------------------------------------------------------------------------------
# Cost accounting


class CallCounter:
    """Counts the model calls of pipelines of any family while a ``with`` block runs.

    ``with CallCounter(edited, original) as c: ...`` then ``c.counts()`` ->

    - ``unet_calls`` / ``unet_items``: forward calls of each pipeline's *denoiser* (its family's
      :meth:`~erasekit.families.base.FamilyAdapter.denoiser`: ``pipe.unet`` for SD 1.x/2.x and SDXL,
      ``pipe.transformer`` for SD3; the key keeps its historical name) and the batch rows they saw;
    - ``text_encoder_calls``: forward calls of every text encoder present, summed (``text_encoder``,
      SDXL's ``text_encoder_2``, SD3's ``text_encoder_2`` and ``text_encoder_3`` when not None);
    - ``vae_calls``: calls of the VAE's ``encode`` and ``decode`` (what pipelines and probes call; the
      module's ``forward`` is not hooked, as it only calls these two).

    :meth:`by_component` splits the same calls by component (``text_encoder``, ``text_encoder_2``,
    ``vae.encode``, ...). A module shared by two pipelines is counted once. The denoisers and text
    encoders are counted by forward pre-hooks; the VAE's bound ``encode`` / ``decode`` are wrapped by
    counting functions set on the instance for the duration of the block, and afterwards the instance
    is exactly as before (the wrappers removed, or whatever the instance held put back), even on error.
    """

    DENOISERS = ("unet", "transformer")
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
    VAE_METHODS = ("encode", "decode")

    def __init__(self, *pipes: Any) -> None:
        # id -> (component name, kind, module); kind is "unet" (the denoiser), "text_encoder" or "vae"
        self._modules: dict[int, tuple[str, str, torch.nn.Module]] = {}
        for p in pipes:
            denoisers, encoders = self.DENOISERS, self.TEXT_ENCODERS
            try:
                adapter = family_of(p)
                denoisers, encoders = (adapter.denoiser_name,), adapter.text_encoder_names
            except ValueError:  # not a pipeline of a known family: count whatever components it has
                pass
            named = [(n, "unet") for n in denoisers] + [(n, "text_encoder") for n in encoders] + [("vae", "vae")]
            for name, kind in named:
                m = getattr(p, name, None)
                if isinstance(m, torch.nn.Module) and id(m) not in self._modules:
                    self._modules[id(m)] = (name, kind, m)
        self._handles: list[Any] = []
        self._wrapped: list[tuple[torch.nn.Module, str, Any]] = []  # (vae, method name, what its __dict__ held)
        self.calls = {"unet": 0, "text_encoder": 0, "vae": 0}
        self.items = 0
        self._by_component: dict[str, int] = {}

    def _count(self, kind: str, component: str) -> None:
        self.calls[kind] += 1
        self._by_component[component] = self._by_component.get(component, 0) + 1

    def _hook(self, kind: str, component: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._count(kind, component)
            if kind == "unet":
                x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                self.items += int(x.shape[0]) if isinstance(x, torch.Tensor) else 1

        return hook

    def _wrap(self, vae: torch.nn.Module, method: str, component: str) -> None:
        inner = getattr(vae, method)
        held = vae.__dict__.get(method, _MISSING)

        @functools.wraps(inner)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count("vae", component)
            return inner(*args, **kwargs)

        self._wrapped.append((vae, method, held))
        vae.__dict__[method] = counted

    def __enter__(self) -> CallCounter:
        try:
            for name, kind, m in self._modules.values():
                if kind == "vae":
                    for method in self.VAE_METHODS:
                        if callable(getattr(m, method, None)):
                            self._wrap(m, method, f"{name}.{method}")
                else:
                    self._handles.append(m.register_forward_pre_hook(self._hook(kind, name), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for vae, method, held in reversed(self._wrapped):
            if held is _MISSING:
                vae.__dict__.pop(method, None)
            else:
                vae.__dict__[method] = held
        self._wrapped.clear()

    def counts(self) -> dict[str, int]:
        """Calls so far (the keys above; every attack's cost record and the probes read them)."""
        return {
            "unet_calls": self.calls["unet"],
            "unet_items": self.items,
            "text_encoder_calls": self.calls["text_encoder"],
            "vae_calls": self.calls["vae"],
        }

    def by_component(self) -> dict[str, int]:
        """Calls so far by component: the pipeline attribute (``unet``, ``transformer``, ``text_encoder``,
        ``text_encoder_2``, ``text_encoder_3``) or ``vae.encode`` / ``vae.decode``; components never called
        are 0. A module shared by two pipelines under two names is listed under the first pipeline's."""
        out = {name: 0 for name, kind, _ in self._modules.values() if kind != "vae"}
        out.update({f"{n}.{m}": 0 for n, kind, _ in self._modules.values() if kind == "vae" for m in self.VAE_METHODS})
        return {**out, **self._by_component}


def _add_costs(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


# ---------------------------------------------------------------------------------------------
# Helpers shared by the attacks


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The generator of prompt ``index``: seeded by (seed, index) only, so resuming is exact."""
    h = hashlib.sha256(f"erasekit-attack:{int(seed)}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator drawn from a torch one (for discrete searches)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def image_seeds(index: int, n_images: int, seed: int = 0) -> list[int]:
    """Image seeds of prompt ``index``: the same for every attack and for the plain prompts."""
    return [int(seed) * 1_000_003 + index * n_images + j for j in range(n_images)]


def tokenize(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length: (B, 77)."""
    tok = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tok.input_ids


def encode_ids(
    text_encoder: torch.nn.Module, ids: torch.Tensor, override: torch.Tensor | None = None, start: int = 1
) -> torch.Tensor:
    """Text-encoder hidden states (B, 77, D) for token ``ids`` (B, 77), with the input token
    embeddings at positions ``start .. start + k`` replaced by ``override`` (B or 1, k, D_tok).

    The replacement goes through a forward hook on the token-embedding table, so gradients reach
    ``override`` (soft/straight-through token optimisation) with any CLIP text model.
    """
    handle = None
    if override is not None:
        emb = text_encoder.get_input_embeddings()
        k = override.shape[1]

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            ov = override.to(dtype=out.dtype, device=out.device).expand(out.shape[0], -1, -1)
            return torch.cat([out[:, :start], ov, out[:, start + k :]], dim=1)

        handle = emb.register_forward_hook(hook)
    try:
        return text_encoder(ids.to(text_encoder.device))[0]
    finally:
        if handle is not None:
            handle.remove()


def token_vocabulary(
    tokenizer: Any, mode: Literal["words", "all"] = "words", exclude: Sequence[str] = ()
) -> torch.Tensor:
    """Token ids an attack may use, sorted: ``"all"`` = every non-special token, ``"words"`` = whole
    alphabetic words (BPE tokens ending in ``</w>``); minus every token containing a word of ``exclude``
    (e.g. the erased concept, so an attack cannot simply name it)."""
    if mode not in ("words", "all"):
        raise ValueError(f"`vocabulary` must be 'words' or 'all', got {mode!r}.")
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    }
    banned = [w.lower() for e in exclude for w in e.split() if len(w) >= 3]
    ids = []
    for tok, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        stem = tok[:-4] if tok.endswith("</w>") else tok
        if mode == "words" and not (tok.endswith("</w>") and stem.isascii() and stem.isalpha()):
            continue
        if any(b in stem.lower() for b in banned):
            continue
        ids.append(i)
    if not ids:
        raise ValueError("The attack vocabulary is empty; use vocabulary='all' or exclude fewer words.")
    return torch.tensor(sorted(ids), dtype=torch.long)


def project_to_vocabulary(
    embeds: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor, metric: Literal["l2", "cosine"] = "l2"
) -> torch.Tensor:
    """Nearest allowed token for each row of ``embeds`` (k, D) in the embedding ``table`` (V, D): ids (k,).

    The projection of PEZ-style discrete prompt optimisation (Wen et al. 2023), used by UnlearnDiff-
    style attacks to turn continuous token embeddings back into tokens.
    """
    cand = table[allowed.to(table.device)].float()  # (A, D)
    x = embeds.detach().float().to(cand.device)
    if metric == "cosine":
        score = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(cand, dim=-1).T
        best = score.argmax(dim=1)
    elif metric == "l2":
        best = torch.cdist(x, cand).argmin(dim=1)
    else:
        raise ValueError(f"`metric` must be 'l2' or 'cosine', got {metric!r}.")
    return allowed.to(best.device)[best].cpu()


@torch.no_grad()
def concept_latents(
    pipe: Any, prompt: str, seeds: Sequence[int], sampling: SamplingConfig | None = None
) -> torch.Tensor:
    """Latents z_0 (n, C, h, w) of ``pipe``'s images for ``prompt`` (the original model's picture of
    the concept, the target of the white-box attacks), one per seed."""
    cfg = (sampling or SamplingConfig()).resolved(pipe)
    out = pipe(
        prompt=[prompt] * len(seeds),
        latents=initial_latents(pipe, seeds, cfg.height, cfg.width),
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        output_type="latent",
    )
    return out.images.float()


def noisy_latents(
    scheduler: Any, z0: torch.Tensor, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` at uniform random training timesteps:
    ``(z_t, t, eps)``; the rows of ``z0`` are drawn with replacement."""
    n_train = int(scheduler.config.num_train_timesteps)
    rows = torch.randint(0, z0.shape[0], (batch,), generator=generator)
    t = torch.randint(0, n_train, (batch,), generator=generator)
    noise = torch.randn((batch, *z0.shape[1:]), generator=generator)
    x0 = z0[rows.to(z0.device)]
    return scheduler.add_noise(x0, noise.to(x0), t.to(x0.device)), t.to(x0.device), noise.to(x0)


def kv_only_difference(edited: Any, original: Any) -> tuple[bool, list[str]]:
    """Whether the two UNets differ only in cross-attention K/V weights; and the differing names."""
    a, b = edited.unet.state_dict(), original.unet.state_dict()
    if a.keys() != b.keys():
        return False, sorted(set(a) ^ set(b))
    diff = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].device))]
    return all(".attn2.to_k." in k or ".attn2.to_v." in k for k in diff), diff


def original_embeds(original: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The ORIGINAL text encoder's hidden states for ``prompts`` (B, 77, D), float32."""
    return encode_prompts(original, list(prompts)).float()


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class AttackResult:
    """One attack over a prompt set: per-prompt records (in prompt order), the edited model's images
    (``n_images`` per prompt, prompt-major), adversarial embeddings by prompt index, and the cost."""

    attack: str
    concept: str
    config: dict[str, Any]
    prompts: list[str]
    n_images: int
    records: list[dict[str, Any]]
    images: np.ndarray
    embeds: dict[int, torch.Tensor]
    cost: dict[str, Any]
    out_dir: Path | None = None

    def prompt_index(self) -> np.ndarray:
        """The prompt index of every image: (N,)."""
        return np.repeat(np.arange(len(self.prompts)), self.n_images)


def _identity(name: str, concept: str, cfg: Any, seed: int, n_images: int, sampling: SamplingConfig, edited, original):
    s = {k: v for k, v in asdict(sampling.resolved(edited)).items() if k != "batch_size"}
    return json.loads(
        json.dumps(
            {
                "attack": name,
                "concept": concept,
                "config": asdict(cfg),
                "seed": int(seed),
                "n_images": int(n_images),
                "sampling": s,
                "edited": fingerprint(edited),
                "original": fingerprint(original),
            },
            default=str,
        )
    )


def _read_records(folder: ResumableDir) -> dict[int, dict[str, Any]]:
    """The prompts already done: records whose images (and embedding) exist; a line cut by a crash is
    dropped (that prompt is redone)."""
    d = folder.path

    def whole(r: dict[str, Any]) -> bool:
        return all((d / p).exists() for p in r["images"]) and (r.get("embeds") is None or (d / r["embeds"]).exists())

    return {int(r["index"]): r for r in folder.records(RECORDS, valid=whole)}


def _images_for(output: AttackOutput, edited: Any, seeds: list[int], sampling: SamplingConfig) -> np.ndarray:
    n = len(seeds)
    if output.prompt_embeds is not None:
        emb = output.prompt_embeds.detach()
        return generate_images(edited, None, seeds, sampling, prompt_embeds=emb.expand(n, -1, -1))
    if output.token_ids is not None:
        with torch.no_grad():
            emb = encode_ids(edited.text_encoder, torch.tensor([output.token_ids]))
        return generate_images(edited, None, seeds, sampling, prompt_embeds=emb.expand(n, -1, -1))
    return generate_images(edited, [output.prompt] * n, seeds, sampling)


def run_attack(
    name: str,
    edited: Any,
    original: Any,
    concept: str,
    prompts: Sequence[str],
    *,
    config: Any = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    n_images: int = 1,
    sampling: SamplingConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> AttackResult:
    """Run attack ``name`` on every prompt and generate the edited model's images of its outputs.

    With ``out_dir`` the run is resumable: results go to ``out_dir/<name>/`` and prompts already
    recorded there are skipped (a directory made with another config, seed, sampler or other
    weights is refused). Deterministic under ``seed``.
    """
    spec = get_attack(name)
    check_attack(name, edited)  # an attack that does not run on the model's family: one clear error, nothing written
    if config is None:
        config = make_attack_config(name, **overrides)
    elif overrides:
        raise ValueError("Pass either `config` or keyword overrides, not both.")
    if not isinstance(config, spec.config_class):
        raise ValueError(
            f"`config` for attack {name!r} must be a {spec.config_class.__name__}, got {type(config).__name__}."
        )
    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty prompts.")
    if not concept or not concept.strip():
        raise ValueError("`concept` (the erased concept to attack) is empty.")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"`n_images` must be an integer >= 1, got {n_images!r}.")
    sampling = sampling or SamplingConfig()
    ctx = AttackContext(edited, original, concept, prompts, sampling, int(seed), progress)

    d = Path(out_dir) / name if out_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    memory_images: dict[int, np.ndarray] = {}
    embeds: dict[int, torch.Tensor] = {}
    prepare_cost: dict[str, Any] = {}
    folder: ResumableDir | None = None
    if d is not None:
        ident = _identity(name, concept, config, seed, n_images, sampling, edited, original)
        what = f"folder of attack {name!r}"
        if ResumableDir.check(d, ident, meta=IDENTITY, what=what):  # refuses other settings, naming them
            folder = ResumableDir(d, ident, meta=IDENTITY, what=what)
            prepare_cost = folder.meta.get("prepare_cost", {})
            done = {i: r for i, r in _read_records(folder).items() if i < len(prompts) and r["prompt"] == prompts[i]}

    todo = [i for i in range(len(prompts)) if i not in done]
    attack = spec.cls(config)
    if todo:
        t0 = time.perf_counter()
        with CallCounter(edited, original) as counter:
            attack.prepare(ctx)
        if not prepare_cost:
            prepare_cost = {"seconds": round(time.perf_counter() - t0, 4), **counter.counts()}
        if d is not None:  # written once prepare() succeeded: a failed start leaves no folder behind
            folder = ResumableDir(d, ident, meta=IDENTITY, what=f"folder of attack {name!r}")
            folder.update_meta(prepare_cost=prepare_cost)

    for i in tqdm(todo, desc=f"attack {name}", disable=not progress, unit="prompt"):
        gen = prompt_generator(seed, i)
        t0 = time.perf_counter()
        with CallCounter(edited, original) as c_att:
            out = attack.attack(ctx, prompts[i], i, gen)
        t1 = time.perf_counter()
        seeds = image_seeds(i, n_images, seed)
        with CallCounter(edited, original) as c_gen:
            imgs = attack.generate(ctx, out, seeds, sampling)
        t2 = time.perf_counter()
        rec: dict[str, Any] = {
            "index": i,
            "prompt": prompts[i],
            "adv_prompt": out.prompt,
            "token_ids": out.token_ids,
            "embeds": None,
            "seeds": seeds,
            "images": [],
            "meta": out.meta,
            "cost": {
                "attack": {"seconds": round(t1 - t0, 4), **c_att.counts()},
                "generate": {"seconds": round(t2 - t1, 4), **c_gen.counts()},
            },
        }
        if out.prompt_embeds is not None:
            embeds[i] = out.prompt_embeds.detach().float().cpu()
        if folder is None:
            memory_images[i] = imgs
            done[i] = rec
            continue
        rec["images"] = [folder.write_png(f"images/{i:05d}-{j}.png", img) for j, img in enumerate(imgs)]
        if out.prompt_embeds is not None:
            rec["embeds"] = f"embeds/{i:05d}.safetensors"
            save_safetensors_atomic({"prompt_embeds": embeds[i]}, folder.file(rec["embeds"]))
        folder.append(RECORDS, json.loads(json.dumps(rec, sort_keys=True, default=str)))
        done[i] = rec

    records = [done[i] for i in range(len(prompts))]
    if d is not None:
        images = np.stack([np.asarray(Image.open(d / p).convert("RGB")) for r in records for p in r["images"]])
        for r in records:
            if r.get("embeds") and r["index"] not in embeds:
                embeds[r["index"]] = load_file(d / r["embeds"])["prompt_embeds"]
    else:
        images = np.concatenate([memory_images[i] for i in range(len(prompts))])
    cost: dict[str, Any] = {"prepare": prepare_cost, "attack": {}, "generate": {}}
    for r in records:
        _add_costs(cost["attack"], r["cost"]["attack"])
        _add_costs(cost["generate"], r["cost"]["generate"])
    cost["resumed_prompts"] = len(prompts) - len(todo)
    return AttackResult(name, concept, asdict(config), prompts, n_images, records, images, embeds, cost, d)


@dataclass
class NoAttackConfig:
    """The identity attack has no settings."""


@register_attack("none", NoAttackConfig, "no attack: the plain prompts (the pre-attack rate)")
class NoAttack(Attack):
    """The identity: each prompt unchanged. Its success rate is the pre-attack rate."""

    white_box = False

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The prompt itself."""
        return AttackOutput(prompt=prompt)
