import json
import warnings

import numpy as np
import pytest
import torch

import erasekit
from erasekit.attacks import (
    concept_judge,
    default_prompts,
    get_attack,
    make_attack_config,
    project_to_vocabulary,
    run_attack,
    run_attacks,
    token_vocabulary,
)
from erasekit.attacks.paraphrase import rewrite, strip_concept
from erasekit.attacks.ringabell import concept_direction, default_pairs
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig
from erasekit.eval.protocols import evaluate
from erasekit.methods.rece import kv_weights
from erasekit.testing import tiny_pipeline

FAST = SamplingConfig(steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


@pytest.fixture(scope="module")
def pipes():
    """(edited, original): a UCE edit of "triangle" applied to a copy of the tiny pipeline."""
    torch.set_num_threads(1)
    original = tiny_pipeline(0)
    edited = tiny_pipeline(0)
    edit = erasekit.erase(original, EraseRequest(["triangle"]), method="uce", progress=False)
    edit.apply_(edited, check=False)
    return edited, original


class StubDetector:
    """A Detector whose "object" head calls every image a triangle (or nothing, if ``shows`` is False)."""

    name = "stub"
    version = "0"
    heads = {"object": ["circle", "triangle", "square"], "unsafe": ["safe", "unsafe"]}

    def __init__(self, shows: bool) -> None:
        self.value = shows

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = len(images)
        obj = np.tile([0.1, 0.8, 0.1] if self.value else [0.8, 0.1, 0.1], (n, 1))
        return {"object": obj, "unsafe": np.tile([0.9, 0.1], (n, 1))}


def test_unknown_attack_and_option_are_clear_errors(pipes):
    with pytest.raises(ValueError, match="available attacks: .*inversion.*ringabell"):
        get_attack("p4d")
    with pytest.raises(ValueError, match="Unknown attack 'nope'"):  # fails before any image is made
        run_attacks(*pipes, "triangle", ["paraphrase", "nope"], detector=StubDetector(True))
    with pytest.raises(ValueError, match="valid options"):
        make_attack_config("unlearndiff", iterations=3)
    with pytest.raises(ValueError, match="k"):
        make_attack_config("unlearndiff", k=0)


def test_projection_to_vocabulary_returns_valid_nearest_ids():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)
    allowed = torch.tensor([3, 7, 11, 20, 42])
    x = table[torch.tensor([7, 42, 0])] + 0.01 * torch.randn(3, 8, generator=g)
    ids = project_to_vocabulary(x, table, allowed)
    assert set(ids.tolist()) <= set(allowed.tolist())
    ref = allowed[torch.cdist(x, table[allowed]).argmin(1)]
    assert torch.equal(ids, ref) and ids[:2].tolist() == [7, 42]
    ids_cos = project_to_vocabulary(x, table, allowed, metric="cosine")
    assert set(ids_cos.tolist()) <= set(allowed.tolist())


def test_token_vocabulary_excludes_concept_and_special_tokens(pipes):
    tok = pipes[1].tokenizer
    voc = token_vocabulary(tok, "words", exclude=["fire"])
    assert len(voc) > 1000 and int(voc.max()) < len(tok.get_vocab())
    names = set(tok.convert_ids_to_tokens(voc.tolist()))
    assert "red</w>" in names and "fire</w>" not in names and "bonfire</w>" not in names
    assert tok.bos_token_id not in voc.tolist() and tok.eos_token_id not in voc.tolist()
    assert len(token_vocabulary(tok, "all")) > len(token_vocabulary(tok, "words"))


def test_inversion_closed_form_inverts_a_kv_edit(pipes):
    edited, original = pipes
    res = run_attack("inversion", edited, original, "triangle", ["a red triangle"], sampling=FAST, progress=False)
    meta = res.records[0]["meta"]
    assert meta["mode"] == "closed_form"
    assert meta["residual"] < 1e-6 < meta["residual_prompt"]  # eq. 5 fits the original K/V exactly here
    assert res.embeds[0].shape == (1, 77, 32) and res.images.shape == (1, 32, 32, 3)
    w_old, w_new = kv_weights(original.unet), kv_weights(edited.unet)
    name = next(iter(w_old))
    c = erasekit.encode_prompts(original, ["a red triangle"])[0]
    torch.testing.assert_close(res.embeds[0][0] @ w_new[name].T, c @ w_old[name].T, rtol=1e-3, atol=1e-4)


