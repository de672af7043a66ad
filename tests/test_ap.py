import json

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods.ap import (
    AP_AUTHORS,
    AP_PAPER,
    APConfig,
    APLoss,
    GumbelSearch,
    chosen_concepts,
    gumbel_softmax,
    predicted_x0,
    prediction_loss,
    preservation_objective,
)
from erasekit.methods.base import make_config

FAST = dict(steps=2, ddim_steps=2, lr=1e-3, vocabulary="shapes", k=4, search_lr=1e-2)
REQ = EraseRequest(["triangle", "square"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


# ------------------------------------------------------------------------------------------ Gumbel-Softmax
def test_straight_through_is_one_hot_forward_with_soft_gradients():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    hard = gumbel_softmax(logits, 2.0, "hard", generator=torch.Generator().manual_seed(5))
    assert torch.equal(hard, F.one_hot(hard.argmax(-1), 6).float())  # exactly one-hot
    (g_hard,) = torch.autograd.grad((hard * c).sum(), logits)
    soft = gumbel_softmax(logits, 2.0, "soft", generator=torch.Generator().manual_seed(5))  # same noise
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))
    (g_soft,) = torch.autograd.grad((soft * c).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)
    assert (g_hard != 0).all()  # every logit gets a gradient, not only the chosen one
    torch.testing.assert_close(soft.sum(-1), torch.ones(3))


def test_gumbel_max_samples_the_softmax_distribution():
    """argmax(l + g) ~ Categorical(softmax(l)) (Gumbel-max), whatever the temperature."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(20000, 4)
    y = gumbel_softmax(logits, 0.5, "hard", generator=torch.Generator().manual_seed(0))
    freq = y.mean(0)
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


def test_topk_relaxation_and_bad_temperature():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    y = gumbel_softmax(logits, 1.0, "topk", topk=3, generator=torch.Generator().manual_seed(0))
    assert ((y > 0).sum(-1) == 3).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(2))
    soft = gumbel_softmax(logits, 1.0, "soft", generator=torch.Generator().manual_seed(0))
    top = torch.topk(soft, 3).values
    torch.testing.assert_close(torch.topk(y, 3).values, top / top.sum(-1, keepdim=True))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            gumbel_softmax(logits, bad)
        with pytest.raises(ValueError, match="temperature"):
            APConfig(temperature=bad)
    with pytest.raises(ValueError, match="mode"):
        gumbel_softmax(logits, 1.0, "nope")


# ------------------------------------------------------------------------------------------ search
def test_ascent_step_increases_the_objective():
    """With the same Gumbel noise, one search step moves the logits uphill on a fixed objective."""
    emb = torch.randn(1, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def objective(cond):
        return ((cond[0] - target) ** 2).sum()

    s = GumbelSearch(
        [list("abcde")], emb, temperature=1.0, relaxation="soft", topk=5, n_iter=1, lr=0.05, optimizer="adam"
    )
    before = objective(s._mix([0], torch.Generator().manual_seed(3))[1]).item()
    s.ascend(objective, [0], torch.Generator().manual_seed(3))
    after = objective(s._mix([0], torch.Generator().manual_seed(3))[1]).item()
    assert after > before


def test_ap_step_matches_a_hand_computation(tiny_pipe):
    """The paper preset (eq. 5): L1 = ||eps'(c_e) - eps(c_t)||^2 and L2 on the same z_t, noise space."""
    cfg = make_config("ap", "paper", **{**FAST, "n_iter": 0, "lam": 0.7})
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.2)
    loss_fn = APLoss(REQ, cfg)
    loss_fn.setup(ctx)
    g = step_generator(0, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([401])
    batch = StepBatch(step=0, concepts=["square"], z_t=z, t=t, cond_e=ctx.embed(["square"]), generator=g)
    out = loss_fn.step(ctx, batch)
    chosen = out.record["adversarial"][0]["concept"]
    assert chosen in [n for n, _ in loss_fn.trace()["search_space"]["square"]]
    c_e, c_t, c_a = ctx.embed(["square"]), ctx.embed([""]), ctx.embed([chosen])
    with torch.no_grad():
        orig = tiny_pipe.unet
        l1 = F.mse_loss(ctx.unet(z, t, c_e).sample, orig(z, t, c_t).sample)
        l2 = F.mse_loss(ctx.unet(z, t, c_a).sample, orig(z, t, c_a).sample)
    torch.testing.assert_close(out.loss.detach(), l1 + 0.7 * l2, rtol=1e-5, atol=1e-9)
    assert out.logs["l1"] == pytest.approx(l1.item(), rel=1e-5) and out.logs["l2"] == pytest.approx(l2.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ the method
def test_ap_logs_adversarial_concepts_and_changes_only_cross_attention(tiny_pipe, tmp_path):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, run_dir=str(tmp_path / "run"), **FAST)
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert edit.tensors and all(".attn2." in k for k in edit.tensors)
    space = edit.trace["search_space"]
    assert set(space) == {"triangle", "square"} and all(len(v) == 4 for v in space.values())
    assert not {"triangle", "square"} & {n for v in space.values() for n, _ in v}
    assert edit.trace["vocabulary"] == "shapes" and edit.trace["k"] == 4
    picks = chosen_concepts(edit.trace["log"])
    assert len(picks) == 2 and all(c in [n for n, _ in space[e]] for _, e, c in picks)
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "train" / "log.jsonl").read_text().splitlines()]
    assert chosen_concepts(on_disk) == picks and edit.trace["log_path"].endswith("log.jsonl")
    # authors' 1:1 loop: step 0 is a descent only (the paper preset ascends there too, on a zero gradient)
    first, second = edit.trace["log"]
    assert {"l1", "l2", "loss"} <= set(first) and "l2_search" not in first
    assert {"l1", "l2", "l2_search", "loss"} <= set(second) and len(second["search_ddim_steps"]) == 1
    assert edit.config["preset"] == "authors" and edit.trace["search_space_kind"] == "stratified"


