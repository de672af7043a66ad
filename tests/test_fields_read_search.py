"""Every option of AP and AGE is read (issue 12): a field changed from its default changes the edit.

For each field of ``APConfig`` and ``AGEConfig`` the table ``PROBES`` names a context (settings under
which the field is read) and a probe value; the test runs a tiny pipeline for a few steps with the
context, then with the context plus the probe, and asserts the edits differ. A field with neither a
probe nor an exemption fails the table test, so a new option cannot be added without showing that
the method reads it. Options the method would ignore for the chosen settings are refused
(``used_when``), with a message naming the option, and nothing is written.

Contexts use the ``soft`` relaxation for the search's own options: with the hard (one-hot) choice
a small move of the logits changes the edit only when it flips the argmax, while the soft mixture
carries any change of the logits into the conditioning.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.methods.age import AGEConfig
from erasekit.methods.ap import APConfig
from erasekit.methods.base import is_read, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

REQ = EraseRequest(["triangle", "square"])
BASE: dict[str, Any] = dict(steps=2, ddim_steps=2, lr=1e-3, vocabulary="shapes", k=3)
NO_SPACE = {k: v for k, v in BASE.items() if k not in ("vocabulary", "k")}  # search="fixed" reads neither
SOFT = {**BASE, "relaxation": "soft"}
DDIM = {**BASE, "steps": 3, "ddim_steps": 4}  # z_t needs DDIM steps (a draw of 0 steps is pure noise)
VOCAB_FILE = "@vocab"  # replaced by a file written in tmp_path

# Run-control fields change how a run is executed and stored, never its result (they are left out
# of the config hash; tests/test_ap.py's resume test and tests/test_finetune.py cover them).
EXEMPT = {"run_dir", "checkpoint_every", "resume", "keep_checkpoints"}
# zt_batch_steps: batched z_t equal exact z_t whatever the batch, by design (tests/test_zt_producers.py)
EXEMPT |= {"zt_batch_steps"}

# field -> (context, probe value): the context's edit and the context + probe's edit must differ.
COMMON: dict[str, tuple[dict[str, Any], Any]] = {
    "steps": (BASE, 3),
    "lr": (BASE, 2e-3),
    "train_method": (BASE, "kv"),
    "ddim_steps": (BASE, 3),
    "start_guidance": (DDIM, 1.0),
    "zt_producer": (DDIM, "exact"),  # differs once the model moved
    "zt_pool_size": ({**BASE, "zt_producer": "pooled", "steps": 8}, 1),  # 8 steps need more than 1 trajectory
    "concepts_per_step": (BASE, 2),
    "seed": (BASE, 1),
    "stop_at": (BASE, 1),  # cut short at step 1 of 2 (erasekit.study's chunks)
    "lam": (BASE, 0.5),
    "search": (BASE, "pgd"),
    "vocabulary": (SOFT, VOCAB_FILE),
    "k": (SOFT, 4),
    "exclude": ({**SOFT, "k": None}, ["circle"]),
    "search_space": (SOFT, "nearest"),
    "pool": (SOFT, 5),
    "n_iter": (SOFT, 2),
    "search_lr": (SOFT, 0.1),
    "search_optimizer": (SOFT, "sgd"),
    "search_gradient": (SOFT, "exact"),
    "search_loop": (SOFT, "same"),
    "search_state": ({**SOFT, "steps": 4}, "shared"),  # needs a row drawn after the other moved
    "l2_latent": (BASE, "erased"),
    "loss_space": (BASE, "eps"),
    "temperature": (SOFT, 1.0),
    "relaxation": (BASE, "soft"),
    "topk": ({**BASE, "relaxation": "topk", "temperature": 2.0}, 2),  # AGE's tau 0.1 is one-hot in effect
    # a larger lr: after one descent step of lr 1e-3 the tiny model's L2 gradient is below Adam's epsilon
    "pgd_radius": ({**BASE, "search": "pgd", "search_lr": 0.1, "lr": 0.05}, 1e-3),
    "fixed_concept": ({**NO_SPACE, "search": "fixed"}, "a photo"),
    "negative_guidance": (BASE, 0.0),
    "lora_rank": (BASE, 2),
}
AGE_ONLY = {"search": (BASE, "fixed"), "detach_target": ({**SOFT, "search_gradient": "exact"}, False)}
PROBES: dict[str, dict[str, tuple[dict[str, Any], Any]]] = {
    "ap": COMMON,
    "age": {k: v for k, v in {**COMMON, **AGE_ONLY}.items() if k != "pgd_radius"},
}
# AGE refuses search="pgd" (it starts at c_e, where its objective and gradients are 0), so it never
# reads pgd_radius; setting it is refused (test_an_option_the_settings_ignore_is_refused).
EXEMPT_FOR = {"ap": EXEMPT, "age": EXEMPT | {"pgd_radius"}}
CONFIGS = {"ap": APConfig, "age": AGEConfig}
# The default suite probes the options of issue 12 (and AGE's reading of its own objective); the
# other fields (the core's, read by the shared loop, and AP's older search options, which AGE
# reads through the same code) run with -m slow.
_FAST_COMMON = {
    "search_space",
    "pool",
    "search_gradient",
    "search_loop",
    "search_state",
    "l2_latent",
    "loss_space",
    "negative_guidance",
    "zt_producer",
}
FAST_PROBES = {"ap": _FAST_COMMON, "age": _FAST_COMMON | {"detach_target", "lam", "relaxation"}}
FIELDS = {m: {f.name: f for f in fields(c)} for m, c in CONFIGS.items()}
_BASE_EDITS: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # tiny_pipeline(0) is deterministic


def _edit(pipe, method: str, settings: dict[str, Any]) -> erasekit.Edit:
    return erasekit.erase(pipe, REQ, method=method, progress=False, **settings)


def _base_tensors(pipe, method: str, context: dict[str, Any]) -> dict[str, torch.Tensor]:
    key = (method, repr(sorted(context.items())))
    if key not in _BASE_EDITS:
        _BASE_EDITS[key] = _edit(pipe, method, context).tensors
    return _BASE_EDITS[key]


def _probed(method: str, context: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    """``context`` with ``name`` set to ``value``, less the context's options that the new settings no
    longer read (e.g. ``vocabulary`` once ``search`` is ``"fixed"``), which would be refused."""
    settings = {**context, name: value}
    config = CONFIGS[method](**settings)
    return {k: v for k, v in settings.items() if k == name or is_read(config, FIELDS[method][k])}


def _resolve(value: Any, tmp_path) -> Any:
    if value == VOCAB_FILE:
        path = tmp_path / "vocab.txt"
        path.write_text("circle\nstar\nheart\nmoon\ncrescent\nring\n")
        return str(path)
    return value


def test_every_field_has_a_probe_or_an_exemption():
    for method, cls in CONFIGS.items():
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(PROBES[method]) - EXEMPT_FOR[method])
        assert not missing, f"{method}: fields without a probe in PROBES (show the method reads them): {missing}"
        assert not set(PROBES[method]) - names, f"{method}: probes of fields that do not exist"
        for name, (context, value) in PROBES[method].items():
            default = next(f for f in fields(cls) if f.name == name)
            assert value != context.get(name, getattr(cls(), default.name)), (method, name, "probe = default")


CASES = [
    pytest.param(m, f, marks=[] if f in FAST_PROBES[m] else [pytest.mark.slow], id=f"{m}-{f}")
    for m in PROBES
    for f in PROBES[m]
]


@pytest.mark.parametrize(("method", "name"), CASES)
def test_a_changed_field_changes_the_edit(method, name, tiny_pipe, tmp_path):
    context, value = PROBES[method][name]
    base = _base_tensors(tiny_pipe, method, context)
    probed = _edit(tiny_pipe, method, _probed(method, context, name, _resolve(value, tmp_path)))
    assert probed.config[name] == _resolve(value, tmp_path)
    same = set(base) == set(probed.tensors) and all(torch.equal(base[k], probed.tensors[k]) for k in base)
    assert not same, f"{method}: setting `{name}` to {value!r} left the edit unchanged (is it read?)"


# ------------------------------------------------------------------------------------------ refused options
# A value of each `used_when` key that switches the condition off.
OFF = {
    "search": {("gumbel", "pgd"): "fixed", ("gumbel",): "pgd", ("pgd",): "gumbel", ("fixed",): "gumbel"},
    "search_space": {("stratified",): "nearest"},
    "relaxation": {("topk",): "hard"},
    "search_gradient": {("exact",): "semi"},
    "zt_producer": {("pooled",): "exact", ("batched",): "exact"},
}


@pytest.mark.parametrize("method", ["ap", "age"])
def test_an_option_the_settings_ignore_is_refused(method):
    checked = 0
    for f in fields(CONFIGS[method]):
        for key, allowed in f.metadata.get("used_when", {}).items():
            off = OFF[key][tuple(allowed)]
            if method == "age" and off == "pgd":
                off = "fixed"  # AGE refuses pgd outright
            value = PROBES[method][f.name][1] if f.name in PROBES[method] else {"zt_batch_steps": 2}.get(f.name, 1e-3)
            with pytest.raises(ValueError, match=rf"Option `{f.name}` of method '{method}' is not read with"):
                make_config(method, **{key: off, f.name: value})
            checked += 1
    assert checked >= 15


def test_presets_refuse_their_unread_options_and_nothing_is_written(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"`pool`.*search_space='nearest'.*preset 'paper'"):
        make_config("ap", "paper", pool=500)
    with pytest.raises(ValueError, match=r"`detach_target`.*search_gradient='semi'.*preset 'authors'"):
        make_config("age", "authors", detach_target=False)
    with pytest.raises(ValueError, match=r"`topk`.*relaxation='hard'"):
        make_config("age", topk=3)
    make_config("age", "paper", topk=3)  # the paper preset's top-k relaxation reads it
    with pytest.raises(ValueError, match="AGE's `search` must be 'gumbel' or 'fixed'"):
        make_config("age", search="pgd")
    with pytest.raises(ValueError, match="Unknown preset 'eq5'"):
        make_config("ap", "eq5")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="`vocabulary`"):
        erasekit.erase(tiny_pipe, REQ, method="ap", search="fixed", vocabulary="shapes", run_dir=str(run), steps=1)
    assert not run.exists()
