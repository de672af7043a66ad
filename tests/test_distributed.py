"""Multi-process generation: byte-identical to one process, resumable after an interruption."""

import json
import os
import socket
import subprocess
import sys

import pytest

from erasekit.eval import distributed as dist
from erasekit.eval.distributed import chunks_for_rank, generate_items, merge_index, shard_index_name, unique_items
from erasekit.eval.generate import INDEX, PromptItem, SamplingConfig, read_index
from erasekit.eval.prompt_files import lines_items

CFG = SamplingConfig(steps=2, guidance_scale=4.0, batch_size=2)
PROMPTS = ["a red star", "a blue ring", "a cat on a mat"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_bytes(run_dir, records):
    return {(r["prompt"], r["seed"]): (run_dir / r["path"]).read_bytes() for r in records}


def test_chunks_cover_every_item_once_whatever_the_world_size():
    items = [PromptItem(f"p{i}", i) for i in range(11)]
    one = chunks_for_rank(items, 3, 0, 1)
    for world in (1, 2, 3, 5):
        per_rank = [chunks_for_rank(items, 3, r, world) for r in range(world)]
        flat = [c for chunks in per_rank for c in chunks]
        # the same chunks (so the same batches) as one process, each exactly once
        assert sorted(map(lambda c: c[0].seed, flat)) == [c[0].seed for c in one]
        assert sorted([tuple(x.seed for x in c) for c in flat]) == [tuple(x.seed for x in c) for c in one]
    with pytest.raises(ValueError, match="rank"):
        chunks_for_rank(items, 3, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        chunks_for_rank(items, 0, 0, 1)


def test_unique_items_and_merge(tmp_path):
    a, b, c = PromptItem("a", 0), PromptItem("b", 1), PromptItem("c", 2)
    assert unique_items([a, b, PromptItem("a", 0, {"x": 1}), c]) == [a, b, c]
    (tmp_path / "images").mkdir()
    for k in "abc":
        (tmp_path / "images" / f"{k}.png").write_bytes(b"png")
    recs = {k: {"prompt": k, "seed": i, "path": f"images/{k}.png"} for i, k in enumerate("abc")}
    (tmp_path / INDEX).write_text(json.dumps(recs["b"]) + "\n")
    # rank 1 wrote c and (again) b; its last line was cut short by a crash
    (tmp_path / shard_index_name(1)).write_text(
        json.dumps(recs["c"]) + "\n" + json.dumps(recs["b"]) + "\n" + '{"prompt": "a", "se'
    )
    (tmp_path / shard_index_name(0)).write_text(json.dumps(recs["a"]) + "\n")
    out = merge_index(tmp_path, [a, b, a, c])
    assert [r["prompt"] for r in out] == ["a", "b", "a", "c"]  # item order, duplicates kept
    assert [r["prompt"] for r in read_index(tmp_path)] == ["a", "b", "c"]  # each image once on disk
    assert not list(tmp_path.glob("index.rank*.jsonl"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    """Every image of this module on one torch thread, as the forked ranks run: with two threads the
    parent's intra-op split can differ from a child's (and does on a loaded machine), which changes
    a PNG byte and makes the byte-identity checks test the thread pool rather than the resume logic."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    """The tiny pipeline from disk, a prompt file, and a fresh one-process reference run."""
    from erasekit.pipeline import load_pipeline

    root = tmp_path_factory.mktemp("dist")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pipe = load_pipeline(tiny_pipe_dir)
    items = lines_items(prompts, seeds=[0, 1, 2])  # 9 images, 5 chunks of 2
    ref = root / "one"
    assert generate_items(pipe, items, ref, CFG, progress=False) == 9
    return pipe, prompts, items, _image_bytes(ref, merge_index(ref, items))


def _interrupted_run(pipe, items, run, monkeypatch):
    """A 2-process run that died: rank 1 crashed in its second chunk, rank 0 never ran."""
    calls = {"n": 0}
    real_generate = dist.generate_locked

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(dist, "generate_locked", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_items(pipe, items, run, CFG, rank=1, world_size=2, progress=False)
    monkeypatch.setattr(dist, "generate_locked", real_generate)
    before = read_index(run, shard_index_name(1))
    assert len(before) == 2 and not (run / INDEX).exists()
    return {r["path"]: (run / r["path"]).stat().st_mtime_ns for r in before}


def _check_resumed(run, items, ref_bytes, mtimes):
    merged = read_index(run)
    assert [(r["prompt"], r["seed"]) for r in merged] == [(i.prompt, i.seed) for i in items]  # complete, in order
    assert not list(run.glob("index.rank*.jsonl"))
    for path, t in mtimes.items():  # images made before the crash were kept, not redone
        assert (run / path).stat().st_mtime_ns == t
    two_bytes = _image_bytes(run, merged)
    assert two_bytes.keys() == ref_bytes.keys()
    for key, data in ref_bytes.items():  # byte-identical PNGs for the same (prompt, seed)
        assert two_bytes[key] == data, key


def _forked_rank(rank, world, port, pipe, items, run):
    """One process of a 2-process CPU group: accelerate's PartialState over gloo, as under `accelerate launch`."""
    import torch
    from accelerate import PartialState

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    PartialState._reset_state()
    state = PartialState(cpu=True)
    assert state.num_processes == world and state.process_index == rank
    dist.generate_distributed(pipe, items, run, CFG, state=state, progress=False)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_and_resume(setup, tmp_path, monkeypatch):
    import multiprocessing as mp

    pipe, _, items, ref_bytes = setup
    run = tmp_path / "two"
    mtimes = _interrupted_run(pipe, items, run, monkeypatch)
    # resume with 2 processes (forked from this one, so the libraries are already imported)
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_forked_rank, args=(r, 2, port, pipe, items, run)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_resumed(run, items, ref_bytes, mtimes)


@pytest.mark.slow
def test_accelerate_launch_command(setup, tiny_pipe_dir, tmp_path, monkeypatch):
    """The same through `accelerate launch -m erasekit generate` (3 fresh interpreters: slow)."""
    pipe, prompts, items, ref_bytes = setup
    run = tmp_path / "two"
    mtimes = _interrupted_run(pipe, items, run, monkeypatch)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "erasekit", "generate",
        "--model", str(tiny_pipe_dir), "--protocol", "lines", "--prompts", str(prompts), "--seeds", "0:3",
        "--out", str(run), "--device", "cpu", "--steps", "2", "--guidance", "4", "--batch-size", "2", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "9 images" in proc.stdout
    _check_resumed(run, items, ref_bytes, mtimes)
    meta = json.loads((run / "launch.json").read_text())
    assert meta["processes"] == 2 and meta["images"] == 9 and meta["sampling"]["steps"] == 2


def test_command_line_items_and_errors(tmp_path):
    # the argparse twin of `erasekit generate` is gone: `accelerate launch -m erasekit generate` is the one
    # command; its prompt-file items come from erasekit.eval.distributed.protocol_items
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.eval.distributed import protocol_items
    from erasekit.eval.generate import parse_seeds

    assert parse_seeds("0:3") == [0, 1, 2] and parse_seeds("4,9") == [4, 9]
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("a:b")
    csv = tmp_path / "artists.csv"
    csv.write_text("case_number,prompt,evaluation_seed,artist\n0,A castle by Kilian Eng,10,Kilian Eng\n")
    items = protocol_items("artists", csv, n_samples=3)
    assert [(i.prompt, i.seed) for i in items] == [("A castle by Kilian Eng", s) for s in (10, 11, 12)]
    items = protocol_items("imagenette", None, classes="church", n_per_class=2)
    assert [i.prompt for i in items] == ["Image of church"] * 2
    r = CliRunner().invoke(app, ["generate", "--model", "m", "--out", str(tmp_path / "o"), "--protocol", "i2p"])
    assert r.exit_code == 2  # no --prompts
    assert "needs --prompts" in r.output
