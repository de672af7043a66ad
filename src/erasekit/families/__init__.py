"""Model families: which diffusers pipelines EraseKit supports and what each method means on each.

``family_of(pipe)`` returns the :class:`~erasekit.families.base.FamilyAdapter` of a loaded
pipeline; :func:`family_for_index` names the family of a diffusers folder from its
``model_index.json`` before anything is loaded; :func:`check_method` refuses a method that does
not apply to a family, with the reason (the README's method x family table is :data:`SUPPORT`).
"""

from __future__ import annotations

from typing import Any

from erasekit.families.base import FamilyAdapter, FamilyError
from erasekit.families.sd import SD1Adapter, SD2Adapter, is_sd2
from erasekit.families.sd3 import SD3Adapter
from erasekit.families.sdxl import SDXLAdapter

FAMILIES: dict[str, FamilyAdapter] = {a.name: a for a in (SD1Adapter(), SD2Adapter(), SDXLAdapter(), SD3Adapter())}
# diffusers pipeline class -> family (SD 1.x and 2.x share a class; told apart once loaded, see is_sd2)
PIPELINE_CLASSES: dict[str, str] = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
SUPPORTED_TEXT = (
    "StableDiffusionPipeline (SD 1.x: sd1, SD 2.x epsilon/v-prediction: sd2), StableDiffusionXLPipeline (sdxl), "
    "StableDiffusion3Pipeline (sd3)"
)

_NO_SHARED_EMBEDDING = (
    "SD3's text-stream K/V projections (add_k_proj/add_v_proj) read block-specific, timestep-modulated hidden "
    "states, so there is no single text embedding that all of them read"
)
# method -> family -> None (applies) or the reason it does not.
SUPPORT: dict[str, dict[str, str | None]] = {
    "uce": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "rece": {
        "sd1": None,
        "sd2": None,
        "sdxl": None,
        "sd3": "RECE eq. 8 derives one text embedding that regenerates the concept through every K/V projection; "
        + _NO_SHARED_EMBEDDING,
    },
    "speed": {
        "sd1": None,
        "sd2": None,
        "sdxl": None,
        "sd3": "SPEED's null space is that of the retained concepts' text embeddings, shared by every K/V projection; "
        + _NO_SHARED_EMBEDDING,
    },
    "mace": {
        "sd1": None,
        "sd2": None,
        "sdxl": "MACE's LoRA stage calls the UNet with text states only (no pooled embedding or time ids) and its "
        "attention probe is written for attn2; not routed through the family adapter yet",
        "sd3": "MACE's closed-form refinement and attention-map loss are defined on cross-attention (attn2); "
        "SD3 has joint attention only",
    },
    "esd": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "ap": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "age": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "hide": {
        "sd1": None,
        "sd2": None,
        "sdxl": "knowledge hiding learns a soft prompt in the one CLIP text encoder's token-embedding table and "
        "feeds its hidden states as prompt_embeds; SDXL conditions on two encoders and a pooled embedding that "
        "the key would have to drive jointly (not implemented)",
        "sd3": "knowledge hiding learns a soft prompt in the one CLIP text encoder's token-embedding table; SD3 "
        "conditions on three encoders and a pooled embedding (not implemented)",
    },
}


# attack -> family -> None (runs) or why not (erasekit.attacks.run_attack refuses with it)
_ONE_ENCODER = "(not implemented for several text encoders)"
ATTACK_SUPPORT: dict[str, dict[str, str | None]] = {
    "none": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "paraphrase": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    # the probes of erasekit.attacks.probes steer each family's own sampler through the adapter's
    # sampler_* methods (byte for byte the pipeline's __call__ at the neutral level)
    "noise": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "inpaint": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "completion": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "inversion": {
        "sd1": None,
        "sd2": None,
        "sdxl": "the inverted conditioning is a token sequence fed as prompt_embeds, but SDXL's UNet also reads a "
        "pooled embedding that the inversion does not produce " + _ONE_ENCODER,
        "sd3": "the inversion solves RECE eq. 8 on attn2 K/V or differentiates a UNet call; SD3 has joint attention "
        "with block-specific inputs and a transformer " + _ONE_ENCODER,
    },
    "ringabell": {
        "sd1": None,
        "sd2": None,
        "sdxl": "Ring-A-Bell's concept direction is computed with the one CLIP text encoder's token embeddings; SDXL "
        "conditions on two encoders " + _ONE_ENCODER,
        "sd3": "Ring-A-Bell's concept direction is computed with the one CLIP text encoder's token embeddings; SD3 "
        "conditions on three encoders " + _ONE_ENCODER,
    },
    "unlearndiff": {
        "sd1": None,
        "sd2": None,
        "sdxl": "UnlearnDiff optimises prompt tokens through a UNet call with text states only, without SDXL's pooled "
        "embedding and time ids " + _ONE_ENCODER,
        "sd3": "UnlearnDiff optimises prompt tokens through a UNet call; SD3's denoiser is a transformer "
        + _ONE_ENCODER,
    },
}


