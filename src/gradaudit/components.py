"""Checks every component named in a scenario against its registry, before anything runs."""

from __future__ import annotations

from gradaudit.config import Scenario
from gradaudit.errors import ConfigError


def validate_components(scenario: Scenario, *, source: str = "") -> None:
    """Raise ConfigError if a component name is unknown or its params are invalid.

    Errors carry the dotted path of the offending field, e.g. ``attacks[1].params.iterations``.
    """
    from gradaudit.attacks import ATTACKS
    from gradaudit.data import DATASETS, PARTITIONERS
    from gradaudit.defenses import CLIENT_DEFENSES, SERVER_DEFENSES
    from gradaudit.models import MODELS

    where = f" in {source}" if source else ""
    checks = [
        (DATASETS, "data.dataset", scenario.data.dataset, None),
        (
            PARTITIONERS,
            "data.partition",
            scenario.data.partition.kind,
            scenario.data.partition.params,
        ),
        (MODELS, "model", scenario.model.kind, scenario.model.params),
    ]
    checks += [
        (ATTACKS, f"attacks[{i}]", spec.kind, spec.params)
        for i, spec in enumerate(scenario.attacks)
    ]
    checks += [
        (CLIENT_DEFENSES, f"defenses.client[{i}]", spec.kind, spec.params)
        for i, spec in enumerate(scenario.defenses.client)
    ]
    checks += [
        (SERVER_DEFENSES, f"defenses.server[{i}]", spec.kind, spec.params)
        for i, spec in enumerate(scenario.defenses.server)
    ]
    for registry, path, kind, params in checks:
        if kind not in registry:
            known = ", ".join(registry.names()) or "(none yet)"
            field = path if path.endswith("dataset") else f"{path}.kind"
            raise ConfigError(
                f"invalid scenario{where}:\n  {field}: unknown {registry.family} {kind!r}; "
                f"known: {known}"
            )
        if params is not None:
            registry.parse_params(kind, params, where=f"{path}.params", source=source)
