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

**The authors' search space** (:func:`stratified_concepts`; the ``authors`` preset of AP and AGE).
The AP/AGE code (``gen_embedding_matrix.search_closest_tokens`` with ``sim='l2'``, then
``learn_k_means_from_input_embedding``) ranks the vocabulary by the L2 distance between the whole
(77, D) conditioning sequences, keeps the ``pool`` closest (1000; 2000 for nudity) and picks ``k``
of them (100; 50 for nudity) spread from near to far: a 1-D k-means with ``k`` clusters over the
similarities (minus the distances), one concept per cluster, the one closest to the cluster's mean.
The paper's appendix B.1 describes the cosine top-K instead (:func:`nearest_concepts`). The authors
use scikit-learn's k-means++ (random_state 0), a local optimum; :func:`kmeans_1d` is the exact 1-D
optimum (dynamic programming over the sorted values; no seed, no dependency).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from erasekit.pipeline import base_info, encode_prompts
from erasekit.world import shapes as W
from erasekit.world.tokenizer import TOKENIZER_DIR, load_clip_tokenizer

VOCABULARIES = ("clip", "shapes", "wordfreq")
_EMBED_CACHE: dict[tuple[str, str], torch.Tensor] = {}
_DISTANCE_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


# ------------------------------------------------------------------------------------------ vocabularies
def clip_vocabulary(tokenizer=None, *, min_length: int = 2) -> list[str]:
    """Whole-word CLIP tokens (``word</w>``) made of lower-case ASCII letters, ``len >= min_length``.

    ``tokenizer`` defaults to the CLIP tokenizer bundled with erasekit (Stable Diffusion's).
    """
    if tokenizer is None:
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
    pool = _candidates(concept, vocabulary, k, exclude)
    emb = concept_embeddings(pipe, pool, progress=progress)
    query = concept_embeddings(pipe, [concept])
    sims = cosine_similarity_matrix(query, emb)[0]
    vals, idx = torch.topk(sims, k)
    return [(pool[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]


def _candidates(concept: str, vocabulary: Sequence[str], k: int, exclude: Sequence[str]) -> list[str]:
    """``vocabulary`` without ``concept`` and ``exclude`` (case-insensitive), checked to hold at least ``k``."""
    drop = {concept.strip().lower(), *(e.strip().lower() for e in exclude)}
    pool = [w for w in dict.fromkeys(vocabulary) if w.strip().lower() not in drop]
    if k <= 0:
        raise ValueError(f"`k` must be > 0, got {k}.")
    if k > len(pool):
        raise ValueError(
            f"`k`={k} is larger than the vocabulary: {len(pool)} concepts remain after removing {sorted(drop)}. "
            f"Use k <= {len(pool)} or a larger vocabulary."
        )
    return pool


@torch.no_grad()
def sequence_distances(
    pipe, concept: str, concepts: Sequence[str], *, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """L2 distances (N,) between the flattened (77, D) conditioning of ``concept`` and of each of ``concepts``.

    The AP/AGE authors' similarity (``search_closest_tokens(..., sim='l2')``: minus the pairwise distance
    of the 77-token text-encoder outputs that condition the UNet). Cached per (base model, vocabulary,
    concept) for the life of the process; only the distances are kept (a vocabulary's sequence
    embeddings would take N x 77 x D floats).
    """
    concepts = list(concepts)
    key = (
        str(base_info(pipe).get("fingerprint")),
        hashlib.sha256(json.dumps(concepts).encode()).hexdigest(),
        concept,
    )
    if key in _DISTANCE_CACHE:
        return _DISTANCE_CACHE[key]
    query = encode_prompts(pipe, [concept]).flatten(1).float()  # (1, 77 * D)
    out = []
    for s in tqdm(range(0, len(concepts), batch_size), desc="embed sequences", disable=not progress, unit="batch"):
        emb = encode_prompts(pipe, concepts[s : s + batch_size]).flatten(1).float()  # (B, 77 * D)
        out.append((emb - query).norm(dim=-1).cpu())
    dist = torch.cat(out) if out else torch.zeros(0)
    _DISTANCE_CACHE[key] = dist
    return dist


def kmeans_1d(values: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means: labels (N,) minimising the within-cluster sum of squares, clusters numbered
    0..k-1 in increasing order of their values.

    In one dimension the optimal clusters are contiguous runs of the sorted values, so dynamic
    programming over the sorted values finds the global optimum (Wang & Song 2011, Ckmeans.1d.dp):
    ``D[m][j] = min_i D[m-1][i-1] + SSE(s[i..j])``, O(k N^2) time, O(N^2) memory. Ties go to the
    earliest cut, so the result is deterministic.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be between 1 and the number of values ({n}), got {k}.")
    order = np.argsort(x, kind="stable")
    s = x[order]
    c1, c2 = np.concatenate([[0.0], np.cumsum(s)]), np.concatenate([[0.0], np.cumsum(s * s)])
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        seg = c1[j + 1] - c1[i]
        cost = np.where(j >= i, np.maximum(c2[j + 1] - c2[i] - seg * seg / (j - i + 1), 0.0), np.inf)  # SSE(s[i..j])
    best, back = cost[0].copy(), np.zeros((k, n), dtype=np.int64)
    for m in range(1, k):
        cand = best[:-1, None] + cost[1:, :]  # (N-1, N): last cluster starts at i = 1..N-1
        back[m] = cand.argmin(axis=0) + 1
        best = cand.min(axis=0)
    labels, end = np.empty(n, dtype=np.int64), n - 1
    for m in range(k - 1, -1, -1):
        start = int(back[m][end]) if m > 0 else 0
        labels[order[start : end + 1]] = m
        end = start - 1
    return labels


def stratified_concepts(
    pipe,
    concept: str,
    vocabulary: Sequence[str],
    k: int,
    *,
    pool: int = 1000,
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> list[tuple[str, float]]:
    """The AP/AGE authors' search space for ``concept``: ``k`` concepts spread from near to far.

    1. Rank ``vocabulary`` (without ``concept`` and ``exclude``) by similarity = minus the L2 distance of
       the (77, D) conditioning sequences (:func:`sequence_distances`) and keep the ``pool`` closest.
    2. If at most ``k`` remain, return them all (the authors' code does the same); otherwise cluster
       their similarities with :func:`kmeans_1d` into ``k`` clusters and keep, from each, the concept
       whose similarity is closest to the cluster's mean.

    Returns ``(concept, similarity)`` best first. Where the authors differ: they search every kept
    concept for the one closest to each centre, so two centres can pick the same concept and the set
    comes out smaller than ``k``; picking inside each cluster always gives ``k`` distinct concepts (and
    the same concept whenever the closest one lies in the centre's own cluster, as it does for all but
    near-ties). The authors also keep ``concept`` itself when the vocabulary holds it; it is left out
    here, as in :func:`nearest_concepts`, since preserving the erased concept would undo the erasure.
    """
    if pool <= 0:
        raise ValueError(f"`pool` must be > 0, got {pool}.")
    words = _candidates(concept, vocabulary, k, exclude)
    sims = -sequence_distances(pipe, concept, words, progress=progress).double().numpy()
    near = np.argsort(-sims, kind="stable")[: min(pool, len(words))]  # the pool, best first
    if len(near) <= k:
        chosen = list(near)
    else:
        labels = kmeans_1d(sims[near], k)
        chosen = []
        for m in range(k):
            members = near[labels == m]
            centre = sims[members].mean()
            chosen.append(members[int(np.argmin(np.abs(sims[members] - centre)))])
    chosen.sort(key=lambda i: (-sims[i], i))
    return [(words[i], float(sims[i])) for i in chosen]
