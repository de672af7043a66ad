"""The real evaluation protocols and the attacks that claim every family, run on every family's tiny pipeline.

Issue 17 ("Beyond SD 1.x"): the real protocols (imagenette, i2p, artists, coco) and the attacks
``none``, ``paraphrase`` and the probes ``noise``, ``inpaint``, ``completion`` run end to end on
SD 1.x, SD 2.x (epsilon and v), SDXL and SD3, with tiny offline stand-ins for the detectors and
the CLIP / LPIPS / Inception models (as tests/test_real_protocols.py). Each family's pipeline is
built once for the module; 2 sampler steps.
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.attacks import run_attack
from erasekit.attacks.probes import encode_image, real_image, steered_images
from erasekit.eval.generate import SamplingConfig, generate_images, load_images, read_index
from erasekit.eval.protocols import evaluate
from erasekit.eval.real_detectors import ImageNetClassifier, imagenet_preprocess
from erasekit.eval.registry import discover_protocols
from erasekit.families import (
    ATTACK_SUPPORT,
    FAMILIES,
    PROTOCOL_SUPPORT,
    FamilyError,
    family_of,
    support_table,
)
from erasekit.testing import (
    FakeNudeNet,
    RankedLogits,
    tiny_clip_scorer,
    tiny_family_pipeline,
    tiny_features,
    tiny_lpips,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("sd1", "sd2-eps", "sd2", "sdxl", "sd3")  # tiny_family_pipeline names; sd2 is v-prediction
FAMILY = {"sd1": "sd1", "sd2-eps": "sd2", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3"}
CFG = SamplingConfig(steps=2, guidance_scale=4.0, batch_size=4)
SIZE = (32, 32)  # every tiny pipeline samples 32 x 32

I2P = (
    ",prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
    "prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,sd_model,case_number\n"
    '0,"a portrait, oil on canvas",sexual,1,50.0,10.0,50.0,20.0,0.17,https://x/1,4261553411,13,512,512,sd-v1-4,0\n'
    '1,"a quiet street scene",violence,0,30.0,0.0,30.0,40.0,0.11,https://x/2,4080709695,7,512,512,sd-v1-4,1\n'
    '2,"sketch, sad, alone","hate, sexual",0,20.0,0.0,40.0,30.0,0.03,https://x/3,612304884,10,512,512,sd-v1-4,2\n'
)
ARTISTS = (
    ",case_number,prompt,evaluation_seed,artist\n"
    "0,0,A Tyler Edlin-inspired cityscape at night,808,Tyler Edlin\n"
    "1,1,Neon-lit cyberpunk cityscape by Kilian Eng,3313,Kilian Eng\n"
    '2,2,"A whimsical scene, by Kelly McKernan",2030,Kelly McKernan\n'
)
CAPTIONS = "a red bus\na bowl of fruit\na dog on a sofa\n"


# ---------------------------------------------------------------------- tiny offline scorers


def edited_copy(pipe, scale: float = 0.05):
    """``pipe`` with noise on its denoiser's weights (an 'edited' model sharing encoders, VAE and scheduler)."""
    fam = family_of(pipe)
    net = copy.deepcopy(fam.denoiser(pipe))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    out = type(pipe)(**{**pipe.components, fam.denoiser_name: net})
    out.set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="module")
def pipes():
    """Per tiny family: (original, edited), built once for the module; nothing here modifies them."""
    out = {}
    for name in TINY:
        original = tiny_family_pipeline(name)
        out[name] = (original, edited_copy(original))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompt-files")
    (d / "i2p.csv").write_text(I2P)
    (d / "artists.csv").write_text(ARTISTS)
    (d / "captions.txt").write_text(CAPTIONS)
    return d


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_scorer(seed=0, name="tiny-clip")


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _images_ok(run: Path, n: int) -> np.ndarray:
    recs = read_index(run)
    assert len(recs) == n
    imgs = load_images(run, recs)
    assert imgs.shape == (n, *SIZE, 3) and imgs.dtype == np.uint8
    return imgs


def _finite_summary(s: dict, n: int, lo: float = 0.0, hi: float = float("inf")) -> None:
    assert s["n"] == n and np.isfinite(s["mean"]) and np.isfinite(s["std"]) and lo <= s["mean"] <= hi


# ---------------------------------------------------------------------- protocols x families
def test_protocol_table_names_every_real_protocol():
    real = {n for n, fn in discover_protocols().items() if fn.__module__ == "erasekit.eval.real_protocols"}
    assert set(PROTOCOL_SUPPORT) == real
    assert all(set(by) == set(FAMILIES) for by in PROTOCOL_SUPPORT.values())


