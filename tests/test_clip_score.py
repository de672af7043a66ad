"""CLIP alignment score (AP paper sec. 3.2) and the miniature CLIP recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from erasekit.eval.clip_score import ClipScorer, check_images
from erasekit.testing import TINY_CLIP, tiny_clip_scorer
from erasekit.world import clip as wclip


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


TEXTS = ["a red circle", "a blue square", "fire", "", "a picture by Orla Vantreck"]


def test_score_matches_clipmodel_forward():
    """score = 100 * max(cos, 0), with cos read off CLIPModel.forward's logits (logit_scale divided out)."""
    scorer = tiny_clip_scorer()
    x = images(5)
    m = scorer.model
    tok = scorer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = m(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=scorer.pixel_values(x))
        cos = (out.logits_per_image / m.logit_scale.exp()).double().numpy()  # (5 images, 5 texts)
    assert (cos > 0).any() and (cos < 0).any(), "the case must exercise the clamp at zero"
    expected = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(scorer.score_matrix(x, TEXTS), expected, atol=1e-4)
    np.testing.assert_allclose(scorer.score(x, TEXTS), np.diag(expected), atol=1e-4)


def test_score_by_hand_from_embeddings():
    """The same number from the projected embeddings, normalised by hand in numpy."""
    scorer = tiny_clip_scorer(1)
    x = images(3, 1)
    with torch.no_grad():
        img = scorer.model.get_image_features(pixel_values=scorer.pixel_values(x))
        tok = scorer.tokenizer(["a circle"], return_tensors="pt")
        txt = scorer.model.get_text_features(input_ids=tok.input_ids)
    img = getattr(img, "pooler_output", img).numpy().astype(np.float64)
    txt = getattr(txt, "pooler_output", txt).numpy().astype(np.float64)[0]
    cos = img @ txt / np.linalg.norm(img, axis=1) / np.linalg.norm(txt)
    np.testing.assert_allclose(scorer.score(x, ["a circle"]), 100 * np.maximum(cos, 0), atol=1e-4)


def test_batching_and_cache_do_not_change_scores():
    x = images(7, 2)
    texts = [TEXTS[i % len(TEXTS)] for i in range(7)]
    a = tiny_clip_scorer(batch_size=2).score_matrix(x, texts)
    s = tiny_clip_scorer(batch_size=64)
    s.embed_texts(["fire"])  # warm the cache with a subset
    np.testing.assert_allclose(a, s.score_matrix(x, texts), atol=1e-5)


