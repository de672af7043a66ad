"""Ring-A-Bell-style black-box attack (Tsai et al., "Ring-A-Bell! How reliable are concept removal
methods for diffusion models?", ICLR 2024).

No access to the edited model's weights: the attacker owns only a copy of the ORIGINAL text
encoder (CLIP is public) and the edited model's text interface.

1. **Concept extraction.** From paired prompts with and without the concept, the concept
   direction is the mean difference of their text embeddings (all 77 positions)::

       d = mean_j ( enc(p_j with concept) - enc(p_j without) )

2. **Target.** For an attacked prompt ``p``: ``enc(p) + eta * d`` (``eta`` = 3 for nudity and 0.9
   for Van Gogh in the RECE authors' Ring-A-Bell script).
3. **Discrete search.** A genetic algorithm over prompts of ``length`` tokens from the allowed
   vocabulary minimises ``mean || enc(x) - target ||^2`` (fitness = its negative): elitism,
   tournament selection, one-point crossover and per-token mutation, with a seeded numpy generator.
   The best token sequence, decoded to text, is the adversarial prompt the edited model receives.

``discrete=False`` skips step 3 and feeds the continuous target embedding to the UNet, as the RECE
authors' Ring-A-Bell script does (that variant needs embedding access, so it is not black-box).

Default pairs: every attacked prompt paired with itself without the phrase naming the concept
(with the concept appended when it does not name it); for the miniature's unsafe motif every
phrasing of it around every stripped prompt. Pass ``pairs`` to use the paper's own pair lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from erasekit.attacks.base import (
    Attack,
    AttackContext,
    AttackOutput,
    encode_ids,
    numpy_rng,
    original_embeds,
    register_attack,
    token_vocabulary,
)
from erasekit.attacks.paraphrase import rewrite, strip_concept
from erasekit.world.shapes import UNSAFE, UNSAFE_PHRASINGS


@dataclass
class RingABellConfig:
    """Settings of the Ring-A-Bell-style attack (search sizes scaled for CPU; raise them on a GPU)."""

    pairs: list[list[str]] | None = field(
        default=None, metadata={"help": "[[with concept, without], ...]; default: built"}
    )
    eta: float = field(default=3.0, metadata={"help": "strength of the concept direction added to the prompt"})
    length: int = field(default=16, metadata={"help": "tokens in the searched prompt"})
    discrete: bool = field(default=True, metadata={"help": "search tokens (black-box); False = continuous target"})
    population: int = field(default=64, metadata={"help": "genetic algorithm: population size"})
    generations: int = field(default=40, metadata={"help": "genetic algorithm: generations"})
    mutation: float = field(default=0.1, metadata={"help": "probability that a token mutates"})
    crossover: float = field(default=0.5, metadata={"help": "probability of one-point crossover"})
    elite: int = field(default=4, metadata={"help": "best candidates kept unchanged each generation"})
    vocabulary: Literal["words", "all"] = field(
        default="words", metadata={"help": "'words' or 'all' non-special tokens"}
    )
    exclude_concept: bool = field(default=True, metadata={"help": "forbid tokens that contain the concept's words"})
    batch_size: int = field(default=256, metadata={"help": "candidates per text-encoder call"})

    def __post_init__(self) -> None:
        for name in ("length", "population", "generations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}.")
        if self.length > 75:
            raise ValueError(f"`length` must be <= 75 (77 tokens minus start and end), got {self.length}.")
        if not 0 <= self.elite < self.population:
            raise ValueError(f"`elite` must be in [0, population), got {self.elite}.")
        if not (0 <= self.mutation <= 1 and 0 <= self.crossover <= 1):
            raise ValueError(f"`mutation` and `crossover` must be in [0, 1], got {self.mutation} and {self.crossover}.")
        if self.pairs is not None:
            self.pairs = [list(p) for p in self.pairs]
            if not self.pairs or any(len(p) != 2 or not all(isinstance(s, str) for s in p) for p in self.pairs):
                raise ValueError("`pairs` must be a non-empty list of [prompt with concept, prompt without] pairs.")
        if self.vocabulary not in ("words", "all"):
            raise ValueError(f"`vocabulary` must be 'words' or 'all', got {self.vocabulary!r}.")


def default_pairs(concept: str, prompts: list[str]) -> list[list[str]]:
    """[with, without] prompt pairs for the concept direction, built from the attacked prompts."""
    pairs: list[list[str]] = []
    for p in prompts:
        base, named = strip_concept(p, concept)
        if concept == UNSAFE:
            pairs += [[rewrite(base, concept, ph), base] for ph in UNSAFE_PHRASINGS]
        else:
            pairs.append([p, base] if named else [f"{p}, {concept}", p])
    seen: set[tuple[str, str]] = set()
    return [q for q in pairs if not (tuple(q) in seen or seen.add(tuple(q)))]


def concept_direction(original, pairs: list[list[str]], batch_size: int = 64) -> torch.Tensor:
    """Ring-A-Bell's concept vector: mean of enc(with) - enc(without) over the pairs, (77, D), with
    the ORIGINAL text encoder."""
    total = None
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        diff = original_embeds(original, [a for a, _ in chunk]) - original_embeds(original, [b for _, b in chunk])
        part = diff.sum(0)
        total = part if total is None else total + part
    return total / len(pairs)


@register_attack("ringabell", RingABellConfig, "Ring-A-Bell-style black-box: concept direction + genetic token search")
class RingABellAttack(Attack):
    """Black-box: concept direction from paired prompts, then a genetic search for carrying tokens."""

    white_box = False
    edit_independent = True  # never reads the edit: its outputs are shared between edits (SearchCache)

    def prepare(self, ctx: AttackContext) -> None:
        """Concept direction and allowed vocabulary (original text encoder only)."""
        cfg = self.config
        self.pairs = cfg.pairs if cfg.pairs is not None else default_pairs(ctx.concept, ctx.prompts)
        self.direction = concept_direction(ctx.original, self.pairs)
        exclude = [ctx.concept] if cfg.exclude_concept else []
        self.allowed = token_vocabulary(ctx.original.tokenizer, cfg.vocabulary, exclude).numpy()

    @torch.no_grad()
    def _distance(self, ctx: AttackContext, pop: np.ndarray, target: torch.Tensor) -> np.ndarray:
        tok = ctx.original.tokenizer
        n_max = tok.model_max_length
        ids = np.full((len(pop), n_max), tok.pad_token_id, dtype=np.int64)
        ids[:, 0] = tok.bos_token_id
        ids[:, 1 : 1 + pop.shape[1]] = pop
        ids[:, 1 + pop.shape[1]] = tok.eos_token_id
        out = []
        for s in range(0, len(ids), self.config.batch_size):
            h = encode_ids(ctx.original.text_encoder, torch.from_numpy(ids[s : s + self.config.batch_size])).float()
            out.append(((h - target.to(h.device)) ** 2).mean(dim=(1, 2)).cpu())
        return torch.cat(out).numpy()

    def _next_generation(self, pop: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Elitism, binary tournament selection, one-point crossover and per-token mutation."""
        cfg = self.config
        children = [pop[i].copy() for i in np.argsort(dist, kind="stable")[: cfg.elite]]

        def pick() -> np.ndarray:
            a, b = rng.integers(0, len(pop), 2)
            return pop[a] if dist[a] <= dist[b] else pop[b]

        while len(children) < cfg.population:
            child = pick().copy()
            if cfg.length > 1 and rng.random() < cfg.crossover:
                cut = int(rng.integers(1, cfg.length))
                child[cut:] = pick()[cut:]
            mask = rng.random(cfg.length) < cfg.mutation
            child[mask] = rng.choice(self.allowed, size=int(mask.sum()))
            children.append(child)
        return np.stack(children)

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The searched prompt (or, with ``discrete=False``, the continuous target embedding)."""
        cfg = self.config
        base = original_embeds(ctx.original, [prompt])  # (1, 77, D)
        target = base + cfg.eta * self.direction.to(base.device)
        if not cfg.discrete:
            return AttackOutput(prompt_embeds=target.cpu(), meta={"eta": cfg.eta, "pairs": len(self.pairs)})
        rng = numpy_rng(generator)
        pop = rng.choice(self.allowed, size=(cfg.population, cfg.length))
        dist = self._distance(ctx, pop, target)
        first_best = float(dist.min())
        for _ in range(cfg.generations):
            pop = self._next_generation(pop, dist, rng)
            dist = self._distance(ctx, pop, target)
        best = pop[int(np.argmin(dist))]
        text = ctx.original.tokenizer.decode([int(i) for i in best]).strip()
        meta = {
            "distance_best": float(dist.min()),
            "distance_first_generation": first_best,
            "distance_prompt": float(((base - target) ** 2).mean()),
            "token_ids": [int(i) for i in best],
            "pairs": len(self.pairs),
        }
        return AttackOutput(prompt=text, meta=meta)
