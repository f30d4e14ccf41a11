"""Client-side defenses; importing this package registers each in CLIENT_DEFENSES."""

from gradaudit.defenses.client import (
    budget,  # noqa: F401
    compression,  # noqa: F401
    dp_gaussian,  # noqa: F401
    partition,  # noqa: F401
    perturbation,  # noqa: F401
    soteria,  # noqa: F401
)
