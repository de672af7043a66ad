"""A study spec: a TOML file naming the model, methods, concept sets, seeds, evaluation, attacks and
the operating point. :func:`load_spec` parses it (``tomllib``) and validates everything *before any
cell runs*; a bad entry is one :class:`SpecError` that names the spec file, the line of the bad key
(found by scanning the text: ``tomllib`` keeps no positions) and the fix.

Layout (every section but ``[study]``, ``[[methods]]`` and ``[[concepts]]`` is optional)::

    [study]
    name = "table1"                # required; the study's name (labels, default folder)
    model = "shapes"               # "shapes" (the miniature), "tiny" (a random tiny pipeline), or a diffusers folder
    detector = "shapes"            # "shapes" (the miniature's detector) or "standin" (a fixed random projection; tests)
    seeds = [0]                    # training seeds (each concept set may override)
    dir = "../results/x"           # the study folder, relative to this file (default: runs/studies/<name>)

    [evaluation]                   # needed by the target rule and the ESR/PSR tables
    protocol = "shapes-objects"
    n_per_class = 50               # test images per object, seeds test_seed .. test_seed + n_per_class - 1
    test_seed = 0
    selection_n_per_class = 20     # selection images (the target rule's checks), disjoint seeds
    selection_seed = 10000
    sampling_steps = 20            # optional: sampler steps (default: the model's)

    [operating_point]
    rule = "target"                # "fixed" (steps = N) or "target"
    metric = "esr_1"               # the selection metric the target is on
    target = 0.95
    check_every = 100              # fine-tuned methods: steps between checks
    max_steps = 1500               # fine-tuned methods: the cap

    [[methods]]
    label = "UCE"                  # the table's row (default: the method name)
    method = "uce"                 # a registered method, or "original" (no edit)
    preset = "authors"             # optional (default: the method's default preset)
    set = { lamb = 0.5 }           # optional overrides (checked by make_config)
    sweep = { option = "erase_scale", values = [0.25, 0.5, 1.0] }   # closed forms under the target rule

    [[concepts]]
    label = "split0"
    erase = ["circle", "square"]
    preserve = ["star"]            # optional (default: every other object)
    seeds = [0, 1, 2]              # optional
    methods = ["UCE"]              # optional: only these [[methods]] labels run on this set

    [attacks]                      # optional: run these attacks on every cell (one erased concept per set)
    names = ["inversion", "unlearndiff", "ringabell", "paraphrase"]
    n_prompts = 50
    n_images = 1
    set = { unlearndiff = { steps = 20 } }
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from erasekit.attacks import available_attacks
from erasekit.attacks.base import make_attack_config
from erasekit.concepts import shapes_vocabulary
from erasekit.eval.registry import discover_protocols
from erasekit.methods.base import get_method, make_config, resolve_preset
from erasekit.options import option_names
from erasekit.world.shapes import OBJECTS
from erasekit.world.tokenizer import TOKENIZER_DIR, load_clip_tokenizer

SUPPORTED_PROTOCOLS = ("shapes-objects",)
DETECTORS = ("shapes", "standin")
STUDY_CONTROLLED = ("steps", "seed", "run_dir", "resume", "stop_at", "checkpoint_every", "key_dir")
METRICS = ("esr_1", "esr_3", "psr_1", "psr_3")


class SpecError(ValueError):
    """A bad study spec: the message names the file, the line and the fix."""


# ------------------------------------------------------------------------------------------ dataclasses
@dataclass(frozen=True)
class MethodEntry:
    label: str
    method: str
    preset: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    sweep_option: str | None = None
    sweep_values: tuple[Any, ...] = ()

    @property
    def is_original(self) -> bool:
        return self.method == "original"


@dataclass(frozen=True)
class ConceptEntry:
    label: str
    erase: tuple[str, ...]
    preserve: tuple[str, ...] | None
    seeds: tuple[int, ...]
    methods: tuple[str, ...] | None = None  # the method labels run on this set (None: all)


@dataclass(frozen=True)
class Evaluation:
    protocol: str = "shapes-objects"
    n_per_class: int = 50
    test_seed: int = 0
    selection_n_per_class: int = 20
    selection_seed: int = 10000
    sampling_steps: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class OperatingPoint:
    rule: Literal["fixed", "target"] = "fixed"
    steps: int | None = None
    metric: str = "esr_1"
    target: float = 0.95
    check_every: int = 100
    max_steps: int = 1500

    def checks(self) -> list[int]:
        """The steps at which the target rule evaluates a fine-tuned method: every ``check_every`` and the cap."""
        out = list(range(self.check_every, self.max_steps + 1, self.check_every))
        return out if out and out[-1] == self.max_steps else [*out, self.max_steps]


@dataclass(frozen=True)
class Attacks:
    names: tuple[str, ...]
    n_prompts: int = 50
    n_images: int = 1
    set: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    model: str
    detector: str
    methods: tuple[MethodEntry, ...]
    concepts: tuple[ConceptEntry, ...]
    evaluation: Evaluation | None
    operating_point: OperatingPoint
    attacks: Attacks | None
    path: Path | None = None
    dir: Path | None = None

    def identity(self) -> dict[str, Any]:
        """Everything that determines the study's results (not where it is stored)."""
        d = asdict(self)
        d.pop("path")
        d.pop("dir")
        for cs in d["concepts"]:  # only when set: specs without it keep their identity
            if cs["methods"] is None:
                del cs["methods"]
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def default_dir(self) -> Path:
        return self.dir if self.dir is not None else Path("runs") / "studies" / self.name


