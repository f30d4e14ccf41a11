"""The scenario: one validated YAML file describing the federation, the threat and the attacks."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gradaudit.errors import ConfigError

KNOWLEDGE = ("labels", "batch_size", "architecture", "local_hyperparameters", "public_data")
"""Side information a threat model may grant the adversary."""


class Spec(BaseModel):
    """Base of every config model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ComponentSpec(Spec):
    """A pluggable component: its registry name and its own parameters (validated by it)."""

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class DataSpec(Spec):
    """Which dataset, where its files are, and how it is split among clients."""

    dataset: str
    data_dir: Path | None = None
    num_clients: int = Field(8, ge=1)
    partition: ComponentSpec = ComponentSpec(kind="iid")
    max_train_examples: int | None = Field(
        None, ge=1, description="Use only this many training examples (a seeded random subset)."
    )
    max_test_examples: int | None = Field(None, ge=1)


class LocalSpec(Spec):
    """How each client trains locally (plain SGD).

    FedSGD computes one gradient on one batch of `batch_size` examples. FedAvg runs `epochs` passes
    over the client's data, or exactly `steps` steps when `steps` is set.
    """

    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.1, gt=0)
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    batchnorm: Literal["train", "frozen"] = Field(
        "train",
        description="train: BatchNorm normalises with each local batch's statistics; frozen: "
        "with the global model's running statistics, left unchanged (for small local batches)",
    )

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> LocalSpec:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give either local.epochs or local.steps, not both")
        return self


class NetworkSpec(Spec):
    """An unreliable network between the clients and the server.

    At every stage of the aggregation protocol (one upload in the clear; five stages under
    ``secagg``) each client still in the round vanishes with probability `dropout` (a float for
    every stage, or a mapping from stage name to probability), and each message it sends takes a
    log-normal latency plus its size over `bandwidth_mbps`. A message later than `timeout` is a
    straggler: the server stops waiting and treats its sender as dropped for the rest of the round.
    """

    dropout: float | dict[str, float] = Field(0.0, description="per-stage dropout probability")
    dropout_scope: Literal["stage", "round"] = Field(
        "stage",
        description="stage: a float `dropout` strikes at every stage; round: it is the chance a "
        "client drops somewhere in the round, spread evenly over the protocol's stages (compares "
        "protocols with different numbers of stages fairly)",
    )
    latency_median: float = Field(0.05, ge=0, description="median one-way latency, seconds")
    latency_sigma: float = Field(0.5, ge=0, description="log-normal sigma of the latency")
    bandwidth_mbps: float | None = Field(
        None, gt=0, description="each client's link in Mbit/s (None: size costs no time)"
    )
    timeout: float = Field(30.0, gt=0, description="seconds the server waits at each stage")

    @model_validator(mode="after")
    def _probabilities(self) -> NetworkSpec:
        rates = self.dropout.values() if isinstance(self.dropout, dict) else [self.dropout]
        if any(not 0 <= r < 1 for r in rates):
            raise ValueError("network.dropout: every probability must be in [0, 1)")
        return self


