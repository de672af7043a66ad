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
