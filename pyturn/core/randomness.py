"""The core's one source of randomness: relay ports, CONNECTION-IDs, transaction IDs of
the indications it makes, and the nonce and reservation-token secret.

`SystemRandom` draws from the OS (a CSPRNG, as RFC 8656 §7.2 asks for ports) 4 KB at a
time instead of one system call per value; `SeededRandom` replays the same values for
a seed, so that core tests can pin what a server picks.
"""

from __future__ import annotations

import os
import random
from typing import Protocol


class RandomSource(Protocol):
    def token(self, size: int) -> bytes:
        """`size` random bytes."""

    def below(self, n: int) -> int:
        """A random integer in [0, n), for n up to 2**32."""


class SystemRandom:
    __slots__ = ("_pool",)

    def __init__(self) -> None:
        self._pool = bytearray()

    def token(self, size: int) -> bytes:
        pool = self._pool
        if len(pool) < size:
            pool.extend(os.urandom(max(4096, size)))
        value = bytes(pool[-size:])
        del pool[-size:]
        return value

    def below(self, n: int) -> int:
        # 48 bits reduced modulo n (n <= 2**32): no value is favoured by more than 2**-16.
        return int.from_bytes(self.token(6), "big") % n


class SeededRandom:
    """Deterministic, for tests only: never cryptographically strong."""

    __slots__ = ("_random",)

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def token(self, size: int) -> bytes:
        return self._random.randbytes(size)

    def below(self, n: int) -> int:
        return self._random.randrange(n)
