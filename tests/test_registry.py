"""The one registry mechanism (issue 14): :class:`erasekit.registry.Registry` and the four registries built on it."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from erasekit.attacks.base import ATTACK_MODULES, ATTACKS, Attack, AttackOutput, get_attack, register_attack
from erasekit.eval.detectors import DETECTOR_MODULES, DETECTORS, load_detector, register_detector
from erasekit.eval.registry import PROTOCOL_MODULES, PROTOCOL_REGISTRY, PROTOCOLS, get_protocol, register_protocol
from erasekit.methods.base import METHOD_MODULES, METHODS, available_methods, get_method, register
from erasekit.registry import Registry

SRC = Path(__file__).resolve().parents[1] / "src"


def _plugin_module(tmp_path, monkeypatch, body: str) -> str:
    """A fresh importable module (unique name) holding ``body``; its name."""
    name = f"_registry_plugin_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def entry_a():
    return "a"


def entry_b():
    return "b"


def test_register_get_names_items_sorted():
    reg: Registry[str] = Registry("thing")
    assert reg.register("zeta", "Z", origin="here") == "Z"
    reg.register("alpha", "A", origin="here")
    assert reg.get("alpha") == "A" and reg.get("zeta") == "Z"
    assert reg.names() == ["alpha", "zeta"]
    assert reg.items() == [("alpha", "A"), ("zeta", "Z")]
    assert reg.as_dict() == {"alpha": "A", "zeta": "Z"} and list(reg.as_dict()) == ["alpha", "zeta"]
    assert "alpha" in reg and "beta" not in reg and len(reg) == 2
    assert dict(reg.view) == {"alpha": "A", "zeta": "Z"}
    with pytest.raises(TypeError):
        reg.view["x"] = "X"  # read-only


def test_an_unknown_name_lists_the_valid_ones():
    reg: Registry[str] = Registry("thing")
    reg.register("b", "B", origin="here")
    reg.register("a", "A", origin="here")
    with pytest.raises(ValueError, match=re.escape("Unknown thing 'c'; available: a, b.")):
        reg.get("c")
    own = Registry("gadget", unknown="No {kind} called {name!r} (try {valid})")
    own.register("x", 1, origin="here")
    with pytest.raises(ValueError, match=re.escape("No gadget called 'y' (try x)")):
        own.get("y")


def test_a_duplicate_from_another_place_is_an_error_naming_both():
    reg: Registry = Registry("method")
    reg.register("same", entry_a)
    with pytest.raises(ValueError, match="Method 'same' is registered twice") as err:
        reg.register("same", entry_b)
    assert f"{__name__}.entry_a" in str(err.value) and f"{__name__}.entry_b" in str(err.value)
    assert reg.get("same") is entry_a  # the first one stays
    reg.register("same", entry_a)  # the same place again (its module re-run): replaces, no error
    assert reg.get("same") is entry_a


def test_discover_imports_each_listed_module_once(tmp_path, monkeypatch):
    reg: Registry[str] = Registry("thing")
    body = "import sys\nREG = sys.modules['{test}'].{holder}\nREG.register('from-module', 'M', origin=__name__)\n"
    monkeypatch.setattr(sys.modules[__name__], "_HOLDER", reg, raising=False)
    mod = _plugin_module(tmp_path, monkeypatch, body.format(test=__name__, holder="_HOLDER"))
    reg.modules = (mod,)
    assert mod not in sys.modules  # nothing imported until asked
    assert reg.get("from-module") == "M" and mod in sys.modules
    del sys.modules[mod]  # were it imported again, it would be back in sys.modules
    assert reg.names() == ["from-module"] and reg.discover() is reg
    assert mod not in sys.modules


def test_a_module_that_fails_to_import_is_tried_again(tmp_path, monkeypatch):
    reg: Registry[str] = Registry("thing", (f"_registry_missing_{uuid.uuid4().hex}",))
    with pytest.raises(ModuleNotFoundError):
        reg.names()
    with pytest.raises(ModuleNotFoundError):
        reg.get("x")


def test_a_plug_in_registers_at_runtime_and_is_found_beside_the_built_ins(tmp_path, monkeypatch):
    reg: Registry[str] = Registry("thing")
    monkeypatch.setattr(sys.modules[__name__], "_HOLDER", reg, raising=False)
    body = f"import sys\nsys.modules['{__name__}']._HOLDER.register('built-in', 'B', origin=__name__)\n"
    reg.modules = (_plugin_module(tmp_path, monkeypatch, body),)
    reg.register("my-plugin", "P", origin="user code")  # before discovery: the built-ins still come
    assert reg.get("my-plugin") == "P" and reg.names() == ["built-in", "my-plugin"]
    assert reg.unregister("my-plugin") == "P" and "my-plugin" not in reg and reg.names() == ["built-in"]


def test_the_four_registries_are_registry_instances_with_their_explicit_lists():
    assert (METHODS.kind, ATTACKS.kind, PROTOCOL_REGISTRY.kind, DETECTORS.kind) == (
        "method",
        "attack",
        "protocol",
        "detector",
    )
    assert METHODS.modules == METHOD_MODULES and ATTACKS.modules == ATTACK_MODULES
    assert PROTOCOL_REGISTRY.modules == PROTOCOL_MODULES and DETECTORS.modules == DETECTOR_MODULES
    assert PROTOCOLS is PROTOCOL_REGISTRY.view


@pytest.mark.parametrize(
    ("decorator", "modules"),
    [
        (r"@register\(", METHOD_MODULES),
        (r"@register_attack\(", ATTACK_MODULES + ("erasekit.attacks.base",)),
        (r"@register_protocol\(", PROTOCOL_MODULES),
        (r"@register_detector\(", DETECTOR_MODULES),
    ],
)
def test_every_module_that_registers_a_built_in_is_on_its_discovery_list(decorator, modules):
    found = set()
    for path in (SRC / "erasekit").rglob("*.py"):
        if re.search(rf"^{decorator}", path.read_text(), re.M):
            found.add(".".join(path.relative_to(SRC).with_suffix("").parts))
    assert found and found <= set(modules), sorted(found - set(modules))


def test_the_existing_error_messages_are_kept():
    with pytest.raises(ValueError, match=re.escape("Unknown method 'nope'; available: age, ap,")):
        get_method("nope")
    with pytest.raises(ValueError, match=re.escape("Unknown attack 'nope'; available attacks: completion,")):
        get_attack("nope")
    with pytest.raises(ValueError, match=re.escape("Unknown protocol 'nope'; available: artists,")):
        get_protocol("nope")
    with pytest.raises(ValueError, match=re.escape("Unknown detector 'nope'; expected one of shapes or a folder")):
        load_detector("nope")


@dataclass
class _PluginConfig:
    strength: float = 1.0


def test_plug_ins_register_into_each_real_registry_at_runtime():
    presets = {"paper": ("as printed", {}), "authors": ("their code", {"strength": 2.0})}

    @register("my-method", _PluginConfig, "a plug-in method", presets=presets, default_preset="paper")
    def my_method(pipe, request, config, *, generator=None, progress=True):
        raise NotImplementedError

    @register_attack("my-attack", _PluginConfig, "a plug-in attack")
    class MyAttack(Attack):
        def attack(self, ctx, prompt, index, generator):
            return AttackOutput(prompt=prompt)

    @register_protocol("my-protocol")
    def my_protocol(pipe, **kwargs):
        return {}

    @register_detector("my-detector")
    def my_detector(**kwargs):
        return "a detector"

    try:
        assert get_method("my-method").fn is my_method and "my-method" in available_methods()
        assert get_attack("my-attack").cls is MyAttack and MyAttack.name == "my-attack"
        assert get_protocol("my-protocol") is my_protocol and "my-protocol" in PROTOCOLS
        assert load_detector("my-detector") == "a detector"
        with pytest.raises(ValueError, match="Attack 'none' is registered twice: by erasekit.attacks.base.NoAttack"):
            register_attack("none", _PluginConfig, "clash")(MyAttack)
    finally:
        METHODS.unregister("my-method")
        ATTACKS.unregister("my-attack")
        PROTOCOL_REGISTRY.unregister("my-protocol")
        DETECTORS.unregister("my-detector")
    assert "my-method" not in available_methods()


BUILT_INS = {
    "methods": (
        "from erasekit.methods.base import available_methods as listing",
        ["age", "ap", "esd", "hide", "mace", "rece", "speed", "uce"],
    ),
    "attacks": (
        "from erasekit.attacks.base import available_attacks as listing",
        ["completion", "inpaint", "inversion", "noise", "none", "paraphrase", "ringabell", "unlearndiff"],
    ),
    "protocols": (
        "from erasekit.eval.registry import discover_protocols as listing",
        ["artists", "coco", "i2p", "imagenette", "shapes-attack", "shapes-objects"],
    ),
    "detectors": ("from erasekit.eval.detectors import DETECTORS\nlisting = DETECTORS.names", ["shapes"]),
}


@pytest.mark.parametrize(
    ("registry", "first"),
    [
        ("methods", "import erasekit.methods.uce"),  # one plug-in module first, then the listing
        ("attacks", "import erasekit.attacks.base"),  # the owner only, not the package that used to register
        ("protocols", "import erasekit.eval.registry"),
        ("detectors", "import erasekit.eval.detectors"),
    ],
)
def test_each_registry_finds_all_its_built_ins_whatever_was_imported_first(registry, first):
    listing, expected = BUILT_INS[registry]
    code = f"{first}\n{listing}\nprint(' '.join(sorted(listing())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected
