"""The per-run HTML report: sections per method, self-contained page, same seeds on both sides, errors."""

from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import erasekit
from erasekit.analysis.spectrum import Spectrum
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.html import png_data_uri
from erasekit.io import write_json_atomic
from erasekit.methods.hide import HideConfig, hide
from erasekit.pipeline import fingerprint, load_pipeline
from erasekit.report.run_report import build_run_report, find_metrics, headline_metrics, image_strip
from erasekit.runs import write_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)

FAST = SamplingConfig(steps=2)
SEEDS = range(2)
REQ = EraseRequest(["triangle"], preserve=["square", "circle"])


def save_run(edit, d):
    """A run directory as `erasekit erase --out d` writes it."""
    edit.save(d)
    write_run_config(d, method=edit.method, config=edit.config, request=edit.metadata()["request"], base=edit.base)
    return d


class Sources(HTMLParser):
    """Every src/href attribute and tag of a page."""

    def __init__(self):
        super().__init__()
        self.links, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


def check_self_contained(page: str) -> int:
    p = Sources()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert p.links and all(v.startswith("data:image/png;base64,") for v in p.links), [v[:40] for v in p.links]
    return len(p.links)


def test_uce_report_from_model_folder_with_metrics_and_spectrum(tiny_pipe_dir, tmp_path):
    pipe = load_pipeline(tiny_pipe_dir)
    edit = erasekit.erase(pipe, REQ, method="uce", progress=False)
    run = save_run(edit, tmp_path / "run")
    # `erasekit evaluate --out RUN/eval-...` without and with --edit
    base = {"protocol": "shapes-objects", "esr_1": 0.1, "esr_3": 0.0, "psr_1": 0.9, "psr_3": 1.0, "model": "m"}
    write_json_atomic(run / "eval-original" / "metrics.json", {**base, "edit": None})
    write_json_atomic(run / "eval-edited" / "metrics.json", {**base, "esr_1": 0.95, "psr_1": 0.85, "edit": str(run)})
    write_json_atomic(run / "eval-edited" / "images" / "metrics.json", {"esr_1": 0.5})  # images/ is not searched
    words = [f"w{i}" for i in range(6)]
    orig = np.random.default_rng(0).uniform(20, 30, (6, 2))
    Spectrum(words, [0, 1], orig, orig - 1.5, erased=["w0"], label="uce").save(run / "spectrum" / "spectrum-uce.json")

    path = build_run_report(run, model=str(tiny_pipe_dir), seeds=SEEDS, sampling=FAST, progress=False)

    assert path == run / "report.html" and path.exists()
    page = path.read_text()
    check_self_contained(page)
    for text in ("uce erasing triangle", "Request", "Before / after", "Metrics", "Sensitivity spectrum (spectrum)"):
        assert text in page, text
    assert "Config and base model" in page and edit.base["fingerprint"] in page and edit.created in page
    assert "ESR-1" in page and "95.0%" in page and "+85.0" in page  # original 10% -> edited 95%
    assert page.count("<tr") >= 4 and "square" in page and "circle" in page
    assert "Method trace" not in page  # UCE is closed form: no trace of its own
    # the report generated the same images as generate_images on the unedited model, same seeds
    expected = generate_images(pipe, ["square"] * 2, [0, 1], FAST)  # `pipe` is unchanged by erase
    assert png_data_uri(image_strip(expected)) in page


def test_rece_report_shows_derived_embeddings_and_leaves_pipe_unchanged(tiny_pipe, tmp_path):
    edit = erasekit.erase(tiny_pipe, REQ, method="rece", epochs=1, progress=False)
    run = save_run(edit, tmp_path / "run")
    fp = fingerprint(tiny_pipe)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}

    path = build_run_report(run, pipe=tiny_pipe, seeds=SEEDS, sampling=FAST, progress=False, out=tmp_path / "r.html")

    assert path == tmp_path / "r.html" and not (run / "report.html").exists()
    page = path.read_text()
    n_images = check_self_contained(page)
    assert (
        "RECE derived embeddings per epoch" in page
        and "(epoch 1) is derived from the final model" in page
        and "residual of c′" in page
    )
    assert n_images >= 2 * 3 + 1  # 3 before/after rows (2 strips each) + the epochs figure
    assert "Metrics" not in page and "Sensitivity spectrum" not in page  # nothing measured in this run
    assert fingerprint(tiny_pipe) == fp
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("method", "field", "title"), [("ap", "adversarial", "adversarial"), ("age", "targets", "target")]
)
def test_ap_and_age_reports_show_the_chosen_concepts(tiny_pipe, tmp_path, method, field, title):
    fast = dict(steps=2, ddim_steps=2, vocabulary="shapes", k=4, search_lr=1e-2)
    edit = erasekit.erase(tiny_pipe, REQ, method=method, progress=False, **fast)
    run = save_run(edit, tmp_path / "run")
    path = build_run_report(
        run, pipe=tiny_pipe, seeds=range(1), preserve=["circle", "triangle"], sampling=FAST, progress=False
    )
    page = path.read_text()
    check_self_contained(page)
    assert f"Method trace: {title} concept for “triangle”" in page and "Method trace: search space" in page
    assert f"The {title} concept" in page
    chosen = {a["concept"] for r in edit.trace["log"] for a in r[field]}
    assert chosen and all(f"<td>{c}</td>" in page for c in chosen)  # in the run-length table
    assert "from step" in page
    assert ">square<" not in page  # `preserve` replaced the request's preserved concepts
    assert page.count("<b>triangle</b><br>") == 1  # an erased concept in `preserve` is not shown twice


