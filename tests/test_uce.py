import pytest
import torch

import erasekit
from erasekit.edit import Edit, EraseRequest
from erasekit.methods.uce import uce_closed_form
from erasekit.pipeline import load_pipeline


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
    edit = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="uce", lamb=0.01, progress=False)
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
