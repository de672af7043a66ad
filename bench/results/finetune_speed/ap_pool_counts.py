import json, torch, erasekit
from erasekit.edit import EraseRequest
torch.set_num_threads(1)
pipe = erasekit.load_pipeline("shapes")
req = EraseRequest(["circle", "square", "triangle", "star", "heart"])
for steps in (150, 1000):
    e = erasekit.erase(pipe, req, method="ap", steps=steps, ddim_steps=20, lr=5e-4, zt_producer="pooled", seed=0, progress=False)
    p = e.trace["concept_pool"]
    print(json.dumps({"steps": steps, **p, "calls_ratio": round(p["unet_calls"] / p["exact_would_call"], 3), "seconds_per_step_under_load": round(e.trace["seconds"] / steps, 4)}), flush=True)
