"""bench/robustness.py --merge: rows of separate invocations folded into one table (issue 5)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_robustness", Path(__file__).resolve().parents[1] / "bench" / "robustness.py"
)
robustness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(robustness)


def _result(rows: dict[str, dict], n_prompts: int = 2, original_rate: float = 0.5) -> dict:
    block = {
        "n_prompts": n_prompts,
        "prompts": ["a", "b"][:n_prompts],
        "original_rate": original_rate,
        "rows": rows,
        "judge": {"head": "unsafe"},
    }
    return {
        "config": {
            "model": "shapes",
            "concepts": ["fire"],
            "rows": list(rows),
            "attacks": ["paraphrase"],
            "n_prompts": n_prompts,
            "n_images": 1,
            "seed": 0,
            "method_overrides": {},
            "attack_overrides": {},
            "preserve_others": False,
        },
        "detector": {"name": "d", "version": "1"},
        "access": {"paraphrase": "black-box"},
        "concepts": {"fire": block},
    }


def _row(method: str, asr: float, **over) -> dict:
    return {
        "method": method,
        "overrides": over,
        "edit_seconds": 1.0,
        "pre_attack_rate": 0.0,
        "asr": {"paraphrase": asr},
        "adversarial": {"paraphrase": []},
        "cost": {"paraphrase": {"seconds": 0.0, "unet_calls": 0, "unet_items": 0, "text_encoder_calls": 0}},
    }


def test_row_name_picks_the_most_specific_variant():
    assert robustness.row_name("ap", _row("ap", 0.1, negative_guidance=1.0, steps=200)) == "ap-eta1"
    assert robustness.row_name("ap", _row("ap", 0.1, steps=200)) == "ap"
    assert robustness.row_name("esd-x", _row("esd", 0.1, train_method="xattn")) == "esd-x"
    assert robustness.row_name("esd-u", _row("esd", 0.1, train_method="noxattn")) == "esd-u"


def test_merge_folds_rows_in_table_order_and_renders():
    a = _result({"rece": _row("rece", 0.25), "uce": _row("uce", 1.0)})
    b = _result({"ap": _row("ap", 0.5, negative_guidance=1.0)})
    m = robustness.merge_results([("a", a), ("b", b)])
    assert list(m["concepts"]["fire"]["rows"]) == ["uce", "rece", "ap-eta1"]
    assert m["config"]["rows"] == ["uce", "rece", "ap-eta1"]
    assert m["concepts"]["fire"]["original_rate"] == 0.5
    md = robustness.markdown(m)
    assert "| ap-eta1 | 1.0 | 0 | 50 |" in md and "| uce | 1.0 | 0 | 100 |" in md
    assert "negative_guidance=1.0" in md and "Merged from a, b" in md
    # merging a file with itself is harmless (identical rows)
    m2 = robustness.merge_results([("a", a), ("a2", copy.deepcopy(a))])
    assert m2["concepts"]["fire"]["rows"] == {
        "uce": a["concepts"]["fire"]["rows"]["uce"],
        "rece": a["concepts"]["fire"]["rows"]["rece"],
    }


@pytest.mark.parametrize(
    "other, message",
    [
        (_result({"esd-x": _row("esd", 0.0, train_method="xattn")}, n_prompts=1), "n_prompts"),
        (_result({"esd-x": _row("esd", 0.0, train_method="xattn")}, original_rate=0.9), "original model's rate"),
        (_result({"uce": _row("uce", 0.0)}), "already filled"),
    ],
)
def test_merge_refuses_incomparable_files(other, message):
    a = _result({"uce": _row("uce", 1.0)})
    with pytest.raises(SystemExit, match=message):
        robustness.merge_results([("a", a), ("b", other)])


def test_carry_over_keeps_earlier_rows_and_refuses_other_settings(tmp_path):
    path = tmp_path / "robustness.json"
    fresh = _result({})
    assert robustness.carry_over(path, copy.deepcopy(fresh)) == fresh  # nothing there yet
    path.write_text(json.dumps(_result({"uce": _row("uce", 1.0)})))
    kept = robustness.carry_over(path, _result({}))
    assert kept["concepts"]["fire"]["rows"] == {"uce": _row("uce", 1.0)}
    assert kept["config"]["rows"] == ["uce"]
    with pytest.raises(SystemExit, match="n_prompts"):
        robustness.carry_over(path, _result({}, n_prompts=1))
