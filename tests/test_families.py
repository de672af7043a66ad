"""Model families (erasekit.families): detection, the adapters' maths, every method on every family.

Tiny random pipelines of each family are built offline from the diffusers / transformers classes
(erasekit.testing): SD 1.x, SD 2.x with v-prediction, SDXL (two encoders, pooled, time ids), SD3
(MMDiT, flow matching, no T5).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.edit import Edit, EraseRequest
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.families import SUPPORT, FamilyError, family_for_index, family_of, support_table
from erasekit.finetune import FinetuneContext, StepBatch, step_generator
from erasekit.pipeline import base_info, check_dtype, load_pipeline
from erasekit.testing import save_tiny_family_pipeline, tiny_family_pipeline

FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
REQUEST = EraseRequest(erase=["triangle"], preserve=["square"])
FT = dict(steps=2, ddim_steps=4)
SEARCH = dict(FT, vocabulary="shapes", k=3)
# fast options per method (the methods' own tests cover their maths; here: does it run on the family)
OPTIONS: dict[str, dict] = {
    "uce": {},
    "rece": {},
    "speed": {},
    "esd": FT,
    "ap": SEARCH,
    "age": SEARCH,
    "hide": dict(FT),
    "mace": {},
}
SLOW_METHODS = {"mace", "hide"}


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    return {f: tiny_family_pipeline(f) for f in FAMILIES}


def _cases():
    for m, by in SUPPORT.items():
        for f in FAMILIES:
            if by[f] is None:
                marks = [pytest.mark.slow] if m in SLOW_METHODS else []
                yield pytest.param(m, f, marks=marks, id=f"{m}-{f}")


# ------------------------------------------------------------------------------------ detection
def test_families_are_detected_and_recorded(pipes):
    assert {f: family_of(p).name for f, p in pipes.items()} == {f: f for f in FAMILIES}
    assert base_info(pipes["sd2"])["prediction_type"] == "v_prediction"
    assert base_info(pipes["sd3"])["prediction_type"] == "flow"
    eps_pipe = tiny_family_pipeline("sd2-eps")
    assert family_of(eps_pipe).name == "sd2" and family_of(eps_pipe).prediction_type(eps_pipe) == "epsilon"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_load_pipeline_reads_a_saved_folder_of_each_family(family, tmp_path, one_thread):
    folder = save_tiny_family_pipeline(family, tmp_path / family)
    pipe = load_pipeline(folder)
    info = base_info(pipe)
    assert info["family"] == family and type(pipe).__name__ == family_of(pipe).pipeline_class
    # the fingerprint covers every text encoder: changing only text_encoder_2 changes it
    names = [n for n, _ in family_of(pipe).fingerprint_components(pipe)]
    assert "text_encoder_2" in names and names[0] == family_of(pipe).denoiser_name


def test_unsupported_folder_names_what_it_is_and_what_is_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FamilyError, match="FluxPipeline") as e:
        load_pipeline(tmp_path)
    assert "StableDiffusionXLPipeline" in str(e.value) and "StableDiffusion3Pipeline" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert family_for_index({"_class_name": "StableDiffusionXLPipeline"}) == "sdxl"


def test_incomplete_folder_of_a_supported_class_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="no transformer"):
        load_pipeline(tmp_path)


def test_bad_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="`dtype`"):
        load_pipeline("shapes", dtype=torch.int8)
    check_dtype(torch.bfloat16, torch.device("cpu"))  # runs on CPU


# ------------------------------------------------------------------------------------ the maths
def _ddpm_state(pipe, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64).unbind(0)
    abar = pipe.scheduler.alphas_cumprod.double()[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return x0[None], eps[None], a, s


def test_v_prediction_conversions_match_salimans_and_ho(pipes):
    pipe = pipes["sd2"]
    fam, sched = family_of(pipe), pipe.scheduler
    t = torch.tensor([601])
    x0, eps, a, s = _ddpm_state(pipe, 601)
    z = a * x0 + s * eps
    v = a * eps - s * x0  # Progressive Distillation, sec. 4
    torch.testing.assert_close(fam.to_eps(pipe, sched, v, z, t), eps)
    torch.testing.assert_close(fam.to_x0(pipe, sched, v, z, t), x0)
    torch.testing.assert_close(fam.from_eps(pipe, sched, eps, z, t), v)


def test_flow_conversions_match_rectified_flow(pipes):
    pipe = pipes["sd3"]
    fam = family_of(pipe)
    sched = fam.train_scheduler(pipe, 4, torch.device("cpu"))
    t = sched.timesteps[1:2]
    sig = float(t) / 1000
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    z = (1 - sig) * x0 + sig * eps
    u = eps - x0
    torch.testing.assert_close(fam.to_eps(pipe, sched, u, z, t), eps)
    torch.testing.assert_close(fam.to_x0(pipe, sched, u, z, t), x0)
    torch.testing.assert_close(fam.from_eps(pipe, sched, eps, z, t), u)
    # the Euler step to the next grid point moves along u by the sigma difference
    nxt = float(sched.sigmas[2])
    torch.testing.assert_close(fam.scheduler_step(sched, u, t[0], z), z + (nxt - sig) * u)


@pytest.mark.parametrize("eta", [1.0, 2.5])
def test_negative_guidance_target_in_v_space_is_the_eps_target_converted(pipes, eta):
    pipe = pipes["sd2"]
    fam = family_of(pipe)
    _, _, a, s = _ddpm_state(pipe, 401)
    g = torch.Generator().manual_seed(2)
    z, v0, ve = torch.randn(3, 1, 4, 16, 16, generator=g, dtype=torch.float64).unbind(0)
    # by hand, in eps space (ESD eq. 4), then back to v through x0
    e0, ee = a * v0 + s * z, a * ve + s * z
    e_star = e0 - eta * (ee - e0)
    x0_star = (z - s * e_star) / a
    v_star = a * e_star - s * x0_star
    torch.testing.assert_close(fam.negative_guidance_target(v0, ve, eta), v_star)


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_sd2_v_prediction_esd_loss_equals_a_hand_computation(pipes, eta, one_thread):
    from erasekit.methods.esd import ESDConfig, ESDLoss

    pipe = pipes["sd2"]
    ctx = FinetuneContext(pipe, "xattn", ddim_steps=4)
    with torch.no_grad():  # move the trained copy off the original, so e_new differs from e_e
        for p in ctx.params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    k = 2
    t = ctx.scheduler.timesteps[k : k + 1]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cond = ctx.embed(["triangle"])
    batch = StepBatch(step=0, concepts=["triangle"], z_t=z, t=t, cond_e=cond, generator=step_generator(0, 0))
    loss = ESDLoss(ESDConfig(eta=eta, steps=1, ddim_steps=4), "").step(ctx, batch).loss

    # by hand: the frozen UNet's v predictions, ESD's target formed in eps space, converted to v
    unet, trained = pipe.unet, ctx.unet
    with torch.no_grad():
        text = pipe.text_encoder(pipe.tokenizer(["", "triangle"], padding="max_length", return_tensors="pt").input_ids)[
            0
        ]
        v0 = unet(z, t, encoder_hidden_states=text[:1]).sample.double()
        ve = unet(z, t, encoder_hidden_states=text[1:]).sample.double()
        v_new = trained(z, t, encoder_hidden_states=text[1:]).sample.double()
    abar = pipe.scheduler.alphas_cumprod.double()[int(t)]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    zd = z.double()
    e0, ee = a * v0 + s * zd, a * ve + s * zd
    e_star = e0 - eta * (ee - e0)
    v_star = (e_star - s * zd) / a
    want = F.mse_loss(v_new, v_star)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-7)
    # and it is not the eps-space loss (which a UNet predicting v would be trained on by mistake)
    e_new = a * v_new + s * zd
    assert not torch.isclose(loss.double(), F.mse_loss(e_new, e_star), rtol=1e-2)


def test_uce_closed_form_equals_lstsq_on_sdxl_two_encoder_conditioning(pipes, one_thread):
    pipe = pipes["sdxl"]
    request = EraseRequest(erase=["triangle"], preserve=["square", "star"])
    edit = erasekit.erase(
        pipe,
        request,
        method="uce",
        preset="paper",
        erase_positions="all",
        preserve_positions="all",
        lamb=0.3,
        progress=False,
    )

    # the conditioning by hand: both encoders' penultimate states, concatenated (SDXL sec. 2.1)
    def cond(prompts):
        out = []
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out.append(enc(ids, output_hidden_states=True).hidden_states[-2])
        return torch.cat(out, -1).reshape(-1, 32).double()

    with torch.no_grad():
        ci, ct, cp = cond(["triangle"]), cond([""]), cond(["square", "star"])
    d = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert ci.shape[1] == d == pipe.unet.config.cross_attention_dim
    kv = [n for n in edit.tensors]
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    for name in kv:
        w_old = pipe.unet.get_parameter(name.removeprefix("unet.")).detach().double()
        a = torch.cat([ci, cp, 0.3**0.5 * torch.eye(d, dtype=torch.float64)])
        b = torch.cat([ct @ w_old.T, cp @ w_old.T, 0.3**0.5 * w_old.T])
        w_ls = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(edit.tensors[name].double(), w_ls, rtol=1e-4, atol=1e-5)


def test_sd3_text_stream_projections_read_block_specific_inputs(pipes):
    pipe = pipes["sd3"]
    fam = family_of(pipe)
    names = list(fam.kv_projections(pipe))
    assert names and all(n.endswith(("add_k_proj", "add_v_proj")) and n.startswith("transformer.") for n in names)
    x = fam.kv_inputs(pipe, ["triangle"])
    a, b = x.values()
    assert a.shape == b.shape and not torch.allclose(a, b)  # no single embedding read by all blocks


# ------------------------------------------------------------------------------------ methods x families
@pytest.mark.parametrize(("method", "family"), list(_cases()))
def test_method_runs_end_to_end_on_family(method, family, pipes, tmp_path, one_thread):
    pipe = pipes[family]
    opts = dict(OPTIONS[method])
    if method == "hide":
        opts["key_dir"] = str(tmp_path / "key")
    edit = erasekit.erase(pipe, REQUEST, method=method, progress=False, **opts)
    assert edit.tensors and edit.base["family"] == family
    prefix = family_of(pipe).denoiser_name + "."
    assert all(n.startswith(prefix) for n in edit.tensors)
    edit.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    fresh = tiny_family_pipeline(family)
    loaded.apply_(fresh)
    for name, value in edit.tensors.items():
        param = getattr(fresh, name.split(".")[0]).get_parameter(name.split(".", 1)[1])
        torch.testing.assert_close(param.detach(), value.to(param.dtype))
    images = generate_images(fresh, ["a triangle"], [0], SamplingConfig(steps=2, height=32, width=32))
    assert images.shape == (1, 32, 32, 3) and images.dtype.name == "uint8"


@pytest.mark.parametrize(
    ("method", "family"), [(m, f) for m, by in SUPPORT.items() for f in FAMILIES if by[f] is not None]
)
def test_method_that_does_not_apply_is_refused_naming_family_and_reason(method, family, pipes, tmp_path):
    with pytest.raises(FamilyError) as e:
        erasekit.erase(pipes[family], REQUEST, method=method, progress=False, **OPTIONS[method])
    msg = str(e.value)
    assert f"({family})" in msg and repr(method) in msg and SUPPORT[method][family] in msg
    assert not any(tmp_path.iterdir())


def test_support_table_covers_every_registered_method():
    assert set(SUPPORT) == set(erasekit.available_methods())
    table = support_table()
    assert all(f"`{m}`" in table for m in SUPPORT) and table.count("\n") == len(SUPPORT) + 2


# ------------------------------------------------------------------------------------ memory options
def test_half_precision_weights_train_with_fp32_masters(tmp_path, one_thread):
    from safetensors.torch import load_file

    from erasekit.finetune import latest_checkpoint

    pipe = tiny_family_pipeline("sd1").to(dtype=torch.bfloat16)
    run = tmp_path / "run"
    edit = erasekit.erase(pipe, REQUEST, method="esd", progress=False, run_dir=str(run), lr=1e-3, **FT)
    assert edit.trace["memory"]["fp32_master_weights"] is True
    assert {v.dtype for v in edit.tensors.values()} == {torch.bfloat16}
    ck = latest_checkpoint(run)  # the run directory's train/checkpoints (erasekit.rundir layout)
    masters = load_file(ck / "trainable.safetensors")
    assert {v.dtype for v in masters.values()} == {torch.float32}
    # the edit is the masters rounded to the model's dtype, and they moved
    for n, v in masters.items():
        assert torch.equal(edit.tensors[f"unet.{n}"], v.to(torch.bfloat16))
    assert any(not torch.equal(v, pipe.unet.get_parameter(n).float()) for n, v in masters.items())


def test_gradient_checkpointing_gives_the_same_edit(one_thread):
    from erasekit.families.memory import set_memory_options

    plain = erasekit.erase(tiny_family_pipeline("sdxl"), REQUEST, method="esd", progress=False, **FT)
    pipe = tiny_family_pipeline("sdxl")
    set_memory_options(pipe, gradient_checkpointing=True)
    ckpt = erasekit.erase(pipe, REQUEST, method="esd", progress=False, **FT)
    assert ckpt.trace["memory"]["gradient_checkpointing"] is True
    for n, v in plain.tensors.items():
        torch.testing.assert_close(ckpt.tensors[n], v, rtol=1e-5, atol=1e-6)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error():
    import importlib.util

    from erasekit.families.memory import set_memory_options

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ValueError, match="bitsandbytes"):
        set_memory_options(tiny_family_pipeline("sd1"), optimizer="adam8bit")
    with pytest.raises(ValueError, match="`optimizer`"):
        set_memory_options(tiny_family_pipeline("sd1"), optimizer="sgd")


def test_readme_family_table_matches_support():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for m, by in SUPPORT.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{m}` | ") and line.count("|") == 7)
        cells = [c.strip() for c in row.split("|")[2:6]]
        assert cells == ["yes" if by[f] is None else "no" for f in FAMILIES], m


# ------------------------------------------------------------------------------------ attacks x families
def _attack_cases():
    from erasekit.families import ATTACK_SUPPORT

    for a, by in ATTACK_SUPPORT.items():
        for f in FAMILIES:
            slow = a not in ("none", "paraphrase") or f == "sd1"  # sd1: tests/test_attacks.py
            yield pytest.param(a, f, by[f], marks=[pytest.mark.slow] if slow and by[f] is None else [], id=f"{a}-{f}")


@pytest.mark.parametrize(("attack", "family", "reason"), list(_attack_cases()))
def test_attack_runs_or_refuses_on_family(attack, family, reason, pipes, tmp_path, one_thread):
    from erasekit.attacks.base import run_attack

    original = pipes[family]
    edit = erasekit.erase(original, EraseRequest(["triangle"]), method="uce", progress=False)
    edited = edit.apply_(tiny_family_pipeline(family))
    kw = dict(sampling=SamplingConfig(steps=2), progress=False, out_dir=tmp_path / "attacks")
    if reason is None:
        result = run_attack(attack, edited, original, "triangle", ["a triangle"], **kw)
        assert len(result.records) == 1
    else:
        with pytest.raises(FamilyError, match=rf"\({family}\)"):
            run_attack(attack, edited, original, "triangle", ["a triangle"], **kw)
        assert not (tmp_path / "attacks").exists()
