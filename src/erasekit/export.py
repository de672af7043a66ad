"""Export an :class:`~erasekit.edit.Edit` out of EraseKit (issue 16).

Four formats, each written into a temporary folder beside ``out`` and renamed onto it only when
complete (so a failed export leaves nothing behind), each with a ``README.md`` model card
(huggingface_hub ``ModelCard``) and ``export.json`` (what was exported, from which edit and base):

- ``diffusers``: a whole pipeline folder that stock ``StableDiffusionPipeline.from_pretrained(DIR)``
  loads without EraseKit; the base's own safety checker and feature extractor are copied back
  (``load_pipeline`` drops them); safetensors only.
- ``lora``: ``pytorch_lora_weights.safetensors`` in the peft format that stock
  ``pipe.load_lora_weights(DIR)`` reads. Each changed Linear weight's delta
  ``dW = W_edit - W_base`` (out x in) is factorised by a truncated SVD,
  ``dW ~= U_r S_r V_r^T = B A`` with ``B = U_r S_r^(1/2)`` (lora_B, out x r) and
  ``A = S_r^(1/2) V_r^T`` (lora_A, r x in), at a fixed rank or the smallest rank keeping an energy
  share of ``sum(s_i^2)``. Eckart-Young: the relative Frobenius error of rank r is
  ``sqrt(sum_{i>r} s_i^2) / sqrt(sum_i s_i^2)``; it is printed and recorded per layer and overall,
  with the rank needed for <= 1 % error. Linear *bias* deltas (ESD-x and AP train ``attn2.to_out.0.bias``)
  are exact as peft's ``lora_bias`` (a bias on lora_B); any other changed tensor (norms, convs,
  embeddings) cannot be a LoRA and is refused with a pointer to ``format="diffusers"``.
  LoRA alpha equals each layer's rank, so the scale alpha/r is 1 and ``W_base + B A`` is the edit.
- ``kohya``: the same LoRA converted with diffusers' own ``convert_state_dict_to_kohya`` (the key
  format A1111 / ComfyUI / sd-scripts read: ``lora_unet_..._to_k.lora_down.weight``, ``.alpha``).
  Kohya keys hold no bias, so bias deltas are refused unless ``drop_bias=True`` (then their size is
  counted in the recorded error).
- ``unet``: the edited UNet alone as a diffusers model folder (``UNet2DConditionModel.from_pretrained``).

UCE and RECE deltas are low rank by construction: the closed form changes ``W`` only along the
span of the erased/preserved concept embeddings, so their numerical rank is at most the number of
token embeddings the solve used (``erasekit export`` prints the measured ranks).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from erasekit._version import __version__
from erasekit.edit import Edit, get_parameter, register_exporter
from erasekit.io import save_safetensors_atomic, write_json_atomic
from erasekit.lora_train import AUX_PREFIX
from erasekit.pipeline import BUNDLED, fingerprint

FORMATS = ("diffusers", "lora", "kohya", "unet")
ExportFormat = Literal["diffusers", "lora", "kohya", "unet"]
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
EXPORT_META = "export.json"
CARD = "README.md"
LORA_COMPONENTS = ("unet", "text_encoder")
# files never copied from a base folder: pickled weights (EraseKit writes and reads safetensors only)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".h5")
# pipeline components load_pipeline drops that an export copies back from the base folder
BASE_EXTRAS = ("safety_checker", "feature_extractor")
BASE_FILES = ("erasekit_world.json",)  # top-level files of a base folder an exported pipeline keeps
ONE_PERCENT = 0.01


# ------------------------------------------------------------------------------------------ low rank
@dataclass(frozen=True)
class LowRank:
    """A truncated SVD ``delta ~= up @ down`` of one Linear weight delta and how good it is.

    ``error`` is the relative Frobenius error of the kept rank, ``rank_for_1pct`` the smallest rank
    with error <= 1 %, ``numerical_rank`` the number of singular values above float32 round-off
    (``s_max * max(out, in) * eps``), ``norm`` the delta's Frobenius norm.
    """

    up: torch.Tensor  # (out, r) = U_r S_r^(1/2)
    down: torch.Tensor  # (r, in) = S_r^(1/2) V_r^T
    rank: int
    max_rank: int
    error: float
    rank_for_1pct: int
    numerical_rank: int
    norm: float
    tail: torch.Tensor  # (max_rank + 1,): relative error at every rank 0..max_rank
    source: str = "svd"  # "trained": the factors a LoRA-trained edit carries (erasekit.lora_train), not the SVD's


def tail_errors(s: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error of the best rank-r approximation for r = 0..len(s) (Eckart-Young):
    ``sqrt(sum_{i>=r} s_i^2) / sqrt(sum_i s_i^2)``; all zeros for a zero matrix."""
    sq = s.double() ** 2
    total = sq.sum()
    if total == 0:
        return torch.zeros(len(s) + 1, dtype=torch.float64)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), sq.new_zeros(1)])
    return (tail / total).clamp_min(0).sqrt()