# ------------------------------------------------------------------------------------------ line finder
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")


class Locator:
    """Finds the line of a key in the spec's text: ``line("methods", 1, "preset")`` is the line of
    ``preset = ...`` in the second ``[[methods]]`` table (or that table's header when the key is absent)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []  # (line number, section name)
        for i, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m:
                self.headers.append((i, m.group(2).strip('"')))

    def section(self, name: str, index: int = 0) -> tuple[int, int]:
        """``(first, last)`` line numbers of the ``index``-th table called ``name`` (``(0, 0)`` if absent)."""
        hits = [i for i, (_, n) in enumerate(self.headers) if n == name]
        if index >= len(hits):
            return 0, 0
        h = hits[index]
        start = self.headers[h][0]
        end = self.headers[h + 1][0] - 1 if h + 1 < len(self.headers) else len(self.lines)
        return start, end

    def line(self, section: str, index: int = 0, key: str | None = None, sub: str | None = None) -> int:
        start, end = self.section(section, index)
        if start == 0:
            return 1
        if key is None:
            return start
        pat = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for i in range(start, end + 1):
            if pat.match(self.lines[i - 1]):
                if sub is None:
                    return i
                sub_pat = re.compile(rf"(^|[{{,\s])\"?{re.escape(sub)}\"?\s*=")
                for j in range(i, end + 1):  # an inline table may span lines
                    if sub_pat.search(self.lines[j - 1].split("=", 1)[1] if j == i else self.lines[j - 1]):
                        return j
                return i
        return start


# ------------------------------------------------------------------------------------------ parsing
class _Ctx:
    def __init__(self, path: Path, text: str) -> None:
        self.path, self.loc = path, Locator(text)

    def fail(self, msg: str, fix: str, section: str, index: int = 0, key: str | None = None, sub: str | None = None):
        line = self.loc.line(section, index, key, sub)
        raise SpecError(f"{self.path}:{line}: {msg}. Fix: {fix}")

    def where(self, section: str, index: int | None) -> str:
        return f"[[{section}]] #{index + 1}" if index is not None else f"[{section}]"

    def take(
        self,
        table: dict[str, Any],
        key: str,
        types: type | tuple[type, ...],
        section: str,
        index: int | None = None,
        *,
        required: bool = False,
        default: Any = None,
        example: str = "",
    ) -> Any:
        idx = index or 0
        if key not in table:
            if required:
                self.fail(
                    f"{self.where(section, index)} is missing the field `{key}`",
                    f"add `{key} = {example}` to it",
                    section,
                    idx,
                )
            return default
        v = table[key]
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(v, types)
        if not ok:
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            self.fail(
                f"`{key}` in {self.where(section, index)} must be a {names}, got {v!r}",
                f"write e.g. `{key} = {example}`",
                section,
                idx,
                key,
            )
        return v

    def unknown(self, table: dict[str, Any], allowed: tuple[str, ...], section: str, index: int | None = None) -> None:
        for k in table:
            if k not in allowed:
                self.fail(
                    f"unknown field `{k}` in {self.where(section, index)}",
                    f"remove it; the fields of {self.where(section, index)} are {', '.join(allowed)}",
                    section,
                    index or 0,
                    k,
                )


def load_spec(path: str | Path, *, check_model: bool = True) -> StudySpec:
    """Parse and validate the spec at ``path`` (see the module docstring); :class:`SpecError` on any problem.

    ``check_model`` also checks that the base model's tokenizer can tokenize every concept (it loads
    the tokenizer only, not the model)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file. Fix: give the path of a .toml study spec (see docs/studies.md).")
    text = p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise SpecError(
            f"{p}:{m.group(1) if m else 1}: not valid TOML ({e}). Fix: correct the syntax (https://toml.io)."
        ) from None
    return parse_spec(raw, p, text, check_model=check_model)


