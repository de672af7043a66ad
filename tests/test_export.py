"""Export (issue 16): the SVD maths against hand computations and direct residuals, every format
loaded by stock diffusers, the model card, the hub upload up to the call, and bad input."""

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from typer.testing import CliRunner

import erasekit
from erasekit import Edit, EraseRequest, load_pipeline
from erasekit.cli import app
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.export import (
    LORA_FILE,
    collect_metrics,
    export,
    kohya_state_dict,
    lora_state_dicts,
    low_rank_edit,
    plan_lora,
    push_to_hub,
    tail_errors,
    truncated_svd,
)
from erasekit.testing import tiny_pipeline

runner = CliRunner()
KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _uce(pipe, erase=("star",)):
    return erasekit.erase(pipe, EraseRequest(list(erase)), method="uce", progress=False)


def _loaded(path: Path):
    """A tiny pipeline folder loaded by load_pipeline (so the edit's base has a path)."""
    return load_pipeline(path)


# ------------------------------------------------------------------------------------------ maths
def test_tail_errors_hand_computation():
    # s = (4, 3): ||s||^2 = 25; rank 0 -> 1, rank 1 -> 3/5, rank 2 -> 0
    assert torch.allclose(tail_errors(torch.tensor([4.0, 3.0])), torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64))
    assert torch.equal(tail_errors(torch.zeros(3)), torch.zeros(4, dtype=torch.float64))


def test_truncated_svd_error_is_the_direct_residual_and_eckart_young_optimal():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(7, 5, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([5.0, 2, 1, 0.1, 0.01], dtype=torch.float64)
    )
    d = d @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    for r in range(1, 6):
        lr = truncated_svd(d, rank=r)
        direct = float((d - lr.up.double() @ lr.down.double()).norm() / d.norm())
        assert abs(direct - lr.error) < 1e-6, r
        assert lr.up.shape == (7, r) and lr.down.shape == (r, 5)
        # no random rank-r matrix beats it (Eckart-Young brute force)
        for _ in range(20):
            a = torch.randn(7, r, generator=g, dtype=torch.float64)
            b = torch.linalg.lstsq(a, d).solution  # best B for this A
            assert float((d - a @ b).norm() / d.norm()) >= lr.error - 1e-9
    full = truncated_svd(d)
    assert full.rank == 5 and full.error < 1e-12
    # the rank for <= 1 % error is the smallest rank whose direct residual is <= 1 %
    direct = [
        float((d - truncated_svd(d, rank=r).up.double() @ truncated_svd(d, rank=r).down.double()).norm() / d.norm())
        for r in range(1, 6)
    ]
    assert full.rank_for_1pct == 1 + next(i for i, e in enumerate(direct) if e <= 0.01)


def test_truncated_svd_diagonal_by_hand_energy_and_numerical_rank():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    lr = truncated_svd(d, rank=1)
    assert abs(lr.error - (5 / 14) ** 0.5) < 1e-7  # sqrt((4 + 1) / 14)
    assert torch.allclose(lr.up @ lr.down, torch.diag(torch.tensor([3.0, 0, 0])), atol=1e-6)
    assert truncated_svd(d, energy=9 / 14).rank == 1  # rank 1 keeps 9/14 of sum(s^2)
    assert truncated_svd(d, energy=9 / 14 + 1e-3).rank == 2
    assert truncated_svd(d, energy=1.0).rank == 3
    low = torch.outer(torch.arange(1.0, 5), torch.ones(3)) + torch.outer(torch.ones(4), torch.arange(3.0))
    assert truncated_svd(low).numerical_rank == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 4}, "larger than layer"),
        ({"rank": 0}, "at least 1"),
        ({"rank": 1, "energy": 0.5}, "either"),
        ({"energy": 1.5}, "energy"),
    ],
)
def test_truncated_svd_bad_rank(kwargs, match):
    with pytest.raises(ValueError, match=match):
        truncated_svd(torch.ones(3, 5), name="layer.x", **kwargs)


