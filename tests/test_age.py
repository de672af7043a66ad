import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods import ap
from erasekit.methods.age import AGE_AUTHORS, AGE_PAPER, AGEConfig, AGELoss, age_objective, age_target
from erasekit.methods.ap import chosen_concepts
from erasekit.methods.base import make_config

FAST = dict(steps=2, ddim_steps=2, lr=1e-3, vocabulary="shapes", k=6, search_lr=1e-2)
REQ = EraseRequest(["triangle", "square"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def test_age_objective_by_hand():
    e_e, o_t, e_t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.0])
    total, l1, l2 = age_objective(e_e, o_t, e_t, 2.0)
    assert l1.item() == pytest.approx((1 + 1) / 2) and l2.item() == pytest.approx((0.25 + 1) / 2)
    assert total.item() == pytest.approx(1.0 + 2.0 * 0.625)


def _ctx_and_batch(pipe):
    ctx = FinetuneContext(pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.2)
    g = step_generator(0, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([401])
    return ctx, StepBatch(0, ["square"], z, t, ctx.embed(["square"]), g)


def test_age_ascends_eq14_and_descends_on_the_chosen_target(tiny_pipe, monkeypatch):
    """The paper preset: the search ascends eq. 14 (L1 + lambda L2, exact gradient, one z_t)."""
    cfg = make_config("age", "paper", **{**FAST, "lam": 0.3})
    ctx, batch = _ctx_and_batch(tiny_pipe)
    loss_fn = AGELoss(REQ, cfg)
    loss_fn.setup(ctx)
    seen = {}
    ascend = ap.GumbelSearch.ascend

    def spy(self, objective, rows, generator):
        seen["objective"] = objective
        return ascend(self, objective, rows, generator)

    monkeypatch.setattr(ap.GumbelSearch, "ascend", spy)
    out = loss_fn.step(ctx, batch)
    z, t, c_e = batch.z_t, batch.t, batch.cond_e
    c = ctx.embed(["circle"])  # any conditioning: the ascent objective is eq. 14 of it
    with torch.no_grad():
        orig = tiny_pipe.unet
        want = F.mse_loss(ctx.unet(z, t, c_e).sample, orig(z, t, c).sample) + 0.3 * F.mse_loss(
            ctx.unet(z, t, c).sample, orig(z, t, c).sample
        )
        torch.testing.assert_close(seen["objective"](c), want, rtol=1e-5, atol=1e-9)
    # the top-5 mixture target, logged with its weights
    (rec,) = out.record["targets"]
    assert rec["erase"] == "square" and len(rec["weights"]) == 5
    assert sum(w for _, w in rec["weights"]) == pytest.approx(1.0, abs=1e-3)
    assert {n for n, _ in rec["weights"]} <= {n for n, _ in loss_fn.trace()["search_space"]["square"]}


def test_age_descent_loss_by_hand(tiny_pipe):
    cfg = make_config("age", "paper", **{**FAST, "n_iter": 0, "relaxation": "hard", "lam": 0.3})
    ctx, batch = _ctx_and_batch(tiny_pipe)
    loss_fn = AGELoss(REQ, cfg)
    loss_fn.setup(ctx)
    out = loss_fn.step(ctx, batch)
    c_t = ctx.embed([out.record["targets"][0]["concept"]])
    z, t = batch.z_t, batch.t
    with torch.no_grad():
        o_t = tiny_pipe.unet(z, t, c_t).sample
        want = F.mse_loss(ctx.unet(z, t, batch.cond_e).sample, o_t) + 0.3 * F.mse_loss(ctx.unet(z, t, c_t).sample, o_t)
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-9)


