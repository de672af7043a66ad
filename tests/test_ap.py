import json

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods.ap import APConfig, APLoss, GumbelSearch, chosen_concepts, gumbel_softmax

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
    cfg = APConfig(**{**FAST, "n_iter": 0, "lam": 0.7})
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
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert chosen_concepts(on_disk) == picks and edit.trace["log_path"].endswith("log.jsonl")
    assert all({"l1", "l2", "l2_search", "loss"} <= set(r) for r in edit.trace["log"])


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
    fixed = erasekit.erase(tiny_pipe, REQ, method="ap", progress=False, search="fixed", fixed_concept="a photo", **FAST)
    assert {a["concept"] for r in fixed.trace["log"] for a in r["adversarial"]} == {"a photo"}
    assert "l2_search" not in fixed.trace["log"][0]


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


def test_defaults_are_the_papers():
    c = APConfig()
    assert (c.steps, c.lr, c.k, c.n_iter, c.search_lr, c.lam, c.temperature, c.relaxation) == (
        1000,
        1e-5,
        None,
        2,
        1e-3,
        1.0,
        2.0,
        "hard",
    )
    assert c.train_method == "xattn" and c.search == "gumbel" and c.negative_guidance == 0.0