# ------------------------------------------------------------------------------------------ plans
def test_uce_plan_full_rank_reconstructs_the_edit(tiny_pipe):
    edit = _uce(tiny_pipe)
    plan = plan_lora(edit, tiny_pipe)
    assert plan.overall_error < 1e-6 and not plan.biases
    low = low_rank_edit(edit, tiny_pipe, plan)
    assert set(low.tensors) == set(edit.tensors)
    for k, v in edit.tensors.items():
        assert torch.allclose(low.tensors[k], v, atol=1e-6), k
    rep = plan.report()
    assert rep["rank"] == "full" and all(r["error"] < 1e-6 for r in rep["layers"].values())
    # overall error at rank r is the norm-weighted combination of the per-layer errors
    r2 = plan_lora(edit, tiny_pipe, rank=2)
    want = (
        sum((lr.error * lr.norm) ** 2 for lr in r2.layers.values()) / sum(lr.norm**2 for lr in r2.layers.values())
    ) ** 0.5
    assert abs(r2.overall_error - want) < 1e-9 and abs(plan.overall_error_at(2) - want) < 1e-9
    u = plan.uniform_rank_for_1pct
    assert plan.overall_error_at(u) <= 0.01 and (u == 0 or plan.overall_error_at(u - 1) > 0.01)


def _edit_with(pipe, changes: dict[str, torch.Tensor]) -> Edit:
    base = _uce(pipe)
    tensors = dict(base.tensors)
    for name, delta in changes.items():
        tensors[name] = erasekit.edit.get_parameter(pipe, name).detach() + delta
    return replace(base, tensors=tensors)