def truncated_svd(
    delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None, name: str = "delta"
) -> LowRank:
    """Best rank-r factorisation ``delta ~= up @ down`` (Eckart-Young-Mirsky; SVD in float64), the
    ``B A`` of LoRA (Hu et al., 2021, eq. 3: ``h = W_0 x + B A x``) with B = up, A = down.

    ``rank=None, energy=None`` keeps the full rank ``min(out, in)`` (exact up to round-off);
    ``energy=e`` keeps the smallest r with ``sum_{i<r} s_i^2 >= e * sum_i s_i^2`` (relative error
    ``sqrt(1 - e)``). A rank above ``min(out, in)`` is an error naming the layer.
    """
    if delta.ndim != 2:
        raise ValueError(f"`{name}` has shape {tuple(delta.shape)}; a LoRA factorises 2-D Linear weights only.")
    if rank is not None and energy is not None:
        raise ValueError("Pass either `rank` or `energy`, not both.")
    max_rank = min(delta.shape)
    if rank is not None and rank < 1:
        raise ValueError(f"`rank` must be at least 1, got {rank}; or pass --rank full or --energy.")
    if rank is not None and rank > max_rank:
        raise ValueError(
            f"`rank` {rank} is larger than layer {name!r} allows (shape {tuple(delta.shape)}, at most {max_rank}); "
            f"pass --rank {max_rank} or less, --rank full, or --energy."
        )
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"`energy` must be in (0, 1], got {energy}; e.g. --energy 0.9999 for <= 1% error.")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    tail = tail_errors(s)
    tol = float(s[0]) * max(delta.shape) * torch.finfo(torch.float32).eps if len(s) else 0.0
    numerical = int((s > tol).sum()) if len(s) and s[0] > 0 else 0
    if rank is None and energy is None:
        r = max_rank
    elif rank is not None:
        r = rank
    else:
        kept = 1 - tail**2  # energy share kept at rank r
        r = max(1, int(torch.nonzero(kept >= energy - 1e-12)[0]))
    rank_1pct = int(torch.nonzero(tail <= ONE_PERCENT)[0])
    root = s[:r].sqrt()
    return LowRank(
        up=(u[:, :r] * root).float(),
        down=(root[:, None] * vh[:r]).float(),
        rank=r,
        max_rank=max_rank,
        error=float(tail[r]),
        rank_for_1pct=rank_1pct,
        numerical_rank=numerical,
        norm=float(s.norm()),
        tail=tail,
    )


@dataclass(frozen=True)
class LoraPlan:
    """An edit as LoRA factors: ``layers[module] = LowRank`` (module names with their component,
    e.g. ``unet.down_blocks.0...attn2.to_k``), exact ``biases[module] = delta``, and what was dropped."""

    layers: dict[str, LowRank]
    biases: dict[str, torch.Tensor]
    dropped: dict[str, float]  # bias deltas left out (kohya with drop_bias): module -> Frobenius norm
    unchanged: list[str]  # edited tensors equal to the base
    rank: int | None
    energy: float | None
    in_features: dict[str, int] = field(default_factory=dict)  # of every module with a bias delta

    @property
    def overall_error(self) -> float:
        """||delta - exported|| / ||delta|| over every changed tensor (weights and biases)."""
        err = sum((lr.error * lr.norm) ** 2 for lr in self.layers.values()) + sum(v**2 for v in self.dropped.values())
        total = (
            sum(lr.norm**2 for lr in self.layers.values())
            + sum(float(b.double().norm()) ** 2 for b in self.biases.values())
            + sum(v**2 for v in self.dropped.values())
        )
        return (err / total) ** 0.5 if total > 0 else 0.0

    def overall_error_at(self, rank: int) -> float:
        """The overall relative error if every layer kept ``min(rank, its max rank)``."""
        err = sum((float(lr.tail[min(rank, lr.max_rank)]) * lr.norm) ** 2 for lr in self.layers.values())
        err += sum(v**2 for v in self.dropped.values())
        total = (
            sum(lr.norm**2 for lr in self.layers.values())
            + sum(float(b.double().norm()) ** 2 for b in self.biases.values())
            + sum(v**2 for v in self.dropped.values())
        )
        return (err / total) ** 0.5 if total > 0 else 0.0

    @property
    def uniform_rank_for_1pct(self) -> int | None:
        """Smallest rank r such that every layer at ``min(r, its max rank)`` gives <= 1 % overall error
        (``None`` when dropped biases alone exceed 1 %)."""
        top = max((lr.max_rank for lr in self.layers.values()), default=0)
        for r in range(top + 1):
            if self.overall_error_at(r) <= ONE_PERCENT:
                return r
        return None

    def report(self) -> dict[str, Any]:
        """JSON-ready: per layer and overall relative error, kept ranks, ranks needed for <= 1 %."""
        return {
            "rank": self.rank if self.rank is not None else ("energy" if self.energy is not None else "full"),
            "energy": self.energy,
            "overall_error": self.overall_error,
            "uniform_rank_for_1pct": self.uniform_rank_for_1pct,
            "layers": {
                name: {
                    "shape": [int(lr.up.shape[0]), int(lr.down.shape[1])],
                    "rank": lr.rank,
                    "max_rank": lr.max_rank,
                    "numerical_rank": lr.numerical_rank,
                    "rank_for_1pct": lr.rank_for_1pct,
                    "error": lr.error,
                    "norm": lr.norm,
                    "source": lr.source,
                }
                for name, lr in sorted(self.layers.items())
            },
            "biases": sorted(self.biases),
            "dropped_biases": dict(sorted(self.dropped.items())),
            "unchanged": self.unchanged,
        }


