"""Score what an attack recovered against the private data it never saw."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradaudit.metrics import label_accuracy, match_reconstructions, psnr, ssim
from gradaudit.types import Reconstruction


def finite(value: float, cap: float = 100.0) -> float:
    """A JSON-safe float: PSNR of identical images (inf) is reported as `cap` dB."""
    if math.isnan(value):
        raise ValueError("a metric is NaN")
    return min(float(value), cap)


def score_reconstruction(
    rec: Reconstruction, true_images: Tensor | None, true_labels: Tensor
) -> tuple[dict[str, float], Tensor | None]:
    """Metrics of one attack's output, and the matching of reconstructions to true inputs.

    Images are matched to the true ones by the Hungarian assignment on MSE before scoring, since
    an attacker's batch order carries no meaning.

    Returns:
        ``(metrics, perm)`` where ``rec.images[perm[i]]`` is scored against ``true_images[i]``.
    """
    metrics: dict[str, float] = {}
    perm = None
    if rec.images is not None and true_images is not None:
        if rec.images.shape != true_images.shape:
            raise ValueError(
                f"reconstructed {tuple(rec.images.shape)} but the truth is "
                f"{tuple(true_images.shape)}"
            )
        perm = match_reconstructions(rec.images, true_images)
        matched = rec.images[perm]
        per_psnr = psnr(matched, true_images)
        metrics["psnr"] = finite(float(per_psnr.clamp(max=100.0).mean()))
        metrics["psnr_min"] = finite(float(per_psnr.min()))
        metrics["ssim"] = float(ssim(matched, true_images).mean())
    if rec.labels is not None:
        metrics["label_accuracy"] = label_accuracy(rec.labels, true_labels)
        metrics["labels_exact"] = float(
            torch.equal(torch.sort(rec.labels.long()).values, torch.sort(true_labels.long()).values)
        )
    return metrics, perm
