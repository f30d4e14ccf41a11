"""Server-side aggregation protocols: secure aggregation and homomorphic encryption.

Each is registered in :data:`gradaudit.defenses.SERVER_DEFENSES` as a factory
``factory(params, context) -> AggregationProtocol`` (see :mod:`.base`).
"""

from gradaudit.defenses.server import secagg  # noqa: F401  (registers `secagg`)
