"""Time one sensitivity spectrum (AP paper sec. 3.2) over a vocabulary.

Default: the bundled miniature ("shapes") with its CLIP, an erasure of one object (UCE unless
``--edit`` gives a saved edit), and every word of the miniature's vocabulary. ``--tiny`` runs the
same code on a random tiny pipeline and a random tiny CLIP in seconds (a smoke test of the script).

    python bench/bench_spectrum.py --tiny
    python bench/bench_spectrum.py --seeds 8 --out runs/bench-spectrum.json
    python bench/bench_spectrum.py --edit runs/esd-circle/edit --seeds 8

Prints one JSON record: concepts, seeds, images generated, seconds spent generating and scoring
(original and edited model), total seconds, images per second, threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def miniature_vocabulary() -> list[str]:
    """Every concept word of ShapesWorld plus the neutral prompts, in a fixed order."""
    from erasekit.world import shapes as S

    words = [*S.OBJECTS, *(s for syn in S.SYNONYMS.values() for s in syn), *S.COLOURS, *S.BACKGROUNDS]
    words += [*S.STYLES, *S.ARTISTS, S.UNSAFE, *S.UNSAFE_PHRASINGS, "", "a photo"]
    return list(dict.fromkeys(words))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny pipeline and CLIP (seconds; a smoke test)")
    p.add_argument("--model", default="shapes", help="pipeline: 'shapes' or a diffusers folder")
    p.add_argument("--clip", default="shapes", help="CLIP: 'shapes' or a CLIP folder")
    p.add_argument("--edit", type=Path, default=None, help="a saved edit folder (default: erase --erase with --method)")
    p.add_argument("--method", default="uce", help="method used when no --edit is given")
    p.add_argument("--erase", default="circle", help="concept erased when no --edit is given")
    p.add_argument(
        "--concepts", type=Path, default=None, help="text file, one concept per line (default: the miniature's words)"
    )
    p.add_argument("--seeds", type=int, default=8, help="k, images per concept and model")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="also save the spectrum JSON here")
    a = p.parse_args(argv)

    import erasekit
    from erasekit.analysis.spectrum import SpectrumConfig, spectrum_for_edit
    from erasekit.eval.clip_score import ClipScorer
    from erasekit.eval.generate import SamplingConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    concepts = (
        [line.rstrip("\n") for line in a.concepts.read_text().splitlines()] if a.concepts else miniature_vocabulary()
    )
    t_load = time.perf_counter()
    if a.tiny:
        from erasekit.testing import tiny_clip_scorer, tiny_pipeline

        pipe = tiny_pipeline(0)
        scorer = tiny_clip_scorer(name="tiny-random")
        concepts = concepts[:6]
        seeds, steps = min(a.seeds, 2), a.steps or 2
    else:
        pipe = erasekit.load_pipeline(a.model)
        scorer = ClipScorer.from_pretrained(a.clip)
        seeds, steps = a.seeds, a.steps
    if a.edit is not None:
        edit = erasekit.Edit.load(a.edit)
    else:
        edit = erasekit.erase(pipe, erasekit.EraseRequest([a.erase]), method=a.method, progress=False)
    load_s = time.perf_counter() - t_load

    cfg = SpectrumConfig(n_seeds=seeds, sampling=SamplingConfig(steps=steps, batch_size=a.batch_size))
    t0 = time.perf_counter()
    spec = spectrum_for_edit(pipe, edit, concepts, scorer, cfg, progress=False)
    total = time.perf_counter() - t0
    n_images = 2 * len(concepts) * seeds
    rec = {
        "mode": "tiny" if a.tiny else "miniature",
        "model": "tiny-random" if a.tiny else a.model,
        "clip": scorer.name,
        "edit": {"method": edit.method, "erase": edit.request.erase},
        "concepts": len(concepts),
        "seeds": seeds,
        "sampler_steps": steps,
        "images": n_images,
        "setup_s": round(load_s, 2),
        "timing_s": {k: round(v, 2) for k, v in sorted(spec.config["timing"].items())},
        "total_s": round(total, 2),
        "images_per_s": round(n_images / total, 2),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "top": spec.summary()["most_hurt"],
    }
    if a.out:
        spec.save(a.out)
    print(json.dumps(rec, indent=2))
    return rec


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