def test_ap_is_deterministic_and_resumes_exactly(tiny_pipe, tmp_path, monkeypatch):
    a = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, seed=2, **{**FAST, "steps": 3})
    b = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, seed=2, **{**FAST, "steps": 3})
    assert chosen_concepts(a.trace["log"]) == chosen_concepts(b.trace["log"])
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    run = str(tmp_path / "run")
    step = APLoss.step

    def crash_at_2(self, ctx, batch):
        if batch.step == 2:
            raise KeyboardInterrupt
        return step(self, ctx, batch)

    monkeypatch.setattr(APLoss, "step", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        erasekit.erase(
            tiny_pipe, REQ, method="ap", progress=False, seed=2, run_dir=run, checkpoint_every=1, **{**FAST, "steps": 3}
        )
    monkeypatch.setattr(APLoss, "step", step)
    c = erasekit.erase(
        tiny_pipe, REQ, method="ap", progress=False, seed=2, run_dir=run, resume=True, **{**FAST, "steps": 3}
    )
    assert c.trace["steps_this_call"] == 1
    assert all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)  # logits + their Adam state restored
    assert chosen_concepts(c.trace["log"]) == chosen_concepts(a.trace["log"])


def test_pgd_and_fixed_searches(tiny_pipe):
    pgd = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, search="pgd", pgd_radius=0.05, **FAST)
    recs = [a for r in pgd.trace["log"] for a in r["adversarial"]]
    assert all(a["delta_linf"] <= 0.05 + 1e-7 and a["nearest"] for a in recs)
    # step 0: the edited model is still the original, L2 and its gradient are 0; after one descent step it moves
    assert recs[0]["delta_linf"] == 0 and recs[-1]["delta_linf"] > 0
    no_space = {k: v for k, v in FAST.items() if k not in ("vocabulary", "k", "search_lr")}
    fixed = erasekit.erase(
        tiny_pipe, REQ, method="ap", progress=False, search="fixed", fixed_concept="a photo", **no_space
    )
    assert {a["concept"] for r in fixed.trace["log"] for a in r["adversarial"]} == {"a photo"}
    assert "l2_search" not in fixed.trace["log"][0]
    # issue 12: the fixed search has no concept space, so a vocabulary or search lr would be ignored: refused
    with pytest.raises(ValueError, match=r"Option `vocabulary` of method 'ap' is not read with search='fixed'"):
        erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, search="fixed", **FAST)


def test_exclude_keeps_concepts_out_of_the_search_space(tiny_pipe):
    """AGE paper: targets 'closely related to c_e but not its synonyms' -- the user can drop them from R."""
    kw = {**FAST, "steps": 1, "k": None}
    full = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, **kw).trace["search_space"]
    assert all("pyramid" in [n for n, _ in v] for v in full.values())  # k=None: the whole vocabulary
    cut = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, exclude=["pyramid", " Box"], **kw).trace[
        "search_space"
    ]
    for c in REQ.erase:
        names = [n for n, _ in cut[c]]
        assert "pyramid" not in names and "box" not in names and len(names) == len(full[c]) - 2
    with pytest.raises(ValueError, match="exclude"):
        APConfig(exclude="pyramid")


