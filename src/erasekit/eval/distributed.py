"""Multi-process generation with Hugging Face ``accelerate``: one merged, resumable run directory.

Run it on N GPUs (or N CPU processes) with::

    accelerate launch --num_processes 4 -m erasekit.eval.distributed \\
        --model CompVis/stable-diffusion-v1-4 --protocol i2p --prompts i2p_benchmark.csv --out runs/sd14-i2p

How the work is split, and why the images do not depend on the number of processes:

1. The items are de-duplicated by (prompt, seed) and cut into *chunks* of ``batch_size``
   consecutive items. Chunk ``c`` belongs to process ``c % world_size``.
2. Each chunk is sampled as one batch (items with their own guidance scale, I2P's
   ``--guidance-from-file``, are sampled in one batch per scale). An image's starting noise comes
   from its own seed (:func:`erasekit.eval.generate.initial_latents`), and the batches are the same
   chunks whatever the number of processes, so even batch-size-dependent floating-point rounding is
   identical: 1, 2 or 8 processes write byte-identical PNGs.
3. Process ``r`` writes its images to ``images/`` and its records to ``index.rank{r}.jsonl``. When
   every process is done (``accelerate``'s barrier), rank 0 merges all records into ``index.jsonl``
   (in item order, atomically), removes the per-process files and writes ``launch.json`` (model,
   sampling, runtime, number of processes).
4. Resuming: before sampling, each process reads ``index.jsonl`` and every ``index.rank*.jsonl``
   (left by an interrupted run, whatever its number of processes) and skips the items already done.

Without ``accelerate launch`` the same command runs as one process.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from erasekit.eval.generate import (
    INDEX,
    PromptItem,
    SamplingConfig,
    _check_or_write_provenance,
    generate,
    generate_images,
    read_index,
)
from erasekit.io import append_jsonl, atomic_path, write_text_atomic
from erasekit.runs import locked

SHARD_PREFIX = "index.rank"
BARRIER_HOURS = 48  # how long finished processes wait for the others before giving up


def shard_index_name(rank: int) -> str:
    """File name of process ``rank``'s own index (``index.rank{rank}.jsonl``)."""
    return f"{SHARD_PREFIX}{rank}.jsonl"


def unique_items(items: Sequence[PromptItem]) -> list[PromptItem]:
    """Items with duplicate (prompt, seed) pairs removed, first occurrence kept, order preserved."""
    seen: dict[tuple[str, int], PromptItem] = {}
    for it in items:
        seen.setdefault((it.prompt, it.seed), it)
    return list(seen.values())


def chunks_for_rank(items: Sequence[PromptItem], batch_size: int, rank: int, world_size: int) -> list[list[PromptItem]]:
    """The chunks of ``batch_size`` consecutive items that process ``rank`` of ``world_size`` samples."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    chunks = [list(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
    return chunks[rank::world_size]


def index_files(out_dir: str | Path) -> list[str]:
    """``index.jsonl`` then every per-process index of ``out_dir`` (sorted by rank)."""
    out = Path(out_dir)

    def rank_of(p: Path) -> int:
        tail = p.name[len(SHARD_PREFIX) : -len(".jsonl")]
        return int(tail) if tail.isdigit() else 1 << 30

    shards = sorted((p for p in out.glob(f"{SHARD_PREFIX}*.jsonl")), key=rank_of)
    return [INDEX] + [p.name for p in shards]


def done_records(out_dir: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every record of ``out_dir`` whose image exists, from the merged and the per-process indexes."""
    out = Path(out_dir)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for name in index_files(out):
        for r in read_index(out, name):
            done.setdefault((r["prompt"], r["seed"]), r)
    return done


