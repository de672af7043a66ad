import importlib.util
import itertools

import numpy as np
import pytest
import torch

from erasekit.concepts import (
    clip_vocabulary,
    concept_embeddings,
    cosine_similarity_matrix,
    file_vocabulary,
    kmeans_1d,
    load_vocabulary,
    nearest_concepts,
    sequence_distances,
    shapes_vocabulary,
    stratified_concepts,
)
from erasekit.pipeline import encode_prompts
from erasekit.world.shapes import ARTISTS, COLOURS, OBJECTS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def test_clip_vocabulary_is_whole_alphabetic_words(tiny_pipe):
    words = clip_vocabulary(tiny_pipe.tokenizer)
    assert 30_000 < len(words) < 40_000
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in words)
    assert {"triangle", "truck", "church", "photo"} <= set(words)
    assert len(set(words)) == len(words)
    vocab = tiny_pipe.tokenizer.get_vocab()
    assert all(f"{w}</w>" in vocab for w in words[:200])
    assert words == clip_vocabulary()  # the bundled tokenizer is the same


def test_shapes_vocabulary_has_the_worlds_words():
    words = shapes_vocabulary()
    assert set(OBJECTS) <= set(words) and set(COLOURS) <= set(words) and set(ARTISTS) <= set(words)
    assert {"fire", "picture", "drawing", "donut"} <= set(words)
    assert "{obj}" not in " ".join(words) and len(set(words)) == len(words)


def test_file_vocabulary(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# my concepts\ngarbage truck\n\n  church \nchurch\n")
    assert file_vocabulary(f) == ["garbage truck", "church"]
    assert load_vocabulary(str(f)) == ["garbage truck", "church"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no concept"):
        file_vocabulary(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="Unknown vocabulary"):
        load_vocabulary("no-such-vocabulary")


@pytest.mark.skipif(importlib.util.find_spec("wordfreq") is not None, reason="wordfreq is installed")
def test_wordfreq_missing_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install wordfreq"):
        load_vocabulary("wordfreq:100")


@pytest.mark.skipif(importlib.util.find_spec("wordfreq") is None, reason="wordfreq is not installed")
def test_wordfreq_vocabulary():
    words = load_vocabulary("wordfreq:50")
    assert len(words) == 50 and all(w.isalpha() for w in words)


def test_pooled_embedding_is_the_eot_state_and_independent_of_padding(tiny_pipe):
    """Short padding gives the same pooled vectors as Stable Diffusion's 77-token padding."""
    words = ["triangle", "red square", "a picture of a star"]
    short = concept_embeddings(tiny_pipe, words)
    tok = tiny_pipe.tokenizer(words, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = tiny_pipe.text_encoder(tok.input_ids)
    eot = tok.attention_mask.sum(1) - 1
    full = out.last_hidden_state[torch.arange(3), eot]
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, out.pooler_output, rtol=1e-5, atol=1e-6)


def test_nearest_concepts_brute_force(tiny_pipe):
    vocab = shapes_vocabulary()
    near = nearest_concepts(tiny_pipe, "triangle", vocab, 5, exclude=["square"])
    names = [n for n, _ in near]
    assert "triangle" not in names and "square" not in names and len(names) == 5
    pool = [w for w in vocab if w not in ("triangle", "square")]
    emb = concept_embeddings(tiny_pipe, pool)
    q = concept_embeddings(tiny_pipe, ["triangle"])[0]
    brute = sorted(
        ((float(torch.dot(e, q) / (e.norm() * q.norm())), w) for w, e in zip(pool, emb, strict=True)), reverse=True
    )
    assert names == [w for _, w in brute[:5]]
    assert [s for _, s in near] == pytest.approx([s for s, _ in brute[:5]], abs=1e-5)
    sims = cosine_similarity_matrix(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    torch.testing.assert_close(sims, torch.tensor([[1.0, 0.0, 2**-0.5]]))


def test_k_larger_than_the_vocabulary_is_an_error(tiny_pipe):
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        nearest_concepts(tiny_pipe, "triangle", ["circle", "square", "triangle"], 3)
    with pytest.raises(ValueError, match="k"):
        nearest_concepts(tiny_pipe, "triangle", ["circle"], 0)


# ------------------------------------------------------------------------------------------ the authors' space
def _sse(x: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[labels == m] - x[labels == m].mean()) ** 2).sum() for m in np.unique(labels)))


def test_kmeans_1d_is_the_optimum_by_brute_force():
    """Against every partition of the sorted values into k contiguous runs (the optimum is one of them)."""
    rng = np.random.default_rng(0)
    for n, k in [(7, 1), (7, 3), (8, 4), (9, 2), (6, 6)]:
        x = rng.normal(size=n)
        labels = kmeans_1d(x, k)
        assert sorted(set(labels.tolist())) == list(range(k))
        order = np.argsort(x)
        assert (np.diff(labels[order]) >= 0).all()  # clusters numbered by increasing value, contiguous
        s = x[order]
        best = min(
            sum(((seg - seg.mean()) ** 2).sum() for seg in np.split(s, cuts))
            for cuts in itertools.combinations(range(1, n), k - 1)
        )
        assert _sse(x, labels) == pytest.approx(best, abs=1e-12)
    three = kmeans_1d([0.0, 0.1, 5.0, 5.2, 9.9, 10.0, 10.1], 3)
    assert three.tolist() == [0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="between 1 and the number of values"):
        kmeans_1d([1.0, 2.0], 3)


def test_sequence_distances_are_l2_of_the_77_token_conditioning(tiny_pipe):
    words = ["circle", "red square", "a picture of a star"]
    d = sequence_distances(tiny_pipe, "triangle", words)
    emb = encode_prompts(tiny_pipe, ["triangle", *words]).flatten(1).float()
    torch.testing.assert_close(d, (emb[1:] - emb[0]).norm(dim=-1))


def test_stratified_space_spans_near_to_far(tiny_pipe):
    vocab = shapes_vocabulary()
    pool = [w for w in vocab if w not in ("triangle", "square")]
    sims = -sequence_distances(tiny_pipe, "triangle", pool).double().numpy()
    ranked = [pool[i] for i in np.argsort(-sims, kind="stable")]
    k, size = 5, 30
    chosen = stratified_concepts(tiny_pipe, "triangle", vocab, k, pool=size, exclude=["square"])
    names = [n for n, _ in chosen]
    assert len(set(names)) == k and set(names) <= set(ranked[:size])  # from the pool of the 30 nearest (L2)
    ranks = sorted(ranked.index(n) for n in names)
    assert ranks[0] < size // 3 and ranks[-1] >= 2 * size // 3  # near and far ends of the pool both present
    assert [s for _, s in chosen] == sorted((s for _, s in chosen), reverse=True)
    # each pick is its k-means cluster's member closest to the cluster's mean similarity
    top = np.sort(sims)[::-1][:size]
    labels = kmeans_1d(top, k)
    for m in range(k):
        members = top[labels == m]
        assert any(abs(s - members[np.argmin(np.abs(members - members.mean()))]) < 1e-9 for _, s in chosen)
    # the cosine top-k is the near end only
    near = [n for n, _ in nearest_concepts(tiny_pipe, "triangle", vocab, k, exclude=["square"])]
    assert names != near
    # a pool no larger than k is returned whole (as the authors' code does)
    assert [n for n, _ in stratified_concepts(tiny_pipe, "triangle", vocab, 5, pool=4, exclude=["square"])] == ranked[
        :4
    ]
    with pytest.raises(ValueError, match="pool"):
        stratified_concepts(tiny_pipe, "triangle", vocab, 5, pool=0)