def format_report(report: dict[str, Any]) -> str:
    """The LoRA report as a text table (what ``erasekit export`` prints)."""
    lines = [f"{'layer':<72} {'shape':>9} {'rank':>5} {'num.rank':>8} {'r<=1%':>6} {'rel.error':>10}"]
    for name, row in report["layers"].items():
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"{name:<72} {shape:>9} {row['rank']:>5} {row['numerical_rank']:>8} {row['rank_for_1pct']:>6} "
            f"{row['error']:>10.3e}"
        )
    lines.append(
        f"overall relative error {report['overall_error']:.3e}; uniform rank for <= 1% error: "
        f"{report['uniform_rank_for_1pct']}; exact biases: {len(report['biases'])}; "
        f"dropped biases: {len(report['dropped_biases'])}"
    )
    return "\n".join(lines)


def _trained_factors(
    edit: Edit, module: str, delta: torch.Tensor, svd: LowRank, rank: int | None, energy: float | None
) -> LowRank | None:
    """A LoRA-trained edit (``lora_rank=R``, :mod:`erasekit.lora_train`) carries its factors in ``edit.aux``:
    exported as they are (rank R, the trained model exactly) when the requested rank is full or >= R and no
    energy threshold is given. ``error`` is then ``||delta - B A|| / ||delta||``, the float32 rounding of the
    merged weights the edit stores (the SVD diagnostics -- numerical rank, rank for 1 % -- are kept)."""
    a, b = edit.aux.get(f"{AUX_PREFIX}{module}.lora_A"), edit.aux.get(f"{AUX_PREFIX}{module}.lora_B")
    if a is None or b is None or energy is not None or (rank is not None and rank < a.shape[0]):
        return None
    if b.shape[0] != delta.shape[0] or a.shape[1] != delta.shape[1]:
        raise ValueError(f"The edit's LoRA factors of {module!r} do not match its weight {tuple(delta.shape)}.")
    d = delta.double()
    err = float((d - b.double() @ a.double()).norm() / d.norm().clamp_min(1e-300))
    return LowRank(
        up=b.float().contiguous(),
        down=a.float().contiguous(),
        rank=int(a.shape[0]),
        max_rank=svd.max_rank,
        error=err,
        rank_for_1pct=svd.rank_for_1pct,
        numerical_rank=svd.numerical_rank,
        norm=svd.norm,
        tail=svd.tail,
        source="trained",
    )


def _split_name(name: str) -> tuple[str, str, str]:
    """``unet.a.b.weight`` -> (``unet``, ``a.b``, ``weight``)."""
    component, _, rest = name.partition(".")
    module, _, kind = rest.rpartition(".")
    return component, module, kind