def test_ap_bad_inputs(tiny_pipe):
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, **{**FAST, "k": 10_000})
    with pytest.raises(ValueError, match="matches no UNet parameter"):
        erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, train_method="nothing_here", **FAST)
    for bad in (dict(search="beam"), dict(k=0), dict(n_iter=-1), dict(search_lr=0), dict(relaxation="x"), dict(lam=-1)):
        with pytest.raises(ValueError):
            APConfig(**bad)


def test_presets_paper_and_authors():
    """The default is the authors' code (Table 1 was made with it); the paper preset is eq. 5 as printed."""
    c = APConfig()
    assert (c.steps, c.lr, c.k, c.lam, c.temperature, c.relaxation, c.train_method, c.search) == (
        1000,
        1e-5,
        None,
        1.0,
        2.0,
        "hard",
        "xattn",
        "gumbel",
    )
    assert {k: getattr(c, k) for k in AP_AUTHORS} == AP_AUTHORS
    assert (c.search_space, c.pool, c.search_gradient, c.loss_space, c.search_loop, c.n_iter) == (
        "stratified",
        1000,
        "semi",
        "x0",
        "fresh",
        1,
    )
    assert (c.search_state, c.l2_latent, c.negative_guidance, c.search_lr, c.zt_producer) == (
        "per_concept",
        "own",
        1.0,
        1e-2,
        "trained",
    )
    p = make_config("ap", "paper")
    assert {k: getattr(p, k) for k in AP_PAPER} == AP_PAPER
    assert (p.search_space, p.search_gradient, p.loss_space, p.search_loop, p.n_iter, p.search_lr) == (
        "nearest",
        "exact",
        "eps",
        "same",
        2,
        1e-3,
    )
    assert (p.search_state, p.l2_latent, p.negative_guidance, p.zt_producer) == ("shared", "erased", 0.0, "exact")


# ------------------------------------------------------------------------------------------ issue 12 options
def _toy_models():
    """Linear stand-ins eps'(c) = c A1 and eps(c) = c A0 (z and t unused), for gradients by hand."""
    g = torch.Generator().manual_seed(0)
    a1, a0 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    return (lambda z, t, c: c @ a1), (lambda z, t, c: c @ a0), a1, a0


def test_search_gradients_exact_and_semi_by_hand():
    """d L2 / d c for L2 = mean((c A1 - c A0)^2): exact = 2/N (c A1 - c A0)(A1 - A0)^T (eq. 5 through both
    models); semi = 2/N (c A1 - c A0) A1^T (the frozen output a constant, as the authors compute it)."""
    edited, frozen, a1, a0 = _toy_models()
    c = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    z, t = torch.zeros(2, 3, 5, dtype=torch.float64), torch.tensor([10, 20])

    def mse(pred, target, z, t):
        return F.mse_loss(pred, target)

    n = 2 * 3 * 5
    diff = (c @ a1 - c @ a0).detach()
    for gradient, want in (("exact", 2 / n * diff @ (a1 - a0).T), ("semi", 2 / n * diff @ a1.T)):
        value = preservation_objective(edited, frozen, z, t, c, gradient=gradient, loss=mse)
        torch.testing.assert_close(value.detach(), (diff**2).mean())
        (grad,) = torch.autograd.grad(value, c)
        torch.testing.assert_close(grad, want)
    exact = torch.autograd.grad(preservation_objective(edited, frozen, z, t, c, gradient="exact", loss=mse), c)[0]
    semi = torch.autograd.grad(preservation_objective(edited, frozen, z, t, c, gradient="semi", loss=mse), c)[0]
    assert not torch.allclose(exact, semi)
    with pytest.raises(ValueError, match="search_gradient"):
        preservation_objective(edited, frozen, z, t, c, gradient="full", loss=mse)


