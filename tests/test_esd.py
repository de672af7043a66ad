from dataclasses import asdict

import pytest
import torch

import erasekit
from erasekit.edit import Edit, EraseRequest
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods.esd import ESDConfig, ESDLoss, esd_loss, esd_target

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def test_esd_loss_matches_a_hand_computation():
    e_new = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    e_0 = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    e_e = torch.tensor([[1.5, 1.0], [0.0, 3.0]])
    # target = e_0 - 2 (e_e - e_0) = [[-1.5, -2], [3, -3]]; residuals [[2.5, 4], [-3, 2]]
    torch.testing.assert_close(esd_target(e_0, e_e, 2.0), torch.tensor([[-1.5, -2.0], [3.0, -3.0]]))
    assert esd_loss(e_new, e_0, e_e, 2.0).item() == pytest.approx((2.5**2 + 4**2 + 3**2 + 2**2) / 4)
    assert esd_loss(e_new, e_0, e_e, 0.0).item() == pytest.approx(((e_new - e_0) ** 2).mean().item())


def test_esd_step_uses_the_frozen_original_and_the_anchor(tiny_pipe):
    cfg = ESDConfig(eta=1.5, ddim_steps=3)
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=3)
    with torch.no_grad():
        for p in ctx.params.values():  # a model that has already moved away from the original
            p.mul_(1.1)
    g = step_generator(0, 0)
    z = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([601])
    c_e, c_0 = ctx.embed(["triangle"]), ctx.embed(["circle"])
    batch = StepBatch(step=0, concepts=["triangle"], z_t=z, t=t, cond_e=c_e, generator=g)
    loss = ESDLoss(cfg, "circle").step(ctx, batch).loss
    with torch.no_grad():
        orig = tiny_pipe.unet
        e0 = orig(z, t, encoder_hidden_states=c_0).sample
        ee = orig(z, t, encoder_hidden_states=c_e).sample
        new = ctx.unet(z, t, encoder_hidden_states=c_e).sample
    expected = ((new - (e0 - 1.5 * (ee - e0))) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-8)
    assert loss.requires_grad


def test_esd_defaults_are_the_authors_and_recorded(tiny_pipe, tmp_path):
    d = ESDConfig()
    assert (d.steps, d.lr, d.eta, d.start_guidance, d.ddim_steps, d.train_method) == (1000, 1e-5, 1.0, 3.0, 50, "xattn")
    assert d.zt_producer == "trained"  # CompVis train-esd.py samples z_t with the model being trained
    edit = erasekit.erase(
        tiny_pipe, EraseRequest(["triangle"]), method="esd", steps=2, ddim_steps=2, lr=1e-3, progress=False
    )
    assert edit.method == "esd" and edit.config["eta"] == 1.0 and edit.config["start_guidance"] == 3.0
    assert edit.tensors and all(".attn2." in k for k in edit.tensors)
    assert len(edit.trace["log"]) == 2 and edit.trace["n_parameters"] > 0
    edit.save(tmp_path / "e")
    loaded = Edit.load(tmp_path / "e")
    assert loaded.config == {**asdict(ESDConfig(steps=2, ddim_steps=2, lr=1e-3)), "preset": "authors"}
    assert all(torch.equal(loaded.tensors[k], edit.tensors[k]) for k in edit.tensors)


def test_esd_gradient_descends_its_objective(tiny_pipe):
    """Adam steps on ESD's loss (the gradient the core applies) reduce it on a fixed z_t."""
    cfg = ESDConfig(ddim_steps=2)
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    g = step_generator(1, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([501])
    batch = StepBatch(step=0, concepts=["triangle"], z_t=z, t=t, cond_e=ctx.embed(["triangle"]), generator=g)
    loss_fn = ESDLoss(cfg, "")
    opt = torch.optim.Adam(ctx.params.values(), lr=3e-4)
    losses = []
    for _ in range(4):
        loss = loss_fn.step(ctx, batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.5 * losses[0]


def test_esd_bad_eta():
    with pytest.raises(ValueError, match="eta"):
        ESDConfig(eta=-1)


def test_authors_sample_z_t_with_the_trained_model_and_paper_with_the_frozen(tiny_pipe, monkeypatch):
    """The presets differ in the z_t sampler only: authors (default) = the model being trained (CompVis
    quick_sample_till_t on `model`), paper = the frozen original's trajectories (pooled; exact on request)."""
    calls = []
    original, original_traj = FinetuneContext.sample_zt, FinetuneContext.ddim_latents

    def spy(self, *args, frozen=True, **kw):
        calls.append(frozen)
        return original(self, *args, frozen=frozen, **kw)

    def spy_traj(self, *args, frozen=True, **kw):
        calls.append(("trajectories", frozen))
        return original_traj(self, *args, frozen=frozen, **kw)

    monkeypatch.setattr(FinetuneContext, "sample_zt", spy)
    run = dict(method="esd", steps=3, ddim_steps=3, lr=1e-2, progress=False)
    authors = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), **run)
    assert calls == [False] * 3
    calls.clear()
    monkeypatch.setattr(FinetuneContext, "ddim_latents", spy_traj)
    paper = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), preset="paper", **run)
    assert calls and all(c == ("trajectories", True) for c in calls)  # frozen trajectories, no per-step run
    assert paper.config["zt_producer"] == "pooled" and authors.config["zt_producer"] == "trained"
    calls.clear()
    exact = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), preset="paper", zt_producer="exact", **run)
    assert [c for c in calls if c is True or c is False] == [True] * 3 and exact.config["zt_producer"] == "exact"


def test_diffusers_negative_guidance_2_equals_our_eta_1():
    """esd_sd.py's target eps(c_e) - ng (eps(c_e) - eps(c_0)) with ng = 2 is eq. 4's with eta = 1 (eta = ng - 1)."""
    g = torch.Generator().manual_seed(0)
    e_0, e_e = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for ng in (1.0, 2.0, 3.5):
        torch.testing.assert_close(e_e - ng * (e_e - e_0), esd_target(e_0, e_e, ng - 1.0))
