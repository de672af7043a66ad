"""The web app's logic without a browser (erasekit.serve.core): paths, escaping, the job queue, bad input."""

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

import erasekit
from erasekit.eval.detectors import load_detector
from erasekit.eval.generate import generate_images
from erasekit.eval.protocols import evaluate
from erasekit.serve import core

ESD_FAST = "steps=2\nddim_steps=2"


# ------------------------------------------------------------------------------------------ paths
@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    r.mkdir()
    return r


def fake_run(runs, name):
    (runs / name).mkdir()
    (runs / name / "edit.json").write_text("{}")
    return runs / name


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "/etc", "..", ".serve", "a/../../b", "x\x00y", "", "  ", "a\\b", "~root", "a" * 81]
)
def test_resolve_run_refuses_anything_but_a_plain_name(runs, name):
    with pytest.raises(core.BadInput) as e:
        core.resolve_run(runs, name, must_exist=False)
    assert "run" in str(e.value).lower()


def test_resolve_run_inside_and_must_exist(runs):
    assert core.resolve_run(runs, "new-run_1.b", must_exist=False) == (runs / "new-run_1.b").resolve()
    with pytest.raises(core.BadInput, match="No run 'missing'"):
        core.resolve_run(runs, "missing")
    fake_run(runs, "uce-tri")
    assert core.resolve_run(runs, "uce-tri") == (runs / "uce-tri").resolve()


def test_symlink_leading_out_is_refused_and_not_listed(runs, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "edit.json").write_text("{}")
    (runs / "link").symlink_to(outside)
    with pytest.raises(core.BadInput, match="outside the runs directory"):
        core.resolve_run(runs, "link")
    fake_run(runs, "a")
    (runs / "not-a-run").mkdir()
    (runs / ".serve").mkdir()
    (runs / ".serve" / "edit.json").write_text("{}")
    assert core.list_runs(runs) == ["a"]


# ------------------------------------------------------------------------------------------ escaping
EVIL = '<script>alert("x")</script>&\'"'


def test_escaping_of_user_text_in_every_html_builder():
    img = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    grid = core.compare_grid(
        [(EVIL, 0), (EVIL, 1)], {"original": img, EVIL: img}, {EVIL: [(EVIL, 0.5), ("x", 0.1)]}, {EVIL: [EVIL]}
    )
    table = core.metrics_table({EVIL: EVIL})
    msg = core.message(EVIL, "error")
    frame = core.report_frame('<html>"</iframe><script>alert(1)</script></html>')
    for page in (grid, table, msg):
        assert "<script>" not in page and EVIL not in page
        assert core.esc(EVIL) in page
    assert "ek-hit" in grid  # the verdict names the erased concept
    assert frame.count("<iframe") == 1 and "</iframe><script>" not in frame and 'sandbox=""' in frame
    assert core.esc("x") == "x" and core.esc('"') == "&quot;"


def test_job_titles_and_errors_are_escaped_in_status_and_table():
    q = core.JobQueue(workers=1)

    def boom(job, ctx):
        raise core.BadInput(EVIL)

    job = q.wait(q.submit("compare", EVIL, boom))
    assert job.status == "failed" and job.error == EVIL
    for page in (core.job_status_html(q, job), core.jobs_table(q)):
        assert "<script>" not in page and core.esc(EVIL) in page


# ------------------------------------------------------------------------------------------ job queue
def test_queue_runs_one_job_at_a_time_in_order():
    q = core.JobQueue(workers=1)
    active, peak, order, lock = [0], [0], [], threading.Lock()

    def work(i):
        def fn(job, ctx):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            order.append(i)
            with lock:
                active[0] -= 1
            return i

        return fn

    jobs = [q.submit("compare", f"j{i}", work(i)) for i in range(4)]
    assert q.position(jobs[-1]) in (3, 4)  # behind the others
    for j in jobs:
        q.wait(j, 30)
    assert peak[0] == 1 and order == [0, 1, 2, 3] and [j.result for j in jobs] == [0, 1, 2, 3]
    assert all(j.status == "done" for j in jobs) and q.position(jobs[0]) is None


def test_queue_with_two_workers_runs_two_at_once():
    q = core.JobQueue(workers=2)
    barrier = threading.Barrier(2, timeout=10)
    jobs = [q.submit("compare", "x", lambda job, ctx: barrier.wait()) for _ in range(2)]
    for j in jobs:
        q.wait(j, 30)
    assert [j.status for j in jobs] == ["done", "done"]  # the barrier needs both at once


