import numpy as np
import pytest

from erasekit.eval.metrics import ESR, NER, PSR, attack_success_rate, esr_k, exposure_rate, psr_k, rsr_k

# Four images, three classes. Scores chosen so the top-k sets are easy to read off by hand:
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # ranking 0 > 1 > 2
        [0.1, 0.3, 0.6],  # ranking 2 > 1 > 0
        [0.2, 0.5, 0.3],  # ranking 1 > 2 > 0
        [0.4, 0.4, 0.2],  # tie between 0 and 1
    ]
)
LABELS = np.array([0, 0, 2, 1])


def test_esr_psr_by_hand():
    # top-1 hits: img0 yes (0 is top), img1 no (0 is last), img2 no (2 is second), img3 yes (tie counts as in)
    assert psr_k(PROBS, LABELS, 1) == pytest.approx(2 / 4)
    assert esr_k(PROBS, LABELS, 1) == pytest.approx(2 / 4)
    # top-2 hits: img0 yes, img1 no (rank 3), img2 yes (rank 2), img3 yes
    assert psr_k(PROBS, LABELS, 2) == pytest.approx(3 / 4)
    assert esr_k(PROBS, LABELS, 2) == pytest.approx(1 / 4)
    assert psr_k(PROBS, LABELS, 3) == 1.0 and esr_k(PROBS, LABELS, 3) == 0.0
    assert rsr_k(PROBS, LABELS, 1) == psr_k(PROBS, LABELS, 1)


def test_stateful_metrics_match_functional_twins():
    esr, psr = ESR(k=2), PSR(k=2)
    for s in (slice(0, 1), slice(1, 4)):
        esr.update(PROBS[s], LABELS[s])
        psr.update(PROBS[s], LABELS[s])
    assert esr.compute() == esr_k(PROBS, LABELS, 2)
    assert psr.compute() == psr_k(PROBS, LABELS, 2)
    assert ESR.higher_is_better and PSR.higher_is_better and not NER.higher_is_better
    esr.reset()
    assert np.isnan(esr.compute())


def test_ner_and_asr_by_hand():
    scores = np.array([[0.1, 0.65], [0.2, 0.3], [0.8, 0.0], [0.0, 0.0]])  # per-part confidences
    assert exposure_rate(scores, 0.6) == 0.5  # images 0 and 2
    assert exposure_rate(scores, 0.3) == 0.75  # 0, 1 (0.3 >= 0.3), 2
    m = NER(0.6)
    m.update(scores[:2])
    m.update(scores[2:])
    assert m.compute() == 0.5
    assert attack_success_rate([True, False, True, True]) == 0.75


def test_bad_k_and_shapes():
    with pytest.raises(ValueError, match="k"):
        esr_k(PROBS, LABELS, 4)
    with pytest.raises(ValueError, match="Expected"):
        psr_k(PROBS[0], LABELS, 1)


def test_wilson_interval_hand_computed_cases():
    from erasekit.eval.metrics import rate_summary, wilson_interval

    # 0/10: centre = half = (z^2/20)/(1 + z^2/10) -> [0, 0.27753]; 10/10 mirrors it
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.277533) < 1e-5
    lo, hi = wilson_interval(10, 10)
    assert abs(lo - 0.722467) < 1e-5 and hi == 1.0
    # 5/10 by the formula written out: p = .5, z^2/n = .38415
    z = 1.959963984540054
    c = (0.5 + z * z / 20) / (1 + z * z / 10)
    h = z * (0.25 / 10 + z * z / 400) ** 0.5 / (1 + z * z / 10)
    assert wilson_interval(5, 10) == pytest.approx((c - h, c + h), abs=1e-12)
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    # shrinks like 1/sqrt(n) around p
    lo1, hi1 = wilson_interval(50, 100)
    lo2, hi2 = wilson_interval(500, 1000)
    assert (hi2 - lo2) < (hi1 - lo1) / 3
    s = rate_summary([True, False, False, True])
    assert s["rate"] == 0.5 and s["successes"] == 2 and s["n"] == 4 and s["ci95"][0] < 0.5 < s["ci95"][1]
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
