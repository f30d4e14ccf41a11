"""Tests of the metrics against scikit-image and hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradaudit.metrics import label_accuracy, match_reconstructions, psnr, ssim


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.rand(shape, generator=gen(seed))
    pred = (target + 0.2 * torch.randn(shape, generator=gen(seed + 1))).clamp(0, 1)
    return pred, target


def smooth_pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(n, c, 1, 1, generator=gen(seed)) * 6
    target = 0.5 + 0.4 * torch.sin(3 * xx + 2 * yy + phase)
    pred = 0.5 + 0.35 * torch.sin(3.2 * xx + 1.8 * yy + phase + 0.3)
    return pred, target


def skimage_ssim(pred: torch.Tensor, target: torch.Tensor, sigma: float = 1.5) -> list[float]:
    return [
        structural_similarity(
            p.numpy().astype(np.float64),
            t.numpy().astype(np.float64),
            data_range=1.0,
            gaussian_weights=True,
            sigma=sigma,
            use_sample_covariance=False,
            channel_axis=0,
        )
        for p, t in zip(pred, target, strict=True)
    ]


@pytest.mark.parametrize("make", [random_pair, smooth_pair], ids=["random", "smooth"])
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 3, 32, 32), (2, 3, 11, 11), (2, 1, 12, 20)])
def test_ssim_matches_skimage(make, shape: tuple[int, ...]) -> None:
    pred, target = make(shape, seed=3)
    ours = ssim(pred, target)
    assert ours.shape == (shape[0],)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), skimage_ssim(pred, target), atol=1e-3)


def test_ssim_shrinks_the_window_for_small_images() -> None:
    pred, target = random_pair((2, 1, 8, 8), seed=5)
    # 8x8: window 7 (largest odd <= 8) with sigma scaled by 7/11; skimage then also uses 7x7
    expected = skimage_ssim(pred, target, sigma=1.5 * 7 / 11)
    np.testing.assert_allclose(ssim(pred, target).numpy(), expected, atol=1e-3)
    pred, target = random_pair((2, 3, 10, 16), seed=6)
    expected = skimage_ssim(pred, target, sigma=1.5 * 9 / 11)
    np.testing.assert_allclose(ssim(pred, target).numpy(), expected, atol=1e-3)


def test_ssim_of_identical_images_is_one() -> None:
    _, target = random_pair((2, 3, 32, 32), seed=0)
    torch.testing.assert_close(ssim(target, target), torch.ones(2, dtype=torch.float64))
    _, tiny = random_pair((1, 1, 2, 2), seed=0)
    torch.testing.assert_close(ssim(tiny, tiny), torch.ones(1, dtype=torch.float64))


def test_ssim_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 15))
    with pytest.raises(ValueError, match="4-d"):
        ssim(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16))


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (2, 1, 8, 8)])
def test_psnr_matches_skimage(shape: tuple[int, ...]) -> None:
    pred, target = random_pair(shape, seed=4)
    ours = psnr(pred, target)
    expected = [
        peak_signal_noise_ratio(
            t.numpy().astype(np.float64), p.numpy().astype(np.float64), data_range=1.0
        )
        for p, t in zip(pred, target, strict=True)
    ]
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9)


def test_psnr_known_values() -> None:
    target = torch.zeros(2, 1, 4, 4)
    pred = target.clone()
    pred[0] += 0.1
    values = psnr(pred, target)
    assert values[0].item() == pytest.approx(20.0)
    assert math.isinf(values[1].item())
    assert psnr(pred * 255, target, data_range=255.0)[0].item() == pytest.approx(20.0)


def test_match_reconstructions_recovers_a_known_permutation() -> None:
    target = torch.rand(6, 3, 8, 8, generator=gen(0))
    shuffle = torch.randperm(6, generator=gen(1))
    pred = target[shuffle] + 0.05 * torch.randn(6, 3, 8, 8, generator=gen(2))
    perm = match_reconstructions(pred, target)
    assert perm.dtype == torch.long
    assert perm.shape == (6,)
    torch.testing.assert_close(target[shuffle[perm]], target)
    assert torch.equal(shuffle[perm], torch.arange(6))


def test_match_reconstructions_minimises_the_total_not_greedily() -> None:
    target = torch.tensor([0.0, 1.0]).view(2, 1)
    pred = torch.tensor([0.6, 2.0]).view(2, 1)
    # greedy would pair target 1 with pred 0.6 (error 0.16) and leave 2.0 for 0 (error 4)
    assert match_reconstructions(pred, target).tolist() == [0, 1]
    with pytest.raises(ValueError, match="differ"):
        match_reconstructions(torch.zeros(3, 2), torch.zeros(2, 2))


def test_label_accuracy_is_a_multiset_overlap() -> None:
    assert label_accuracy([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([2, 1, 0]), torch.tensor([0, 1, 2])) == 1.0
    assert label_accuracy(torch.tensor([5, 5]), torch.tensor([5, 5])) == 1.0
    assert label_accuracy([3, 3, 3, 3], [3, 4]) == 0.5
    assert label_accuracy([], [1, 2]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        label_accuracy([1], [])
