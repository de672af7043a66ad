"""AP's ``pooled`` producer for the latents sampled with the search's concept (issue 13):
:class:`erasekit.methods.ap.ConceptTrajectories` serves each latent from a frozen DDIM trajectory of
its concept, never at a higher cost than ``exact``, each latent once; a continued run is the run;
its decks survive a checkpoint, so a chunked AP run equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import FinetuneContext
from erasekit.methods.ap import ConceptTrajectories

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(pipe, d: int = 6) -> FinetuneContext:
    return FinetuneContext(pipe, "xattn", ddim_steps=d)


def test_a_continued_ddim_run_is_the_run(tiny_pipe):
    ctx = _ctx(tiny_pipe)
    cond = ctx.embed(["triangle"])
    noise = ctx.initial_noise(1, torch.Generator().manual_seed(0))
    whole = ctx.ddim_latents(cond, noise, [5], guidance=3.0, keep_all=True)
    head = ctx.ddim_latents(cond, noise, [2], guidance=3.0, keep_all=True)
    tail = ctx.ddim_latents(cond, head[:, -1], [5], guidance=3.0, keep_all=True, start=2)
    assert tail.shape[1] == 4 and torch.allclose(torch.cat([head, tail[:, 1:]], 1), whole, atol=1e-6)
    with pytest.raises(ValueError, match="start"):
        ctx.ddim_latents(cond, noise, [1], guidance=3.0, start=2)


def test_served_latents_are_exact_draws_and_each_is_used_once(tiny_pipe):
    ctx = _ctx(tiny_pipe)
    pool = ConceptTrajectories(ctx, guidance=3.0)
    row = ctx.embed(["square"])
    gen, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    z3, t3 = pool.sample(row, 3, gen)
    want, want_t = ctx.sample_zt(row, 3, ref, guidance=3.0)  # exact: the same noise, 3 frozen DDIM steps
    assert torch.allclose(z3, want, atol=1e-6) and torch.equal(t3, want_t)
    assert pool.unet_calls == 3
    # index 5 continues that deck (2 more calls) and is the same trajectory's latent after 5 steps
    z5, _ = pool.sample(row, 5, gen)
    noise = ctx.initial_noise(1, torch.Generator().manual_seed(1))
    assert torch.allclose(z5, ctx.ddim_latents(row, noise, [5], guidance=3.0), atol=1e-5)
    assert pool.unet_calls == 5
    # indices below are free; index 3 again needs a new deck (each latent is used once)
    z1, _ = pool.sample(row, 1, gen)
    assert pool.unet_calls == 5 and torch.allclose(z1, ctx.ddim_latents(row, noise, [1], guidance=3.0), atol=1e-6)
    again, _ = pool.sample(row, 3, gen)
    assert pool.unet_calls == 8 and not torch.allclose(again, z3)
    # another concept has decks of its own
    pool.sample(ctx.embed(["star"]), 2, gen)
    assert len(pool.rows) == 2 and pool.unet_calls == 10
    assert pool.unet_calls <= pool.exact_calls == 3 + 5 + 1 + 3 + 2


def test_never_costlier_than_exact_and_decks_are_bounded(tiny_pipe):
    ctx = _ctx(tiny_pipe)
    pool = ConceptTrajectories(ctx, guidance=3.0, max_decks=2)
    rows = ctx.embed(["triangle", "circle"])
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(0, 6, (1,), generator=g))
        pool.sample(rows[int(torch.randint(0, 2, (1,), generator=g))][None], n, g)
    assert pool.unet_calls < pool.exact_calls  # reuse happened
    assert all(len(v) <= 2 for v in pool.decks.values())
    rows = ctx.embed(["triangle", "circle", "star", "heart"])
    one = pool.sample(rows[:1], 0, g)[0]
    deck = one.numel() * one.element_size() * 6 + rows[0].numel() * rows[0].element_size()  # latents + row
    small = ConceptTrajectories(ctx, guidance=3.0, max_decks=4, budget_bytes=3 * deck)  # 3 decks in all
    for i in range(24):
        small.sample(rows[i % 4][None], 5, g)
        assert sum(len(v) for v in small.decks.values()) <= 3
        assert set(small.rows) == set(small.decks) and all(small.decks.values())  # evicted concepts forgotten


def test_state_round_trip_continues_identically(tiny_pipe):
    ctx = _ctx(tiny_pipe)
    a = ConceptTrajectories(ctx, guidance=3.0)
    rows = ctx.embed(["triangle", "circle"])
    for i, n in enumerate([4, 2, 5, 1]):
        a.sample(rows[i % 2][None], n, torch.Generator().manual_seed(i))
    b = ConceptTrajectories(ctx, guidance=3.0)
    b.load_state_tensors(a.state_tensors())
    assert (b.unet_calls, b.exact_calls, b.served) == (a.unet_calls, a.exact_calls, a.served)
    for i, n in enumerate([3, 4, 0, 5, 2]):
        za, _ = a.sample(rows[i % 2][None], n, torch.Generator().manual_seed(10 + i))
        zb, _ = b.sample(rows[i % 2][None], n, torch.Generator().manual_seed(10 + i))
        assert torch.equal(za, zb)
    assert a.unet_calls == b.unet_calls
    empty = ConceptTrajectories(ctx, guidance=3.0)
    empty.load_state_tensors(ConceptTrajectories(ctx, guidance=3.0).state_tensors())
    assert empty.decks == {} and empty.served == 0


def test_pooled_ap_chunks_equal_the_uninterrupted_run(tiny_pipe, tmp_path):
    """The decks are in the checkpoint: an AP run cut at step 2 and resumed ends where one run does."""
    req = EraseRequest(["triangle"])
    kw = dict(method="ap", steps=4, ddim_steps=3, lr=1e-2, zt_producer="pooled", k=4, pool=8, progress=False)
    full = erasekit.erase(tiny_pipe, req, **kw)
    assert full.trace["concept_pool"]["latents_served"] > 0
    assert full.trace["concept_pool"]["unet_calls"] <= full.trace["concept_pool"]["exact_would_call"]
    run = str(tmp_path / "run")
    erasekit.erase(tiny_pipe, req, **kw, run_dir=run, resume=True, stop_at=2, checkpoint_every=2)
    rest = erasekit.erase(tiny_pipe, req, **kw, run_dir=run, resume=True, stop_at=4, checkpoint_every=2)
    for k in full.tensors:
        assert torch.equal(rest.tensors[k], full.tensors[k]), k
    assert rest.trace["concept_pool"] == full.trace["concept_pool"]
