"""The `gradaudit` command line: audit a scenario, re-render a report, list components."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import gradaudit
from gradaudit.errors import ConfigError, DataError, GradauditError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Audit what federated-learning updates leak, and what each defense costs.",
)
console = Console(stderr=True)
out = Console()

QUICKSTART = "quickstart.yaml"


class Family(StrEnum):
    """What `gradaudit list` can list."""

    datasets = "datasets"
    models = "models"
    attacks = "attacks"
    defenses = "defenses"
    partitions = "partitions"


def _fail(message: str, code: int, exc: BaseException | None = None, debug: bool = False) -> None:
    if debug and exc is not None:
        console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"gradaudit {gradaudit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """gradaudit: what do your federated clients' updates leak?"""


def _quickstart_path() -> Path:
    return Path(str(resources.files("gradaudit.scenarios").joinpath(QUICKSTART)))


DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder with the dataset files [$GRADAUDIT_DATA_DIR]."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
DebugOption = Annotated[bool, typer.Option(help="Show tracebacks of failures.")]


def _with_data_dir(overrides: list[str] | None, data_dir: Path | None) -> list[str]:
    """The ``--set`` overrides, plus ``--data-dir`` as ``data.data_dir``."""
    sets = list(overrides or [])
    if data_dir is not None:
        sets.append(f"data.data_dir={data_dir}")
    return sets


@contextmanager
def _reported_failures(debug: bool, *, what: str, interrupted: str) -> Iterator[None]:
    """Turn what a run raises into one message and an exit code (2 input, 1 run, 130 ^C)."""
    try:
        yield
    except (ConfigError, DataError) as exc:
        _fail(str(exc), 2, exc, debug)
    except GradauditError as exc:
        _fail(str(exc), 1, exc, debug)
    except KeyboardInterrupt:
        _fail(interrupted, 130)
    except Exception as exc:  # a bug or an environment problem: say what, trace only on --debug
        hint = "" if debug else " (run with --debug for the traceback)"
        _fail(f"the {what} failed: {type(exc).__name__}: {exc}{hint}", 1, exc, debug)


