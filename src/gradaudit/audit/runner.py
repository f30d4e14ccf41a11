"""Run one scenario end to end: federation, observation, attacks, scoring, report."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradaudit
from gradaudit.attacks import build_attack
from gradaudit.attacks.base import (
    Attack,
    attacker_model,
    client_trains_batchnorm,
    gradient_estimate,
    not_applicable,
    target_update,
)
from gradaudit.attacks.validation import Validation, validate_reconstruction
from gradaudit.audit import artifacts
from gradaudit.audit.inference import save_scores, score_inference
from gradaudit.audit.io import atomic_write_json, read_json
from gradaudit.audit.malicious import EditsModel, malicious_observation
from gradaudit.audit.risk import assess
from gradaudit.audit.scoring import (
    RECOGNISABLE_PSNR,
    psnr_curve,
    score_inputs,
    score_reconstruction,
    score_validation,
    validation_metrics,
)
from gradaudit.config import Scenario
from gradaudit.data import load_dataset, partition_dataset, subsample
from gradaudit.defenses import build_defenses
from gradaudit.defenses.base import DefenseContext, DefenseStack
from gradaudit.federation import Capture, RoundRecord, run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.threat import (
    AGGREGATE_CLIENT,
    aggregate_indices,
    aggregate_view,
    describe_threat,
    observe,
)
from gradaudit.threat.challenge import CHALLENGES, Challenge, ChallengeInputs, public_records
from gradaudit.types import AttackResult, Observation, Visibility

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class AuditHooks:
    """Callbacks through which a front end (the CLI) shows progress; all optional."""

    on_stage: Any = None
    on_round: Any = None
    on_attack_progress: Any = None

    def stage(self, text: str, total: int | None = None) -> None:
        """A new stage of the audit begins."""
        if self.on_stage:
            self.on_stage(text, total)

    def round_done(self, record: RoundRecord) -> None:
        """One federated round finished."""
        if self.on_round:
            self.on_round(record)

    def attack_progress(self, done: int, total: int) -> None:
        """An attack advanced."""
        if self.on_attack_progress:
            self.on_attack_progress(done, total)


def scenario_key(scenario: Scenario) -> str:
    """A hash of the resolved scenario; cached partial results are reused only under it."""
    text = json.dumps(scenario.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{SCHEMA_VERSION}:{gradaudit.__version__}:{text}".encode()).hexdigest()[
        :16
    ]


def versions() -> dict[str, str]:
    """Versions of what produced the numbers."""
    import numpy
    import scipy
    import sklearn

    return {
        "gradaudit": gradaudit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def run_audit(
    scenario: Scenario,
    out_dir: Path,
    *,
    hooks: AuditHooks | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run `scenario`, write ``out_dir/report.json`` and ``out_dir/report.html``, return the report.

    Finished attacks are cached under ``out_dir/.partial/<scenario key>/``; an interrupted run
    of the same scenario reuses them (the federation is recomputed: it is seeded and cheap next to
    the attacks).
    """
    hooks = hooks or AuditHooks()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".partial" / scenario_key(scenario)
    seed = scenario.seed

    hooks.stage("loading data")
    dataset = load_dataset(scenario.data.dataset, scenario.data.data_dir)
    dataset = subsample(
        dataset,
        max_train=scenario.data.max_train_examples,
        max_test=scenario.data.max_test_examples,
        rng=numpy_rng(seed, "subsample"),
    )
    clients = partition_dataset(
        scenario.data.partition.kind,
        scenario.data.partition.params,
        dataset.y_train.numpy(),
        scenario.data.num_clients,
        rng=numpy_rng(seed, "partition"),
        groups=dataset.groups_train,
        dataset=scenario.data.dataset,
    )

    def fresh_model() -> torch.nn.Module:  # the scenario's initial model, again
        return build_model(
            scenario.model.kind,
            scenario.model.params,
            dataset.info,
            generator=torch_generator(seed, "model"),
        )

    model = fresh_model()

    sizes = tuple(len(c) for c in clients)
    context = DefenseContext(model, scenario.federation, sizes, dataset.info, seed)
    defenses, protocol = build_defenses(scenario.defenses, context)
    visibility = protocol.visibility if protocol is not None else Visibility.INDIVIDUAL
    attacks = [
        build_attack(spec.kind, spec.params, where=f"attacks[{index}].params")
        for index, spec in enumerate(scenario.attacks)
    ]
    target = scenario.threat.target
    needs_history = any(a.needs_history for a in attacks)
    capture_rounds = set(range(1, scenario.federation.rounds + 1)) if needs_history else set()
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks.stage("federated training", scenario.federation.rounds)
    fed = run_federation(
        model,
        dataset,
        clients,
        scenario.federation,
        seed=seed,
        capture_rounds=capture_rounds | {target.round},
        defenses=defenses,
        protocol=protocol,
        on_round=hooks.round_done,
    )
    capture = fed.captures.get(target.round)
    never_ran = None
    if capture is None:  # a privacy budget stopped training before the target round
        never_ran = f"training stopped before round {target.round}: {fed.stopped}"
        capture = Capture(target.round, fed.final_state, (), {})
    aborted = [r.aborted for r in fed.rounds if r.round == target.round and r.aborted]
    if aborted:  # the aggregation protocol aborted the round: nothing reached the server
        never_ran = f"the aggregation protocol aborted round {target.round}: {aborted[0]}"
    challenges = build_challenges(
        [a.question for a in attacks if a.question is not None],
        ChallengeInputs(scenario, dataset, clients, fed, numpy_rng(seed, "challenge")),
    )
    public = public_records(
        dataset, [c for c in challenges.values() if isinstance(c, Challenge)]
    )  # handed over only if `knows` grants it

    def observe_round(captured: Capture) -> Observation:
        seen = observe(
            scenario.threat,
            captured,
            scenario.federation,
            dataset.info,
            dataset.y_train,
            visibility=visibility,
            public_data=public,
        )
        return replace(
            seen,
            initial_params=initial_state,
            final_params=fed.final_state,
            side_info={**seen.side_info, "rounds": len(fed.rounds)},
        )

    obs = observe_round(capture)
    history = (
        tuple(
            obs if r == capture.round else observe_round(fed.captures[r])
            for r in sorted(fed.captures)
        )
        if needs_history
        else (obs,)
    )
    plan = capture.plans.get(target.client)
    true_idx = torch.as_tensor(plan.used) if plan is not None else torch.zeros(0, dtype=torch.long)
    views = [(obs, history, true_idx, "")]
    aggregate_obs = (
        aggregate_view(obs, capture, dataset.y_train)
        if visibility is not Visibility.INDIVIDUAL and never_ran is None
        else None
    )
    if aggregate_obs is not None:  # what the aggregate of the included clients leaks
        aggregate_history = tuple(
            view
            for seen in history
            if (
                view := aggregate_obs
                if seen is obs
                else aggregate_view(seen, fed.captures[seen.round], dataset.y_train)
            )
        )
        views.append((aggregate_obs, aggregate_history, aggregate_indices(capture), "_aggregate"))

    replays: dict[int, Observation | str] = {}
    attack_entries: list[dict[str, Any]] = []
    for index, (spec, attack) in enumerate(zip(scenario.attacks, attacks, strict=True)):
        for view, seen_rounds, indices, suffix in views:
            cached = partial / f"attack_{index}{suffix}.json"
            if resume and cached.is_file():
                entry = read_json(cached, what="cached attack result")
                logger.info(
                    "attack %d (%s): reusing the finished result in %s", index, spec.kind, cached
                )
                attack_entries.append(entry)
                continue
            on = " on the aggregate" if suffix else ""
            hooks.stage(f"attack {index + 1}/{len(scenario.attacks)}: {spec.kind}{on}")
            challenge = challenges.get(attack.question) if attack.question else None
            skip = never_ran if never_ran is not None else challenge
            if isinstance(attack, EditsModel) and attack.edits_model and not isinstance(skip, str):
                if index not in replays:  # one replay serves the target and the aggregate rows
                    hooks.stage(f"attack {index + 1}: replaying the federation, server malicious")
                    replays[index] = malicious_observation(
                        attack,
                        scenario,
                        dataset,
                        clients,
                        challenge,  # type: ignore[arg-type]
                        build_model=fresh_model,
                        public_data=public,
                    )
                skip = replays[index]
                view = skip if isinstance(skip, Observation) else view
            if isinstance(skip, str):
                result = not_applicable(spec.kind, view, skip)
            else:
                view = _attack_view(view, attack, challenge, seen_rounds)
                result = _run_one(
                    attack, view, model, torch_generator(seed, "attack", index), hooks
                )
            if isinstance(challenge, Challenge):
                entry = _inference_entry(result, challenge, index, suffix, out_dir)
            else:
                entry = _scored_entry(
                    result, attack, view, model, index, out_dir, dataset, indices, scenario
                )
            entry["index"] = index  # the attack's position in scenario.attacks
            if suffix:
                entry["client"] = "aggregate"
                entry["clients"] = [u.client_id for u in capture.updates]
            if result.status != "failed":  # a failure is retried by the next run
                atomic_write_json(cached, entry)
            attack_entries.append(entry)

    privacy_audit = None
    if scenario.dp_audit is not None:
        hooks.stage("DP audit: a second run with canaries")
        privacy_audit = _dp_audit(scenario, dataset, clients, fresh_model, partial, resume)

    accuracy = [r.test_accuracy for r in fed.rounds]
    described = [d.describe() for d in defenses.defenses]
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "name": scenario.name,
        "scenario": scenario.to_dict(),
        "versions": versions(),
        "threat": {
            "description": describe_threat(scenario.threat),
            "adversary": scenario.threat.adversary,
            "behaviour": scenario.threat.behaviour,
            "knows": list(scenario.threat.knows),
            "target": {"round": target.round, "client": target.client},
        },
        "federation": {
            "engine": fed.engine,
            "num_clients": scenario.data.num_clients,
            "client_sizes": [len(c) for c in clients],
            "stopped": fed.stopped,
            "aborted_rounds": [r.round for r in fed.rounds if r.aborted],
            "rounds": [  # a diverged model's NaN loss becomes null
                _jsonable(
                    {
                        "round": r.round,
                        "sampled": list(r.sampled),
                        "dropped": list(r.dropped),
                        "declined": list(r.declined),
                        "lost": list(r.lost),
                        "recovered": list(r.recovered),
                        "aborted": r.aborted,
                        "test_accuracy": r.test_accuracy,
                        "test_loss": r.test_loss,
                    }
                )
                for r in fed.rounds
            ],
        },
        "utility": {
            "initial_test_accuracy": fed.initial_test_accuracy,
            "test_accuracy": accuracy,
            "final_test_accuracy": accuracy[-1],
        },
        "defenses": [{"side": "client", **d} for d in described]
        + ([{"side": "server", **protocol.describe()}] if protocol is not None else []),
        "visibility": visibility.value,
        "privacy": privacy_block(defenses, described, fed.stopped),
        "privacy_audit": privacy_audit,
        "cost": {
            "seconds": 0.0,
            "bytes_up_per_client": fed.cost.bytes_up_per_client,
            "bytes_down_per_client": fed.cost.bytes_down_per_client,
            "client_seconds": fed.cost.client_seconds,
            "server_seconds": fed.cost.server_seconds,
            "protocol": protocol.name if protocol is not None else None,
            "stages": {k: dict(v) for k, v in fed.cost.stages.items()},
            "network_seconds": fed.cost.network_seconds,
            "clipped_values": fed.cost.clipped,
            "dropouts_recovered": sum(len(r.recovered) for r in fed.rounds),
            "updates_lost": sum(len(r.lost) for r in fed.rounds),
            "aborted_rounds": sum(1 for r in fed.rounds if r.aborted),
        },
        "attacks": attack_entries,
        "risk": assess(attack_entries),
    }
    utility_png = artifacts.utility_png(accuracy, initial=fed.initial_test_accuracy)
    artifacts.save_png(out_dir / "utility.png", utility_png)
    report["artifacts"] = ["utility.png"]
    traces = {
        f"{e['attack']} (client {e['client']})": e["trace"] for e in attack_entries if e["trace"]
    }
    if traces:
        artifacts.save_png(out_dir / "convergence.png", artifacts.convergence_png(traces))
        report["artifacts"].append("convergence.png")
    curves = {
        f"{e['attack']} (client {e['client']})": e["psnr_curve"]
        for e in attack_entries
        if e.get("psnr_curve")
    }
    if curves:
        artifacts.save_png(
            out_dir / "psnr_curve.png",
            artifacts.psnr_curve_png(curves, recognisable_db=RECOGNISABLE_PSNR),
        )
        report["artifacts"].append("psnr_curve.png")
    rocs: dict[str, list[list[float]]] = {}
    for e in attack_entries:
        if e.get("roc"):
            label = f"{e['attack']} (client {e['client']})"
            rocs[label if label not in rocs else f"{label} #{len(rocs) + 1}"] = e["roc"]
    if rocs:
        artifacts.save_png(out_dir / "roc.png", artifacts.roc_png(rocs))
        report["artifacts"].append("roc.png")
    report["cost"]["seconds"] = round(time.perf_counter() - started, 3)
    write_report(report, out_dir)
    return report


