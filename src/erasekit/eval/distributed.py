"""Multi-process generation with Hugging Face ``accelerate``: one merged, resumable run directory.

Run it on N GPUs (or N CPU processes) with::

    accelerate launch --num_processes 4 -m erasekit generate \\
        --model CompVis/stable-diffusion-v1-4 --protocol i2p --prompts i2p_benchmark.csv --out runs/sd14-i2p

How the work is split, and why the images do not depend on the number of processes:

1. The items are de-duplicated by (prompt, seed) and cut into *chunks* of ``batch_size``
   consecutive items. Chunk ``c`` belongs to process ``c % world_size``.
2. Each chunk is sampled as one batch (items with their own guidance scale, I2P's
   ``--guidance-from-file``, are sampled in one batch per scale). An image's starting noise comes
   from its own seed (:func:`erasekit.eval.generate.initial_latents`), and the batches are the same
   chunks whatever the number of processes, so even batch-size-dependent floating-point rounding is
   identical: 1, 2 or 8 processes write byte-identical PNGs.
3. Process ``r`` writes its images to ``images/`` and its records to ``index.rank{r}.jsonl`` (the
   folder is a :class:`erasekit.rundir.ResumableDir`: identity check, shards, merge). When
   every process is done (``accelerate``'s barrier), rank 0 merges all records into ``index.jsonl``
   (in item order, atomically), removes the per-process files and writes ``launch.json`` (model,
   sampling, runtime, number of processes).
4. Resuming: before sampling, each process reads ``index.jsonl`` and every ``index.rank*.jsonl``
   (left by an interrupted run, whatever its number of processes) and skips the items already done.

Without ``accelerate launch`` the same command runs as one process.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from accelerate import PartialState
from tqdm.auto import tqdm

from erasekit.edit import Edit
from erasekit.eval import prompt_files as pf
from erasekit.eval.generate import (
    GENERATION_JSON,
    INDEX,
    PromptItem,
    SamplingConfig,
    check_items,
    generate_images,
    generate_locked,
    generation_folder,
    parse_seeds,
    write_batch,
)
from erasekit.eval.runtime import configure_pipeline, default_device, parse_dtype, runtime_info
from erasekit.io import write_json_atomic
from erasekit.pipeline import base_info, check_device, check_dtype, load_pipeline
from erasekit.rundir import ResumableDir, shard_name

BARRIER_HOURS = 48  # how long finished processes wait for the others before giving up


def shard_index_name(rank: int) -> str:
    """File name of process ``rank``'s own index (``index.rank{rank}.jsonl``)."""
    return shard_name(INDEX, rank)


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


def _folder(out_dir: str | Path) -> ResumableDir:
    return ResumableDir.at(out_dir, GENERATION_JSON, what="generation folder")


def _key(r: dict[str, Any]) -> tuple[str, int]:
    return r["prompt"], r["seed"]


def index_files(out_dir: str | Path) -> list[str]:
    """``index.jsonl`` then every per-process index of ``out_dir`` (sorted by rank)."""
    return _folder(out_dir).shards(INDEX)


