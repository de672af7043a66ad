"""Metric parity: our FID, LPIPS and CLIP score against the maintained libraries, on the same images.

Our definitions (``erasekit.eval.distances``, ``erasekit.analysis.clip_score``) are written out from
the papers; this script computes each beside the library's on ShapesWorld renders, with the SAME
feature networks (random weights, built offline: no Inception, AlexNet or CLIP download), so any
difference is in the formulas, not in the weights:

* **FID**: ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<module>)`` (torchmetrics'
  documented custom-feature path) vs :func:`erasekit.eval.distances.fid_from_features` over
  :class:`~erasekit.eval.distances.FeatureExtractor` with the same module.
* **LPIPS**: torchmetrics' LPIPS network (``torchmetrics.functional.image.lpips._NoTrainLpips``, its
  port of the ``lpips`` package, with the ``lin`` weights torchmetrics ships) vs our
  :class:`~erasekit.eval.distances.LPIPS` with the same linear weights. Both use AlexNet's feature
  layout; the backbone is a random AlexNet ``features`` stack built here, because torchvision cannot
  be loaded beside this machine's CPU torch (its wheel's C++ operators fail to register: "operator
  torchvision::nms does not exist"), and torchmetrics takes the backbone from torchvision: the
  script swaps torchmetrics' ``_get_tv_model_features`` for the local builder. The ``lpips`` package
  itself needs torchvision too; it is compared when it imports, and skipped with the reason if not.
* **CLIP score**: ``torchmetrics.multimodal.CLIPScore`` (given a callable that returns a tiny
  random ``transformers`` CLIPModel and its processor) vs :class:`~erasekit.analysis.clip_score.ClipScorer`
  with the same model, tokenizer and image processor. Per image we compare the raw ``100 cos``
  (torchmetrics' ``_clip_score_update``); at the metric level torchmetrics returns
  ``max(mean_i 100 cos_i, 0)`` while we score ``100 max(cos_i, 0)`` per image (the AP paper's
  sensitivity spectrum averages per-sample differences, see ``analysis/clip_score.py``): the two
  means agree when no cosine is negative and are reported side by side.

    python bench/metric_parity.py --out bench/results/parity          # writes parity.json and parity.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ALEX_CHANNELS = [64, 192, 384, 256, 256]


def shapes_images(seed: int, n: int, size: int = 32) -> np.ndarray:
    """``n`` ShapesWorld renders (uint8 (n, size, size, 3)), nearest-upsampled from 32 when ``size`` > 32."""
    from erasekit.world.shapes import make_dataset

    imgs, _ = make_dataset(seed, n)
    f = size // imgs.shape[1]
    return np.repeat(np.repeat(imgs, f, axis=1), f, axis=2) if f > 1 else imgs


# --------------------------------------------------------------------------------------------- FID
class TinyFeature(torch.nn.Module):
    """A fixed random conv net: uint8 (N, 3, H, W) -> (N, 32) features (FID's Inception stand-in)."""

    def __init__(self, seed: int = 0, dim: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, dim, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.num_features = dim
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


def fid_parity(n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Our FID vs torchmetrics' FrechetInceptionDistance on two ShapesWorld sets and on a set and itself."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from erasekit.eval.distances import FeatureExtractor, fid_from_features

    feat = TinyFeature(seed)
    ours_fx = FeatureExtractor(feat, name="tiny-feature", version=f"seed{seed}")
    a, b = shapes_images(seed, n), shapes_images(seed + 1, n)
    rows = []
    for label, x, y in (("two ShapesWorld sets", a, b), ("a set against itself", a, a)):
        tm = FrechetInceptionDistance(feature=feat, normalize=False)
        tm.update(torch.from_numpy(x).permute(0, 3, 1, 2), real=True)
        tm.update(torch.from_numpy(y).permute(0, 3, 1, 2), real=False)
        theirs = float(tm.compute())
        ours = fid_from_features(ours_fx.extract(x), ours_fx.extract(y))
        rows.append({"case": label, "n": n, "ours": ours, "torchmetrics": theirs, "abs_diff": abs(ours - theirs)})
    return {"metric": "FID", "library": "torchmetrics.image.fid.FrechetInceptionDistance(feature=module)", "rows": rows}


# --------------------------------------------------------------------------------------------- LPIPS
def random_alexnet_features(seed: int = 0) -> torch.nn.Sequential:
    """torchvision's ``alexnet().features`` layout (same layer indices), random weights."""
    g = torch.Generator().manual_seed(seed)
    nn = torch.nn
    seq = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
    return seq.eval()


def torchmetrics_lpips_net(features: torch.nn.Sequential) -> torch.nn.Module:
    """torchmetrics' LPIPS network (``_NoTrainLpips``, net='alex', its shipped lin weights) over ``features``."""
    import torchmetrics.functional.image.lpips as tml

    saved = tml._get_tv_model_features
    tml._get_tv_model_features = lambda net, pretrained=False: features  # the backbone torchvision would give
    try:
        return tml._NoTrainLpips(net="alex", pretrained=True, pnet_rand=True).eval()
    finally:
        tml._get_tv_model_features = saved


def torchmetrics_lin_file() -> Path:
    """The ``lin`` weights torchmetrics ships (the lpips package's v0.1 alex.pth)."""
    import torchmetrics.functional.image.lpips as tml

    return Path(tml.__file__).parent / "lpips_models" / "alex.pth"


def ours_lpips(features: torch.nn.Sequential, lin: Path):
    """Our LPIPS over the same backbone slices and linear weights."""
    from erasekit.eval.distances import _LPIPS_NETS, LPIPS, lpips_linear_weights

    slices = [features[a:b] for a, b in _LPIPS_NETS["alex"][0]]

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in slices:
            x = s(x)
            out.append(x)
        return out

    return LPIPS(taps, lpips_linear_weights(lin, "alex"), name="lpips-alex-random-backbone", version="parity")


def lpips_package_status() -> tuple[Any, str]:
    """The ``lpips`` package's module, or None and why it cannot be used here."""
    try:
        return importlib.import_module("lpips"), "imported"
    except Exception as e:  # ImportError, or torchvision's operator registration failing beside a CPU torch
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def lpips_parity(n: int = 24, seed: int = 0) -> dict[str, Any]:
    """Our LPIPS vs torchmetrics' network (and the lpips package where it imports), per image pair."""
    feats = random_alexnet_features(seed)
    lin = torchmetrics_lin_file()
    tm_net = torchmetrics_lpips_net(feats)
    ours = ours_lpips(feats, lin)
    a, b = shapes_images(seed, n, 64), shapes_images(seed + 1, n, 64)
    d_ours = ours.distance(a, b)
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        d_tm = tm_net(x, y).reshape(-1).double().numpy()
    out: dict[str, Any] = {
        "metric": "LPIPS (alex layout, random backbone, shipped lin weights)",
        "library": "torchmetrics.functional.image.lpips._NoTrainLpips",
        "rows": [
            {
                "case": f"{n} ShapesWorld pairs at 64x64",
                "n": n,
                "ours_mean": float(d_ours.mean()),
                "torchmetrics_mean": float(d_tm.mean()),
                "max_abs_diff": float(np.abs(d_ours - d_tm).max()),
            }
        ],
    }
    pkg, status = lpips_package_status()
    out["lpips_package"] = status
    if pkg is not None:
        net = pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
        net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5 = (
            feats[0:2],
            feats[2:5],
            feats[5:8],
            feats[8:10],
            feats[10:12],
        )
        with torch.no_grad():
            d_pkg = net(x, y).reshape(-1).double().numpy()
        out["rows"].append(
            {
                "case": "lpips package, same pairs",
                "n": n,
                "ours_mean": float(d_ours.mean()),
                "lpips_mean": float(d_pkg.mean()),
                "max_abs_diff": float(np.abs(d_ours - d_pkg).max()),
            }
        )
    return out


# --------------------------------------------------------------------------------------------- CLIP
def tiny_clip(seed: int = 0):
    """A tiny random transformers CLIPModel at 32x32 with the real CLIP tokenizer, and its processor."""
    from erasekit.analysis.clip_score import load_image_processor
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from erasekit.testing import TOKENIZER_DIR
    from erasekit.world.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    tok = load_clip_tokenizer(TOKENIZER_DIR)
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # an image processor as a CLIP checkpoint folder stores it
        (Path(d) / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "crop_size": {"height": 32, "width": 32},
                    "do_center_crop": True,
                    "do_normalize": True,
                    "do_resize": True,
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "resample": 3,
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "size": {"shortest_edge": 32},
                    "image_processor_type": "CLIPImageProcessor",
                }
            )
        )
        improc = load_image_processor(d)
    processor = CLIPProcessor(image_processor=improc, tokenizer=tok)
    return model, tok, improc, processor


class TensorFeatures(torch.nn.Module):
    """The CLIP model with ``get_*_features`` returning tensors: torchmetrics 1.9 expects transformers
    4's tensors, transformers 5 returns an output object (``.pooler_output`` holds the projection)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from erasekit.analysis.clip_score import _features

        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from erasekit.analysis.clip_score import _features

        return _features(self.model.get_text_features(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def shapes_clip():
    """The miniature's trained CLIP (bundled, offline): model, tokenizer, image processor, processor."""
    from erasekit.analysis.clip_score import ClipScorer
    from transformers import CLIPProcessor

    sc = ClipScorer.from_pretrained("shapes")
    return (
        sc.model,
        sc.tokenizer,
        sc.image_processor,
        CLIPProcessor(image_processor=sc.image_processor, tokenizer=sc.tokenizer),
    )


def clip_parity(n: int = 24, seed: int = 0, clip: str = "tiny-random") -> dict[str, Any]:
    """Our CLIP score vs torchmetrics' CLIPScore with the same CLIP (``tiny-random`` or the miniature's
    trained ``shapes`` CLIP), per image and as metrics."""
    from erasekit.analysis.clip_score import ClipScorer
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    from erasekit.world.shapes import make_dataset

    model, tok, improc, processor = tiny_clip(seed) if clip == "tiny-random" else shapes_clip()
    imgs, scenes = make_dataset(seed, n)
    texts = [s.caption for s in scenes]
    scorer = ClipScorer(model, tok, improc)
    ours = scorer.score(imgs, texts)  # 100 max(cos, 0), per image
    img_e, txt_e = scorer.embed_images(imgs).double(), scorer.embed_texts(texts).double()
    ours_raw = (100 * (img_e * txt_e).sum(-1)).numpy()  # 100 cos, before our per-image clamp
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    with torch.no_grad():
        tm_model = TensorFeatures(model)
        tm_raw, _ = _clip_score_update(list(x), texts, tm_model, processor)
        metric = CLIPScore(model_name_or_path=lambda: (tm_model, processor))
        metric.update(list(x), texts)
        tm_metric = float(metric.compute())
    tm_raw = tm_raw.double().numpy()
    return {
        "metric": f"CLIP score ({clip} CLIP)",
        "library": "torchmetrics.multimodal.CLIPScore (callable model_name_or_path)",
        "rows": [
            {
                "case": f"per image, raw 100 cos ({n} ShapesWorld images + captions)",
                "n": n,
                "max_abs_diff": float(np.abs(ours_raw - tm_raw).max()),
                "negative_cosines": int((tm_raw < 0).sum()),
            },
            {
                "case": "metric: ours mean(100 max(cos,0)) vs torchmetrics max(mean(100 cos),0)",
                "n": n,
                "ours": float(ours.mean()),
                "torchmetrics": tm_metric,
                "abs_diff": abs(float(ours.mean()) - tm_metric),
                "same_definition_on_these_images": bool((tm_raw >= 0).all()),
            },
            {
                "case": "metric restricted to images with cos >= 0 (where the definitions agree)",
                "n": int((tm_raw >= 0).sum()),
                "ours": float(ours[tm_raw >= 0].mean()) if (tm_raw >= 0).any() else None,
                "torchmetrics": float(max(tm_raw[tm_raw >= 0].mean(), 0)) if (tm_raw >= 0).any() else None,
                "abs_diff": float(abs(ours[tm_raw >= 0].mean() - max(tm_raw[tm_raw >= 0].mean(), 0)))
                if (tm_raw >= 0).any()
                else None,
            },
        ],
    }


def max_diff(block: dict[str, Any]) -> float:
    """The largest absolute difference reported in a block."""
    return max(r.get("max_abs_diff", r.get("abs_diff")) or 0.0 for r in block["rows"])


def markdown(res: dict[str, Any]) -> str:
    """The parity table."""
    lines = [
        "# Metric parity: EraseKit vs the maintained libraries (same images, same feature networks)",
        "",
        f"Command: `{res['command']}`; torch {res['versions']['torch']}, torchmetrics "
        f"{res['versions']['torchmetrics']}, transformers {res['versions']['transformers']}.",
        "",
        "| metric | library | case | n | ours | library | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for blk in res["blocks"]:
        for r in blk["rows"]:
            o = r.get("ours", r.get("ours_mean"))
            t = r.get("torchmetrics", r.get("torchmetrics_mean", r.get("lpips_mean")))
            d = r.get("max_abs_diff", r.get("abs_diff"))
            fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
            lines.append(
                f"| {blk['metric']} | `{blk['library']}` | {r['case']} | {r['n']} | {fmt(o)} | {fmt(t)} | {fmt(d)} |"
            )
    lines += ["", "Notes:", ""]
    lines += [f"- {k}: {v}" for k, v in res["notes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import torchmetrics
    import transformers

    from erasekit.io import write_json_atomic, write_text_atomic

    t0 = time.perf_counter()
    blocks = [
        fid_parity(seed=a.seed),
        lpips_parity(seed=a.seed),
        clip_parity(seed=a.seed),
        clip_parity(seed=a.seed, clip="shapes"),
    ]
    lp = blocks[1]
    res = {
        "command": "python bench/metric_parity.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "versions": {
            "torch": torch.__version__,
            "torchmetrics": torchmetrics.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "blocks": blocks,
        "max_abs_diff": {b["metric"]: max_diff(b) for b in blocks},
        "notes": {
            "lpips package": lp["lpips_package"]
            + (
                ""
                if lp["lpips_package"] == "imported"
                else " -> not compared (it builds its backbone with torchvision)"
            ),
            "torchvision": "the index's torchvision 0.28.0 installs without changing torch 2.13.0+cpu but its C++ "
            "operators do not load beside it, so no torchvision backbone (AlexNet/Inception weights) is used here",
            "CLIP score": "torchmetrics clamps the batch MEAN at 0, we clamp each image's score (per-sample "
            "differences feed the AP sensitivity spectrum); identical when no cosine is negative",
            "torchmetrics CLIPScore and transformers 5": "torchmetrics 1.9 calls `.norm` on what "
            "`get_image_features` returns, an output object in transformers 5 (AttributeError); the parity run wraps "
            "the model so those methods return the projection tensor (TensorFeatures), nothing else changes",
            "FID": "both in float64; ours uses eigh on the symmetric Sigma1^1/2 Sigma2 Sigma1^1/2, torchmetrics "
            "the eigenvalues of Sigma1 Sigma2",
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "parity.json", res)
    write_text_atomic(a.out / "parity.md", markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