def _dp_audit(
    scenario: Scenario,
    dataset: Any,
    clients: list[np.ndarray],
    fresh_model: Any,
    partial: Path,
    resume: bool,
) -> dict[str, Any]:
    """The report's ``privacy_audit`` block (cached in `partial` like a finished attack)."""
    from gradaudit.audit.dp_audit import run_dp_audit

    cached = partial / "dp_audit.json"
    if resume and cached.is_file():
        return read_json(cached, what="cached DP audit")
    try:
        block = {
            "status": "ok",
            **run_dp_audit(scenario, dataset, clients, build_model=fresh_model),
        }
    except ValueError as exc:
        logger.warning("the DP audit could not run: %s", exc)
        return {"status": "failed", "reason": str(exc)}
    atomic_write_json(cached, block)
    return block


def build_challenges(questions: list[str], inputs: ChallengeInputs) -> dict[str, Challenge | str]:
    """One challenge per distinct question, or the reason it could not be built (its attacks
    are then reported as not applicable with that reason)."""
    out: dict[str, Challenge | str] = {}
    for question in dict.fromkeys(questions):
        try:
            out[question] = CHALLENGES.get(question)(inputs)
        except ValueError as exc:
            logger.warning("no %s challenge: %s", question, exc)
            out[question] = f"no {question} question can be asked: {exc}"
    return out


