"""A defense sweep: one scenario audited under several defenses, summarised in one table.

A sweep file is a scenario plus a ``sweep`` list. Each item names a variant (``label``), gives
the client defenses it runs (``defenses``, replacing the scenario's) and optionally further
overrides (``set``, as on the command line). Every variant is validated before anything runs,
audited into ``OUT/variants/NN-slug/`` (a finished variant of the same scenario is reused, and
an interrupted one resumes its finished attacks), and summarised in ``OUT/sweep.json`` and
``OUT/sweep.html``: per variant the attacks' PSNR, SSIM and label accuracy, the final test
accuracy, the bytes each client sends per round, and the guarantee with its epsilon.

Example of a sweep file::

    name: defense-sweep
    data: {dataset: digits, num_clients: 4}
    model: {kind: mlp}
    attacks: [{kind: label_recovery}]
    sweep:
      - {label: no defense}
      - {label: top-k 10%, defenses: {client: [{kind: topk, params: {fraction: 0.1}}]}}
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradaudit.audit.io import atomic_write_json, read_json
from gradaudit.config import (
    DefensesSpec,
    Scenario,
    apply_overrides,
    build_scenario,
    format_validation_error,
    read_yaml,
)
from gradaudit.errors import ConfigError, GradauditError

logger = logging.getLogger(__name__)

SWEEP_SCHEMA = 1
SHOWN_METRICS = (
    ("psnr", "{:.1f}", "PSNR"),
    ("ssim", "{:.2f}", "SSIM"),
    ("label_accuracy", "{:.2f}", "label acc."),
    ("auc", "{:.3f}", "AUC"),
    ("tpr_at_fpr_0.01", "{:.3f}", "TPR@1%FPR"),
    ("accuracy", "{:.2f}", "acc."),
    ("gain", "{:+.2f}", "gain"),
    ("feature_accuracy", "{:.2f}", "feature acc."),
    ("rouge1", "{:.2f}", "ROUGE-1"),
    ("rouge2", "{:.2f}", "ROUGE-2"),
    ("token_recall", "{:.2f}", "token recall"),
    ("token_precision", "{:.2f}", "token precision"),
    ("code_recall", "{:.2f}", "code recall"),
    ("code_precision", "{:.2f}", "code precision"),
)
"""The attack metrics a sweep's table shows: key, format, column label."""
SUMMARY_METRICS = tuple(key for key, _, _ in SHOWN_METRICS)


class VariantSpec(BaseModel):
    """One variant of a sweep: its label, its client defenses, further overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(min_length=1)
    defenses: DefensesSpec | None = Field(
        None, description="replaces the scenario's defenses; omitted: the scenario's own"
    )
    set: tuple[str, ...] = Field((), description="overrides, e.g. federation.rounds=5")


class SweepFile(BaseModel):
    """The ``sweep`` key of a sweep file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sweep: tuple[VariantSpec, ...] = Field(min_length=1)


@dataclass(frozen=True)
class Variant:
    """A validated variant: its label, its folder name and its resolved scenario."""

    label: str
    slug: str
    scenario: Scenario


def slugify(label: str) -> str:
    """A folder-safe form of a label.

    Example:
        >>> slugify("top-k 10% (DLG)")
        'top-k-10-dlg'
    """
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-") or "variant"


