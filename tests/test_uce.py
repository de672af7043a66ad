import pytest
import torch

import erasekit
from erasekit.edit import Edit, EraseRequest, get_parameter
from erasekit.methods.uce import (
    UCEConfig,
    aligned_token_embeddings,
    authors_preserve_scale,
    uce_closed_form,
    uce_prompts,
)
from erasekit.pipeline import cross_attention_modules, encode_prompts, last_token_index, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def _objective(w, w_old, ci, ct, cp, se, sp, lam):
    return (
        se * ((ci @ w.T - ct @ w_old.T) ** 2).sum()
        + sp * ((cp @ w.T - cp @ w_old.T) ** 2).sum()
        + lam * ((w - w_old) ** 2).sum()
    )


@pytest.mark.parametrize("se,sp,lam", [(1.0, 1.0, 0.5), (1.0, 0.1, 0.1), (2.0, 0.0, 0.3)])
def test_closed_form_equals_least_squares_minimiser(se, sp, lam):
    g = torch.Generator().manual_seed(0)
    d, out, n, m = 6, 5, 4, 3
    w_old = torch.randn(out, d, generator=g, dtype=torch.float64)
    ci, ct, cp = (torch.randn(k, d, generator=g, dtype=torch.float64) for k in (n, n, m))
    w = uce_closed_form(w_old, ci, ct, cp, erase_scale=se, preserve_scale=sp, lamb=lam)
    # The objective is a stacked least-squares problem in W^T: rows sqrt(s) c -> targets.
    a = torch.cat([se**0.5 * ci, sp**0.5 * cp, lam**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([se**0.5 * ct @ w_old.T, sp**0.5 * cp @ w_old.T, lam**0.5 * w_old.T])
    w_ls = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(w, w_ls, rtol=1e-9, atol=1e-9)
    # and it is a minimum: any perturbation raises the objective
    f = _objective(w, w_old, ci, ct, cp, se, sp, lam)
    for _ in range(5):
        wp = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        assert _objective(wp, w_old, ci, ct, cp, se, sp, lam) > f


def test_uce_changes_only_cross_attention_kv_and_not_the_pipeline(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(tiny_pipe, EraseRequest(["triangle"], preserve=["square"]), method="uce", progress=False)
    assert edit.tensors and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in edit.tensors)
    n_kv = sum(1 for k in before if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)
    assert len(edit.tensors) == n_kv
    for k, v in tiny_pipe.unet.state_dict().items():  # the caller's pipeline is untouched
        assert torch.equal(v, before[k])
    edit.apply_(tiny_pipe)
    changed = {k for k, v in tiny_pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k.removeprefix("unet.") for k in edit.tensors}


def test_uce_maps_erased_keys_towards_target(tiny_pipe):
    from erasekit.methods.uce import aligned_token_embeddings

    c_in, c_t = aligned_token_embeddings(tiny_pipe, ["triangle"], [""])
    # the paper's objective with nothing preserved (the authors preset also keeps "", which pulls back)
    edit = erasekit.erase(
        tiny_pipe, EraseRequest(["triangle"]), method="uce", preset="paper", lamb=0.01, progress=False
    )
    name = next(k for k in edit.tensors if k.endswith("to_k.weight"))
    w_old = erasekit.edit.get_parameter(tiny_pipe, name).detach()
    w_new = edit.tensors[name]
    err_before = (c_in @ w_old.T - c_t @ w_old.T).norm()
    err_after = (c_in @ w_new.T - c_t @ w_old.T).norm()
    assert err_after < 0.2 * err_before


def test_edit_save_load_roundtrip_and_base_check(tiny_pipe_dir, tmp_path):
    pipe = load_pipeline(tiny_pipe_dir)
    edit = erasekit.erase(pipe, EraseRequest(["star"], preserve=["heart"], anchor="circle"), method="uce", lamb=0.2)
    edit.save(tmp_path / "e")
    loaded = Edit.load(tmp_path / "e")
    assert loaded.method == "uce" and loaded.config["lamb"] == 0.2
    assert loaded.request == edit.request and loaded.base == edit.base
    for k in edit.tensors:
        assert torch.equal(loaded.tensors[k], edit.tensors[k])
    loaded.apply_(pipe)
    from erasekit.testing import tiny_pipeline

    other = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="base model"):
        loaded.apply_(other)


def test_uce_is_deterministic(tiny_pipe):
    r = EraseRequest(["triangle"], preserve=["square", "circle"])
    a = erasekit.erase(tiny_pipe, r, method="uce")
    b = erasekit.erase(tiny_pipe, r, method="uce")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"erase": []}, "erase"), ({"erase": ["a"], "preserve": ["a"]}, "both erased and preserved")],
)
def test_request_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EraseRequest(**kwargs)


def test_unknown_option_is_named(tiny_pipe):
    with pytest.raises(ValueError, match="lambda"):
        erasekit.erase(tiny_pipe, EraseRequest(["x"]), method="uce", lambda_=1)


# ---------------------------------------------------------------- issue 12: the authors' options


