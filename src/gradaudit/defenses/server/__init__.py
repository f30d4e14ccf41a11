"""Server-side aggregation protocols: secure aggregation and homomorphic encryption.

Each is registered in :data:`gradaudit.defenses.SERVER_DEFENSES` as a factory
``factory(params, context) -> AggregationProtocol`` (see :mod:`.base`): `secagg` (Bonawitz et
al. with SecAgg+ share groups), `ckks` (TenSEAL CKKS) and `paillier` (integer statistics only).
"""

from gradaudit.defenses.server import ckks, paillier, secagg  # noqa: F401  (registers them)
