import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods import ap
from erasekit.methods.age import AGEConfig, AGELoss, age_objective
from erasekit.methods.ap import chosen_concepts

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
    cfg = AGEConfig(**{**FAST, "lam": 0.3})
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
    cfg = AGEConfig(**{**FAST, "n_iter": 0, "relaxation": "hard", "lam": 0.3})
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
    assert AGEConfig().topk == 5 and AGEConfig().relaxation == "topk"
    with pytest.raises(ValueError, match="temperature"):
        AGEConfig(temperature=0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        erasekit.erase(tiny_pipe, REQ, method="age", progress=False, **{**FAST, "k": 999})
