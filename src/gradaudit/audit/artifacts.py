"""Pictures an audit saves beside its report: true vs reconstructed images, curves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from gradaudit.audit.io import atomic_write_bytes


def _to_hwc(image: Tensor) -> np.ndarray:
    array = image.detach().cpu().clamp(0, 1).numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def comparison_png(true: Tensor, reconstructed: Tensor, *, max_images: int = 16) -> bytes:
    """A two-row PNG: the client's true images on top, the attacker's below (matched order)."""
    n = min(int(true.shape[0]), max_images)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 0.8, 2.9), squeeze=False)
    gray = true.shape[1] == 1
    for i in range(n):
        for row, batch in enumerate((true, reconstructed)):
            ax = axes[row][i]
            ax.imshow(
                _to_hwc(batch[i]),
                cmap="gray" if gray else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("true", fontsize=9)
    axes[1][0].set_ylabel("attacker", fontsize=9)
    fig.tight_layout(pad=0.3)
    return _png(fig)


def utility_png(accuracy: Sequence[float], *, initial: float | None = None) -> bytes:
    """Test accuracy per round as a PNG line chart."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    rounds = list(range(1, len(accuracy) + 1))
    xs, ys = rounds, list(accuracy)
    if initial is not None:
        xs, ys = [0, *rounds], [initial, *ys]
    ax.plot(xs, ys, marker="o", color="#1f6feb")
    ax.set_xlabel("round (0 = initial model)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def convergence_png(traces: dict[str, Sequence[Sequence[float]]]) -> bytes:
    """Gradient-matching objective against seconds, one line per attack."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for label, trace in traces.items():
        if trace:
            ax.plot([t[1] for t in trace], [t[2] for t in trace], label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("attack objective")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def psnr_curve_png(
    curves: dict[str, Sequence[Sequence[float]]], *, recognisable_db: float | None = None
) -> bytes:
    """Mean PSNR of the reconstruction against seconds, one line per attack.

    Args:
        curves: label -> ``[[seconds, psnr], ...]``.
        recognisable_db: draw a dashed line at this PSNR (the "recognisable" threshold).
    """
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for label, curve in curves.items():
        if curve:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", label=label)
    if recognisable_db is not None:
        ax.axhline(
            recognisable_db,
            color="#59636e",
            linestyle="--",
            linewidth=1,
            label=f"recognisable ({recognisable_db:g} dB)",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def roc_png(curves: dict[str, Sequence[Sequence[float]]]) -> bytes:
    """ROC curves of yes/no inference attacks on log–log axes (Carlini et al. 2022), one line per
    attack, with chance as a dashed diagonal.

    Args:
        curves: label -> ``[[fpr, tpr], ...]``; points at zero are drawn at the axis' floor.
    """
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    floor = 1e-4
    for label, curve in curves.items():
        fpr = np.maximum([p[0] for p in curve], floor)
        tpr = np.maximum([p[1] for p in curve], floor)
        ax.step(fpr, tpr, where="post", label=label)
    ax.plot([floor, 1], [floor, 1], color="#59636e", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


TRADEOFF_PANELS = (
    ("psnr", "PSNR of the reconstruction (dB)", 20.0),
    ("label_accuracy", "label accuracy", None),
    ("tpr_at_fpr_0.01", "TPR at 1% FPR (inference)", 0.01),
    ("gain", "gain over the no-model baseline", 0.0),
)
"""Metric, axis label and dashed reference line of each panel a sweep plot may show."""


def tradeoff_png(rows: Sequence[dict], attacks: Sequence[str]) -> bytes:  # type: ignore[type-arg]
    """What each defense buys and costs: attack success against final test accuracy.

    One panel per metric some attack reports (PSNR of image attacks, dashed at 20 dB,
    recognisable; label accuracy; TPR at 1 % FPR of yes/no inference, dashed at chance; the
    gain of source and attribute inference over the no-model baseline), each against the final
    test accuracy, one labelled point per variant.
    """
    panels = [
        panel
        for panel in TRADEOFF_PANELS
        if any(panel[0] in row["attacks"].get(a, {}) for row in rows for a in attacks)
    ] or list(TRADEOFF_PANELS[:2])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    markers = "osD^v<>ph*"
    for panel, (key, ylabel, reference) in zip(axes[0], panels, strict=True):
        drawn = False
        for j, attack in enumerate(attacks):
            points = [
                (row["final_test_accuracy"], row["attacks"][attack][key], row["label"])
                for row in rows
                if key in row["attacks"].get(attack, {})
            ]
            if not points:
                continue
            drawn = True
            panel.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=markers[j % len(markers)],
                color=f"C{j % 10}",
                label=attack,
            )
            for x, y, text in points:
                panel.annotate(text, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        if reference is not None and drawn:
            panel.axhline(reference, color="#59636e", linestyle="--", linewidth=1)
        panel.set_xlabel("final test accuracy")
        panel.set_ylabel(ylabel)
        panel.grid(alpha=0.3)
        if drawn:
            panel.legend(fontsize=8)
        else:
            panel.text(0.5, 0.5, "no attack reports this", ha="center", transform=panel.transAxes)
    fig.tight_layout()
    return _png(fig)


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def save_png(path: Path, data: bytes) -> None:
    """Write PNG bytes atomically."""
    atomic_write_bytes(path, data)