def test_age_erase_logs_targets_and_leaves_the_pipeline(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(tiny_pipe, REQ, method="age", progress=False, **FAST)
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert edit.method == "age" and all(".attn2." in k for k in edit.tensors)
    picks = chosen_concepts(edit.trace["log"], key="targets")
    assert len(picks) == 2 and not {c for *_, c in picks} & {"triangle", "square"}
    again = erasekit.erase(tiny_pipe, REQ, method="age", progress=False, **FAST)
    assert chosen_concepts(again.trace["log"], key="targets") == picks
    with pytest.raises(ValueError, match="temperature"):
        AGEConfig(temperature=0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        erasekit.erase(tiny_pipe, REQ, method="age", progress=False, **{**FAST, "k": 999})


def test_age_presets():
    c = AGEConfig()
    assert {k: getattr(c, k) for k in AGE_AUTHORS} == AGE_AUTHORS
    assert (c.relaxation, c.temperature, c.negative_guidance, c.detach_target, c.loss_space, c.l2_latent) == (
        "hard",
        0.1,
        1.0,
        True,
        "x0",
        "own",
    )
    assert (c.search_space, c.pool, c.search_lr, c.search_gradient, c.zt_producer) == (
        "stratified",
        100,
        1e-2,
        "semi",
        "trained",
    )
    p = make_config("age", "paper")
    assert {k: getattr(p, k) for k in AGE_PAPER} == AGE_PAPER
    assert (p.relaxation, p.topk, p.temperature, p.negative_guidance, p.detach_target) == ("topk", 5, 2.0, 0.0, False)


def test_age_eta_target_by_hand():
    o_t, o_e = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    torch.testing.assert_close(age_target(o_t, o_e, 1.0), torch.tensor([1.0 - 2.0, -2.0 - 2.5]))
    torch.testing.assert_close(age_target(o_t, o_e, 0.5), torch.tensor([0.0, -3.25]))
    assert age_target(o_t, None, 0.0) is o_t
    with pytest.raises(ValueError, match="eps_orig_e"):
        age_target(o_t, None, 1.0)


def test_age_authors_descent_by_hand(tiny_pipe, monkeypatch):
    """authors: L1 = x0-MSE(eps'(z_e, c_e), eps(z_e, c_t) - eta (eps(z_e, c_e) - eps(z_e, c_t))), eta = 1;
    L2 = x0-MSE(eps'(z_t, c_t), eps(z_t, c_t)) on a z_t sampled with c_t itself (the issue's 'eta target in x0
    space'; the negative_guidance option was accepted and ignored before)."""
    cfg = make_config("age", **{**FAST, "lam": 0.3})
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.2)
    loss_fn = AGELoss(REQ, cfg)
    loss_fn.setup(ctx)
    g = step_generator(0, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), ctx.scheduler.timesteps[1:2]
    seen = []
    sample = FinetuneContext.sample_zt

    def spy(self, cond, n_steps, generator, **kw):
        out = sample(self, cond, n_steps, generator, **kw)
        seen.append((cond.clone(), out))
        return out

    monkeypatch.setattr(FinetuneContext, "sample_zt", spy)
    out = loss_fn.step(ctx, StepBatch(0, ["square"], z, t, ctx.embed(["square"]), g))
    ((cond, (z_t, t_t)),) = seen
    c_e, c_t = ctx.embed(["square"]), ctx.embed([out.record["targets"][0]["concept"]])
    torch.testing.assert_close(cond, c_t)
    abar = ctx.scheduler.alphas_cumprod[t]
    w = float((1 - abar) / abar)
    with torch.no_grad():
        orig = tiny_pipe.unet
        o_t, o_e = orig(z, t, c_t).sample, orig(z, t, c_e).sample
        l1 = F.mse_loss(ctx.unet(z, t, c_e).sample, o_t - (o_e - o_t)) * w
        l2 = F.mse_loss(ctx.unet(z_t, t, c_t).sample, orig(z_t, t, c_t).sample) * w
    torch.testing.assert_close(out.loss.detach(), l1 + 0.3 * l2, rtol=1e-4, atol=1e-9)
    # eta = 0 (the paper's target) changes the loss: the option is read
    loss_0 = AGELoss(REQ, make_config("age", **{**FAST, "lam": 0.3, "negative_guidance": 0.0}))
    loss_0.setup(ctx)
    out_0 = loss_0.step(ctx, StepBatch(0, ["square"], z, t, ctx.embed(["square"]), step_generator(0, 0)))
    assert not torch.allclose(out_0.loss, out.loss)


def test_age_detached_target_leaves_only_l2_in_the_search(tiny_pipe):
    """With the exact gradient, detach_target=False ascends L1 + lambda L2 (eq. 14); True (authors) ascends
    lambda L2 alone: the L1 term has no gradient with respect to c_t."""
    ctx, batch = _ctx_and_batch(tiny_pipe)
    c = ctx.embed(["circle"])
    z, t = batch.z_t, batch.t
    values = {}
    for detach in (False, True):
        cfg = make_config("age", "paper", **{**FAST, "lam": 0.3, "relaxation": "soft", "detach_target": detach})
        loss_fn = AGELoss(REQ, cfg)
        values[detach] = loss_fn.search_objective(ctx, batch, c, None)
    with torch.no_grad():
        orig = tiny_pipe.unet
        l2 = F.mse_loss(ctx.unet(z, t, c).sample, orig(z, t, c).sample)
        l1 = F.mse_loss(ctx.unet(z, t, batch.cond_e).sample, orig(z, t, c).sample)
    torch.testing.assert_close(values[True].detach(), 0.3 * l2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(values[False].detach(), l1 + 0.3 * l2, rtol=1e-5, atol=1e-9)
