import json
from pathlib import Path

import pytest

from erasekit.pipeline import bundled_path

pytestmark = pytest.mark.skipif(
    not (bundled_path() / "model_index.json").exists(), reason="bundled miniature not built in this checkout"
)


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    from erasekit.demo import run_demo

    out = tmp_path / "demo"
    res = run_demo(out, concept="star", n_per_class=2, progress=False)
    for key in ("esr_1", "esr_3", "psr_1", "psr_3", "per_class"):
        assert key in res["original"] and key in res["edited"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["concept"] == "star"
    cfg = json.loads((out / "run.json").read_text())["identity"]
    assert cfg["method"] == "uce" and cfg["request"]["erase"] == ["star"]
    assert len((out / "eval" / "shapes-objects.original" / "index.jsonl").read_text().splitlines()) == 20
    # a second run reuses every image already generated
    before = {p: p.stat().st_mtime_ns for p in (out / "eval" / "shapes-objects" / "images").iterdir()}
    run_demo(out, concept="star", n_per_class=2, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_demo_rejects_unknown_object(tmp_path):
    from erasekit.demo import run_demo

    with pytest.raises(ValueError, match="not a miniature object"):
        run_demo(tmp_path / "d", concept="dragon")
    assert not (tmp_path / "d").exists()


def test_demo_command_parses_its_default_out(monkeypatch):
    """`make demo` runs `erasekit demo` with no options: the default --out (a Path) goes through the
    --out parser too (typer >= 0.29 passes defaults to it), and an empty --out is still refused."""
    from typer.testing import CliRunner

    import erasekit.cli.demo as cli_demo
    from erasekit.cli import app

    seen = {}
    monkeypatch.setattr(cli_demo, "run_demo", lambda out, **kw: seen.update(out=out, **kw))
    res = CliRunner().invoke(app, ["demo"])
    assert res.exit_code == 0, res.output
    assert seen == {"out": Path("runs/demo"), "concept": "triangle", "n_per_class": 20}
    res = CliRunner().invoke(app, ["demo", "--out", ""])
    assert res.exit_code == 2 and "is empty" in res.output
