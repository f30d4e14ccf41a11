"""Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020): the `secagg` defense."""

from gradaudit.defenses.server.secagg.protocol import SecAgg, SecAggParams

__all__ = ["SecAgg", "SecAggParams"]
