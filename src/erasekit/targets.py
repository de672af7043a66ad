"""Which UNet parameters a fine-tuning method may change.

Named targets follow the papers: ``xattn`` = cross-attention (``attn2``, ESD-x; AP for objects and
styles), ``kv`` = cross-attention key/value projections (UCE, RECE), ``noxattn`` = everything but
cross-attention (ESD-u; AP for nudity), ``full`` = the whole UNet. Any other string is a regular
expression matched against parameter names.
"""

from __future__ import annotations

import re

import torch

NAMED_TARGETS = ("xattn", "kv", "noxattn", "full")


def _matches(target: str, name: str) -> bool:
    if target == "full":
        return True
    if target == "xattn":
        return ".attn2." in name
    if target == "noxattn":
        return ".attn2." not in name
    if target == "kv":
        return ".attn2.to_k." in name or ".attn2.to_v." in name
    return re.search(target, name) is not None


def select_parameters(unet: torch.nn.Module, target: str) -> dict[str, torch.nn.Parameter]:
    """UNet parameters selected by ``target`` (a named target or a regex), by name.

    Raises ``ValueError`` if the target is an invalid regex or selects nothing.
    """
    if target not in NAMED_TARGETS:
        try:
            re.compile(target)
        except re.error as e:
            raise ValueError(f"`target` {target!r} is neither one of {NAMED_TARGETS} nor a valid regex: {e}.") from e
    chosen = {n: p for n, p in unet.named_parameters() if _matches(target, n)}
    if not chosen:
        raise ValueError(
            f"`target` {target!r} matches no UNet parameter. Use one of {NAMED_TARGETS} or a regex such as "
            "'attn2\\.to_(k|v)'."
        )
    return chosen
