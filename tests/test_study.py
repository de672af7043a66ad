"""erasekit.study: a tiny study (2 methods x 2 concept sets x 2 seeds on the random tiny pipeline, a
stand-in detector, 2 sampler steps) run twice, interrupted, with a failing cell, and on Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import erasekit.study.operating as operating
from erasekit.study import load_spec, run_study, status
from erasekit.study.grid import cells

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """\
[study]
name = "tiny"
model = "tiny"
detector = "standin"
seeds = [0, 1]

[evaluation]
n_per_class = 2
test_seed = 0
selection_n_per_class = 1
selection_seed = 1000
sampling_steps = 2

[operating_point]
rule = "target"
metric = "esr_1"
target = 0.95
check_every = 1
max_steps = 2

[[methods]]
label = "ESD-x"
method = "esd"
preset = "paper"
set = { ddim_steps = 2, lr = 5e-2 }

[[methods]]
label = "ESD-u"
method = "esd"
preset = "paper"
set = { ddim_steps = 2, lr = 5e-2, train_method = "noxattn" }

[[concepts]]
label = "tri"
erase = ["triangle"]

[[concepts]]
label = "sq"
erase = ["square"]
"""


def _spec(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _run(spec: Path, d: Path, **kw):
    return run_study(spec, d, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tiny study: its folder."""
    tmp = tmp_path_factory.mktemp("study-ref")
    spec = _spec(tmp)
    out = _run(spec, tmp / "ref")
    assert out["counts"] == {"done": 8}, out
    return tmp / "ref"


def _tables(d: Path) -> tuple[str, str]:
    return (d / "results.csv").read_text(), (d / "table.md").read_text()


def _seed0_rows(d: Path) -> list[str]:
    """The tidy rows of the seed-0 cells (column 2 is the cell key)."""
    return [r for r in (d / "results.csv").read_text().splitlines()[1:] if r.split(",")[1].endswith("seed0")]


SEED0 = TINY.replace("seeds = [0, 1]", "seeds = [0]")  # the 4 seed-0 cells only


def test_grid_order_and_cells(tmp_path):
    spec = load_spec(_spec(tmp_path))
    keys = [c.key for c in cells(spec)]
    assert len(keys) == 8  # 2 methods x 2 concept sets x 2 seeds
    # split 0 / seed 0 of every method first, further seeds last
    assert keys[:4] == ["esd-x__tri__seed0", "esd-u__tri__seed0", "esd-x__sq__seed0", "esd-u__sq__seed0"]
    assert all(k.endswith("seed1") for k in keys[4:])