def _attack_view(
    view: Observation,
    attack: Attack,
    challenge: Challenge | None,
    history: tuple[Observation, ...],
) -> Observation:
    """`view` with what this attack asks for: every round's view, the candidate records."""
    changes: dict[str, Any] = {}
    if attack.needs_history:
        changes["history"] = history
    if challenge is not None:
        changes["side_info"] = {**view.side_info, "candidates": challenge.public}
    return replace(view, **changes) if changes else view


def _inference_entry(
    result: AttackResult, challenge: Challenge, index: int, suffix: str, out_dir: Path
) -> dict[str, Any]:
    """The report entry of an inference attack, scored on its challenge; the per-record scores
    are saved beside the report (``scores/attack<index>.csv``)."""
    entry, _ = _entry(result, index, out_dir, None, torch.zeros(0, dtype=torch.long), ())
    entry.update(question=challenge.question, intervals={}, notes=list(challenge.notes))
    scores = result.reconstruction.scores
    if result.status != "ok":
        return entry
    if scores is None:
        entry.update(status="failed", reason="the attack returned no scores")
        return entry
    values = scores.detach().double().numpy()
    try:
        scored = score_inference(values, challenge)
    except ValueError as exc:
        entry.update(status="failed", reason=f"unusable scores: {exc}")
        return entry
    entry.update(scored)
    name = f"scores/attack{index}{suffix}.csv"
    save_scores(out_dir / name, values, challenge)
    entry["artifacts"].append(name)
    return entry