def parse_spec(raw: dict[str, Any], path: Path, text: str, *, check_model: bool = True) -> StudySpec:
    """Validate a parsed spec (``raw``, from ``text`` at ``path``)."""
    c = _Ctx(path, text)
    c.unknown(raw, ("study", "evaluation", "operating_point", "methods", "concepts", "attacks"), "study")
    # 1. [study]
    if "study" not in raw or not isinstance(raw["study"], dict):
        raise SpecError(f'{path}:1: the spec has no [study] table. Fix: start it with [study] and name = "...".')
    st = raw["study"]
    c.unknown(st, ("name", "model", "detector", "seeds", "dir"), "study")
    name = c.take(st, "name", str, "study", required=True, example='"table1"')
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        c.fail(f"study name {name!r} has characters other than letters, digits, _ . -", "rename it", "study", 0, "name")
    model = c.take(st, "model", str, "study", default="shapes", example='"shapes"')
    detector = c.take(st, "detector", str, "study", default="shapes", example='"shapes"')
    if detector not in DETECTORS:
        c.fail(f"unknown detector {detector!r}", f"use one of {', '.join(DETECTORS)}", "study", 0, "detector")
    seeds = _seeds(c, st, "study", None, (0,))
    sdir = c.take(st, "dir", str, "study", example='"../results/my-study"')
    study_dir = (path.parent / sdir) if sdir else None

    # 2. [evaluation]
    evaluation = None
    if "evaluation" in raw:
        ev = raw["evaluation"]
        allowed = tuple(Evaluation.__dataclass_fields__)
        c.unknown(ev, allowed, "evaluation")
        proto = c.take(ev, "protocol", str, "evaluation", default="shapes-objects", example='"shapes-objects"')
        PROTOCOLS = discover_protocols()
        if proto not in PROTOCOLS:
            c.fail(
                f"unknown protocol {proto!r}",
                f"use one of the registered protocols: {', '.join(sorted(PROTOCOLS))}",
                "evaluation",
                0,
                "protocol",
            )
        if proto not in SUPPORTED_PROTOCOLS:
            c.fail(
                f"protocol {proto!r} is registered but a study cannot split it into selection and test seeds",
                f"use {', '.join(SUPPORTED_PROTOCOLS)}, or evaluate that protocol with `erasekit evaluate`",
                "evaluation",
                0,
                "protocol",
            )
        vals: dict[str, Any] = {"protocol": proto}
        for k in allowed[1:]:
            v = c.take(ev, k, int, "evaluation", example="50")
            if v is not None:
                lo = 0 if k.endswith("seed") else 1
                if v < lo:
                    c.fail(f"`{k}` must be >= {lo}, got {v}", f"set {k} >= {lo}", "evaluation", 0, k)
                vals[k] = v
        evaluation = Evaluation(**vals)
        sel = range(evaluation.selection_seed, evaluation.selection_seed + evaluation.selection_n_per_class)
        test = range(evaluation.test_seed, evaluation.test_seed + evaluation.n_per_class)
        if set(sel) & set(test):
            c.fail(
                f"the selection seeds {sel.start}..{sel.stop - 1} overlap the test seeds {test.start}..{test.stop - 1}",
                "move selection_seed past the test seeds (selection must never see a test image)",
                "evaluation",
                0,
                "selection_seed",
            )

    # 3. [operating_point]
    op_raw = raw.get("operating_point", {"rule": "fixed"})
    c.unknown(op_raw, tuple(OperatingPoint.__dataclass_fields__), "operating_point")
    rule = c.take(op_raw, "rule", str, "operating_point", required=True, example='"target"')
    if rule not in ("fixed", "target"):
        c.fail(
            f"unknown rule {rule!r}", 'use rule = "fixed" (N steps) or rule = "target"', "operating_point", 0, "rule"
        )
    opv: dict[str, Any] = {"rule": rule}
    if rule == "fixed":
        for k in ("metric", "target", "check_every", "max_steps"):
            if k in op_raw:
                c.fail(
                    f"`{k}` belongs to the target rule, not {rule!r}",
                    f'remove `{k}` or set rule = "target"',
                    "operating_point",
                    0,
                    k,
                )
        steps = c.take(op_raw, "steps", int, "operating_point", example="200")
        if steps is not None and steps < 1:
            c.fail(f"`steps` must be >= 1, got {steps}", "set steps >= 1", "operating_point", 0, "steps")
        opv["steps"] = steps
    else:
        if "steps" in op_raw:
            c.fail(
                "`steps` belongs to the fixed rule",
                "use max_steps (the cap) and check_every",
                "operating_point",
                0,
                "steps",
            )
        metric = c.take(op_raw, "metric", str, "operating_point", default="esr_1", example='"esr_1"')
        if metric not in METRICS:
            c.fail(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}", "operating_point", 0, "metric")
        target = c.take(op_raw, "target", (int, float), "operating_point", required=True, example="0.95")
        if not 0 < target <= 1:
            c.fail(f"`target` is a rate in (0, 1], got {target}", "write 95% as 0.95", "operating_point", 0, "target")
        every = c.take(op_raw, "check_every", int, "operating_point", required=True, example="100")
        cap = c.take(op_raw, "max_steps", int, "operating_point", required=True, example="1500")
        if every < 1 or cap < every:
            c.fail(
                f"need 1 <= check_every <= max_steps, got {every} and {cap}",
                "fix the two values",
                "operating_point",
                0,
                "check_every",
            )
        if evaluation is None:
            c.fail(
                "the target rule checks the metric on selection images, but there is no [evaluation]",
                'add [evaluation] with protocol = "shapes-objects"',
                "operating_point",
                0,
                "rule",
            )
        opv.update(metric=metric, target=float(target), check_every=every, max_steps=cap)
    op = OperatingPoint(**opv)

    # 4. [[methods]]
    methods_raw = raw.get("methods")
    if not isinstance(methods_raw, list) or not methods_raw:
        c.fail("the spec has no [[methods]]", 'add one: [[methods]] method = "uce"', "study")
    methods: list[MethodEntry] = []
    for i, m in enumerate(methods_raw):
        c.unknown(m, ("label", "method", "preset", "set", "sweep"), "methods", i)
        mname = c.take(m, "method", str, "methods", i, required=True, example='"uce"')
        label = c.take(m, "label", str, "methods", i, default=mname, example='"UCE"')
        preset = c.take(m, "preset", str, "methods", i, example='"paper"')
        over = dict(c.take(m, "set", dict, "methods", i, default={}, example="{ lamb = 0.5 }"))
        sweep = c.take(m, "sweep", dict, "methods", i, example='{ option = "erase_scale", values = [0.5, 1.0] }')
        if mname == "original":
            for k in ("preset", "set", "sweep"):
                if k in m:
                    c.fail(f"method 'original' (no edit) takes no `{k}`", f"remove `{k}`", "methods", i, k)
            methods.append(MethodEntry(label, mname))
            continue
        try:
            spec = get_method(mname)
        except ValueError as e:
            c.fail(
                str(e).rstrip("."), "use a registered method (`erasekit methods`) or 'original'", "methods", i, "method"
            )
        try:
            resolve_preset(mname, preset)
        except ValueError as e:
            c.fail(str(e).rstrip("."), "pick one of those presets or drop `preset`", "methods", i, "preset")
        fields_ = spec.config_class.__dataclass_fields__
        finetuned = "stop_at" in fields_
        for k in over:
            if k in STUDY_CONTROLLED and k in fields_:
                c.fail(
                    f"option `{k}` of {mname!r} is set by the study (seeds, operating point, cell folders)",
                    "remove it from `set`; use [study] seeds / [operating_point]",
                    "methods",
                    i,
                    "set",
                    k,
                )
        try:
            make_config(mname, preset, **over)
        except (ValueError, TypeError) as e:
            bad = next((k for k in over if f"`{k}`" in str(e) or repr(k) in str(e) or f"'{k}'" in str(e)), None)
            c.fail(
                str(e).rstrip("."),
                "fix or remove that option (`erasekit methods` lists them)",
                "methods",
                i,
                "set",
                bad,
            )
        s_opt, s_vals = None, ()
        if sweep is not None:
            if finetuned:
                c.fail(
                    f"{mname!r} is fine-tuned: the target rule trains it in chunks, it has no `sweep`",
                    "remove `sweep` (the operating point is set by check_every / max_steps)",
                    "methods",
                    i,
                    "sweep",
                )
            if rule != "target":
                c.fail(
                    "`sweep` is used by the target rule only",
                    'remove `sweep` or set rule = "target"',
                    "methods",
                    i,
                    "sweep",
                )
            c.unknown(sweep, ("option", "values"), "methods", i)
            s_opt = c.take(sweep, "option", str, "methods", i, required=True, example='"erase_scale"')
            s_vals = c.take(sweep, "values", list, "methods", i, required=True, example="[0.5, 1.0, 2.0]")
            if s_opt not in option_names(spec.config_class):
                c.fail(
                    f"{mname!r} has no option {s_opt!r} to sweep",
                    f"sweep one of {option_names(spec.config_class)}",
                    "methods",
                    i,
                    "sweep",
                    "option",
                )
            if not s_vals:
                c.fail(
                    "`sweep.values` is empty", "give the values, weakest erasure first", "methods", i, "sweep", "values"
                )
            for v in s_vals:
                try:
                    make_config(mname, preset, **{**over, s_opt: v})
                except (ValueError, TypeError) as e:
                    c.fail(f"sweep value {v!r}: {e}".rstrip("."), "fix the value", "methods", i, "sweep", "values")
        elif rule == "target" and not finetuned:
            c.fail(
                f"closed-form method {mname!r} cannot reach a target by training",
                'add sweep = { option = "erase_scale", values = [...] } (or lamb), weakest erasure first',
                "methods",
                i,
                "method",
            )
        if rule == "fixed" and op.steps is not None and not finetuned:
            pass  # fixed steps apply to the fine-tuned methods; closed forms are one solve
        methods.append(MethodEntry(label, mname, preset, over, s_opt, tuple(s_vals)))
    labels = [m.label for m in methods]
    for i, lab in enumerate(labels):
        if labels.index(lab) != i:
            c.fail(
                f"two methods have the label {lab!r}", "give each [[methods]] a distinct label", "methods", i, "label"
            )

    # 5. [[concepts]]
    concepts_raw = raw.get("concepts")
    if not isinstance(concepts_raw, list) or not concepts_raw:
        c.fail("the spec has no [[concepts]]", 'add one: [[concepts]] erase = ["triangle"]', "study")
    concepts: list[ConceptEntry] = []
    tokenizer = _tokenizer(model) if check_model else None
    vocab = set(shapes_vocabulary()) if model in ("shapes", "tiny") else None
    for i, cs in enumerate(concepts_raw):
        c.unknown(cs, ("label", "erase", "preserve", "seeds", "methods"), "concepts", i)
        erase = c.take(cs, "erase", list, "concepts", i, required=True, example='["triangle"]')
        if not erase or not all(isinstance(x, str) and x.strip() for x in erase):
            c.fail(
                "`erase` must be a non-empty list of concept names", 'e.g. erase = ["triangle"]', "concepts", i, "erase"
            )
        label = c.take(cs, "label", str, "concepts", i, default="+".join(erase), example='"split0"')
        preserve = c.take(cs, "preserve", list, "concepts", i, example='["square"]')
        for key, words in (("erase", erase), ("preserve", preserve or [])):
            for w in words:
                problem = _untokenizable(w, tokenizer, vocab)
                if problem:
                    c.fail(
                        f"concept {w!r} in `{key}`: {problem}", "use a concept the base model knows", "concepts", i, key
                    )
        if evaluation is not None:
            bad = [w for w in [*erase, *(preserve or [])] if w not in OBJECTS]
            if bad:
                c.fail(
                    f"protocol {evaluation.protocol!r} scores objects, and {bad} are not objects",
                    f"erase/preserve objects ({', '.join(OBJECTS)}), or drop [evaluation] for an attacks-only study",
                    "concepts",
                    i,
                    "erase",
                )
        cseeds = _seeds(c, cs, "concepts", i, seeds)
        only = c.take(cs, "methods", list, "concepts", i, example='["UCE", "ESD-x"]')
        for lab in only or []:
            if lab not in labels:
                c.fail(
                    f"`methods` names {lab!r}, which is no [[methods]] label",
                    f"use labels from {labels}",
                    "concepts",
                    i,
                    "methods",
                )
        concepts.append(
            ConceptEntry(
                label,
                tuple(erase),
                tuple(preserve) if preserve is not None else None,
                cseeds,
                tuple(only) if only is not None else None,
            )
        )
    clabels = [x.label for x in concepts]
    for i, lab in enumerate(clabels):
        if clabels.index(lab) != i:
            c.fail(
                f"two concept sets have the label {lab!r}",
                "give each [[concepts]] a distinct label",
                "concepts",
                i,
                "label",
            )

    # 6. [attacks]
    attacks = None
    if "attacks" in raw:
        at = raw["attacks"]
        c.unknown(at, ("names", "n_prompts", "n_images", "set"), "attacks")
        names = c.take(at, "names", list, "attacks", required=True, example='["inversion", "paraphrase"]')
        known = available_attacks()
        for a in names:
            if a not in known:
                c.fail(f"unknown attack {a!r}", f"use attacks from {', '.join(sorted(known))}", "attacks", 0, "names")
        n_prompts = c.take(at, "n_prompts", int, "attacks", default=50, example="50")
        n_images = c.take(at, "n_images", int, "attacks", default=1, example="1")
        aset = c.take(at, "set", dict, "attacks", default={}, example="{ unlearndiff = { steps = 20 } }")
        for a, over in aset.items():
            if a not in names:
                c.fail(
                    f"`set` configures attack {a!r}, which is not in `names`",
                    f"add {a!r} to names or remove it",
                    "attacks",
                    0,
                    "set",
                    a,
                )
            try:
                make_attack_config(a, **over)
            except (ValueError, TypeError) as e:
                c.fail(f"attack {a!r}: {e}".rstrip("."), "fix or remove that option", "attacks", 0, "set", a)
        for i, cs in enumerate(concepts):
            if len(cs.erase) != 1:
                c.fail(
                    "attacks target one erased concept per cell",
                    "give each [[concepts]] a single erase entry",
                    "concepts",
                    i,
                    "erase",
                )
        attacks = Attacks(tuple(names), n_prompts, n_images, {k: dict(v) for k, v in aset.items()})
    if evaluation is None and attacks is None:
        c.fail("the study measures nothing: no [evaluation] and no [attacks]", "add one of them", "study")
    return StudySpec(name, model, detector, tuple(methods), tuple(concepts), evaluation, op, attacks, path, study_dir)


