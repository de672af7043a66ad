"""Concept vocabularies and nearest concepts in the text encoder's space.

Adversarial Preservation (Bui et al. 2024, appendix B.1) searches for the concept to preserve
among the ``K`` concepts closest to each erased concept, by cosine similarity of text embeddings,
in a vocabulary: the CLIP tokenizer's tokens (filtered of "nonsensical" ones), or the Oxford 3000
common English words. The vocabularies here:

* ``"clip"``: the CLIP tokenizer's whole-word entries (``...</w>``) that are lower-case ASCII
  letters only, at least ``min_length`` long (about 32,800 words), in vocabulary (merge) order;
* ``"shapes"``: the miniature world's own words (objects and their synonyms, colours, backgrounds,
  styles, artists, the unsafe motif and its phrasings, the captions' other words);
* ``"wordfreq"`` / ``"wordfreq:N"``: the N (default 3000) most frequent English words of the
  ``wordfreq`` package, if it is installed (the closest offline stand-in for the Oxford 3000);
* a path: a user's file, one concept per line (blank lines and ``#`` comments ignored).

**Which embedding.** A concept is represented by the text encoder's *pooled* output: the final
(layer-normed) hidden state at the end-of-text token, which is what CLIP's contrastive loss aligns
with images, and which, because CLIP's text transformer is causal, has attended to every token of
the concept. The full (77, D) sequence that conditions the UNet would be a poor measure: its ~70
padding positions are nearly the same for every short prompt, so all cosine similarities come out
close to 1. Causality also means the pooled output does not depend on the padding after the
end-of-text token, so vocabularies are encoded with ``padding="longest"`` (a few tokens) rather than
77 -- the same numbers at a fraction of the cost (``tests/test_concepts.py`` checks this).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasekit.pipeline import base_info

VOCABULARIES = ("clip", "shapes", "wordfreq")
_EMBED_CACHE: dict[tuple[str, str], torch.Tensor] = {}


# ------------------------------------------------------------------------------------------ vocabularies
def clip_vocabulary(tokenizer=None, *, min_length: int = 2) -> list[str]:
    """Whole-word CLIP tokens (``word</w>``) made of lower-case ASCII letters, ``len >= min_length``.

    ``tokenizer`` defaults to the CLIP tokenizer bundled with erasekit (Stable Diffusion's).
    """
    if tokenizer is None:
        from erasekit.testing import TOKENIZER_DIR
        from erasekit.world.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer(TOKENIZER_DIR)
    vocab = tokenizer.get_vocab()
    words = []
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token.endswith("</w>"):
            stem = token[:-4]
            if len(stem) >= min_length and stem.isascii() and stem.isalpha() and stem.islower():
                words.append(stem)
    return words


def shapes_vocabulary() -> list[str]:
    """The miniature world's words: every concept it can draw and the other words of its captions."""
    from erasekit.world import shapes as W

    words: list[str] = [*W.OBJECTS]
    for syn in W.SYNONYMS.values():
        words += list(syn)
    words += [*W.COLOURS, *W.BACKGROUNDS, *W.STYLES, *W.ARTISTS, W.UNSAFE, *W.UNSAFE_PHRASINGS]
    for text in (*W.TEMPLATES, *W.STYLE_PHRASES, " on a {bg} background"):
        words += [w for w in re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", text.lower())) if len(w) >= 2]
    return list(dict.fromkeys(words))


def file_vocabulary(path: str | Path) -> list[str]:
    """Concepts from a text file, one per line (blank lines and lines starting with ``#`` skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Vocabulary file {str(p)!r} does not exist (expected one concept per line).")
    words = [" ".join(line.split()) for line in p.read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ValueError(f"Vocabulary file {str(p)!r} holds no concept (one per line).")
    return words


def wordfreq_vocabulary(n: int = 3000, lang: str = "en") -> list[str]:
    """The ``n`` most frequent alphabetic words of ``lang`` from the ``wordfreq`` package (if installed)."""
    try:
        import wordfreq
    except ImportError as e:
        raise ImportError(
            "The 'wordfreq' vocabulary needs the wordfreq package: pip install wordfreq. "
            "Or use 'clip', 'shapes' or a file with one concept per line."
        ) from e
    if n <= 0:
        raise ValueError(f"`n` must be > 0, got {n}.")
    out: list[str] = []
    for w in wordfreq.iter_wordlist(lang):
        if w.isascii() and w.isalpha() and len(w) >= 2:
            out.append(w)
            if len(out) == n:
                break
    return out


def load_vocabulary(spec: str, *, tokenizer=None) -> list[str]:
    """A vocabulary by name (``clip``, ``shapes``, ``wordfreq``, ``wordfreq:N``) or file path."""
    if spec == "clip":
        return clip_vocabulary(tokenizer)
    if spec == "shapes":
        return shapes_vocabulary()
    if spec == "wordfreq" or spec.startswith("wordfreq:"):
        n = spec.partition(":")[2]
        if n and not n.isdigit():
            raise ValueError(f"Vocabulary {spec!r}: expected 'wordfreq:N' with N a positive integer.")
        return wordfreq_vocabulary(int(n) if n else 3000)
    if Path(spec).expanduser().exists():
        return file_vocabulary(Path(spec).expanduser())
    raise ValueError(
        f"Unknown vocabulary {spec!r}: use one of {VOCABULARIES}, 'wordfreq:N', or a file path (one concept per line)."
    )


# ------------------------------------------------------------------------------------------ embeddings
@torch.no_grad()
def concept_embeddings(pipe, concepts: Sequence[str], *, batch_size: int = 512, progress: bool = False) -> torch.Tensor:
    """Pooled (end-of-text token) text-encoder embeddings of ``concepts``: (N, D), float32, on CPU.

    Cached per (base model, vocabulary) for the life of the process.
    """
    concepts = list(concepts)
    key = (str(base_info(pipe).get("fingerprint")), hashlib.sha256(json.dumps(concepts).encode()).hexdigest())
    if key in _EMBED_CACHE:
        return _EMBED_CACHE[key]
    enc = pipe.text_encoder
    out = []
    for s in tqdm(range(0, len(concepts), batch_size), desc="embed concepts", disable=not progress, unit="batch"):
        tok = pipe.tokenizer(
            concepts[s : s + batch_size],
            padding="longest",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out.append(enc(tok.input_ids.to(enc.device)).pooler_output.float().cpu())
    emb = torch.cat(out) if out else torch.zeros(0, enc.config.hidden_size)
    _EMBED_CACHE[key] = emb
    return emb


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (N, M) between the rows of ``a`` (N, D) and ``b`` (M, D)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def nearest_concepts(
    pipe,
    concept: str,
    vocabulary: Sequence[str],
    k: int,
    *,
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> list[tuple[str, float]]:
    """The ``k`` concepts of ``vocabulary`` closest to ``concept`` by cosine similarity of pooled text
    embeddings (AP paper, appendix B.1), best first, as ``(concept, similarity)``.

    ``concept`` itself and ``exclude`` (compared case-insensitively) are left out; ``k`` larger than
    what remains is a ``ValueError``.
    """
    drop = {concept.strip().lower(), *(e.strip().lower() for e in exclude)}
    pool = [w for w in dict.fromkeys(vocabulary) if w.strip().lower() not in drop]
    if k <= 0:
        raise ValueError(f"`k` must be > 0, got {k}.")
    if k > len(pool):
        raise ValueError(
            f"`k`={k} is larger than the vocabulary: {len(pool)} concepts remain after removing {sorted(drop)}. "
            f"Use k <= {len(pool)} or a larger vocabulary."
        )
    emb = concept_embeddings(pipe, pool, progress=progress)
    query = concept_embeddings(pipe, [concept])
    sims = cosine_similarity_matrix(query, emb)[0]
    vals, idx = torch.topk(sims, k)
    return [(pool[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]
