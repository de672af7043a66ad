"""A test-only reference for RECE as its authors' public code runs it (issue 12), written from the RECE
paper (Gong et al., ECCV 2024, eqs. 3 and 8, Algorithm 1) and the public description of the official
loop (CharlesGong12/RECE ``train_object.py``; the UCE checkpoint it starts from is made by UCE's
``train_erase.py``). It deliberately shares no code with :mod:`erasekit.methods` (not even the
closed forms) and uses plain matrix algebra in the official order of operations:

1. UCE step, per K/V matrix ``W`` (all ``to_v`` then all ``to_k`` of the cross-attentions):
   ``mat1 = lamb W + s_e sum v k^T + s_p sum v_r k_r^T``, ``mat2 = lamb I + s_e sum k k^T + s_p sum k_r k_r^T``,
   ``W <- mat1 mat2^-1``, with the erase pairs (``k`` = the concept's tokens from its last word to the end,
   ``v = W`` times the target's tokens from *its* last word, cut to equal length), the retained texts
   ``[""] + preserve`` at all 77 positions, ``lamb = 0.5``, ``s_e = 1`` and ``s_p = max(0.1, 1/#retained)``.
   A target ``""`` is replaced by ``" "`` as the official scripts do.
2. Each epoch: the "regzero" derived embedding of every erased concept over all 77 positions,
   ``c' = c (mat1^-1 mat2)^T`` with ``mat1 = reg I + sum W_now^T W_now`` and ``mat2 = sum W_now^T W_orig``
   (eq. 8), then the adversarial edit of every matrix with the same ``mat1``/``mat2`` scheme, the pairs
   being ``c'`` and the target's full 77-token embedding (unshifted), the retained texts ``[""] + preserve``
   at all 77 positions, ``lamb = 0.1``, ``s_p = 0.1``, ``s_e = 1``.

``dtype=torch.float32`` with ``torch.linalg.inv`` is the official numerics; ``float64`` gives a tight oracle.
"""

from __future__ import annotations

import torch


def _encode(pipe, text: str) -> tuple[torch.Tensor, int]:
    """The text encoder's (77, D) output for ``text`` and the index of its last word token."""
    tok = pipe.tokenizer(
        text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        emb = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0][0]
    return emb, int(tok.attention_mask[0].sum()) - 2


def kv_names(unet) -> list[str]:
    """Parameter names of the cross-attention value matrices, then the key matrices (the official order)."""
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    return [f"unet.{n}.to_v.weight" for n in attn2] + [f"unet.{n}.to_k.weight" for n in attn2]


def _edit_matrix(w, pairs, retained, lamb, erase_scale, preserve_scale):
    """``(lamb W + sum v k^T)(lamb I + sum k k^T)^-1`` over erase ``pairs`` (k rows, target rows) and ``retained`` rows."""
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype)
    for k, target in pairs:
        v = target @ w.T  # (n, out): the current matrix applied to the target tokens
        mat1 = mat1 + erase_scale * (v.T @ k)
        mat2 = mat2 + erase_scale * (k.T @ k)
    for k in retained:
        mat1 = mat1 + preserve_scale * ((k @ w.T).T @ k)
        mat2 = mat2 + preserve_scale * (k.T @ k)
    return mat1 @ torch.linalg.inv(mat2)


def run_reference(
    pipe,
    erase: list[str],
    *,
    target: str = "",
    preserve: tuple[str, ...] = (),
    epochs: int = 1,
    regular_scale: float = 1e-3,
    uce_lamb: float = 0.5,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """The K/V matrices after the UCE step (index 0) and after each of ``epochs`` RECE epochs (1..epochs)."""
    names = kv_names(pipe.unet)
    params = dict(pipe.unet.named_parameters())
    orig = {n: params[n.removeprefix("unet.")].detach().to(dtype).clone() for n in names}
    new_text = target if target != "" else " "
    retain_texts = ["", *preserve]
    retained = [_encode(pipe, t)[0].to(dtype) for t in retain_texts]

    # 1. UCE (train_erase.py's edit_model): sliced erase pairs, retained texts at all 77 positions.
    pairs = []
    for concept in erase:
        e_old, i_old = _encode(pipe, concept)
        e_new, i_new = _encode(pipe, new_text)
        far = max(i_old, i_new)
        k = e_old[i_old : len(e_old) - max(0, far - i_old)].to(dtype)
        t = e_new[i_new : len(e_new) - max(0, far - i_new)].to(dtype)
        pairs.append((k, t))
    uce_scale = max(0.1, 1 / len(retain_texts))
    now = {n: _edit_matrix(orig[n], pairs, retained, uce_lamb, erase_scale, uce_scale) for n in names}
    history = [{n: w.clone() for n, w in now.items()}]

    # 2. RECE epochs (train_object.py): derive (close_form_emb_regzero), then edit_model_adversarial.
    concept_embs = [_encode(pipe, c)[0].to(dtype) for c in erase]
    target_emb = _encode(pipe, new_text)[0].to(dtype)
    d = target_emb.shape[1]
    for _ in range(epochs):
        mat1 = regular_scale * torch.eye(d, dtype=dtype)
        mat2 = torch.zeros(d, d, dtype=dtype)
        for n in names:
            mat1 = mat1 + now[n].T @ now[n]
            mat2 = mat2 + now[n].T @ orig[n]
        coefficient = torch.linalg.inv(mat1) @ mat2
        adv = [c @ coefficient.T for c in concept_embs]  # (77, D) each
        adv_pairs = [(a, target_emb) for a in adv]
        now = {n: _edit_matrix(now[n], adv_pairs, retained, lamb, erase_scale, preserve_scale) for n in names}
        history.append({n: w.clone() for n, w in now.items()})
    return history