def test_second_erase_while_one_runs_is_refused_naming_it():
    q = core.JobQueue(workers=1)
    gate = threading.Event()
    first = q.submit("erase", "uce erasing ['triangle'] -> a", lambda job, ctx: gate.wait(10), run="a")
    with pytest.raises(core.BadInput, match=f"already (queued|running): job {first.id}"):
        q.submit("erase", "second", lambda job, ctx: None, run="b")
    with pytest.raises(core.BadInput, match=f"Run 'a' is being written by job {first.id}"):
        q.submit("report", "report of a", lambda job, ctx: None, run="a")
    other = q.submit("compare", "fine", lambda job, ctx: "ok")  # other jobs wait their turn
    gate.set()
    assert q.wait(other, 30).result == "ok" and q.wait(first).status == "done"
    q.wait(q.submit("erase", "now fine", lambda job, ctx: None, run="b"), 30)


def test_failing_job_keeps_the_worker_and_cancel_of_queued_job():
    q = core.JobQueue(workers=1)
    gate = threading.Event()

    def crash(job, ctx):
        gate.wait(10)
        raise RuntimeError("boom")

    bad = q.submit("compare", "bad", crash)
    while bad.status == "queued":
        time.sleep(0.01)
    queued = q.submit("compare", "later", lambda job, ctx: "never")
    assert q.cancel(queued.id).status == "cancelled"
    with pytest.raises(core.BadInput, match="only erasures can"):
        q.cancel(bad.id)  # running, in-process
    gate.set()
    assert q.wait(bad).status == "failed" and bad.error == "RuntimeError: boom"
    assert queued.result is None and q.wait(q.submit("compare", "ok", lambda job, ctx: 1)).result == 1
    with pytest.raises(core.BadInput, match="No job to cancel"):
        q.cancel("../../etc")
    assert q.get("../../etc") is None and q.get(None) is None
    with pytest.raises(ValueError, match="workers"):
        core.JobQueue(workers=0)


SCRIPT = r"""
import sys, time
for i in range(1, 4):
    sys.stderr.write(f"\rstep: {i}/10 |###| {i}/10 [00:01<00:09]"); sys.stderr.flush()
print("a log line")
if sys.argv[1] == "fail":
    print("error: `--set lamb=abc`: must be a number, e.g. lamb=0.1.", file=sys.stderr); sys.exit(2)
if sys.argv[1] == "hang":
    time.sleep(60)
"""


def fake_plan(tmp_path, mode):
    return core.ErasePlan("r", tmp_path / "r", "esd", [sys.executable, "-c", SCRIPT, mode], True, False)


def test_erase_job_reads_progress_and_the_clis_error_line(tmp_path):
    q = core.JobQueue(workers=1)
    ok = q.wait(q.submit("erase", "ok", core.erase_job(fake_plan(tmp_path, "ok"))), 60)
    assert ok.status == "done" and ok.progress == 1.0 and "step: 3/10" in ok.progress_text
    assert "a log line" in ok.log
    bad = q.wait(q.submit("erase", "bad", core.erase_job(fake_plan(tmp_path, "fail"))), 60)
    assert bad.status == "failed" and bad.error == "`--set lamb=abc`: must be a number, e.g. lamb=0.1."
    assert "Traceback" not in "\n".join(bad.log)


def test_cancel_interrupts_a_running_erase(tmp_path):
    q = core.JobQueue(workers=1)
    job = q.submit("erase", "hang", core.erase_job(fake_plan(tmp_path, "hang")))
    t0 = time.time()
    while job.proc is None or not any("a log line" in line for line in job.log):
        assert time.time() - t0 < 60
        time.sleep(0.05)
    q.cancel(job.id)
    q.wait(job, 30)
    assert job.status == "cancelled" and job.result == {"run": "r", "resumable": False}
    assert any("no checkpoint" in line for line in job.log)