def generate_items(
    pipe,
    items: Sequence[PromptItem],
    out_dir: str | Path,
    config: SamplingConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Sample this process's chunks of ``items`` into ``out_dir`` (skipping images already there).

    Records go to ``index.jsonl`` when ``world_size == 1`` and to ``index.rank{rank}.jsonl``
    otherwise. Returns the number of images sampled. The process-independent chunking is described
    in the module docstring. Items whose ``meta`` has ``"guidance_scale"`` (all or none of them)
    are sampled at that scale; such a directory records its guidance as per-item (``None``), so it
    is never resumed with one scale for all, nor the other way round.
    """
    out = Path(out_dir)
    cfg = (config or SamplingConfig()).resolved(pipe)
    uniq = unique_items(items)
    own = [it.meta.get("guidance_scale") is not None for it in uniq]
    per_item = any(own)
    if per_item and not all(own):
        raise ValueError("Either every item or none carries its own `guidance_scale`; got a mix.")
    # refuse a directory made with other weights or sampler settings even when nothing is left to do;
    # with per-item scales the directory records guidance None (generate() would refuse differing scales)
    _check_or_write_provenance(out, pipe, replace(cfg, guidance_scale=None) if per_item else cfg)
    mine = chunks_for_rank(uniq, cfg.batch_size, rank, world_size)
    done = done_records(out)
    index_name = INDEX if world_size == 1 else shard_index_name(rank)
    todo_chunks = [[it for it in ch if (it.prompt, it.seed) not in done] for ch in mine]
    todo_chunks = [ch for ch in todo_chunks if ch]
    n_todo = sum(len(ch) for ch in todo_chunks)
    desc = "generate" if world_size == 1 else f"generate [rank {rank}/{world_size}]"
    bar = tqdm(total=n_todo, desc=desc, unit="img", disable=not progress, position=rank if world_size > 1 else None)
    made = 0
    for chunk in todo_chunks:
        if not per_item:  # the chunk is one batch
            generate(
                pipe,
                chunk,
                out,
                replace(cfg, batch_size=len(chunk)),
                progress=False,
                index_name=index_name,
                recorded_batch_size=cfg.batch_size,
            )
        else:  # one batch per guidance scale in the chunk, in first-appearance order
            groups: dict[float, list[PromptItem]] = {}
            for it in chunk:
                groups.setdefault(float(it.meta["guidance_scale"]), []).append(it)
            for g, group in groups.items():
                _write_batch(pipe, group, out, replace(cfg, guidance_scale=g, batch_size=len(group)), index_name)
        made += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return made


def _write_batch(pipe, batch: list[PromptItem], out: Path, cfg: SamplingConfig, index_name: str) -> None:
    """One batch written exactly as :func:`erasekit.eval.generate.generate` writes it (PNG, then record)."""
    imgs = generate_images(pipe, [b.prompt for b in batch], [b.seed for b in batch], cfg)
    recs = []
    for it, img in zip(batch, imgs, strict=True):
        rel = f"images/{it.key}.png"
        with atomic_path(out / rel) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        recs.append({"prompt": it.prompt, "seed": it.seed, "path": rel, **it.meta})
    with locked(out, f"{index_name}.lock"):
        append_jsonl(out / index_name, recs)


def merge_index(out_dir: str | Path, items: Sequence[PromptItem] | None = None) -> list[dict[str, Any]]:
    """Merge ``index.jsonl`` and every ``index.rank*.jsonl`` into ``index.jsonl`` (atomically) and
    remove the per-process files. Returns the records of ``items`` in their order (duplicates
    included, missing items left out), or all records when ``items`` is ``None``.

    Call it only when no process is writing into ``out_dir``.
    """
    out = Path(out_dir)
    names = index_files(out)
    done = done_records(out)
    order: list[tuple[str, int]] = []
    if items is not None:
        order = [k for k in dict.fromkeys((it.prompt, it.seed) for it in items) if k in done]
    rest = [k for k in done if k not in set(order)]
    lines = [json.dumps(done[k], sort_keys=True) for k in order + rest]
    write_text_atomic(out / INDEX, "".join(line + "\n" for line in lines))
    for name in names[1:]:
        (out / name).unlink(missing_ok=True)
    if items is None:
        return [done[k] for k in order + rest]
    return [done[(it.prompt, it.seed)] for it in items if (it.prompt, it.seed) in done]


def generate_distributed(
    pipe,
    items: Sequence[PromptItem],
    out_dir: str | Path,
    config: SamplingConfig | None = None,
    *,
    state=None,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Generate ``items`` with every process of the current ``accelerate`` launch, then merge.

    ``state`` is an ``accelerate.PartialState`` (created if ``None``; a plain ``python`` run is one
    process). Rank 0 returns the merged records in item order and raises if any is missing; the
    other ranks return ``None``.
    """
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    rank, world = state.process_index, state.num_processes
    generate_items(pipe, items, out_dir, config, rank=rank, world_size=world, progress=progress)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = merge_index(out_dir, items)
    missing = len(unique_items(items)) - len({(r["prompt"], r["seed"]) for r in records})
    if missing:
        raise RuntimeError(f"{missing} images are missing from {str(out_dir)!r} after generation; re-run to resume.")
    return records


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m erasekit.eval.distributed`` (also under ``accelerate launch -m``)."""
    p = argparse.ArgumentParser(
        prog="python -m erasekit.eval.distributed",
        description="Generate a protocol's images with every process of an `accelerate launch` (resumable).",
    )
    p.add_argument("--model", "-m", required=True, help="Diffusers folder, hub id, or 'shapes'.")
    p.add_argument(
        "--edit", type=Path, default=None, help="An erasekit edit folder (or run dir) to apply to the model."
    )
    p.add_argument(
        "--protocol",
        default="lines",
        choices=["lines", "i2p", "artists", "imagenette", "coco"],
        help="Prompt-file format.",
    )
    p.add_argument("--prompts", type=Path, default=None, help="The prompt file (required except for imagenette).")
    p.add_argument("--out", "-o", type=Path, required=True, help="Run directory: images/ + index.jsonl.")
    p.add_argument("--seeds", default="0", help="lines: seeds for every prompt, '0:10' or '1,5,7'.")
    p.add_argument("--n-per-class", type=int, default=500, help="imagenette without --prompts: images per class.")
    p.add_argument("--classes", default=None, help="imagenette: comma-separated classes (default: all 10).")
    p.add_argument("--n-samples", type=int, default=5, help="artists: images per prompt (seeds evaluation_seed + j).")
    p.add_argument("--category", action="append", default=None, help="i2p: keep rows of this category (repeatable).")
    p.add_argument("--guidance-from-file", action="store_true", help="i2p: sample each row at its own guidance scale.")
    p.add_argument("--limit", type=int, default=None, help="i2p/coco: only the first N rows.")
    p.add_argument("--seed", type=int, default=0, help="imagenette/coco: first seed when the file has none.")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the model's, 50 for SD).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the model's, 7.5 for SD).")
    p.add_argument("--batch-size", type=int, default=8, help="Images per batch (per process).")
    p.add_argument("--height", type=int, default=None, help="Image height (default: the model's).")
    p.add_argument("--width", type=int, default=None, help="Image width (default: the model's).")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as loaded, float32).")
    p.add_argument("--device", default=None, help="'cpu', 'cuda' (default: each process's accelerator, else cpu).")
    p.add_argument("--attention-slicing", action="store_true", help="Slice attention to save memory.")
    p.add_argument("--no-sdpa", action="store_true", help="Plain attention instead of PyTorch's fused SDPA.")
    p.add_argument("--scheduler", default=None, choices=["ddim", "pndm", "lms"], help="Sampler (default: the model's).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p


MAX_SEEDS = 10_000_000  # seeds one --seeds range may name


def parse_seeds(seeds: str) -> list[int]:
    """``'0:10'`` -> 0..9; ``'1,5,7'`` -> [1, 5, 7]; ``'3'`` -> [3]. Empty ranges, negative and
    repeated seeds are errors that say so."""
    try:
        if ":" in seeds:
            a, b = (int(x) for x in seeds.split(":"))
            if b <= a:
                raise ValueError(f"`--seeds {seeds}` is an empty range: the end must be greater than the start, e.g. 0:10.")
            if b - a > MAX_SEEDS:  # checked before the list is built: 0:10**11 must not exhaust memory
                raise ValueError(f"`--seeds {seeds}` names {b - a} seeds; at most {MAX_SEEDS} per run.")
            out = list(range(a, b))
        else:
            out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as e:
        if "empty range" in str(e) or "at most" in str(e):
            raise
        raise ValueError(f"`--seeds` {seeds!r} must look like '0:10' or '1,5,7'.") from None
    if not out:
        raise ValueError(f"`--seeds` {seeds!r} names no seed; use e.g. '0:10' or '1,5,7'.")
    if min(out) < 0:
        raise ValueError(f"`--seeds` {seeds!r}: seeds must be >= 0.")
    if max(out) >= 2**63:
        raise ValueError(f"`--seeds` {seeds!r}: seeds must be < 2**63 (torch generators take 64-bit seeds).")
    if len(set(out)) != len(out):
        raise ValueError(f"`--seeds` {seeds!r} repeats a seed; each image would be made twice.")
    return out


def items_from_args(args: argparse.Namespace) -> list[PromptItem]:
    """The protocol's items for the command-line arguments (same options as ``erasekit evaluate``)."""
    from erasekit.eval import prompt_files as pf

    if args.protocol != "imagenette" and args.prompts is None:
        raise ValueError(f"--protocol {args.protocol} needs --prompts FILE.")
    if args.protocol == "lines":
        return pf.lines_items(args.prompts, seeds=parse_seeds(args.seeds))
    if args.protocol == "i2p":
        return pf.i2p_items(
            args.prompts, categories=args.category, guidance_from_file=args.guidance_from_file, limit=args.limit
        )
    if args.protocol == "artists":
        return pf.artist_items(args.prompts, n_samples=args.n_samples)
    if args.protocol == "imagenette":
        classes = [c for c in args.classes.split(",") if c.strip()] if args.classes else None
        return pf.imagenette_items(args.prompts, classes=classes, n_per_class=args.n_per_class, seed=args.seed)
    return pf.coco_items(args.prompts, limit=args.limit, seed=args.seed)


def launch_generation(
    model: str,
    items: Sequence[PromptItem],
    out_dir: str | Path,
    config: SamplingConfig | None = None,
    *,
    edit: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    attention_slicing: bool = False,
    sdpa: bool | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]] | None:
    """Load ``model`` (+ ``edit``) in every process of the current launch and generate ``items``.

    ``device=None`` gives each process its own accelerator (``cuda:{local rank}``), else the CPU.
    The edit is applied in float32 before any ``dtype`` cast (its base-model check compares float32
    weights). Rank 0 returns the merged records and writes ``out_dir/launch.json`` (model, sampling,
    runtime, number of processes, ``extra``); the other ranks return ``None``.
    """
    import torch
    from accelerate import PartialState

    from erasekit.edit import Edit
    from erasekit.eval.runtime import configure_pipeline, runtime_info
    from erasekit.io import write_json_atomic
    from erasekit.pipeline import base_info, load_pipeline

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    # a long barrier timeout: on resume one process may have much more left to do than the others
    state = PartialState(cpu=cpu, timeout=_dt.timedelta(hours=BARRIER_HOURS))
    if state.num_processes > 1 and not cpu and device not in (None, "cuda"):
        raise ValueError(
            f"`device` {device!r} would put every process on one device; use 'cuda' (one GPU per process)."
        )
    target = "cpu" if cpu else (device if device and device != "cuda" else state.device)
    pipe = load_pipeline(model)
    if edit is not None:
        Edit.load(edit).apply_(pipe)
    configure_pipeline(pipe, dtype, attention_slicing, target, sdpa=sdpa, scheduler=scheduler)
    records = generate_distributed(pipe, items, out_dir, config, state=state, progress=progress)
    if records is not None:
        write_json_atomic(
            Path(out_dir) / "launch.json",
            {
                **(extra or {}),
                "model": base_info(pipe),
                "edit": str(edit) if edit else None,
                "sampling": asdict((config or SamplingConfig()).resolved(pipe)),
                "runtime": runtime_info(pipe),
                "processes": state.num_processes,
                "images": len({(r["prompt"], r["seed"]) for r in records}),
                "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            },
        )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``[accelerate launch] python -m erasekit.eval.distributed``."""
    args = build_parser().parse_args(argv)
    try:
        items = items_from_args(args)
        records = launch_generation(
            args.model,
            items,
            args.out,
            SamplingConfig(args.steps, args.guidance, args.batch_size, args.height, args.width),
            edit=args.edit,
            dtype=args.dtype,
            device=args.device,
            attention_slicing=args.attention_slicing,
            sdpa=False if args.no_sdpa else None,
            scheduler=args.scheduler,
            progress=not args.quiet,
            extra={"protocol": args.protocol, "prompts": str(args.prompts.resolve()) if args.prompts else None},
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if records is not None:
        print(f"{len(records)} images in {args.out} (index: {Path(args.out) / INDEX})", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses in the tests
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