def test_preprocess_matches_image_processor():
    x = images(4, 3)
    scorer = tiny_clip_scorer()
    torch.testing.assert_close(wclip.preprocess(x), scorer.pixel_values(x), atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    scorer = tiny_clip_scorer()
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        check_images(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images(3), ["a", "b"])
    with pytest.raises(ValueError, match="single string"):
        scorer.embed_texts("a circle")
    assert scorer.score(images(3), ["a circle"]).shape == (3,)  # one text broadcast to all images


def test_save_and_load_roundtrip(tmp_path):
    scorer = tiny_clip_scorer(4)
    recipe = wclip.ClipRecipe(seed=4, **TINY_CLIP)
    wclip.save_clip(tmp_path / "clip", scorer.model, scorer.tokenizer, wclip.image_processor(recipe), {"recipe": {}})
    loaded = ClipScorer.from_pretrained(tmp_path / "clip")
    x = images(3, 4)
    np.testing.assert_allclose(loaded.score_matrix(x, TEXTS), scorer.score_matrix(x, TEXTS), atol=1e-6)
    assert (tmp_path / "clip" / "model.safetensors").exists()
    assert not list((tmp_path / "clip").glob("*.bin"))


def test_from_pretrained_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a CLIP folder"):
        ClipScorer.from_pretrained(tmp_path)


def test_recipe_validation():
    with pytest.raises(ValueError, match="divisible by `patch_size`"):
        wclip.ClipRecipe(patch_size=5)
    with pytest.raises(ValueError, match="`batch`"):
        wclip.ClipRecipe(batch=1)
    with pytest.raises(ValueError, match="`text_hidden`"):
        wclip.ClipRecipe(text_hidden=10, text_heads=4)


def test_miniature_size_is_a_few_megabytes():
    n = sum(p.numel() for p in wclip.build_clip(wclip.ClipRecipe()).parameters())
    assert n * 4 < 8e6, n  # float32 bytes


def test_contrastive_loss_is_clip_loss_without_repeats_and_counts_repeats_as_positives():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(4, dtype=torch.bool)
    ref = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    torch.testing.assert_close(wclip.contrastive_loss(logits, eye), ref)
    same = eye.clone()
    same[0, 1] = same[1, 0] = True  # captions 0 and 1 are identical
    lp = torch.log_softmax(logits, 1)
    lt = torch.log_softmax(logits.t(), 1)
    by_hand = 0.0
    for i in range(4):
        pos = [j for j in range(4) if same[i, j]]
        by_hand += -(lp[i, pos].mean() + lt[i, pos].mean()) / 2
    torch.testing.assert_close(wclip.contrastive_loss(logits, same), by_hand / 4)


class OneHotScorer:
    """Embeds image n as the one-hot of a chosen class; text k as one-hot k."""

    def __init__(self, predicted: list[int], k: int) -> None:
        self.predicted, self.k = predicted, k

    def embed_images(self, images):
        return torch.nn.functional.one_hot(torch.tensor(self.predicted), self.k).float()

    def embed_texts(self, texts):
        return torch.eye(self.k)[: len(texts)].float()


def test_zero_shot_accuracy_by_hand():
    # labels columns: object, colour, background, style, unsafe; style 0 = plain (left out), k = artist k-1
    labels = np.array([[0, 0, 0, 0, 0], [1, 1, 0, 1, 0], [2, 2, 0, 2, 0], [3, 3, 0, 5, 0]])
    scorer = OneHotScorer([0, 1, 1, 4], 10)  # predicts class 0, 1, 1, 4 for every head
    acc = wclip.zero_shot_accuracy(scorer, np.zeros((4, 32, 32, 3), np.uint8), labels)
    assert acc["object"]["accuracy"] == pytest.approx(2 / 4)  # 0 ok, 1 ok, 1 != 2, 4 != 3
    assert acc["style"]["n"] == 3  # the plain image is left out
    assert acc["style"]["accuracy"] == pytest.approx(2 / 3)  # artists 0, 1, 4 vs predicted 1, 1, 4
    assert acc["style"]["chance"] == pytest.approx(1 / 5)
    assert acc["colour"]["chance"] == pytest.approx(1 / 6)


def test_heldout_examples_are_deterministic():
    a, la = wclip.heldout_examples(3)
    b, lb = wclip.heldout_examples(3)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_train_clip_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    recipe = wclip.ClipRecipe(n_train=24, n_heldout=8, batch=8, steps=3, warmup=1, checkpoint_every=2, **TINY_CLIP)
    meta = wclip.train_clip(tmp_path / "a", workdir=tmp_path / "wa", recipe=recipe, progress=False)
    assert set(meta["zero_shot"]) == {"object", "colour", "style"}
    saved = json.loads((tmp_path / "a" / "erasekit_clip.json").read_text())
    assert saved["recipe"]["steps"] == 3 and saved["log"][-1]["step"] == 3
    ClipScorer.from_pretrained(tmp_path / "a")  # loads with the scorer's own code path

    # Interrupted run: crash at step 3 (after the checkpoint at step 2), then resume.
    calls = {"n": 0}
    real = wclip.contrastive_loss

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(wclip, "contrastive_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        wclip.train_clip(tmp_path / "b", workdir=tmp_path / "wb", recipe=recipe, progress=False)
    assert json.loads((tmp_path / "wb" / "clip" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(wclip, "contrastive_loss", real)
    wclip.train_clip(tmp_path / "b", workdir=tmp_path / "wb", recipe=recipe, progress=False)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)

    with pytest.raises(ValueError, match="different recipe"):
        other = wclip.ClipRecipe(**{**recipe.__dict__, "lr": 5e-4})
        wclip.train_clip(tmp_path / "c", workdir=tmp_path / "wb", recipe=other, progress=False)
