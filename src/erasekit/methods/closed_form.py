"""Closed forms at the speed of their maths: one factorisation per edit, shared by every K/V projection.

Every cross-attention key/value projection of a Stable Diffusion UNet reads the same text
embeddings ``c`` (768-d for SD 1.x). The closed forms of UCE, RECE and SPEED therefore all have
the shape ``W_new = W_old M`` (or ``W_old + W_old N``) with ONE (d, d) matrix ``M`` for all 32
projections:

* **UCE** (RECE paper eq. 3)::

      W = W_old (s_e sum c_i* c_i^T + s_p sum c_j c_j^T + lam I)(s_e sum c_i c_i^T + s_p sum c_j c_j^T + lam I)^-1
        = W_old M,   M = L R^-1

  so one Cholesky factorisation of the symmetric positive definite ``R`` (lam > 0) and one
  triangular solve give ``M``; each projection then costs one (out, d) x (d, d) matmul instead of
  its own (d, d) solve (:func:`uce_factor`, :func:`apply_factor`, :func:`uce_edit_weights`,
  :func:`shared_closed_form_edit`, which returns exactly what :func:`erasekit.methods.uce.closed_form_edit`
  returns). On SD3 each joint block's ``add_k_proj``/``add_v_proj`` read their own inputs, so the
  factor is shared per block (:func:`erasekit.families.closed_forms.per_block_uce` with
  :func:`uce_edit_weights`).
* **SPEED** (null-space constrained edit, Li et al. 2025; see :mod:`erasekit.methods.speed`):
  ``W_new = W + W N`` with ``N`` from :func:`speed_factor`; ``N`` is shared when the retained set
  (and so the projector ``P``) is shared.
* **MACE**'s LoRA fusion (Lu et al., CVPR 2024, its multi-LoRA fusion) is per-projection (each LoRA-tuned target
  differs), but the right-hand Gram matrix is shared: :func:`fusion_closed_form`.

Text encoding is the other cost: :func:`encode_unique` encodes each distinct prompt once, in
batches, and :func:`aligned_embeddings` is UCE's token alignment on top of it.

**Numerics.** Gram sums, the factorisation and the products run in float64: ``R`` is symmetric
positive definite for lam > 0 and is factored by Cholesky (``torch.linalg.cholesky_ex``, then
``cholesky_solve``; never an explicit inverse), and ``W M`` is formed in float64 before the one
cast back to the weight's dtype. (Casting ``M`` to float32 first cost up to 8e-6 per weight in
RECE's 2-epoch official-port test at lambda 1e-3, against 9e-7 today.) RECE composes its epochs'
factors ``M = M_0 M_1 ...`` in float64 and applies the product once
(:mod:`erasekit.methods.rece`), so no float32 rounding enters between epochs.

This module registers no method: UCE (:func:`erasekit.methods.uce.closed_form_edit`), RECE, SPEED
and MACE call it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from erasekit.pipeline import cross_attention_modules, encode_prompts, last_token_index


# ------------------------------------------------------------------------------------- text side
def check_retained_prompts(erase: Sequence[str], retained_prompts: Sequence[str], why: str) -> None:
    """Refuse a retained (preserved) prompt that names an erased concept (whole word, any case): the
    closed form would have to both move and keep its keys. ``why`` says what the method does with
    retained keys; the error names the concept, the prompts and the fix."""
    for c in erase:
        pat = re.compile(r"\b" + re.escape(c.lower()) + r"\b")
        hits = [p for p in retained_prompts if pat.search(p.lower())]
        if hits:
            raise ValueError(
                f"The retained set contains the erased concept {c!r} (in {list(hits[:3])}); {why}. "
                "Remove those prompts from `preserve`."
            )


@torch.no_grad()
def encode_unique(pipe, prompts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Text-encoder outputs (len(prompts), 77, D) for ``prompts``, each distinct prompt encoded once.

    Prompts are deduplicated (order kept), encoded ``batch_size`` at a time, then scattered back;
    the result equals :func:`erasekit.pipeline.encode_prompts` up to batched-kernel float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: give at least one prompt to encode.")
    unique = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(unique)}
    chunks = [encode_prompts(pipe, unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    table = torch.cat(chunks)
    return table[torch.tensor([where[p] for p in prompts], device=table.device)]


def aligned_embeddings(
    pipe, sources: Sequence[str], targets: Sequence[str], *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`erasekit.methods.uce.aligned_token_embeddings` with one deduplicated, batched encode.

    Token embeddings of each source and its target from each one's last word token to the end of
    the padded sequence, cut to equal length and concatenated: (n, D) each, float32.
    """
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets):
        raise ValueError(f"`sources` and `targets` must pair up, got {len(sources)} and {len(targets)} prompts.")
    emb = encode_unique(pipe, sources + targets, batch_size=batch_size)
    emb_s, emb_t = emb[: len(sources)], emb[len(sources) :]
    idx = last_token_index(pipe, list(dict.fromkeys(sources + targets)))
    pos = dict(zip(dict.fromkeys(sources + targets), idx, strict=True))
    length = emb.shape[1]
    xs, ys = [], []
    for k, (s, t) in enumerate(zip(sources, targets, strict=True)):
        i_s, i_t = pos[s], pos[t]
        n = length - max(i_s, i_t)
        xs.append(emb_s[k, i_s : i_s + n])
        ys.append(emb_t[k, i_t : i_t + n])
    return torch.cat(xs).float(), torch.cat(ys).float()


