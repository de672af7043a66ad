"""UCE on SD3: one float64 factorisation per joint block, shared by its add_k_proj and add_v_proj.

Each block's text-stream K and V read the same inputs, and UCE's factor (RECE eq. 3) depends only on
the inputs, so :func:`erasekit.families.closed_forms.per_block_uce` factors once per block
(:func:`erasekit.methods.closed_form.uce_edit_weights`). Checked on the tiny SD3 pipeline against the
previous per-projection formula written out here (``torch.linalg.solve`` and ``lstsq``, float64), and by
counting the factorisations.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.families import family_of
from erasekit.families.closed_forms import per_block_uce
from erasekit.methods import closed_form
from erasekit.methods.base import make_config
from erasekit.methods.uce import uce_prompts
from erasekit.testing import tiny_sd3_pipeline

REQUEST = EraseRequest(erase=["triangle", "red circle"], preserve=["square"])
CASES = {  # name: (request, options)
    "authors": (REQUEST, {}),  # '' retained at all positions (T5's included), from_last_word pairs, lambda 0.5
    "paper-all-v": (REQUEST, dict(preset="paper", erase_positions="all", lamb=0.3, projections=("to_v",))),
    "paper-nothing-preserved": (EraseRequest(erase=["triangle"]), dict(preset="paper")),
}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline(0)


def _last_word(pipe, prompt: str) -> int:
    """Index of the prompt's last word token: ids are [BOS, words..., EOS] (the start token for '')."""
    return len(pipe.tokenizer(prompt).input_ids) - 2


def _rows(pipe, xs: torch.Tensor, ys: torch.Tensor, s: str, t: str, positions: str):
    if positions == "all":
        return xs, ys
    i_s, i_t = _last_word(pipe, s), _last_word(pipe, t)
    n = pipe.tokenizer.model_max_length - max(i_s, i_t)
    return xs[i_s : i_s + n], ys[i_t : i_t + n]


def _block_vectors(pipe, x: dict[str, torch.Tensor], erased, targets, preserved, cfg):
    """(c_i, c_i*, c_j) of one block by hand, float64, from its captured inputs by prompt (T, d)."""
    pairs = [_rows(pipe, x[s], x[t], s, t, cfg.erase_positions) for s, t in zip(erased, targets, strict=True)]
    ci = torch.cat([a for a, _ in pairs]).double()
    ct = torch.cat([b for _, b in pairs]).double()
    rows = [_rows(pipe, x[p], x[p], p, p, cfg.preserve_positions)[0] for p in preserved]
    cp = torch.cat(rows).double() if rows else torch.zeros(0, ci.shape[1], dtype=torch.float64)
    return ci, ct, cp


def _per_projection(w_old, ci, ct, cp, s_e, s_p, lamb):
    """The previous per-projection solve: W = W_old L R^-1 (RECE eq. 3), and the same W by lstsq."""
    w = w_old.double()
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    left = s_e * ct.T @ ci + s_p * cp.T @ cp + lamb * eye
    right = s_e * ci.T @ ci + s_p * cp.T @ cp + lamb * eye
    w_solve = torch.linalg.solve(right, (w @ left).T).T
    a = torch.cat([s_e**0.5 * ci, s_p**0.5 * cp, lamb**0.5 * eye])
    b = torch.cat([s_e**0.5 * ct @ w.T, s_p**0.5 * cp @ w.T, lamb**0.5 * w.T])
    return w_solve, torch.linalg.lstsq(a, b).solution.T


def _capture_and_count(monkeypatch, fam):
    """Record what kv_inputs returns (prompts -> per-block rows) and every UCE factorisation."""
    seen: dict = {}
    calls: list[tuple[str, int]] = []
    kv_inputs = type(fam).kv_inputs

    def recording(self, pipe, prompts, **kw):
        out = kv_inputs(self, pipe, prompts, **kw)
        seen.update({mod: dict(zip(prompts, x, strict=True)) for mod, x in out.items()})
        return out

    def counted(fn):
        def wrapper(erase_in, *args, **kw):
            calls.append((fn.__name__, erase_in.shape[1]))
            return fn(erase_in, *args, **kw)

        return wrapper

    monkeypatch.setattr(type(fam), "kv_inputs", recording)
    monkeypatch.setattr(closed_form, "uce_factor", counted(closed_form.uce_factor))
    monkeypatch.setattr(closed_form, "uce_factor_lowrank", counted(closed_form.uce_factor_lowrank))
    return seen, calls


