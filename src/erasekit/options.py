"""The one config story: options are dataclass fields, built one way for every registry.

A method's or an attack's options are the fields of its config dataclass. A field may say in its
metadata when it is read (``used_when={"search": ("pgd",)}``: only when ``search`` is ``"pgd"``) and
carry a ``help`` line. :func:`build_config` is the one way a registry turns a name's config class, an
optional :class:`Preset` and the caller's overrides into a config: dataclass defaults, then the
preset's values, then the overrides; an unknown key is an error listing the valid ones, and an
option set explicitly that the resulting config does not read is an error that names the setting
that would make it count (:func:`check_options_read`), so a user never believes an option took
effect when it was ignored. The preset's name stays on the config (:func:`config_preset`).

``--set KEY=VALUE`` text from the command line, the web app and study specs becomes typed overrides
through :func:`parse_overrides` (each value checked against the field's type by
:func:`coerce_option`) before it reaches :func:`build_config`.

Configs compose: a field whose type is a config dataclass holds a config of its own (RECE's
``uce`` is a :class:`~erasekit.methods.uce.UCEConfig`, the spectrum's ``sampling`` a
:class:`~erasekit.eval.generate.SamplingConfig`). Its options are named with a dot (``uce.lamb``)
in overrides, presets, ``--set`` and study specs; a nested dict (``{"uce": {"lamb": 0.1}}``, TOML's
``uce.lamb = 0.1``) or a whole config object says the same. A config class may map option names it
no longer has to their new names (``RENAMED_OPTIONS``): an error then names the new spelling, and
:func:`config_from_record` reads a config saved under the old names.

This module imports nothing of erasekit: the registries (``methods/base.py``, ``attacks/base.py``),
the fine-tuning core and the run directory all build on it from above.
"""

from __future__ import annotations

import ast
import functools
import math
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, fields, is_dataclass
from typing import Any

PRESET_ATTR = "_erasekit_preset"
"""The attribute :func:`build_config` sets on a config made from a preset (read by :func:`config_preset`)."""


@dataclass(frozen=True)
class Preset:
    """A named set of config values and one line on what it changes and why."""

    name: str
    values: Mapping[str, Any]
    summary: str


