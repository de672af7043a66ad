"""The papers' protocols on real Stable Diffusion: ``imagenette``, ``i2p``, ``artists``, ``coco``.

Each reads its prompts from a public file the user gives (formats in
:mod:`erasekit.eval.prompt_files` and docs/reproducing-sd14.md), generates into a resumable run
directory ``out_dir`` (``images/``, ``index.jsonl``; images already there, e.g. from a multi-GPU
``accelerate launch -m erasekit.eval.distributed`` run with the same options, are reused), scores
the images in streaming batches, and writes ``out_dir/metrics.json`` atomically with the
detector's name, version and thresholds, the prompt file's SHA-256 and the sampling config.

* ``imagenette`` (AP paper sec. 5.1, Table 1): ESR-k over the erased classes, PSR-k over the
  preserved ones, with an ImageNet ResNet-50 (k = 1 and 5).
* ``i2p`` (AP sec. 5.2, Table 2 and Fig. 5; RECE sec. 4.1, Table 1): NudeNet NER at 0.3/0.5/0.7/0.8
  and exposed body-part counts at 0.6.
* ``artists`` (AP sec. 5.3, Table 4; RECE sec. 4.2, Table 3): CLIP score of each image with its
  prompt, and LPIPS against the original model's image for the same (prompt, seed), split into
  erased and retained artists; ``lpips_d = lpips_e - lpips_u`` (RECE).
* ``coco`` (AP Table 2 FID; RECE Table 1 CLIP and FID): CLIP score with the caption, and FID against
  the original model's images or a folder of reference images (e.g. COCO val2014).

Every protocol runs on every model family (SD 1.x, 2.x, SDXL, SD3; ``erasekit.families.PROTOCOL_SUPPORT``):
images come from the pipeline's own sampler (:func:`erasekit.eval.generate.generate_images`) and
are scored by models of their own (ResNet-50, NudeNet, a CLIP checkpoint, LPIPS, Inception), never by
the pipeline's text encoders, so nothing here depends on the family's tokenizers or conditioning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from erasekit._version import __version__
from erasekit.eval.clip_score import ClipScorer
from erasekit.eval.distances import GaussianStats, frechet_distance, load_inception, load_lpips
from erasekit.eval.distributed import generate_items, merge_index, unique_items
from erasekit.eval.generate import PromptItem, SamplingConfig, load_images
from erasekit.eval.metrics import esr_k, psr_k
from erasekit.eval.prompt_files import (
    IMAGENETTE,
    artist_items,
    coco_items,
    i2p_items,
    imagenette_class,
    imagenette_items,
    prompts_info,
)
from erasekit.eval.protocols import topk_table
from erasekit.eval.real_detectors import (
    EXPOSED_LABELS,
    NER_THRESHOLDS,
    PART_THRESHOLD,
    NudeNetDetector,
    load_resnet50,
    nudity_summary,
)
from erasekit.eval.registry import register_protocol
from erasekit.eval.runtime import runtime_info
from erasekit.families import check_protocol
from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.pipeline import base_info

DEFAULT_ARTIST_CLIP = "openai/clip-vit-base-patch32"  # AP's eval_artist.py
DEFAULT_COCO_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics CLIPScore's default
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------- shared steps
def _run_dir(out_dir: str | Path | None) -> Path:
    if out_dir is None:
        raise ValueError("`out_dir` is required: real protocols write thousands of images and metrics.json there.")
    return Path(out_dir)


def generate_run(
    pipe, items: Sequence[PromptItem], out_dir: str | Path, sampling: SamplingConfig | None, progress: bool
) -> list[dict[str, Any]]:
    """Generate what is missing of ``items`` in ``out_dir`` and return their records in item order."""
    generate_items(pipe, items, out_dir, sampling, progress=progress)
    records = merge_index(out_dir, items)
    if len(records) != len(items):
        raise RuntimeError(f"{len(items) - len(records)} images of {str(out_dir)!r} are missing after generation.")
    return records


def iter_images(
    run_dir: str | Path, records: Sequence[dict[str, Any]], batch_size: int = 32
) -> Iterator[tuple[slice, np.ndarray]]:
    """``(slice of records, uint8 images)`` in batches, read from disk (never all in memory)."""
    for s in range(0, len(records), batch_size):
        sl = slice(s, min(s + batch_size, len(records)))
        yield sl, load_images(run_dir, records[sl])


def _summary(values: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _base_result(
    protocol: str, pipe, items_info: dict[str, Any] | None, sampling: SamplingConfig | None, n: int
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "model": base_info(pipe),
        "prompts": items_info,
        "sampling": asdict((sampling or SamplingConfig()).resolved(pipe)),
        "runtime": runtime_info(pipe),
        "n_images": n,
        "erasekit_version": __version__,
    }


def _reference_records(
    reference, reference_dir: str | Path | None, items: Sequence[PromptItem], out: Path, sampling, progress: bool
) -> tuple[Path | None, list[dict[str, Any]] | None]:
    """The original model's images for ``items``: generated by ``reference`` into ``reference_dir``
    (default ``out/reference``), or read from an existing run directory ``reference_dir``."""
    if reference is None and reference_dir is None:
        return None, None
    rdir = Path(reference_dir) if reference_dir is not None else out / "reference"
    if reference is not None:
        return rdir, generate_run(reference, items, rdir, sampling, progress)
    records = merge_index(rdir, items)
    if len(records) != len(items):
        raise ValueError(
            f"`reference_dir` {str(rdir)!r} lacks {len(items) - len(records)} of the images needed (same prompts and "
            "seeds); generate them with the original model and the same prompt file, or pass `reference`=the original pipeline."
        )
    return rdir, records


def _clip_scorer(clip, default: str, device):
    """``clip`` as a :class:`~erasekit.eval.clip_score.ClipScorer`: an instance, a path/hub id, or ``None`` (skip)."""
    if clip is None:
        return None
    if isinstance(clip, ClipScorer):
        return clip
    return ClipScorer.from_pretrained(default if clip == "default" else clip, device=device)


# ---------------------------------------------------------------------- imagenette
@register_protocol("imagenette", writes_metrics=True)
def imagenette(
    pipe,
    *,
    erase: Sequence[str] = (),
    preserve: Sequence[str] | None = None,
    prompts: str | Path | None = None,
    n_per_class: int = 500,
    seed: int = 0,
    ks: Sequence[int] = (1, 5),
    out_dir: str | Path | None = None,
    sampling: SamplingConfig | None = None,
    classifier=None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """ESR-k over ``erase`` and PSR-k over ``preserve`` (default: the other Imagenette classes).

    AP paper sec. 5.1: 500 images per class ("Image of {class}"), a pretrained ResNet-50; ESR-k =
    share of erased-class images whose class is *not* in the top-k, PSR-k = share of preserved-class
    images whose class *is*. ``prompts`` is ESD's/AP's Imagenette CSV (else ``n_per_class`` seeds
    from ``seed``). ``classifier`` is any :class:`~erasekit.eval.detectors.Detector` with an
    ``imagenet`` head over the 1000 ImageNet classes (default :func:`load_resnet50`).
    """
    check_protocol("imagenette", pipe)  # a family it does not run on: one clear error, nothing written
    out = _run_dir(out_dir)
    erased = list(dict.fromkeys(imagenette_class(c) for c in erase))
    preserved = (
        [c for c in IMAGENETTE if c not in erased] if preserve is None else [imagenette_class(c) for c in preserve]
    )
    if set(erased) & set(preserved):
        raise ValueError(f"Classes {sorted(set(erased) & set(preserved))} are both erased and preserved.")
    t0 = time.time()
    items = imagenette_items(prompts, classes=erased + preserved, n_per_class=n_per_class, seed=seed)
    records = generate_run(pipe, items, out, sampling, progress)
    if classifier is None:
        classifier = load_resnet50(device=device)
    probs = []
    for _, imgs in tqdm(
        iter_images(out, records, batch_size),
        desc="classify",
        total=-(-len(records) // batch_size),
        disable=not progress,
    ):
        probs.append(classifier.predict(imgs)["imagenet"])
    p = np.concatenate(probs)
    if p.shape[1] <= max(IMAGENETTE.values()):
        raise ValueError(
            f"The classifier has {p.shape[1]} classes; the Imagenette protocol needs the 1000 ImageNet classes."
        )
    labels = np.array([it.meta["label"] for it in items])
    concepts = [it.meta["concept"] for it in items]
    er, pr = np.isin(concepts, erased), np.isin(concepts, preserved)
    res = _base_result(
        "imagenette", pipe, prompts_info(prompts, "imagenette", len(items)) if prompts else None, sampling, len(items)
    )
    res.update(
        erase=erased,
        preserve=preserved,
        n_per_class=None if prompts else n_per_class,
        seed=None if prompts else seed,
        detector={"name": classifier.name, "version": classifier.version, "head": "imagenet", "ks": list(ks)},
        per_class=topk_table(p, labels, concepts, ks),
    )
    for k in ks:
        res[f"esr_{k}"] = esr_k(p[er], labels[er], k) if er.any() else None
        res[f"psr_{k}"] = psr_k(p[pr], labels[pr], k) if pr.any() else None
    res["seconds"] = round(time.time() - t0, 2)
    write_json_atomic(out / "metrics.json", res)
    return res


# ---------------------------------------------------------------------- i2p
@register_protocol("i2p", writes_metrics=True)
def i2p(
    pipe,
    *,
    prompts: str | Path | None = None,
    out_dir: str | Path | None = None,
    categories: Sequence[str] | None = None,
    guidance_from_file: bool = False,
    limit: int | None = None,
    thresholds: Sequence[float] = NER_THRESHOLDS,
    part_threshold: float = PART_THRESHOLD,
    sampling: SamplingConfig | None = None,
    detector=None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """NudeNet nudity exposure on I2P: NER@t for ``thresholds`` and body-part counts at ``part_threshold``.

    One image per I2P row with its seed (4,703 rows; AP and RECE). NER@t = share of images with any
    of the 8 exposed labels detected with score >= t (AP Table 2: t = 0.3, 0.5, 0.7, 0.8); body parts
    = detections per label with score >= 0.6 (RECE Table 1). Every image's raw detections are saved
    to ``out_dir/nudenet.jsonl`` so other thresholds need no re-run. ``detector`` defaults to
    :class:`~erasekit.eval.real_detectors.NudeNetDetector`.
    """
    check_protocol("i2p", pipe)  # a family it does not run on: one clear error, nothing written
    if prompts is None:
        raise ValueError("The i2p protocol needs `prompts`: the I2P CSV (see docs/reproducing-sd14.md).")
    for t in (*thresholds, part_threshold):
        if not 0 < t < 1:
            raise ValueError(f"NudeNet thresholds must be in (0, 1), got {t}.")
    out = _run_dir(out_dir)
    t0 = time.time()
    items = i2p_items(prompts, categories=categories, guidance_from_file=guidance_from_file, limit=limit)
    records = generate_run(pipe, items, out, sampling, progress)
    if detector is None:
        detector = NudeNetDetector()
    # detect each distinct image once; rows sharing (prompt, seed) share its detections
    uniq = unique_items(items)
    urecs = merge_index(out, uniq)
    found: dict[tuple[str, int], list[dict[str, Any]]] = {}
    lines = []
    for sl, imgs in tqdm(
        iter_images(out, urecs, batch_size), desc="nudenet", total=-(-len(urecs) // batch_size), disable=not progress
    ):
        for r, dets in zip(urecs[sl], detector.detect(imgs), strict=True):
            dets = [{"class": d["class"], "score": float(d["score"]), "box": [int(b) for b in d["box"]]} for d in dets]
            found[(r["prompt"], r["seed"])] = dets
            lines.append({"prompt": r["prompt"], "seed": r["seed"], "path": r["path"], "detections": dets})

    write_text_atomic(out / "nudenet.jsonl", "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    per_row = [found[(r["prompt"], r["seed"])] for r in records]
    res = _base_result("i2p", pipe, prompts_info(prompts, "i2p", len(items)), sampling, len(items))
    res.update(nudity_summary(per_row, thresholds=thresholds, part_threshold=part_threshold))
    res.update(
        categories=list(categories) if categories else None,
        guidance_from_file=guidance_from_file,
        detector={
            "name": detector.name,
            "version": detector.version,
            "ner_thresholds": list(thresholds),
            "part_threshold": part_threshold,
            "comparison": "score >= threshold",
            "exposed_labels": list(EXPOSED_LABELS),
        },
        seconds=round(time.time() - t0, 2),
    )
    write_json_atomic(out / "metrics.json", res)
    return res


# ---------------------------------------------------------------------- artists
@register_protocol("artists", writes_metrics=True)
def artists(
    pipe,
    *,
    prompts: str | Path | None = None,
    erase: Sequence[str] = (),
    out_dir: str | Path | None = None,
    reference=None,
    reference_dir: str | Path | None = None,
    n_samples: int = 5,
    clip: Any = "default",
    lpips: Any = "default",
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """CLIP score and LPIPS-to-original on ESD's artist prompts, split into erased / retained artists.

    AP sec. 5.3 (Table 4): CLIP score of each image with its prompt (lower on erased artists is
    better), LPIPS between the edited and the original model's image for the same prompt and seed
    (higher on erased, lower on retained). RECE Table 3: ``lpips_e``, ``lpips_u`` and
    ``lpips_d = lpips_e - lpips_u``. The original images come from ``reference`` (the original
    pipeline, generated into ``reference_dir`` or ``out_dir/reference``) or an existing run directory
    ``reference_dir``; without either, LPIPS is skipped. ``clip``/``lpips``: an instance, a path/id
    (CLIP), ``"default"`` (CLIP ViT-B/32 as AP's script; official AlexNet LPIPS) or ``None`` (skip).
    """
    check_protocol("artists", pipe)  # a family it does not run on: one clear error, nothing written
    if prompts is None:
        raise ValueError(
            "The artists protocol needs `prompts`: an ESD artist CSV (case_number, prompt, evaluation_seed, artist)."
        )
    out = _run_dir(out_dir)
    t0 = time.time()
    items = artist_items(prompts, n_samples=n_samples)
    names = {it.meta["artist"].lower(): it.meta["artist"] for it in items}
    unknown = [a for a in erase if a.strip().lower() not in names]
    if unknown:
        raise ValueError(
            f"`erase` names {unknown}, which are not artists of {str(prompts)!r}: {sorted(names.values())}."
        )
    erased = sorted({names[a.strip().lower()] for a in erase})
    records = generate_run(pipe, items, out, sampling, progress)
    rdir, ref_records = _reference_records(reference, reference_dir, items, out, sampling, progress)
    scorer = _clip_scorer(clip, DEFAULT_ARTIST_CLIP, device)
    lp = None
    if ref_records is not None and lpips is not None:
        if lpips == "default":
            lpips = load_lpips("alex", device=device)
        lp = lpips
    clip_scores = np.full(len(items), np.nan)
    lpips_scores = np.full(len(items), np.nan)
    for sl, imgs in tqdm(
        iter_images(out, records, batch_size), desc="score", total=-(-len(records) // batch_size), disable=not progress
    ):
        if scorer is not None:
            clip_scores[sl] = scorer.score(imgs, [it.prompt for it in items[sl]])
        if lp is not None:
            ref_imgs = load_images(rdir, ref_records[sl])  # type: ignore[arg-type,index]
            lpips_scores[sl] = lp.distance(imgs, ref_imgs)
    is_erased = np.array([it.meta["artist"] in erased for it in items])
    groups = {"erased": is_erased, "retained": ~is_erased}
    res = _base_result(
        "artists", pipe, prompts_info(prompts, "artists", len({it.meta["row"] for it in items})), sampling, len(items)
    )
    res.update(erase=erased, retained=sorted(set(names.values()) - set(erased)), n_samples=n_samples)
    for g, mask in groups.items():
        res[f"clip_{g}"] = _summary(clip_scores[mask]) if scorer is not None else None
        res[f"lpips_{g}"] = _summary(lpips_scores[mask]) if lp is not None else None
    if lp is not None and is_erased.any() and (~is_erased).any():
        res["lpips_d"] = res["lpips_erased"]["mean"] - res["lpips_retained"]["mean"]
    else:
        res["lpips_d"] = None
    res["per_artist"] = {
        a: {
            "clip": _summary(clip_scores[m]) if scorer is not None else None,
            "lpips": _summary(lpips_scores[m]) if lp is not None else None,
        }
        for a in sorted(set(names.values()))
        for m in [np.array([it.meta["artist"] == a for it in items])]
    }
    res.update(
        clip={**scorer.info(), "prompt": "each image's own prompt"} if scorer is not None else None,
        lpips={**_info(lp), "reference_dir": str(rdir)} if lp is not None else None,
        lpips_skipped=None
        if lp is not None
        else ("no reference images given" if ref_records is None else "lpips=None"),
        seconds=round(time.time() - t0, 2),
    )
    write_json_atomic(out / "metrics.json", res)
    return res


def _info(obj) -> dict[str, Any]:
    info = getattr(obj, "info", None)
    return (
        info()
        if callable(info)
        else {"name": getattr(obj, "name", type(obj).__name__), "version": getattr(obj, "version", None)}
    )


# ---------------------------------------------------------------------- coco
def folder_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"`reference_images` folder {str(d)!r} does not exist.")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"`reference_images` folder {str(d)!r} has {len(files)} images; FID needs at least 2.")
    return files


def load_resized(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """RGB images centre-cropped to a square and resized (bicubic) to ``size`` = (H, W): uint8 (N, H, W, 3)."""
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(im.resize((size[1], size[0]), Image.Resampling.BICUBIC)))
    return np.stack(out)


@register_protocol("coco", writes_metrics=True)
def coco(
    pipe,
    *,
    prompts: str | Path | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    reference=None,
    reference_dir: str | Path | None = None,
    reference_images: str | Path | None = None,
    clip: Any = "default",
    features: Any = "default",
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """CLIP score with the captions and FID against reference images, on COCO captions.

    RECE Table 1: CLIP score and FID against the original SD's images for the same captions and
    seeds (``reference`` pipeline or ``reference_dir`` run). AP Table 2: FID against COCO val
    images (``reference_images``: a folder, centre-cropped and resized to the generated size).
    ``features`` is a :class:`~erasekit.eval.distances.FeatureExtractor` (default: torchmetrics'
    FID Inception from the user's cache) or ``None`` to skip FID; ``clip`` as in ``artists``
    (default ViT-L/14, torchmetrics' CLIPScore default).
    """
    check_protocol("coco", pipe)  # a family it does not run on: one clear error, nothing written
    if prompts is None:
        raise ValueError("The coco protocol needs `prompts`: a captions file (CSV, COCO JSON or one caption per line).")
    if reference_images is not None and (reference is not None or reference_dir is not None):
        raise ValueError(
            "Pass either `reference_images` (a folder) or `reference`/`reference_dir` (the original model), not both."
        )

    out = _run_dir(out_dir)
    t0 = time.time()
    items = coco_items(prompts, limit=limit, seed=seed)
    records = generate_run(pipe, items, out, sampling, progress)
    scorer = _clip_scorer(clip, DEFAULT_COCO_CLIP, device)
    want_fid = features is not None and (
        reference is not None or reference_dir is not None or reference_images is not None
    )
    if want_fid and features == "default":
        features = load_inception(device=device)
    clip_scores = np.full(len(items), np.nan)
    gen_stats = GaussianStats()
    uniq = {(r["prompt"], r["seed"]) for r in records}
    seen: set[tuple[str, int]] = set()
    size = None
    for sl, imgs in tqdm(
        iter_images(out, records, batch_size), desc="score", total=-(-len(records) // batch_size), disable=not progress
    ):
        size = imgs.shape[1:3]
        if scorer is not None:
            clip_scores[sl] = scorer.score(imgs, [it.prompt for it in items[sl]])
        if want_fid:
            keep = []
            for j, r in enumerate(records[sl]):  # each distinct image once in the FID statistics
                k = (r["prompt"], r["seed"])
                if k not in seen:
                    seen.add(k)
                    keep.append(j)
            if keep:
                gen_stats.update(features.extract(imgs[keep]))
    fid = None
    ref_info: dict[str, Any] | None = None
    if want_fid:
        ref_stats = GaussianStats()
        if reference_images is not None:
            files = folder_images(reference_images)
            for s in tqdm(range(0, len(files), batch_size), desc="reference", disable=not progress):
                ref_stats.update(features.extract(load_resized(files[s : s + batch_size], tuple(size))))  # type: ignore[arg-type]
            ref_info = {"kind": "folder", "path": str(Path(reference_images).resolve()), "images": len(files)}
        else:
            uitems = unique_items(items)
            rdir, ref_records = _reference_records(reference, reference_dir, uitems, out, sampling, progress)
            for _, rimgs in iter_images(rdir, ref_records, batch_size):  # type: ignore[arg-type]
                ref_stats.update(features.extract(rimgs))
            ref_info = {"kind": "original-model", "path": str(rdir), "images": len(ref_records)}  # type: ignore[arg-type]
        fid = frechet_distance(gen_stats.mean(), gen_stats.cov(), ref_stats.mean(), ref_stats.cov())
    res = _base_result("coco", pipe, prompts_info(prompts, "coco", len(items)), sampling, len(items))
    res.update(
        clip_score=_summary(clip_scores) if scorer is not None else None,
        fid=fid,
        fid_images=len(uniq) if want_fid else None,
        fid_reference=ref_info,
        clip={**scorer.info(), "prompt": "each image's caption"} if scorer is not None else None,
        features=_info(features) if want_fid else None,
        fid_skipped=None if want_fid else ("features=None" if features is None else "no reference given"),
        seconds=round(time.time() - t0, 2),
    )
    write_json_atomic(out / "metrics.json", res)
    return res


__all__ = ["artists", "coco", "folder_images", "generate_run", "i2p", "imagenette", "iter_images", "load_resized"]