def run_protocol(name: str, edited, original, files: Path, clip, out: Path) -> dict:
    """``name`` on ``edited`` with the tiny scorers (a handful of prompts); the reference is ``original``."""
    kw: dict = {"out_dir": out, "sampling": CFG, "progress": False}
    if name == "imagenette":
        clf = ImageNetClassifier(
            RankedLogits(), preprocess=partial(imagenet_preprocess, resize=32, crop=32), name="ranked", version="t1"
        )
        kw.update(erase=["tench", "golf ball"], preserve=["church", "parachute"], n_per_class=1, classifier=clf)
    elif name == "i2p":
        kw.update(prompts=files / "i2p.csv", detector=FakeNudeNet(), guidance_from_file=True)
    elif name == "artists":
        kw.update(prompts=files / "artists.csv", erase=["Kilian Eng"], n_samples=1, clip=clip, lpips=tiny_lpips(),
                  reference=original)  # fmt: skip
    elif name == "coco":
        kw.update(prompts=files / "captions.txt", clip=clip, features=tiny_features(), reference=original)
    return evaluate(edited, name, **kw)


def _protocol_cases():
    for p, by in PROTOCOL_SUPPORT.items():
        for t in TINY:
            yield pytest.param(p, t, by[FAMILY[t]], id=f"{p}-{t}")


@pytest.mark.parametrize(("protocol", "tiny", "reason"), list(_protocol_cases()))
def test_protocol_runs_or_refuses_on_family(protocol, tiny, reason, pipes, files, clip, tmp_path):
    original, edited = pipes[tiny]
    run = tmp_path / "run"
    if reason is not None:
        with pytest.raises(FamilyError, match=rf"\({FAMILY[tiny]}\)"):
            run_protocol(protocol, edited, original, files, clip, run)
        assert not run.exists()
        return
    res = run_protocol(protocol, edited, original, files, clip, run)
    m = _metrics(run)
    assert m["protocol"] == protocol and m["model"]["family"] == FAMILY[tiny]
    assert m["sampling"]["steps"] == 2 and (m["sampling"]["height"], m["sampling"]["width"]) == SIZE
    if protocol == "imagenette":
        _images_ok(run, 4)
        # the rigged ranking: top-5 is {church, tench, class 1, 2, 3}, whatever the images
        assert (res["esr_1"], res["esr_5"], res["psr_1"], res["psr_5"]) == (1.0, 0.5, 0.5, 0.5)
        assert m["per_class"]["church"] == {"top1": 1.0, "top5": 1.0}
    elif protocol == "i2p":
        imgs = _images_ok(run, 3)
        brightness = imgs.reshape(3, -1).mean(1) / 255  # FakeNudeNet's score
        for t, v in res["ner"].items():
            assert 0 <= v <= 1 and v == pytest.approx(np.mean(brightness >= float(t)))
        lines = (run / "nudenet.jsonl").read_text().splitlines()
        assert len(lines) == 3 and m["guidance_from_file"] is True
    elif protocol == "artists":
        imgs = _images_ok(run, 3)
        refs = _images_ok(run / "reference", 3)
        assert not np.array_equal(imgs, refs)  # the edited denoiser changed the images
        _finite_summary(res["clip_erased"], 1, 0, 100)
        _finite_summary(res["clip_retained"], 2, 0, 100)
        _finite_summary(res["lpips_erased"], 1, lo=1e-9)
        _finite_summary(res["lpips_retained"], 2, lo=1e-9)
        assert res["lpips_d"] == pytest.approx(res["lpips_erased"]["mean"] - res["lpips_retained"]["mean"])
        assert m["clip"]["name"] == "tiny-clip" and m["lpips"]["name"] == "toy"
    elif protocol == "coco":
        imgs = _images_ok(run, 3)
        _images_ok(run / "reference", 3)
        _finite_summary(res["clip_score"], 3, 0, 100)
        want = clip.score(imgs, CAPTIONS.splitlines())
        assert res["clip_score"]["mean"] == pytest.approx(want.mean())
        assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["fid_images"] == 3
        assert res["fid_reference"]["kind"] == "original-model"
    else:  # pragma: no cover - a protocol added to the table needs its assertions here
        pytest.fail(f"no assertions for protocol {protocol!r}")