def plan_lora(
    edit: Edit,
    pipe,
    *,
    rank: int | Literal["full"] | None = None,
    energy: float | None = None,
    bias: Literal["keep", "drop", "refuse"] = "keep",
    check: bool = True,
) -> LoraPlan:
    """Factorise ``edit``'s weight deltas against the base ``pipe`` (which must not have the edit applied).

    ``bias``: ``keep`` exports Linear bias deltas exactly (peft ``lora_bias``); ``drop`` leaves them
    out (their size goes into the error); ``refuse`` raises if there is any. Raises ``ValueError``,
    listing them, if a changed tensor is not a Linear weight/bias of the UNet or text encoder.
    ``check=False`` skips the base check (:func:`check_base_now`) when the caller has just done it.
    """
    if rank == "full":
        rank = None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"`rank` must be a positive integer or 'full', got {rank!r}.")
    if check:
        check_base_now(edit, pipe)
    refused, linear, biases, in_features = [], {}, {}, {}
    for name in sorted(edit.tensors):
        component, module_name, kind = _split_name(name)
        owner = getattr(pipe, component, None)
        try:
            module = owner.get_submodule(module_name) if isinstance(owner, torch.nn.Module) else None
        except AttributeError:
            module = None
        if (
            component not in LORA_COMPONENTS
            or not isinstance(module, torch.nn.Linear)
            or kind not in ("weight", "bias")
        ):
            what = type(module).__name__ if module is not None else "not a module"
            refused.append(f"{name} ({what})")
            continue
        (linear if kind == "weight" else biases)[f"{component}.{module_name}"] = name
        in_features[f"{component}.{module_name}"] = module.in_features
    if refused:
        shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
        raise ValueError(
            f"This {edit.method} edit changes {len(refused)} tensor(s) that cannot be a LoRA (only Linear weights "
            f"and biases of the UNet / text encoder can): {shown}. Export it with --format diffusers (or unet)."
        )
    if biases and bias == "refuse":
        raise ValueError(
            f"This {edit.method} edit changes {len(biases)} Linear bias(es) (e.g. {next(iter(sorted(biases.values())))}); "
            "kohya LoRA keys carry no bias. Pass --drop-bias to leave them out (the error is recorded), "
            "or export with --format lora (keeps biases exactly) or --format diffusers."
        )
    layers, unchanged, exact_biases, dropped = {}, [], {}, {}
    for module, name in linear.items():
        base = get_parameter(pipe, name).detach()
        delta = edit.tensors[name].to(base.device).double() - base.double()
        if not delta.any():
            unchanged.append(name)
            continue
        low = truncated_svd(delta.cpu(), rank=rank, energy=energy, name=module)
        layers[module] = _trained_factors(edit, module, delta.cpu(), low, rank, energy) or low
    for module, name in biases.items():
        base = get_parameter(pipe, name).detach()
        delta = edit.tensors[name].to(base.device).double() - base.double()
        if not delta.any():
            unchanged.append(name)
        elif bias == "drop":
            dropped[module] = float(delta.norm())
        else:
            exact_biases[module] = delta.float().cpu()
    if not layers and not exact_biases:
        raise ValueError(
            "The edit's tensors all equal the pipeline's: either the edit is already applied to `pipe` "
            "(pass the base model, not the edited one) or it changes nothing."
        )
    return LoraPlan(layers, exact_biases, dropped, sorted(unchanged), rank, energy, in_features)


def lora_state_dicts(plan: LoraPlan) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Per component (``unet``, ``text_encoder``): the peft state dict (``{module}.lora_A.weight`` (r, in),
    ``{module}.lora_B.weight`` (out, r), ``{module}.lora_B.bias`` with lora_bias) and its LoraConfig
    kwargs (alpha = rank per module, so the scale is 1)."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict[str, Any]] = {}
    modules = sorted(set(plan.layers) | set(plan.biases))
    for component in LORA_COMPONENTS:
        mine = [m for m in modules if m.startswith(component + ".")]
        if not mine:
            continue
        has_bias = any(m in plan.biases for m in mine)
        sd: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for m in mine:
            key = m[len(component) + 1 :]
            if m in plan.layers:
                lr = plan.layers[m]
                up, down = lr.up, lr.down
            else:  # only the bias changed: a zero rank-1 weight delta carries the exact bias
                up, down = torch.zeros(len(plan.biases[m]), 1), torch.zeros(1, plan.in_features[m])
            sd[f"{key}.lora_A.weight"] = down.contiguous()
            sd[f"{key}.lora_B.weight"] = up.contiguous()
            if has_bias:
                sd[f"{key}.lora_B.bias"] = plan.biases.get(m, torch.zeros(up.shape[0])).contiguous()
            ranks[key] = int(down.shape[0])
        r = Counter(ranks.values()).most_common(1)[0][0]
        states[component] = sd
        configs[component] = {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": {k: v for k, v in ranks.items() if v != r},
            "alpha_pattern": {k: v for k, v in ranks.items() if v != r},
            "target_modules": sorted(ranks),
            "lora_bias": has_bias,
            "use_dora": False,
        }
    return states, configs