# real-model evaluation protocol (erasekit.eval.real_protocols) -> family -> None (runs) or why not.
# Every one runs on every family: they sample through the pipeline's own __call__ and score the
# images with detectors and CLIP/LPIPS/Inception models of their own, never the pipeline's encoders
# (tests/test_family_protocols.py runs each on each family's tiny pipeline).
PROTOCOL_SUPPORT: dict[str, dict[str, str | None]] = {
    "imagenette": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "i2p": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "artists": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
    "coco": {"sd1": None, "sd2": None, "sdxl": None, "sd3": None},
}


def _check_support(table: dict[str, dict[str, str | None]], kind: str, name: str, pipe) -> FamilyAdapter:
    """Refuse ``kind`` ``name`` on ``pipe``'s family when ``table`` gives a reason, naming family and reason."""
    fam = family_of(pipe)
    reason = table.get(name, {}).get(fam.name)
    if reason is not None:
        ok = [f for f, r in table[name].items() if r is None]
        raise FamilyError(
            f"{kind} {name!r} does not run on {fam.title} ({fam.name}): {reason}. It runs on: {', '.join(ok)}."
        )
    return fam


def check_protocol(name: str, pipe) -> FamilyAdapter:
    """Refuse evaluation protocol ``name`` on ``pipe``'s family when it does not run there (naming family
    and reason; :data:`PROTOCOL_SUPPORT`)."""
    return _check_support(PROTOCOL_SUPPORT, "Protocol", name, pipe)


def check_attack(name: str, pipe) -> FamilyAdapter:
    """Refuse attack ``name`` on ``pipe``'s family when it does not run there (naming family and reason;
    :data:`ATTACK_SUPPORT`)."""
    return _check_support(ATTACK_SUPPORT, "Attack", name, pipe)


def family_named(name: str) -> FamilyAdapter:
    """The adapter of family ``name`` (sd1, sd2, sdxl, sd3)."""
    if name not in FAMILIES:
        raise FamilyError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_for_class(class_name: str, *, what: str = "the pipeline") -> str:
    """The family of a diffusers pipeline class name, or a :class:`FamilyError` naming it and what is supported."""
    if class_name not in PIPELINE_CLASSES:
        raise FamilyError(
            f"{what} is a {class_name or 'unknown'} model, not a Stable Diffusion pipeline of a family EraseKit "
            f"supports: {SUPPORTED_TEXT}."
        )
    return PIPELINE_CLASSES[class_name]


def family_for_index(index: dict[str, Any], *, what: str = "the folder") -> str:
    """The family named by a ``model_index.json`` (its ``_class_name``); sd1 for SD 1.x *and* 2.x folders."""
    return family_for_class(str(index.get("_class_name", "")), what=what)


def family_of(pipe) -> FamilyAdapter:
    """The adapter of a loaded pipeline (recorded by ``load_pipeline``, else detected from its class)."""
    name = getattr(pipe, "_erasekit_family", None)
    if name is None:
        name = family_for_class(type(pipe).__name__, what=f"the pipeline ({type(pipe).__name__})")
        if name == "sd1" and is_sd2(pipe):
            name = "sd2"
        try:
            pipe._erasekit_family = name
        except AttributeError:  # pragma: no cover - a pipeline that refuses attributes
            pass
    return FAMILIES[name]


def method_reason(method: str, family: str) -> str | None:
    """Why ``method`` does not apply to ``family`` (None when it applies or the method is not in the table)."""
    return SUPPORT.get(method, {}).get(family)


def check_method(method: str, pipe) -> FamilyAdapter:
    """Refuse ``method`` on ``pipe``'s family when it does not apply (naming family and reason)."""
    fam = family_of(pipe)
    reason = method_reason(method, fam.name)
    if reason is not None:
        ok = [f for f, r in SUPPORT[method].items() if r is None]
        raise FamilyError(
            f"Method {method!r} does not apply to {fam.title} ({fam.name}): {reason}. It runs on: {', '.join(ok)}."
        )
    return fam


def support_table(support: dict[str, dict[str, str | None]] | None = None, what: str = "method") -> str:
    """A README x family table (markdown): :data:`SUPPORT` (methods) by default, or ``support``
    (:data:`ATTACK_SUPPORT`, :data:`PROTOCOL_SUPPORT`) with ``what`` as the first column's title."""
    fams = list(FAMILIES)
    head = f"| {what} | " + " | ".join(fams) + " |\n|---|" + "---|" * len(fams) + "\n"
    rows = []
    for m, by in (SUPPORT if support is None else support).items():
        cells = ["yes" if by.get(f) is None else "no" for f in fams]
        rows.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


__all__ = [
    "ATTACK_SUPPORT",
    "FAMILIES",
    "SUPPORT",
    "FamilyAdapter",
    "FamilyError",
    "PROTOCOL_SUPPORT",
    "check_attack",
    "check_method",
    "check_protocol",
    "family_for_class",
    "family_for_index",
    "family_named",
    "family_of",
    "method_reason",
    "support_table",
]