def test_hide_report_says_whether_the_key_matches_but_never_shows_it(tiny_pipe, tmp_path):
    cfg = HideConfig(steps=1, ddim_steps=2, lr=1e-3, key_lr=1e-2, n_tokens=2)
    edit, key = hide(tiny_pipe, EraseRequest(["triangle"]), cfg, progress=False)
    run = save_run(edit, tmp_path / "run")
    key.save(tmp_path / "key")
    page = build_run_report(
        run, pipe=tiny_pipe, seeds=range(1), sampling=FAST, recovery_key=tmp_path / "key", progress=False
    ).read_text()
    assert "Method trace: recovery key" in page and "present and made for this edit" in page
    assert "key.safetensors" not in page and "inside the run directory" not in page
    for t in key.tokens.values():  # no value of the key in the page
        assert f"{float(t.flatten()[0]):.4g}" not in page
    key.save(run / "secret")  # a key left inside the run is flagged
    page = build_run_report(run, pipe=tiny_pipe, seeds=range(1), sampling=FAST, progress=False).read_text()
    assert "inside the run directory (secret)" in page and "not checked" in page


def test_headline_metrics_and_sides(tmp_path):
    assert headline_metrics({"esr_3": 0.5, "esr_1": 1, "psr_1": None, "ner": {"0.5": 0.2, "0.3": 0.4}}) == {
        "ESR-1": 1.0,
        "ESR-3": 0.5,
        "PSR-1": None,
        "NER@0.3": 0.4,
        "NER@0.5": 0.2,
    }
    attack = {"protocol": "shapes-attack", "original_rate": 0.9, "pre_attack_rate": 0.1, "attacks": {"x": {"asr": 0.6}}}
    write_json_atomic(tmp_path / "a" / "metrics.json", attack)
    write_json_atomic(tmp_path / "b" / "metrics.json", {"protocol": "i2p", "ner": {"0.6": 0.1}})
    write_json_atomic(tmp_path / "b" / "evaluate.json", {"edit": "runs/x"})  # real protocols: --edit is recorded here
    write_json_atomic(tmp_path / "demo" / "metrics.json", {"original": {"esr_1": 0.0}, "edited": {"esr_1": 1.0}})
    got = {(f.path.parent.name, f.side): f.values for f in find_metrics(tmp_path)}
    assert got == {
        ("a", "edited"): {"ASR (no attack)": 0.1, "ASR (x)": 0.6},
        ("a", "original"): {"ASR (no attack)": 0.9},
        ("b", "edited"): {"NER@0.6": 0.1},
        ("demo", "original"): {"ESR-1": 0.0},
        ("demo", "edited"): {"ESR-1": 1.0},
    }


