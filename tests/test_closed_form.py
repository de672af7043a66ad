import pytest
import torch

from erasekit.methods.closed_form import (
    aligned_embeddings,
    apply_factor,
    cross_gram,
    encode_unique,
    fusion_closed_form,
    kmeans,
    kv_gram,
    nullspace_basis,
    shared_closed_form_edit,
    shared_derivation_matrix,
    speed_factor,
    uce_factor,
    uce_factor_lowrank,
)
from erasekit.methods.rece import derivation_matrix, kv_weights
from erasekit.methods.uce import UCEConfig, aligned_token_embeddings, closed_form_edit, uce_closed_form
from erasekit.pipeline import encode_prompts


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("se,sp,lam", [(1.0, 1.0, 0.5), (1.0, 0.1, 0.1), (2.0, 0.0, 0.3), (1.0, 1.0, 0.0)])
def test_uce_factor_times_w_equals_per_layer_solve(se, sp, lam):
    d, n, m = 7, 9, 4  # n > d: with lam = 0 the system is still non-singular
    ci, ct, cp = _rand(n, d, seed=1), _rand(n, d, seed=2), _rand(m, d, seed=3)
    m_ = uce_factor(ci, ct, cp, erase_scale=se, preserve_scale=sp, lamb=lam, gram_dtype=torch.float64)
    for out in (3, 11):
        w = _rand(out, d, seed=out)
        ref = uce_closed_form(w, ci, ct, cp, erase_scale=se, preserve_scale=sp, lamb=lam)
        torch.testing.assert_close(w @ m_, ref, rtol=1e-9, atol=1e-9)


def test_uce_lowrank_factor_equals_the_full_factor():
    d, n = 12, 3
    ci, ct, cp = _rand(n, d, seed=1), _rand(n, d, seed=2), _rand(4, d, seed=3)
    for lam in (0.5, 0.0):
        kw = dict(erase_scale=1.5, preserve_scale=0.7, lamb=lam)
        if lam == 0.0:
            cp = _rand(20, d, seed=4)  # R must be invertible without the ridge
        a, b = uce_factor_lowrank(ci, ct, cp, **kw)
        full = uce_factor(ci, ct, cp, **kw)
        torch.testing.assert_close(torch.eye(d, dtype=torch.float64) + a @ b, full, rtol=1e-9, atol=1e-9)


def test_shared_factor_edit_equals_todays_per_layer_edit_for_every_projection(tiny_pipe, one_thread):
    erased, targets, preserved = ["triangle", "a star"], ["", ""], ["square", "a red ring"]
    c_in, c_t = aligned_token_embeddings(tiny_pipe, erased, targets)
    c_p, _ = aligned_token_embeddings(tiny_pipe, preserved, preserved)
    for cfg in (
        UCEConfig(preserve_scale=1.0),
        UCEConfig(erase_scale=2.0, preserve_scale=0.3, lamb=0.1, projections=("to_v",)),
    ):
        today = closed_form_edit(tiny_pipe, c_in, c_t, c_p, cfg)
        shared = shared_closed_form_edit(tiny_pipe, c_in, c_t, c_p, cfg)
        assert today.keys() == shared.keys() and len(today) == 7 * len(cfg.projections)
        for k in today:
            torch.testing.assert_close(shared[k], today[k], rtol=1e-5, atol=1e-6)
    # few erased rows (< d/2): the low-rank path W + (W A) B
    today = closed_form_edit(tiny_pipe, c_in[:5], c_t[:5], c_p, UCEConfig(preserve_scale=1.0))
    shared = shared_closed_form_edit(tiny_pipe, c_in[:5], c_t[:5], c_p, UCEConfig(preserve_scale=1.0))
    for k in today:
        torch.testing.assert_close(shared[k], today[k], rtol=1e-5, atol=1e-6)
    # RECE's running copy: a weight taken from `weights` instead of the pipeline
    running = {k: v + 0.01 for k, v in kv_weights(tiny_pipe.unet).items()}
    today = closed_form_edit(tiny_pipe, c_in, c_t, c_p, UCEConfig(preserve_scale=1.0), weights=running)
    shared = shared_closed_form_edit(tiny_pipe, c_in, c_t, c_p, UCEConfig(preserve_scale=1.0), weights=running)
    for k in today:
        torch.testing.assert_close(shared[k], today[k], rtol=1e-5, atol=1e-6)