def load_sweep(path: Path | str, overrides: Sequence[str] = ()) -> tuple[str, list[Variant]]:
    """Read a sweep file and validate every variant's scenario before anything runs.

    `overrides` (``--set``) apply to the base scenario, before each variant's own.

    Returns:
        The sweep's name and its variants, in file order.
    """
    path = Path(path)
    raw = read_yaml(path)
    if "sweep" not in raw:
        raise ConfigError(
            f"{path}: not a sweep file (no 'sweep' list of variants); audit it with "
            "`gradaudit audit`"
        )
    try:
        spec = SweepFile.model_validate({"sweep": raw.pop("sweep")})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, SweepFile, source=str(path))) from None
    base = apply_overrides(raw, overrides)
    variants: list[Variant] = []
    slugs: set[str] = set()
    for i, item in enumerate(spec.sweep):
        variant_raw = dict(base)
        if item.defenses is not None:
            variant_raw["defenses"] = item.defenses.model_dump(mode="json")
        variant_raw = apply_overrides(variant_raw, item.set)
        variant_raw["name"] = f"{base.get('name', 'sweep')}: {item.label}"
        source = f"{path} (sweep[{i}]: {item.label})"
        scenario = build_scenario(variant_raw, source=source)
        slug = f"{i:02d}-{slugify(item.label)}"
        if slug in slugs:
            raise ConfigError(f"{path}: two variants are labelled {item.label!r}")
        slugs.add(slug)
        variants.append(Variant(item.label, slug, scenario))
    return str(base.get("name", path.stem)), variants


def attack_label(entry: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> str:
    """An attack's column name: its kind, with its params when the scenario runs the kind twice.

    Example:
        >>> specs = [{"kind": "lira", "params": {"target_model": "local"}},
        ...          {"kind": "lira", "params": {"target_model": "final"}}]
        >>> attack_label({"attack": "lira", "index": 1}, specs)
        'lira (target_model=final)'
    """
    kind, index = entry["attack"], entry.get("index")
    if index is None or sum(s.get("kind") == kind for s in specs) < 2:
        return kind
    params = specs[index].get("params") or {}
    shown = ", ".join(f"{k}={v}" for k, v in params.items()) or f"#{index}"
    return f"{kind} ({shown})"


def summarise_variant(label: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the sweep table, from a variant's report.

    Example:
        >>> report = {"utility": {"final_test_accuracy": 0.9}, "privacy": None,
        ...           "cost": {"bytes_up_per_client": 100, "seconds": 2.0}, "defenses": [],
        ...           "attacks": [{"attack": "dlg", "status": "ok",
        ...                        "metrics": {"psnr": 30.0, "label_accuracy": 1.0}}]}
        >>> row = summarise_variant("none", report)
        >>> row["attacks"]["dlg"], row["guarantee"]
        ({'status': 'ok', 'psnr': 30.0, 'label_accuracy': 1.0}, 'none')
    """
    privacy = report.get("privacy")
    guarantees = [d["guarantee"] for d in report.get("defenses", [])]
    attacks: dict[str, dict[str, Any]] = {}
    for entry in report["attacks"]:
        name = attack_label(entry, report.get("scenario", {}).get("attacks", []))
        name += " (aggregate)" if entry.get("client") == "aggregate" else ""
        while name in attacks:
            name += "'"
        cell: dict[str, Any] = {"status": entry["status"]}
        cell.update({k: entry["metrics"][k] for k in SUMMARY_METRICS if k in entry["metrics"]})
        if entry["status"] != "ok":
            cell["reason"] = entry.get("reason")
        attacks[name] = cell
    return {
        "label": label,
        "defenses": [d["kind"] for d in report.get("defenses", [])],
        "guarantee": "; ".join(guarantees) if guarantees else "none",
        "epsilon": privacy["epsilon"] if privacy else None,
        "delta": privacy["delta"] if privacy else None,
        "privacy_level": privacy["level"] if privacy else None,
        "final_test_accuracy": report["utility"]["final_test_accuracy"],
        "bytes_up_per_client": report["cost"]["bytes_up_per_client"],
        "seconds": report["cost"].get("seconds"),
        "stopped": report.get("federation", {}).get("stopped"),
        "attacks": attacks,
    }


def run_sweep(
    name: str,
    variants: Sequence[Variant],
    out_dir: Path,
    *,
    run: Callable[[Scenario, Path], dict[str, Any]] | None = None,
    on_variant: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Audit every variant into ``out_dir/variants/`` and write the summary.

    A variant whose folder already holds a report of the very same scenario is not run again;
    ``sweep.json`` is rewritten (atomically) after each variant, so an interrupted sweep loses
    at most the variant it was running, and that one resumes its finished attacks.

    Args:
        run: how to audit one scenario (default :func:`gradaudit.audit.runner.run_audit`).
        on_variant: called as ``on_variant(index, total, label)`` before each variant.
    """
    from gradaudit.audit.runner import run_audit

    audit = run or run_audit
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"schema": SWEEP_SCHEMA, "name": name, "rows": rows}
    for i, variant in enumerate(variants):
        if on_variant is not None:
            on_variant(i, len(variants), variant.label)
        folder = out_dir / "variants" / variant.slug
        report = _finished_report(folder, variant.scenario)
        if report is None:
            logger.info("sweep %s: auditing %s", name, variant.label)
            report = audit(variant.scenario, folder)
        else:
            logger.info("sweep %s: reusing the finished audit of %s", name, variant.label)
        row = summarise_variant(variant.label, report)
        row["folder"] = f"variants/{variant.slug}"
        rows.append(row)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out_dir / "sweep.json", summary)
    write_sweep_html(summary, out_dir)
    return summary


