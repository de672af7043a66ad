"""Memory options through the library API: ``erasekit.erase`` refuses gradient checkpointing or 8-bit
Adam set on the pipeline (``families.memory.set_memory_options``) with a closed-form method, as
``erasekit erase`` refuses its flags (tests/test_cli_loading_flags.py); fine-tuned methods still take them."""

import importlib.util

import pytest
import torch

import erasekit
from erasekit.edit import EraseRequest
from erasekit.families.memory import memory_options, set_memory_options
from erasekit.methods.base import fine_tuned_methods

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = EraseRequest(["triangle"], preserve=["square"])
CLOSED_FORM = ("uce", "rece", "speed", "mace")


def test_the_fine_tuned_methods_are_the_finetune_config_ones():
    assert set(fine_tuned_methods()).isdisjoint(CLOSED_FORM)
    assert {"esd", "ap"} <= set(fine_tuned_methods())


@pytest.mark.parametrize("method", CLOSED_FORM)
def test_gradient_checkpointing_with_a_closed_form_method_is_refused(tiny_pipe, method):
    set_memory_options(tiny_pipe, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    with pytest.raises(ValueError) as err:
        erasekit.erase(tiny_pipe, REQUEST, method=method, progress=False)
    msg = str(err.value)
    assert "`gradient_checkpointing`" in msg and "does not fine-tune" in msg and repr(method) in msg
    assert "esd" in msg and "set_memory_options" in msg  # the fine-tuned alternatives and how to reset
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters())  # nothing ran


def test_8bit_adam_with_a_closed_form_method_is_refused(tiny_pipe, monkeypatch):
    if importlib.util.find_spec("bitsandbytes") is None:  # let MemoryOptions accept adam8bit here
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "bitsandbytes" else real(n, *a))
    set_memory_options(tiny_pipe, optimizer="adam8bit")
    assert memory_options(tiny_pipe).optimizer == "adam8bit"
    for method in ("uce", "rece"):
        with pytest.raises(ValueError, match="`optimizer`.*does not fine-tune"):
            erasekit.erase(tiny_pipe, REQUEST, method=method, progress=False)


def test_default_or_reset_options_let_a_closed_form_method_run(tiny_pipe):
    set_memory_options(tiny_pipe)  # the defaults, as the CLI sets them for every method
    edit = erasekit.erase(tiny_pipe, REQUEST, method="uce", progress=False)
    assert edit.method == "uce"
    set_memory_options(tiny_pipe, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="does not fine-tune"):
        erasekit.erase(tiny_pipe, REQUEST, method="uce", progress=False)
    set_memory_options(tiny_pipe)  # what the error says to do
    assert erasekit.erase(tiny_pipe, REQUEST, method="uce", progress=False).method == "uce"


def test_a_fine_tuned_method_still_takes_gradient_checkpointing(tiny_pipe):
    set_memory_options(tiny_pipe, gradient_checkpointing=True)
    edit = erasekit.erase(tiny_pipe, REQUEST, method="esd", progress=False, steps=2, ddim_steps=4)
    assert edit.trace["memory"]["gradient_checkpointing"] is True