def privacy_block(
    defenses: DefenseStack, described: list[dict[str, Any]], stopped: str | None
) -> dict[str, Any] | None:
    """The report's ``privacy`` block: the DP defense's epsilon with its context, else None.

    `described` holds each defense's `describe()` entry, in order. Only a defense with a
    formal guarantee and an accountant contributes; heuristic defenses appear under
    ``defenses`` with the guarantee ``none (heuristic)``, never here.
    """
    for defense, entry in zip(defenses.defenses, described, strict=True):
        report = defense.privacy()
        if report is None:
            continue
        return {
            **report.as_dict(),
            "mechanism": defense.name,
            "guarantee": entry["guarantee"],
            "protects_against": entry.get("protects_against"),
            "stopped_early": stopped,
            "warnings": entry["warnings"],
        }
    return None


def _scored_entry(
    result: AttackResult,
    attack: Attack,
    view: Observation,
    model: torch.nn.Module,
    index: int,
    out_dir: Path,
    dataset: Any,
    indices: torch.Tensor,
    scenario: Scenario,
) -> dict[str, Any]:
    """The report entry of `result`, scored against the examples at `indices` (the private
    truth behind the attacked update), with the attacker's own validation."""
    true_labels = dataset.y_train[indices]
    norm = dataset.info.normalization
    true_images = (
        norm.denormalize(dataset.x_train[indices]).clamp(0, 1)
        if norm is not None and dataset.info.modality == "image"
        else None
    )
    validation = validate(result, attack, view, model)
    entry, perm = _entry(result, index, out_dir, true_images, true_labels, dataset.info.class_names)
    rec = result.reconstruction
    if result.status == "ok" and any(v is not None for v in (rec.rows, rec.tokens, rec.bag)):
        metrics, shown = score_inputs(rec, dataset.x_train[indices], dataset.info, dataset.x_test)
        entry["metrics"].update(metrics)
        entry["recovered"] = _jsonable(shown)
    _add_validation(entry, result, validation, true_images, perm, scenario.threat.keep_threshold)
    return entry