def test_x0_loss_is_the_eps_loss_times_one_minus_abar_over_abar(tiny_pipe):
    abar = tiny_pipe.scheduler.alphas_cumprod  # Stable Diffusion's scaled-linear schedule
    g = torch.Generator().manual_seed(0)
    z, pred, target = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 500, 981])
    for b in range(3):
        sl = slice(b, b + 1)
        eps = prediction_loss(pred[sl], target[sl], z[sl], t[sl], space="eps", alphas_cumprod=abar)
        x0 = prediction_loss(pred[sl], target[sl], z[sl], t[sl], space="x0", alphas_cumprod=abar)
        w = (1 - abar[t[b]].double()) / abar[t[b]].double()
        torch.testing.assert_close(x0, eps * w)
        a = abar[t[b]].double()
        x0_hand = (z[b] - (1 - a).sqrt() * pred[b]) / a.sqrt() - (z[b] - (1 - a).sqrt() * target[b]) / a.sqrt()
        torch.testing.assert_close(x0, (x0_hand**2).mean())
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * (1 - abar[t].double()) / abar[t].double()
    batch = prediction_loss(pred, target, z, t, space="x0", alphas_cumprod=abar)
    torch.testing.assert_close(batch, per_sample.mean())
    w = (1 - abar) / abar  # the numbers: 1.7e-3 at t=1, 172 at t=981
    assert float(w[1]) == pytest.approx(1.7e-3, rel=0.01) and float(w[981]) == pytest.approx(172, rel=0.01)
    a1 = abar[1].double()
    torch.testing.assert_close(predicted_x0(z, pred, abar[t])[0], (z[0] - (1 - a1).sqrt() * pred[0]) / a1.sqrt())


def test_per_concept_state_keeps_a_row_not_drawn_still():
    """shared: one Adam over all rows, a row not drawn moves on its momentum; per_concept: it does not."""
    emb = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))

    def objective(cond):
        return ((cond - target) ** 2).sum()

    moved = {}
    for state in ("shared", "per_concept"):
        s = GumbelSearch(
            [list("abcd")] * 2,
            emb,
            temperature=1.0,
            relaxation="soft",
            topk=4,
            n_iter=3,
            lr=0.1,
            optimizer="adam",
            state=state,
        )
        s.ascend(objective, [0], torch.Generator().manual_seed(2))
        row0 = s.logits[0].detach().clone()
        assert not torch.equal(row0, torch.zeros(4))
        s.ascend(objective, [1], torch.Generator().manual_seed(3))
        moved[state] = not torch.equal(s.logits[0].detach(), row0)
        assert not torch.equal(s.logits[1].detach(), torch.zeros(4))
        # checkpoint round trip
        t = GumbelSearch(
            [list("abcd")] * 2,
            emb,
            temperature=1.0,
            relaxation="soft",
            topk=4,
            n_iter=3,
            lr=0.1,
            optimizer="adam",
            state=state,
        )
        t.load_state_tensors({k: v.clone() for k, v in s.state_tensors().items()})  # as a checkpoint file holds
        assert torch.equal(t.logits, s.logits)
        for x in (s, t):
            x.ascend(objective, [0], torch.Generator().manual_seed(4))
        assert torch.equal(t.logits, s.logits)  # the optimizer state came back too
    assert moved == {"shared": True, "per_concept": False}


def test_fresh_loop_draws_fresh_latents_and_a_latent_of_c_a(tiny_pipe, monkeypatch):
    """authors: per step, the core's z_t (c_e), then (from step 1) one ascent on a fresh DDIM step with a
    z_t sampled with its own Gumbel sample, then the descent's z_t of c_a at the batch's DDIM step, all
    sampled by the model being trained; paper: only the core's z_t."""
    calls = []
    sample = FinetuneContext.sample_zt

    def spy(self, cond, n_steps, generator, *, guidance, frozen=True):
        z, t = sample(self, cond, n_steps, generator, guidance=guidance, frozen=frozen)
        calls.append({"cond": cond.clone(), "n": n_steps, "frozen": frozen, "z": z.clone(), "ctx": self})
        return z, t

    monkeypatch.setattr(FinetuneContext, "sample_zt", spy)
    kw = {**FAST, "steps": 3, "ddim_steps": 4}
    edit = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, **kw)
    log = edit.trace["log"]
    assert len(calls) == 2 + 3 + 3 and not any(c["frozen"] for c in calls)
    per_step = [calls[0:2], calls[2:5], calls[5:8]]
    ctx = calls[0]["ctx"]
    for s, (rec, step_calls) in enumerate(zip(log, per_step, strict=True)):
        core, *rest = step_calls
        torch.testing.assert_close(core["cond"], ctx.embed(rec["erase"]))
        descent = rest[-1]
        chosen = rec["adversarial"][0]["concept"]
        torch.testing.assert_close(descent["cond"], ctx.embed([chosen]))  # hard one-hot: exactly c_a
        assert descent["n"] == core["n"] and not torch.equal(descent["z"], core["z"])
        if s == 0:
            assert len(rest) == 1 and "search_ddim_steps" not in rec
        else:
            (ascent,) = rest[:-1]
            assert rec["search_ddim_steps"] == [ascent["n"]]
            names = {n for n, _ in edit.trace["search_space"][rec["erase"][0]]}
            assert any(torch.equal(ascent["cond"], ctx.embed([n])) for n in names)  # its own Gumbel sample
            assert not torch.equal(ascent["z"], core["z"]) and not torch.equal(ascent["z"], descent["z"])
    calls.clear()
    erasekit.erase(tiny_pipe, REQ, method="ap", preset="paper", progress=False, **kw)
    assert len(calls) == 3 and all(c["frozen"] for c in calls)


