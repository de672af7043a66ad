import json

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