def test_run_twice_gives_identical_tables(reference, tmp_path):
    spec = _spec(tmp_path)
    again = _run(spec, tmp_path / "again")
    assert again["counts"] == {"done": 8}
    assert _tables(again["dir"]) == _tables(reference)
    rows = (reference / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 * 4  # header + 8 cells x (ESR-1/3, PSR-1/3)
    assert {r.split(",")[1] for r in rows[1:]} == {c.key for c in cells(load_spec(spec))}
    # a third run in the same folder redoes nothing
    assert _run(spec, tmp_path / "again")["ran"] == []
    # the curve is recorded: one selection check per step until the target or the cap (2)
    curve = (reference / "cells" / "esd-x__tri__seed0" / "curve.jsonl").read_text().splitlines()
    assert 1 <= len(curve) <= 2


def test_table_means_weigh_each_concept_set_once_and_show_the_seeds(reference):
    """The main table's cell is the two-level mean (sets, then seeds); each set with several training
    seeds gets its own table of the seed spread."""
    from erasekit.study.stats import mean_interval
    from erasekit.study.tables import _pct, tidy

    spec = load_spec(reference.parent / "tiny.toml")
    rows = [r for r in tidy(spec, reference) if r["method"] == "ESD-x" and r["metric"] == "psr_1"]
    assert len(rows) == 4 and len({r["seed"] for r in rows}) == 2
    table = (reference / "table.md").read_text()
    main = next(line for line in table.splitlines() if line.startswith("| ESD-x |"))
    by_hand = sum(sum(r["rate"] for r in rows if r["concept"] == c) / 2 for c in ("tri", "sq")) / 2
    assert mean_interval(rows, by="concept")["mean"] == pytest.approx(by_hand)
    assert main.split(" | ")[3] == _pct(mean_interval(rows, by="concept"))
    for concept in ("tri", "sq"):
        assert f"### Training seeds on {concept}:" in table
        seeds = table.split(f"### Training seeds on {concept}:")[1]
        line = next(x for x in seeds.splitlines() if x.startswith("| ESD-x |"))
        assert line.split(" | ")[3] == _pct(mean_interval([r for r in rows if r["concept"] == concept]))
        assert line.endswith("| 0, 1 |")


ATTACKED = """\
[study]
name = "tiny-attacks"
model = "tiny"
detector = "standin"
seeds = [0]

[operating_point]
rule = "fixed"
steps = 1

[attacks]
names = ["ringabell", "inversion"]
n_prompts = 2
n_images = 1
set = { ringabell = { population = 6, generations = 2, length = 3 } }

[[methods]]
label = "Original"
method = "original"

[[methods]]
label = "UCE"
method = "uce"

[[concepts]]
label = "tri"
erase = ["triangle"]
"""


def test_attacked_study_tables_and_shared_ringabell_search(tmp_path, monkeypatch):
    """A study with attacks: ASR table per concept; Ring-A-Bell (edit-independent) searches once per
    concept and prompt, the next cell reuses it from <study>/attack_search (marked from_cache)."""
    import erasekit.attacks.ringabell as rab

    searched: list[str] = []
    real = rab.RingABellAttack.attack
    monkeypatch.setattr(
        rab.RingABellAttack, "attack", lambda self, ctx, p, *a: searched.append(p) or real(self, ctx, p, *a)
    )
    out = _run(_spec(tmp_path, ATTACKED, "attacked.toml"), tmp_path / "s")
    assert out["counts"] == {"done": 2}, out
    d = out["dir"]
    assert len(searched) == 2  # 2 prompts, once for both cells
    assert len(list((d / "attack_search" / "ringabell").glob("*/*.json"))) == 1 + 2  # identity + 2 prompts
    recs = [
        [
            json.loads(x)
            for x in (d / "cells" / k / "attacks" / "asr" / "ringabell" / "records.jsonl").read_text().splitlines()
        ]
        for k in ("original__tri__seed0", "uce__tri__seed0")
    ]
    assert [r["adv_prompt"] for r in recs[0]] == [r["adv_prompt"] for r in recs[1]]
    assert not any(r["cost"].get("from_cache") for r in recs[0]) and all(r["cost"]["from_cache"] for r in recs[1])
    table = (d / "table.md").read_text()
    assert "## Attacks on 'tri'" in table and "| Method | pre-attack | ringabell | inversion |" in table
    assert table.count("| UCE |") == 1 and table.count("| Original |") == 1
    from erasekit.study.plots import colours, write_plots

    plots = write_plots(load_spec(tmp_path / "attacked.toml"), d, tmp_path / "plots")
    assert plots["asr"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(set(colours(12))) == 12 and len(set(colours(3))) == 3  # every method its own colour
    assert "resumed after an interruption" not in (d / "timing.md").read_text()


def test_cell_killed_mid_attack_resumes_and_timing_says_its_time_is_partial(tmp_path, monkeypatch):
    """Killed while scoring UCE's second attack, the rerun resumes that cell's finished attack prompts
    (2 attacks x 2 prompts), gives the uninterrupted run's table, and timing.md names the cell."""
    import erasekit.attacks.asr as asr

    spec = _spec(tmp_path, ATTACKED, "attacked.toml")
    ref = _run(spec, tmp_path / "ref")["dir"]
    real, scored = asr.attack_asr, []

    def dying(result, *a):
        scored.append(result.attack)
        if scored.count("inversion") == 2:  # the UCE cell (the second), after both its attacks ran
            raise _Interrupt
        return real(result, *a)

    monkeypatch.setattr(asr, "attack_asr", dying)
    with pytest.raises(_Interrupt):
        _run(spec, tmp_path / "killed")
    monkeypatch.setattr(asr, "attack_asr", real)
    d = _run(spec, tmp_path / "killed")["dir"]
    assert (d / "table.md").read_text() == (ref / "table.md").read_text()
    timing = (d / "timing.md").read_text()
    assert "Attacks resumed after an interruption" in timing and "uce__tri__seed0 (4)" in timing, timing
    assert "original__tri__seed0 (" not in timing


class _Interrupt(BaseException):
    """Stands for a kill: not an Exception, so no cell catches it."""


def test_interrupted_study_resumes_without_redoing_done_cells(reference, tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    d = tmp_path / "killed"
    real_sel, real_run = operating.selection_metrics, operating._run
    calls = {"sel": 0}
    ran: list[str] = []

    def dying_selection(env, cell, edit):
        calls["sel"] += 1
        if calls["sel"] == 5:  # in the middle of the third cell, after its first chunk was checkpointed
            raise _Interrupt
        return real_sel(env, cell, edit)

    def logging_run(spec_, cell, rd):
        ran.append(cell.key)
        return real_run(spec_, cell, rd)

    monkeypatch.setattr(operating, "selection_metrics", dying_selection)
    monkeypatch.setattr(operating, "_run", logging_run)
    with pytest.raises(_Interrupt):
        _run(spec, d)
    done_before = {c["key"] for c in status(load_spec(spec), d)["cells"] if c["state"] == "done"}
    assert len(done_before) >= 1
    interrupted = ran[-1]
    assert interrupted not in done_before
    curve_path = d / "cells" / interrupted / "curve.jsonl"
    checks_before = len(curve_path.read_text().splitlines()) if curve_path.exists() else 0

    monkeypatch.setattr(operating, "selection_metrics", real_sel)
    ran.clear()
    out = _run(spec, d)
    assert out["counts"] == {"done": 8}
    assert not set(ran) & done_before, "a finished cell was redone"
    assert interrupted in ran
    curve = curve_path.read_text().splitlines()
    assert len(curve) >= checks_before and len(set(curve)) == len(curve)  # no check recorded twice
    assert _tables(d) == _tables(reference)


def test_failed_cell_is_reported_retried_and_isolated(reference, tmp_path, monkeypatch):
    spec = _spec(tmp_path, SEED0)
    d = tmp_path / "failing"
    real = operating.make_edit

    def flaky(env, cell, rd, **extra):
        if cell.key == "esd-u__sq__seed0":
            raise ValueError("simulated failure")
        return real(env, cell, rd, **extra)

    monkeypatch.setattr(operating, "make_edit", flaky)
    out = _run(spec, d)
    assert out["counts"] == {"done": 3, "failed": 1}
    st = {c["key"]: c for c in status(load_spec(spec), d)["cells"]}
    assert st["esd-u__sq__seed0"]["state"] == "failed"
    assert "simulated failure" in st["esd-u__sq__seed0"]["error"]
    assert "simulated failure" in (d / "table.md").read_text()  # reported in the table
    monkeypatch.setattr(operating, "make_edit", real)
    out = _run(spec, d)
    assert [r["key"] for r in out["ran"]] == ["esd-u__sq__seed0"]  # only the failed cell is retried
    assert out["counts"] == {"done": 4}
    assert _seed0_rows(d) == _seed0_rows(reference)


def test_study_folder_of_another_spec_is_refused(reference, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(reference, d)
    changed = _spec(tmp_path, SEED0.replace("target = 0.95", "target = 0.9"))
    with pytest.raises(ValueError, match=r"another spec.*operating_point\.target: 0\.95 -> 0\.9.*--force"):
        _run(changed, d)
    out = _run(changed, d, force=True)  # every cell's operating point changed: all redone
    assert out["counts"] == {"done": 4} and len(out["ran"]) == 4


def test_stop_at_chunks_equal_the_uninterrupted_run(tiny_pipe, tmp_path):
    """The target rule's chunks (FinetuneConfig.stop_at, then resume) end where one run of max_steps passes."""
    import erasekit
    from erasekit.edit import EraseRequest

    req = EraseRequest(["triangle"])
    kw = dict(method="esd", preset="paper", steps=4, ddim_steps=2, lr=1e-2, progress=False)
    full = erasekit.erase(tiny_pipe, req, **kw)
    run = str(tmp_path / "run")
    half = erasekit.erase(tiny_pipe, req, **kw, run_dir=run, resume=True, stop_at=2, checkpoint_every=2)
    rest = erasekit.erase(tiny_pipe, req, **kw, run_dir=run, resume=True, stop_at=4, checkpoint_every=2)
    assert half.trace["steps_this_call"] == 2 and rest.trace["steps_this_call"] == 2
    assert any(not torch.equal(half.tensors[k], full.tensors[k]) for k in full.tensors)
    for k in full.tensors:
        assert torch.equal(rest.tensors[k], full.tensors[k]), k


@pytest.mark.slow
def test_process_pool_gives_the_same_table(reference, tmp_path):
    out = _run(_spec(tmp_path), tmp_path / "pool", workers=2, threads=1)
    assert out["counts"] == {"done": 8}
    assert _tables(out["dir"]) == _tables(reference)


def test_ray_executor_gives_the_same_table(reference, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        out = _run(_spec(tmp_path), tmp_path / "ray", ray="auto", threads=1)
    finally:
        ray.shutdown()
    assert out["counts"] == {"done": 8}, out["ran"]
    assert _tables(out["dir"]) == _tables(reference)


def test_cli_status_table_plot(reference, tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    spec = str(_spec(tmp_path))
    runner = CliRunner()
    res = runner.invoke(app, ["study", "status", spec, "--dir", str(reference)])
    assert res.exit_code == 0, res.output
    assert res.output.count("done ") == 8 and '{"done": 8}' in res.output
    res = runner.invoke(app, ["study", "table", spec, "--dir", str(reference), "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert (
        "| ESD-x |" in res.output
        and (tmp_path / "t" / "results.csv").read_text() == (reference / "results.csv").read_text()
    )
    res = runner.invoke(app, ["study", "plot", spec, "--dir", str(reference), "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "esr_psr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ONE = (
    TINY.replace("seeds = [0, 1]", "seeds = [0]")
    .replace("max_steps = 2", "max_steps = 3")
    .split('[[methods]]\nlabel = "ESD-u"')[0]
    + '[[concepts]]\nlabel = "tri"\nerase = ["triangle"]\n'
)
FAKE_ESR = {1: 0.5, 2: 0.2, 3: 0.3}  # by the edit's step: the best check (step 1) is not the last (step 3)


def _fake_selection(env, cell, edit):
    v = FAKE_ESR[edit.config["stop_at"]]
    return {"esr_1": v, "esr_3": v, "psr_1": 0.5, "psr_3": 0.5}


def _step_edit(tiny_pipe, stop_at: int):
    import erasekit
    from erasekit.edit import EraseRequest

    kw = dict(method="esd", preset="paper", steps=3, ddim_steps=2, lr=5e-2, seed=0, progress=False)
    return erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), **kw, stop_at=stop_at)


def test_test_images_use_the_best_checks_edit_not_the_last(tiny_pipe, tmp_path, monkeypatch):
    """The fine-tuning chunks write their edit in finetune/, never over edit/ (the operating point's):
    a cell whose best check is not its last is tested with the best check's edit. A cell begun before
    (edit/ overwritten by a later chunk, best.json without a digest) has its best edit made again."""
    monkeypatch.setattr(operating, "selection_metrics", _fake_selection)
    spec = _spec(tmp_path, ONE)
    d = tmp_path / "best"
    assert _run(spec, d)["counts"] == {"done": 1}
    cell = d / "cells" / "esd-x__tri__seed0"
    best = operating.RunDir.open(cell)
    point = best.read_json(operating.BEST)
    assert point["step"] == 1 and len(best.records(operating.CURVE)) == 3 and "remade" not in point
    want = _step_edit(tiny_pipe, 1)
    last = _step_edit(tiny_pipe, 3)
    assert best.load_edit().digest() == want.digest() == point["edit_digest"] != last.digest()
    assert (cell / operating.FINETUNE_DIR / "edit").is_dir()  # the latest chunk's edit lives apart

    # a cell of the old layout: edit/ holds the last chunk's edit and best.json has no digest
    shutil.rmtree(best.edit_dir)
    best.save_edit(last)
    old = {k: v for k, v in point.items() if k != "edit_digest"}
    best.write_json(operating.BEST, old)
    best.mark(operating.CELL_STAGE, "failed", error="redo")
    assert _run(spec, d)["counts"] == {"done": 1}
    again = best.read_json(operating.BEST)
    assert best.load_edit().digest() == want.digest() == again["edit_digest"]
    assert again["remade"]["matches_curve"] is True and again["remade"]["selection"]["esr_1"] == 0.5
    # the remake's seconds are the study's too: in the cell's result and the timing table
    assert best.read_json("result.json")["seconds"]["remake"] == again["remade"]["seconds"] > 0
    assert "remake" in (d / "timing.md").read_text() and "Cell time:" in (d / "timing.md").read_text()
