import dataclasses
from dataclasses import asdict

import numpy as np
import pytest
import torch

import erasekit
from erasekit.analysis.rece_images import derived_embedding_images
from erasekit.edit import Edit, EraseRequest, get_parameter
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.methods.base import make_config, preset_diff
from erasekit.methods.rece import (
    DERIVED_KEY,
    RECE_PRESETS,
    RECEConfig,
    derivation_matrix,
    derive_embedding,
    derived_prompt_embeds,
    kv_parameter_names,
    kv_weights,
    rece_checkpoint,
    select_epoch,
)
from erasekit.methods.uce import UCEConfig, aligned_token_embeddings, uce_closed_form
from erasekit.options import config_from_record, parse_overrides
from erasekit.pipeline import encode_prompts, last_token_index, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def _eq7(w_old, w_new, c, cp, lam):
    return sum(((wn @ cp - wo @ c) ** 2).sum() for wo, wn in zip(w_old, w_new, strict=True)) + lam * (cp**2).sum()


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_eq8_equals_least_squares_minimiser_of_eq7(lam):
    g = torch.Generator().manual_seed(0)
    d, outs = 5, (4, 6, 3)  # some W_i are wide (out < d): only the sum makes eq. 5 solvable
    w_old = [torch.randn(o, d, generator=g, dtype=torch.float64) for o in outs]
    w_new = [w + 0.5 * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in w_old]
    c = torch.randn(d, generator=g, dtype=torch.float64)
    cp = derive_embedding(w_old, w_new, c, lam)
    # eq. 7 is one stacked least-squares problem: [W_new_1; ...; sqrt(lam) I] c' ~ [W_old_1 c; ...; 0]
    a = torch.cat([*w_new, lam**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([*(wo @ c for wo in w_old), torch.zeros(d, dtype=torch.float64)])
    ref = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    torch.testing.assert_close(cp, ref, rtol=1e-9, atol=1e-10)
    f = _eq7(w_old, w_new, c, cp, lam)
    for _ in range(5):  # and it is a minimum
        assert _eq7(w_old, w_new, c, cp + 1e-3 * torch.randn(d, generator=g, dtype=torch.float64), lam) > f
    # rows are mapped independently: a (2, 3, d) batch equals the per-vector solution
    batch = torch.stack([torch.stack([c, 2 * c, -c])] * 2)
    out = derive_embedding(w_old, w_new, batch, lam)
    torch.testing.assert_close(out[1, 1], 2 * cp, rtol=1e-9, atol=1e-10)


def test_eq8_without_edit_and_regulariser_is_identity():
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    c = torch.randn(3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(derive_embedding(w, w, c, 0.0), c)


def test_rece_changes_only_cross_attention_kv_and_not_the_pipeline(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(
        tiny_pipe, EraseRequest(["triangle"], preserve=["square"]), method="rece", epochs=2, progress=False
    )
    assert sorted(edit.tensors) == sorted(kv_parameter_names(tiny_pipe.unet))
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, before[k])
    edit.apply_(tiny_pipe)
    changed = {k for k, v in tiny_pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k.removeprefix("unet.") for k in edit.tensors}
    assert edit.aux[DERIVED_KEY].shape == (3, 1, 77, 32)  # epochs + 1 derivations, 1 prompt


def _residual(pipe, w_new: dict, c_new, c):
    num = den = 0.0
    for name, wn in w_new.items():
        wo = get_parameter(pipe, name).detach().double()
        ref = c.double() @ wo.T
        num += float(((c_new.double() @ wn.double().T - ref) ** 2).sum())
        den += float((ref**2).sum())
    return num / den


def test_derived_embedding_regenerates_concept_kv_better_than_the_concept(tiny_pipe):
    req = EraseRequest(["triangle"])
    paper = dict(method="rece", preset="paper", epochs=2, progress=False)  # erases UCE's from-last-word slice
    uce = rece_checkpoint(tiny_pipe, erasekit.erase(tiny_pipe, req, **paper), 0)
    w_orig = {k: get_parameter(tiny_pipe, k).detach() for k in uce.tensors}
    c, _ = aligned_token_embeddings(tiny_pipe, ["triangle"], [""])
    c_der = derive_embedding([w_orig[k] for k in uce.tensors], list(uce.tensors.values()), c, 0.1)
    raw = _residual(tiny_pipe, uce.tensors, c, c)  # the concept itself in the UCE model
    der = _residual(tiny_pipe, uce.tensors, c_der, c)  # the derived embedding in the UCE model
    assert raw > 0.01  # UCE did move the concept's keys/values
    assert der < 0.5 * raw
    # RECE then erases c'_0: in the final model it no longer reproduces the original K/V
    rece = erasekit.erase(tiny_pipe, req, **paper)
    c0 = rece.aux[DERIVED_KEY][0, 0]  # (77, D), all positions; compare on the erased slice
    start = last_token_index(tiny_pipe, ["triangle"])[0]
    torch.testing.assert_close(c0[start:], c_der, rtol=1e-4, atol=1e-5)
    assert _residual(tiny_pipe, rece.tensors, c_der, c) > 2 * der
    log = rece.trace["epochs_log"]
    assert log[0]["residual_derived"] == pytest.approx(der, rel=1e-4)


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_epoch_zero_checkpoint_is_uce_and_last_checkpoint_is_the_edit(tiny_pipe, preset):
    """Epoch 0 is the UCE step: with the paper preset UCE at lambda_1 = lambda_2 = 0.1 (paper preset of UCE),
    with the authors preset UCE's own authors preset (lambda 0.5, '' kept, scale max(0.1, 1/#retained))."""
    req = EraseRequest(["star"], preserve=["heart"])
    edit = erasekit.erase(tiny_pipe, req, method="rece", preset=preset, epochs=2, progress=False)
    uce_kw = {"preserve_scale": 0.1, "lamb": 0.1} if preset == "paper" else {}
    uce = erasekit.erase(tiny_pipe, req, method="uce", preset=preset, progress=False, **uce_kw)
    ck0 = rece_checkpoint(tiny_pipe, edit, 0)
    for k in uce.tensors:
        torch.testing.assert_close(ck0.tensors[k], uce.tensors[k], rtol=0, atol=0)
    ck2 = rece_checkpoint(tiny_pipe, edit, 2)
    for k in edit.tensors:
        assert torch.equal(ck2.tensors[k], edit.tensors[k])
    with pytest.raises(ValueError, match="epoch"):
        rece_checkpoint(tiny_pipe, edit, 3)


def test_rece_is_deterministic(tiny_pipe):
    r = EraseRequest(["triangle", "circle"], preserve=["square"])
    a = erasekit.erase(tiny_pipe, r, method="rece", epochs=2, progress=False)
    b = erasekit.erase(tiny_pipe, r, method="rece", epochs=2, progress=False)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert torch.equal(a.aux[DERIVED_KEY], b.aux[DERIVED_KEY])


def test_save_load_roundtrip_and_generation_from_derived_embeddings(tiny_pipe_dir, tmp_path):
    pipe = load_pipeline(tiny_pipe_dir)
    edit = erasekit.erase(pipe, EraseRequest(["star"], anchor="circle"), method="rece", epochs=1, lamb_derive=1e-3)
    edit.save(tmp_path / "e")
    loaded = Edit.load(tmp_path / "e")
    assert loaded.method == "rece" and loaded.config["lamb_derive"] == 1e-3 and loaded.config["epochs"] == 1
    assert all(torch.equal(loaded.tensors[k], edit.tensors[k]) for k in edit.tensors)
    assert torch.equal(loaded.aux[DERIVED_KEY], edit.aux[DERIVED_KEY])
    assert set(loaded.tensors) == set(edit.tensors)  # the derived embeddings are not parameters
    emb = derived_prompt_embeds(pipe, loaded, epoch=1, concept="star")
    assert emb.shape == (1, 77, 32)
    loaded.apply_(pipe)
    imgs = generate_images(pipe, None, [0, 1], SamplingConfig(steps=2), prompt_embeds=emb.expand(2, -1, -1))
    assert imgs.shape == (2, 32, 32, 3)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": -2}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"lamb_derive": -1.0}, "lamb_derive"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        RECEConfig(**overrides)


def test_bad_derived_requests(tiny_pipe):
    uce = erasekit.erase(tiny_pipe, EraseRequest(["star"]), method="uce", progress=False)
    with pytest.raises(ValueError, match="rece"):
        derived_prompt_embeds(tiny_pipe, uce, 0)
    edit = erasekit.erase(tiny_pipe, EraseRequest(["star"]), method="rece", epochs=1, progress=False)
    with pytest.raises(ValueError, match="epoch"):
        derived_prompt_embeds(tiny_pipe, edit, 2)
    with pytest.raises(ValueError, match="concept"):
        derived_prompt_embeds(tiny_pipe, edit, 0, concept="moon")
    with pytest.raises(ValueError, match="equal length"):
        derive_embedding([torch.eye(3)], [], torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="embedding size"):
        derive_embedding([torch.eye(3)], [torch.eye(3)], torch.ones(4), 0.1)


def test_derived_embedding_images_restore_the_pipeline(tiny_pipe):
    edit = erasekit.erase(tiny_pipe, EraseRequest(["star"]), method="rece", epochs=1, progress=False)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    imgs = derived_embedding_images(tiny_pipe, edit, [0, 1], SamplingConfig(steps=1))
    assert imgs.shape == (2, 2, 32, 32, 3) and imgs.dtype.name == "uint8"
    final = derived_embedding_images(tiny_pipe, edit, [0, 1], SamplingConfig(steps=1), model="final")
    assert np.array_equal(final[-1], imgs[-1])  # the probe epoch is rendered by the final model either way
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    edit.apply_(tiny_pipe)
    with pytest.raises(ValueError, match="unedited base pipeline"):
        derived_embedding_images(tiny_pipe, edit, [0], SamplingConfig(steps=1))


# ---------------------------------------------------------------- issue 12: the authors' options


def test_authors_epoch_erases_all_77_derived_positions_unshifted_and_keeps_empty(tiny_pipe):
    """One authors epoch by hand: c' = M c on all 77 positions of the erased prompt (eq. 8, M from the UCE
    checkpoint), paired i with i with the target's 77 positions, '' preserved at all 77 positions at scale
    0.1, lambda 0.1, W_old = the UCE checkpoint's weights (eq. 3 via uce_closed_form)."""
    req = EraseRequest(["triangle"], anchor="circle")
    edit = erasekit.erase(tiny_pipe, req, method="rece", epochs=1, progress=False)
    assert edit.trace["preserve_prompts"] == {"uce": [""], "epochs": [""]} and edit.trace["uce_preserve_scale"] == 1.0
    ck0 = rece_checkpoint(tiny_pipe, edit, 0)
    w_orig = kv_weights(tiny_pipe.unet)
    names = list(w_orig)
    m = derivation_matrix([w_orig[k] for k in names], [ck0.tensors[k] for k in names], 0.1)
    emb = encode_prompts(tiny_pipe, ["triangle", "circle", ""]).double()
    c_der = emb[0] @ m.T  # (77, D)
    torch.testing.assert_close(edit.aux[DERIVED_KEY][0, 0].double(), c_der, rtol=1e-5, atol=1e-5)
    for k in names:
        ref = uce_closed_form(
            ck0.tensors[k].double(), c_der, emb[1], emb[2], erase_scale=1.0, preserve_scale=0.1, lamb=0.1
        )
        torch.testing.assert_close(edit.tensors[k].double(), ref, rtol=1e-5, atol=1e-6)


def test_select_epoch_keeps_the_best_validation_score_earliest_on_ties(tiny_pipe):
    edit = erasekit.erase(tiny_pipe, EraseRequest(["star"]), method="rece", epochs=3, progress=False)
    table = {0: 0.2, 1: 0.9, 2: 0.9, 3: 0.5}
    seen = []

    def score(ck):
        seen.append(ck.config["epochs"])
        return table[ck.config["epochs"]]

    best, scores = select_epoch(tiny_pipe, edit, score)
    assert seen == [0, 1, 2, 3] and scores == [0.2, 0.9, 0.9, 0.5]
    assert best.trace["selected_epoch"] == 1 and best.trace["validation_scores"] == scores
    ref = rece_checkpoint(tiny_pipe, edit, 1)
    assert all(torch.equal(best.tensors[k], ref.tensors[k]) for k in ref.tensors)
    with pytest.raises(ValueError, match="rece"):
        select_epoch(tiny_pipe, erasekit.erase(tiny_pipe, EraseRequest(["star"]), method="uce"), score)


def test_task_presets_are_registered_and_the_table_stays_usable():
    assert make_config("rece").uce.lamb == 0.5 and make_config("rece", "paper").uce.lamb == 0.1
    for task, values in RECE_PRESETS.items():
        cfg = make_config("rece", f"authors-{task}")
        assert all(getattr(cfg, k) == v for k, v in values.items())
        assert cfg.uce.lamb == 0.5 and cfg.derived_positions == "all"  # on top of the authors preset
        assert RECEConfig(**values).epochs == values["epochs"]
    assert preset_diff("rece", "authors-object") == {"epochs": 5, "lamb_derive": 1e-3}
    assert set(preset_diff("rece", "paper")) == {
        "uce.lamb",
        "uce.preserve_scale",
        "uce.preserve_empty",
        "preserve_empty",
        "derived_positions",
        "preserve_positions",
    }


def test_the_uce_step_is_a_uce_config():
    """RECE holds the UCE step's config (issue 14): dotted overrides, nested dicts, whole configs and
    --set text say the same; the shared settings are RECE's own; old edits' flat names still load."""
    a = make_config("rece", **{"uce.lamb": 0.2, "uce.preserve_empty": False})
    b = make_config("rece", uce={"lamb": 0.2, "preserve_empty": False})
    c = make_config("rece", uce=UCEConfig(lamb=0.2, preserve_empty=False))
    d = make_config("rece", **parse_overrides(RECEConfig, ["uce.lamb=0.2", "uce.preserve_empty=false"]))
    assert a == b == c == d and a.uce.lamb == 0.2 and a.lamb == 0.1  # the epochs' lambda is apart
    # the shared settings: RECE's own, copied into the UCE step; another value set in `uce` is refused
    cfg = make_config("rece", templates=["{}", "a {}"], erase_scale=2.0)
    assert cfg.uce.templates == ["{}", "a {}"] and cfg.uce_config().erase_scale == 2.0
    assert cfg.epoch_config().templates == ["{}", "a {}"] and cfg.epoch_config().lamb == cfg.lamb
    with pytest.raises(ValueError, match=r"uce.templates.*Set `templates`"):
        make_config("rece", **{"uce.templates": ["a {}"]})
    # the old flat names: a clear error naming the new spelling; a saved record still reads
    with pytest.raises(ValueError, match=r"`uce_lamb` is now `uce.lamb`"):
        make_config("rece", uce_lamb=0.2)
    with pytest.raises(ValueError, match=r"it is now `uce.lamb`"):
        parse_overrides(RECEConfig, ["uce_lamb=0.2"])
    with pytest.raises(ValueError, match=r"unknown option.*uce.lamb"):
        parse_overrides(RECEConfig, ["uce.lamm=0.2"])
    old = {**asdict(make_config("rece")), "preset": "authors"}
    old.pop("uce")
    old.update(uce_lamb=0.2, uce_preserve_scale=0.3, uce_preserve_empty=False)
    back = config_from_record(RECEConfig, old)
    assert back.uce.lamb == 0.2 and back.uce.preserve_scale == 0.3 and back.uce.preserve_empty is False
    assert config_from_record(RECEConfig, asdict(a)) == a  # the new record round-trips


def test_old_flat_rece_edit_checkpoints_again(tiny_pipe):
    """An edit saved with the flat ``uce_*`` names (before the UCE step was a UCE config): its epoch
    checkpoints are recomputed with its own UCE-step settings."""
    req = EraseRequest(["triangle"], preserve=["circle"])
    edit = erasekit.erase(tiny_pipe, req, method="rece", preset="paper", epochs=2, progress=False)
    flat = {k: v for k, v in edit.config.items() if k != "uce"}
    flat.update(uce_lamb=0.1, uce_preserve_scale=0.1, uce_preserve_empty=False)
    old = dataclasses.replace(edit, config=flat)
    for epoch in (0, 1):
        mine, want = rece_checkpoint(tiny_pipe, old, epoch), rece_checkpoint(tiny_pipe, edit, epoch)
        assert all(torch.equal(mine.tensors[k], want.tensors[k]) for k in edit.tensors)


@pytest.mark.parametrize(
    "overrides,match",
    [({"derived_positions": "last"}, "derived_positions"), ({"uce": {"lamb": -1.0}}, "lamb")],
)
def test_bad_authors_options(overrides, match):
    with pytest.raises(ValueError, match=match):
        RECEConfig(**overrides)
