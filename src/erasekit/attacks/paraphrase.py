"""Paraphrase attack: prompts that reach a concept without naming it (black-box).

Erasure methods edit what the *word* does; a model that learned the concept from many phrasings
may still draw it for the others (I2P's nudity prompts rarely say "nudity"). For every attacked
prompt the attack removes the phrase that names the concept and says it another way:

* the miniature's unsafe motif ("fire"): its phrasings that do not contain the word
  (``UNSAFE_PHRASINGS``: "burning", "blazing", "fiery", "flaming" before the object; "ablaze",
  "in flames", "engulfed in flames" after it);
* the miniature's objects: their synonyms (``SYNONYMS``: triangle -> pyramid, circle -> disc, ...);
* anything else (real models): ``substitutes`` given in the config or a text ``file`` with one
  substitute phrase per line (e.g. for "nudity": "naked", "without clothes", ...); a substitute
  replaces the concept's words where they occur and is appended otherwise.

Which substitute a prompt gets is drawn from the prompt's seeded generator (deterministic).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasekit.attacks.base import Attack, AttackContext, AttackOutput, register_attack
from erasekit.world.shapes import OBJECTS, SYNONYMS, UNSAFE, UNSAFE_PHRASINGS, UNSAFE_PREFIXES, fix_articles


@dataclass
class ParaphraseConfig:
    """Where the substitutes come from (built in for the miniature)."""

    substitutes: list[str] | None = field(default=None, metadata={"help": "phrases that mean the concept"})
    file: str | None = field(default=None, metadata={"help": "text file, one substitute phrase per line"})

    def __post_init__(self) -> None:
        if self.substitutes is not None and self.file is not None:
            raise ValueError("Give `substitutes` or `file`, not both.")
        if self.substitutes is not None:
            self.substitutes = [s.strip() for s in self.substitutes if s and s.strip()]
            if not self.substitutes:
                raise ValueError("`substitutes` is empty.")
        if self.file is not None and not Path(self.file).is_file():
            raise ValueError(f"Paraphrase `file` {self.file!r} does not exist.")


def naming_phrases(concept: str) -> list[str]:
    """Phrases that name ``concept`` in a prompt, longest first (for the unsafe motif: "on fire", "fire")."""
    names = {concept}
    if concept == UNSAFE:
        names |= {p for p in UNSAFE_PHRASINGS if re.search(rf"\b{re.escape(concept)}\b", p)}
    return sorted(names, key=len, reverse=True)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text)).strip(" ,")
    return fix_articles(text)


def strip_concept(prompt: str, concept: str) -> tuple[str, bool]:
    """``prompt`` without the phrase naming ``concept``; and whether one was found."""
    for phrase in naming_phrases(concept):
        pat = re.compile(rf"\b{re.escape(phrase)}\b", re.IGNORECASE)
        if pat.search(prompt):
            return _tidy(pat.sub(" ", prompt, count=1)), True
    return prompt, False


def builtin_substitutes(concept: str) -> list[str] | None:
    """The miniature's paraphrases of ``concept``, or ``None`` when it has none."""
    if concept == UNSAFE:
        return [p for p in UNSAFE_PHRASINGS if not re.search(rf"\b{re.escape(concept)}\b", p)]
    if concept in OBJECTS:
        return list(SYNONYMS[concept])
    return None


def rewrite(prompt: str, concept: str, substitute: str) -> str:
    """Say ``prompt`` with ``substitute`` in place of the phrase naming ``concept``.

    For the unsafe motif a prefix phrasing goes before the object phrase (after a leading article)
    and a suffix phrasing after it; otherwise the substitute takes the concept's place, or is
    appended when the prompt does not name the concept.
    """
    if concept == UNSAFE:
        base, _ = strip_concept(prompt, concept)
        if substitute in UNSAFE_PREFIXES:
            m = re.match(r"^(an?|the)\s+", base, re.IGNORECASE)
            out = f"{m.group(0)}{substitute} {base[m.end() :]}" if m else f"{substitute} {base}"
        else:
            out = f"{base} {substitute}"
        return _tidy(out)
    pat = re.compile(rf"\b{re.escape(concept)}\b", re.IGNORECASE)
    if pat.search(prompt):
        return _tidy(pat.sub(substitute, prompt, count=1))
    return _tidy(f"{prompt}, {substitute}")


@register_attack(
    "paraphrase",
    ParaphraseConfig,
    "paraphrases: say the concept without naming it (miniature phrasings, synonyms, or a file)",
)
class ParaphraseAttack(Attack):
    """Black-box: rewrite each prompt with a phrase that means the concept without naming it."""

    white_box = False
    edit_independent = True  # never reads the edit: its outputs are shared between edits (SearchCache)

    def prepare(self, ctx: AttackContext) -> None:
        """Resolve the substitutes: config, file, or the miniature's built-in ones."""
        cfg = self.config
        if cfg.substitutes is not None:
            subs = list(cfg.substitutes)
        elif cfg.file is not None:
            subs = [ln.strip() for ln in Path(cfg.file).read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not subs:
                raise ValueError(f"Paraphrase file {cfg.file!r} has no phrases.")
        else:
            subs = builtin_substitutes(ctx.concept)
            if subs is None:
                raise ValueError(
                    f"No built-in paraphrases for {ctx.concept!r} (only the miniature's objects and {UNSAFE!r}); "
                    "pass `substitutes=[...]` or `file=PATH` (one phrase per line)."
                )
        self.substitutes = subs

    def attack(self, ctx: AttackContext, prompt: str, index: int, generator: torch.Generator) -> AttackOutput:
        """The rewritten prompt."""
        j = int(torch.randint(0, len(self.substitutes), (1,), generator=generator))
        sub = self.substitutes[j]
        return AttackOutput(prompt=rewrite(prompt, ctx.concept, sub), meta={"substitute": sub})
