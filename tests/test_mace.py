import numpy as np
import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest, get_parameter
from erasekit.methods.mace import (
    MACEConfig,
    cfr_embeddings,
    concept_images,
    importance_weights,
    matching_positions,
    token_positions,
)
from erasekit.methods.uce import uce_closed_form


def test_matching_positions_by_hand():
    # "a triangle" -> "a": [S, a, tri, E] vs [S, a, E]: prefix (0, 1), suffix E (3 vs 2), then the padding
    io, in_ = matching_positions([0, 5, 9, 1], [0, 5, 1], length=8)
    assert io == [0, 1, 3, 4, 5, 6, 7] and in_ == [0, 1, 2, 3, 4, 5, 6]
    # the anchor longer than the prompt: the shift runs the other way
    io, in_ = matching_positions([0, 9, 1], [0, 7, 8, 1], length=6)
    assert io == [0, 2, 3, 4] and in_ == [0, 3, 4, 5]


def test_cfr_alone_is_the_uce_form_on_the_non_concept_tokens(tiny_pipe, one_thread):
    request = EraseRequest(["triangle"], preserve=["square"])
    edit = erasekit.erase(tiny_pipe, request, method="mace", lora=False, lamb=0.7, progress=False)
    c_in, c_t = cfr_embeddings(tiny_pipe, ["triangle"], [""])
    assert c_in.shape[0] == 76  # 77 positions minus the concept's one token
    from erasekit.methods.uce import aligned_token_embeddings

    c_p, _ = aligned_token_embeddings(tiny_pipe, ["square"], ["square"])
    for name, w_new in edit.tensors.items():
        w_old = get_parameter(tiny_pipe, name).detach()
        ref = uce_closed_form(w_old, c_in, c_t, c_p, erase_scale=1.0, preserve_scale=1.0, lamb=0.7)
        torch.testing.assert_close(w_new, ref, rtol=1e-4, atol=1e-5)


def test_mace_lora_lowers_the_masked_attention_and_fusion_is_the_lstsq_solution(tiny_pipe, one_thread, monkeypatch):
    import erasekit.methods.mace as mace

    seen = {}
    real = mace.fusion_closed_form

    def spy(w_old, tuned, **kw):
        seen.setdefault("call", (w_old, tuned, kw))
        return real(w_old, tuned, **kw)

    monkeypatch.setattr(mace, "fusion_closed_form", spy)
    edit = erasekit.erase(
        tiny_pipe,
        EraseRequest(["triangle", "star"]),
        method="mace",
        steps=8,
        lr=3e-2,
        images_per_concept=2,
        progress=False,
    )
    for c in ("triangle", "star"):
        log = edit.trace["lora_losses"][c]
        assert log["steps"] == 8 and log["last"] < log["first"]
    # the fused projection solves the fusion objective: check the first one against torch.linalg.lstsq
    w_old, tuned, kw = seen["call"]
    assert len(tuned) == 2 and kw["preserve"] is None
    d = w_old.shape[1]
    lam = kw["lamb"]
    a = torch.cat([c.double() for _, c in tuned] + [lam**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([c.double() @ wi.double().T for wi, c in tuned] + [lam**0.5 * w_old.double().T])
    torch.testing.assert_close(
        real(w_old, tuned, **kw).double(), torch.linalg.lstsq(a, b).solution.T, rtol=1e-4, atol=1e-6
    )
    # LoRA steps move the weights away from CFR alone
    cfr = erasekit.erase(tiny_pipe, EraseRequest(["triangle", "star"]), method="mace", lora=False, progress=False)
    assert any(not torch.allclose(edit.tensors[k], cfr.tensors[k]) for k in cfr.tensors)


def test_concept_images_masks_and_sampling_density():
    imgs, masks = concept_images("triangle", 3)
    assert imgs.shape[0] == 3 and masks.dtype == bool
    frac = masks.mean(axis=(1, 2))
    assert ((frac > 0.05) & (frac < 0.8)).all()  # the object, not the background
    assert np.all(imgs[~masks].astype(int).sum(-1) < 120)  # background pixels are the black background
    _, m = concept_images("fire", 2)
    assert m.all()
    w = importance_weights()
    assert abs(float(w.sum()) - 1) < 1e-9 and 200 <= int(w.argmax()) <= 400


def test_token_positions(tiny_pipe):
    assert token_positions(tiny_pipe, "a red triangle", "triangle") == [3]
    with pytest.raises(ValueError, match="does not appear"):
        token_positions(tiny_pipe, "a red square", "triangle")


def test_mace_bad_input_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match=r"rank` 100 is too large.*at most 16"):
        erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="mace", rank=100, progress=False)
    with pytest.raises(ValueError, match="images and masks of 'dog'"):
        erasekit.erase(tiny_pipe, EraseRequest(["dog"]), method="mace", progress=False)
    with pytest.raises(ValueError, match="not read with lora=False"):
        erasekit.methods.base.make_config("mace", lora=False, rank=2)
    with pytest.raises(ValueError, match="both off"):
        MACEConfig(cfr=False, lora=False)
    with pytest.raises(ValueError, match="both erased and preserved"):
        EraseRequest(["triangle"], preserve=["triangle"])
