"""Closed forms on a family whose K/V projections do not share one input (SD3's joint attention).

UCE (RECE paper eq. 3) edits ``W`` so that ``W c_i ~ W_old c_i*`` for erased inputs ``c_i`` and keeps
``W c_j = W_old c_j`` for preserved ones. On a UNet every ``attn2.to_k``/``to_v`` reads the same
text-encoder output, so one set of vectors serves all projections. On SD3 each joint block's
``add_k_proj``/``add_v_proj`` reads its own hidden text stream (:mod:`erasekit.families.sd3`), so
the same objective is solved per block with the vectors that block's projections read
(:meth:`~erasekit.families.sd3.SD3Adapter.kv_inputs`), token positions paired as UCE pairs them
(``from_last_word`` over the 77 CLIP positions; ``all`` = every position, T5's included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _last_word(pipe, prompts: Sequence[str]) -> list[int]:
    if not prompts:  # nothing preserved (the paper preset without `preserve`): the tokenizer refuses []
        return []
    tok = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True
    )
    return [int(sum(m)) - 2 for m in tok["attention_mask"]]


def _aligned(
    xs: torch.Tensor, ys: torch.Tensor, idx_s: list[int], idx_t: list[int], positions: str, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's position pairing (``erasekit.methods.uce.aligned_token_embeddings``) on captured rows (n, T, d)."""
    if positions == "all":
        return xs.reshape(-1, xs.shape[-1]), ys.reshape(-1, ys.shape[-1])
    a, b = [], []
    for k in range(xs.shape[0]):
        n = length - max(idx_s[k], idx_t[k])
        a.append(xs[k, idx_s[k] : idx_s[k] + n])
        b.append(ys[k, idx_t[k] : idx_t[k] + n])
    return torch.cat(a), torch.cat(b)


@torch.no_grad()
def per_block_uce(
    pipe,
    fam,
    erased: list[str],
    targets: list[str],
    preserved: list[str],
    config,
    *,
    preserve_scale: float,
    solve: Callable[..., dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """UCE's closed form solved per block with each block's own K/V inputs; new weights by parameter name.

    ``config`` is a :class:`~erasekit.methods.uce.UCEConfig` (``projections`` ``to_k``/``to_v`` name the
    family's key/value projections, ``add_k_proj``/``add_v_proj`` on SD3). A block's key and value
    projections read the same inputs, and UCE's factor depends only on the inputs, so each block is ONE
    call ``solve(weights, c_i, c_i*, c_j, erase_scale=, preserve_scale=, lamb=)`` for all its edited
    projections (``weights``: the block's tensors by parameter name): one float64 factorisation per
    block, applied to its K and V. ``solve`` is :func:`erasekit.methods.closed_form.uce_edit_weights`
    (passed in: this module sits below the methods)."""
    unique = list(dict.fromkeys([*erased, *targets, *preserved]))
    inputs = fam.kv_inputs(pipe, unique)  # module -> (len(unique), T, d)
    row = {p: i for i, p in enumerate(unique)}
    length = pipe.tokenizer.model_max_length
    idx_e, idx_t, idx_p = _last_word(pipe, erased), _last_word(pipe, targets), _last_word(pipe, preserved)
    proj_names = dict(zip(("to_k", "to_v"), fam.kv_names, strict=True))
    out: dict[str, torch.Tensor] = {}
    for mod_name, attn in fam.kv_modules(pipe).items():
        x = inputs[mod_name]
        ci, ct = _aligned(
            x[[row[p] for p in erased]], x[[row[p] for p in targets]], idx_e, idx_t, config.erase_positions, length
        )
        if preserved:
            xp = x[[row[p] for p in preserved]]
            cp = _aligned(xp, xp, idx_p, idx_p, config.preserve_positions, length)[0]
        else:
            cp = torch.zeros(0, x.shape[-1])
        weights = {
            f"{fam.denoiser_name}.{mod_name}.{proj_names[proj]}.weight": getattr(attn, proj_names[proj]).weight.detach()
            for proj in config.projections
        }
        dev = next(iter(weights.values())).device
        out.update(
            solve(
                weights,
                ci.to(dev),
                ct.to(dev),
                cp.to(dev),
                erase_scale=config.erase_scale,
                preserve_scale=preserve_scale,
                lamb=config.lamb,
            )
        )
    return out