def _official_uce_layer(pipe, w, erase_pairs, retain, lamb, erase_scale, preserve_scale):
    """One layer of UCE's paper-era ``edit_model`` (train_erase.py) written out by hand: mat1 = lamb W +
    sum v k^T, mat2 = lamb I + sum k k^T over the sliced erase pairs and the retained texts at all 77
    positions, W_new = mat1 mat2^-1 (float64 here so the comparison is tight)."""
    w = w.double()
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
    for old, new in erase_pairs:
        emb = encode_prompts(pipe, [old, new]).double()
        i_old, i_new = last_token_index(pipe, [old, new])
        far = max(i_old, i_new)
        k = emb[0, i_old : 77 - max(0, far - i_old)]
        v = emb[1, i_new : 77 - max(0, far - i_new)] @ w.T
        mat1 += erase_scale * v.T @ k
        mat2 += erase_scale * k.T @ k
    for text in retain:
        k = encode_prompts(pipe, [text]).double()[0]
        mat1 += preserve_scale * (k @ w.T).T @ k
        mat2 += preserve_scale * k.T @ k
    return mat1 @ torch.linalg.inv(mat2)


def test_authors_preset_equals_the_official_edit_model(tiny_pipe):
    """The default (authors) UCE: '' always retained, retained texts at all 77 positions, lambda 0.5,
    preserve scale max(0.1, 1/#retained) = 0.5 for ['', 'square'] -- against the hand-written formula."""
    req = EraseRequest(["triangle", "star"], preserve=["square"])
    edit = erasekit.erase(tiny_pipe, req, method="uce", progress=False)
    assert edit.config["preset"] == "authors" and edit.trace["preserve_scale"] == 0.5
    assert edit.trace["preserve_prompts"] == ["", "square"]
    mod = next(iter(cross_attention_modules(tiny_pipe.unet)))
    for proj in ("to_k", "to_v"):
        name = f"unet.{mod}.{proj}.weight"
        ref = _official_uce_layer(
            tiny_pipe,
            get_parameter(tiny_pipe, name).detach(),
            [("triangle", ""), ("star", "")],
            ["", "square"],
            lamb=0.5,
            erase_scale=1.0,
            preserve_scale=0.5,
        )
        torch.testing.assert_close(edit.tensors[name].double(), ref, rtol=1e-6, atol=1e-6)


def test_authors_preserve_scale_rule():
    assert [authors_preserve_scale(n) for n in (1, 2, 4, 10, 30)] == [1.0, 0.5, 0.25, 0.1, 0.1]
    assert UCEConfig(preserve_scale=0.3).resolved_preserve_scale(1) == 0.3
    assert UCEConfig().resolved_preserve_scale(1) == 1.0


def test_empty_prompt_can_be_preserved_by_request_or_option(tiny_pipe):
    """A "" in the request's preserve list is kept (edit.py no longer drops it) and never template-expanded;
    `preserve_empty` adds it once. Either way the edit is the same."""
    r = EraseRequest(["triangle"], preserve=["", " ", "square", "square"])
    assert r.preserve == ["", "square"]
    cfg = UCEConfig(preserve_empty=False, templates=["{}", "a {}"])
    assert uce_prompts(r, cfg)[2] == ["", "square", "a square"]
    assert uce_prompts(EraseRequest(["triangle"], preserve=["square"]), UCEConfig(templates=["{}", "a {}"]))[2] == [
        "",
        "square",
        "a square",
    ]
    by_request = erasekit.erase(
        tiny_pipe, EraseRequest(["triangle"], preserve=[""]), method="uce", preserve_empty=False
    )
    by_option = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="uce")
    paper = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="uce", preset="paper")
    for k in by_option.tensors:
        torch.testing.assert_close(by_request.tensors[k], by_option.tensors[k], rtol=0, atol=0)
    assert any(not torch.allclose(paper.tensors[k], by_option.tensors[k]) for k in paper.tensors)


def test_token_positions(tiny_pipe):
    """`all` pairs the 77 positions i with i; `from_last_word` starts each at its last word (and for "" the
    two are the same rows: its last word token is the start token)."""
    emb = encode_prompts(tiny_pipe, ["a red triangle", ""]).float()
    s, t = aligned_token_embeddings(tiny_pipe, ["a red triangle"], [""], positions="all")
    assert s.shape == t.shape == (77, emb.shape[-1])
    torch.testing.assert_close(s, emb[0])
    torch.testing.assert_close(t, emb[1])
    s, t = aligned_token_embeddings(tiny_pipe, ["a red triangle"], [""])
    k = last_token_index(tiny_pipe, ["a red triangle"])[0]
    assert k == 3 and s.shape[0] == 77 - k
    torch.testing.assert_close(s, emb[0, k:])
    torch.testing.assert_close(t, emb[1, : 77 - k])
    e_all, _ = aligned_token_embeddings(tiny_pipe, [""], [""], positions="all")
    e_slice, _ = aligned_token_embeddings(tiny_pipe, [""], [""])
    torch.testing.assert_close(e_all, e_slice)
    with pytest.raises(ValueError, match="positions"):
        aligned_token_embeddings(tiny_pipe, ["a"], ["b"], positions="last")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"erase_positions": "first"}, "erase_positions"),
        ({"preserve_positions": "x"}, "preserve_positions"),
        ({"preserve_scale": -1.0}, "preserve_scale"),
    ],
)
def test_bad_uce_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UCEConfig(**kwargs)
