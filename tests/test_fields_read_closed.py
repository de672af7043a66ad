"""Every field of UCEConfig, RECEConfig, ESDConfig and HideConfig is read (issue 12): changing it from its
default changes the edit on a tiny pipeline (fine-tuned methods: 3 steps).

Each config has a probe-value table; a field without a probe and without a stated exemption fails the
test, so a new option cannot be added without showing that the method reads it.
"""

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.methods.base import get_method, make_config
from erasekit.methods.hide import hide
from erasekit.methods.rece import SHARED_WITH_UCE_STEP
from erasekit.options import option_names

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest)

RUN_CONTROL = {
    "run_dir": "where checkpoints and the log go; not part of the result (left out of the run's config hash)",
    "checkpoint_every": "checkpoint cadence; not part of the result (resume is exact: tests/test_finetune.py)",
    "resume": "continues a run from its checkpoint; the result equals the uninterrupted run (tests/test_finetune.py)",
    "keep_checkpoints": "how many checkpoints stay on disk; not part of the result",
    "key_dir": "where the secret recovery key is saved; left out of the edit on purpose (hide.py)",
    "zt_batch_steps": "batched z_t equal exact z_t whatever the batch, by design (tests/test_zt_producers.py)",
}
# Fields read only under other settings: (context, probe value), compared against the context alone.
CONTEXT_PROBES = {"zt_pool_size": ({"zt_producer": "pooled", "steps": 8}, 1)}  # 8 steps need 3 trajectories

CLOSED_FORM_PROBES = {
    "uce": {
        "erase_scale": 0.5,
        "preserve_scale": 0.3,
        "lamb": 0.1,
        "preserve_empty": False,
        "erase_positions": "all",
        "preserve_positions": "from_last_word",
        "templates": ["{}", "a {}"],
        "projections": ("to_k",),
    },
    "rece": {
        "epochs": 2,
        "lamb_derive": 1e-3,
        "erase_scale": 0.5,
        "preserve_scale": 0.3,
        "lamb": 0.3,
        "uce.lamb": 0.1,
        "uce.preserve_scale": 0.3,
        "uce.preserve_empty": False,
        "uce.erase_positions": "all",
        "preserve_empty": False,
        "derived_positions": "from_last_word",
        "preserve_positions": "from_last_word",
        "templates": ["{}", "a {}"],
        "projections": ("to_k",),
    },
}
FINETUNE_PROBES = {
    "steps": 4,
    "lr": 3e-2,
    "train_method": "kv",
    "ddim_steps": 4,
    "start_guidance": 1.0,
    "zt_producer": "exact",  # the default (authors) is "trained"; hide's default is "exact" (see below)
    "concepts_per_step": 2,
    "seed": 1,
    "stop_at": 2,  # a run cut short at step 2 of FAST's 3 (resumable; erasekit.study trains in chunks with it)
}
FINETUNED_PROBES = {
    "esd": {**FINETUNE_PROBES, "eta": 2.0, "lora_rank": 2},
    "hide": {
        **FINETUNE_PROBES,
        "zt_producer": "trained",
        "lam": 0.0,
        "preserve_lam": 0.0,
        "n_tokens": 2,
        "key_lr": 1e-1,
    },
}
FAST = {"steps": 3, "ddim_steps": 3, "lr": 1e-2}
REQUEST = EraseRequest(["triangle", "square"], preserve=["circle"])


# RECE's UCE step takes these from RECE's own options of the same name (probed above); set apart in
# `uce` they are refused (tests/test_rece.py), so they have no probe of their own.
MIRRORED = {f"uce.{n}" for n in SHARED_WITH_UCE_STEP}


def _get(config, name: str):
    """A (dotted, for a composed config) option's value."""
    for part in name.split("."):
        config = getattr(config, part)
    return config


def _covered(method: str, probes: dict) -> None:
    names = [n for n in option_names(get_method(method).config_class) if not (method == "rece" and n in MIRRORED)]
    missing = [n for n in names if n not in probes and n not in RUN_CONTROL and n not in CONTEXT_PROBES]
    assert not missing, f"{method}: fields without a probe value or an exemption: {missing}"
    stale = sorted(set(probes) - set(names))
    assert not stale, f"{method}: probes for fields that do not exist: {stale}"


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) != set(b) or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", sorted(CLOSED_FORM_PROBES))
def test_every_closed_form_field_is_read(tiny_pipe, method):
    probes = CLOSED_FORM_PROBES[method]
    _covered(method, probes)
    base = erasekit.erase(tiny_pipe, REQUEST, method=method, progress=False)
    unread = []
    for name, value in probes.items():
        assert _get(make_config(method), name) != value, f"{method}.{name}: the probe equals the default"
        edit = erasekit.erase(tiny_pipe, REQUEST, method=method, progress=False, **{name: value})
        if not _differs(base.tensors, edit.tensors):
            unread.append(name)
    assert not unread, f"{method}: changing these fields did not change the edit: {unread}"


def _finetuned(pipe, method: str, **kw) -> dict[str, torch.Tensor]:
    if method == "hide":
        edit, key = hide(pipe, REQUEST, make_config("hide", **{**FAST, **kw}), progress=False)
        return {**edit.tensors, **{f"key.{c}": t for c, t in key.tokens.items()}}
    return erasekit.erase(pipe, REQUEST, method=method, progress=False, **{**FAST, **kw}).tensors


@pytest.mark.parametrize("method", sorted(FINETUNED_PROBES))
def test_every_finetuned_field_is_read(tiny_pipe, method):
    probes = FINETUNED_PROBES[method]
    _covered(method, probes)
    base = _finetuned(tiny_pipe, method)
    unread = []
    for name, value in probes.items():
        if name not in FAST:
            assert _get(make_config(method), name) != value, f"{method}.{name}: the probe equals the default"
        if not _differs(base, _finetuned(tiny_pipe, method, **{name: value})):
            unread.append(name)
    for name, (context, value) in CONTEXT_PROBES.items():
        if not _differs(
            _finetuned(tiny_pipe, method, **context), _finetuned(tiny_pipe, method, **context, **{name: value})
        ):
            unread.append(name)
    assert not unread, f"{method}: changing these fields did not change the edit: {unread}"


def test_the_probe_check_can_fail():
    """A config field with no probe and no exemption is reported (the check is not vacuous)."""
    with pytest.raises(AssertionError, match="without a probe"):
        _covered("uce", {k: v for k, v in CLOSED_FORM_PROBES["uce"].items() if k != "lamb"})