def _run_one(
    attack: Attack, obs: Any, model: torch.nn.Module, rng: torch.Generator, hooks: AuditHooks
) -> AttackResult:
    started = time.perf_counter()
    try:  # run() itself returns not_applicable, with the model at hand for its checks
        return attack.run(obs, model, rng=rng, progress=hooks.attack_progress)
    except Exception as exc:  # one broken attack is reported, it does not sink the audit
        logger.debug("attack %s failed", attack.name, exc_info=True)
        return AttackResult(
            attack.name,
            obs.round,
            obs.target_client,
            "failed",
            reason=f"{type(exc).__name__}: {exc}",
            seconds=time.perf_counter() - started,
            details={"traceback": traceback.format_exc(limit=8)},
        )


def validate(
    result: AttackResult, attack: Attack, obs: Observation, model: torch.nn.Module
) -> Validation | str | None:
    """The attacker's own confidence in each image `result` reconstructed.

    Uses only the observation and the reconstruction (`attacks.validation`), with the
    BatchNorm mode the attack assumed (its ``client_mode`` parameter, else ``auto``). Labels
    are those the attack used, else the granted ones.

    Returns:
        The validation; None when there is nothing to validate (no images, or the attack did
        not succeed); a sentence when validation was not possible or failed.
    """
    rec = result.reconstruction
    norm = obs.task.normalization
    if result.status != "ok" or rec.images is None or norm is None:
        return None
    update, reason = target_update(obs)
    if update is None:
        return f"no update to validate against: {reason}"
    labels = rec.labels
    granted = obs.side_info.get("labels")
    if labels is None and isinstance(granted, torch.Tensor):
        labels = granted
    mode = getattr(getattr(attack, "params", None), "client_mode", "auto")
    target, _ = gradient_estimate(update, obs)
    try:
        return validate_reconstruction(
            attacker_model(model, obs),
            norm.normalize(rec.images),
            labels,
            target,
            train_mode=client_trains_batchnorm(obs, mode),
            fit_scale=update.kind == "delta",
        )
    except (ValueError, RuntimeError) as exc:  # a report without confidences beats no report
        logger.debug("validation of %s failed", result.attack, exc_info=True)
        return f"validation failed: {type(exc).__name__}: {exc}"