# ------------------------------------------------------------------------------------------ option metadata
def field_default(f: Field) -> Any:
    """A dataclass field's default value (calling its factory)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def used_when_text(condition: Mapping[str, Any]) -> str:
    """``{"search": ("pgd",)}`` -> ``"search='pgd'"`` (for messages and help text)."""
    return " and ".join(f"{k} in {tuple(v)!r}" if len(v) > 1 else f"{k}={v[0]!r}" for k, v in condition.items())


def is_read(config: Any, f: Field) -> bool:
    """Whether ``config`` reads field ``f`` given its other values (the field's ``used_when`` metadata)."""
    condition = f.metadata.get("used_when")
    if not condition:
        return True
    return all(getattr(config, k) in tuple(v) for k, v in condition.items())


def check_options_read(
    config: Any,
    explicit: set[str],
    *,
    owner: str | None = None,
    preset: str | None = None,
    method: str | None = None,
) -> None:
    """Refuse options set explicitly (``explicit``) that ``config`` will not read.

    ``owner`` names whose options they are in the message (``"method 'ap'"``, ``"attack 'noise'"``);
    ``method=NAME`` is the older spelling of ``owner="method 'NAME'"``. ``preset`` (if any) is named too.
    """
    if owner is None:
        if method is None:
            raise TypeError("check_options_read needs `owner` (or `method`).")
        owner = f"method {method!r}"
    _check_read(config, set(explicit), owner, preset, "")


def _check_read(config: Any, explicit: set[str], owner: str, preset: str | None, prefix: str) -> None:
    for f in fields(config):
        name = prefix + f.name
        if sub_config_class(type(config), f) is not None:
            _check_read(getattr(config, f.name), explicit, owner, preset, name + ".")
        elif name in explicit and not is_read(config, f):
            cond = {prefix + k: v for k, v in f.metadata["used_when"].items()}
            now = ", ".join(f"{prefix + k}={getattr(config, k)!r}" for k in f.metadata["used_when"])
            where = f" (preset {preset!r})" if preset is not None else ""
            raise ValueError(
                f"Option `{name}` of {owner} is not read with {now}{where}: it is read only "
                f"when {used_when_text(cond)}. Drop `{name}` or set {used_when_text(cond)}."
            )


# ------------------------------------------------------------------------------------------ composed configs
@functools.cache
def _hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - an annotation only a type checker can resolve: no composed fields
        return {f.name: f.type for f in fields(config_class) if isinstance(f.type, type)}


def sub_config_class(config_class: type, f: Field) -> type | None:
    """The config dataclass field ``f`` of ``config_class`` holds, or ``None`` for a plain option."""
    tp = _hints(config_class).get(f.name)
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def compose(config: Any, owner: str) -> None:
    """In a config's ``__post_init__``: each composed field given as a dict (a saved record, a TOML
    table) becomes its config; anything else that is not that config is a ``ValueError``."""
    for f in fields(config):
        sub = sub_config_class(type(config), f)
        value = getattr(config, f.name)
        if sub is None or isinstance(value, sub):
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{owner} `{f.name}` must be a {sub.__name__} (or its options as a dict), got {value!r}.")
        setattr(config, f.name, sub(**value))


def iter_options(config_class: type, default: Any = None, prefix: str = "") -> Iterator[tuple[str, Field, Any, type]]:
    """``(name, field, default, owner class)`` of every option of ``config_class``; a composed config's
    options come under its field's name (``uce.lamb``), with the defaults the outer field gives them."""
    for f in fields(config_class):
        d = field_default(f) if default is None else getattr(default, f.name)
        sub = sub_config_class(config_class, f)
        if sub is not None:
            yield from iter_options(sub, d if d is not MISSING else None, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, d, config_class


def option_names(config_class: type) -> list[str]:
    """Every option of ``config_class`` by its (dotted) name."""
    return [name for name, *_ in iter_options(config_class)]


def flat_options(config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with composed configs spelled by dotted names: ``{"uce": {"lamb": 0.1}}`` and
    ``{"uce": UCEConfig(...)}`` become ``{"uce.lamb": 0.1, ...}``; other keys are kept as given."""
    subs = {f.name: sub_config_class(config_class, f) for f in fields(config_class)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        sub = subs.get(head)
        if sub is None:
            out[key] = value
        elif dot:
            out.update({f"{head}.{k}": v for k, v in flat_options(sub, {rest: value}).items()})
        elif is_dataclass(value) and not isinstance(value, type):
            out.update({f"{head}.{k}": v for k, v in flat_options(sub, asdict(value)).items()})
        elif isinstance(value, Mapping):
            out.update({f"{head}.{k}": v for k, v in flat_options(sub, value).items()})
        else:
            out[key] = value  # refused by the config's own checks
    return out


def _construct(config_class: type, flat: Mapping[str, Any], default: Any = None) -> Any:
    """``config_class`` from dotted values over its defaults (a composed field over the outer default)."""
    kwargs: dict[str, Any] = {}
    for f in fields(config_class):
        sub = sub_config_class(config_class, f)
        if sub is None:
            if f.name in flat:
                kwargs[f.name] = flat[f.name]
            elif default is not None:
                kwargs[f.name] = getattr(default, f.name)
            continue
        inner = {k[len(f.name) + 1 :]: v for k, v in flat.items() if k.startswith(f.name + ".")}
        base = getattr(default, f.name) if default is not None else field_default(f)
        if f.name in flat:  # not a config: let the class's own check name it
            kwargs[f.name] = flat[f.name]
        elif inner or default is not None:
            kwargs[f.name] = _construct(sub, inner, base if base is not MISSING else None)
    return config_class(**kwargs)


def config_from_record(config_class: type, record: Mapping[str, Any]) -> Any:
    """A config from a saved record (an edit's ``config``, a JSON file): its known options, composed
    configs as nested dicts, options saved under an older name (``RENAMED_OPTIONS``) read by their
    new one; keys that are not options (``preset``, a run's extras) are ignored."""
    renamed = getattr(config_class, "RENAMED_OPTIONS", {})
    flat = flat_options(config_class, {renamed.get(k, k): v for k, v in record.items()})
    valid = set(option_names(config_class))
    return _construct(config_class, {k: v for k, v in flat.items() if k in valid})


# ------------------------------------------------------------------------------------------ building a config
def pick_preset(presets: Mapping[str, Preset], chosen: str, owner: str) -> Preset:
    """The preset ``chosen`` of ``presets``; an unknown name is a ``ValueError`` listing the valid ones."""
    if chosen not in presets:
        raise ValueError(f"Unknown preset {chosen!r} for {owner}; valid presets: {', '.join(sorted(presets))}.")
    return presets[chosen]


def unknown_options(config_class: type, keys: Iterable[str], owner: str) -> None:
    """Refuse keys that are not options of ``config_class`` (dotted for composed configs), listing the
    valid ones; a key the class renamed (``RENAMED_OPTIONS``) is named with its new spelling."""
    valid = set(option_names(config_class))
    bad = sorted(set(keys) - valid)
    if bad:
        renamed = getattr(config_class, "RENAMED_OPTIONS", {})
        moved = "; ".join(f"`{k}` is now `{renamed[k]}`" for k in bad if k in renamed)
        raise ValueError(
            f"Unknown option(s) {bad} for {owner}{f' ({moved})' if moved else ''}; valid options: {sorted(valid)}."
        )


def build_config(config_class: type, overrides: Mapping[str, Any], *, owner: str, preset: Preset | None = None) -> Any:
    """``config_class`` from its defaults, then ``preset``'s values, then ``overrides`` (see the module docstring).

    ``owner`` names the registry entry in errors (``"method 'uce'"``). Unknown keys, and an explicitly
    set option the resulting config does not read, are each a ``ValueError``; the config's own
    ``__post_init__`` checks run as usual. With a preset, its name is kept on the config.
    """
    overrides = flat_options(config_class, overrides)
    unknown_options(config_class, overrides, owner)
    values = flat_options(config_class, preset.values) if preset is not None else {}
    config = _construct(config_class, {**values, **overrides})
    check_options_read(config, set(overrides), owner=owner, preset=preset.name if preset is not None else None)
    if preset is not None:
        object.__setattr__(config, PRESET_ATTR, preset.name)
    return config


def config_preset(config: Any) -> str | None:
    """The preset a config was built from by :func:`build_config` (``None`` for a hand-built config)."""
    return getattr(config, PRESET_ATTR, None)


# ------------------------------------------------------------------------------------------ --set KEY=VALUE
def parse_overrides(config_class: type, pairs: list[str]) -> dict[str, Any]:
    """``["lamb=0.1", "templates=['{}','a {}']"]`` -> overrides for ``config_class``, each checked against
    the field's type (``resume=false`` is ``False``, ``lamb=abc`` and ``lamb=1e999`` are errors naming
    the option and what it takes)."""

    owners = {name: (f, owner) for name, f, _, owner in iter_options(config_class)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"`--set {pair}` must look like KEY=VALUE, e.g. --set lamb=0.1.")
        if key not in owners:
            renamed = getattr(config_class, "RENAMED_OPTIONS", {})
            now = f" (it is now `{renamed[key]}`)" if key in renamed else ""
            raise ValueError(f"`--set {key}`: unknown option{now}; valid options: {sorted(owners)}.")
        raw = raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = raw  # a bare string
        f, owner = owners[key]
        out[key] = coerce_option(key, value, raw, _hints(owner).get(f.name, Any))
    return out


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce_option(key: str, value: Any, raw: str, tp: Any) -> Any:
    """``value`` (parsed from the text ``raw``) checked and converted to the type ``tp`` of option ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or raw.lower() in ("none", "null")):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce_option(key, value, raw, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"`--set {key}={raw}`: " + "; or ".join(errors))
    if origin is typing.Literal:
        if value in args or raw in args:
            return value if value in args else raw
        raise ValueError(f"`--set {key}={raw}`: must be one of {', '.join(repr(a) for a in args)}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"`--set {key}={raw}`: must be true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"`--set {key}={raw}`: must be an integer, e.g. {key}=100.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)  # an integer beyond float's range overflows here
            except OverflowError:
                value = math.inf
            if not math.isfinite(value):
                raise ValueError(f"`--set {key}={raw}`: must be a finite number.")
            return value
        raise ValueError(f"`--set {key}={raw}`: must be a number, e.g. {key}=0.1.")
    if tp is str:
        return value if isinstance(value, str) else raw
    if origin in (list, tuple) and args:
        if isinstance(value, (list, tuple)):
            inner = args[0]
            items = [coerce_option(key, v, str(v), inner) for v in value]
            return tuple(items) if origin is tuple else items
        raise ValueError(f"`--set {key}={raw}`: must be a list, e.g. {key}=\"['a', 'b']\".")
    return value
