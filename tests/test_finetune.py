import json
import shutil

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.finetune import (
    FinetuneConfig,
    FinetuneContext,
    LossFunction,
    StepOutput,
    finetune,
    latest_checkpoint,
    read_log,
    resolve_target,
    step_generator,
)
from erasekit.methods.esd import ESDConfig, ESDLoss
from erasekit.targets import select_parameters

FAST = dict(steps=2, ddim_steps=3, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def test_esd_u_target_follows_esd_code(tiny_pipe):
    names = set(select_parameters(tiny_pipe.unet, resolve_target("noxattn")))
    assert names and not any(".attn2." in n for n in names)
    assert not any(n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for n in names)
    assert any("time_emb_proj" in n for n in names)  # LDM's emb_layers stay trainable, as in ESD
    assert all(".attn2." in n for n in select_parameters(tiny_pipe.unet, resolve_target("xattn")))


def test_frozen_original_shares_storage_and_ignores_training(tiny_pipe):
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=3)
    shared = {n: p for n, p in ctx.unet.named_parameters() if n not in ctx.params}
    orig = dict(tiny_pipe.unet.named_parameters())
    assert shared and all(p.data_ptr() == orig[n].data_ptr() and not p.requires_grad for n, p in shared.items())
    assert all(p.data_ptr() != orig[n].data_ptr() and p.requires_grad for n, p in ctx.params.items())
    g = torch.Generator().manual_seed(0)
    z, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 100]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = tiny_pipe.unet(z, t, encoder_hidden_states=c).sample
        for p in ctx.params.values():
            p.add_(0.1)
        torch.testing.assert_close(ctx.eps_frozen(z, t, c), ref, rtol=0, atol=0)
        assert not torch.allclose(ctx.eps(z, t, c), ref)


def test_sample_zt_matches_the_diffusers_pipeline(tiny_pipe):
    """z_t after k DDIM steps with CFG equals the latents StableDiffusionPipeline holds after k steps."""
    ddim, k, guidance = 5, 3, 3.0
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=ddim)
    cond = ctx.embed(["triangle"])
    z_t, t = ctx.sample_zt(cond, k, step_generator(0, 7), guidance=guidance)
    noise = torch.randn(z_t.shape, generator=step_generator(0, 7))
    seen = {}

    def grab(pipe, i, timestep, kw):
        seen[i] = kw["latents"].clone()
        return kw

    tiny_pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=ctx.embed([""]),
        latents=noise,
        num_inference_steps=ddim,
        guidance_scale=guidance,
        output_type="latent",
        callback_on_step_end=grab,
    )
    torch.testing.assert_close(z_t, seen[k - 1], rtol=1e-4, atol=1e-5)
    assert int(t[0]) == int(tiny_pipe.scheduler.timesteps[k])
    z0, t0 = ctx.sample_zt(cond, 0, step_generator(0, 7), guidance=guidance)  # zero steps: the noise itself
    torch.testing.assert_close(z0, noise)


def _esd(pipe, **kw):
    return erasekit.erase(pipe, EraseRequest(["triangle", "square"]), method="esd", progress=False, **{**FAST, **kw})


def test_only_targets_change_and_the_pipeline_is_untouched(tiny_pipe):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    params_before = {n: p for n, p in tiny_pipe.unet.named_parameters()}
    edit = _esd(tiny_pipe, train_method="noxattn")
    assert set(edit.tensors) == {f"unet.{n}" for n in select_parameters(tiny_pipe.unet, resolve_target("noxattn"))}
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p is params_before[n] for n, p in tiny_pipe.unet.named_parameters())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    changed = [k for k, v in edit.tensors.items() if not torch.equal(v, before[k.removeprefix("unet.")])]
    assert len(changed) == len(edit.tensors)
    edit.apply_(tiny_pipe)
    after = tiny_pipe.unet.state_dict()
    assert {k for k in after if not torch.equal(after[k], before[k])} == {k.removeprefix("unet.") for k in edit.tensors}


