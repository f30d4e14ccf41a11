"""Image reconstruction quality: PSNR, SSIM and matching reconstructions to originals."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from gradaudit.metrics.matching import best_pairing

_TRUNCATE = 3.5
_K1 = 0.01
_K2 = 0.03


def _check_pair(pred: Tensor, target: Tensor, *, dims: int | None = None) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if dims is not None and pred.dim() != dims:
        raise ValueError(f"expected {dims}-d (N, C, H, W) tensors, got shape {tuple(pred.shape)}")
    if pred.dim() < 2 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, ...), got shape {tuple(pred.shape)}")


def psnr(pred: Tensor, target: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of each image, in dB.

    ``10 * log10(data_range**2 / mse)`` with the mean squared error over all of an image's values
    (every channel), as ``skimage.metrics.peak_signal_noise_ratio`` computes it. Identical images
    have zero error and give ``inf``; callers averaging PSNR should decide how to treat it.

    Args:
        pred: reconstructions, (N, C, H, W) (any (N, ...) works), in [0, data_range].
        target: originals, same shape.
        data_range: the span of possible pixel values.

    Returns:
        float64 tensor (N,) of PSNR values.

    Example:
        >>> target = torch.zeros(1, 1, 2, 2)
        >>> psnr(target + 0.1, target)
        tensor([20.0000], dtype=torch.float64)
    """
    _check_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    diff = pred.detach().to(torch.float64) - target.detach().to(torch.float64)
    mse = diff.square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _window(sigma: float, side: int) -> tuple[int, float]:
    """Window size and sigma: skimage's ``2 * int(3.5 sigma + 0.5) + 1``, shrunk to fit `side`."""
    win = 2 * int(_TRUNCATE * sigma + 0.5) + 1
    if win <= side:
        return win, sigma
    small = side if side % 2 == 1 else side - 1
    return small, sigma * small / win


def _gaussian_1d(win: int, sigma: float, *, device: torch.device) -> Tensor:
    radius = (win - 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def ssim(pred: Tensor, target: Tensor, *, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of each image (Wang et al., IEEE TIP 2004), Gaussian window.

    Matches ``skimage.metrics.structural_similarity(p, t, data_range=data_range,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False, channel_axis=0)`` per image:
    a Gaussian window truncated at 3.5 sigma (11x11 for sigma 1.5), K1 = 0.01, K2 = 0.03,
    population (co)variances, and the SSIM map averaged after cropping a border of
    ``(win - 1) // 2`` pixels (where the window would leave the image), then over channels.

    For images smaller than the window (e.g. the 8x8 sklearn digits) the window shrinks to the
    largest odd size that fits the shorter side, with sigma scaled by the same factor (7x7 and
    sigma 1.5 * 7 / 11 for 8x8 images) — what skimage computes when called with that sigma.

    Args:
        pred: reconstructions, (N, C, H, W), in [0, data_range].
        target: originals, same shape.
        data_range: the span of possible pixel values.
        sigma: the Gaussian window's standard deviation.

    Returns:
        float64 tensor (N,) of SSIM values in [-1, 1] (1 for identical images).

    Example:
        >>> target = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
        >>> ssim(target, target)
        tensor([1.], dtype=torch.float64)
    """
    _check_pair(pred, target, dims=4)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    n, c, h, w = pred.shape
    win, sigma = _window(sigma, min(h, w))
    kernel = _gaussian_1d(win, sigma, device=pred.device)
    rows, cols = kernel.view(1, 1, win, 1), kernel.view(1, 1, 1, win)

    def blur(x: Tensor) -> Tensor:  # 'valid' filtering = skimage's filter followed by its crop
        return functional.conv2d(functional.conv2d(x, rows), cols)

    x = pred.detach().to(torch.float64).reshape(n * c, 1, h, w)
    y = target.detach().to(torch.float64).reshape(n * c, 1, h, w)
    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return smap.reshape(n, -1).mean(dim=1)


def match_reconstructions(pred: Tensor, target: Tensor) -> Tensor:
    """Pair each original with one reconstruction, minimising the total mean squared error.

    Batch reconstructions come back in no particular order; this solves the assignment problem
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) on the N x N matrix of
    per-pair MSEs.

    Args:
        pred: reconstructions, (N, ...).
        target: originals, same shape.

    Returns:
        LongTensor ``perm`` (N,): ``pred[perm[i]]`` is matched to ``target[i]``, so
        ``pred[perm]`` lines up with `target`.

    Example:
        >>> target = torch.arange(3.0).view(3, 1, 1, 1)
        >>> match_reconstructions(target[[2, 0, 1]], target)
        tensor([1, 2, 0])
    """
    _check_pair(pred, target)
    p = pred.detach().to(torch.float64).flatten(1).cpu()
    t = target.detach().to(torch.float64).flatten(1).cpu()
    cost = torch.cdist(t, p, compute_mode="donot_use_mm_for_euclid_dist").square() / p.shape[1]
    return best_pairing(cost.numpy())


__all__ = ["match_reconstructions", "psnr", "ssim"]
