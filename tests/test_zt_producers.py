"""The z_t producers of the fine-tuning core (issue 13): exact, batched, pooled, trained."""

import dataclasses

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import (
    BatchedProducer,
    ExactProducer,
    FinetuneConfig,
    FinetuneContext,
    LossFunction,
    PooledProducer,
    StepOutput,
    TrainedProducer,
    finetune,
    hashed_config,
    latest_checkpoint,
    read_log,
    step_generator,
)
from erasekit.methods.base import make_config
from erasekit.methods.esd import ESDConfig, ESDLoss

pytestmark = pytest.mark.usefixtures("one_thread")

ERASE = ["triangle", "square", "star"]


def _ctx(pipe, ddim: int = 4) -> FinetuneContext:
    return FinetuneContext(pipe, "xattn", ddim_steps=ddim)


def test_batched_z_t_equal_exact_for_the_same_draws(tiny_pipe):
    """Same concepts, timesteps, z_t (float tolerance) and generator state after the draws, over chunk
    boundaries (7 steps, chunks of 3) and with several concepts per step."""
    cfg = FinetuneConfig(steps=7, ddim_steps=4, concepts_per_step=2, zt_producer="batched", zt_batch_steps=3)
    ctx = _ctx(tiny_pipe)
    exact, batched = ExactProducer(ctx, cfg, ERASE, seed=9), BatchedProducer(ctx, cfg, ERASE, seed=9)
    batched.prepare(0)
    n_steps_seen = set()
    for s in range(cfg.steps):
        a, b = exact.batch(s), batched.batch(s)
        assert a.concepts == b.concepts and torch.equal(a.t, b.t)
        torch.testing.assert_close(b.z_t, a.z_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.cond_e, a.cond_e, rtol=0, atol=0)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())  # the method's own draws match too
        n_steps_seen.add(int(a.t[0]))
    assert len(n_steps_seen) > 1  # rows of one batch stopped at different step indices


def test_pooled_entries_are_whole_trajectories_each_used_once(tiny_pipe):
    """Oracle: rebuild the refresh's draws from its generator, run each entry's DDIM alone, compare."""
    d, size = 4, 3
    cfg = FinetuneConfig(steps=50, ddim_steps=d, zt_producer="pooled", zt_pool_size=size)
    ctx = _ctx(tiny_pipe, d)
    prod = PooledProducer(ctx, cfg, ERASE, seed=2)
    prod.prepare(0)
    batches = [prod.batch(s) for s in range(size * d)]
    assert len(prod.grid) == 0  # the pool is used up exactly

    gen = step_generator(2, 0, 1, 0)
    idx = torch.randperm(3, generator=gen)  # one permutation covers the 3 trajectories: each concept once
    noise = ctx.initial_noise(size, gen)
    order = torch.randperm(size * d, generator=gen)
    seen = set()
    for b, entry in zip(batches, order.tolist(), strict=True):
        traj, k = divmod(entry, d)
        seen.add((traj, k))
        concept = ERASE[int(idx[traj])]
        assert b.concepts == [concept]
        alone = ctx.ddim_latents(ctx.embed([concept]), noise[traj : traj + 1], [k], guidance=cfg.start_guidance)
        torch.testing.assert_close(b.z_t, alone, rtol=1e-5, atol=1e-5)
        assert int(b.t[0]) == int(ctx.scheduler.timesteps[k])
    assert seen == {(j, k) for j in range(size) for k in range(d)}  # every latent of every trajectory, once
    assert sorted(c for b in batches for c in b.concepts) == sorted(ERASE * d)  # concepts balanced

    nxt = prod.batch(size * d)  # empty: refreshed from the step's own generator, new noise
    assert len(prod.grid) == size * d - 1
    assert not any(torch.equal(nxt.z_t, b.z_t) for b in batches)


def test_a_refresh_runs_only_the_trajectories_the_remaining_steps_use(tiny_pipe):
    cfg = FinetuneConfig(steps=5, ddim_steps=4, zt_producer="pooled", zt_pool_size=16)
    prod = PooledProducer(_ctx(tiny_pipe), cfg, ERASE, seed=0)
    prod.prepare(0)
    assert len(prod.grid) == 8  # ceil(5 steps / 4 latents per trajectory) = 2 trajectories, not 16
    for s in range(4):
        prod.batch(s)
    assert len(prod.grid) == 4  # step 4 is served from the same pool


def test_pooled_several_concepts_across_a_refresh(tiny_pipe):
    cfg = FinetuneConfig(steps=9, ddim_steps=2, concepts_per_step=3, zt_producer="pooled", zt_pool_size=2)
    prod = PooledProducer(_ctx(tiny_pipe, 2), cfg, ERASE, seed=0)
    prod.prepare(0)
    b0, b1 = prod.batch(0), prod.batch(1)  # the pool holds 4 entries: step 1 takes 1 old + 2 from a new pool
    assert b0.z_t.shape[0] == b1.z_t.shape[0] == 3 == len(b1.concepts) == b1.t.shape[0]
    assert len(prod.grid) == 2


