import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest, get_parameter
from erasekit.methods.closed_form import encode_unique, last_subject_embeddings
from erasekit.methods.speed import SPEEDConfig, dpa_augment, ipf_filter, least_read_direction


def _outputs(pipe, edit, keys):
    """(before, after) outputs of every edited projection for the rows of ``keys``."""
    pairs = []
    for name, w_new in edit.tensors.items():
        w_old = get_parameter(pipe, name).detach()
        pairs.append((keys @ w_old.T, keys @ w_new.T))
    return pairs


@pytest.mark.parametrize("scope", ["layer", "shared"])
def test_speed_keeps_retained_keys_and_moves_erased_keys_to_targets(tiny_pipe, one_thread, scope):
    request = EraseRequest(["triangle", "star"], preserve=["square", "ring", "blue"])
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = erasekit.erase(
        tiny_pipe, request, method="speed", ipf=False, dpa_samples=0, retain_scale=1e-4, scope=scope, progress=False
    )
    assert edit.tensors and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in edit.tensors)
    for k, v in tiny_pipe.unet.state_dict().items():  # the caller's pipeline is untouched
        assert torch.equal(v, before[k])
    retained = last_subject_embeddings(tiny_pipe, request.preserve)
    null = encode_unique(tiny_pipe, [""])[0]
    for old, new in _outputs(tiny_pipe, edit, torch.cat([retained, null[:1]])):  # retained keys + start token (IEC)
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    erased = last_subject_embeddings(tiny_pipe, request.erase)
    target = null[:1].expand_as(erased)  # anchor "" -> its last "word" token is the start token
    for name, w_new in edit.tensors.items():
        w_old = get_parameter(tiny_pipe, name).detach()
        err_before = (erased @ w_old.T - target @ w_old.T).norm()
        err_after = (erased @ w_new.T - target @ w_old.T).norm()
        assert err_after < 1e-2 * err_before, name
    assert edit.config["preset"] == "paper" and edit.trace["invariants"] == 4


def test_speed_unconstrained_keys_differ_from_retained_ones(tiny_pipe, one_thread):
    # the null-space constraint is what keeps the retained keys: without it (UCE) they move
    request = EraseRequest(["triangle"], preserve=["square"])
    uce = erasekit.erase(tiny_pipe, request, method="uce", preserve_scale=0.0, progress=False)
    speed = erasekit.erase(tiny_pipe, request, method="speed", ipf=False, dpa_samples=0, progress=False)
    key = last_subject_embeddings(tiny_pipe, ["square"])
    moved_uce = sum(float((new - old).norm()) for old, new in _outputs(tiny_pipe, uce, key))
    moved_speed = sum(float((new - old).norm()) for old, new in _outputs(tiny_pipe, speed, key))
    assert moved_speed < 1e-3 * moved_uce


def test_speed_defaults_ipf_dpa_and_trace(tiny_pipe, one_thread):
    edit = erasekit.erase(
        tiny_pipe,
        EraseRequest(["triangle"], preserve=["square", "ring", "heart", "cat"]),
        method="speed",
        progress=False,
    )
    stats = next(iter(edit.trace["retained"].values()))
    assert stats["candidates"] == 4 and 1 <= stats["after_ipf"] < 4 and stats["retained"] > stats["after_ipf"]
    assert {"text", "closed_form", "total", "text_cpu", "closed_form_cpu"} == set(edit.trace["seconds"])
    fast = erasekit.erase(tiny_pipe, EraseRequest(["triangle"]), method="speed", preset="fast", progress=False)
    assert list(fast.trace["retained"]) == ["shared"] and fast.config["scope"] == "shared"
    # deterministic
    again = erasekit.erase(
        tiny_pipe,
        EraseRequest(["triangle"], preserve=["square", "ring", "heart", "cat"]),
        method="speed",
        progress=False,
    )
    for k in edit.tensors:
        assert torch.equal(edit.tensors[k], again.tensors[k])


def test_ipf_dpa_helpers():
    assert ipf_filter(torch.tensor([1.0, 2.0, 3.0, 10.0])).tolist() == [False, False, False, True]
    w = torch.diag(torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64))
    v = least_read_direction([w])
    assert torch.allclose(v.abs(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    keys = torch.ones(2, 3, dtype=torch.float64)
    aug = dpa_augment(keys, v, 5, torch.Generator().manual_seed(0))
    assert aug.shape == (10, 3)
    torch.testing.assert_close(aug[:, :2], torch.ones(10, 2, dtype=torch.float64))  # only along v
    assert (aug[:, 2] != 1).all()


def test_speed_bad_input_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="contains the erased concept 'triangle'"):
        erasekit.erase(
            tiny_pipe, EraseRequest(["triangle"], preserve=["a red triangle"]), method="speed", progress=False
        )
    with pytest.raises(ValueError, match="both erased and preserved"):
        EraseRequest(["triangle"], preserve=["triangle"])
    # 14 retained concepts x ~75 keys each span all but one of the 32 dimensions (the final layer
    # norm's outputs have zero mean: that direction is never used), too few for 2 erased concepts
    many = [
        "square",
        "ring",
        "heart",
        "cross",
        "star",
        "circle",
        "dog",
        "cat",
        "red",
        "blue",
        "tree",
        "house",
        "sky",
        "sea",
    ]
    kw = dict(method="speed", tokens="to_end", ipf=False, dpa_samples=0, threshold=1e-6, progress=False)
    with pytest.raises(
        ValueError,
        match=r"has 1 direction\(s\), fewer than the 2 erased concepts: it can hold at most 1\. Raise `threshold`",
    ):
        erasekit.erase(tiny_pipe, EraseRequest(["triangle", "pyramid"], preserve=many), **kw)
    # ... and the one direction left carries nothing of the erased concept
    with pytest.raises(ValueError, match="'triangle' lies in the span of the retained keys"):
        erasekit.erase(tiny_pipe, EraseRequest(["triangle"], preserve=many), **kw)
    with pytest.raises(ValueError, match="dpa_samples"):
        SPEEDConfig(dpa_samples=-1)
    with pytest.raises(ValueError, match="not read with iec=False"):
        erasekit.methods.base.make_config("speed", iec=False, iec_clusters=5)
