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
}


def _format_metric(key: str, value: float) -> tuple[str, str]:
    label, fmt = _METRIC_FORMATS.get(key, (key, "{:.4g}"))
    if key == "labels_exact":
        return label, "yes" if value else "no"
    return label, fmt.format(value)


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


def render_html(out_dir: Path) -> Path:
    """(Re-)render ``out_dir/report.html`` from ``out_dir/report.json``; returns its path."""
    report = load_report(out_dir)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradaudit.audit.render", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    attacks = []
    for item in report["attacks"]:
        images = [src for src in (_inline(out_dir, a) for a in item.get("artifacts", [])) if src]
        attacks.append(
            {
                **item,
                "metric_rows": [_format_metric(k, v) for k, v in item.get("metrics", {}).items()],
                "images": images,
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
        scenario_yaml=yaml.safe_dump(report["scenario"], sort_keys=False),
    )
    path = out_dir / "report.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


__all__ = ["load_report", "render_html"]