def test_norms_and_convs_are_refused_with_a_pointer_to_diffusers(tiny_pipe, tmp_path):
    edit = _edit_with(tiny_pipe, {"unet.conv_in.weight": torch.full_like(tiny_pipe.unet.conv_in.weight, 0.01)})
    norm = "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight"
    edit = replace(edit, tensors={**edit.tensors, norm: erasekit.edit.get_parameter(tiny_pipe, norm).detach() + 0.1})
    for fmt in ("lora", "kohya"):
        with pytest.raises(
            ValueError,
            match=r"cannot be a LoRA.*conv_in\.weight \(Conv2d\).*norm1\.weight \(LayerNorm\).*--format diffusers",
        ):
            export(edit, tiny_pipe, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_bias_deltas_exact_in_peft_refused_or_dropped_in_kohya(tiny_pipe, tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    delta = torch.linspace(-0.1, 0.1, erasekit.edit.get_parameter(tiny_pipe, name).numel())
    edit = _edit_with(tiny_pipe, {name: delta})
    plan = plan_lora(edit, tiny_pipe)
    module = name[: -len(".bias")]
    assert torch.allclose(plan.biases[module], delta)
    states, configs = lora_state_dicts(plan)
    key = module[len("unet.") :]
    assert torch.allclose(states["unet"][f"{key}.lora_B.bias"], delta)  # the bias-only module: zero rank-1 weights
    assert not states["unet"][f"{key}.lora_B.weight"].any() and configs["unet"]["lora_bias"]
    with pytest.raises(ValueError, match="--drop-bias"):
        export(edit, tiny_pipe, tmp_path / "k", "kohya")
    assert not (tmp_path / "k").exists()
    res = export(edit, tiny_pipe, tmp_path / "k", "kohya", drop_bias=True)
    assert res.lora["dropped_biases"] == {module: pytest.approx(float(delta.norm()))}
    assert res.lora["overall_error"] > 0


def test_another_base_or_an_already_edited_pipe_is_refused(tiny_pipe, tmp_path):
    edit = _uce(tiny_pipe)
    other = tiny_pipeline(1)
    with pytest.raises(ValueError, match="made for base model"):
        export(edit, other, tmp_path / "a", "lora")
    edit.apply_(tiny_pipe)
    with pytest.raises(ValueError, match="already"):
        export(edit, tiny_pipe, tmp_path / "b", "diffusers")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ formats
def test_lora_and_kohya_load_in_stock_diffusers_and_reproduce_the_edit(tiny_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = _loaded(tiny_pipe_dir)
    edit = _uce(pipe, ["star", "ring"])
    lora = export(edit, pipe, tmp_path / "lora", "lora")
    kohya = export(edit, pipe, tmp_path / "kohya", "kohya", kohya_name="star")
    assert (tmp_path / "lora" / LORA_FILE).exists() and (tmp_path / "kohya" / "star.safetensors").exists()
    for src, kw in ((tmp_path / "lora", {}), (tmp_path / "kohya", {"weight_name": "star.safetensors"})):
        stock = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None)
        stock.load_lora_weights(src, **kw)
        stock.fuse_lora()
        stock.unload_lora_weights()
        for name, value in edit.tensors.items():
            assert torch.allclose(erasekit.edit.get_parameter(stock, name), value, atol=1e-5), (src, name)
    assert lora.lora["overall_error"] < 1e-6 and kohya.lora == lora.lora


def test_kohya_keys_follow_the_format_and_survive_the_converters_round_trip(tiny_pipe, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    edit = _uce(tiny_pipe)
    plan = plan_lora(edit, tiny_pipe, rank=3)
    states, _ = lora_state_dicts(plan)
    kohya = kohya_state_dict(states)
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)]
    # the same keys as diffusers' own PEFT -> kohya converter
    peft = {f"unet.{k}": v for k, v in states["unet"].items()}
    assert set(kohya) == set(convert_state_dict_to_kohya(peft))
    assert all(
        k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_up_", "lora_unet_mid_")) for k in kohya
    )
    # kohya -> diffusers -> peft (the converters load_lora_weights uses) gives back the peft keys and B A
    back, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    peft_back = convert_unet_state_dict_to_peft({k[len("unet.") :]: v for k, v in back.items()})
    assert set(peft_back) == set(states["unet"])
    for key, down in states["unet"].items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = states["unet"][f"{module}.lora_B.weight"]
        old = module.rsplit(".", 1)
        alpha = alphas[f"unet.{old[0]}.processor.{old[1]}_lora.down.weight.alpha"]
        got = peft_back[f"{module}.lora_B.weight"] @ peft_back[key] * (alpha / down.shape[0])  # kohya scale alpha/r
        assert torch.allclose(got, up @ down, atol=1e-6), module


def _tiny_with_safety_checker(path: Path) -> Path:
    """A tiny saved pipeline that has its own safety checker and feature extractor (built offline)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = tiny_pipeline(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=4,
    )
    pipe.register_modules(
        safety_checker=StableDiffusionSafetyChecker(cfg),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_diffusers_export_keeps_the_bases_safety_checker_safetensors_only(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = _tiny_with_safety_checker(tmp_path / "base")
    pipe = load_pipeline(base)
    assert pipe.safety_checker is None  # load_pipeline drops it: the export must bring it back
    edit = _uce(pipe)
    res = export(edit, pipe, tmp_path / "out", "diffusers")
    out = tmp_path / "out"
    index = json.loads((out / "model_index.json").read_text())
    base_index = json.loads((base / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == base_index["feature_extractor"] and index["requires_safety_checker"] is True
    assert (out / "safety_checker" / "model.safetensors").exists() and res.record["base_components_copied"] == [
        "safety_checker",
        "feature_extractor",
    ]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    stock = StableDiffusionPipeline.from_pretrained(out)
    assert stock.safety_checker is not None and stock.feature_extractor is not None
    for name, value in edit.tensors.items():
        assert torch.equal(erasekit.edit.get_parameter(stock, name), value), name
    assert erasekit.pipeline.fingerprint(stock) != edit.base["fingerprint"]  # the edited weights


def test_unet_export_loads_as_a_unet(tiny_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    edit = _uce(tiny_pipe)
    export(edit, tiny_pipe, tmp_path / "u", "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    for name, value in edit.tensors.items():
        assert torch.equal(unet.get_parameter(name[len("unet.") :]), value)
    assert (tmp_path / "u" / "README.md").exists() and (tmp_path / "u" / "export.json").exists()


# ------------------------------------------------------------------------------------------ bad input
def test_non_empty_out_unsupported_format_and_rank_too_large(tiny_pipe, tmp_path):
    edit = _uce(tiny_pipe)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(edit, tiny_pipe, busy, "lora")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="not one of"):
        export(edit, tiny_pipe, tmp_path / "x", "ckpt")
    with pytest.raises(ValueError, match=r"larger than layer .*to_k.*at most 16"):
        export(edit, tiny_pipe, tmp_path / "x", "lora", rank=17)
    with pytest.raises(ValueError, match="lora/kohya only"):
        export(edit, tiny_pipe, tmp_path / "x", "diffusers", rank=4)
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    export(edit, tiny_pipe, tmp_path / "empty", "lora", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


def test_a_failure_while_writing_leaves_no_directory(tiny_pipe, tmp_path, monkeypatch):
    edit = _uce(tiny_pipe)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export(edit, tiny_pipe, tmp_path / "out", "diffusers")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ card, hub
def _metrics(run: Path) -> None:
    (run / "eval" / "shapes-objects").mkdir(parents=True)
    (run / "eval" / "shapes-objects" / "metrics.json").write_text(
        json.dumps(
            {
                "protocol": "shapes-objects",
                "esr_1": 0.9,
                "psr_1": 0.75,
                "esr_3": None,
                "n_per_class": 10,
                "seed": 0,
                "erase": ["star"],
                "detector": {"name": "shapes-detector", "version": "abc123"},
                "per_class": {"star": {"top1": 0.1}},
            }
        )
    )


def test_model_card_has_eval_results_config_and_fingerprint(tiny_pipe, tmp_path):
    edit = _uce(tiny_pipe)
    run = tmp_path / "run"
    edit.save(run)
    _metrics(run)
    attack = tmp_path / "attack.json"
    attack.write_text(
        json.dumps(
            {
                "protocol": "shapes-attack",
                "seed": 3,
                "detector": "d",
                "pre_attack_rate": 0.1,
                "attacks": {"ringabell": {"asr": 0.4}},
            }
        )
    )
    res = export(edit, tiny_pipe, tmp_path / "out", "lora", rank=2, run_dir=run, metrics=[attack], license="mit")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "mit" and "erasekit" in card.data.tags and "lora" in card.data.tags
    got = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    assert got[("erasekit/shapes-objects", "esr_1")].metric_value == 0.9
    assert got[("erasekit/shapes-objects", "psr_1")].metric_config == "shapes-detector abc123"
    assert got[("erasekit/shapes-objects", "esr_1")].dataset_args["seeds"] == "0..9 per class"
    assert got[("erasekit/shapes-attack", "asr_ringabell")].metric_value == 0.4
    assert ("erasekit/shapes-objects", "esr_3") not in got  # not measured: not reported
    text = (tmp_path / "out" / "README.md").read_text()
    assert edit.base["fingerprint"] in text and '"lamb"' in text and "relative error" in text
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["edit"]["config"] == json.loads(json.dumps(edit.config)) and record["lora"]["rank"] == 2
    assert record["files"] == res.files and "README.md" in res.files
    assert [m["source"] for m in record["metrics"]] == ["eval/shapes-objects/metrics.json", str(attack)]


def test_collect_metrics_skips_files_without_metrics(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"protocol": "x", "seconds": 3}))
    assert collect_metrics(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_metrics(None, [tmp_path / "nope.json"])


def test_push_to_hub_offline_up_to_the_upload_call(tiny_pipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "url")
    edit = _uce(tiny_pipe)
    export(edit, tiny_pipe, tmp_path / "out", "unet")
    assert push_to_hub(tmp_path / "out", "me/erased") == "url"
    assert calls[0] == ("create", "me/erased", {"private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(tmp_path / "out") and calls[1][1]["repo_id"] == "me/erased"
    with pytest.raises(ValueError, match="user/name"):
        push_to_hub(tmp_path / "out", "no slash")
    with pytest.raises(FileNotFoundError, match="not an EraseKit export"):
        push_to_hub(tmp_path, "me/x")


def test_cli_export_prints_the_report_and_pushes(tiny_pipe_dir, tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    run = tmp_path / "run"
    r = runner.invoke(app, ["erase", "--model", str(tiny_pipe_dir), "--erase", "star", "--out", str(run)])
    assert r.exit_code == 0, r.output
    _metrics(run)
    r = runner.invoke(
        app,
        [
            "export",
            str(run),
            "--format",
            "lora",
            "--rank",
            "3",
            "--out",
            str(tmp_path / "l"),
            "--push-to-hub",
            "me/star",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "overall relative error" in r.output and "uniform rank for <= 1% error" in r.output
    assert uploads and uploads[0]["repo_id"] == "me/star"
    assert json.loads((tmp_path / "l" / "export.json").read_text())["metrics"][0]["values"]["esr_1"] == 0.9
    for args, match in (
        (["--format", "ckpt"], "not one of"),
        (["--format", "lora", "--rank", "x"], "positive integer"),
        (["--format", "lora", "--rank", "999"], "larger than layer"),
        (["--format", "lora", "--model", "shapes"], "made for base model"),
    ):
        r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "bad"), *args])
        assert r.exit_code == 2 and match in r.output, (args, r.output)
        assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ images
STOCK_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _NoEraseKit(importlib.abc.MetaPathFinder):  # this process may import diffusers only
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "erasekit":
                raise ImportError("erasekit must not be imported here")
            return None

    sys.meta_path.insert(0, _NoEraseKit())
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    job = json.loads(sys.argv[1])
    out = {}
    for label, kind, path, weight_name in job["models"]:
        if kind == "folder":
            pipe = StableDiffusionPipeline.from_pretrained(path)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(job["base"], safety_checker=None)
            pipe.load_lora_weights(path, **({"weight_name": weight_name} if weight_name else {}))
        pipe.set_progress_bar_config(disable=True)
        shape = (1, pipe.unet.config.in_channels, job["size"] // pipe.vae_scale_factor, job["size"] // pipe.vae_scale_factor)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in job["seeds"]])
        res = pipe(job["prompts"], latents=latents, num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                   height=job["size"], width=job["size"], output_type="np")
        out[label] = (np.clip(res.images, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert not any(m.split(".")[0] == "erasekit" for m in sys.modules)
    np.savez(job["npz"], **out)
    """
)


