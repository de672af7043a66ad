"""Named evaluation protocols: a prompt set, fixed seeds, a detector and the papers' metrics.

:func:`evaluate` runs a protocol by name from the registry (:mod:`erasekit.eval.registry`); the
protocols themselves live with what defines them: the miniature's ``shapes-objects`` in
:mod:`erasekit.world.protocols`, the real models' in :mod:`erasekit.eval.real_protocols`, the attack
success rate in :mod:`erasekit.attacks.asr`. This module holds what they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.eval.generate import PromptItem, SamplingConfig, generate, generate_images, load_images
from erasekit.eval.metrics import _in_topk
from erasekit.eval.registry import PROTOCOLS, get_protocol, register_protocol  # noqa: F401 (re-exported)


def images_for(
    pipe, items: list[PromptItem], out_dir: str | Path | None, sampling: SamplingConfig | None, progress: bool
) -> np.ndarray:
    """Generate ``items`` (into ``out_dir`` if given, resumable) and return their images in order."""
    if out_dir is None:
        return generate_images(pipe, [i.prompt for i in items], [i.seed for i in items], sampling, progress=progress)
    records = generate(pipe, items, out_dir, sampling, progress=progress)
    return load_images(out_dir, records)


def topk_table(
    probs: np.ndarray, labels: np.ndarray, concepts: Sequence[str], ks: Sequence[int] = (1, 3)
) -> dict[str, dict[str, float]]:
    """Per-concept top-k hit rates: ``{concept: {"top1": .., "top3": ..}}``."""
    table: dict[str, dict[str, float]] = {}
    concepts = np.asarray(concepts)
    for c in dict.fromkeys(concepts.tolist()):
        m = concepts == c
        table[c] = {f"top{k}": float(_in_topk(probs[m], labels[m], k).mean()) for k in ks}
    return table


def evaluate(pipe, protocol: str = "shapes-objects", **kwargs: Any) -> dict[str, Any]:
    """Run the named protocol on ``pipe``; see each protocol for its keyword arguments."""
    return get_protocol(protocol)(pipe, **kwargs)
