"""Attack success metrics: image quality (PSNR, SSIM), matching, and label recovery."""

from __future__ import annotations

from gradaudit.metrics.image import match_reconstructions, psnr, ssim
from gradaudit.metrics.labels import label_accuracy

__all__ = ["label_accuracy", "match_reconstructions", "psnr", "ssim"]