@pytest.mark.parametrize("case", list(CASES))
def test_sd3_uce_factors_once_per_block_and_equals_the_per_projection_solve(case, pipe, monkeypatch, one_thread):
    fam = family_of(pipe)
    seen, calls = _capture_and_count(monkeypatch, fam)
    request, options = CASES[case]
    edit = erasekit.erase(pipe, request, method="uce", progress=False, **options)
    cfg = make_config("uce", **options)
    tr = edit.trace
    erased, targets, preserved = tr["erase_prompts"], tr["target_prompts"], tr["preserve_prompts"]
    s_p = tr["preserve_scale"]
    assert (erased, targets, preserved) == tuple(uce_prompts(request, cfg))
    assert bool(preserved) == (case != "paper-nothing-preserved")

    blocks = fam.kv_modules(pipe)
    assert len(blocks) == pipe.transformer.config.num_layers == 2
    # (b) one factorisation per block, whatever the number of projections it edits
    assert len(calls) == len(blocks) and {d for _, d in calls} == {pipe.transformer.config.caption_projection_dim}
    names = {"to_k": "add_k_proj", "to_v": "add_v_proj"}
    assert len(edit.tensors) == len(blocks) * len(cfg.projections)

    # (a) every block's K and V equal the per-projection float64 solve (and lstsq) on that block's inputs
    worst = 0.0
    for mod, attn in blocks.items():
        ci, ct, cp = _block_vectors(pipe, seen[mod], erased, targets, preserved, cfg)
        for proj in cfg.projections:
            layer = getattr(attn, names[proj])
            w_old = layer.weight.detach()
            new = edit.tensors[f"transformer.{mod}.{names[proj]}.weight"]
            assert new.dtype == w_old.dtype == torch.float32
            w_solve, w_lstsq = _per_projection(w_old, ci, ct, cp, cfg.erase_scale, s_p, cfg.lamb)
            assert float((w_solve - w_old.double()).abs().max()) > 1e-3  # the edit moves the weights
            # float32 result vs the float64 solve: the cast's rounding only (half an ulp, ~6e-8 at |w| ~ 1)
            torch.testing.assert_close(new.double(), w_solve, rtol=1.2e-7, atol=1e-9)
            torch.testing.assert_close(new.double(), w_lstsq, rtol=1e-5, atol=1e-6)
            worst = max(worst, float((new.double() - w_solve).abs().max()))
    assert worst < 1e-6


def test_per_block_uce_in_float64_equals_the_per_projection_solve_to_rounding(pipe, monkeypatch, one_thread):
    """On float64 weights (no cast at the end) the shared block factor and the per-projection solve agree
    to float64 rounding."""
    fam = family_of(pipe)
    seen, calls = _capture_and_count(monkeypatch, fam)
    cfg = make_config("uce")
    erased, targets, preserved = uce_prompts(REQUEST, cfg)
    s_p = cfg.resolved_preserve_scale(len(preserved))
    original = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    pipe.transformer.double()
    try:
        out = per_block_uce(
            pipe, fam, erased, targets, preserved, cfg, preserve_scale=s_p, solve=closed_form.uce_edit_weights
        )
        blocks = fam.kv_modules(pipe)
        assert len(calls) == len(blocks) and len(out) == 2 * len(blocks)
        for mod, attn in blocks.items():
            ci, ct, cp = _block_vectors(pipe, seen[mod], erased, targets, preserved, cfg)
            for proj in ("add_k_proj", "add_v_proj"):
                w_old = getattr(attn, proj).weight.detach()
                new = out[f"transformer.{mod}.{proj}.weight"]
                assert new.dtype == torch.float64
                w_solve, _ = _per_projection(w_old, ci, ct, cp, cfg.erase_scale, s_p, cfg.lamb)
                torch.testing.assert_close(new, w_solve, rtol=0, atol=1e-12)
    finally:
        pipe.transformer.float()
        for n, p in pipe.transformer.named_parameters():
            assert torch.equal(p, original[n])


class _WideBlocks:
    """A stand-in family with SD3's per-block K/V inputs at d = 256 (the tiny pipeline's 16-d blocks never
    have fewer erased rows than d/2): 3 blocks, seeded random inputs per prompt and block."""

    denoiser_name, kv_names, d = "transformer", ("add_k_proj", "add_v_proj"), 256

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.blocks = {f"transformer_blocks.{i}.attn": torch.nn.Module() for i in range(3)}
        for attn in self.blocks.values():
            for n in self.kv_names:
                attn.add_module(n, torch.nn.Linear(self.d, 64, bias=False))

    def kv_modules(self, pipe):
        return self.blocks

    def kv_inputs(self, pipe, prompts, **_):
        def rows(p, n):
            g = torch.Generator().manual_seed(zlib.crc32(f"{n}\0{p}".encode()))
            return torch.randn(77 + 8, self.d, generator=g)

        return {n: torch.stack([rows(p, n) for p in prompts]) for n in self.blocks}


def test_per_block_uce_low_rank_form_factors_once_per_block_and_matches(monkeypatch, one_thread):
    from erasekit.testing import TOKENIZER_DIR
    from erasekit.world.tokenizer import load_clip_tokenizer

    class _Pipe:
        tokenizer = load_clip_tokenizer(TOKENIZER_DIR)

    pipe, fam = _Pipe(), _WideBlocks()
    seen, calls = _capture_and_count(monkeypatch, fam)
    cfg = make_config("uce")
    erased, targets, preserved = uce_prompts(EraseRequest(erase=["triangle"], preserve=["square"]), cfg)
    s_p = cfg.resolved_preserve_scale(len(preserved))
    out = per_block_uce(
        pipe, fam, erased, targets, preserved, cfg, preserve_scale=s_p, solve=closed_form.uce_edit_weights
    )
    assert [name for name, _ in calls] == ["uce_factor_lowrank"] * len(fam.blocks)  # < d/2 erased rows
    for mod, attn in fam.blocks.items():
        ci, ct, cp = _block_vectors(pipe, seen[mod], erased, targets, preserved, cfg)
        assert ci.shape[0] < fam.d // 2
        for proj in fam.kv_names:
            w_old = getattr(attn, proj).weight.detach()
            w_solve, _ = _per_projection(w_old, ci, ct, cp, cfg.erase_scale, s_p, cfg.lamb)
            torch.testing.assert_close(
                out[f"transformer.{mod}.{proj}.weight"].double(), w_solve, rtol=1.2e-7, atol=1e-9
            )