@app.command()
def audit(
    scenario: Annotated[
        Path | None, typer.Argument(help="Scenario YAML; the built-in quickstart if omitted.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder [default: audit-<name>].")
    ] = None,
    data_dir: DataDirOption = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a scenario field: --set federation.rounds=3."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Reuse finished attacks of an interrupted run of this scenario.")
    ] = True,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Simulate the federation, attack it as the scenario says, and write the report."""
    from gradaudit.config import load_scenario

    _configure_logging(verbose or debug)
    path = scenario if scenario is not None else _quickstart_path()
    sets = _with_data_dir(overrides, data_dir)
    try:
        resolved = load_scenario(path, sets)
    except ConfigError as exc:
        _fail(str(exc), 2, exc, debug)
    target = out_dir if out_dir is not None else Path(f"audit-{resolved.name}")
    label = "built-in quickstart" if scenario is None else str(path)
    console.print(f"[bold]gradaudit[/] auditing [cyan]{resolved.name}[/] ({label}) → {target}")
    with _reported_failures(
        debug,
        what="run",
        interrupted="interrupted; finished attacks are kept and reused when you run it again",
    ):
        report = _run_with_progress(resolved, target, resume)
    _summarise(report, target)


def _configure_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def _run_with_progress(scenario, target: Path, resume: bool):  # type: ignore[no-untyped-def]
    from gradaudit.audit.runner import AuditHooks, run_audit

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        state: dict[str, object] = {"task": None}

        def on_stage(text: str, total: int | None) -> None:
            previous = state["task"]
            if previous is not None:
                done = progress.tasks[-1]
                progress.update(previous, total=done.total or 1, completed=done.total or 1)  # type: ignore[arg-type]
                progress.stop_task(previous)  # type: ignore[arg-type]
            state["task"] = progress.add_task(text, total=total or 1)

        def on_round(record) -> None:  # type: ignore[no-untyped-def]
            task = state["task"]
            progress.update(
                task,  # type: ignore[arg-type]
                completed=record.round,
                description=f"federated training (accuracy {record.test_accuracy:.3f})",
            )

        def on_attack(done: int, total: int) -> None:
            progress.update(state["task"], completed=done, total=total)  # type: ignore[arg-type]

        hooks = AuditHooks(on_stage=on_stage, on_round=on_round, on_attack_progress=on_attack)
        report = run_audit(scenario, target, hooks=hooks, resume=resume)
        on_stage("report written", 1)
        progress.update(state["task"], completed=1)  # type: ignore[arg-type]
    return report


def defense_lines(report: dict) -> list[str]:  # type: ignore[type-arg]
    """The defenses and the privacy guarantee in plain lines, warnings included.

    Example:
        >>> defense_lines({"defenses": [{"kind": "topk", "guarantee": "none (heuristic)",
        ...     "warnings": []}], "privacy": None})
        ['defense topk: guarantee none (heuristic)']
    """
    lines = [f"defense {d['kind']}: guarantee {d['guarantee']}" for d in report.get("defenses", [])]
    cost = report.get("cost") or {}
    if cost.get("protocol"):
        lines.append(
            f"aggregation {cost['protocol']}: {cost.get('aborted_rounds', 0)} round(s) aborted, "
            f"{cost.get('dropouts_recovered', 0)} dropout(s) recovered, "
            f"{cost.get('updates_lost', 0)} update(s) lost, "
            f"{cost.get('bytes_up_per_client', 0):,} bytes up per client per round"
        )
    privacy = report.get("privacy")
    if privacy:
        eps = privacy["epsilon"]
        shown = "unbounded" if eps is None else f"{eps:.3g}"
        lines.append(
            f"privacy: epsilon {shown} at delta {privacy['delta']:g} ({privacy['level']} level, "
            f"{privacy['accountant']} accountant, {privacy['neighbours']} neighbours)"
        )
        if privacy.get("per_client"):
            worst = sorted(privacy["per_client"].items(), key=lambda kv: -kv[1])[:5]
            lines.append("  per client: " + ", ".join(f"{c}: {e:.3g}" for c, e in worst))
        if privacy.get("protects_against"):
            lines.append(f"  {privacy['protects_against']}")
        if privacy.get("stopped_early"):
            lines.append(f"  stopped early: {privacy['stopped_early']}")
    audit = report.get("privacy_audit")
    if audit and audit.get("status") == "ok":
        lines.append(
            f"DP audit ({audit['level']} level, {audit['canaries']} canaries): epsilon >= "
            f"{audit['epsilon_lower_bound']:.3g} at delta {audit['delta']:g} with "
            f"{audit['confidence']:.0%} confidence ({audit['correct']} of {audit['guesses']} "
            "guesses right)"
        )
    elif audit:
        lines.append(f"DP audit could not run: {audit['reason']}")
    warnings = [w for d in report.get("defenses", []) for w in d.get("warnings", [])]
    lines += [f"warning: {w}" for w in warnings]
    return lines


def _summarise(report: dict, target: Path) -> None:  # type: ignore[type-arg]
    table = Table(title=f"{report['name']}: risk {report['risk']['level'].upper()}")
    table.add_column("attack")
    table.add_column("status")
    table.add_column("metrics")
    table.add_column("seconds", justify="right")
    for item in report["attacks"]:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in item["metrics"].items())
        table.add_row(
            item["attack"],
            item["status"],
            metrics or (item["reason"] or ""),
            f"{item['seconds']:.1f}",
        )
    if report["attacks"]:
        out.print(table)
    else:
        out.print("no attacks configured: utility only")
    out.print(f"final test accuracy: {report['utility']['final_test_accuracy']:.4f}")
    for line in defense_lines(report):
        out.print(line, highlight=False)
    for finding in report["risk"]["findings"]:
        out.print(f" • {finding}", highlight=False)
    out.print(f"report: {target / 'report.html'}  (data: {target / 'report.json'})")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML: a scenario plus a 'sweep' list.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder [default: sweep-<name>].")
    ] = None,
    data_dir: DataDirOption = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field of the base scenario, for every variant."),
    ] = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Audit one scenario under several defenses and tabulate what each buys and costs."""
    from gradaudit.audit.sweep import load_sweep, markdown_table, run_sweep, slugify

    _configure_logging(verbose or debug)
    sets = _with_data_dir(overrides, data_dir)
    try:
        name, variants = load_sweep(sweep_file, sets)
    except ConfigError as exc:
        _fail(str(exc), 2, exc, debug)
    target = out_dir if out_dir is not None else Path(f"sweep-{slugify(name)}")
    console.print(f"[bold]gradaudit[/] sweep [cyan]{name}[/]: {len(variants)} variants → {target}")

    def announce(index: int, total: int, label: str) -> None:
        console.print(f"[bold]variant {index + 1}/{total}[/]: {label}", highlight=False)

    with _reported_failures(
        debug,
        what="sweep",
        interrupted="interrupted; finished variants and attacks are reused when you run it again",
    ):
        summary = run_sweep(
            name,
            variants,
            target,
            run=lambda scenario, folder: _run_with_progress(scenario, folder, True),
            on_variant=announce,
        )
    out.print(markdown_table(summary), highlight=False, markup=False, soft_wrap=True)
    out.print(f"sweep: {target / 'sweep.html'}  (data: {target / 'sweep.json'})")


@app.command()
def report(
    out_dir: Annotated[Path, typer.Argument(help="The folder an audit wrote.")],
    debug: DebugOption = False,
) -> None:
    """Re-render OUT/report.html from OUT/report.json."""
    from gradaudit.audit.render import render_html

    try:
        path = render_html(out_dir)
    except GradauditError as exc:
        _fail(str(exc), 2, exc, debug)
    out.print(f"wrote {path}")


@app.command(name="list")
def list_components(
    family: Annotated[Family, typer.Argument(help="What to list.")] = Family.datasets,
) -> None:
    """List the registered datasets, models, attacks, defenses or partitioners."""
    from gradaudit.attacks import ATTACKS
    from gradaudit.data import DATASETS, PARTITIONERS
    from gradaudit.defenses import CLIENT_DEFENSES, SERVER_DEFENSES
    from gradaudit.models import MODELS

    registries = {
        Family.datasets: [("dataset", DATASETS)],
        Family.models: [("model", MODELS)],
        Family.attacks: [("attack", ATTACKS)],
        Family.partitions: [("partition", PARTITIONERS)],
        Family.defenses: [("client defense", CLIENT_DEFENSES), ("server defense", SERVER_DEFENSES)],
    }[family]
    for title, registry in registries:
        table = Table(title=f"{title}s", title_justify="left")
        table.add_column("name", style="cyan", no_wrap=True)
        table.add_column("params")
        table.add_column("summary")
        for entry in registry.entries():
            fields = ", ".join(
                f"{name}={field.default!r}" if not field.is_required() else name
                for name, field in entry.params.model_fields.items()
            )
            table.add_row(entry.name, fields or "-", entry.summary)
        if not registry.entries():
            table.add_row("-", "-", "none registered in this version")
        out.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
