"""Defenses: client-side update transforms and server-side aggregation protocols.

Client defenses are registered in :data:`CLIENT_DEFENSES` as factories
``factory(params, context) -> ClientDefense`` (see :mod:`gradaudit.defenses.base`);
:func:`build_client_defenses` turns a scenario's list into the :class:`DefenseStack` the round
loop runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradaudit.errors import ConfigError
from gradaudit.registry import Registry

CLIENT_DEFENSES: Registry[Callable[..., Any]] = Registry("client defense")
"""ClientDefense factories ``(params, context)``, applied by each client before sending."""

SERVER_DEFENSES: Registry[Callable[..., Any]] = Registry("server defense")
"""Aggregation protocols (secure aggregation, homomorphic encryption, robust aggregation)."""


def build_client_defenses(specs: Sequence[Any], context: Any) -> Any:
    """The DefenseStack of `specs` (``ComponentSpec`` items) built with `context`.

    Raises:
        ConfigError: a defense refuses the run's settings (it says which and why), or two
            defenses cannot be combined.
    """
    from gradaudit.defenses.base import DefenseStack

    built = []
    for i, spec in enumerate(specs):
        where = f"defenses.client[{i}]"
        params = CLIENT_DEFENSES.parse_params(spec.kind, spec.params, where=f"{where}.params")
        try:
            built.append(CLIENT_DEFENSES.get(spec.kind)(params, context))
        except ValueError as exc:
            raise ConfigError(f"{where} ({spec.kind}): {exc}") from None
    try:
        return DefenseStack(tuple(built))
    except ValueError as exc:
        raise ConfigError(f"defenses.client: {exc}") from None


def build_server_protocol(specs: Sequence[Any], context: Any) -> Any:
    """The aggregation protocol of `specs` (at most one ``ComponentSpec``), or None.

    Raises:
        ConfigError: more than one protocol, or one that refuses the run's settings.
    """
    if len(specs) > 1:
        kinds = [s.kind for s in specs]
        raise ConfigError(
            f"defenses.server: {kinds}: one aggregation protocol per run (each computes the "
            "whole sum its own way)"
        )
    if not specs:
        return None
    spec = specs[0]
    params = SERVER_DEFENSES.parse_params(spec.kind, spec.params, where="defenses.server[0].params")
    try:
        return SERVER_DEFENSES.get(spec.kind)(params, context)
    except ValueError as exc:
        raise ConfigError(f"defenses.server[0] ({spec.kind}): {exc}") from None


def build_defenses(spec: Any, context: Any) -> tuple[Any, Any]:
    """The client defenses and the aggregation protocol of a scenario's ``defenses`` block:
    ``(DefenseStack, AggregationProtocol | None)``, each built as above."""
    return build_client_defenses(spec.client, context), build_server_protocol(spec.server, context)


from gradaudit.defenses import client as _client  # noqa: E402,F401  (registers the defenses)
from gradaudit.defenses import server as _server  # noqa: E402,F401

__all__ = [
    "CLIENT_DEFENSES",
    "SERVER_DEFENSES",
    "build_client_defenses",
    "build_defenses",
    "build_server_protocol",
]
