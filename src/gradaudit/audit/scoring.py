"""Score what an attack recovered against the private data it never saw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from scipy import stats
from torch import Tensor

from gradaudit.audit.risk import IMAGE_HIGH_PSNR, IMAGE_HIGH_SSIM
from gradaudit.metrics import label_accuracy, match_reconstructions, psnr, ssim
from gradaudit.metrics.bag import bag_metrics, true_bag
from gradaudit.metrics.tabular import decode_rows, score_rows
from gradaudit.metrics.text import score_texts
from gradaudit.types import Reconstruction, TaskInfo

RECOGNISABLE_PSNR = IMAGE_HIGH_PSNR
"""dB from which one reconstructed image counts as recognisable (the risk level's threshold)."""
RECOGNISABLE_SSIM = IMAGE_HIGH_SSIM
"""SSIM from which one reconstructed image counts as recognisable."""
RECOGNISABLE_DEFINITION = f"PSNR ≥ {RECOGNISABLE_PSNR:g} dB or SSIM ≥ {RECOGNISABLE_SSIM:g}"


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
    if rec.labels is not None and true_labels.numel() > 0:
        metrics["label_accuracy"] = label_accuracy(rec.labels, true_labels)
        metrics["labels_exact"] = float(
            torch.equal(torch.sort(rec.labels.long()).values, torch.sort(true_labels.long()).values)
        )
    return metrics, perm


def score_inputs(
    rec: Reconstruction, true_x: Tensor, task: TaskInfo, reference: Tensor | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of reconstructed table rows, token sequences and bags, and what to show of them.

    Each modality is scored on its own part of the inputs (a multimodal row holds its tabular
    columns, then its tokens), so a joint inversion gets per-modality metrics: rows by
    `metrics.tabular.score_rows` (TabLeak's feature accuracy, beside the random baseline drawn
    from `reference`, the held-out split), sentences by `metrics.text.score_texts` (ROUGE,
    BLEU, and the sentences' bag of words), bags by `metrics.bag.bag_metrics` (recall and
    precision of distinct tokens or codes, count accuracy over multisets). Both use the same
    definitions; when an attack returns sentences and a separate bag, the bag's token metrics
    are the ones reported (the bag is the attack's claim of which words were present).

    Args:
        rec: what the attack recovered.
        true_x: (N, ...) the private inputs behind the attacked update, in model space.
        task: the task's public facts (its tabular and text schemas).
        reference: held-out inputs standing in for the feature marginals, or None.

    Returns:
        ``(metrics, shown)``: `shown` holds, when recovered, ``rows`` (reconstructed and true
        rows side by side in raw units, matched), ``texts`` (sentences side by side, matched)
        and ``bag`` (the recovered items by name, and the true ones missed).
    """
    metrics: dict[str, float] = {}
    shown: dict[str, Any] = {}
    if rec.rows is not None:
        schema = task.tabular
        if schema is None:
            raise ValueError(f"rows were reconstructed but {task.dataset} has no tabular schema")
        width = schema.num_features
        truth = true_x[:, :width]
        scored, perm = score_rows(
            rec.rows,
            truth,
            schema,
            kept=rec.kept,
            reference=None if reference is None else reference[:, :width],
        )
        metrics.update(scored)
        matched = rec.rows[perm]
        kept = rec.kept[perm] if rec.kept is not None else None
        shown["rows"] = [
            {"reconstructed": r, "truth": t, "kept": True if kept is None else bool(kept[i])}
            for i, (r, t) in enumerate(
                zip(decode_rows(matched, schema), decode_rows(truth, schema), strict=True)
            )
        ]
    if rec.tokens is not None:
        text = task.text
        if text is None:
            raise ValueError(f"tokens were reconstructed but {task.dataset} has no text schema")
        truth = true_x[:, true_x.shape[1] - text.max_length :].long()
        scored, perm = score_texts(rec.tokens, truth, text)
        metrics.update(scored)
        shown["texts"] = [
            {"reconstructed": text.decode(rec.tokens[perm[i]]), "truth": text.decode(truth[i])}
            for i in range(truth.shape[0])
        ]
    if rec.bag is not None:
        truth, item = true_bag(true_x, task)
        metrics.update(bag_metrics(rec.bag, truth, item=item))
        names = bag_names(task)
        got, true_ids = set(rec.bag.tolist()), set(truth.tolist())
        shown["bag"] = {
            "item": item,
            "recovered": [names[i] for i in sorted(got) if 0 <= i < len(names)],
            "false": [names[i] for i in sorted(got - true_ids) if 0 <= i < len(names)],
            "missed": [names[i] for i in sorted(true_ids - got)],
        }
    return metrics, shown


def bag_names(task: TaskInfo) -> tuple[str, ...]:
    """The name of every bag item id: the vocabulary for text, ``column=category`` for codes.

    Example:
        >>> from gradaudit.types import TabularSchema
        >>> schema = TabularSchema((), ("sex",), (2,), (("female", "male"),))
        >>> bag_names(TaskInfo("t", "tabular", (1,), 2, None, ("n", "y"), tabular=schema))
        ('sex=female', 'sex=male')
    """
    if task.text is not None:
        return task.text.vocab
    schema = task.tabular
    if schema is None:
        return ()
    names: list[str] = []
    for j, column in enumerate(schema.categorical):
        cats = schema.categories[j] if schema.categories else ()
        names += [
            f"{column}={cats[c] if c < len(cats) else c}" for c in range(schema.cardinalities[j])
        ]
    return tuple(names)


def recognisable(per_psnr: Tensor, per_ssim: Tensor) -> Tensor:
    """Which reconstructions count as recognisable: `RECOGNISABLE_DEFINITION`, per image.

    Example:
        >>> recognisable(torch.tensor([25.0, 12.0, 12.0]), torch.tensor([0.1, 0.7, 0.2])).tolist()
        [True, True, False]
    """
    return (per_psnr >= RECOGNISABLE_PSNR) | (per_ssim >= RECOGNISABLE_SSIM)


def rank_correlations(confidence: Sequence[float], quality: Sequence[float]) -> dict[str, Any]:
    """Spearman's rho and Kendall's tau-b between confidence and quality (e.g. PSNR).

    Undefined (None) for fewer than two images or when either side is constant (one confidence
    for a whole batch, say).

    Example:
        >>> rank_correlations([0.9, 0.5, 0.7], [30.0, 10.0, 20.0])
        {'spearman': 1.0, 'kendall': 1.0}
        >>> rank_correlations([0.4, 0.4], [30.0, 10.0])
        {'spearman': None, 'kendall': None}
    """
    if len(confidence) != len(quality):
        raise ValueError(f"{len(confidence)} confidences but {len(quality)} quality values")
    if len(confidence) < 2 or len(set(confidence)) < 2 or len(set(quality)) < 2:
        return {"spearman": None, "kendall": None}
    rho = stats.spearmanr(confidence, quality).statistic
    tau = stats.kendalltau(confidence, quality).statistic
    return {"spearman": float(rho), "kendall": float(tau)}


def score_validation(
    rec_images: Tensor,
    true_images: Tensor,
    perm: Tensor,
    confidence: Tensor,
    threshold: float,
    labels: Tensor | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """How well the attacker's keep rule (confidence ≥ `threshold`) picks recognisable images.

    The attacker keeps every reconstruction whose confidence reaches the threshold; only the
    scorer knows which of them are recognisable (`RECOGNISABLE_DEFINITION`).

    Args:
        rec_images: (N, C, H, W) reconstructions in pixel space, the attacker's order.
        true_images: (N, C, H, W) the private truth.
        perm: the matching, ``rec_images[perm[i]]`` is the reconstruction of ``true_images[i]``.
        confidence: (N,) the attacker's confidence per reconstruction (attacker's order).
        threshold: the keep rule's threshold.
        labels: (N,) the labels the attacker used per reconstruction, shown in the table.

    Returns:
        ``(summary, rows)``: the summary holds ``total``, ``kept``, ``recognisable``,
        ``kept_recognisable``, ``keep_precision`` (recognisable among kept; None if none kept),
        ``keep_recall`` (kept among recognisable; None if none is), ``spearman`` and ``kendall``
        (confidence vs PSNR), ``threshold`` and ``recognisable_definition``. One row per true
        image, in the order of the comparison picture: ``image``, ``reconstruction``,
        ``label``, ``psnr``, ``ssim``, ``recognisable``, ``confidence``, ``kept``.
    """
    if confidence.shape != (rec_images.shape[0],):
        raise ValueError(
            f"{tuple(confidence.shape)} confidences for {rec_images.shape[0]} reconstructions"
        )
    matched = rec_images[perm]
    per_psnr = psnr(matched, true_images).clamp(max=100.0)
    per_ssim = ssim(matched, true_images)
    good = recognisable(per_psnr, per_ssim)
    conf = confidence.detach().to(torch.float64)[perm]
    kept = conf >= threshold
    rows = [
        {
            "image": i,
            "reconstruction": int(perm[i]),
            "label": int(labels[perm[i]]) if labels is not None else None,
            "psnr": finite(float(per_psnr[i])),
            "ssim": float(per_ssim[i]),
            "recognisable": bool(good[i]),
            "confidence": float(conf[i]),
            "kept": bool(kept[i]),
        }
        for i in range(int(perm.shape[0]))
    ]
    n_kept, n_good = int(kept.sum()), int(good.sum())
    hits = int((kept & good).sum())
    summary: dict[str, Any] = {
        "threshold": float(threshold),
        "recognisable_definition": RECOGNISABLE_DEFINITION,
        "total": len(rows),
        "kept": n_kept,
        "recognisable": n_good,
        "kept_recognisable": hits,
        "keep_precision": hits / n_kept if n_kept else None,
        "keep_recall": hits / n_good if n_good else None,
        **rank_correlations([r["confidence"] for r in rows], [r["psnr"] for r in rows]),
    }
    return summary, rows


def validation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers that go into an attack's metrics (the defined ones only).

    Example:
        >>> validation_metrics({"kept": 2, "keep_precision": 0.5, "keep_recall": None,
        ...                     "spearman": 0.8, "kendall": 0.6})
        {'kept': 2.0, 'keep_precision': 0.5, 'confidence_spearman': 0.8, 'confidence_kendall': 0.6}
    """
    names = {
        "kept": "kept",
        "keep_precision": "keep_precision",
        "keep_recall": "keep_recall",
        "spearman": "confidence_spearman",
        "kendall": "confidence_kendall",
    }
    return {out: float(summary[key]) for key, out in names.items() if summary[key] is not None}


def psnr_curve(snapshots: Sequence[tuple[float, Tensor]], true_images: Tensor) -> list[list[float]]:
    """Mean PSNR of each snapshot of a reconstruction against the truth, by seconds.

    Each snapshot is matched to the truth on its own (`match_reconstructions`), as the final
    reconstruction is; PSNR of identical images is capped at 100 dB.

    Args:
        snapshots: ``(seconds since the attack started, images)`` pairs, images in pixel space
            [0, 1], shaped like `true_images`.
        true_images: (N, C, H, W) the private truth.

    Returns:
        ``[[seconds, psnr], ...]`` in order of seconds.

    Example:
        >>> truth = torch.zeros(1, 1, 4, 4)
        >>> psnr_curve([(2.0, truth + 0.01), (1.0, truth + 0.1)], truth)
        [[1.0, 20.0], [2.0, 40.0]]
    """
    curve = []
    for seconds, images in sorted(snapshots, key=lambda s: s[0]):
        if images.shape != true_images.shape:
            raise ValueError(
                f"a snapshot at {seconds:.3g} s is {tuple(images.shape)} but the truth is "
                f"{tuple(true_images.shape)}"
            )
        perm = match_reconstructions(images, true_images)
        value = float(psnr(images[perm], true_images).clamp(max=100.0).mean())
        curve.append([round(float(seconds), 3), round(finite(value), 4)])
    return curve