def test_ap_authors_step_matches_a_hand_computation(tiny_pipe, monkeypatch):
    """authors: L1 = x0-MSE(eps'(z, c_e), eps(z, "") - (eps(z, c_e) - eps(z, ""))), L2 = x0-MSE on c_a's own z_t."""
    cfg = make_config("ap", **{**FAST, "lam": 0.7})
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.2)
    loss_fn = APLoss(REQ, cfg)
    loss_fn.setup(ctx)
    g = step_generator(0, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), ctx.scheduler.timesteps[1:2]
    seen = []
    sample = FinetuneContext.sample_zt

    def spy(self, cond, n_steps, generator, **kw):
        out = sample(self, cond, n_steps, generator, **kw)
        seen.append((n_steps, out))
        return out

    monkeypatch.setattr(FinetuneContext, "sample_zt", spy)
    batch = StepBatch(step=0, concepts=["square"], z_t=z, t=t, cond_e=ctx.embed(["square"]), generator=g)
    out = loss_fn.step(ctx, batch)
    ((n, (z_a, t_a)),) = seen
    assert n == 1 and torch.equal(t_a, t)
    chosen = out.record["adversarial"][0]["concept"]
    c_e, c_0, c_a = ctx.embed(["square"]), ctx.embed([""]), ctx.embed([chosen])
    abar = ctx.scheduler.alphas_cumprod[t]
    w = float((1 - abar) / abar)
    with torch.no_grad():
        orig = tiny_pipe.unet
        e0, en = orig(z, t, c_0).sample, orig(z, t, c_e).sample
        l1 = F.mse_loss(ctx.unet(z, t, c_e).sample, e0 - (en - e0)) * w
        l2 = F.mse_loss(ctx.unet(z_a, t, c_a).sample, orig(z_a, t, c_a).sample) * w
    torch.testing.assert_close(out.loss.detach(), l1 + 0.7 * l2, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_ap_step_with_the_pool_predictions_equals_its_own_frozen_call(tiny_pipe, preset):
    """With the empty anchor, L1's frozen eps(c_t) (and the authors' eta-1 eps(c_e)) may come from the
    pooled producer's trajectories (StepBatch.frozen_eps): the same loss as AP's own frozen call."""
    cfg = make_config("ap", preset, **{**FAST, "lam": 0.7})
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.2)
    loss_fn = APLoss(REQ, cfg)
    assert loss_fn.uses_frozen_eps and not APLoss(EraseRequest(["square"], anchor="a star"), cfg).uses_frozen_eps
    loss_fn.setup(ctx)
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), ctx.scheduler.timesteps[1:2]
    c_e = ctx.embed(["square"])
    eps = (ctx.eps_frozen(z, t, ctx.embed([""])), ctx.eps_frozen(z, t, c_e))
    outs, state = [], {k: v.clone() for k, v in loss_fn.state_tensors().items()}
    for frozen_eps in (None, eps):
        loss_fn.load_state_tensors({k: v.clone() for k, v in state.items()})  # the search's logits learn
        batch = StepBatch(
            step=3, concepts=["square"], z_t=z, t=t, cond_e=c_e, generator=step_generator(0, 3), frozen_eps=frozen_eps
        )
        outs.append(loss_fn.step(ctx, batch))
    torch.testing.assert_close(outs[1].loss.detach(), outs[0].loss.detach(), rtol=1e-5, atol=1e-9)
    assert outs[0].record == outs[1].record  # the same search, the same chosen concept
