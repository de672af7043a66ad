"""The miniature's evaluation protocol, registered with eval (the world is a plug-in of eval).

``shapes-objects`` is the miniature of the Adversarial Preservation paper's Imagenette task
(section 5.1): every object class is prompted ``n_per_class`` times ("a {colour} {object}",
colours cycling, seeds ``seed .. seed + n - 1`` for every class); ESR-k is computed over the erased
classes and PSR-k over the preserved ones with the miniature detector's object head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.eval.detectors import Detector, load_detector
from erasekit.eval.generate import PromptItem, SamplingConfig
from erasekit.eval.metrics import _in_topk, esr_k, psr_k, rate_summary
from erasekit.eval.protocols import images_for, topk_table
from erasekit.eval.registry import register_protocol
from erasekit.world.shapes import COLOURS, OBJECTS


def object_prompts(classes: Sequence[str] = OBJECTS, n_per_class: int = 50, seed: int = 0) -> list[PromptItem]:
    """ "a {colour} {object}" for every class, colours cycling, the same seeds for every class."""
    colours = list(COLOURS)
    items = []
    for c in classes:
        if c not in OBJECTS:
            raise ValueError(f"Unknown object {c!r}; the miniature's objects are {', '.join(OBJECTS)}.")
        for i in range(n_per_class):
            colour = colours[i % len(colours)]
            items.append(
                PromptItem(f"a {colour} {c}", seed + i, {"concept": c, "label": OBJECTS.index(c), "colour": colour})
            )
    return items


@register_protocol("shapes-objects")
def shapes_objects(
    pipe,
    *,
    erase: Sequence[str] = (),
    preserve: Sequence[str] | None = None,
    n_per_class: int = 50,
    seed: int = 0,
    out_dir: str | Path | None = None,
    sampling: SamplingConfig | None = None,
    detector: Detector | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """ESR-1/3 over ``erase`` and PSR-1/3 over ``preserve`` (default: every other object) on the miniature."""
    unknown = sorted(set(erase) - set(OBJECTS))
    if unknown:
        raise ValueError(f"`erase` has {unknown}, which are not miniature objects ({', '.join(OBJECTS)}).")
    preserve = [c for c in OBJECTS if c not in erase] if preserve is None else list(preserve)
    t0 = time.time()
    items = object_prompts(OBJECTS, n_per_class, seed)
    images = images_for(pipe, items, out_dir, sampling, progress)
    det = detector or load_detector("shapes")
    probs = det.predict(images)
    labels = np.array([it.meta["label"] for it in items])
    concepts = [it.meta["concept"] for it in items]
    obj = probs["object"]
    per_class = topk_table(obj, labels, concepts)
    colour_labels = np.array([list(COLOURS).index(it.meta["colour"]) for it in items])
    er = np.isin(concepts, list(erase))
    pr = np.isin(concepts, list(preserve))
    res: dict[str, Any] = {
        "protocol": "shapes-objects",
        "erase": list(erase),
        "preserve": preserve,
        "n_per_class": n_per_class,
        "seed": seed,
        "per_class": per_class,
        "object_top1_all": float(_in_topk(obj, labels, 1).mean()),
        "colour_top1_all": float(_in_topk(probs["colour"], colour_labels, 1).mean()),
        "detector": {"name": det.name, "version": det.version},
        "sampling": asdict((sampling or SamplingConfig()).resolved(pipe)),
        "seconds": round(time.time() - t0, 2),
    }
    for k in (1, 3):
        res[f"esr_{k}"] = esr_k(obj[er], labels[er], k) if er.any() else None
        res[f"psr_{k}"] = psr_k(obj[pr], labels[pr], k) if pr.any() else None
    # each rate with its count and 95% Wilson interval (ESR counts misses of the erased classes)
    res["intervals"] = {
        **({f"esr_{k}": rate_summary(~_in_topk(obj[er], labels[er], k)) for k in (1, 3)} if er.any() else {}),
        **({f"psr_{k}": rate_summary(_in_topk(obj[pr], labels[pr], k)) for k in (1, 3)} if pr.any() else {}),
    }
    return res
