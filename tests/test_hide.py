import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.methods.hide import (
    HideConfig,
    HideLoss,
    RecoverConfig,
    RecoveryKey,
    encode_with_soft_tokens,
    hide,
    project_ball,
    recover,
    token_center,
)
from erasekit.pipeline import encode_prompts
from erasekit.testing import tiny_pipeline

FAST = dict(steps=2, ddim_steps=2, lr=1e-3, key_lr=1e-2, n_tokens=2)
REQ = EraseRequest(["triangle", "star"], preserve=["circle"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)


def test_soft_tokens_are_input_embeddings_after_the_concept(tiny_pipe):
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    red = tiny_pipe.tokenizer("red", add_special_tokens=False).input_ids
    p = table[red].detach().clone().requires_grad_(True)  # the soft token = the word "red"
    got = encode_with_soft_tokens(tiny_pipe, ["a big triangle"], ["triangle"], [p])
    torch.testing.assert_close(got, encode_prompts(tiny_pipe, ["a big triangle red"]), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), p)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="does not contain"):
        encode_with_soft_tokens(tiny_pipe, ["a square"], ["triangle"], [p])


def test_project_ball():
    c = torch.zeros(2, 3)
    inside = torch.full((2, 3), 0.1)
    assert torch.equal(project_ball(inside, c, 1.0), inside)
    out = project_ball(torch.full((2, 3), 2.0), c, 1.0)
    assert out.norm().item() == pytest.approx(1.0) and torch.allclose(out / out.norm(), torch.full((2, 3), 6**-0.5))


def test_hide_step_matches_a_hand_computation(tiny_pipe):
    cfg = HideConfig(**FAST, lam=0.5, preserve_lam=0.0)
    ctx = FinetuneContext(tiny_pipe, "xattn", ddim_steps=2)
    with torch.no_grad():
        for p in ctx.params.values():
            p.mul_(1.1)
    loss_fn = HideLoss(EraseRequest(["triangle"]), cfg)
    loss_fn.setup(ctx)
    g = step_generator(0, 0)
    z, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([301])
    out = loss_fn.step(ctx, StepBatch(0, ["triangle"], z, t, ctx.embed(["triangle"]), g))
    key_cond = encode_with_soft_tokens(tiny_pipe, ["triangle"], ["triangle"], [token_center(tiny_pipe, "triangle", 2)])
    with torch.no_grad():
        orig = tiny_pipe.unet
        l1 = F.mse_loss(ctx.unet(z, t, ctx.embed(["triangle"])).sample, orig(z, t, ctx.embed([""])).sample)
        l2 = F.mse_loss(ctx.unet(z, t, key_cond).sample, orig(z, t, ctx.embed(["triangle"])).sample)
    torch.testing.assert_close(out.loss.detach(), l1 + 0.5 * l2, rtol=1e-5, atol=1e-9)


def test_hide_saves_the_key_apart_and_binds_it_to_edit_and_base(tiny_pipe, tmp_path):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    cfg = HideConfig(**FAST, concepts_per_step=2, key_dir=str(tmp_path / "key"))
    edit, key = hide(tiny_pipe, REQ, cfg, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert edit.tensors and all(".attn2." in k for k in edit.tensors)
    assert key.concepts == ["star", "triangle"] and key.tokens["star"].shape == (2, 32)
    assert not torch.equal(key.tokens["star"], token_center(tiny_pipe, "star", 2))  # the key learned
    edit.save(tmp_path / "edit")
    assert not any(p.name.startswith("key") for p in (tmp_path / "edit").iterdir())
    assert all(k.startswith("unet.") for k in edit.tensors) and "recovery_key" in edit.trace
    loaded = RecoveryKey.load(tmp_path / "key", edit=erasekit.Edit.load(tmp_path / "edit"), pipe=tiny_pipe)
    assert all(torch.equal(loaded.tokens[c], key.tokens[c]) for c in key.concepts)

    other_edit, _ = hide(tiny_pipe, REQ, HideConfig(**{**FAST, "seed": 9}), progress=False)
    with pytest.raises(ValueError, match="belongs to edit"):
        RecoveryKey.load(tmp_path / "key", edit=other_edit)
    with pytest.raises(ValueError, match="base model"):
        RecoveryKey.load(tmp_path / "key", pipe=tiny_pipeline(seed=1))

    # generation with the key: prompt_embeds for generate_images
    edit.apply_(tiny_pipe)
    embeds = loaded.prompt_embeds(tiny_pipe, ["a red triangle", "star"])
    assert embeds.shape == (2, 77, 32)
    imgs = generate_images(tiny_pipe, None, [0, 1], SamplingConfig(steps=2, guidance_scale=2.0), prompt_embeds=embeds)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype.name == "uint8"
    with pytest.raises(ValueError, match="mentions none"):
        loaded.prompt_embeds(tiny_pipe, ["a blue square"])


def test_recover_stays_in_the_ball_and_bad_inputs(tiny_pipe):
    edit, key = hide(tiny_pipe, EraseRequest(["triangle"]), HideConfig(**FAST), progress=False)
    rec = recover(tiny_pipe, edit, RecoverConfig(rho=0.05, epochs=2, ddim_steps=2, n_tokens=3, lr=0.1), progress=False)
    center = token_center(tiny_pipe, "triangle", 3)
    assert rec.tokens["triangle"].shape == (3, 32)
    assert 0 < (rec.tokens["triangle"] - center).norm().item() <= 0.05 + 1e-6
    assert rec.edit_digest == key.edit_digest and rec.meta["stage"] == "recover"
    from_key = recover(tiny_pipe, edit, RecoverConfig(rho=0.01, epochs=1, ddim_steps=2), init=key, progress=False)
    assert (from_key.tokens["triangle"] - token_center(tiny_pipe, "triangle", 2)).norm().item() <= 0.01 + 1e-6
    for bad in (dict(rho=0.0), dict(rho=-1.0), dict(epochs=0), dict(epochs=-3)):
        with pytest.raises(ValueError, match="rho|epochs"):
            RecoverConfig(**bad)
    with pytest.raises(ValueError, match="key_dir"):
        erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="hide", progress=False, **FAST)
    with pytest.raises(ValueError, match="base model"):
        recover(tiny_pipeline(seed=1), edit, RecoverConfig(epochs=1))