class _Interrupt(LossFunction):
    def __init__(self, inner: LossFunction, at: int) -> None:
        self.inner, self.at = inner, at
        self.uses_frozen_eps = inner.uses_frozen_eps  # the wrapped loss decides what the producer computes

    def step(self, ctx, batch) -> StepOutput:
        if batch.step == self.at:
            raise KeyboardInterrupt
        return self.inner.step(ctx, batch)


@pytest.mark.parametrize("producer", ["pooled", "batched"])
def test_resume_is_bit_identical(tiny_pipe, tmp_path, producer):
    """A pool of 2 x 3 = 6 entries: the checkpoint at step 4 holds a half-used pool, step 6 refreshes it."""
    req = EraseRequest(ERASE)
    cfg = dict(steps=8, ddim_steps=3, lr=1e-3, seed=5, zt_producer=producer)
    cfg.update(zt_pool_size=2) if producer == "pooled" else cfg.update(zt_batch_steps=3)
    full = finetune(tiny_pipe, req, ESDConfig(**cfg), ESDLoss(ESDConfig(**cfg), ""), method="esd", progress=False).edit
    run = tmp_path / "run"
    c1 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_pipe, req, c1, _Interrupt(ESDLoss(c1, ""), at=5), method="esd", progress=False)
    assert latest_checkpoint(run).name == "step-00000004"
    if producer == "pooled":
        assert (latest_checkpoint(run) / "producer.safetensors").stat().st_size > 100  # the pool's 2 entries
    c2 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=4, resume=True)
    resumed = finetune(tiny_pipe, req, c2, ESDLoss(c2, ""), method="esd", progress=False).edit
    assert resumed.trace["steps_this_call"] == 4 and resumed.trace["zt_producer"] == producer
    for k in full.tensors:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in full.trace["log"]]
    assert [r["t"] for r in read_log(run)] == [r["t"] for r in full.trace["log"]]


def test_resuming_with_another_producer_is_refused(tiny_pipe, tmp_path):
    run = tmp_path / "run"
    kw = dict(steps=2, ddim_steps=2, lr=1e-3, progress=False)
    erasekit.erase(
        tiny_pipe, EraseRequest(ERASE), method="esd", zt_producer="pooled", zt_pool_size=1, run_dir=str(run), **kw
    )
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=r"zt_producer='exact'.*started with zt_producer='pooled'.*nothing was overwritten"
    ):
        erasekit.erase(
            tiny_pipe, EraseRequest(ERASE), method="esd", zt_producer="exact", run_dir=str(run), resume=True, **kw
        )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot


def test_a_pool_too_large_for_memory_names_the_option_and_writes_nothing(tiny_pipe, tmp_path, monkeypatch):
    def no_memory(self, *a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 274877906944 bytes.")

    monkeypatch.setattr(FinetuneContext, "ddim_latents", no_memory)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="lower `zt_pool_size`"):
        erasekit.erase(
            tiny_pipe,
            EraseRequest(ERASE),
            method="esd",
            steps=2,
            zt_producer="pooled",
            run_dir=str(run),
            progress=False,
        )
    with pytest.raises(ValueError, match="lower `zt_batch_steps`"):
        erasekit.erase(tiny_pipe, EraseRequest(ERASE), method="esd", steps=2, zt_producer="batched", progress=False)
    assert not run.exists() or not any(run.iterdir())

    def other(self, *a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(FinetuneContext, "ddim_latents", other)  # other errors are not disguised as memory errors
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        erasekit.erase(tiny_pipe, EraseRequest(ERASE), method="esd", steps=2, zt_producer="pooled", progress=False)


def test_producer_options_and_names(tiny_pipe):
    with pytest.raises(ValueError, match="exact, batched, pooled, trained"):
        FinetuneConfig(zt_producer="cached")
    with pytest.raises(ValueError, match="zt_pool_size"):
        FinetuneConfig(zt_producer="pooled", zt_pool_size=0)
    with pytest.raises(ValueError, match=r"`zt_pool_size`.*not read.*zt_producer='pooled'"):
        make_config("esd", zt_pool_size=4)
    assert make_config("esd", zt_producer="pooled", zt_pool_size=4).zt_pool_size == 4
    # an option the run does not read is not part of its identity (old exact runs keep their hash)
    assert "zt_pool_size" not in hashed_config(ESDConfig()) and "zt_batch_steps" not in hashed_config(ESDConfig())
    assert hashed_config(ESDConfig(zt_producer="pooled"))["zt_pool_size"] == 16
    edit = erasekit.erase(
        tiny_pipe, EraseRequest(ERASE), method="esd", steps=1, ddim_steps=2, zt_producer="pooled", progress=False
    )
    assert edit.config["zt_producer"] == "pooled" and edit.trace["zt_producer"] == "pooled"


def test_trained_producer_samples_with_the_current_weights(tiny_pipe):
    cfg = FinetuneConfig(steps=4, ddim_steps=4)
    ctx = _ctx(tiny_pipe)
    exact, trained = ExactProducer(ctx, cfg, ERASE, seed=1), TrainedProducer(ctx, cfg, ERASE, seed=1)
    s = next(s for s in range(20) if int(exact.batch(s).t[0]) != int(ctx.scheduler.timesteps[0]))  # >= 1 DDIM step
    torch.testing.assert_close(trained.batch(s).z_t, exact.batch(s).z_t, rtol=0, atol=0)  # untrained: the same
    with torch.no_grad():
        for p in ctx.params.values():
            p.add_(0.05)
    assert not torch.allclose(trained.batch(s).z_t, exact.batch(s).z_t)


def test_eps_frozen_propagates_input_gradients_and_its_output_is_a_usable_target(tiny_pipe):
    ctx = _ctx(tiny_pipe)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    emb = ctx.embed(["triangle"]).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ctx.eps_frozen(z, t, emb).square().sum(), emb)
    emb2 = emb.detach().clone().requires_grad_(True)
    ref = torch.func.functional_call(ctx.unet, ctx.originals, (z, t), {"encoder_hidden_states": emb2}).sample
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), emb2)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, grad_ref)
    target = ctx.eps_frozen(z, t, emb.detach())  # no input needs a gradient: inference mode inside
    assert not target.is_inference() and not target.requires_grad
    loss = torch.nn.functional.mse_loss(ctx.eps(z, t, emb.detach()), target)
    grads = torch.autograd.grad(loss, list(ctx.params.values()))  # usable as a target of a trained loss
    assert all(gr is not None for gr in grads)
    torch.testing.assert_close(target, ref.detach(), rtol=0, atol=0)