def test_bad_run_dirs_and_arguments(tiny_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_run_report(tmp_path / "nope", pipe=tiny_pipe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory.*erasekit erase --out"):
        build_run_report(tmp_path / "empty", pipe=tiny_pipe)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        build_run_report(tmp_path / "file", pipe=tiny_pipe)
    edit = erasekit.erase(tiny_pipe, REQ, method="uce", progress=False)
    run = save_run(edit, tmp_path / "run")
    with pytest.raises(ValueError, match="`seeds` is empty"):
        build_run_report(run, pipe=tiny_pipe, seeds=[])
    with pytest.raises(ValueError, match="prompt_template"):
        build_run_report(run, pipe=tiny_pipe, prompt_template="no slot")
    other = erasekit.testing.tiny_pipeline(1)
    with pytest.raises(ValueError, match="pass `model` or `pipe`"):
        build_run_report(run, pipe=other, seeds=SEEDS, sampling=FAST, progress=False)
    (run / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_run_report(run, pipe=tiny_pipe, seeds=SEEDS, sampling=FAST, progress=False)
    assert not (run / "report.html").exists()


# ------------------------------------------------------------------ the documented run layout (run.json, eval/<protocol>/)
def _layout_run(pipe, d):
    """A layout-1 run through the API, as `erasekit erase --out d` makes it: run.json, edit/, an erase mark."""
    from erasekit.rundir import RunDir

    edit = erasekit.erase(pipe, REQ, method="uce", progress=False)
    identity = {"method": edit.method, "config": edit.config, "request": edit.metadata()["request"]}
    rd = RunDir.create(d, {**identity, "base": {"id": edit.base.get("id"), "fingerprint": edit.base["fingerprint"]}})
    rd.save_edit(edit)
    rd.mark("erase", "done")
    return rd


def test_layout_run_report_lists_the_metrics_of_every_evaluated_protocol(tiny_pipe_dir, tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.html import table
    from erasekit.rundir import RunDir

    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(app, ["erase", "--model", str(tiny_pipe_dir), "--erase", "triangle", "--out", str(run)])
    assert r.exit_code == 0, r.output
    # protocol 1 by the CLI into RUN/eval/shapes-objects/; protocol 2 written as a real protocol writes it
    args = ["evaluate", "--protocol", "shapes-objects", "--model", str(tiny_pipe_dir), "--edit", str(run)]
    r = runner.invoke(app, [*args, "--n-per-class", "1", "--steps", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rd = RunDir.open(run)
    rd.write_metrics("i2p", {"protocol": "i2p", "ner": {"0.6": 0.123}, "edit": str(run)})
    # metrics files outside eval/<protocol>/ are not part of the layout's measurements
    for stray in ("attacks/none", "analysis", "eval/shapes-objects/images", "eval-edited"):
        write_json_atomic(run / stray / "metrics.json", {"protocol": "stray", "esr_1": 0.777, "edit": str(run)})
    assert rd.evaluated() == ["i2p", "shapes-objects"] and not (run / "metrics.json").exists()

    page = build_run_report(
        run, pipe=load_pipeline(str(tiny_pipe_dir)), seeds=[0], sampling=SamplingConfig(steps=1), progress=False
    ).read_text()

    check_self_contained(page)
    assert page.count("<h2>Metrics</h2>") == 1
    for protocol in ("shapes-objects", "i2p"):
        assert f"Protocol <b>{protocol}</b> (eval/{protocol}/metrics.json)" in page, protocol
    # every headline number of eval/shapes-objects/metrics.json, in its table (the edited side: --edit RUN)
    objects = headline_metrics(rd.metrics("shapes-objects"))
    assert {"ESR-1", "PSR-1"} <= set(objects)
    assert table(["metric", "edited"], [[k, "–" if v is None else v] for k, v in objects.items()]) in page
    assert table(["metric", "edited"], [["NER@0.6", 0.123]]) in page and "12.3%" in page  # only in eval/i2p/
    assert "stray" not in page and "77.7%" not in page
    assert RunDir.open(run).stage("report")["status"] == "done"


def test_layout_run_without_eval_still_renders(tiny_pipe, tmp_path):
    rd = _layout_run(tiny_pipe, tmp_path / "run")
    run = rd.path
    # other stages present, but no protocol evaluated: an empty eval/ and an interrupted one without metrics.json
    words = [f"w{i}" for i in range(4)]
    orig = np.random.default_rng(0).uniform(20, 30, (4, 2))
    Spectrum(words, [0, 1], orig, orig - 1.0, erased=["w0"], label="uce").save(rd.analysis_dir / "spectrum-uce.json")
    write_json_atomic(rd.attack_dir("none") / "attack.json", {"attack": "none"})
    (run / "eval" / "shapes-objects" / "images").mkdir(parents=True)
    (run / "eval" / "shapes-objects" / "index.jsonl").write_text("")
    assert rd.evaluated() == [] and not (run / "edit.json").exists()

    path = build_run_report(run, pipe=tiny_pipe, seeds=SEEDS, sampling=FAST, progress=False)

    assert path == rd.report_path and path.exists()
    page = path.read_text()
    check_self_contained(page)
    assert "<h2>Metrics</h2>" not in page and "Protocol <b>" not in page
    for text in ("uce erasing triangle", "Request", "Before / after", "Sensitivity spectrum (analysis)"):
        assert text in page, text
    assert "&quot;layout&quot;: 1" in page  # run.json is the run config shown (HTML-escaped)
    assert rd.stage("report")["status"] == "done"