# ------------------------------------------------------------------------------------------ bad input
def plan(runs, **kw):
    args = dict(name="uce-tri", method="uce", preset=None, erase="triangle")
    return core.plan_erase(runs, "shapes", **{**args, **kw})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"erase": " , "}, "`erase` is empty"),
        ({"erase": "zebra"}, r"Unknown erase concept\(s\) \['zebra'\]"),
        ({"preserve": "triangle"}, "both erased and preserved"),
        ({"preserve": "unicorn"}, r"Unknown preserve concept\(s\) \['unicorn'\]"),
        ({"options": "lamb=abc"}, "option `lamb=abc`: must be a number"),
        ({"options": "steps=3"}, "unknown option; valid options"),
        ({"options": "lamb"}, "must look like KEY=VALUE"),
        ({"name": "../evil"}, "Run name '../evil' is not allowed"),
        ({"name": ""}, "No run chosen"),
        ({"method": "nope"}, "Unknown method 'nope'"),
        ({"preset": "fancy"}, "Unknown preset 'fancy'"),
        ({"seed": "x"}, "Seed 'x' must be an integer"),
        ({"resume": True}, "uce has no checkpoints"),
        ({"method": "esd", "options": "resume=true"}, "Option 'resume' is set by the app"),
    ],
)
def test_plan_erase_refuses_bad_input_and_writes_nothing(runs, kw, match):
    with pytest.raises(core.BadInput, match=match):
        plan(runs, **kw)
    assert list(runs.iterdir()) == []


def test_plan_erase_builds_the_cli_command(runs):
    p = plan(runs, preserve="square, circle", options="lamb=0.1\n# a comment", seed="3", preset="paper")
    assert p.argv[1:5] == ["-m", "erasekit", "erase", "--method"] and not p.finetune
    joined = " ".join(p.argv)
    for part in (
        "--erase triangle",
        "--preserve square --preserve circle",
        "--set lamb=0.1",
        "--seed 3",
        "--preset paper",
        f"--out {runs.resolve() / 'uce-tri'}",
    ):
        assert part in joined
    f = plan(runs, method="esd", options=ESD_FAST, resume=True)
    # run_dir is the run directory itself: its checkpoints go to RUN/train (erasekit.rundir.RunDir.train_dir)
    assert f.finetune and f"run_dir={runs.resolve() / 'uce-tri'}" in f.argv and "resume=true" in f.argv
    assert f.argv[-1] == "--overwrite"
    fake_run(runs, "uce-tri")
    with pytest.raises(core.BadInput, match="already exists"):
        plan(runs)


def test_other_bad_inputs(runs):
    with pytest.raises(core.BadInput, match="repeats a seed"):
        core.parse_seed_text("1,1")
    with pytest.raises(core.BadInput, match="Seeds `5:1` is an empty range"):
        core.parse_seed_text("5:1")
    with pytest.raises(core.BadInput, match="The prompt is empty"):
        core.compare_prompts("free text", "  \n ")
    assert len(core.compare_prompts("shapes-objects", "")) == 10
    with pytest.raises(core.BadInput, match="No edit chosen"):
        core.compare_job(runs, [], ["a"], [0])
    fake_run(runs, "a")
    with pytest.raises(core.BadInput, match="at most 96"):
        core.compare_job(runs, ["a"], ["p"] * 10, list(range(10)))
    with pytest.raises(core.BadInput, match="Images per class must be an integer"):
        core.evaluate_job(runs, "a", "shapes-objects", "ten", 0)
    with pytest.raises(core.BadInput, match="between 1 and 50"):
        core.evaluate_job(runs, "a", "shapes-objects", 0, 0)
    with pytest.raises(core.BadInput, match="needs prompt files"):
        core.evaluate_job(runs, "a", "i2p", 1, 0)
    with pytest.raises(core.BadInput, match="Unknown attack"):
        core.attack_job(runs, "a", "triangle", ["nope"], 1, 1, 0)
    with pytest.raises(core.BadInput, match="Unknown attack"):
        core.attack_job(runs, "a", "triangle", ["none"], 1, 1, 0)
    with pytest.raises(core.BadInput, match="No run '..'|not allowed"):
        core.attack_job(runs, "..", "triangle", ["paraphrase"], 1, 1, 0)


def test_export_unavailable_message(runs, monkeypatch):
    fake_run(runs, "a")
    monkeypatch.setitem(sys.modules, "erasekit.export", None)  # import fails as in a version without it
    assert core.export_formats() is None
    with pytest.raises(core.BadInput, match=core.EXPORT_UNAVAILABLE):
        core.export_job(runs, "a", "lora")


# ------------------------------------------------------------------------------------------ the jobs, on the miniature
@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("serve") / "runs"
    pipe = erasekit.load_pipeline("shapes")
    edit = erasekit.erase(pipe, erasekit.EraseRequest(["triangle"]), "uce")
    edit.save(runs / "uce-tri")
    return runs, pipe, edit