def last_subject_embeddings(pipe, prompts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """The embedding of each prompt's last word token (the "last subject token" SPEED edits): (n, D)."""
    emb = encode_unique(pipe, prompts, batch_size=batch_size)
    idx = torch.tensor(last_token_index(pipe, list(prompts)), device=emb.device)
    return emb[torch.arange(len(idx), device=emb.device), idx].float()


class PromptEmbeddings:
    """Text-encoder outputs of a set of prompts, each distinct prompt encoded once, in batches.

    ``PromptEmbeddings(pipe, prompts)`` encodes the distinct ``prompts`` (order kept) ``batch_size``
    at a time; :meth:`add` encodes only prompts not seen yet (rows already held never change, so
    what was read from the table before stays valid). :meth:`pairs` and :meth:`rows` cut UCE's token
    positions out of the table (:func:`erasekit.methods.uce.aligned_token_embeddings` semantics):

    * ``"from_last_word"``: each prompt from its last word token to the end of the padded sequence
      (a source and its target cut to equal length, position ``k`` after each one's last word
      paired);
    * ``"all"``: all 77 positions, ``i`` with ``i``.
    """

    def __init__(self, pipe, prompts: Sequence[str] = (), *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.pipe, self.batch_size = pipe, batch_size
        self.emb: dict[str, torch.Tensor] = {}
        self.last: dict[str, int] = {}
        self.add(prompts)

    @torch.no_grad()
    def add(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Encode the prompts of ``prompts`` not in the table yet; returns ``self``."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.emb]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            out = encode_prompts(self.pipe, chunk).float()
            for p, e, k in zip(chunk, out, last_token_index(self.pipe, chunk), strict=True):
                self.emb[p], self.last[p] = e, k
        return self

    def _get(self, prompt: str) -> torch.Tensor:
        if prompt not in self.emb:
            raise KeyError(f"Prompt {prompt!r} was not encoded: add it to the table first (PromptEmbeddings.add).")
        return self.emb[prompt]

    def full(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, 77, D) embeddings of ``prompts``, float32."""
        return torch.stack([self._get(p) for p in prompts])

    def pairs(
        self, sources: Sequence[str], targets: Sequence[str], positions: str = "from_last_word"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-stacked ``(c_i, c_i*)`` of each source and its target at ``positions``: (n, D) each, float32."""
        sources, targets = list(sources), list(targets)
        if len(sources) != len(targets):
            raise ValueError(f"`sources` and `targets` must pair up, got {len(sources)} and {len(targets)} prompts.")
        if positions not in ("from_last_word", "all"):
            raise ValueError(f"`positions` must be one of from_last_word, all, got {positions!r}.")
        xs, ys = [], []
        for s, t in zip(sources, targets, strict=True):
            es, et = self._get(s), self._get(t)
            if positions == "all":
                xs.append(es)
                ys.append(et)
                continue
            i_s, i_t = self.last[s], self.last[t]
            n = es.shape[0] - max(i_s, i_t)
            xs.append(es[i_s : i_s + n])
            ys.append(et[i_t : i_t + n])
        if not xs:
            d = self.pipe.text_encoder.config.hidden_size
            return torch.zeros((0, d)), torch.zeros((0, d))
        return torch.cat(xs), torch.cat(ys)

    def rows(self, prompts: Sequence[str], positions: str, dim: int) -> torch.Tensor:
        """The preserved vectors ``c_j`` of ``prompts`` at ``positions`` (each prompt paired with itself): (m, dim)."""
        if not prompts:
            return torch.zeros((0, dim))
        return self.pairs(prompts, prompts, positions)[0]


# ------------------------------------------------------------------------------------- UCE / RECE
def gram(x: torch.Tensor, y: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum_i y_i x_i^T`` = ``y^T x`` for row-stacked vectors (n, d) -> (d, d) (``y`` defaults to ``x``)."""
    x = x.to(dtype)
    return (x if y is None else y.to(dtype)).T @ x


def uce_factor(
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    gram_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The (d, d) matrix ``M`` of UCE's minimiser ``W = W_old M`` (RECE eq. 3), in float64.

    ``M = L R^-1`` with ``L = s_e C*^T C + s_p Cp^T Cp + lam I`` and ``R = s_e C^T C + s_p Cp^T Cp
    + lam I`` (rows of ``erase_in`` = c_i, of ``erase_target`` = c_i*, of ``preserve`` = c_j). The
    Gram sums run in ``gram_dtype`` and the solve in float64. (float32 Gram sums are ~2x faster but
    their ~1e-7 rounding is amplified by cond(R), ~1e4 for CLIP keys: 1e-4 errors in W, so float64
    is the default.) ``R`` is factored once (Cholesky when lam > 0, LU otherwise). This is the same maths as
    :func:`erasekit.methods.uce.uce_closed_form` applied to ``W_old = I``.
    """
    if erase_in.shape != erase_target.shape:
        raise ValueError(
            f"`erase_in` and `erase_target` must have the same shape, got {tuple(erase_in.shape)} and "
            f"{tuple(erase_target.shape)}."
        )
    if lamb < 0 or erase_scale < 0 or preserve_scale < 0:
        raise ValueError("`lamb`, `erase_scale` and `preserve_scale` must be >= 0.")
    right, left = _uce_system(erase_in, erase_target, preserve, erase_scale, preserve_scale, lamb, gram_dtype)
    return _solve_sym(right, left.T, lamb).T  # M = L R^-1  <=>  R M^T = L^T (R symmetric)


def _uce_system(
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
    gram_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, L)`` of RECE eq. 3 in float64 (see :func:`uce_factor`)."""
    d = erase_in.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=erase_in.device)
    ci = erase_in.to(gram_dtype)
    cici = (ci.T @ ci).double()
    ctci = cross_gram(erase_target.to(gram_dtype), ci).double()
    pres = gram(preserve, dtype=gram_dtype).double() if preserve.numel() else torch.zeros_like(eye)
    shared = preserve_scale * pres + lamb * eye
    right = erase_scale * cici + shared
    return 0.5 * (right + right.T), erase_scale * ctci + shared


def cross_gram(targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``sum_i t_i x_i^T`` = ``T^T X`` (d, d), summing the inputs of identical target rows first.

    Many erased prompts share one anchor (UCE's default anchor is ""), so their target rows repeat
    exactly: ``T^T X = U^T (S X)`` with ``U`` the distinct target rows and ``S X`` the inputs summed
    per distinct target, O(n d) instead of O(n d^2) when few targets are distinct."""
    uniq, inverse = torch.unique(targets, dim=0, return_inverse=True)
    if uniq.shape[0] * 2 > targets.shape[0]:
        return targets.T @ inputs
    summed = torch.zeros(uniq.shape[0], inputs.shape[1], dtype=inputs.dtype, device=inputs.device)
    summed.index_add_(0, inverse, inputs)
    return uniq.T @ summed


def _solve_sym(a: torch.Tensor, b: torch.Tensor, lamb: float, what: str = "lamb") -> torch.Tensor:
    """``a^-1 b`` for the symmetric positive semi-definite ``a`` of a closed form (a sum of Gram
    matrices plus ``lamb`` I), by Cholesky. It is positive definite for lamb > 0; a Cholesky failure
    means ``a`` is (numerically) singular: lamb = 0 and too few vectors to span the embedding space,
    a ``ValueError`` naming the option ``what`` to raise."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 and not bool(torch.isfinite(a).all()):
        # a non-finite option (e.g. lamb=inf): the solve gives a non-finite edit, which erasekit.erase
        # refuses with its own "NaN or infinite" error naming the method and config
        return torch.linalg.solve(a, b)
    if int(info) != 0:
        raise ValueError(
            f"The closed form's system is singular (`{what}` = {lamb} and the vectors do not span the "
            f"{a.shape[0]}-d embedding space): use `{what}` > 0."
        )
    return torch.cholesky_solve(b.contiguous(), chol)


def uce_factor_lowrank(
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's factor as ``M = I + A B`` with ``A = s_e (C* - C)^T`` (d, n) and ``B = C R^-1`` (n, d).

    ``L - R = s_e (C* - C)^T C``, so ``M - I = (L - R) R^-1`` has rank <= n (the erased rows): for
    n < d/2, ``W_old + (W_old A) B`` costs 4 n d out flops per projection instead of 2 d^2 out.
    """
    right, _ = _uce_system(erase_in, erase_target, preserve, erase_scale, preserve_scale, lamb, torch.float64)
    a = erase_scale * (erase_target.double() - erase_in.double()).T
    b = _solve_sym(right, erase_in.double().T, lamb).T  # C R^-1 (R symmetric)
    return a, b


def apply_factor(
    weights: Mapping[str, torch.Tensor], m: torch.Tensor, *, additive: bool = False, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``W M`` (or ``W + W M`` with ``additive``) for every (out, d) weight in ``weights``.

    The products run in ``dtype`` (default: each weight's own dtype, float32 for SD; UCE and RECE
    pass float64), one matmul per projection; results are returned in each weight's dtype.
    """
    out: dict[str, torch.Tensor] = {}
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for name, w in weights.items():
        if w.shape[1] != m.shape[0]:
            raise ValueError(f"Weight {name!r} reads {w.shape[1]}-d inputs, but the factor is {tuple(m.shape)}.")
        dt = dtype or w.dtype
        key = (w.device, dt)
        if key not in cache:
            cache[key] = m.to(device=w.device, dtype=dt)
        wd = w.detach().to(dt)
        prod = wd @ cache[key]
        out[name] = (wd + prod if additive else prod).to(w.dtype)
    return out


def apply_lowrank(
    weights: Mapping[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``W + (W a) b`` for every (out, d) weight (``a`` (d, r), ``b`` (r, d)): ``W (I + a b)`` at O(r d out)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if w.shape[1] != a.shape[0]:
            raise ValueError(f"Weight {name!r} reads {w.shape[1]}-d inputs, but the factor is {tuple(a.shape)}.")
        dt = dtype or w.dtype
        wd = w.detach().to(dt)
        out[name] = (wd + (wd @ a.to(device=w.device, dtype=dt)) @ b.to(device=w.device, dtype=dt)).to(w.dtype)
    return out


def kv_weights_for(
    pipe, projections: Sequence[str], weights: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The cross-attention weights ``unet.<attn2>.<proj>.weight`` of ``pipe`` for ``projections``
    (a name present in ``weights`` is taken from there instead: RECE's running copy)."""
    out = {}
    for mod_name, attn in cross_attention_modules(pipe.unet).items():
        for proj in projections:
            name = f"unet.{mod_name}.{proj}.weight"
            out[name] = (
                weights[name] if weights is not None and name in weights else getattr(attn, proj).weight.detach()
            )
    return out


def shared_closed_form_edit(
    pipe,
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    config,
    weights: Mapping[str, torch.Tensor] | None = None,
    *,
    preserve_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """UCE's edit (RECE eq. 3) of every cross-attention projection with ONE factor: what
    :func:`erasekit.methods.uce.closed_form_edit` computes (it calls this).

    ``config`` is a :class:`~erasekit.methods.uce.UCEConfig` (``erase_scale``, ``preserve_scale``,
    ``lamb``, ``projections``); ``weights`` replaces the pipeline's current tensor for the names it
    holds. With fewer erased rows than d/2 the low-rank form :func:`uce_factor_lowrank` is applied
    (``W + (W A) B``), else ``W M`` with :func:`uce_factor`; the products run in ``dtype`` (float64:
    equal to the per-projection float64 solve :func:`erasekit.methods.uce.uce_closed_form` to ~1e-12
    relative before the cast to the weights' dtype; ``tests/test_closed_form.py``).
    """
    scale = config.preserve_scale if preserve_scale is None else preserve_scale
    if scale is None:
        raise ValueError(
            "`preserve_scale` is None (the authors' rule): resolve it with config.resolved_preserve_scale(n)."
        )
    ws = kv_weights_for(pipe, config.projections, weights)
    return uce_edit_weights(
        ws,
        erase_in,
        erase_target,
        preserve,
        erase_scale=config.erase_scale,
        preserve_scale=scale,
        lamb=config.lamb,
        dtype=dtype,
    )


def uce_edit_weights(
    weights: Mapping[str, torch.Tensor],
    erase_in: torch.Tensor,
    erase_target: torch.Tensor,
    preserve: torch.Tensor,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """UCE's edit (RECE eq. 3) of every (out, d) weight in ``weights`` that reads the vectors ``erase_in``
    / ``preserve``, with ONE factorisation for all of them; new tensors by the names of ``weights``.

    The factor depends only on the inputs, never on ``W``, so every projection reading them shares it:
    all of a UNet's K/V projections (:func:`shared_closed_form_edit`), or one SD3 block's ``add_k_proj``
    and ``add_v_proj`` (:func:`erasekit.families.closed_forms.per_block_uce`). With fewer erased rows than
    d/2 the low-rank form :func:`uce_factor_lowrank` (``W + (W A) B``), else ``W M`` with
    :func:`uce_factor`; products in ``dtype`` (float64), one cast back to each weight's dtype. Equals
    :func:`erasekit.methods.uce.uce_closed_form` on each weight to float64 rounding."""
    kw = dict(erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb)
    if erase_in.shape[0] < erase_in.shape[1] // 2:  # few erased rows: M - I has low rank
        return apply_lowrank(weights, *uce_factor_lowrank(erase_in, erase_target, preserve, **kw), dtype=dtype)
    return apply_factor(weights, uce_factor(erase_in, erase_target, preserve, **kw), dtype=dtype)


def kv_gram(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``G = sum_i W_i^T W_i`` (d, d) over the projections, float64: computed once per edit for RECE."""
    g = None
    for w in weights.values():
        w64 = w.detach().double()
        g = w64.T @ w64 if g is None else g + w64.T @ w64
    if g is None:
        raise ValueError("`weights` is empty: no projection to sum over.")
    return g


def shared_derivation_matrix(
    g_orig: torch.Tensor, m_total: torch.Tensor, lamb: float, g_rest: torch.Tensor | None = None
) -> torch.Tensor:
    """RECE eq. 8 when every edited projection is ``W_new_i = W_old_i M`` with one ``M`` (all of
    UCE's and RECE's epochs compose shared factors, ``M = M_0 M_1 ...``):

        (lamb I + sum W_new^T W_new)^-1 sum W_new^T W_old = (lamb I + M^T G M + G_r)^-1 (M^T G + G_r)

    with ``G = sum W_old^T W_old`` over the edited projections and ``G_r`` (``g_rest``, default 0)
    the same sum over the K/V projections eq. 8 reads but the edit leaves alone (``projections`` a
    subset of to_k/to_v). Each RECE epoch then costs a few (d, d) products instead of two passes over
    all 32 projections (equals :func:`erasekit.methods.rece.derivation_matrix`; tested). The
    symmetric system is solved by Cholesky (positive definite for lamb > 0).
    """
    if lamb < 0:
        raise ValueError(f"`lamb` (lambda of RECE eq. 7) must be >= 0, got {lamb}.")
    g, m = g_orig.double(), m_total.double().to(g_orig.device)
    rest = torch.zeros_like(g) if g_rest is None else g_rest.double().to(g.device)
    mtg = m.T @ g
    a = lamb * torch.eye(g.shape[0], dtype=torch.float64, device=g.device) + mtg @ m + rest
    return _solve_sym(0.5 * (a + a.T), mtg + rest, lamb, "lamb_derive")


def gram_residual(
    g_orig: torch.Tensor,
    m_total: torch.Tensor,
    c_in: torch.Tensor,
    c_new: torch.Tensor,
    g_rest: torch.Tensor | None = None,
) -> float:
    """:func:`erasekit.methods.rece.kv_residual` for shared factors: ``sum_i ||W_new_i c_new - W_old_i c_in||^2 /
    sum_i ||W_old_i c_in||^2`` with ``W_new_i = W_old_i M`` on the projections of ``g_orig`` and
    ``W_new_i = W_old_i`` on those of ``g_rest``, from the (d, d) Gram matrices alone."""
    g, m = g_orig.double(), m_total.double().to(g_orig.device)
    x, y = c_in.double().to(g.device), c_new.double().to(g.device)
    diff = y @ m.T - x
    num = float(((diff @ g) * diff).sum())
    den = float(((x @ g) * x).sum())
    if g_rest is not None:
        r = g_rest.double().to(g.device)
        num += float((((y - x) @ r) * (y - x)).sum())
        den += float(((x @ r) * x).sum())
    return num / max(den, 1e-30)


# ------------------------------------------------------------------------------------- SPEED
def nullspace_basis(retain_gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """An orthonormal basis ``U_0`` (d, k) of SPEED's (approximate) null space of the retained keys.

    ``retain_gram`` is ``K_0 K_0^T`` (d, d) (SPEED uses the mean over retained keys); ``U_0`` holds
    its eigenvectors with eigenvalue below ``threshold`` (SPEED section 3, after AlphaEdit), so the
    projector is ``P = U_0 U_0^T`` and any update ``Delta = X P`` leaves every key in the retained
    span unchanged: ``Delta k_0 ~ 0``. ``k`` is the null-space dimension; an all-zero Gram (nothing
    retained) gives ``U_0 = I``.
    """
    if threshold <= 0:
        raise ValueError(f"`threshold` (eigenvalue cut of the null space) must be > 0, got {threshold}.")
    g = retain_gram.double()
    evals, evecs = torch.linalg.eigh(0.5 * (g + g.T))
    return evecs[:, evals < threshold]


def speed_factor(
    target_gram: torch.Tensor,
    cross_gram: torch.Tensor,
    basis: torch.Tensor,
    *,
    retain_scale: float = 1.0,
    invariants: torch.Tensor | None = None,
    iec_lamb: float = 0.0,
) -> torch.Tensor:
    """The (d, d) matrix ``N`` of SPEED's edit ``Delta = W N`` (so ``W_new = W + W N``), float64.

    With ``S_tt = sum c_i c_i^T`` (erased keys), ``S_at = sum c_i* c_i^T`` (their anchors),
    ``R = S_at - S_tt``, ``P = U_0 U_0^T`` (``basis`` = U_0) and ``r`` = ``retain_scale``, SPEED's
    null-space constrained objective

        min_Delta ||(W + Delta) C_1 - W C_1*||^2 + r ||Delta||^2,   Delta = X P

    has the minimiser ``Delta = W R P (S_tt P + r I)^-1`` (AlphaEdit's form). We compute it in the
    null-space coordinates, ``Delta = W R U_0 (U_0^T S_tt U_0 + r I)^-1 U_0^T`` (the same matrix;
    exactly inside the null space even for tiny ``r``, where the (d, d) inverse is ill-conditioned).
    With Invariant Equality Constraints (``invariants`` K_2, rows = keys kept exactly: the start
    token and the null text), the Lagrangian of ``Delta K_2 = 0`` gives, with ``B = U_0^T K_2`` and
    ``M = (U_0^T S_tt U_0 + r I)^-1``,

        Delta = W R U_0 (M - M B (B^T M B + lam_iec I)^-1 B^T M) U_0^T

    the authors' ``W R P (I - M K_2 (K_2^T P M K_2 + lam I)^-1 K_2^T P) M`` in these coordinates
    (``lam_iec`` = 0: the exact constraint). ``tests/test_closed_form.py`` checks both against a
    brute-force least-squares oracle.
    """
    u0, m = speed_inner(target_gram, basis, retain_scale=retain_scale, invariants=invariants, iec_lamb=iec_lamb)
    return ((cross_gram.double() - target_gram.double()) @ u0) @ m @ u0.T


def speed_inner(
    target_gram: torch.Tensor,
    basis: torch.Tensor,
    *,
    retain_scale: float = 1.0,
    invariants: torch.Tensor | None = None,
    iec_lamb: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_0, M')`` with ``M' = M - M B (B^T M B + lam I)^-1 B^T M`` (k, k), so that SPEED's
    ``N = R U_0 M' U_0^T`` (:func:`speed_factor`). Multiply left to right, ``((X U_0) M') U_0^T``:
    ``M'`` is ill-conditioned for tiny ``r`` and forming ``U_0 M' U_0^T`` first leaks it into the
    retained span. With ``R = (C* - C)^T C / n`` of rank <= n, ``Delta = (W A)(C U_0 M' U_0^T)``
    with ``A = (C* - C)^T / n`` is the cheap form for few erased keys."""
    if retain_scale <= 0:
        raise ValueError(f"`retain_scale` (weight r of ||Delta||^2) must be > 0, got {retain_scale}.")
    dev = target_gram.device
    s_tt, u0 = target_gram.double(), basis.double().to(dev)
    k = u0.shape[1]
    m = torch.linalg.inv(u0.T @ s_tt @ u0 + retain_scale * torch.eye(k, dtype=torch.float64, device=dev))
    if invariants is not None and invariants.numel():
        b = u0.T @ invariants.to(device=dev, dtype=torch.float64).T  # (k, q)
        inner = b.T @ m @ b + iec_lamb * torch.eye(b.shape[1], dtype=torch.float64, device=dev)
        mb = m @ b
        m = m - mb @ torch.linalg.solve(inner, mb.T)
    return u0, m


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``x`` (n, d) -> (k, d) centres; deterministic (centres start
    at evenly spaced rows). SPEED summarises the null text's 76 non-start tokens by 3 centres (IEC)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}] for {n} points, got {k}.")
    xd = x.double()
    centres = xd[torch.linspace(0, n - 1, k).round().long()].clone()
    for _ in range(iters):
        assign = torch.cdist(xd, centres).argmin(1)
        new = torch.stack([xd[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return centres.to(x.dtype)


# ------------------------------------------------------------------------------------- MACE fusion
def fusion_closed_form(
    w_old: torch.Tensor,
    tuned: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lamb: float,
    preserve: torch.Tensor | None = None,
    preserve_scale: float = 0.0,
) -> torch.Tensor:
    """MACE's closed-form fusion of several LoRA-tuned copies of one projection (authors' ``fuse_lora_close_form.py``):

        min_W  sum_i ||W C_i^T - W_i C_i^T||^2 + lam ||W - W_old||^2 + s_p ||W Cp^T - W_old Cp^T||^2
        W = (sum_i W_i C_i^T C_i + lam W_old + s_p W_old Cp^T Cp)(sum_i C_i^T C_i + lam I + s_p Cp^T Cp)^-1

    ``tuned`` lists ``(W_i, C_i)``: the projection with LoRA i merged (out, d) and the embeddings
    of concept i's prompts (n_i, d) it must reproduce. Float64 solve; returned in ``w_old``'s dtype.
    """
    if lamb <= 0 and not tuned:
        raise ValueError("Nothing to fuse: give at least one tuned projection or `lamb` > 0.")
    d = w_old.shape[1]
    w0 = w_old.double()
    left = lamb * w0
    right = lamb * torch.eye(d, dtype=torch.float64, device=w0.device)
    for i, (wi, ci) in enumerate(tuned):
        if wi.shape != w_old.shape or ci.shape[1] != d:
            raise ValueError(
                f"Tuned pair {i}: W_i {tuple(wi.shape)} and C_i {tuple(ci.shape)} do not match W_old {tuple(w_old.shape)}."
            )
        g = gram(ci)
        left = left + wi.double() @ g
        right = right + g
    if preserve is not None and preserve.numel() and preserve_scale > 0:
        g = gram(preserve)
        left = left + preserve_scale * (w0 @ g)
        right = right + preserve_scale * g
    return torch.linalg.solve(right, left.T).T.to(w_old.dtype)
