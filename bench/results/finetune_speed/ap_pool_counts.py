"""UNet calls of AP's concept pool over a run's length (issue 13; counts, not time): one AP `authors` run per
length with `zt_producer="pooled"`, split 0, lr 5e-4, DDIM 20, seed 0; prints the trace's `concept_pool` record.

    OMP_NUM_THREADS=1 python bench/results/finetune_speed/ap_pool_counts.py   # output: ap_pool_counts.jsonl
"""

import json

import torch

import erasekit
from erasekit.edit import EraseRequest

torch.set_num_threads(1)
pipe = erasekit.load_pipeline("shapes")
req = EraseRequest(["circle", "square", "triangle", "star", "heart"])
for steps in (150, 1000):
    e = erasekit.erase(
        pipe, req, method="ap", steps=steps, ddim_steps=20, lr=5e-4, zt_producer="pooled", seed=0, progress=False
    )
    p = e.trace["concept_pool"]
    print(
        json.dumps(
            {
                "steps": steps,
                **p,
                "calls_ratio": round(p["unet_calls"] / p["exact_would_call"], 3),
                "seconds_per_step_under_load": round(e.trace["seconds"] / steps, 4),
            }
        ),
        flush=True,
    )