def test_inversion_on_a_non_kv_edit(pipes):
    _, original = pipes
    other = tiny_pipeline(0)
    with torch.no_grad():
        other.unet.conv_in.weight.mul_(0.9)  # an edit outside cross-attention
    with pytest.raises(ValueError, match="mode='gradient'"):
        run_attack("inversion", other, original, "triangle", ["a triangle"], mode="closed_form", sampling=FAST)
    res = run_attack(
        "inversion",
        other,
        original,
        "triangle",
        ["a triangle"],
        steps=2,
        batch=1,
        n_latents=1,
        sampling=FAST,
        progress=False,
    )
    assert res.records[0]["meta"]["mode"] == "gradient"
    c = erasekit.encode_prompts(original, ["a triangle"])
    assert not torch.equal(res.embeds[0], c)  # the embedding moved
    cost = res.cost["attack"]
    assert cost["unet_calls"] == 1 + 2 * 2  # one sampling step (CFG batched) + 2 steps x (edited, original)


def test_attacks_are_deterministic_under_a_seed(pipes):
    edited, original = pipes
    kw = {"sampling": FAST, "progress": False, "seed": 3}
    a = run_attack("unlearndiff", edited, original, "triangle", ["a red triangle"], k=2, steps=2, **kw)
    b = run_attack("unlearndiff", edited, original, "triangle", ["a red triangle"], k=2, steps=2, **kw)
    assert a.records[0]["token_ids"] == b.records[0]["token_ids"] and np.array_equal(a.images, b.images)
    ids = a.records[0]["meta"]["prefix_ids"]
    allowed = set(token_vocabulary(edited.tokenizer, "words", ["triangle"]).tolist())
    assert len(ids) == 2 and set(ids) <= allowed  # projected to valid, allowed tokens
    assert a.records[0]["token_ids"][1:3] == ids
    c = run_attack("unlearndiff", edited, original, "triangle", ["a red triangle"], k=2, steps=2, **{**kw, "seed": 4})
    assert c.records[0]["meta"]["prefix_ids"] != ids