def _finished_report(folder: Path, scenario: Scenario) -> dict[str, Any] | None:
    path = folder / "report.json"
    if not path.is_file():
        return None
    try:
        report = read_json(path, what="variant report")
    except GradauditError:
        return None
    return report if report.get("scenario") == scenario.to_dict() else None


def attack_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The attack names of a sweep, in first-seen order."""
    names: list[str] = []
    for row in rows:
        for name in row["attacks"]:
            if name not in names:
                names.append(name)
    return names


def write_sweep_html(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """Render ``sweep.html`` (the table and the trade-off plot, inline) beside sweep.json."""
    import base64

    from gradaudit.audit import artifacts
    from gradaudit.audit.io import atomic_write_bytes
    from gradaudit.audit.render import environment

    rows = summary["rows"]
    columns = attack_columns(rows)
    png = artifacts.tradeoff_png(rows, columns)
    shown = shown_metrics(rows, columns)
    artifacts.save_png(out_dir / "sweep.png", png)
    html = (
        environment()
        .get_template("sweep.html.j2")
        .render(
            summary=summary,
            columns=columns,
            shown=shown,
            plot="data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        )
    )
    path = out_dir / "sweep.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path


def shown_metrics(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> dict[str, list[tuple[str, str, str]]]:
    """Per attack column, the (key, format, label) of each metric some variant reports."""
    return {
        name: [
            (key, fmt, label)
            for key, fmt, label in SHOWN_METRICS
            if any(key in row["attacks"].get(name, {}) for row in rows)
        ]
        for name in columns
    }


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The sweep table as Markdown (for docs/BENCHMARKS.md)."""
    rows = summary["rows"]
    columns = attack_columns(rows)
    shown = shown_metrics(rows, columns)
    head = ["variant", "guarantee", "ε (δ)", "test acc.", "bytes up"]
    for name in columns:
        head += [f"{name} {label}" for _, _, label in shown[name]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        eps = "—" if row["epsilon"] is None else f"{row['epsilon']:.3g} ({row['delta']:g})"
        cells = [
            row["label"],
            _short_guarantee(row),
            eps,
            f"{row['final_test_accuracy']:.3f}",
            f"{row['bytes_up_per_client']:,}",
        ]
        for name in columns:
            cell = row["attacks"].get(name, {})
            for key, fmt, _ in shown[name]:
                value = cell.get(key)
                missing = "—" if cell.get("status", "ok") == "ok" else cell["status"]
                cells.append(fmt.format(value) if value is not None else missing)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short_guarantee(row: Mapping[str, Any]) -> str:
    """The guarantee column: DP (with its ε beside it), the protocol that hides individual
    updates, heuristic, or none."""
    from gradaudit.defenses import SERVER_DEFENSES

    protocols = [k for k in row["defenses"] if k in SERVER_DEFENSES]
    parts = ["DP"] if row["epsilon"] is not None else []
    parts += [f"{k}: sum only" for k in protocols]
    if not parts and row["defenses"]:
        parts = ["none (heuristic)"]
    return ", ".join(parts) or "—"