class FederationSpec(Spec):
    """The training protocol: algorithm, rounds, client sampling and dropouts."""

    algorithm: Literal["fedsgd", "fedavg"] = "fedsgd"
    rounds: int = Field(1, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    sample_rate: float | None = Field(None, gt=0, le=1)
    local: LocalSpec = LocalSpec()
    dropout_rate: float = Field(
        0.0, ge=0, lt=1, description="probability a sampled client never starts the round"
    )
    network: NetworkSpec | None = Field(
        None, description="dropouts and stragglers during aggregation (None: a reliable network)"
    )
    engine: Literal["auto", "vectorised", "loop"] = "auto"

    @model_validator(mode="after")
    def _one_sampler(self) -> FederationSpec:
        if self.clients_per_round is not None and self.sample_rate is not None:
            raise ValueError("give either clients_per_round or sample_rate (Poisson), not both")
        return self


class DefensesSpec(Spec):
    """Client-side update transforms, applied in order, and server-side aggregation protocols."""

    client: tuple[ComponentSpec, ...] = ()
    server: tuple[ComponentSpec, ...] = ()


class TargetSpec(Spec):
    """The round (from 1) and the client the adversary attacks."""

    round: int = Field(1, ge=1)
    client: int = Field(0, ge=0)


class CandidatesSpec(Spec):
    """The records a membership attack is shown (``threat.challenge``).

    Members are the target client's training records (all of them, or a random `members` of
    them); non-members are records of the held-out test split, as many as the members unless
    `non_members` says otherwise. Every membership attack of a scenario is scored on the same
    candidates.
    """

    members: int | None = Field(None, ge=1, description="cap on the members tested")
    non_members: int | None = Field(None, ge=1, description="held-out records tested")


class ThreatSpec(Spec):
    """Who the adversary is, how it behaves, and what side information it has."""

    adversary: Literal["server"] = "server"
    behaviour: Literal["honest_but_curious", "malicious"] = Field(
        "honest_but_curious",
        description="malicious: the server may also change the model it sends (an attack that "
        "does so, e.g. membership_active, runs on its own copy of the federation)",
    )
    knows: tuple[
        Literal["labels", "batch_size", "architecture", "local_hyperparameters", "public_data"],
        ...,
    ] = ("architecture", "batch_size")
    """Side information granted. ``public_data``: labelled examples from the task's distribution
    that no client trains on (the dataset's held-out test split), e.g. for a generative prior."""
    target: TargetSpec = TargetSpec()
    candidates: CandidatesSpec = CandidatesSpec()
    keep_threshold: float = Field(
        0.75,
        ge=-1,
        le=1,
        description="the attacker keeps a reconstructed image when its confidence (a cosine "
        "between its gradient and its share of the observed update, "
        "attacks.validation) reaches this value; the report says how precise that choice is "
        "(0.75: calibrated on CIFAR-10 and digits, docs/BENCHMARKS.md)",
    )


class DpAuditSpec(Spec):
    """An empirical lower bound on epsilon from canaries inserted in one training run.

    Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023;
    canary clients for client-level DP as in Andrew et al., "One-shot Empirical Privacy
    Estimation for Federated Learning", ICLR 2024. The audit runs its own copy of the federation
    with the canaries, so the audited run's numbers are untouched.
    """

    canaries: int = Field(1000, ge=2, description="canaries, each inserted with probability 1/2")
    level: Literal["auto", "client", "sample"] = Field(
        "auto", description="auto: the level of the scenario's DP defense"
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the lower bound")


class Scenario(Spec):
    """One audit: data, model, federation, defenses, threat model and attacks."""

    name: str = "scenario"
    description: str = ""
    seed: int = 0
    data: DataSpec
    model: ComponentSpec
    federation: FederationSpec = FederationSpec()
    defenses: DefensesSpec = DefensesSpec()
    threat: ThreatSpec = ThreatSpec()
    attacks: tuple[ComponentSpec, ...] = ()
    dp_audit: DpAuditSpec | None = None

    @model_validator(mode="after")
    def _target_in_range(self) -> Scenario:
        if self.threat.target.round > self.federation.rounds:
            raise ValueError(
                f"threat.target.round is {self.threat.target.round} but federation.rounds is "
                f"{self.federation.rounds}"
            )
        if self.threat.target.client >= self.data.num_clients:
            raise ValueError(
                f"threat.target.client is {self.threat.target.client} but data.num_clients is "
                f"{self.data.num_clients} (clients are numbered from 0)"
            )
        if (
            self.federation.clients_per_round is not None
            and self.federation.clients_per_round > self.data.num_clients
        ):
            raise ValueError("federation.clients_per_round exceeds data.num_clients")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario as plain YAML/JSON-friendly data."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- errors


def _format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for listing allowed keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(
    err: ValidationError, model: type[BaseModel], *, prefix: str = "", source: str = ""
) -> str:
    """One readable line per problem: the dotted path of the field, and what is allowed."""
    lines = []
    for item in err.errors():
        loc = [p for p in item["loc"] if p not in ("function-after",)]
        path = _format_loc([*([prefix] if prefix else []), *loc])
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            if owner is not None and not owner.model_fields:
                lines.append(f"{path}: unknown key; this component takes no parameters")
            else:
                lines.append(f"{path}: unknown key; allowed keys here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            shown = item.get("input")
            got = "" if isinstance(shown, dict | list) or shown is None else f" (got {shown!r})"
            lines.append(f"{path}: {msg}{got}")
    where = f" in {source}" if source else ""
    return f"invalid scenario{where}:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for raw in path.replace("[", ".").replace("]", "").split("."):
        if raw == "":
            raise ConfigError(f"--set {path!r}: empty segment in the key path")
        parts.append(int(raw) if raw.isdigit() else raw)
    return parts


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each ``a.b.c=value`` (or ``attacks[0].params.x=1``) applied.

    Values are parsed as YAML, so ``3``, ``0.5``, ``true``, ``[64, 64]`` and ``null`` work.

    Example:
        >>> apply_overrides({"federation": {"rounds": 1}}, ["federation.rounds=3"])
        {'federation': {'rounds': 3}}
    """
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. federation.rounds=3")
        key, text = item.split("=", 1)
        parts = _split_path(key.strip())
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise ConfigError(
                        f"--set {key}: no list item {part!r} at {_format_loc(parts[:depth])}"
                    )
                node = node[part]
            else:
                if isinstance(part, int):
                    raise ConfigError(f"--set {key}: {_format_loc(parts[:depth])} is not a list")
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last > len(node):
                raise ConfigError(f"--set {key}: no list item {last!r}")
            if last == len(node):
                node.append(_parse_value(text))
            else:
                node[last] = _parse_value(text)
        elif isinstance(node, dict):
            node[str(last)] = _parse_value(text)
        else:
            raise ConfigError(f"--set {key}: {_format_loc(parts[:-1])} is not a mapping")
    return out


# --------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a scenario file into a mapping; a missing or malformed file is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"scenario file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"scenario path is not a file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def build_scenario(raw: Mapping[str, Any], *, source: str = "") -> Scenario:
    """Validate a raw mapping into a Scenario, including every component's own parameters."""
    try:
        scenario = Scenario.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Scenario, source=source)) from None
    from gradaudit.components import validate_components  # registries import heavy modules

    validate_components(scenario, source=source)
    return scenario


def load_scenario(path: Path | str, overrides: Sequence[str] = ()) -> Scenario:
    """Read, override and validate a scenario file."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return build_scenario(raw, source=str(path))


def dump_scenario(scenario: Scenario) -> str:
    """The scenario as YAML text that `load_scenario` reads back to an equal scenario."""
    return yaml.safe_dump(scenario.to_dict(), sort_keys=False)