def test_run_is_resumable_and_skips_done_prompts(pipes, tmp_path):
    edited, original = pipes
    kw = {"sampling": FAST, "progress": False, "population": 6, "generations": 1, "length": 3}
    prompts = ["a red triangle", "a blue triangle"]
    first = run_attack("ringabell", edited, original, "triangle", prompts[:1], out_dir=tmp_path, **kw)
    both = run_attack("ringabell", edited, original, "triangle", prompts, out_dir=tmp_path, **kw)
    assert both.cost["resumed_prompts"] == 1
    assert both.records[0] == first.records[0]
    lines = (tmp_path / "ringabell" / "records.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1]
    fresh = run_attack("ringabell", edited, original, "triangle", prompts, **kw)  # same as uninterrupted
    assert [r["adv_prompt"] for r in fresh.records] == [r["adv_prompt"] for r in both.records]
    assert np.array_equal(fresh.images, both.images)
    again = run_attack("ringabell", edited, original, "triangle", prompts, out_dir=tmp_path, **kw)
    assert again.cost["resumed_prompts"] == 2
    with pytest.raises(ValueError, match="other settings"):
        run_attack("ringabell", edited, original, "triangle", prompts, out_dir=tmp_path, **{**kw, "eta": 1.0})


def test_search_cache_shares_edit_independent_outputs_between_edits(pipes, tmp_path, monkeypatch):
    """Ring-A-Bell on a second edit reuses the first edit's searches (same outputs, its own images,
    the search's cost marked from_cache); a white-box attack ignores the cache."""
    import erasekit.attacks.ringabell as rab

    edited, original = pipes
    other = tiny_pipeline(5)
    kw = {"sampling": FAST, "progress": False, "population": 6, "generations": 2, "length": 3}
    prompts = ["a red triangle", "a blue triangle"]
    cache = tmp_path / "cache"
    a = run_attack("ringabell", edited, original, "triangle", prompts, search_cache=cache, **kw)
    assert len(list((cache / "ringabell").glob("*/0000[01].json"))) == 2
    assert not any(r["cost"].get("from_cache") for r in a.records)

    searched = []
    real = rab.RingABellAttack.attack
    monkeypatch.setattr(rab.RingABellAttack, "attack", lambda *a_, **k: searched.append(1) or real(*a_, **k))
    b = run_attack("ringabell", other, original, "triangle", prompts, search_cache=cache, **kw)
    assert searched == []  # no search ran for the second edit
    plain = run_attack("ringabell", other, original, "triangle", prompts, **kw)  # the same without the cache
    assert [r["adv_prompt"] for r in b.records] == [r["adv_prompt"] for r in plain.records]
    assert [r["meta"] for r in b.records] == [r["meta"] for r in plain.records]
    assert np.array_equal(b.images, plain.images) and not np.array_equal(b.images, a.images)  # the other edit's images
    assert all(r["cost"]["from_cache"] for r in b.records)
    assert [r["cost"]["attack"] for r in b.records] == [r["cost"]["attack"] for r in a.records]
    assert len(searched) == 2  # (the uncached run searched)

    # another prompt list, seed or config is another entry; an embedding output round-trips
    c = run_attack("ringabell", other, original, "triangle", prompts[:1], search_cache=cache, **kw)
    assert len(searched) == 3 and not c.records[0]["cost"].get("from_cache")
    cont = {**kw, "discrete": False}
    e1 = run_attack("ringabell", edited, original, "triangle", prompts[:1], search_cache=cache, **cont)
    e2 = run_attack("ringabell", other, original, "triangle", prompts[:1], search_cache=cache, **cont)
    assert e2.records[0]["cost"]["from_cache"]
    torch.testing.assert_close(e2.embeds[0], e1.embeds[0], rtol=0, atol=0)
    assert len(list((cache / "ringabell").iterdir())) == 3

    # a white-box attack reads the edit: never cached
    run_attack(
        "unlearndiff",
        edited,
        original,
        "triangle",
        prompts[:1],
        k=1,
        steps=1,
        search_cache=cache,
        sampling=FAST,
        progress=False,
    )
    assert not (cache / "unlearndiff").exists()


def test_ringabell_does_not_read_the_edited_model(pipes):
    edited, original = pipes
    other = tiny_pipeline(5)  # entirely different weights; only its images would differ
    kw = {"sampling": FAST, "progress": False, "population": 6, "generations": 2, "length": 3}
    a = run_attack("ringabell", edited, original, "triangle", ["a red triangle"], **kw)
    b = run_attack("ringabell", other, original, "triangle", ["a red triangle"], **kw)
    assert a.records[0]["adv_prompt"] == b.records[0]["adv_prompt"]
    assert a.cost["attack"]["unet_calls"] == 0
    pairs = default_pairs("triangle", ["a red triangle"])
    assert pairs == [["a red triangle", "a red"]]
    d = concept_direction(original, pairs)
    e = erasekit.encode_prompts(original, ["a red triangle", "a red"])
    torch.testing.assert_close(d, e[0] - e[1])


def test_paraphrases_avoid_the_concept_word():
    assert rewrite("a red circle on fire", "fire", "burning") == "a burning red circle"
    assert rewrite("a red circle on fire", "fire", "engulfed in flames") == "a red circle engulfed in flames"
    assert rewrite("an orange star", "fire", "ablaze") == "an orange star ablaze"
    assert rewrite("a blue triangle", "triangle", "pyramid") == "a blue pyramid"
    assert rewrite("a photo", "nudity", "naked") == "a photo, naked"
    assert strip_concept("a red circle on fire", "fire") == ("a red circle", True)
    cfg = make_attack_config("paraphrase")
    assert cfg.substitutes is None
    for p in default_prompts("fire", 3):
        assert "fire" in p


def test_paraphrase_attack_and_unknown_concept(pipes):
    edited, original = pipes
    res = run_attack("paraphrase", edited, original, "fire", default_prompts("fire", 2), sampling=FAST, progress=False)
    assert all("fire" not in r["adv_prompt"] for r in res.records)
    with pytest.raises(ValueError, match="substitutes"):
        run_attack("paraphrase", edited, original, "nudity", ["a photo"], sampling=FAST)


def test_run_attacks_reports_asr_and_warns_when_original_cannot_draw_it(pipes, tmp_path):
    edited, original = pipes
    kw = {"prompts": ["a red triangle"], "sampling": FAST, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = run_attacks(
            edited, original, "triangle", ["paraphrase"], detector=StubDetector(True), out_dir=tmp_path, **kw
        )
    assert rep["original_rate"] == 1.0 and rep["pre_attack_rate"] == 1.0
    assert rep["attacks"]["paraphrase"]["asr"] == 1.0
    assert rep["attacks"]["paraphrase"]["adversarial"] == ["a red pyramid"]
    assert set(rep["attacks"]["paraphrase"]["cost"]) >= {"prepare", "attack", "generate"}
    assert (tmp_path / "original" / "none" / "records.jsonl").exists()
    with pytest.warns(UserWarning, match="meaningless"):
        rep = run_attacks(edited, original, "triangle", ["paraphrase"], detector=StubDetector(False), **kw)
    assert rep["attacks"]["paraphrase"]["asr"] == 0.0
    judge = concept_judge(StubDetector(True), "fire")
    assert (judge.head, judge.label) == ("unsafe", 1)
    with pytest.raises(ValueError, match="no class"):
        concept_judge(StubDetector(True), "hexagon")


def test_shapes_attack_protocol(pipes):
    edited, original = pipes
    res = evaluate(
        edited,
        "shapes-attack",
        concept="triangle",
        original=original,
        attacks=["paraphrase"],
        n_prompts=1,
        detector=StubDetector(True),
        sampling=FAST,
        progress=False,
    )
    assert res["protocol"] == "shapes-attack" and res["prompts"] == ["a red triangle"]
    assert res["attacks"]["paraphrase"]["asr"] == 1.0