def done_records(out_dir: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every record of ``out_dir`` whose image exists, from the merged and the per-process indexes."""
    out = Path(out_dir)
    return _folder(out).merged_records(INDEX, _key, valid=lambda r: (out / r["path"]).exists())


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
    uniq = unique_items(check_items(items))
    own = [it.meta.get("guidance_scale") is not None for it in uniq]
    per_item = any(own)
    if per_item and not all(own):
        raise ValueError("Either every item or none carries its own `guidance_scale`; got a mix.")
    for it in uniq if per_item else []:  # each scale checked before the folder is written
        SamplingConfig(guidance_scale=_number(it.meta["guidance_scale"], it))
    # refuse a directory made with other weights or sampler settings even when nothing is left to do;
    # with per-item scales the directory records guidance None (generate() would refuse differing scales)
    mine = chunks_for_rank(uniq, cfg.batch_size, rank, world_size)  # checks rank and world_size: before any write
    folder = generation_folder(out, pipe, replace(cfg, guidance_scale=None) if per_item else cfg)
    index_name = INDEX if world_size == 1 else shard_index_name(rank)
    with folder.lock(f"{index_name}.lock"):  # the whole run: a second writer is refused, never interleaved
        done = done_records(out)
        todo_chunks = [[it for it in ch if (it.prompt, it.seed) not in done] for ch in mine]
        todo_chunks = [ch for ch in todo_chunks if ch]
        n_todo = sum(len(ch) for ch in todo_chunks)
        desc = "generate" if world_size == 1 else f"generate [rank {rank}/{world_size}]"
        pos = rank if world_size > 1 else None
        bar = tqdm(total=n_todo, desc=desc, unit="img", disable=not progress, position=pos)
        made = 0
        for chunk in todo_chunks:
            if not per_item:  # the chunk is one batch
                generate_locked(folder, pipe, chunk, replace(cfg, batch_size=len(chunk)), progress=False,
                                index_name=index_name)  # fmt: skip
            else:  # one batch per guidance scale in the chunk, in first-appearance order
                groups: dict[float, list[PromptItem]] = {}
                for it in chunk:
                    groups.setdefault(float(it.meta["guidance_scale"]), []).append(it)
                for g, group in groups.items():
                    gcfg = replace(cfg, guidance_scale=g, batch_size=len(group))
                    imgs = generate_images(pipe, [b.prompt for b in group], [b.seed for b in group], gcfg)
                    write_batch(folder, group, imgs, index_name)
            made += len(chunk)
            bar.update(len(chunk))
        bar.close()
    return made


def _number(value: Any, item: PromptItem) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"The `guidance_scale` of {item!r} must be a number, got {value!r}.") from None


def merge_index(out_dir: str | Path, items: Sequence[PromptItem] | None = None) -> list[dict[str, Any]]:
    """Merge ``index.jsonl`` and every ``index.rank*.jsonl`` into ``index.jsonl`` (atomically) and
    remove the per-process files. Returns the records of ``items`` in their order (duplicates
    included, missing items left out), or all records when ``items`` is ``None``.

    Call it only when no process is writing into ``out_dir``.
    """
    out = Path(out_dir)
    order = [_key({"prompt": it.prompt, "seed": it.seed}) for it in items] if items is not None else None
    done = _folder(out).merge(INDEX, _key, order=order, valid=lambda r: (out / r["path"]).exists())
    if items is None:
        return list(done.values())
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


# ---------------------------------------------------------------------- a protocol's prompt file
PROMPT_FORMATS = ("lines", "i2p", "artists", "imagenette", "coco")


def protocol_items(
    protocol: str,
    prompts: str | Path | None,
    *,
    seeds: str = "0:4",
    categories: list[str] | None = None,
    guidance_from_file: bool = False,
    limit: int | None = None,
    n_samples: int = 5,
    n_per_class: int = 500,
    classes: str | None = None,
    seed: int = 0,
) -> list[PromptItem]:
    """The items of a prompt file in ``protocol``'s format (``erasekit generate --protocol``)."""
    if protocol not in PROMPT_FORMATS:
        raise ValueError(f"Unknown --protocol {protocol!r} for generate; choose one of {', '.join(PROMPT_FORMATS)}.")
    if protocol != "imagenette" and prompts is None:
        raise ValueError(f"--protocol {protocol} needs --prompts FILE.")
    if protocol == "lines":
        return pf.lines_items(prompts, seeds=parse_seeds(seeds))
    if protocol == "i2p":
        return pf.i2p_items(prompts, categories=categories, guidance_from_file=guidance_from_file, limit=limit)
    if protocol == "artists":
        return pf.artist_items(prompts, n_samples=n_samples)
    if protocol == "imagenette":
        names = [c for c in classes.split(",") if c.strip()] if classes else None
        return pf.imagenette_items(prompts, classes=names, n_per_class=n_per_class, seed=seed)
    return pf.coco_items(prompts, limit=limit, seed=seed)


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
    revision: str | None = None,
) -> list[dict[str, Any]] | None:
    """Load ``model`` (at ``revision``, for a hub id) + ``edit`` in every process of the current launch and
    generate ``items``.

    ``device=None`` gives each process its own accelerator (``cuda:{local rank}``), else the CPU; a
    device that is not here, or a ``dtype`` it cannot run, is refused before anything is loaded or
    written. The edit is applied at the dtype it was made at (float32 unless ``erase --dtype`` made
    it: its base-model check compares the weights at that dtype), before any ``dtype`` cast. Rank 0
    returns the merged records and writes ``out_dir/launch.json`` (model, sampling, runtime, number
    of processes, ``extra``); the other ranks return ``None``.
    """
    check_dtype(parse_dtype(dtype), check_device(default_device(device)))
    the_edit = Edit.load(edit) if edit is not None else None
    cpu = default_device(device) == "cpu"  # the one default of every command: the GPU if any, else cpu
    # a long barrier timeout: on resume one process may have much more left to do than the others
    state = PartialState(cpu=cpu, timeout=_dt.timedelta(hours=BARRIER_HOURS))
    if state.num_processes > 1 and not cpu and device not in (None, "cuda"):
        raise ValueError(
            f"`device` {device!r} would put every process on one device; use 'cuda' (one GPU per process)."
        )
    target = "cpu" if cpu else (device if device and device != "cuda" else state.device)
    pipe = load_pipeline(model, dtype=parse_dtype(the_edit.base.get("dtype")) if the_edit else None, revision=revision)
    if the_edit is not None:
        the_edit.apply_(pipe)
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
