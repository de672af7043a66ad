"""Presets and option checks of the method registry (methods/base.py)."""

from dataclasses import asdict, dataclass, field, fields

import pytest
from typer.testing import CliRunner

import erasekit
from erasekit.cli import app
from erasekit.methods.base import (
    AUTHORS,
    PAPER,
    available_methods,
    check_options_read,
    config_preset,
    is_read,
    make_config,
    preset_diff,
    resolve_preset,
)
from erasekit.options import flat_options


def test_every_method_has_paper_and_authors_presets():
    for name, spec in available_methods().items():
        assert {PAPER, AUTHORS} <= set(spec.presets), name
        assert spec.default_preset in spec.presets, name
        for p in spec.presets.values():
            assert p.summary.strip(), (name, p.name)


def test_default_preset_equals_dataclass_defaults():
    """``Config()`` and ``make_config(name)`` agree: the dataclass defaults are the default preset's values."""
    for name, spec in available_methods().items():
        assert preset_diff(name, spec.default_preset) == {}, name
        assert asdict(make_config(name)) == asdict(spec.config_class()), name


def test_presets_resolve_and_are_recorded():
    for name, spec in available_methods().items():
        for pname, p in spec.presets.items():
            cfg = make_config(name, pname)
            assert config_preset(cfg) == pname
            for k, v in flat_options(spec.config_class, p.values).items():  # composed: uce.lamb ...
                got = cfg
                for part in k.split("."):
                    got = getattr(got, part)
                assert got == v, (name, pname, k)


def test_overrides_win_over_the_preset():
    cfg = make_config("uce", PAPER, lamb=0.25)
    assert cfg.lamb == 0.25


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown preset 'nope' for method 'uce'; valid presets: .*authors.*paper"):
        make_config("uce", "nope")
    with pytest.raises(ValueError, match="Unknown preset"):
        resolve_preset("esd", "Paper")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['lambda_'\] for method 'uce'"):
        make_config("uce", lambda_=1.0)


@dataclass
class _Cfg:
    search: str = "gumbel"
    radius: float = field(default=1.0, metadata={"used_when": {"search": ("pgd",)}})
    topk: int = field(default=5, metadata={"used_when": {"search": ("gumbel", "pgd"), "relax": ("topk",)}})
    relax: str = "hard"


def test_an_option_that_is_not_read_is_an_error():
    cfg = _Cfg()
    f = {f.name: f for f in fields(cfg)}
    assert not is_read(cfg, f["radius"]) and not is_read(cfg, f["topk"])
    check_options_read(cfg, {"search", "relax"}, method="m", preset="p")  # defaults not named: fine
    with pytest.raises(
        ValueError, match=r"Option `radius` of method 'm' is not read with search='gumbel'.*search='pgd'"
    ):
        check_options_read(cfg, {"radius"}, method="m", preset="p")
    pgd = _Cfg(search="pgd", relax="topk")
    check_options_read(pgd, {"radius", "topk"}, method="m", preset="p")


def test_erase_records_preset_and_resolved_values(tiny_pipe):
    edit = erasekit.erase(tiny_pipe, erasekit.EraseRequest(["cat"]), method="uce", preset=PAPER, lamb=0.3)
    assert edit.config["preset"] == PAPER and edit.config["lamb"] == 0.3
    assert set(f.name for f in fields(available_methods()["uce"].config_class)) <= set(edit.config)


def test_erase_refuses_config_with_preset(tiny_pipe):
    with pytest.raises(ValueError, match="not both"):
        erasekit.erase(tiny_pipe, erasekit.EraseRequest(["cat"]), method="uce", config=make_config("uce"), preset=PAPER)


def test_cli_methods_lists_presets_and_cli_refuses_unknown_preset(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for name in available_methods():
        assert f"{name}:" in res.output
    assert "preset paper" in res.output and "preset authors" in res.output and "(default)" in res.output
    out = tmp_path / "run"
    res = runner.invoke(app, ["erase", "--erase", "triangle", "--preset", "bogus", "--out", str(out)])
    assert res.exit_code == 2 and "Unknown preset 'bogus'" in res.output
    assert not out.exists()