def test_sample_zt_still_serves_the_methods(tiny_pipe):
    """AP's authors preset calls ``ctx.sample_zt(..., frozen=False)``: same meaning, ordinary tensors."""
    ctx = _ctx(tiny_pipe)
    cond = ctx.embed(["triangle", "star"])
    z, t = ctx.sample_zt(cond, 2, step_generator(0, 1), guidance=3.0, frozen=False)
    assert z.shape == (2, 4, 16, 16) and t.shape == (2,) and not z.is_inference()
    z2, _ = ctx.sample_zt(cond[:1], 2, step_generator(0, 1), guidance=3.0, frozen=True)
    torch.testing.assert_close(z[:1], z2, rtol=1e-5, atol=1e-5)  # untrained model: frozen and trained agree


def test_pooled_hands_over_the_frozen_predictions_of_its_trajectories(tiny_pipe):
    """With ``frozen_eps``, each entry carries eps(z_t, "") and eps(z_t, c_e) of the frozen model at its
    own latent and timestep (oracle: the frozen model called on that entry alone), the last latent included."""
    d, size = 4, 3
    cfg = FinetuneConfig(steps=50, ddim_steps=d, zt_producer="pooled", zt_pool_size=size)
    ctx = _ctx(tiny_pipe, d)
    plain, with_eps = PooledProducer(ctx, cfg, ERASE, seed=2), PooledProducer(ctx, cfg, ERASE, seed=2, frozen_eps=True)
    plain.prepare(0)
    with_eps.prepare(0)
    uncond = ctx.embed([""])
    grids = set()
    for s in range(size * d):
        a, b = plain.batch(s), with_eps.batch(s)
        assert a.frozen_eps is None and b.concepts == a.concepts and torch.equal(a.t, b.t)
        torch.testing.assert_close(b.z_t, a.z_t, rtol=1e-5, atol=1e-5)  # the same pool, eps or not
        e_u, e_c = b.frozen_eps
        ref_u = ctx.eps_frozen(b.z_t, b.t, uncond)
        ref_c = ctx.eps_frozen(b.z_t, b.t, b.cond_e)
        torch.testing.assert_close(e_u, ref_u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e_c, ref_c, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(e_u, e_c)  # two different conditionings, not one tensor twice
        grids.add(int(b.t[0]))
    assert len(grids) == d  # every latent of the trajectories, the last one (never stepped from) too


def test_esd_reads_the_pool_predictions_only_with_the_empty_anchor(tiny_pipe):
    """ESD eq. 4 with the pool's predictions equals ESD recomputing them (same loss, float tolerance);
    with another anchor the pool keeps no predictions and ESD calls the frozen model itself."""
    cfg = ESDConfig(steps=6, ddim_steps=3, zt_producer="pooled", zt_pool_size=2)
    ctx = _ctx(tiny_pipe, 3)
    loss = ESDLoss(cfg, "")
    assert loss.uses_frozen_eps and not ESDLoss(cfg, "a circle").uses_frozen_eps
    prod = PooledProducer(ctx, cfg, ERASE, seed=1, frozen_eps=True)
    prod.prepare(0)
    for s in range(4):
        batch = prod.batch(s)
        fast = loss.step(ctx, batch).loss
        slow = loss.step(ctx, dataclasses.replace(batch, frozen_eps=None)).loss
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)
    anchored = ESDLoss(cfg, "a circle")
    run = finetune(tiny_pipe, EraseRequest(ERASE, anchor="a circle"), cfg, anchored, method="esd", progress=False)
    assert run.edit.trace["zt_producer"] == "pooled"
    assert all(torch.isfinite(v).all() for v in run.edit.tensors.values())