def test_compare_job_is_the_api_images_and_detector(shapes_run, one_thread):
    runs, pipe, edit = shapes_run
    q = core.JobQueue("shapes", workers=1)
    job = q.wait(q.submit("compare", "c", core.compare_job(runs, ["uce-tri"], ["a red triangle"], [0, 1])), 300)
    assert job.status == "done", job.error
    html = job.result["html"]
    assert html.count('data-run="uce-tri" data-seed=') == 2 and html.count('data-run="original" data-seed=') == 2
    with edit.applied(pipe):
        imgs = generate_images(pipe, ["a red triangle"] * 2, [0, 1])
    det = load_detector("shapes")
    assert job.result["verdicts"]["uce-tri"] == core.verdicts_of(det, imgs)
    probs = det.predict(imgs)["object"]  # the object head's verdict, by hand
    assert [v[0] for v in job.result["verdicts"]["uce-tri"]] == [det.heads["object"][i] for i in probs.argmax(1)]
    assert all(v[0] == "triangle" for v in job.result["verdicts"]["original"])
    assert [core.png_uri(i) in html for i in imgs] == [True, True]


def test_evaluate_job_matches_the_protocol(shapes_run, one_thread):
    runs, pipe, edit = shapes_run
    q = core.JobQueue("shapes", workers=1)
    job = q.wait(q.submit("evaluate", "e", core.evaluate_job(runs, "uce-tri", "shapes-objects", 1, 3)), 300)
    assert job.status == "done", job.error
    with edit.applied(pipe):
        ref = evaluate(pipe, "shapes-objects", erase=["triangle"], n_per_class=1, seed=3, progress=False)
    for k in ("esr_1", "esr_3", "psr_1", "psr_3"):
        assert job.result["metrics"][k] == ref[k]
        assert f'data-metric="{k}">{ref[k]:.4f}<' in job.result["html"]


def test_export_job_writes_a_lora_that_equals_the_edit(shapes_run, one_thread):
    import zipfile

    from safetensors.torch import load_file

    runs, pipe, edit = shapes_run
    assert core.export_formats() == ("diffusers", "lora", "kohya", "unet")
    q = core.JobQueue("shapes", workers=1)
    job = q.wait(q.submit("export", "x", core.export_job(runs, "uce-tri", "lora")), 300)
    assert job.status == "done", job.error
    with zipfile.ZipFile(job.result["file"]) as z:
        assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(z.namelist())
    (out,) = (runs / "uce-tri" / "exports").glob("lora-*")
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)  # the peft keys stock load_lora_weights reads


@pytest.mark.slow
def test_erase_job_runs_the_cli_on_the_miniature(tmp_path):
    runs = tmp_path / "runs"
    q = core.JobQueue("shapes", workers=1)
    p = core.plan_erase(runs, "shapes", name="uce-tri", method="uce", preset=None, erase="triangle")
    job = q.wait(q.submit("erase", "e", core.erase_job(p), run="uce-tri"), 600)
    assert job.status == "done", job.log
    assert core.list_runs(runs) == ["uce-tri"] and erasekit.Edit.load(runs / "uce-tri").request.erase == ["triangle"]
    assert os.path.exists(runs / "uce-tri" / "run.json")


@pytest.mark.slow
def test_finetune_erase_cancel_and_resume_on_the_miniature(tmp_path):
    runs = tmp_path / "runs"
    q = core.JobQueue("shapes", workers=1)
    args = dict(name="esd-tri", method="esd", preset=None, erase="triangle", options=ESD_FAST.replace("2", "60", 1))
    args["options"] += "\ncheckpoint_every=1"
    job = q.submit("erase", "esd", core.erase_job(core.plan_erase(runs, "shapes", **args)), run="esd-tri")
    t0 = time.time()
    while not list((runs / "esd-tri" / "train" / "checkpoints").glob("step-*")):
        assert time.time() - t0 < 600 and job.status in ("queued", "running"), job.log
        time.sleep(0.2)
    q.cancel(job.id)
    q.wait(job, 120)
    assert job.status == "cancelled" and job.result["resumable"], job.log
    assert core.list_runs(runs) == []  # checkpoints kept, but not a run yet
    with pytest.raises(core.BadInput, match="already exists"):
        core.plan_erase(runs, "shapes", **args)
    resumed = q.wait(q.submit("erase", "r", core.erase_job(core.plan_erase(runs, "shapes", resume=True, **args))), 900)
    assert resumed.status == "done", resumed.log
    assert core.list_runs(runs) == ["esd-tri"]
    edit = erasekit.Edit.load(runs / "esd-tri")
    assert edit.trace["steps_this_call"] < 60  # continued from the checkpoint, not from step 0