def test_encode_unique_and_aligned_embeddings_match_the_plain_encoders(tiny_pipe):
    prompts = ["a cat", "", "a cat", "a red square", ""]
    torch.testing.assert_close(
        encode_unique(tiny_pipe, prompts, batch_size=2), encode_prompts(tiny_pipe, prompts), rtol=1e-5, atol=1e-5
    )
    src, tgt = ["triangle", "a big star", "triangle"], ["", "a shape", ""]
    a = aligned_embeddings(tiny_pipe, src, tgt, batch_size=2)
    b = aligned_token_embeddings(tiny_pipe, src, tgt)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        encode_unique(tiny_pipe, ["a"], batch_size=0)


def test_apply_factor_additive():
    w, m = {"a": _rand(3, 4)}, _rand(4, 4, seed=1)
    torch.testing.assert_close(apply_factor(w, m)["a"], w["a"] @ m)
    torch.testing.assert_close(apply_factor(w, m, additive=True)["a"], w["a"] + w["a"] @ m)
    with pytest.raises(ValueError, match="reads 4-d"):
        apply_factor(w, _rand(5, 5))


def _null_basis(retain: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the orthogonal complement of the rows of ``retain`` (SVD, by hand)."""
    _, s, vh = torch.linalg.svd(retain, full_matrices=True)
    r = int((s > 1e-10).sum())
    return vh[r:].T  # (d, d - r)


@pytest.mark.parametrize("with_iec", [False, True])
def test_speed_factor_equals_constrained_least_squares_oracle(with_iec):
    d, out, n, m, r = 8, 5, 2, 3, 0.7
    w = _rand(out, d)
    c1, cs = _rand(n, d, seed=1), _rand(n, d, seed=2)
    k0 = _rand(m, d, seed=3)
    k2 = _rand(2, d, seed=4) if with_iec else None
    u0 = nullspace_basis(k0.T @ k0, threshold=1e-8)
    assert u0.shape == (d, d - m)
    nmat = speed_factor(c1.T @ c1, cs.T @ c1, u0, retain_scale=r, invariants=k2)
    delta = w @ nmat
    # Oracle: Delta = Z V^T with V an orthonormal basis of {v : k0 v = 0 (and k2 v = 0)}; then
    # ||(W + Delta) c_i - W c_i*||^2 + r ||Delta||^2 is ordinary least squares in Z^T.
    v = _null_basis(k0 if k2 is None else torch.cat([k0, k2]))
    a = torch.cat([c1 @ v, r**0.5 * torch.eye(v.shape[1], dtype=torch.float64)])
    b = torch.cat([(cs - c1) @ w.T, torch.zeros(v.shape[1], out, dtype=torch.float64)])
    z = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(delta, z @ v.T, rtol=1e-8, atol=1e-9)
    # retained keys (and invariants) give the same outputs; erased keys move towards their targets
    torch.testing.assert_close(k0 @ (w + delta).T, k0 @ w.T, rtol=0, atol=1e-10)
    if k2 is not None:
        torch.testing.assert_close(k2 @ (w + delta).T, k2 @ w.T, rtol=0, atol=1e-10)


def test_speed_factor_maps_erased_keys_to_targets_when_the_null_space_holds_them():
    d, out = 10, 6
    w, c1, cs, k0 = _rand(out, d), _rand(3, d, seed=1), _rand(3, d, seed=2), _rand(4, d, seed=3)
    u0 = nullspace_basis(k0.T @ k0, threshold=1e-8)
    errs = []
    for r in (1.0, 1e-3, 1e-9):  # the ridge r biases the fit; as r -> 0 the erased keys hit their targets
        w_new = w + w @ speed_factor(c1.T @ c1, cs.T @ c1, u0, retain_scale=r)
        errs.append(float((c1 @ w_new.T - cs @ w.T).norm() / (cs @ w.T).norm()))
        torch.testing.assert_close(k0 @ w_new.T, k0 @ w.T, rtol=0, atol=1e-9)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


def test_nullspace_basis_dimension_and_errors():
    k0 = _rand(3, 6)
    u0 = nullspace_basis(k0.T @ k0, threshold=1e-6)
    assert u0.shape == (6, 3)
    torch.testing.assert_close(u0.T @ u0, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(k0 @ u0, torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert nullspace_basis(torch.zeros(6, 6, dtype=torch.float64), threshold=1e-6).shape == (6, 6)
    with pytest.raises(ValueError, match="threshold"):
        nullspace_basis(k0.T @ k0, threshold=0)


def test_speed_factor_equals_the_authors_projector_form():
    # Delta = W R P (I - M K2 (K2^T P M K2)^-1 K2^T P) M with M = (S_tt P + r I)^-1 (EraseEval's port)
    d, r = 9, 0.5
    c1, cs, k0, k2 = _rand(3, d, seed=1), _rand(3, d, seed=2), _rand(4, d, seed=3), _rand(2, d, seed=4)
    u0 = nullspace_basis(k0.T @ k0, threshold=1e-8)
    p, eye = u0 @ u0.T, torch.eye(d, dtype=torch.float64)
    s_tt, s_at = c1.T @ c1, cs.T @ c1
    m = torch.linalg.inv(s_tt @ p + r * eye)
    ref = (s_at - s_tt) @ p @ (eye - m @ k2.T @ torch.linalg.inv(k2 @ p @ m @ k2.T) @ k2 @ p) @ m
    torch.testing.assert_close(speed_factor(s_tt, s_at, u0, retain_scale=r, invariants=k2), ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(
        speed_factor(s_tt, s_at, u0, retain_scale=r), (s_at - s_tt) @ p @ m, rtol=1e-8, atol=1e-9
    )


def test_fusion_closed_form_equals_lstsq_solution():
    d, out, lam, sp = 6, 4, 0.8, 0.3
    w0 = _rand(out, d)
    tuned = [(_rand(out, d, seed=10 + i), _rand(5 + i, d, seed=20 + i)) for i in range(3)]
    cp = _rand(2, d, seed=30)
    w = fusion_closed_form(w0, tuned, lamb=lam, preserve=cp, preserve_scale=sp)
    # min_W sum_i ||C_i W^T - C_i W_i^T||^2 + lam ||W - W0||^2 + sp ||Cp W^T - Cp W0^T||^2, stacked in W^T
    a = torch.cat([c for _, c in tuned] + [lam**0.5 * torch.eye(d, dtype=torch.float64), sp**0.5 * cp])
    b = torch.cat([c @ wi.T for wi, c in tuned] + [lam**0.5 * w0.T, sp**0.5 * cp @ w0.T])
    torch.testing.assert_close(w, torch.linalg.lstsq(a, b).solution.T, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        fusion_closed_form(w0, [(_rand(out + 1, d), _rand(2, d))], lamb=lam)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([c + 0.1 * _rand(20, 2, seed=i) for i, c in enumerate(centres)])
    found = kmeans(x, 3)
    dist = torch.cdist(found, centres).min(1).values
    assert (dist < 0.2).all()
    with pytest.raises(ValueError, match="`k`"):
        kmeans(x, 0)


def test_shared_derivation_matrix_equals_rece_eq8():
    d = 6
    ws = {f"w{i}": _rand(3 + i, d, seed=i) for i in range(4)}
    m = torch.eye(d, dtype=torch.float64) + 0.3 * _rand(d, d, seed=9)
    for lam in (0.1, 1e-3):
        ref = derivation_matrix(list(ws.values()), [w @ m for w in ws.values()], lam)
        torch.testing.assert_close(shared_derivation_matrix(kv_gram(ws), m, lam), ref, rtol=1e-8, atol=1e-10)


def test_cross_gram_with_repeated_targets():
    x = _rand(12, 5)
    t = _rand(3, 5, seed=1)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])]
    torch.testing.assert_close(cross_gram(t, x), t.T @ x)
    t2 = _rand(12, 5, seed=2)  # all distinct: the plain product
    torch.testing.assert_close(cross_gram(t2, x), t2.T @ x)