def _seeds(
    c: _Ctx, table: dict[str, Any], section: str, index: int | None, default: tuple[int, ...]
) -> tuple[int, ...]:
    seeds = c.take(table, "seeds", list, section, index, default=list(default), example="[0, 1, 2]")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        c.fail(
            f"`seeds` must be a non-empty list of integers >= 0, got {seeds!r}",
            "e.g. seeds = [0, 1, 2]",
            section,
            index or 0,
            "seeds",
        )
    if len(set(seeds)) != len(seeds):
        c.fail(f"`seeds` repeats a seed: {seeds!r}", "list each seed once", section, index or 0, "seeds")
    return tuple(seeds)


def _tokenizer(model: str):
    """The base model's tokenizer only (cheap): the bundled CLIP BPE for the miniature and tiny models."""
    if model in ("shapes", "tiny"):
        return load_clip_tokenizer(TOKENIZER_DIR)
    folder = Path(model) / "tokenizer"
    if folder.is_dir():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder))
    return None  # a hub id: the tokenizer is checked when the model loads


def _untokenizable(concept: str, tokenizer, vocab: set[str] | None) -> str | None:
    """Why ``concept`` cannot be used with this model's text encoder, or ``None``."""
    if tokenizer is not None:
        ids = tokenizer(concept, add_special_tokens=False).input_ids
        if not ids:
            return "the tokenizer gives it no token"
        if len(ids) > 75:
            return f"it is {len(ids)} tokens, more than CLIP's 75"
    if vocab is not None:
        unknown = [w for w in re.findall(r"[A-Za-z]+", concept.lower()) if w not in vocab]
        if unknown or not re.search(r"[A-Za-z]", concept):
            return (
                f"the miniature's text encoder never saw {unknown or concept!r} (it knows only ShapesWorld's caption "
                "words: `python -c 'from erasekit.concepts import shapes_vocabulary; print(shapes_vocabulary())'`)"
            )
    return None
