"""RECE on the miniature (issue 4): edit time for 1 and 10 concepts, and what each epoch's derived
embedding regenerates (the RECE paper's Fig. 5, measured with the detector instead of by eye).

For one erased object, RECE (T epochs) keeps every epoch's derived embedding c'_t (eq. 8). For each
t we generate ``--n`` images from c'_t (seeds 0..n-1) with

- the model c'_t was derived from (after t rounds; t = 0 is the UCE step alone): is the erased
  object still reachable through c'_t? (the paper: yes for the early epochs);
- the final edited model: does the finished edit resist every derived embedding?

and report the share of images the detector puts the erased object at top-1. Timing: RECE on 1
object and on all 10 objects at once (closed form; the issue's target: seconds at most).

    python bench/rece_epochs.py                       # 'triangle', T = 3 (paper default), n = 20
    python bench/rece_epochs.py --concept star --epochs 5 --n 50 --out runs/rece-epochs.json
    python bench/rece_epochs.py --tiny                # smoke test on a random tiny pipeline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import erasekit
from erasekit.analysis.rece_images import derived_embedding_images
from erasekit.edit import EraseRequest
from erasekit.io import write_json_atomic
from erasekit.world.shapes import OBJECTS


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--concept", default="triangle", help="the erased object")
    p.add_argument("--epochs", type=int, default=3, help="RECE epochs T")
    p.add_argument("--n", type=int, default=20, help="images per derived embedding")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="random tiny pipeline, 2 sampler steps (numbers mean nothing)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sampling = None
    if a.tiny:
        from erasekit.eval.generate import SamplingConfig
        from erasekit.testing import tiny_pipeline

        pipe, sampling = tiny_pipeline(0), SamplingConfig(steps=2, guidance_scale=3.0)
        detector = None
    else:
        from erasekit.eval.detectors import load_detector

        pipe, detector = erasekit.load_pipeline(a.model), load_detector("shapes")

    timing = {}
    for label, concepts in (("1 concept", [a.concept]), ("10 concepts", list(OBJECTS))):
        t0 = time.perf_counter()
        erasekit.erase(pipe, EraseRequest(concepts), method="rece", epochs=a.epochs, progress=False)
        timing[label] = round(time.perf_counter() - t0, 3)
    edit = erasekit.erase(pipe, EraseRequest([a.concept]), method="rece", epochs=a.epochs, progress=False)

    label = OBJECTS.index(a.concept)
    rates: dict[str, list[float | None]] = {}
    for model in ("epoch", "final"):
        imgs = derived_embedding_images(pipe, edit, list(range(a.n)), sampling, concept=a.concept, model=model)
        if detector is None:
            rates[model] = [None] * len(imgs)
            continue
        rates[model] = [float(np.mean(detector.predict(batch)["object"].argmax(1) == label)) for batch in imgs]
    res = {
        "concept": a.concept,
        "epochs": a.epochs,
        "n": a.n,
        "threads": torch.get_num_threads(),
        "rece_seconds": timing,
        "top1_rate_by_epoch": {
            "model_it_was_derived_from": rates["epoch"],
            "final_model": rates["final"],
        },
    }
    if a.out:
        write_json_atomic(a.out, res)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