def _add_validation(
    entry: dict[str, Any],
    result: AttackResult,
    validation: Validation | str | None,
    true_images: torch.Tensor | None,
    perm: torch.Tensor | None,
    threshold: float,
) -> None:
    """Put the keep rule's outcome, the per-image table and the PSNR curve into `entry`.

    `perm` is the matching of reconstructions to true images that scoring already found.
    """
    entry["psnr_curve"] = []
    if result.status != "ok" or true_images is None:
        return
    rec = result.reconstruction
    if result.snapshots:
        entry["psnr_curve"] = psnr_curve(result.snapshots, true_images)
    if isinstance(validation, str):
        entry["validation"] = {"method": None, "note": validation}
        return
    if validation is None or rec.images is None or perm is None:
        return
    summary, rows = score_validation(
        rec.images, true_images, perm, validation.confidence, threshold, rec.labels
    )
    entry["validation"] = {"method": validation.method, "note": validation.note, **summary}
    entry["per_example"] = rows
    entry["metrics"].update(validation_metrics(summary))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _entry(
    result: AttackResult,
    index: int,
    out_dir: Path,
    true_images: torch.Tensor | None,
    true_labels: torch.Tensor,
    class_names: tuple[str, ...],
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The report entry of one attack, and the matching of its reconstructions (if any)."""
    entry: dict[str, Any] = {
        "attack": result.attack,
        "round": result.round,
        "client": result.client,
        "status": result.status,
        "reason": result.reason,
        "metrics": {},
        "seconds": round(result.seconds, 3),
        "details": _jsonable(dict(result.details)),
        "artifacts": [],
        "trace": [list(t) for t in result.trace],
    }
    if result.status != "ok":
        return entry, None
    rec = result.reconstruction
    metrics, perm = score_reconstruction(rec, true_images, true_labels)
    entry["metrics"] = metrics
    if rec.labels is not None:
        recovered = sorted(int(v) for v in rec.labels)
        truth = sorted(int(v) for v in true_labels)
        entry["details"]["recovered_labels"] = recovered
        entry["details"]["true_labels"] = truth
        if class_names:
            entry["details"]["recovered_label_names"] = [class_names[v] for v in recovered]
            entry["details"]["true_label_names"] = [class_names[v] for v in truth]
    if rec.images is not None and true_images is not None and perm is not None:
        who = "aggregate" if result.client == AGGREGATE_CLIENT else f"c{result.client}"
        name = f"reconstructions/attack{index}_r{result.round}_{who}.png"
        png = artifacts.comparison_png(true_images, rec.images[perm])
        artifacts.save_png(out_dir / name, png)
        entry["artifacts"].append(name)
    return entry, perm


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write report.json and render report.html beside it, both atomically."""
    from gradaudit.audit.render import render_html

    atomic_write_json(out_dir / "report.json", report)
    render_html(out_dir)
