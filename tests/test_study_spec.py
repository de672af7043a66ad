"""Study specs: every bad input is one SpecError naming the spec line and the fix, before any cell runs;
the intervals of the tables against hand computations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from erasekit.study import SpecError, load_spec
from erasekit.study.stats import bootstrap_mean, mean_interval, nested_bootstrap_mean, wilson

GOOD = """\
[study]
name = "s"
model = "tiny"
detector = "standin"

[evaluation]
n_per_class = 3
selection_n_per_class = 2
selection_seed = 1000

[operating_point]
rule = "target"
target = 0.95
check_every = 1
max_steps = 2

[[methods]]
method = "esd"
set = { ddim_steps = 2 }

[[methods]]
method = "uce"
sweep = { option = "erase_scale", values = [0.5, 1.0] }

[[concepts]]
erase = ["triangle"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_the_good_spec_loads(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD))
    assert [m.method for m in spec.methods] == ["esd", "uce"]
    assert spec.operating_point.checks() == [1, 2]


def test_composed_options_in_a_spec(tmp_path):
    """RECE's UCE step is a UCE config: a spec sets its options as a TOML sub-table or by dotted name,
    sweeps one of them, and a misspelt one is an error naming its line."""
    rece = '\n[[methods]]\nlabel = "RECE"\nmethod = "rece"\nset = { uce = { lamb = 0.2 } }\n'
    rece += 'sweep = { option = "uce.erase_scale", values = [1.0] }\n'
    spec = load_spec(_write(tmp_path, GOOD + rece))
    assert spec.methods[-1].set == {"uce": {"lamb": 0.2}} and spec.methods[-1].sweep_option == "uce.erase_scale"
    bad = GOOD + rece.replace("lamb = 0.2", "lamm = 0.2")
    with pytest.raises(SpecError, match=r"spec.toml:\d+: .*uce.lamm"):
        load_spec(_write(tmp_path, bad))


