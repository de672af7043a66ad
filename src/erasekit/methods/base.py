"""The method registry: every erasure method registers its name, config dataclass, function and presets.

The registry is :data:`METHODS`, a :class:`erasekit.registry.Registry` whose discovery list is
:data:`METHOD_MODULES` (the built-in method modules; a new one is added there). Plug-ins register with
:func:`register` like the built-ins.

A method is ``fn(pipe, request, config, *, generator=None, progress=True) -> Edit``. It never
mutates the caller's pipeline (it works on copies of the tensors it changes) and never evaluates.

**Presets.** Every method registers at least two named presets: ``paper`` (the equations and
hyperparameters as printed in the seed documents) and ``authors`` (what the authors' public code
does). A preset is a dict of config values; :func:`make_config` starts from the dataclass defaults,
applies the preset, then the caller's overrides (users can still override any field). The
*default* preset of a method is the one whose numbers its paper reports, and the config
dataclass's own defaults are that preset's values (``tests/test_presets.py`` checks it), so
``Config()`` and ``make_config(name)`` agree.

**No silently ignored option.** A config field may say in its metadata when it is read
(``used_when={"search": ("pgd",)}``: only when ``search`` is ``"pgd"``). Setting such a field
explicitly while the condition is false is an error that names the option and the setting that
would make it count, so a user never believes an option took effect when the method ignored it.
Configs are built by :func:`erasekit.options.build_config`, as the attacks' are: one config story
(presets, ``used_when``, ``--set`` parsing) for every registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from erasekit.edit import Edit, EraseRequest, with_touched_digest
from erasekit.families import check_method
from erasekit.families.memory import check_applies, memory_options
from erasekit.finetune import FinetuneConfig
from erasekit.options import (  # noqa: F401 - check_options_read, is_read, used_when_text: also read from here
    Preset,
    build_config,
    check_options_read,
    config_preset,
    field_default,
    flat_options,
    is_read,
    iter_options,
    option_names,
    pick_preset,
    used_when_text,
)
from erasekit.registry import Registry, origin_of

PAPER, AUTHORS = "paper", "authors"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, config class, erase function, summary and presets."""

    name: str
    config_class: type
    fn: Callable[..., Edit]
    summary: str
    presets: Mapping[str, Preset]
    default_preset: str


# The built-in method modules (the discovery list; add a new method module here).
METHOD_MODULES = tuple(f"erasekit.methods.{m}" for m in ("age", "ap", "esd", "hide", "mace", "rece", "speed", "uce"))
METHODS: Registry[MethodSpec] = Registry(
    "method", METHOD_MODULES, unknown="Unknown method {name!r}; available: {valid}."
)


