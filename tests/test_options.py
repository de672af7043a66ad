"""The one config story (erasekit/options.py): methods and attacks build their configs through one function."""

import re
from dataclasses import dataclass, field

import pytest

from erasekit import runs
from erasekit.attacks import make_attack_config
from erasekit.methods import base as methods_base
from erasekit.methods.base import make_config
from erasekit.options import (
    Preset,
    build_config,
    check_options_read,
    config_preset,
    is_read,
    parse_overrides,
    pick_preset,
    used_when_text,
)


@dataclass
class Cfg:
    search: str = "gumbel"
    radius: float = field(default=1.0, metadata={"used_when": {"search": ("pgd",)}})
    steps: int = 10
    names: list[str] = field(default_factory=list)
    mode: str | None = None


def test_build_config_applies_defaults_then_preset_then_overrides():
    p = Preset("fast", {"steps": 2, "search": "pgd"}, "fewer steps")
    cfg = build_config(Cfg, {"steps": 5}, owner="method 'm'", preset=p)
    assert (cfg.search, cfg.steps, cfg.radius) == ("pgd", 5, 1.0)
    assert config_preset(cfg) == "fast"
    assert config_preset(build_config(Cfg, {}, owner="attack 'a'")) is None  # no preset: none recorded


def test_build_config_errors_name_the_owner_and_valid_values():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['nope'\] for attack 'a'; valid options: \['mode'"):
        build_config(Cfg, {"nope": 1}, owner="attack 'a'")
    with pytest.raises(ValueError, match=r"Option `radius` of attack 'a' is not read with search='gumbel': it is read"):
        build_config(Cfg, {"radius": 2.0}, owner="attack 'a'")
    with pytest.raises(
        ValueError, match=r"Option `radius` of method 'm' is not read with search='gumbel' \(preset 'p'\)"
    ):
        build_config(Cfg, {"radius": 2.0}, owner="method 'm'", preset=Preset("p", {}, ""))
    build_config(Cfg, {"radius": 2.0, "search": "pgd"}, owner="method 'm'")  # read with search='pgd'
    with pytest.raises(ValueError, match=r"Unknown preset 'x' for method 'm'; valid presets: a, b\."):
        pick_preset({"b": Preset("b", {}, ""), "a": Preset("a", {}, "")}, "x", "method 'm'")


def test_method_and_attack_registries_keep_their_messages():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['lambda_'\] for method 'uce'; valid options:"):
        make_config("uce", lambda_=1.0)
    with pytest.raises(ValueError, match=r"Unknown preset 'nope' for method 'uce'; valid presets: .*authors.*paper"):
        make_config("uce", "nope")
    with pytest.raises(ValueError, match=r"Option `zt_pool_size` of method 'esd' is not read with zt_producer="):
        make_config("esd", zt_pool_size=4)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['iterations'\] for attack 'unlearndiff'; valid"):
        make_attack_config("unlearndiff", iterations=3)
    with pytest.raises(ValueError, match="Unknown attack 'nope'"):
        make_attack_config("nope")


def test_option_metadata_helpers():
    cfg = Cfg()
    f = {f.name: f for f in cfg.__dataclass_fields__.values()}
    assert not is_read(cfg, f["radius"]) and is_read(cfg, f["steps"])
    assert used_when_text({"search": ("pgd",)}) == "search='pgd'"
    assert used_when_text({"search": ("a", "b")}) == "search in ('a', 'b')"
    with pytest.raises(ValueError, match="of method 'm'"):  # the older keyword spelling still works
        check_options_read(cfg, {"radius"}, method="m", preset="p")
    with pytest.raises(TypeError, match="owner"):
        check_options_read(cfg, {"radius"})


def test_set_parsing_and_its_messages():
    assert parse_overrides(Cfg, ["steps=3", "names=['a', 'b']", "mode=None", "search = pgd"]) == {
        "steps": 3,
        "names": ["a", "b"],
        "mode": None,
        "search": "pgd",
    }
    for bad, msg in [
        ("steps", "`--set steps` must look like KEY=VALUE"),
        ("nope=1", "`--set nope`: unknown option; valid options: ['mode', 'names', 'radius', 'search', 'steps']"),
        ("steps=1.5", "`--set steps=1.5`: must be an integer, e.g. steps=100."),
        ("radius=1e999", "`--set radius=1e999`: must be a finite number."),
        ("names=a", "must be a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse_overrides(Cfg, [bad])


def test_old_import_paths_still_work():
    assert runs.parse_overrides is parse_overrides
    assert methods_base.is_read is is_read and methods_base.check_options_read is check_options_read
    assert methods_base.Preset is Preset
