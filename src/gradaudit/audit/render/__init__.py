"""Render an audit's report.json as a self-contained HTML page (images inline)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2
import yaml

from gradaudit.audit.io import atomic_write_bytes, read_json
from gradaudit.errors import GradauditError

_REQUIRED = ("schema", "scenario", "utility", "attacks", "risk", "threat")
_METRIC_FORMATS = {
    "psnr": ("PSNR", "{:.2f} dB"),
    "psnr_min": ("worst PSNR", "{:.2f} dB"),
    "ssim": ("SSIM", "{:.3f}"),
    "label_accuracy": ("label accuracy", "{:.1%}"),
    "labels_exact": ("all labels exact", "{:.0f}"),
    "kept": ("kept by the attacker", "{:.0f}"),
    "keep_precision": ("precision of keeping", "{:.0%}"),
    "keep_recall": ("recall of keeping", "{:.0%}"),
    "confidence_spearman": ("confidence vs PSNR (Spearman)", "{:.2f}"),
    "confidence_kendall": ("confidence vs PSNR (Kendall)", "{:.2f}"),
    "auc": ("AUC", "{:.3f}"),
    "tpr_at_fpr_0.01": ("TPR at 1% FPR", "{:.1%}"),
    "tpr_at_fpr_0.001": ("TPR at 0.1% FPR", "{:.2%}"),
    "advantage": ("advantage (TPR − FPR)", "{:.3f}"),
    "balanced_accuracy": ("balanced accuracy", "{:.1%}"),
    "accuracy": ("accuracy", "{:.1%}"),
    "baseline_accuracy": ("no-model baseline", "{:.1%}"),
    "gain": ("gain over the baseline", "{:+.1%}"),
    "feature_accuracy": ("feature accuracy", "{:.1%}"),
    "feature_accuracy_random": ("random rows", "{:.1%}"),
    "categorical_accuracy": ("categorical accuracy", "{:.1%}"),
    "numeric_accuracy": ("numeric accuracy", "{:.1%}"),
    "rows_exact": ("rows entirely right", "{:.1%}"),
    "kept_rows": ("rows kept by the attacker", "{:.0f}"),
    "kept_feature_accuracy": ("feature accuracy of kept rows", "{:.1%}"),
    "rouge1": ("ROUGE-1", "{:.3f}"),
    "rouge2": ("ROUGE-2", "{:.3f}"),
    "rougeL": ("ROUGE-L", "{:.3f}"),
    "bleu": ("BLEU", "{:.3f}"),
    "token_accuracy": ("token accuracy", "{:.1%}"),
    "token_recall": ("token recall", "{:.1%}"),
    "token_precision": ("token precision", "{:.1%}"),
    "token_count_accuracy": ("token count accuracy", "{:.1%}"),
    "code_recall": ("code recall", "{:.1%}"),
    "code_precision": ("code precision", "{:.1%}"),
    "code_count_accuracy": ("code count accuracy", "{:.1%}"),
}


def _format_metric(key: str, value: float, interval: list[float] | None = None) -> tuple[str, str]:
    """A metric's label and value as shown, with its 95 % interval when there is one.

    Example:
        >>> _format_metric("auc", 0.6328, [0.57, 0.695])
        ('AUC', '0.633 [0.570, 0.695]')
    """
    label, fmt = _METRIC_FORMATS.get(key, (key, "{:.4g}"))
    if key == "labels_exact":
        return label, "yes" if value else "no"
    if interval is not None:
        return label, f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"
    return label, fmt.format(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def validation_sentence(validation: dict[str, Any]) -> str:
    """What the attacker's keep rule did, in words, from an attack's ``validation`` entry.

    Example:
        >>> validation_sentence({"method": "leave_one_out", "threshold": 0.5, "total": 4,
        ...     "kept": 3, "recognisable": 3, "kept_recognisable": 3, "keep_precision": 1.0,
        ...     "keep_recall": 1.0, "recognisable_definition": "PSNR ≥ 20 dB or SSIM ≥ 0.5"})
        'The attacker would keep 3 of 4 reconstructions (confidence ≥ 0.50); 3 of those are \
recognisable (PSNR ≥ 20 dB or SSIM ≥ 0.5): precision 100%. It keeps 3 of the 3 recognisable \
ones: recall 100%.'
    """
    if validation.get("method") is None:
        return str(validation.get("note", "The reconstructions were not validated."))
    total, kept = validation["total"], validation["kept"]
    good, hits = validation["recognisable"], validation["kept_recognisable"]
    rule = f"(confidence ≥ {validation['threshold']:.2f})"
    definition = validation["recognisable_definition"]
    if kept:
        first = (
            f"The attacker would keep {kept} of {_count(total, 'reconstruction')} {rule}; "
            f"{hits} of those {'is' if hits == 1 else 'are'} recognisable ({definition}): "
            f"precision {validation['keep_precision']:.0%}."
        )
    else:
        first = (
            f"The attacker would keep none of its {_count(total, 'reconstruction')} {rule}; "
            f"{good} of them {'is' if good == 1 else 'are'} recognisable ({definition})."
        )
    if not good:
        return first + " None is recognisable, so there is nothing to miss."
    return (
        f"{first} It keeps {hits} of the {good} recognisable "
        f"{'one' if good == 1 else 'ones'}: recall {validation['keep_recall']:.0%}."
    )


def ranking_sentence(validation: dict[str, Any]) -> str | None:
    """How well confidence ranks the reconstructions by PSNR, or None if not defined.

    Example:
        >>> ranking_sentence({"spearman": 0.8, "kendall": 0.6})
        'Confidence against PSNR: Spearman ρ = 0.80, Kendall τ = 0.60.'
    """
    if validation.get("spearman") is None:
        return None
    return (
        f"Confidence against PSNR: Spearman ρ = {validation['spearman']:.2f}, "
        f"Kendall τ = {validation['kendall']:.2f}."
    )


def _inline(out_dir: Path, relative: str) -> str | None:
    path = (out_dir / relative).resolve()
    if out_dir.resolve() not in path.parents or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def load_report(out_dir: Path) -> dict[str, Any]:
    """Read and check ``out_dir/report.json``."""
    report = read_json(out_dir / "report.json", what="audit report")
    if not isinstance(report, dict):
        raise GradauditError(f"{out_dir / 'report.json'}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in report]
    if missing:
        raise GradauditError(
            f"{out_dir / 'report.json'}: not a gradaudit report "
            f"(missing keys: {', '.join(missing)})"
        )
    if report["schema"] != 1:
        raise GradauditError(
            f"{out_dir / 'report.json'}: report schema {report['schema']!r} is not supported (1)"
        )
    return report


def environment() -> jinja2.Environment:
    """The Jinja environment of gradaudit's HTML pages (autoescaped; undefined names fail)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("gradaudit.audit.render", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )


def render_html(out_dir: Path) -> Path:
    """(Re-)render ``out_dir/report.html`` from ``out_dir/report.json``; returns its path."""
    report = load_report(out_dir)
    env = environment()
    attacks = []
    for item in report["attacks"]:
        pngs = [a for a in item.get("artifacts", []) if a.endswith(".png")]
        images = [src for src in (_inline(out_dir, a) for a in pngs) if src]
        validation = item.get("validation")
        attacks.append(
            {
                **item,
                "metric_rows": [
                    _format_metric(k, v, item.get("intervals", {}).get(k))
                    for k, v in item.get("metrics", {}).items()
                ],
                "images": images,
                "validation": validation,
                "validation_sentence": validation_sentence(validation) if validation else None,
                "ranking_sentence": ranking_sentence(validation) if validation else None,
                "per_example": item.get("per_example", []),
            }
        )
    html = env.get_template("report.html.j2").render(
        report=report,
        attacks=attacks,
        utility_img=_inline(out_dir, "utility.png"),
        convergence_img=(
            _inline(out_dir, "convergence.png")
            if "convergence.png" in report.get("artifacts", [])
            else None
        ),
        roc_img=_inline(out_dir, "roc.png") if "roc.png" in report.get("artifacts", []) else None,
        psnr_curve_img=(
            _inline(out_dir, "psnr_curve.png")
            if "psnr_curve.png" in report.get("artifacts", [])
            else None
        ),
        scenario_yaml=yaml.safe_dump(report["scenario"], sort_keys=False),
    )
    path = out_dir / "report.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


__all__ = ["load_report", "ranking_sentence", "render_html", "validation_sentence"]
