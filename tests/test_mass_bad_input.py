"""Bad input of the mass-erasure methods (issue 20): each a clear error before any work."""

import pytest

import erasekit
from erasekit.edit import EraseRequest
from erasekit.methods.closed_form import check_retained_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mace_refuses_a_retained_set_that_names_an_erased_concept(tiny_pipe):
    req = EraseRequest(["triangle"], preserve=["a red Triangle", "square"])
    with pytest.raises(ValueError, match=r"retained set contains the erased concept 'triangle' .*MACE's prior"):
        erasekit.erase(tiny_pipe, req, method="mace", lora=False, progress=False)
    # the authors preset has no prior terms (preserve_scale 0): nothing is kept, so nothing contradicts
    edit = erasekit.erase(tiny_pipe, req, method="mace", preset="authors", lora=False, progress=False)
    assert edit.tensors


def test_retained_check_matches_whole_words_only():
    check_retained_prompts(["star"], ["a starfish", "stars"], "why")  # other words: allowed
    with pytest.raises(ValueError, match=r"'star' \(in \['a red star'\]\); why\. Remove those prompts"):
        check_retained_prompts(["star"], ["a red star", "a circle"], "why")


def test_speed_says_how_many_concepts_its_null_space_holds(tiny_pipe):
    """The tiny model's text width is 32: 14 retained concepts leave a 1-d null space, too small for 3."""
    many = ["square", "ring", "heart", "cross", "star", "circle", "dog", "cat", "red", "blue", "tree", "house"]
    many += ["sky", "sea"]
    kw = dict(method="speed", tokens="to_end", ipf=False, dpa_samples=0, threshold=1e-6, progress=False)
    with pytest.raises(
        ValueError, match=r"fewer than the 3 erased concepts: it can hold at most \d\. Raise `threshold`"
    ):
        erasekit.erase(tiny_pipe, EraseRequest(["triangle", "pyramid", "crescent"], preserve=many), **kw)