def test_deterministic_under_a_seed(tiny_pipe):
    a, b, c = _esd(tiny_pipe, seed=3), _esd(tiny_pipe, seed=3), _esd(tiny_pipe, seed=4)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [r["erase"] for r in a.trace["log"]] == [r["erase"] for r in b.trace["log"]]
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    d = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="esd", generator=g1, progress=False, **FAST)
    e = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="esd", generator=g2, progress=False, **FAST)
    assert d.trace["seed"] == e.trace["seed"] and all(torch.equal(d.tensors[k], e.tensors[k]) for k in d.tensors)


def test_several_concepts_per_step(tiny_pipe):
    edit = _esd(tiny_pipe, steps=2, concepts_per_step=2)
    assert all(sorted(r["erase"]) == ["square", "triangle"] for r in edit.trace["log"])


class _Interrupt(LossFunction):
    """ESD's loss that raises at a given step (a crash in the middle of a run)."""

    def __init__(self, inner: LossFunction, at: int | None) -> None:
        self.inner, self.at = inner, at

    def step(self, ctx, batch) -> StepOutput:
        if batch.step == self.at:
            raise KeyboardInterrupt
        return self.inner.step(ctx, batch)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_pipe, tmp_path):
    req = EraseRequest(["triangle", "square"])
    cfg = dict(steps=3, ddim_steps=3, lr=1e-3, seed=5)
    full = finetune(tiny_pipe, req, ESDConfig(**cfg), ESDLoss(ESDConfig(**cfg), ""), method="esd", progress=False).edit

    run = tmp_path / "run"
    c1 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_pipe, req, c1, _Interrupt(ESDLoss(c1, ""), at=2), method="esd", progress=False)
    assert latest_checkpoint(run).name == "step-00000002"
    assert [r["step"] for r in read_log(run)] == [0, 1]
    shutil.rmtree(latest_checkpoint(run))  # as if the crash came before the step-2 checkpoint was written
    assert latest_checkpoint(run).name == "step-00000001"

    c2 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=1, keep_checkpoints=2, resume=True)
    resumed = finetune(tiny_pipe, req, c2, ESDLoss(c2, ""), method="esd", progress=False).edit
    assert resumed.trace["steps_this_call"] == 2
    for k in full.tensors:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k
    assert [r["step"] for r in read_log(run)] == [0, 1, 2]  # step 1's record was replaced, not duplicated
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in full.trace["log"]]
    assert (run / "edit" / "edit.safetensors").exists()


def test_resume_dir_with_a_different_config_is_refused(tiny_pipe, tmp_path):
    run = tmp_path / "run"
    _esd(tiny_pipe, steps=2, run_dir=str(run), checkpoint_every=1)
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="different configuration.*lr"):
        _esd(tiny_pipe, steps=2, lr=5e-4, run_dir=str(run), resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        _esd(tiny_pipe, steps=2, run_dir=str(run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    meta = json.loads((run / "train" / "train.json").read_text())["identity"]
    assert meta["config"]["lr"] == 1e-3 and meta["method"] == "esd"
    # the same config resumes a finished run without training again
    again = _esd(tiny_pipe, steps=2, run_dir=str(run), resume=True)
    assert again.trace["steps_this_call"] == 0


def test_bad_inputs_are_clear_errors(tiny_pipe):
    with pytest.raises(ValueError, match="matches no UNet parameter"):
        _esd(tiny_pipe, train_method=r"no_such_layer\.weight")
    with pytest.raises(ValueError, match="valid regex"):
        FinetuneConfig(train_method="attn2[")
    with pytest.raises(ValueError, match="resume"):
        FinetuneConfig(resume=True)
    for bad in (dict(steps=0), dict(lr=0.0), dict(ddim_steps=0), dict(concepts_per_step=0), dict(zt_producer="x")):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
