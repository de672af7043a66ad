"""LoRA as the training parameterisation of ESD, AP and AGE (issue 16, ``lora_rank``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.edit import Edit, EraseRequest, get_parameter
from erasekit.export import plan_lora
from erasekit.finetune import (
    FinetuneContext,
    LossFunction,
    StepOutput,
    finetune,
    hashed_config,
    latest_checkpoint,
)
from erasekit.lora_train import AUX_PREFIX
from erasekit.methods.esd import ESDConfig, ESDLoss
from erasekit.testing import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

REQ = EraseRequest(["triangle"])
FAST = dict(steps=3, ddim_steps=2, lr=1e-2, progress=False)
SEARCH = dict(vocabulary="shapes", k=3)


@pytest.mark.parametrize("method", ["esd", "ap", "age"])
def test_lora_edit_is_rank_r_on_the_linear_targets_and_exports_without_truncation(tiny_pipe, method):
    extra = SEARCH if method != "esd" else {}
    edit = erasekit.erase(tiny_pipe, REQ, method=method, lora_rank=2, **FAST, **extra)
    full = erasekit.erase(tiny_pipe, REQ, method=method, **FAST, **extra)
    # the Linear weights of the xattn target, not its bias (full fine-tuning trains attn2.to_out.0.bias too)
    assert set(edit.tensors) == {k for k in full.tensors if k.endswith(".weight")}
    assert edit.config["lora_rank"] == 2 and edit.trace["lora"] == {"rank": 2, "modules": len(edit.tensors)}
    n_lora = sum(2 * (w.shape[0] + w.shape[1]) for w in edit.tensors.values())
    assert edit.trace["n_parameters"] == n_lora < full.trace["n_parameters"]
    for name, w in edit.tensors.items():  # the edit is W_0 + B A with the factors kept in aux
        module = name.removesuffix(".weight")
        a, b = edit.aux[f"{AUX_PREFIX}{module}.lora_A"], edit.aux[f"{AUX_PREFIX}{module}.lora_B"]
        assert a.shape == (2, w.shape[1]) and b.shape == (w.shape[0], 2)
        w0 = get_parameter(tiny_pipe, name).detach()
        torch.testing.assert_close(w.double(), w0.double() + b.double() @ a.double(), rtol=0, atol=1e-6)
        assert not torch.equal(w, w0)
    # export: at rank 2 (or full) the trained factors are written as they are; the SVD of the merged delta
    # agrees that it has numerical rank 2 and only the float32 rounding of the merged weights is left; at
    # rank 1 the export truncates the SVD
    at2 = plan_lora(edit, tiny_pipe, rank=2)
    full_rank = plan_lora(edit, tiny_pipe)
    at1 = plan_lora(edit, tiny_pipe, rank=1)
    assert set(at2.layers) == {k.removesuffix(".weight") for k in edit.tensors} and not at2.biases
    for m, low in at2.layers.items():
        assert low.source == "trained" and full_rank.layers[m].source == "trained" and at1.layers[m].source == "svd"
        assert torch.equal(low.down, edit.aux[f"{AUX_PREFIX}{m}.lora_A"])
        assert torch.equal(low.up, edit.aux[f"{AUX_PREFIX}{m}.lora_B"])
        assert low.numerical_rank == 2 and low.rank == 2
        assert low.error < 1e-4 and at1.layers[m].error > 10 * low.error, (m, low.error, at1.layers[m].error)


def test_lora_edit_applies_saves_loads_and_exports(tiny_pipe, tiny_pipe_dir, tmp_path):
    edit = erasekit.erase(tiny_pipe, REQ, method="esd", lora_rank=2, **FAST)
    edit.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    assert set(loaded.aux) == set(edit.aux) and loaded.config["lora_rank"] == 2
    pipe = erasekit.load_pipeline(str(tiny_pipe_dir))
    loaded.apply_(pipe)
    for k, w in edit.tensors.items():
        assert torch.equal(get_parameter(pipe, k).detach(), w)
    edit.export_lora(tiny_pipeline(0), tmp_path / "lora")  # full rank: the trained factors, rank 2
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for name in edit.tensors:
        module = name.removesuffix(".weight")
        key = next(k for k in lora if k.endswith(module.removeprefix("unet.") + ".lora_A.weight"))
        assert torch.equal(lora[key], edit.aux[f"{AUX_PREFIX}{module}.lora_A"])
        assert torch.equal(lora[key.replace("lora_A", "lora_B")], edit.aux[f"{AUX_PREFIX}{module}.lora_B"])


def test_the_callers_unet_is_not_wrapped_and_the_frozen_original_is_the_base(tiny_pipe):
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2, lora_rank=2, seed=0)
    assert not any("lora" in n for n, _ in tiny_pipe.unet.named_modules())
    assert ctx.params and all(".lora_A." in n or ".lora_B." in n for n in ctx.params)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    cond = ctx.embed(["a red triangle", ""])
    with torch.no_grad():
        for p in ctx.params.values():  # move the LoRA off zero
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        base = tiny_pipe.unet(z, t, encoder_hidden_states=cond).sample
        assert not torch.allclose(ctx.eps(z, t, cond), base, atol=1e-4)
        torch.testing.assert_close(ctx.eps_frozen(z, t, cond), base)
    cond_g = cond.clone().requires_grad_(True)  # the functional_call path (lora_B swapped for zeros)
    torch.testing.assert_close(ctx.eps_frozen(z, t, cond_g).detach(), base, rtol=1e-5, atol=1e-6)
    for n, p in tiny_pipe.unet.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_lora_runs_are_seeded_resumable_and_keep_the_old_hash(tiny_pipe, tmp_path):
    a = erasekit.erase(tiny_pipe, REQ, method="esd", lora_rank=2, **FAST)
    b = erasekit.erase(tiny_pipe, REQ, method="esd", lora_rank=2, **FAST)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # lora_rank unset is left out of the config hash: runs made before the option keep their identity
    assert "lora_rank" not in hashed_config(ESDConfig()) and hashed_config(ESDConfig(lora_rank=4))["lora_rank"] == 4
    cfg = dict(steps=3, ddim_steps=2, lr=1e-2, lora_rank=2, zt_producer="exact")
    whole = finetune(tiny_pipe, REQ, ESDConfig(**cfg), ESDLoss(ESDConfig(**cfg), ""), method="esd", progress=False)
    run = tmp_path / "run"
    c1 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):  # a crash at step 2: the checkpoint after step 2 holds the factors
        finetune(tiny_pipe, REQ, c1, _Interrupt(ESDLoss(c1, ""), at=2), method="esd", progress=False)
    assert latest_checkpoint(run).name == "step-00000002"
    c2 = ESDConfig(**cfg, run_dir=str(run), checkpoint_every=1, resume=True)
    resumed = finetune(tiny_pipe, REQ, c2, ESDLoss(c2, ""), method="esd", progress=False)
    assert resumed.edit.trace["steps_this_call"] == 1
    for k, w in whole.edit.tensors.items():
        assert torch.equal(resumed.edit.tensors[k], w), k
    assert all(torch.equal(resumed.edit.aux[k], v) for k, v in whole.edit.aux.items())


class _Interrupt(LossFunction):
    """A loss that raises at a given step (a crash in the middle of a run)."""

    def __init__(self, inner: LossFunction, at: int) -> None:
        self.inner, self.at = inner, at

    def step(self, ctx, batch) -> StepOutput:
        if batch.step == self.at:
            raise KeyboardInterrupt
        return self.inner.step(ctx, batch)


def test_bad_lora_ranks_are_refused(tiny_pipe):
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="`lora_rank` must be an integer >= 1"):
            ESDConfig(lora_rank=bad)
    smallest = min(
        min(m.weight.shape)
        for n, m in tiny_pipe.unet.named_modules()
        if ".attn2." in n and isinstance(m, torch.nn.Linear)
    )
    with pytest.raises(ValueError, match=rf"`lora_rank` {smallest + 1} is too large.*at most {smallest}"):
        erasekit.erase(tiny_pipe, REQ, method="esd", lora_rank=smallest + 1, **FAST)
    with pytest.raises(ValueError, match="selects no Linear layer"):
        erasekit.erase(tiny_pipe, REQ, method="esd", lora_rank=2, train_method=r".*norm.*", **FAST)
