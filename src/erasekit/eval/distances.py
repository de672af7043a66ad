"""Distances between images and image sets: LPIPS (per pair) and FID (between two sets).

Both are written out here from their papers over a *pluggable* feature network, so the maths is
tested offline against hand computations; the pretrained networks the papers use load from the
user's cache through the optional ``real`` dependency group (``pip install 'erasekit[real]'``).

**LPIPS** (Zhang et al., CVPR 2018, eq. 1), as the official ``lpips`` package computes it::

    d(x, x0) = sum_l  1/(H_l W_l) sum_{h,w}  sum_c  w_{l,c} * (yhat^l_{hwc} - yhat0^l_{hwc})^2

where ``yhat^l`` are layer-``l`` activations unit-normalised along channels (``y / (||y||_2 + 1e-10)``)
and ``w_l >= 0`` are the learned per-channel weights (the package's 1x1 ``lin`` convolutions act
on the squared difference, i.e. the paper's ``||w_l (.) (yhat - yhat0)||^2`` with ``w_l`` squared).
Inputs are RGB scaled to [-1, 1] then shifted and scaled per channel (the package's
``ScalingLayer``). The AP paper (sec. 5.3) and RECE (sec. 4.2) report LPIPS with ``net='alex'``.

**FID** (Heusel et al., NeurIPS 2017): with (mu, Sigma) the mean and covariance of Inception pool
features of each image set::

    FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1) + Tr(Sigma_2) - 2 Tr((Sigma_1^{1/2} Sigma_2 Sigma_1^{1/2})^{1/2})

``Tr((Sigma_1^{1/2} Sigma_2 Sigma_1^{1/2})^{1/2}) = Tr((Sigma_1 Sigma_2)^{1/2})`` (similar matrices);
the symmetric form lets us use ``eigh`` on PSD matrices (no scipy ``sqrtm``), in float64.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.eval.real_detectors import torchvision_weights
from erasekit.io import file_digest

# LPIPS's ScalingLayer constants (inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1] (``lpips.im2tensor``)."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"Expected uint8 images (N, H, W, 3), got {tuple(x.shape)} {x.dtype}.")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def normalize_channels(y: torch.Tensor, eps: float = LPIPS_EPS) -> torch.Tensor:
    """``y / (||y||_2 + eps)`` along the channel axis (LPIPS's ``normalize_tensor``): (N, C, H, W)."""
    return y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS:
    """Learned perceptual distance over any feature network (Zhang et al. 2018, eq. 1).

    ``features`` maps a (N, 3, H, W) float tensor (already scaled) to a list of L activations
    (N, C_l, H_l, W_l); ``weights`` holds L non-negative tensors of C_l channel weights.

    Example::

        lp = load_lpips("alex")                      # the official AlexNet LPIPS (optional deps)
        d = lp.distance(images_a, images_b)          # (N,) numpy, one distance per pair
    """

    def __init__(
        self,
        features: FeatureFn,
        weights: Sequence[torch.Tensor],
        *,
        shift: Sequence[float] = LPIPS_SHIFT,
        scale: Sequence[float] = LPIPS_SCALE,
        name: str = "lpips-custom",
        version: str = "custom",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.features = features
        self.weights = [torch.as_tensor(w, dtype=torch.float32).reshape(-1) for w in weights]
        if any((w < 0).any() for w in self.weights):
            raise ValueError("LPIPS channel `weights` must be non-negative (they weight squared differences).")
        self.shift = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1)
        self.name = name
        self.version = version
        self.device = torch.device(device)
        self.batch_size = batch_size

    def info(self) -> dict[str, Any]:
        """What a results file records about this distance."""
        return {"name": self.name, "version": self.version, "layers": len(self.weights)}

    @torch.no_grad()
    def forward_tensors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between float images ``x``, ``y`` in [-1, 1], (N, 3, H, W)."""
        x = (x - self.shift.to(x)) / self.scale.to(x)
        y = (y - self.shift.to(y)) / self.scale.to(y)
        fx, fy = self.features(x), self.features(y)
        if len(fx) != len(self.weights) or len(fy) != len(self.weights):
            raise ValueError(
                f"The feature network returned {len(fx)} layers but there are {len(self.weights)} weight tensors."
            )
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for a, b, w in zip(fx, fy, self.weights, strict=True):
            if a.shape[1] != w.numel():
                raise ValueError(f"A layer has {a.shape[1]} channels but its weight tensor has {w.numel()}.")
            diff = (normalize_channels(a) - normalize_channels(b)).pow(2)  # (N, C, H, W)
            per_pixel = (diff * w.to(diff).view(1, -1, 1, 1)).sum(dim=1)  # (N, H, W)
            total += per_pixel.mean(dim=(1, 2)).double()  # spatial average
        return total

    def distance(self, images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
        """LPIPS between paired uint8 images (N, H, W, 3): float64 (N,)."""
        a, b = np.asarray(images_a), np.asarray(images_b)
        if a.shape != b.shape:
            raise ValueError(f"Paired images must have the same shape, got {a.shape} and {b.shape}.")
        out = []
        for s in range(0, len(a), self.batch_size):
            x = _to_unit_range(a[s : s + self.batch_size]).to(self.device)
            y = _to_unit_range(b[s : s + self.batch_size]).to(self.device)
            out.append(self.forward_tensors(x, y).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def lpips_distance(images_a: np.ndarray, images_b: np.ndarray, metric: LPIPS) -> np.ndarray:
    """Functional form of :meth:`LPIPS.distance` (Zhang et al. 2018, eq. 1)."""
    return metric.distance(images_a, images_b)


# ---------------------------------------------------------------------- official LPIPS (optional deps)
_LPIPS_NETS = {
    # torchvision feature-extractor layer slices that end after each tapped ReLU, and their channels
    "alex": ([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)], [64, 192, 384, 256, 256]),
    "vgg": ([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], [64, 128, 256, 512, 512]),
}


def lpips_linear_weights(path: str | Path, net: str = "alex") -> list[torch.Tensor]:
    """The per-channel weights ``w_l`` of the official LPIPS v0.1 file (``lin{l}.model.1.weight``).

    The file is a PyTorch state dict; it is read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors (no arbitrary unpickling).
    """
    if net not in _LPIPS_NETS:
        raise ValueError(f"`net` must be one of {sorted(_LPIPS_NETS)}, got {net!r}.")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS weights {str(p)!r} do not exist.")
    state = torch.load(p, map_location="cpu", weights_only=True)
    chans = _LPIPS_NETS[net][1]
    out = []
    for i, c in enumerate(chans):
        key = f"lin{i}.model.1.weight"
        if key not in state:
            raise ValueError(f"{str(p)!r} is not an LPIPS v0.1 {net} weight file: no {key!r}.")
        w = state[key].float().reshape(-1)
        if w.numel() != c:
            raise ValueError(f"{key} of {str(p)!r} has {w.numel()} channels, expected {c} for net={net!r}.")
        out.append(w)
    return out


def _packaged_lpips_weights(net: str) -> Path | None:
    """``weights/v0.1/{net}.pth`` inside an installed ``lpips`` package, if any."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"
    return p if p.is_file() else None


def load_lpips(
    net: str = "alex",
    *,
    lin_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> LPIPS:
    """The official LPIPS v0.1: torchvision's ImageNet AlexNet/VGG16 features (from the torch hub
    cache) and the ``lpips`` package's linear weights (or ``lin_weights``). Needs ``erasekit[real]``."""
    try:
        import torchvision
    except ImportError as e:
        raise ImportError("LPIPS needs torchvision: pip install 'erasekit[real]'.") from e
    if net not in _LPIPS_NETS:
        raise ValueError(f"`net` must be one of {sorted(_LPIPS_NETS)}, got {net!r}.")

    builder, weights_enum = (
        (torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
        if net == "alex"
        else (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    )
    backbone = builder(weights=torchvision_weights(weights_enum)).features.eval().to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    slices = [backbone[a:b] for a, b in _LPIPS_NETS[net][0]]

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in slices:
            x = s(x)
            outs.append(x)
        return outs

    path = Path(lin_weights) if lin_weights else _packaged_lpips_weights(net)
    if path is None:
        raise FileNotFoundError(
            "LPIPS linear weights not found: install the `lpips` package (pip install 'erasekit[real]') "
            f"or pass `lin_weights` = the path of its weights/v0.1/{net}.pth."
        )

    w = lpips_linear_weights(path, net)
    version = f"v0.1-{net}-lin:{file_digest(path)}-torchvision:{torchvision.__version__}"
    return LPIPS(features, w, name=f"lpips-{net}", version=version, device=device, batch_size=batch_size)


# ---------------------------------------------------------------------- FID
def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix, via ``eigh`` (float64)."""
    m = matrix.double()
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, Sigma1) and N(mu2, Sigma2) (Heusel et al. 2017; the FID)."""
    m1, m2 = (
        torch.as_tensor(np.asarray(mu1), dtype=torch.float64),
        torch.as_tensor(np.asarray(mu2), dtype=torch.float64),
    )
    s1, s2 = (
        torch.as_tensor(np.asarray(sigma1), dtype=torch.float64),
        torch.as_tensor(np.asarray(sigma2), dtype=torch.float64),
    )
    d = m1.numel()
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"Expected means (D,) and covariances (D, D); got {tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, {tuple(s2.shape)}."
        )
    r1 = sqrtm_psd(s1)
    inner = r1 @ s2 @ r1  # Sigma_1^{1/2} Sigma_2 Sigma_1^{1/2}, PSD
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


class GaussianStats:
    """Streaming mean and (unbiased) covariance of feature vectors, in float64.

    ``update`` accumulates ``sum x`` and ``sum x x^T``, so 30k x 2048 features never sit in memory.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if f.ndim != 2:
            raise ValueError(f"`features` must be (N, D), got shape {tuple(f.shape)}.")
        if self._sum is None:
            self._sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        elif f.shape[1] != self._sum.numel():
            raise ValueError(f"Feature size changed from {self._sum.numel()} to {f.shape[1]}.")
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.T @ f

    def mean(self) -> np.ndarray:
        if self.n < 1 or self._sum is None:
            raise ValueError("No features accumulated yet.")
        return (self._sum / self.n).numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(sum x x^T - n mu mu^T) / (n - 1)`` (as ``np.cov``)."""
        if self.n < 2 or self._sum is None or self._outer is None:
            raise ValueError(f"A covariance needs at least 2 feature vectors, got {self.n}.")
        mu = self._sum / self.n
        return ((self._outer - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D)."""
    a, b = GaussianStats(), GaussianStats()
    a.update(features_a)
    b.update(features_b)
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


class FeatureExtractor:
    """Images -> feature vectors for FID: ``extract(uint8 (N, H, W, 3)) -> float (N, D)``, batched.

    ``net`` maps a uint8 tensor (N, 3, H, W) to (N, D) (e.g. torchmetrics' FID Inception, which
    resizes to 299 itself); ``name``/``version`` go into ``metrics.json``.
    """

    def __init__(
        self,
        net: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        version: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.net, self.name, self.version = net, name, version
        self.device = torch.device(device)
        self.batch_size = batch_size

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @torch.no_grad()
    def extract(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"Expected uint8 images (N, H, W, 3), got {images.shape} {images.dtype}.")
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[s : s + self.batch_size]).permute(0, 3, 1, 2).contiguous().to(self.device)
            out.append(torch.as_tensor(self.net(x)).reshape(x.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def load_inception(
    *, weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 64
) -> FeatureExtractor:
    """FID's Inception-v3 (pool3, 2048-d) as torchmetrics/torch-fidelity compute it, from a local file.

    ``weights`` defaults to ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
    (where torchmetrics caches it). Needs ``erasekit[real]``.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise ImportError("FID's Inception needs torchmetrics and torch-fidelity: pip install 'erasekit[real]'.") from e
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {str(path)!r}. Download {INCEPTION_URL} where the internet is "
            "reachable and put it there (or pass `weights`)."
        )

    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    net = net.eval().to(device)
    return FeatureExtractor(
        net, name="inception-v3-compat-2048", version=file_digest(path), device=device, batch_size=batch_size
    )


__all__ = [
    "LPIPS",
    "FeatureExtractor",
    "GaussianStats",
    "fid_from_features",
    "frechet_distance",
    "load_inception",
    "load_lpips",
    "lpips_distance",
    "lpips_linear_weights",
    "normalize_channels",
    "sqrtm_psd",
]
