"""Parity of our FID, LPIPS and CLIP score with torchmetrics (and the lpips package where it imports),
on the same ShapesWorld images through the same offline feature networks (bench/metric_parity.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchmetrics", reason="torchmetrics is not installed (pip install 'erasekit[real]')")
pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location(
    "metric_parity", Path(__file__).resolve().parent.parent / "bench" / "metric_parity.py"
)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


def test_fid_matches_torchmetrics_frechet_inception_distance():
    res = parity.fid_parity(n=120)
    two, same = res["rows"]
    assert two["torchmetrics"] > 1e-3  # two different sets: a non-trivial distance to agree on
    assert two["abs_diff"] <= 1e-6 * max(1.0, two["torchmetrics"])
    assert abs(same["ours"]) < 1e-6 and abs(same["torchmetrics"]) < 1e-6


def test_lpips_matches_torchmetrics_lpips_network():
    res = parity.lpips_parity(n=8)
    row = res["rows"][0]
    assert row["torchmetrics_mean"] > 1e-3
    assert row["max_abs_diff"] < 1e-5


def test_lpips_matches_the_lpips_package():
    pkg, status = parity.lpips_package_status()
    if pkg is None:
        pytest.skip(f"the lpips package cannot be imported here ({status}); torchmetrics' port is compared instead")
    res = parity.lpips_parity(n=8)
    assert res["rows"][1]["max_abs_diff"] < 1e-5


def test_clip_score_matches_torchmetrics_per_image_on_a_tiny_random_clip():
    res = parity.clip_parity(n=8)
    assert res["rows"][0]["max_abs_diff"] < 1e-3  # raw 100 cos, float32 embeddings


def test_clip_score_metric_matches_torchmetrics_where_the_definitions_agree():
    res = parity.clip_parity(n=16, clip="shapes")
    per_image, metric, _ = res["rows"]
    assert per_image["negative_cosines"] == 0 and metric["same_definition_on_these_images"]
    assert metric["ours"] > 1.0 and metric["abs_diff"] < 1e-3


def test_clip_score_definitions_differ_only_by_where_the_clamp_sits():
    """torchmetrics clamps the mean, we clamp each image: with one negative cosine they must differ."""
    cos = np.array([0.3, -0.2])
    ours = (100 * np.maximum(cos, 0)).mean()
    theirs = max((100 * cos).mean(), 0)
    assert ours == pytest.approx(15.0) and theirs == pytest.approx(5.0)
