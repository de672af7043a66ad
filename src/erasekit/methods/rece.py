"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), Algorithm 1.

RECE starts from the closed-form UCE edit (RECE eq. 3) and then, for ``epochs`` rounds, finds the
embedding that *still* regenerates each erased concept inside the edited model and erases it too.

**Derived embedding (eqs. 4-8).** With ``W_i^old`` the ORIGINAL model's cross-attention key/value
projections and ``W_i^new`` the CURRENT (edited) ones, summed over every ``attn2.to_k`` and
``attn2.to_v`` of the UNet (eq. 4: "W_i denotes K/V cross-attention matrices of U-Net")::

    c' = argmin_c'  sum_i ||W_i^new c' - W_i^old c||^2 + lambda ||c'||^2                 (eq. 7)
       = (lambda I + sum_i W_i^new^T W_i^new)^-1 (sum_i W_i^new^T W_i^old) c              (eq. 8)

``c'`` is what the edited model "reads" as the concept ``c``: fed to the edited UNet it
reproduces the original model's keys and values for ``c`` as closely as a single embedding can.
``lambda`` pulls ``c'`` towards 0, which by the paper's Theorem 1 limits the damage that erasing
``c'`` does to unrelated concepts (eq. 6).

**Which token embeddings.** Eq. 8 is one linear map ``M`` applied to each token embedding
independently, so we derive ``c' = M c`` for all 77 positions of each erased prompt (the authors'
code does the same); that full (77, D) embedding is what :func:`derived_prompt_embeds` returns for
generation (the paper's Fig. 5). Which of those positions are *erased*, paired with which target
positions, is ``derived_positions``:

- ``"all"`` (``authors``): all 77 derived positions, position ``i`` with position ``i`` of the
  target prompt (RECE's ``train.py`` / ``edit_model_adversarial``: the adversarial embedding and
  the target's full embedding, start token included, unshifted);
- ``"from_last_word"`` (``paper``): the positions the UCE step erased, from the prompt's last word
  token to the end, aligned with the target from *its* last word
  (:func:`erasekit.methods.uce.aligned_token_embeddings`). The paper does not say; this keeps
  UCE's slice.

**W_old at each epoch.** In eq. 3 of epoch ``t`` the weights being edited (``W^old`` of eq. 3,
which also produces the targets ``W^old c*`` and the preserved outputs) are the CURRENT weights:
the paper's eq. 6 writes ``W^new2`` as obtained "after erasing c' from W^new1", the weights after the
last epoch, and the authors' code edits the live model in place. The derivation of eq. 8, in
contrast, always compares against the ORIGINAL weights. Each epoch erases only that epoch's derived
embeddings (Algorithm 1, lines 9-15); the original concept was erased by the UCE step.

**The UCE step and the epochs have their own eq. 3 settings.** ``lamb`` / ``preserve_scale`` /
``preserve_empty`` weight every derive-erase epoch; the preliminary UCE step is a UCE config of its
own, ``uce`` (``uce.lamb`` / ``uce.preserve_scale`` / ``uce.preserve_empty``; edits saved before it
was one spelled them ``uce_lamb`` ..., and still load). The paper sets lambda_1 = lambda_2 = 0.1
everywhere (section 4, "following the implementation in [UCE]") and preserves only ``P``. The
authors' ``train.py`` instead starts from a UCE checkpoint made by UCE's own script
(``erased-...-preserve_false-...-1-1.0.pt``: lambda 0.5, ``""`` retained at preserve scale
``max(0.1, 1/#retained)`` = 1.0) and retains ``""`` in every epoch at scale 0.1
(``retain_texts = [''] + preserve_concepts`` in ``train_object.py``/``train_artists.py``; one
``' '`` per erased concept in ``train.py``). Preserved prompts enter at ``preserve_positions``
(``"all"`` 77 positions in the authors' code).

**Presets.** ``authors`` (the default; RECE's reported numbers came from its code) and ``paper``
as above; ``authors-unsafe`` / ``authors-art`` / ``authors-object`` are ``authors`` with the task
settings of :data:`RECE_PRESETS` (epochs and eq. 7's lambda; ``RECE_PRESETS`` stays usable as
keyword overrides). The paper runs 5 epochs for unsafe content with lambda 0.1 and keeps the
checkpoint after epoch 2 (Fig. 5), and 10 epochs with lambda 1e-3 for art; the stored authors'
scripts default to 10 epochs (``train.py``, ``train_artists.py``) and 5 (``train_object.py``, lambda
1e-3) and keep the best epoch by a validation rate (``train.py``: the lowest nudity rate over the UCE
checkpoint and every epoch). Keeping methods free of evaluation, every epoch's checkpoint is
recomputable from the edit (:func:`rece_checkpoint`) and :func:`select_epoch` picks one by a
validation score the caller supplies (e.g. ESR-1 on validation seeds, ``bench/rece_authors.py``).

Example::

    edit = erasekit.erase(pipe, EraseRequest(["fire"]), method="rece", epochs=3)
    emb0 = derived_prompt_embeds(pipe, edit, epoch=0)          # (1, 77, D)
    generate_images(edited_pipe, None, [0], prompt_embeds=emb0)  # does the concept come back?
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from erasekit.edit import Edit, EraseRequest
from erasekit.methods.base import register
from erasekit.methods.closed_form import (
    PromptEmbeddings,
    apply_factor,
    gram_residual,
    kv_gram,
    shared_derivation_matrix,
    uce_factor,
)
from erasekit.methods.uce import (
    Positions,
    UCEConfig,
    check_positions,
    closed_form_edit,
    uce_embeddings,
    uce_prompts,
)
from erasekit.options import compose, config_from_record
from erasekit.pipeline import base_info, cross_attention_modules

DERIVED_KEY = "rece.derived"

# Task settings (epochs, lambda of eq. 7), usable as keyword overrides
# (``erasekit.erase(..., method="rece", **RECE_PRESETS[task])``) and registered as presets
# ``authors-<task>`` (the authors preset plus these values).
RECE_PRESETS: dict[str, dict[str, float | int]] = {
    "unsafe": {"epochs": 3, "lamb_derive": 0.1},  # paper: lambda 0.1, checkpoint after epoch 2
    "art": {"epochs": 1, "lamb_derive": 1e-3},  # seeds' reading of the authors' runs; the paper reports 10 epochs
    "object": {"epochs": 5, "lamb_derive": 1e-3},  # train_object.py defaults (--epochs 5, --regular_scale 1e-3)
}
# What the paper preset changes from the (authors) defaults.
PAPER_VALUES: dict[str, object] = {
    "uce": {"lamb": 0.1, "preserve_scale": 0.1, "preserve_empty": False},
    "preserve_empty": False,
    "derived_positions": "from_last_word",
    "preserve_positions": "from_last_word",
}


SHARED_WITH_UCE_STEP = ("erase_scale", "preserve_positions", "templates", "projections")
"""RECE options the UCE step and the epochs share: RECE's own, mirrored into ``RECEConfig.uce``."""


@dataclass
class RECEConfig:
    """RECE hyperparameters; the defaults are the ``authors`` preset (module docstring; task presets in
    :data:`RECE_PRESETS`).

    The preliminary UCE step (Algorithm 1, line 6) is a whole :class:`~erasekit.methods.uce.UCEConfig`,
    ``uce`` (``--set uce.lamb=0.1``), except for the settings the UCE step and the epochs share
    (:data:`SHARED_WITH_UCE_STEP`: erase scale, preserve positions, templates, projections), which are
    RECE's own and copied into ``uce``; a different value set in ``uce`` for one of those is an error.
    """

    RENAMED_OPTIONS: ClassVar[dict[str, str]] = {
        "uce_lamb": "uce.lamb",
        "uce_preserve_scale": "uce.preserve_scale",
        "uce_preserve_empty": "uce.preserve_empty",
    }

    uce: UCEConfig = field(
        default_factory=UCEConfig,
        metadata={
            "help": "the preliminary UCE step (Algorithm 1, line 6), UCE's own options (authors: UCE's defaults, "
            "lamb 0.5, preserve_scale None = max(0.1, 1/#retained), '' preserved; paper: lamb = preserve_scale = 0.1, "
            "'' not preserved)"
        },
    )
    epochs: int = field(default=3, metadata={"help": "T: derive-and-erase rounds after the UCE step (>= 1)"})
    lamb_derive: float = field(
        default=0.1, metadata={"help": "lambda of eq. 7: pulls the derived embedding to 0 (0.1 unsafe, 1e-3 art)"}
    )
    erase_scale: float = field(
        default=1.0, metadata={"help": "weight of the erase terms of eq. 3 (UCE step and epochs)"}
    )
    preserve_scale: float = field(
        default=0.1, metadata={"help": "lambda_1 of eq. 2/3 in the epochs: weight of the preserve terms"}
    )
    lamb: float = field(
        default=0.1, metadata={"help": "lambda_2 of eq. 2/3 in the epochs: weight of ||W - W_old||_F^2"}
    )
    preserve_empty: bool = field(
        default=True, metadata={"help": "preserve the empty prompt in every epoch (as RECE's code does)"}
    )
    derived_positions: Positions = field(
        default="all",
        metadata={"help": "positions of the derived embeddings erased: all 77, i with i (authors) or from_last_word"},
    )
    preserve_positions: Positions = field(
        default="all",
        metadata={
            "help": "positions of the preserved prompts: all 77 (authors) or from_last_word (UCE step and epochs)"
        },
    )
    templates: list[str] = field(
        default_factory=lambda: ["{}"],
        metadata={"help": "prompt templates each concept is expanded with, e.g. ['{}', 'a picture of a {}']"},
    )
    projections: tuple[str, ...] = field(
        default=("to_k", "to_v"), metadata={"help": "cross-attention projections to edit (UCE step and epochs)"}
    )

    def __post_init__(self) -> None:
        compose(self, "RECE")  # `uce` from a saved config's dict or a spec's nested table
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0:
            raise ValueError(
                f"RECE `epochs` must be an integer >= 1, got {self.epochs!r}; for the UCE step alone use method='uce'."
            )
        if self.lamb_derive < 0:
            raise ValueError(f"RECE `lamb_derive` (lambda of eq. 7) must be >= 0, got {self.lamb_derive}.")
        check_positions("derived_positions", self.derived_positions)
        self.projections = tuple(self.projections)
        default = UCEConfig()
        for name in SHARED_WITH_UCE_STEP:
            mine, theirs = _plain(getattr(self, name)), _plain(getattr(self.uce, name))
            if theirs != mine and theirs != _plain(getattr(default, name)):
                raise ValueError(
                    f"RECE `uce.{name}` ({theirs!r}) differs from RECE's `{name}` ({mine!r}): the UCE step and the "
                    f"epochs share it. Set `{name}` instead of `uce.{name}`."
                )
        self.uce = replace(self.uce, **{name: getattr(self, name) for name in SHARED_WITH_UCE_STEP})
        self.epoch_config()  # validates the epochs' eq. 3 settings with UCE's own checks

    def uce_config(self) -> UCEConfig:
        """The eq. 3 settings of the preliminary UCE step (Algorithm 1, line 6)."""
        return self.uce

    def epoch_config(self) -> UCEConfig:
        """The eq. 3 settings of every derive-erase epoch (Algorithm 1, lines 14-16): the UCE step's
        shared settings with the epochs' own weights and the derived embeddings' positions."""
        return replace(
            self.uce,
            preserve_scale=self.preserve_scale,
            lamb=self.lamb,
            preserve_empty=self.preserve_empty,
            erase_positions=self.derived_positions,
        )


def _plain(v: object) -> object:
    return list(v) if isinstance(v, (list, tuple)) else v


def derivation_matrix(
    w_old_list: Sequence[torch.Tensor], w_new_list: Sequence[torch.Tensor], lamb: float
) -> torch.Tensor:
    """The (D, D) matrix ``M`` of RECE eq. 8, ``c' = M c``, in float64:
    ``M = (lamb I + sum_i W_new_i^T W_new_i)^-1 (sum_i W_new_i^T W_old_i)``."""
    if len(w_old_list) != len(w_new_list) or not w_old_list:
        raise ValueError(
            f"`w_old_list` and `w_new_list` must be non-empty and of equal length, got {len(w_old_list)} and {len(w_new_list)}."
        )
    if lamb < 0:
        raise ValueError(f"`lamb` (lambda of RECE eq. 7) must be >= 0, got {lamb}.")
    d = w_new_list[0].shape[1]
    dev = w_new_list[0].device
    a = lamb * torch.eye(d, dtype=torch.float64, device=dev)
    b = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for i, (wo, wn) in enumerate(zip(w_old_list, w_new_list, strict=True)):
        if wo.shape != wn.shape or wn.shape[1] != d:
            raise ValueError(
                f"Matrix pair {i} has shapes {tuple(wo.shape)} and {tuple(wn.shape)}; expected equal (out, {d})."
            )
        wn64, wo64 = wn.detach().double(), wo.detach().to(dev).double()
        a += wn64.T @ wn64
        b += wn64.T @ wo64
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError as e:  # singular: lamb = 0 and the stacked W_new do not span the embedding space
        raise ValueError(
            "sum_i W_new_i^T W_new_i is singular, so eq. 5 has no unique solution; use `lamb` > 0 (eq. 8)."
        ) from e


def derive_embedding(
    w_old_list: Sequence[torch.Tensor], w_new_list: Sequence[torch.Tensor], c: torch.Tensor, lamb: float
) -> torch.Tensor:
    """RECE eq. 8: the embedding ``c'`` minimising ``sum_i ||W_new_i c' - W_old_i c||^2 + lamb ||c'||^2`` (eq. 7).

    ``c`` is (..., D): one embedding per row (e.g. (77, D) token embeddings or (B, 77, D) prompts),
    each mapped independently; the result has ``c``'s shape and dtype. Solved in float64.
    """
    m = derivation_matrix(w_old_list, w_new_list, lamb)
    if c.shape[-1] != m.shape[0]:
        raise ValueError(f"`c` has embedding size {c.shape[-1]}, but the K/V matrices take {m.shape[0]}.")
    return (c.detach().to(m.device).double() @ m.T).to(dtype=c.dtype, device=c.device)


def kv_parameter_names(unet) -> list[str]:
    """Names (``unet.<module>.to_k.weight`` / ``to_v``) of every cross-attention key and value projection."""
    return [f"unet.{n}.{p}.weight" for n in cross_attention_modules(unet) for p in ("to_k", "to_v")]


def kv_weights(unet) -> dict[str, torch.Tensor]:
    """The cross-attention K/V weights of ``unet`` by parameter name (detached views, not copies)."""
    return {
        f"unet.{n}.{p}.weight": getattr(m, p).weight.detach()
        for n, m in cross_attention_modules(unet).items()
        for p in ("to_k", "to_v")
    }


def kv_residual(
    w_old: dict[str, torch.Tensor], w_new: dict[str, torch.Tensor], c_in: torch.Tensor, c_new: torch.Tensor
) -> float:
    """Relative fit of RECE eq. 4: ``sum_i ||W_new_i c_new - W_old_i c_in||^2 / sum_i ||W_old_i c_in||^2``
    over the rows of ``c_in``/``c_new`` (..., D) and the matrices named in ``w_old`` (0 = exact)."""
    num = den = 0.0
    for k, wo in w_old.items():
        ref = c_in.to(wo.device).double() @ wo.double().T
        num += float(((c_new.to(wo.device).double() @ w_new[k].to(wo.device).double().T - ref) ** 2).sum())
        den += float((ref**2).sum())
    return num / max(den, 1e-30)


def _run(pipe, request: EraseRequest, config: RECEConfig, epochs: int, progress: bool) -> Edit:
    """Algorithm 1 with ``epochs`` derive-erase rounds (0 = the UCE step alone).

    Every epoch's eq. 3 edit is ``W <- W M_t`` with one (d, d) factor ``M_t`` for all projections
    (:func:`erasekit.methods.closed_form.uce_factor`), so the weights after ``t`` rounds are
    ``W_orig M_0 M_1 ... M_t``: the running product is kept in float64, eq. 8 is evaluated from
    it and the Gram matrix of the original K/V (:func:`~erasekit.methods.closed_form.shared_derivation_matrix`),
    and the product is applied to the weights once at the end (float64, then cast). With no epoch
    the edit is UCE's own (:func:`erasekit.methods.uce.closed_form_edit`), bit for bit.
    """
    t0, p0 = time.perf_counter(), time.process_time()
    uce_cfg, epoch_cfg = config.uce_config(), config.epoch_config()
    # 1. Text embeddings of E and P (Algorithm 1, line 3), each distinct prompt encoded once.
    erased, targets, preserved_uce = uce_prompts(request, uce_cfg)
    _, _, preserved_epoch = uce_prompts(request, epoch_cfg)
    table = PromptEmbeddings(pipe, erased + targets + preserved_uce)  # what UCE encodes, in UCE's order
    c_in, c_tgt, c_pres_uce = uce_embeddings(table, erased, targets, preserved_uce, uce_cfg)
    table.add(preserved_epoch)
    d = c_in.shape[1]
    c_pres_epoch = table.rows(preserved_epoch, config.preserve_positions, d)
    full = table.full(erased).double()  # (n, 77, D): the erased prompts, all positions
    # the positions of each epoch's erase pairs: the source rows c (mapped to c' = M c) and the targets c*
    c_src, c_der_tgt = table.pairs(erased, targets, config.derived_positions)
    c_src = c_src.double()
    t_text, p_text = time.perf_counter() - t0, time.process_time() - p0
    # the original K/V (line 4): eq. 8 reads every to_k/to_v; the edit changes `projections`
    w_orig = kv_weights(pipe.unet)
    edited = [k for k in w_orig if k.rsplit(".", 2)[-2] in config.projections]
    g_edit = kv_gram({k: w_orig[k] for k in edited})
    rest = [k for k in w_orig if k not in edited]
    g_rest = kv_gram({k: w_orig[k] for k in rest}) if rest else None

    # 2. Preliminary erasing with UCE (line 6): W_orig M_0.
    uce_scale = uce_cfg.resolved_preserve_scale(len(preserved_uce))
    m_total = uce_factor(
        c_in, c_tgt, c_pres_uce, erase_scale=uce_cfg.erase_scale, preserve_scale=uce_scale, lamb=uce_cfg.lamb
    )
    t_uce = time.perf_counter() - t0

    derived, log = [], []
    # 3. Derive (lines 9-12) and erase (lines 14-16), `epochs` times; then one probe derivation.
    for epoch in tqdm(range(epochs + 1), desc="rece epochs", disable=not progress, unit="epoch"):
        m = shared_derivation_matrix(g_edit, m_total, config.lamb_derive, g_rest)
        derived.append((full @ m.T).float())  # (n, 77, D)
        c_der = c_src @ m.T  # the same map on the positions this epoch erases (float64)
        log.append(
            {
                "epoch": epoch,
                "erased": epoch < epochs,
                "residual_derived": gram_residual(g_edit, m_total, c_src, c_der, g_rest),
                "residual_concept": gram_residual(g_edit, m_total, c_src, c_src, g_rest),
                "derived_norm_ratio": float(c_der.norm() / c_src.norm().clamp_min(1e-30)),
            }
        )
        if epoch == epochs:
            break
        m_total = m_total @ uce_factor(
            c_der,
            c_der_tgt,
            c_pres_epoch,
            erase_scale=epoch_cfg.erase_scale,
            preserve_scale=float(epoch_cfg.preserve_scale),
            lamb=epoch_cfg.lamb,
        )
    if epochs == 0:  # the UCE step alone: UCE's own edit (low-rank form when the erased rows are few)
        current = closed_form_edit(pipe, c_in, c_tgt, c_pres_uce, uce_cfg, preserve_scale=uce_scale)
    else:
        current = apply_factor({k: w_orig[k] for k in edited}, m_total, dtype=torch.float64)

    seconds = time.perf_counter() - t0
    return Edit(
        tensors=current,
        method="rece",
        config={**asdict(config), "epochs": epochs},
        request=request,
        base=dict(base_info(pipe)),
        trace={
            "erase_prompts": erased,
            "target_prompts": targets,
            "preserve_prompts": {"uce": preserved_uce, "epochs": preserved_epoch},
            "uce_preserve_scale": uce_scale,
            "derived": {
                "aux_key": DERIVED_KEY,
                "shape": "(epochs + 1, n_erase_prompts, 77, D)",
                "note": "epoch t was derived from the model after t rounds (0 = after UCE) and erased in round t; "
                "the last one is derived from the final model and not erased (a probe).",
            },
            "epochs_log": log,
            "seconds": {
                "text": round(t_text, 4),
                "uce": round(t_uce, 4),
                "closed_form": round(seconds - t_text, 4),
                "total": round(seconds, 4),
                "text_cpu": round(p_text, 4),
                "closed_form_cpu": round(time.process_time() - p0 - p_text, 4),
            },
        },
        aux={DERIVED_KEY: torch.stack(derived).contiguous()},
    )


def _presets() -> dict[str, tuple[str, dict]]:
    table = {
        "paper": (
            "RECE paper section 4 / Algorithm 1: lambda_1 = lambda_2 = 0.1 in the UCE step too, only P preserved, "
            "UCE's from-last-word slice for the derived embeddings",
            dict(PAPER_VALUES),
        ),
        "authors": (
            "RECE's code: the UCE step as UCE's script (lambda 0.5, '' at scale max(0.1, 1/#retained)), '' kept in "
            "every epoch, all 77 derived positions paired unshifted; the default: the paper's numbers came from it",
            {},
        ),
    }
    for task, values in RECE_PRESETS.items():
        table[f"authors-{task}"] = (f"authors, with the {task} settings {values}", dict(values))
    return table


@register(
    "rece",
    RECEConfig,
    "RECE: UCE, then derive (eq. 8) and erase the embeddings that still regenerate the concept",
    presets=_presets(),
    default_preset="authors",
)
@torch.no_grad()
def erase_rece(pipe, request: EraseRequest, config: RECEConfig, *, generator=None, progress: bool = True) -> Edit:
    """Erase ``request.erase`` with RECE (Algorithm 1; eqs. 3 and 8); the pipeline is left unchanged.

    The ``authors`` preset (the default) departs from the paper in the UCE step's lambda and preserve
    scale, in keeping ``""`` and in the erased token positions (module docstring, with the reasons).

    Closed form throughout, so ``generator`` is unused and the result is deterministic. The edit
    keeps every epoch's derived embeddings in ``edit.aux`` (see :func:`derived_prompt_embeds`).
    """
    return _run(pipe, request, config, config.epochs, progress)


def _check_rece(edit: Edit) -> torch.Tensor:
    if edit.method != "rece" or DERIVED_KEY not in edit.aux:
        raise ValueError(
            f"Expected an edit made by method 'rece' (with derived embeddings), got method {edit.method!r}."
        )
    return edit.aux[DERIVED_KEY]


def derived_epochs(edit: Edit) -> int:
    """How many derived embeddings a RECE edit keeps per erased prompt: ``epochs + 1`` (epoch ``t`` for
    ``t`` in ``0 .. epochs``, see :func:`derived_prompt_embeds`); another method's edit is an error."""
    return int(_check_rece(edit).shape[0])


def derived_prompt_embeds(pipe, edit: Edit, epoch: int, concept: int | str = 0) -> torch.Tensor:
    """The derived embedding c' (RECE eq. 8) of epoch ``epoch`` as ``prompt_embeds`` (1, 77, D).

    Epoch ``t`` < ``epochs`` was derived from the model after ``t`` rounds (0 = right after UCE) and
    erased in round ``t``; epoch ``epochs`` was derived from the final model (never erased). Pass
    the result to ``erasekit.eval.generate.generate_images(pipe, None, seeds, prompt_embeds=...)``
    (one row per seed: ``.expand(len(seeds), -1, -1)``) to see what the model makes of it (Fig. 5).
    ``concept`` selects the erased prompt: an index into ``edit.trace["erase_prompts"]``, the prompt
    itself, or an erased concept (its first template).
    """
    table = _check_rece(edit)
    n_epochs = table.shape[0]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < n_epochs:
        raise ValueError(f"`epoch` must be an integer in [0, {n_epochs - 1}] for this edit, got {epoch!r}.")
    prompts = list(edit.trace.get("erase_prompts", []))
    if isinstance(concept, str):
        if concept in prompts:
            idx = prompts.index(concept)
        elif concept in edit.request.erase:
            idx = edit.request.erase.index(concept) * (len(prompts) // len(edit.request.erase))
        else:
            raise ValueError(
                f"`concept` {concept!r} is not among the erased prompts {prompts} or concepts {edit.request.erase}."
            )
    else:
        idx = int(concept)
        if not 0 <= idx < table.shape[1]:
            raise ValueError(f"`concept` index must be in [0, {table.shape[1] - 1}], got {concept}.")
    edit.check_base(pipe)
    return table[epoch, idx : idx + 1].to(device=pipe.unet.device, dtype=pipe.unet.dtype)


def rece_checkpoint(pipe, edit: Edit, epoch: int, *, progress: bool = False) -> Edit:
    """The edit after ``epoch`` rounds of ``edit`` (0 = its UCE step alone), recomputed in closed form.

    The paper picks the checkpoint from the derived embeddings' images (section 4.5: "we select the
    checkpoint after epoch 2"); this returns it without re-running the whole search. The recomputed
    derived embeddings are checked against the stored ones (same base model, same maths).
    """
    table = _check_rece(edit)
    total = table.shape[0] - 1
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= total:
        raise ValueError(f"`epoch` must be an integer in [0, {total}] for this edit, got {epoch!r}.")
    edit.check_base(pipe)
    cfg = config_from_record(RECEConfig, {**edit.config, "epochs": max(epoch, 1)})  # also edits saved with uce_lamb ...
    out = _run(pipe, edit.request, cfg, epoch, progress)
    mine = out.aux[DERIVED_KEY]
    if not torch.allclose(mine, table[: epoch + 1].to(mine), rtol=1e-4, atol=1e-5):
        raise ValueError(
            "Recomputed derived embeddings differ from the edit's: pass the unedited base pipeline (not one with an "
            "edit applied), or the edit was made by another erasekit version."
        )
    return replace(out, trace={**out.trace, "checkpoint_of": {"epochs": total, "created": edit.created}})


def select_epoch(
    pipe, edit: Edit, score: Callable[[Edit], float], *, progress: bool = False
) -> tuple[Edit, list[float]]:
    """The checkpoint of ``edit`` with the highest validation ``score``, and every epoch's score.

    The authors' ``train.py`` validates the UCE checkpoint and the model after every epoch on a
    held-out prompt set and keeps the one with the lowest detection rate of the erased concept (the
    paper picks "the checkpoint after epoch 2" from its Fig. 5 the same way). Methods do not evaluate,
    so the caller passes ``score(checkpoint) -> float`` (higher is better, e.g. ESR-1 of a validation
    prompt set with the protocols' detector; ``bench/rece_authors.py`` builds one). Epochs 0 (the UCE
    step) to ``epochs`` are scored with :func:`rece_checkpoint`; ties go to the earliest epoch (fewest
    edits). Unlike ``train.py`` the unedited model is not a candidate: an erasure is always returned.
    The chosen edit's trace records ``selected_epoch`` and ``validation_scores``.
    """
    table = _check_rece(edit)
    scores, checkpoints = [], []
    for t in range(table.shape[0]):
        ck = rece_checkpoint(pipe, edit, t, progress=progress)
        checkpoints.append(ck)
        scores.append(float(score(ck)))
    best = max(range(len(scores)), key=lambda t: (scores[t], -t))
    chosen = checkpoints[best]
    return replace(chosen, trace={**chosen.trace, "selected_epoch": best, "validation_scores": scores}), scores