def _stock_images(tmp_path: Path, base: Path, models, prompts, seeds, steps, guidance, size) -> dict[str, np.ndarray]:
    npz = tmp_path / "stock.npz"
    job = dict(
        models=models,
        base=str(base),
        prompts=prompts,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        size=size,
        npz=str(npz),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", STOCK_SCRIPT, json.dumps(job)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(npz))


def _equal_to_apply(edit, pipe, base: Path, tmp_path: Path, prompts, seeds, steps, guidance, size, kohya=False) -> None:
    export(edit, pipe, tmp_path / "folder", "diffusers")
    export(edit, pipe, tmp_path / "lora", "lora")  # full rank
    models = [["folder", "folder", str(tmp_path / "folder"), None], ["lora", "lora", str(tmp_path / "lora"), None]]
    if kohya:
        export(edit, pipe, tmp_path / "kohya", "kohya", kohya_name="k")
        models.append(["kohya", "lora", str(tmp_path / "kohya"), "k.safetensors"])
    stock = _stock_images(tmp_path, base, models, prompts, seeds, steps, guidance, size)
    cfg = SamplingConfig(steps=steps, guidance_scale=guidance, height=size, width=size)
    before = generate_images(pipe, prompts, seeds, cfg)
    edit.apply_(pipe)
    ours = generate_images(pipe, prompts, seeds, cfg)
    assert np.abs(ours.astype(int) - before.astype(int)).max() > 1  # the edit changes the images
    for label, imgs in stock.items():
        diff = np.abs(imgs.astype(int) - ours.astype(int)).max()
        print(f"{label}: max pixel difference {diff}/255 over {len(imgs)} images")  # shown with pytest -s
        assert diff <= 1, f"{label}: max pixel difference {diff}/255"


@pytest.mark.slow  # a fresh interpreter importing diffusers + three pipelines: ~20-80 s on 2 busy cores
def test_tiny_uce_exports_give_apply_images_in_a_process_without_erasekit(tiny_pipe_dir, tmp_path):
    pipe = load_pipeline(tiny_pipe_dir)
    edit = erasekit.erase(pipe, EraseRequest(["star"]), method="uce", erase_scale=50.0, progress=False)
    _equal_to_apply(edit, pipe, tiny_pipe_dir, tmp_path, ["a star", "a star on red"], [0, 1], 3, 3.0, 32, kohya=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uce", "esd-x"])
def test_miniature_exports_give_apply_images_in_a_process_without_erasekit(method, tmp_path):
    torch.manual_seed(0)
    pipe = load_pipeline("shapes")
    request = EraseRequest(["circle", "square"])
    if method == "uce":
        edit = erasekit.erase(pipe, request, method="uce", progress=False)
    else:  # ESD-x: a few steps at a large lr, enough to change the images; its bias deltas go through lora_bias
        edit = erasekit.erase(
            pipe, request, method="esd", train_method="xattn", steps=4, ddim_steps=4, lr=1e-3, progress=False
        )
        assert any(k.endswith(".bias") for k in edit.tensors)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    _equal_to_apply(edit, pipe, erasekit.pipeline.bundled_path(), tmp_path, prompts, [0, 1, 2, 3], 20, 5.0, 32)


def test_miniature_folder_export_keeps_its_sampling_defaults(tmp_path):
    from erasekit.eval.generate import sampling_defaults

    pipe = load_pipeline("shapes")
    res = export(_uce(pipe, ["circle"]), pipe, tmp_path / "m", "diffusers")
    assert res.record["base_components_copied"] == ["erasekit_world.json"]
    assert sampling_defaults(load_pipeline(tmp_path / "m")) == sampling_defaults(pipe)  # 20 steps, guidance 5
