"""The Gradio layout of ``erasekit serve`` (issue 18): tabs Erase, Compare, Evaluate / attack, Export, Report.

This module only wires widgets to :mod:`erasekit.serve.core`; every handler is a thin call that
either queues a job there or renders a job's result, and every error reaches the page as one
escaped message line (:func:`core.message`), never a traceback. The page polls its job once a
second (``gr.Timer``); the job id is kept in the URL (``?job=ID``), so a reload shows the same job.
Gradio is the optional ``ui`` extra: ``pip install 'erasekit[ui]'``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from erasekit.methods.base import available_methods  # noqa: E402
from erasekit.serve import core  # noqa: E402

CSS = """
.ek-msg {padding: 6px 10px; border-radius: 6px; margin: 4px 0}
.ek-error {background: #fde8e8; color: #8a1c1c} .ek-ok {background: #e7f6ea; color: #1c5e2a}
.ek-info {background: #eef2f8; color: #1f3a5f}
.ek-grid img.ek-img, .ek-found img {width: 96px; height: 96px; image-rendering: pixelated}
.ek-grid td, .ek-grid th {padding: 3px; text-align: center; vertical-align: top; font-size: 12px}
.ek-verdict {font-size: 11px} .ek-hit {color: #b00020; font-weight: bold}
.ek-found {display: flex; flex-wrap: wrap; gap: 6px} .ek-found figure {margin: 0; width: 110px; font-size: 11px}
.ek-metrics td, .ek-metrics th, .ek-perclass td, .ek-perclass th, .ek-jobs td, .ek-jobs th {padding: 2px 8px}
.ek-erased {color: #b00020}
iframe.ek-report {width: 100%; height: 900px; border: 1px solid #ccc}
progress {width: 240px; vertical-align: middle}
"""
# System fonts only: the default theme would fetch Google Fonts, and the app never reaches the internet.
THEME_FONTS = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}
RESULT_KINDS = ("compare", "evaluate", "attack", "export", "report")


def build_app(
    runs: str | Path,
    model: str = "shapes",
    *,
    workers: int = 1,
    device: str = "cpu",
    queue: core.JobQueue | None = None,
) -> tuple[gr.Blocks, core.JobQueue]:
    """The Gradio app over the runs directory ``runs`` and base model ``model``, and its job queue."""
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    q = queue or core.JobQueue(model, workers=workers, device=device)
    methods = available_methods()
    attacks = core.attack_names()

    def run_choices() -> list[str]:
        return core.list_runs(runs)

    def submit(kind: str, title: str, build: Any, run: str | None = None) -> tuple[str, str | Any, str]:
        """Build a job function (validating input) and queue it: (message, job id, status)."""
        try:
            fn = build()
            job = q.submit(kind, title, fn, run=run)
        except core.BadInput as e:
            return core.message(str(e), "error"), gr.skip(), gr.skip()
        pos = q.position(job)
        note = f"{kind} queued as job {job.id}" + (f" (position {pos})" if pos and pos > 1 else "")
        return core.message(note, "info"), job.id, core.job_status_html(q, job)

    with gr.Blocks(title="EraseKit") as demo:
        job_id = gr.Textbox(visible=False, elem_id="job-id")
        shown = gr.State("")  # the job whose result is on the page
        gr.HTML(
            f"<h2>EraseKit</h2><div>Model <code>{core.esc(model)}</code>, runs in <code>{core.esc(runs.resolve())}"
            f"</code>, {q.workers} job(s) at a time.</div>"
        )
        status = gr.HTML(core.job_status_html(q, None), elem_id="job-status")
        with gr.Tabs():
            with gr.Tab("Erase", id="erase"):
                with gr.Row():
                    method = gr.Dropdown(list(methods), value="uce", label="Method", elem_id="erase-method")
                    preset = gr.Dropdown(
                        list(methods["uce"].presets),
                        value=methods["uce"].default_preset,
                        label="Preset",
                        elem_id="erase-preset",
                    )
                    name = gr.Textbox(label="Run name", placeholder="uce-triangle", elem_id="erase-name")
                    seed = gr.Textbox("0", label="Seed", elem_id="erase-seed")
                with gr.Row():
                    erase_c = gr.Textbox(
                        label="Erase (comma-separated)", placeholder="triangle", elem_id="erase-concepts"
                    )
                    preserve_c = gr.Textbox(label="Preserve", placeholder="square, circle", elem_id="erase-preserve")
                    anchor = gr.Textbox(label="Anchor (empty: the empty prompt)", elem_id="erase-anchor")
                options = gr.Textbox(label="Options, KEY=VALUE per line", lines=3, elem_id="erase-options")
                with gr.Accordion("Options of this method", open=False):
                    option_help = gr.Textbox(core.method_options("uce"), lines=8, show_label=False, interactive=False)
                with gr.Row():
                    erase_btn = gr.Button("Erase (UCE)", variant="primary", elem_id="erase-btn")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
                    resume_btn = gr.Button("Resume", elem_id="resume-btn")
                erase_msg = gr.HTML(elem_id="erase-msg")
                log = gr.Textbox(label="Log", lines=8, max_lines=16, interactive=False, elem_id="job-log")
                jobs = gr.HTML(core.jobs_table(q), elem_id="jobs")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    source = gr.Radio(["free text", "shapes-objects"], value="free text", label="Prompts")
                    prompt = gr.Textbox(
                        "a red triangle\na blue square",
                        label="Prompt(s), one per line",
                        lines=2,
                        elem_id="compare-prompt",
                    )
                    seeds = gr.Textbox("0:4", label="Seeds", elem_id="compare-seeds")
                cmp_runs = gr.Dropdown(
                    run_choices(), multiselect=True, label="Edits to compare", elem_id="compare-runs"
                )
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                cmp_msg = gr.HTML(elem_id="compare-msg")
                grid = gr.HTML(elem_id="compare-grid")
            with gr.Tab("Evaluate / attack", id="evaluate"):
                ev_run = gr.Dropdown(run_choices(), label="Run", elem_id="eval-run")
                with gr.Row():
                    protocol = gr.Dropdown(["shapes-objects"], value="shapes-objects", label="Protocol")
                    n_per_class = gr.Textbox("10", label="Images per class", elem_id="eval-n")
                    ev_seed = gr.Textbox("0", label="First seed", elem_id="eval-seed")
                    ev_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
                with gr.Row():
                    concept = gr.Textbox(
                        label="Concept to bring back (default: the run's first erased)", elem_id="attack-concept"
                    )
                    which = gr.CheckboxGroup(attacks, value=["paraphrase"], label="Attacks", elem_id="attack-which")
                    n_prompts = gr.Textbox("4", label="Prompts", elem_id="attack-prompts")
                    n_images = gr.Textbox("1", label="Images per prompt", elem_id="attack-images")
                    at_btn = gr.Button("Attack", variant="primary", elem_id="attack-btn")
                ev_msg = gr.HTML(elem_id="eval-msg")
                ev_out = gr.HTML(elem_id="eval-metrics")
                at_out = gr.HTML(elem_id="attack-out")
            with gr.Tab("Export", id="export"):
                formats = core.export_formats()
                ex_run = gr.Dropdown(run_choices(), label="Run", elem_id="export-run")
                ex_fmt = gr.Dropdown(
                    list(formats or ()), value=(formats or [None])[0], label="Format", interactive=formats is not None
                )
                ex_btn = gr.Button("Export", variant="primary", interactive=formats is not None, elem_id="export-btn")
                ex_msg = gr.HTML(
                    core.message(core.EXPORT_UNAVAILABLE, "info") if formats is None else "", elem_id="export-msg"
                )
                ex_file = gr.File(label="Download", interactive=False)
            with gr.Tab("Report", id="report"):
                with gr.Row():
                    rp_run = gr.Dropdown(run_choices(), label="Run", elem_id="report-run")
                    rp_seeds = gr.Textbox("0:6", label="Seeds", elem_id="report-seeds")
                    rp_btn = gr.Button("Build report", variant="primary", elem_id="report-btn")
                rp_msg = gr.HTML(elem_id="report-msg")
                rp_out = gr.HTML(elem_id="report-page")
        timer = gr.Timer(1.0)

        # ---- Erase
        def on_method(m: str):
            spec = methods[m]
            return (
                gr.update(choices=list(spec.presets), value=spec.default_preset),
                core.method_options(m),
                gr.update(value=f"Erase ({m.upper()})"),
            )

        method.change(on_method, method, [preset, option_help, erase_btn])

        def do_erase(m, p, n, s, e, pr, a, o, resume=False):
            def build():
                plan = core.plan_erase(
                    runs,
                    model,
                    name=n,
                    method=m,
                    preset=p,
                    erase=e,
                    preserve=pr,
                    anchor=a,
                    options=o,
                    seed=s,
                    resume=resume,
                )
                return core.erase_job(plan)

            title = f"{'resume ' if resume else ''}{m} erasing {core.split_list(e)} -> {(n or '').strip()}"
            return submit("erase", title, build, run=(n or "").strip() or None)

        erase_inputs = [method, preset, name, seed, erase_c, preserve_c, anchor, options]
        set_url = (
            "(j) => { if (j) { const u = new URL(window.location); u.searchParams.set('job', j); "
            "history.replaceState(null, '', u); } }"
        )
        erase_btn.click(do_erase, erase_inputs, [erase_msg, job_id, status], concurrency_limit=None).then(
            None, job_id, None, js=set_url
        )
        resume_btn.click(
            lambda *a: do_erase(*a, resume=True), erase_inputs, [erase_msg, job_id, status], concurrency_limit=None
        ).then(None, job_id, None, js=set_url)

        def do_cancel(j):
            try:
                job = q.cancel(j)
            except core.BadInput as e:
                return core.message(str(e), "error")
            return core.message(f"Cancelling job {job.id}.", "info")

        cancel_btn.click(do_cancel, job_id, erase_msg, concurrency_limit=None)

        # ---- Compare, Evaluate, Attack, Export, Report: each queues a job
        def do_compare(src, pr, sd, names):
            def build():
                seeds_ = core.parse_seed_text(sd)
                return core.compare_job(runs, list(names or []), core.compare_prompts(src, pr, seeds_[0]), seeds_)

            return submit("compare", f"compare {list(names or [])}", build)

        cmp_btn.click(
            do_compare, [source, prompt, seeds, cmp_runs], [cmp_msg, job_id, status], concurrency_limit=None
        ).then(None, job_id, None, js=set_url)

        def do_eval(r, proto, n, s):
            return submit("evaluate", f"{proto} on {r}", lambda: core.evaluate_job(runs, r or "", proto, n, s))

        ev_btn.click(
            do_eval, [ev_run, protocol, n_per_class, ev_seed], [ev_msg, job_id, status], concurrency_limit=None
        ).then(None, job_id, None, js=set_url)

        def do_attack(r, c, w, k, m):
            def build():
                path = core.resolve_run(runs, r or "")
                c_ = (c or "").strip() or core.Edit.load(path).request.erase[0]
                return core.attack_job(runs, r, c_, w, k, m, 0)

            return submit("attack", f"{list(w or [])} on {r}", build)

        at_btn.click(
            do_attack, [ev_run, concept, which, n_prompts, n_images], [ev_msg, job_id, status], concurrency_limit=None
        ).then(None, job_id, None, js=set_url)

        def do_export(r, f):
            return submit("export", f"{f} of {r}", lambda: core.export_job(runs, r or "", f))

        ex_btn.click(do_export, [ex_run, ex_fmt], [ex_msg, job_id, status], concurrency_limit=None).then(
            None, job_id, None, js=set_url
        )

        def do_report(r, sd):
            return submit("report", f"report of {r}", lambda: core.report_job(runs, r or "", sd))

        rp_btn.click(do_report, [rp_run, rp_seeds], [rp_msg, job_id, status], concurrency_limit=None).then(
            None, job_id, None, js=set_url
        )

        def show_report(r):
            if not r:
                return ""
            try:
                return core.existing_report(runs, r)
            except core.BadInput as e:
                return core.message(str(e), "error")

        rp_run.change(show_report, rp_run, rp_out, concurrency_limit=None)

        # ---- polling: the job's status and log; its result once, when it finished
        result_outputs = {"compare": grid, "evaluate": ev_out, "attack": at_out, "export": ex_msg, "report": rp_out}
        run_boxes = [cmp_runs, ev_run, ex_run, rp_run]
        outputs = [status, log, jobs, shown, *result_outputs.values(), ex_file, *run_boxes]

        def tick(j, seen):
            job = q.get(j)
            keep = [gr.skip()] * (len(result_outputs) + 1 + len(run_boxes))
            head = [core.job_status_html(q, job), "\n".join(job.log) if job else "", core.jobs_table(q)]
            if job is None or job.status not in core.FINISHED or job.id == seen:
                return [*head, seen, *keep]
            out = dict.fromkeys(result_outputs, gr.skip())
            file = gr.skip()
            boxes = [gr.skip()] * len(run_boxes)
            if job.status == "failed" and job.kind in result_outputs:
                out[job.kind] = core.message(job.error or "failed", "error")
            elif job.status == "done" and job.kind in result_outputs:
                out[job.kind] = job.result["html"]
                if job.kind == "export":
                    file = job.result["file"]
            elif job.kind == "erase" and job.status == "done":  # the new run, chosen everywhere
                new, choices = job.result["run"], run_choices()
                boxes = [gr.update(choices=choices, value=[new])] + [
                    gr.update(choices=choices, value=new) for _ in run_boxes[1:]
                ]
            return [*head, job.id, *out.values(), file, *boxes]

        timer.tick(tick, [job_id, shown], outputs, concurrency_limit=None, show_progress="hidden")

        def on_load(request: gr.Request):
            j = request.query_params.get("job", "") if request else ""
            job = q.get(j)
            choices = run_choices()
            return [job.id if job else "", *[gr.update(choices=choices) for _ in run_boxes]]

        demo.load(on_load, None, [job_id, *run_boxes], concurrency_limit=None)
    return demo, q


def serve(
    model: str = "shapes",
    runs: str | Path = "runs",
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    device: str = "cpu",
) -> None:
    """Start the app (blocking) on ``host:port``; no share link, no analytics."""
    demo, q = build_app(runs, model, workers=workers, device=device)
    demo.queue(default_concurrency_limit=None)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            show_error=False,
            css=CSS,
            theme=gr.themes.Default(**THEME_FONTS),
            footer_links=[],
            ssr_mode=False,
        )
    finally:
        q.shutdown()