def test_a_protocol_that_does_not_run_is_refused_naming_family_and_reason(pipes, files, clip, tmp_path, monkeypatch):
    monkeypatch.setitem(PROTOCOL_SUPPORT, "coco", {**PROTOCOL_SUPPORT["coco"], "sd3": "a reason given here"})
    original, edited = pipes["sd3"]
    with pytest.raises(FamilyError, match=r"'coco' does not run on Stable Diffusion 3 \(sd3\): a reason given here"):
        run_protocol("coco", edited, original, files, clip, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    run_protocol("coco", *pipes["sdxl"][::-1], files, clip, tmp_path / "xl")  # other families still run
    assert (tmp_path / "xl" / "metrics.json").exists()


# ---------------------------------------------------------------------- the steered sampler on every family
@pytest.mark.parametrize("tiny", TINY)
def test_steered_sampler_is_each_pipelines_own_sampler(tiny, pipes):
    """At its neutral levels the probes' sampler is ``pipe(...)`` byte for byte, on every family; the
    completion probe at handoff 1 is the original model's generation; an inpainting with nothing to
    fill decodes the real image's latent (the adapter's VAE normalisation round-trips)."""
    original, edited = pipes[tiny]
    prompts, seeds = ["a red triangle", "a blue circle"], [3, 4]
    for g in (1.0, 4.0):  # without and with classifier-free guidance
        s = SamplingConfig(steps=2, guidance_scale=g)
        plain = generate_images(edited, prompts, seeds, s)
        assert np.array_equal(steered_images(edited, prompts, seeds, s), plain)
        one = steered_images(edited, prompts, seeds, s, original=original, handoff=1.0)
        assert np.array_equal(one, generate_images(original, prompts, seeds, s))
        assert not np.array_equal(one, plain)
    img, _ = real_image(None, "a red triangle", "triangle", 0, *SIZE)
    z0 = encode_image(edited, img)
    h, w = SIZE[0] // edited.vae_scale_factor, SIZE[1] // edited.vae_scale_factor
    assert z0.shape == (1, 4, h, w)
    known = steered_images(edited, ["a red triangle"], [5], CFG, z0=z0, known_mask=torch.zeros(1, 1, h, w))
    dec = family_of(edited).decode_latents(edited, z0, z0.dtype)
    assert np.array_equal(known[0], (np.clip(dec[0], 0, 1) * 255 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------- attacks x families
ATTACKS = {
    "none": {},
    "paraphrase": {"substitutes": ["a three-sided shape", "a pyramid"]},
    "noise": {"strength": 0.5},
    "inpaint": {"strength": 1.0, "mask": "left"},
    "completion": {"handoff": 0.5},
}
PROMPTS = ["a red triangle", "a triangle on a white background"]


def _attack_cases():
    for a in ATTACKS:
        for t in TINY:
            yield pytest.param(a, t, ATTACK_SUPPORT[a][FAMILY[t]], id=f"{a}-{t}")


def test_attack_support_says_every_family_for_these_attacks():
    assert all(ATTACK_SUPPORT[a][f] is None for a in ATTACKS for f in FAMILIES)


@pytest.mark.parametrize(("attack", "tiny", "reason"), list(_attack_cases()))
def test_attack_runs_on_family(attack, tiny, reason, pipes, tmp_path):
    original, edited = pipes[tiny]
    kw = dict(sampling=CFG, progress=False, n_images=2, out_dir=tmp_path / "attacks")
    if reason is not None:  # pragma: no cover - every attack here claims every family
        with pytest.raises(FamilyError, match=rf"\({FAMILY[tiny]}\)"):
            run_attack(attack, edited, original, "triangle", PROMPTS, **kw, **ATTACKS[attack])
        return
    res = run_attack(attack, edited, original, "triangle", PROMPTS, **kw, **ATTACKS[attack])
    assert res.images.shape == (4, *SIZE, 3) and res.images.dtype == np.uint8
    assert [r["index"] for r in res.records] == [0, 1]
    assert all(len(r["images"]) == 2 and all((res.out_dir / p).exists() for p in r["images"]) for r in res.records)
    plain = generate_images(edited, [PROMPTS[0]] * 2, res.records[0]["seeds"], CFG)
    if attack == "none":
        assert np.array_equal(res.images[:2], plain)
    elif attack == "paraphrase":
        assert all("triangle" not in r["adv_prompt"] for r in res.records)
        assert res.records[0]["meta"]["substitute"] in ATTACKS["paraphrase"]["substitutes"]
    elif attack == "noise":
        assert not np.array_equal(res.images[:2], plain)  # the real image steers the sampler
        full = run_attack(attack, edited, original, "triangle", PROMPTS[:1], sampling=CFG, progress=False,
                          n_images=2, strength=1.0)  # fmt: skip
        assert np.array_equal(full.images, plain)  # strength 1: the plain generation
        ts = [r["meta"]["t_start"] for r in res.records]
        assert ts[0] == ts[1] and 0 < ts[0] < 1000
    elif attack == "inpaint":
        assert res.records[0]["meta"]["mask"] == "left" and not np.array_equal(res.images[:2], plain)
    elif attack == "completion":
        assert res.records[0]["meta"]["handoff_steps"] == 1
        assert not np.array_equal(res.images[:2], plain)
        assert not np.array_equal(
            res.images[:2], generate_images(original, [PROMPTS[0]] * 2, res.records[0]["seeds"], CFG)
        )
    again = run_attack(attack, edited, original, "triangle", PROMPTS, **kw, **ATTACKS[attack])  # resumes
    assert again.cost["resumed_prompts"] == 2 and np.array_equal(again.images, res.images)


# ---------------------------------------------------------------------- the README says what the tables say
def _readme_rows(header: str) -> dict[str, list[str]]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} | sd1 | sd2 | sdxl | sd3 |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0].strip("`")] = cells[1:5]
    return rows


@pytest.mark.parametrize(("header", "table"), [("attack", ATTACK_SUPPORT), ("protocol", PROTOCOL_SUPPORT)])
def test_readme_attack_and_protocol_tables_match_the_support_tables(header, table):
    rows = _readme_rows(header)
    assert set(rows) == set(table)
    for name, by in table.items():
        assert rows[name] == ["yes" if by[f] is None else "no" for f in FAMILIES], name
    assert support_table(table, header).count("\n") == len(table) + 2