def low_rank_edit(edit: Edit, pipe, plan: LoraPlan) -> Edit:
    """The edit a LoRA plan stands for: ``W_base + up @ down`` (and base + kept bias deltas), as a new
    :class:`Edit` (same provenance; ``config["lora_export"]`` records the rank)."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module, lr in plan.layers.items():
            name = f"{module}.weight"
            base = get_parameter(pipe, name).detach().cpu()
            tensors[name] = (base.double() + lr.up.double() @ lr.down.double()).to(base.dtype)
        for module, delta in plan.biases.items():
            name = f"{module}.bias"
            base = get_parameter(pipe, name).detach().cpu()
            tensors[name] = (base.double() + delta.double()).to(base.dtype)
    config = {**edit.config, "lora_export": {"rank": plan.report()["rank"], "energy": plan.energy}}
    return Edit(
        tensors=tensors,
        method=edit.method,
        config=config,
        request=edit.request,
        base=edit.base,
        version=edit.version,
        created=edit.created,
        trace=edit.trace,
    )


def check_base_now(edit: Edit, pipe) -> None:
    """Raise unless ``pipe``'s weights *now* are the edit's base (a fresh fingerprint, so an already
    edited pipeline or another base model is refused)."""
    edit.check_base(pipe)
    now = fingerprint(pipe)
    if now != edit.base.get("fingerprint"):
        raise ValueError(
            f"The pipeline's weights have changed since it was loaded (fingerprint {now}, the edit's base is "
            f"{edit.base.get('fingerprint')}): an edit is probably applied to it already. Export from a freshly "
            "loaded base model."
        )


# ------------------------------------------------------------------------------------------ writing
@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed onto ``out`` only when the block succeeds.

    ``out`` must not exist or be an empty folder; on any failure the temporary folder is removed.
    """
    out = Path(out)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(out: str | Path) -> None:
    """Raise if ``out`` exists and is a file or a non-empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"Export directory {str(out)!r} exists and is not empty; choose another --out or remove it first."
        )


def base_folder(edit: Edit) -> Path | None:
    """The base model's local diffusers folder, when the edit's base is local or bundled (else ``None``)."""

    path = edit.base.get("path")
    if path and Path(path).is_dir():
        return Path(path)
    if edit.base.get("id") in BUNDLED:
        return BUNDLED[edit.base["id"]]
    return None


def copy_base_extras(base: Path | None, out: Path) -> list[str]:
    """Copy the base folder's safety checker and feature extractor into pipeline folder ``out`` and
    restore their ``model_index.json`` entries and ``requires_safety_checker``; safetensors only.
    Also copies :data:`BASE_FILES`. Returns what was copied."""
    if base is None or not (base / "model_index.json").exists():
        return []
    base_index = json.loads((base / "model_index.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    copied = []
    for comp in BASE_EXTRAS:
        entry = base_index.get(comp)
        if not entry or entry[0] is None or not (base / comp).is_dir():
            continue
        files = [f for f in (base / comp).iterdir() if f.is_file()]
        weights = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        safe = [f for f in files if f.suffix == ".safetensors"]
        if weights and not safe:
            raise ValueError(
                f"The base's {comp} in {str(base / comp)!r} has only pickled weights ({weights[0].name}); EraseKit "
                "writes safetensors only. Convert it (save_pretrained(..., safe_serialization=True)) and retry."
            )
        (out / comp).mkdir(exist_ok=True)
        for f in files:
            if f.suffix not in PICKLE_SUFFIXES:
                shutil.copy2(f, out / comp / f.name)
        index[comp] = entry
        copied.append(comp)
    for name in BASE_FILES:  # e.g. the miniature's own sampling defaults, read by load_pipeline(out)
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
            copied.append(name)
    if "requires_safety_checker" in base_index:
        index["requires_safety_checker"] = base_index["requires_safety_checker"]
    write_json_atomic(out / "model_index.json", index)
    return copied


def _no_pickles(folder: Path) -> None:
    bad = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"Export wrote pickled files {bad}; safetensors only is expected.")


def _slug(edit: Edit) -> str:
    words = "-".join(edit.request.erase)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"erasekit_{edit.method}_{words}")[:80]


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    path: Path
    format: str
    files: list[str]
    record: dict[str, Any]
    lora: dict[str, Any] | None = None
    card: str = ""


@register_exporter
def export(
    edit: Edit,
    pipe,
    out: str | Path,
    format: ExportFormat = "diffusers",
    *,
    rank: int | Literal["full"] | None = None,
    energy: float | None = None,
    drop_bias: bool = False,
    run_dir: str | Path | None = None,
    metrics: Sequence[str | Path | dict[str, Any]] = (),
    license: str | None = None,
    model_name: str | None = None,
    kohya_name: str | None = None,
) -> ExportResult:
    """Write ``edit`` (made on base ``pipe``, which must not have it applied) to ``out`` as ``format``.

    ``rank``/``energy`` choose the LoRA rank (``lora``, ``kohya``; default full rank, exact);
    ``drop_bias`` lets a kohya file leave bias deltas out. The model card's evaluation results
    come from ``metrics`` (metrics.json paths or dicts) and every ``metrics.json`` under ``run_dir``.
    Bad input (another base, a non-empty ``out``, a rank above a layer's, a format the edit cannot
    take) raises before anything is written; the export is written to a temporary folder and renamed.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` {format!r} is not one of {', '.join(FORMATS)}.")
    if format in ("diffusers", "unet") and (rank is not None or energy is not None or drop_bias):
        raise ValueError(f"--rank, --energy and --drop-bias apply to --format lora/kohya only, not {format!r}.")
    if drop_bias and format != "kohya":
        raise ValueError("--drop-bias applies to --format kohya only (the peft LoRA keeps biases exactly).")
    out = Path(out)
    check_out_dir(out)
    check_base_now(edit, pipe)
    run_metrics = collect_metrics(run_dir, metrics, exclude=out)
    plan, states, configs = None, {}, {}
    if format in ("lora", "kohya"):
        plan = plan_lora(
            edit,
            pipe,
            rank=rank,
            energy=energy,
            bias="keep" if format == "lora" else ("drop" if drop_bias else "refuse"),
            check=False,
        )
        states, configs = lora_state_dicts(plan)
    if format == "unet":
        others = sorted({n.partition(".")[0] for n in edit.tensors} - {"unet"})
        if others:
            raise ValueError(
                f"This edit also changes {others}; --format unet holds the UNet only. Use --format diffusers."
            )
    files: list[str]
    with staged_dir(out) as tmp:
        copied: list[str] = []
        if format == "diffusers":
            with edit.applied(pipe):
                pipe.save_pretrained(tmp, safe_serialization=True)
            copied = copy_base_extras(base_folder(edit), tmp)
        elif format == "unet":
            with edit.applied(pipe):
                pipe.unet.save_pretrained(tmp, safe_serialization=True)
        elif format == "lora":
            # kept here: importing diffusers' pipeline module pulls transformers' image processors, which
            # warn on every `import erasekit` where torchvision is not installed
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=states.get("unet"),
                text_encoder_lora_layers=states.get("text_encoder"),
                unet_lora_adapter_metadata=configs.get("unet"),
                text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
                weight_name=LORA_FILE,
                safe_serialization=True,
            )
        else:
            kohya = kohya_state_dict(states)
            name = (kohya_name or _slug(edit)) + ".safetensors"
            meta = {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(max(lr.rank for lr in plan.layers.values())),
                "ss_network_alpha": "per-module (alpha = rank)",
                "ss_base_model_version": "sd_v1",
                "erasekit_method": edit.method,
                "erasekit_base_fingerprint": str(edit.base.get("fingerprint")),
            }
            save_safetensors_atomic(kohya, tmp / name, metadata=meta)
        _no_pickles(tmp)
        record = export_record(edit, format, plan, run_metrics, copied)
        card = model_card(
            edit,
            format,
            plan=plan,
            metrics=run_metrics,
            license=license,
            model_name=model_name,
            kohya_file=(kohya_name or _slug(edit)) + ".safetensors",
        )
        card.save(tmp / CARD)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [EXPORT_META]
        record["files"] = sorted(files)
        write_json_atomic(tmp / EXPORT_META, record)
    return ExportResult(out, format, sorted(files), record, plan.report() if plan else None, str(card))


def kohya_state_dict(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """peft LoRA state dicts -> kohya keys with diffusers' ``convert_state_dict_to_kohya``.

    Two changes to the converter's output: SD 1.x's text encoder prefix is ``lora_te_`` (the
    converter writes SDXL's ``lora_te1_``), and every module gets the *same* alpha (the most common
    rank) with ``rank / alpha`` folded into ``lora_up``, so the kohya scale alpha/rank still gives
    exactly ``up @ down``. Reason: with per-module alphas, diffusers 0.42's kohya loader builds
    alpha_pattern keys that match no module (``...attn2.processor.to_k_lora.down.weight``) and
    silently scales the minority-rank layers wrongly (measured: 1.7 max weight error).
    """

    peft = {f"{comp}.{k}": v for comp, sd in states.items() for k, v in sd.items()}
    if any(k.endswith(".bias") for k in peft):
        raise ValueError("kohya LoRA keys carry no bias; pass --drop-bias or use --format lora.")
    converted = convert_state_dict_to_kohya(peft)
    converted = {
        ("lora_te_" + k[len("lora_te1_") :] if k.startswith("lora_te1_") else k): v for k, v in converted.items()
    }
    ranks = {
        k[: -len(".lora_down.weight")]: int(v.shape[0]) for k, v in converted.items() if k.endswith(".lora_down.weight")
    }
    alpha = Counter(ranks.values()).most_common(1)[0][0]
    out: dict[str, torch.Tensor] = {}
    for k, v in converted.items():
        module, _, kind = k.partition(".")
        if kind == "alpha":
            out[k] = torch.tensor(float(alpha))
        elif kind == "lora_up.weight":
            out[k] = (v * (ranks[module] / alpha)).contiguous()
        else:
            out[k] = v
    return out


def export_record(
    edit: Edit, format: str, plan: LoraPlan | None, metrics: list[dict[str, Any]], copied: list[str]
) -> dict[str, Any]:
    """``export.json``: the format, the edit's provenance (config, request, base fingerprint), the
    LoRA report and the metrics the card cites."""
    meta = edit.metadata()
    return {
        "format": format,
        "exported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "erasekit_version": __version__,
        "edit": {k: meta[k] for k in ("method", "config", "request", "base", "version", "created", "parameters")},
        "base_components_copied": copied,
        "lora": plan.report() if plan is not None else None,
        "metrics": metrics,
    }


# ------------------------------------------------------------------------------------------ model card
METRIC_KEYS = re.compile(
    r"^((esr|psr|rsr)_\d+|asr(_\w+)?|pre_attack_rate|ner(_[\w.]+)?|clip(_\w+)?|fid(_\w+)?|lpips_d)$"
)
METRIC_NAMES = {"esr": "ESR", "psr": "PSR", "rsr": "RSR", "asr": "ASR", "ner": "NER", "clip": "CLIP", "fid": "FID"}


def collect_metrics(
    run_dir: str | Path | None, extra: Sequence[str | Path | dict[str, Any]] = (), *, exclude: Path | None = None
) -> list[dict[str, Any]]:
    """Every ``metrics.json`` under ``run_dir`` plus ``extra`` (paths or dicts), each as
    ``{"source", "protocol", "detector", "seeds", "values": {metric: number}}``."""
    found: list[tuple[str, dict[str, Any]]] = []
    if run_dir is not None:
        root = Path(run_dir)
        for p in sorted(root.rglob("metrics.json")):
            if exclude is not None and Path(exclude).resolve() in p.resolve().parents:
                continue
            found.append((str(p.relative_to(root)), json.loads(p.read_text())))
    for item in extra:
        if isinstance(item, dict):
            found.append(("(given)", item))
        else:
            p = Path(item)
            if not p.is_file():
                raise FileNotFoundError(f"`metrics` file {str(p)!r} does not exist.")
            found.append((str(p), json.loads(p.read_text())))
    out = []
    for source, m in found:
        values = {}
        for k, v in m.items():
            if not METRIC_KEYS.match(k):
                continue
            if isinstance(v, dict) and isinstance(v.get("mean"), int | float):
                v = v["mean"]
            if isinstance(v, int | float) and not isinstance(v, bool):
                values[k] = float(v)
        attacks = m.get("attacks")  # the shapes-attack protocol: {attack: {"asr": ...}}
        if isinstance(attacks, dict):
            for name, a in attacks.items():
                if isinstance(a, dict) and isinstance(a.get("asr"), int | float):
                    values[f"asr_{name}"] = float(a["asr"])
        if not values:
            continue
        seeds = m.get("seeds")
        if seeds is None and "seed" in m:
            n = m.get("n_per_class")
            seeds = f"{m['seed']}..{m['seed'] + n - 1} per class" if isinstance(n, int) else m["seed"]
        out.append(
            {
                "source": source,
                "protocol": m.get("protocol", "unknown"),
                "detector": m.get("detector"),
                "seeds": seeds,
                "erase": m.get("erase"),
                "values": values,
            }
        )
    return out


def _metric_name(key: str) -> str:
    if key == "pre_attack_rate":
        return "pre-attack rate"
    head, _, rest = key.partition("_")
    name = METRIC_NAMES.get(head, head.upper())
    return f"{name}-{rest}" if rest.isdigit() else (f"{name} ({rest})" if rest else name)


def eval_results(metrics: list[dict[str, Any]], model_name: str) -> list[Any]:
    """huggingface_hub ``EvalResult``s, one per metric value, each with its protocol, detector and seeds."""

    results = []
    for m in metrics:
        det = m.get("detector")
        det_text = f"{det.get('name')} {det.get('version')}" if isinstance(det, dict) else (str(det) if det else None)
        for key, value in sorted(m["values"].items()):
            results.append(
                EvalResult(
                    task_type="text-to-image",
                    task_name="concept erasure",
                    dataset_type=f"erasekit/{m['protocol']}",
                    dataset_name=f"EraseKit {m['protocol']}",
                    dataset_args={"seeds": str(m["seeds"]), "erased": m.get("erase"), "source": m["source"]},
                    metric_type=key,
                    metric_name=_metric_name(key),
                    metric_value=round(value, 6),
                    metric_config=det_text,
                )
            )
    return results


def _hub_id(edit: Edit) -> str | None:
    """The base's hub id (``None`` for a local folder or the bundled miniature)."""

    bid = edit.base.get("id")
    if not bid or bid in BUNDLED or edit.base.get("path") or bid == "unknown":
        return None
    return bid


def _base_license(edit: Edit) -> str | None:

    base = base_folder(edit)
    if base is not None and (base / CARD).exists():
        try:
            return ModelCard.load(base / CARD).data.license
        except Exception:  # a README without card metadata
            return None
    return None


USAGE = {
    "diffusers": 'from diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained("{repo}")',
    "unet": 'from diffusers import StableDiffusionPipeline, UNet2DConditionModel\n\nunet = UNet2DConditionModel.from_pretrained("{repo}")\npipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)',
    "lora": 'from diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{repo}")  # peft backend',
    "kohya": 'A1111 / ComfyUI: copy `{file}` into models/Lora and prompt with `<lora:{stem}:1>`.\ndiffusers: `pipe.load_lora_weights("{repo}", weight_name="{file}")`',
}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Use it

```python
{{ usage }}
```

## The edit

- method: `{{ method }}` (preset `{{ preset }}`), made with EraseKit {{ version }} on {{ created }}
- erased: {{ erase }}; preserved: {{ preserve }}; anchor: {{ anchor }}
- base model: {{ base_text }} (weight fingerprint `{{ fingerprint }}`; the export refuses another base)
- changed tensors: {{ n_tensors }}

{{ lora_text }}

## Evaluation

{{ eval_text }}

## Configuration

```json
{{ config_json }}
```
"""


def model_card(
    edit: Edit,
    format: str,
    *,
    plan: LoraPlan | None = None,
    metrics: list[dict[str, Any]] = (),
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    kohya_file: str | None = None,
):
    """A huggingface_hub ``ModelCard`` (``ModelCardData``: base_model, license, tags, ``EvalResult``s
    from ``metrics``) with the edit's request, config and base fingerprint."""

    name = model_name or f"{edit.method.upper()}: {', '.join(edit.request.erase)} erased"
    hub = _hub_id(edit)
    lic = license or _base_license(edit) or "other"
    tags = ["erasekit", "concept-erasure", f"erasekit-{edit.method}", "stable-diffusion", "text-to-image"]
    if format in ("lora", "kohya"):
        tags += ["lora"]
    results = eval_results(list(metrics), name) if metrics else None
    data = ModelCardData(
        base_model=hub,
        license=lic,
        license_name="see the base model's license" if lic == "other" else None,
        library_name="diffusers" if format != "kohya" else None,
        pipeline_tag="text-to-image",
        tags=tags,
        model_name=name,
        eval_results=results,
    )
    base_text = f"`{hub}`" if hub else f"`{edit.base.get('id')}` (local; not on the hub)"
    if plan is not None:
        rep = plan.report()
        rows = "\n".join(
            f"| `{n}` | {'x'.join(map(str, r['shape']))} | {r['rank']} | {r['numerical_rank']} | {r['rank_for_1pct']} | {r['error']:.2e} |"
            for n, r in rep["layers"].items()
        )
        lora_text = (
            "## LoRA factorisation\n\nTruncated SVD of each weight delta (alpha = rank, scale 1). Overall relative error "
            f"{rep['overall_error']:.3e}; uniform rank for <= 1% error: {rep['uniform_rank_for_1pct']}; "
            f"exact bias deltas: {len(rep['biases'])}; dropped bias deltas: {len(rep['dropped_biases'])}.\n\n"
            "| layer | shape | rank | numerical rank | rank for <= 1% | relative error |\n|---|---|---|---|---|---|\n"
            + rows
        )
    else:
        lora_text = ""
    if metrics:
        lines = ["| protocol | metric | value | detector | seeds | source |", "|---|---|---|---|---|---|"]
        for m in metrics:
            det = m.get("detector")
            det_text = f"{det.get('name')} {det.get('version')}" if isinstance(det, dict) else str(det)
            for k, v in sorted(m["values"].items()):
                lines.append(
                    f"| {m['protocol']} | {_metric_name(k)} | {v:.4g} | {det_text} | {m['seeds']} | `{m['source']}` |"
                )
        eval_text = "\n".join(lines)
    else:
        eval_text = "Not evaluated: no metrics.json in the run. Run `erasekit evaluate --edit RUN --out RUN/eval/PROTOCOL` and export again."
    file = (kohya_file or _slug(edit) + ".safetensors") if format == "kohya" else LORA_FILE
    usage = USAGE[format].format(
        repo=repo_id or "PATH/TO/THIS/FOLDER", base=hub or "PATH/TO/BASE", file=file, stem=Path(file).stem
    )
    summary = {
        "diffusers": "A Stable Diffusion pipeline with concepts erased by EraseKit.",
        "unet": "The UNet of a Stable Diffusion model with concepts erased by EraseKit.",
        "lora": "A LoRA that erases concepts from its base model (made by EraseKit from the edit's weight deltas).",
        "kohya": "A kohya-format LoRA (A1111 / ComfyUI) that erases concepts from its base model.",
    }[format]
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=name,
        summary=summary,
        usage=usage,
        method=edit.method,
        preset=edit.config.get("preset", "n/a"),
        version=edit.version,
        created=edit.created,
        erase=", ".join(edit.request.erase),
        preserve=", ".join(edit.request.preserve) or "(none given)",
        anchor=repr(edit.request.target),
        base_text=base_text,
        fingerprint=edit.base.get("fingerprint"),
        n_tensors=len(edit.tensors),
        lora_text=lora_text,
        eval_text=eval_text,
        config_json=json.dumps(edit.config, indent=2, sort_keys=True, default=str),
    )


# ------------------------------------------------------------------------------------------ hub
def push_to_hub(
    folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None, api: Any = None
) -> Any:
    """Upload an export folder to the Hugging Face hub (``HfApi.create_repo`` then ``upload_folder``)."""

    folder = Path(folder)
    if not (folder / EXPORT_META).exists():
        raise FileNotFoundError(
            f"{str(folder)!r} is not an EraseKit export (no {EXPORT_META}); run `erasekit export` first."
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"`repo_id` {repo_id!r} must look like 'user/name'.")
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    fmt = json.loads((folder / EXPORT_META).read_text())["format"]
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"EraseKit export ({fmt})")


__all__ = [
    "FORMATS",
    "ExportResult",
    "LoraPlan",
    "LowRank",
    "collect_metrics",
    "export",
    "format_report",
    "kohya_state_dict",
    "lora_state_dicts",
    "low_rank_edit",
    "model_card",
    "plan_lora",
    "push_to_hub",
    "tail_errors",
    "truncated_svd",
]
