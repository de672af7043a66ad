"""bench/table1_search.py: the shares of AP's chosen concepts, against a hand count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_table1_search", Path(__file__).resolve().parents[1] / "bench" / "table1_search.py"
)
mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mod)


def test_search_shares_by_hand():
    # erased: triangle, heart. Picks: 'pyramid' (triangle's synonym: erased), 'ring' (kept), 'blue' (neither),
    # 'rhombus' (diamond's synonym: kept); two halves of two picks each.
    cell = {
        "erase": ["triangle", "heart"],
        "chosen": [
            [0, [["triangle", "pyramid", 0.1]]],
            [1, [["heart", "ring", 0.3]]],
            [2, [["triangle", "blue", 0.2]]],
            [3, [["heart", "rhombus", None]]],
        ],
    }
    first, second = mod.search_shares(cell, quarters=2)
    assert first == {"kept": 0.5, "erased": 0.5, "p": pytest.approx(0.2)}
    assert second == {"kept": 0.5, "erased": 0.0, "p": pytest.approx(0.2)}