def register(
    name: str,
    config_class: type,
    summary: str,
    *,
    presets: Mapping[str, tuple[str, Mapping[str, Any]]],
    default_preset: str,
) -> Callable[[Callable[..., Edit]], Callable[..., Edit]]:
    """Decorator that registers an erase function under ``name``.

    ``presets`` maps a preset name to ``(summary, values)``; it must hold ``paper`` and ``authors``,
    and ``default_preset`` names the one the dataclass defaults equal.
    """
    missing = {PAPER, AUTHORS} - set(presets)
    if missing:
        raise ValueError(f"Method {name!r} must register the presets 'paper' and 'authors'; missing {sorted(missing)}.")
    if default_preset not in presets:
        raise ValueError(f"Method {name!r}: default_preset {default_preset!r} is not one of {sorted(presets)}.")
    valid = set(option_names(config_class))
    table = {}
    for pname, (psummary, values) in presets.items():
        bad = sorted(set(flat_options(config_class, values)) - valid)
        if bad:
            raise ValueError(f"Method {name!r}, preset {pname!r}: unknown option(s) {bad}.")
        table[pname] = Preset(pname, dict(values), psummary)

    def deco(fn: Callable[..., Edit]) -> Callable[..., Edit]:
        spec = MethodSpec(name, config_class, fn, summary, table, default_preset)
        METHODS.register(name, spec, origin=origin_of(fn))
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with a helpful error."""
    return METHODS.get(name)


def available_methods() -> dict[str, MethodSpec]:
    """All registered methods, by name."""
    return METHODS.as_dict()


def resolve_preset(name: str, preset: str | None) -> Preset:
    """The :class:`Preset` ``preset`` of method ``name`` (``None``: the method's default)."""
    spec = get_method(name)
    return pick_preset(spec.presets, spec.default_preset if preset is None else preset, f"method {name!r}")


def make_config(name: str, preset: str | None = None, **overrides: Any):
    """The method's config: dataclass defaults, then ``preset`` (default: the method's), then ``overrides``.

    Unknown keys, an unknown preset and an explicitly set option the resulting config does not read
    are each a ``ValueError`` that names the option and the valid values. The preset's name is kept
    on the config (``config_preset(config)``) so the edit records it.
    """
    spec = get_method(name)
    return build_config(spec.config_class, overrides, owner=f"method {name!r}", preset=resolve_preset(name, preset))


def preset_diff(name: str, preset: str) -> dict[str, Any]:
    """The values of ``preset`` that differ from the method's dataclass defaults (what the preset changes)."""
    spec = get_method(name)
    defaults = {k: d for k, _, d, _ in iter_options(spec.config_class)}
    values = flat_options(spec.config_class, resolve_preset(name, preset).values)
    return {k: v for k, v in values.items() if defaults.get(k) != v}


def erase(
    pipe,
    request: EraseRequest | None = None,
    method: str = "uce",
    config: Any = None,
    *,
    preset: str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Edit:
    """Erase ``request.erase`` from ``pipe`` with ``method``; returns an :class:`Edit` (the pipeline is unchanged).

    ``preset`` picks the method's named preset (``paper`` or ``authors``; default: the one its paper's
    numbers came from, see ``erasekit methods``); ``overrides`` then change single options. The
    edit's config records the preset and every resolved value. Memory options set on ``pipe``
    (gradient checkpointing, 8-bit Adam: :mod:`erasekit.families.memory`) are refused with a
    closed-form method, which would ignore them (:func:`check_memory_options`).

    Example::

        pipe = erasekit.load_pipeline("shapes")
        edit = erasekit.erase(pipe, erasekit.EraseRequest(["triangle"], preserve=["square"]), method="uce")
        edit.apply_(pipe)
    """
    if request is None:
        raise ValueError("`request` is required: erasekit.EraseRequest(erase=[...]).")
    spec = get_method(method)
    if config is None:
        config = make_config(method, preset, **overrides)
    elif overrides or preset is not None:
        raise ValueError("Pass either `config` or a preset and keyword overrides, not both.")
    elif not isinstance(config, spec.config_class):
        raise ValueError(
            f"`config` for method {method!r} must be a {spec.config_class.__name__}, got {type(config).__name__}."
        )
    check_memory_options(method, pipe)  # fine-tuning memory options with a closed-form method: refused
    check_method(method, pipe)  # a method that does not apply to the pipeline's family: one clear error
    edit = spec.fn(pipe, request, config, generator=generator, progress=progress)
    require_finite(edit)
    return with_touched_digest(record_preset(edit, config), pipe)


def fine_tuned_methods() -> list[str]:
    """The methods that fine-tune (their config is a :class:`~erasekit.finetune.FinetuneConfig`: they run
    :func:`erasekit.finetune.finetune`, the only reader of the memory options), sorted."""
    return [m for m, s in available_methods().items() if issubclass(s.config_class, FinetuneConfig)]


def check_memory_options(method: str, pipe) -> None:
    """Refuse memory options set on ``pipe`` (:func:`erasekit.families.memory.set_memory_options`: gradient
    checkpointing, 8-bit Adam) that differ from the defaults when ``method`` is closed form (uce, rece, speed,
    mace): it would silently ignore them. The library's counterpart of ``erasekit erase``'s flag check."""
    try:
        check_applies(memory_options(pipe), method, fine_tuned_methods())
    except ValueError as e:
        raise ValueError(
            f"{e} They were set on this pipeline with erasekit.families.memory.set_memory_options; "
            "`set_memory_options(pipe)` resets them to the defaults."
        ) from None


def require_finite(edit: Edit) -> None:
    """Refuse an edit with a NaN or infinite value (e.g. from ``lamb=1e300``): it would silently ruin the model."""
    bad = [k for k, v in edit.tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"The {edit.method!r} edit has NaN or infinite values in {len(bad)} tensor(s) (first: {bad[0]}); an option "
            f"is out of range for this model (config: {edit.config}). Nothing was saved."
        )


def record_preset(edit: Edit, config: Any) -> Edit:
    """The edit with the config's preset name and every resolved value in ``edit.config``."""
    return replace(edit, config={**asdict(config), **edit.config, "preset": config_preset(config)})
