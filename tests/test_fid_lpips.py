"""FID and LPIPS against hand computations."""

import numpy as np
import pytest
import torch

from erasekit.eval.distances import (
    LPIPS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    FeatureExtractor,
    GaussianStats,
    fid_from_features,
    frechet_distance,
    lpips_linear_weights,
    sqrtm_psd,
)


# ---------------------------------------------------------------------- FID
def test_sqrtm_psd_squares_back():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s = a @ a.T
    r = sqrtm_psd(s)
    assert torch.allclose(r @ r, s, atol=1e-10) and torch.allclose(r, r.T)


def test_fid_diagonal_gaussians_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2  = (1 + 0 + 4) + (1 + 1 + 6.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5 + 8.25, abs=1e-10)


def test_fid_one_dimension_is_mean_and_std_gap():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([2.0], [[9.0]], [-1.0], [[4.0]]) == pytest.approx(9 + 1, abs=1e-12)


def test_fid_non_commuting_2x2_closed_form():
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 0.0])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    # for 2x2 A with non-negative eigenvalues: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)); A = S1 S2
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.25 + 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_fid_from_samples_approaches_the_gaussian_value():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    x = rng.multivariate_normal([0, 0], cov, size=20000)
    y = rng.multivariate_normal([1, 0], cov, size=20000)
    assert fid_from_features(x, y) == pytest.approx(1.0, abs=0.08)  # same covariance: ||mu diff||^2


def test_streaming_stats_match_numpy():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(37, 4))
    st = GaussianStats()
    for s in range(0, 37, 10):
        st.update(f[s : s + 10])
    assert np.allclose(st.mean(), f.mean(0)) and np.allclose(st.cov(), np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="Feature size"):
        st.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        one = GaussianStats()
        one.update(f[:1])
        one.cov()


def test_feature_extractor_batches_and_validates():
    net = lambda x: x.float().mean(dim=(2, 3))  # noqa: E731  (N, 3) channel means
    fx = FeatureExtractor(net, name="means", version="1", batch_size=2)
    imgs = np.random.default_rng(2).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    assert np.allclose(fx.extract(imgs), imgs.reshape(5, -1, 3).mean(1))
    with pytest.raises(ValueError, match="uint8"):
        fx.extract(imgs.astype(np.float32))


# ---------------------------------------------------------------------- LPIPS
def _layers(x: torch.Tensor) -> list[torch.Tensor]:
    """A two-layer 'network': the scaled image, and its 2x2 average pool."""
    return [x, torch.nn.functional.avg_pool2d(x, 2)]


def _lpips_by_hand(a: np.ndarray, b: np.ndarray, w: list[np.ndarray]) -> float:
    """Zhang et al. eq. 1 with explicit loops: layers, pixels, channels."""

    def scaled(img):
        x = img.astype(np.float64) / 127.5 - 1.0  # (H, W, 3)
        return (x - np.array(LPIPS_SHIFT)) / np.array(LPIPS_SCALE)

    def pool(x):
        h, wd = x.shape[0] // 2, x.shape[1] // 2
        return np.array(
            [[x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(0, 1)) for j in range(wd)] for i in range(h)]
        )

    total = 0.0
    for layer, wl in zip([lambda x: x, pool], w, strict=True):
        fa, fb = layer(scaled(a)), layer(scaled(b))
        acc = 0.0
        for i in range(fa.shape[0]):
            for j in range(fa.shape[1]):
                ua = fa[i, j] / (np.sqrt((fa[i, j] ** 2).sum()) + 1e-10)
                ub = fb[i, j] / (np.sqrt((fb[i, j] ** 2).sum()) + 1e-10)
                acc += sum(wl[c] * (ua[c] - ub[c]) ** 2 for c in range(3))
        total += acc / (fa.shape[0] * fa.shape[1])
    return total


def test_lpips_matches_hand_computation():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    w = [np.array([0.2, 1.0, 0.5]), np.array([1.5, 0.0, 0.3])]
    lp = LPIPS(_layers, [torch.tensor(x) for x in w], batch_size=2)
    got = lp.distance(a, b)
    want = [_lpips_by_hand(a[i], b[i], w) for i in range(3)]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.allclose(lp.distance(a, a), 0.0)
    assert np.allclose(lp.distance(b, a), got, rtol=1e-6)  # symmetric


def test_lpips_validates_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS(_layers, [torch.tensor([-1.0, 1, 1]), torch.ones(3)])
    lp = LPIPS(_layers, [torch.ones(3)])
    x = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="2 layers"):
        lp.distance(x, x)
    with pytest.raises(ValueError, match="same shape"):
        LPIPS(_layers, [torch.ones(3), torch.ones(3)]).distance(x, np.zeros((1, 4, 8, 3), np.uint8))


def test_official_lpips_weight_file_is_read_without_unpickling_code(tmp_path):
    # the official file is a state dict {lin{l}.model.1.weight: (1, C, 1, 1)}; we read it with weights_only=True
    chans = [64, 192, 384, 256, 256]
    state = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), float(i)) for i, c in enumerate(chans)}
    torch.save(state, tmp_path / "alex.pth")  # test fixture in the third-party format
    w = lpips_linear_weights(tmp_path / "alex.pth", "alex")
    assert [x.numel() for x in w] == chans and float(w[3][0]) == 3.0
    with pytest.raises(ValueError, match="expected 128"):
        lpips_linear_weights(tmp_path / "alex.pth", "vgg")