# (what is wrong, replace this, by this, text of the line the error must name, a word the message must have)
BAD = [
    ("unknown method", 'method = "uce"', 'method = "ucee"', 'method = "ucee"', "Unknown method 'ucee'"),
    (
        "unknown preset",
        'method = "esd"\n',
        'method = "esd"\npreset = "pape"\n',
        'preset = "pape"',
        "Unknown preset 'pape'",
    ),
    ("unknown option", "{ ddim_steps = 2 }", "{ ddim_steps = 2, lamb_x = 1 }", "lamb_x = 1", "lamb_x"),
    (
        "option the settings do not read",
        "{ ddim_steps = 2 }",
        "{ ddim_steps = 2, zt_pool_size = 4 }",
        "zt_pool_size = 4",
        "zt_pool_size",
    ),
    ("option the study sets", "{ ddim_steps = 2 }", "{ ddim_steps = 2, steps = 9 }", "steps = 9", "set by the study"),
    (
        "unknown protocol",
        "selection_seed = 1000\n",
        'selection_seed = 1000\nprotocol = "i2pp"\n',
        'protocol = "i2pp"',
        "unknown protocol 'i2pp'",
    ),
    (
        "protocol a study cannot split",
        "selection_seed = 1000\n",
        'selection_seed = 1000\nprotocol = "shapes-attack"\n',
        'protocol = "shapes-attack"',
        "selection and test",
    ),
    ("unknown attack", "", '\n[attacks]\nnames = ["inversio"]\n', 'names = ["inversio"]', "unknown attack 'inversio'"),
    ("missing field", 'erase = ["triangle"]\n', 'label = "x"\n', "[[concepts]]", "missing the field `erase`"),
    ("concept the model cannot tokenize", '["triangle"]', '["zebra"]', '["zebra"]', "never saw"),
    ("concept with no token", '["triangle"]', '[" "]', '[" "]', "non-empty list"),
    (
        "closed form under the target rule without a sweep",
        'sweep = { option = "erase_scale", values = [0.5, 1.0] }\n',
        "",
        'method = "uce"',
        "cannot reach a target",
    ),
    (
        "sweep on a fine-tuned method",
        "set = { ddim_steps = 2 }",
        'sweep = { option = "lr", values = [1e-3] }',
        'sweep = { option = "lr"',
        "it has no `sweep`",
    ),
    ("sweep of an option the method lacks", '"erase_scale"', '"scale"', '"scale"', "no option 'scale'"),
    (
        "unknown field",
        'detector = "standin"',
        'detector = "standin"\ncolour = "red"',
        'colour = "red"',
        "unknown field `colour`",
    ),
    (
        "selection seeds overlap the test seeds",
        "selection_seed = 1000",
        "selection_seed = 1",
        "selection_seed = 1",
        "overlap the test seeds",
    ),
    ("target out of range", "target = 0.95", "target = 95", "target = 95", "write 95% as 0.95"),
    ("wrong type", "max_steps = 2", 'max_steps = "2"', 'max_steps = "2"', "must be a int"),
    ("unknown rule", 'rule = "target"', 'rule = "best"', 'rule = "best"', "unknown rule 'best'"),
    ("not TOML", "max_steps = 2", "max_steps = = 2", "max_steps = = 2", "not valid TOML"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_spec_names_the_line_and_the_fix(tmp_path, case):
    _, old, new, at, word = case
    text = GOOD + new if old == "" else GOOD.replace(old, new, 1)
    assert text != GOOD
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    m = re.match(rf"{re.escape(str(path))}:(\d+): ", msg)
    assert m, msg
    assert at in text.splitlines()[int(m.group(1)) - 1], msg
    assert word in msg, msg
    assert "Fix:" in msg or "not valid TOML" in msg
    assert "\n" not in msg  # one error, one line


def test_the_line_is_the_bad_key_of_the_right_table(tmp_path):
    """The second [[methods]]'s bad preset is reported at its own line, not the first table's."""
    text = GOOD.replace('method = "uce"', 'method = "uce"\npreset = "nope"')
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    lines = text.splitlines()
    n = int(re.match(rf"{re.escape(str(path))}:(\d+):", str(e.value)).group(1))
    assert lines[n - 1] == 'preset = "nope"'


def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path):
    from erasekit.cli import app

    path = _write(tmp_path, GOOD.replace('method = "uce"', 'method = "ucee"'))
    res = CliRunner().invoke(app, ["study", "run", str(path), "--dir", str(tmp_path / "d")])
    assert res.exit_code == 2, res.output
    assert f"{path}:22:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "d").exists()  # nothing ran, nothing was written


def test_wilson_against_hand_values():
    # 8/10: p = .8, z = 1.96: centre (.8 + 1.92/10) / 1.384 = .71676, half = 1.96 sqrt(.016 + .00096) / 1.384
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0


def test_bootstrap_mean_interval():
    v = [0.2, 0.4, 0.6, 0.8]
    lo, hi = bootstrap_mean(v)
    assert lo < np.mean(v) < hi and 0.2 <= lo and hi <= 0.8
    assert bootstrap_mean(v) == (lo, hi)  # a fixed seed: the same table every time
    # hand check of the estimator: the quantiles of the resampled means
    rng = np.random.default_rng(0)
    means = np.asarray(v)[rng.integers(0, 4, size=(2000, 4))].mean(1)
    assert (lo, hi) == tuple(np.quantile(means, [0.025, 0.975]))
    one = mean_interval([{"rate": 0.8, "successes": 8, "n": 10}])
    assert one["interval"] == "wilson" and one["ci95"] == list(wilson(8, 10))
    two = mean_interval([{"rate": 0.5, "successes": 1, "n": 2}, {"rate": 1.0, "successes": 2, "n": 2}])
    assert two["interval"] == "bootstrap" and two["mean"] == 0.75


def test_mean_over_concept_sets_weighs_each_set_once():
    """Split 0 with 3 seeds and split 1 with 1: the mean is over sets of seed means, not over cells."""
    cells_ = [{"concept": "s0", "rate": r, "successes": 0, "n": 1} for r in (0.0, 0.1, 0.2)]
    cells_.append({"concept": "s1", "rate": 1.0, "successes": 1, "n": 1})
    flat = mean_interval(cells_)
    nested = mean_interval(cells_, by="concept")
    assert flat["mean"] == pytest.approx(0.325) and nested["mean"] == pytest.approx(0.55)
    assert nested["interval"] == "bootstrap-nested" and nested["groups"] == 2 and nested["cells"] == 4
    # hand check of the two-level bootstrap: draw the sets, then each drawn set's seeds
    groups = [np.array([0.0, 0.1, 0.2]), np.array([1.0])]
    rng = np.random.default_rng(0)
    drawn = rng.integers(0, 2, size=(2000, 2))
    means = [
        np.mean([groups[i][rng.integers(0, groups[i].size, size=groups[i].size)].mean() for i in row]) for row in drawn
    ]
    assert nested["ci95"] == list(np.quantile(means, [0.025, 0.975]))
    assert nested_bootstrap_mean([[0.0, 0.1, 0.2], [1.0]]) == tuple(nested["ci95"])
    # one set: the plain summary over its cells (bootstrap over seeds; Wilson for a single cell)
    assert mean_interval(cells_[:3], by="concept") == mean_interval(cells_[:3])
    assert mean_interval(cells_[3:], by="concept")["interval"] == "wilson"


def test_documented_study_commands_and_flags_exist():
    """Every `erasekit study ...` line of docs/studies.md names a real command and real flags."""
    import shlex

    import typer

    from erasekit.cli import app

    text = (Path(__file__).resolve().parents[1] / "docs" / "studies.md").read_text()
    group = typer.main.get_command(app).commands["study"]
    lines = [
        ln.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for ln in block.splitlines()
        if ln.strip().startswith("erasekit study ")
    ]
    assert len(lines) >= 5
    for ln in lines:
        args = shlex.split(ln)[2:]
        cmd = group.commands[args[0]]
        known = {s for p in cmd.params for s in (*p.opts, *p.secondary_opts)}
        flags = {a.split("=")[0] for a in args if a.startswith("-")}
        assert flags <= known, (ln, flags - known)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "bench" / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_study_specs_load(path):
    """Every spec under bench/studies/ passes the checks a run makes before its first cell."""
    spec = load_spec(path)
    assert spec.methods and spec.concepts
