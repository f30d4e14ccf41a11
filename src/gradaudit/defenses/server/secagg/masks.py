"""Key derivation and mask expansion for secure aggregation.

Masks are the AES-256-CTR keystream under a 32-byte key, read as little-endian ring elements:
a cryptographic PRG keyed by the full shared secret (HKDF-SHA256 of the X25519 result), not a
short seed fed to a statistical generator (the flaw of flwr#7522).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32


def derive_key(shared: bytes, *, label: str, session: bytes, parties: tuple[int, ...]) -> bytes:
    """A 32-byte key for `label` between `parties` in `session`, from an X25519 secret (HKDF)."""
    info = f"gradaudit/secagg/{label}/" + ",".join(str(p) for p in sorted(parties))
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info.encode()
    ).derive(shared)


class MaskExpander:
    """Expands keys into masks and adds them to ring vectors, reusing one keystream buffer.

    Args:
        size: entries per vector.
        dtype: the ring's unsigned dtype (uint32 or uint64).
    """

    def __init__(self, size: int, dtype: type[np.unsignedinteger]) -> None:
        self.size = size
        self.dtype = np.dtype(dtype)
        nbytes = size * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        self._buffer = bytearray(nbytes + 16)  # update_into wants a block of slack
        self._mask = np.frombuffer(self._buffer, dtype=self.dtype.newbyteorder("<"), count=size)

    def mask(self, key: bytes) -> np.ndarray:
        """The mask of `key` (a view into the shared buffer: copy it to keep it)."""
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return self._mask

    def apply(self, acc: np.ndarray, key: bytes, *, sign: int) -> None:
        """``acc += sign * mask(key)`` in the ring, in place."""
        mask = self.mask(key)
        if sign > 0:
            np.add(acc, mask, out=acc)
        else:
            np.subtract(acc, mask, out=acc)
