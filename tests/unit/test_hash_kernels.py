"""The hashing kernels: xxHash64, and the consistent-hashing kernels built on it.

Every test that takes ``impl`` runs on the pure-Python twins (``lbgw.picking``)
and on the compiled kernels (``lbgw._fastpick``). What is checked is what a
session-affinity user notices: a key keeps its endpoint across processes,
input orders and other endpoints' outages, and only the keys of an endpoint
that leaves move.
"""

from __future__ import annotations

import pytest

from lbgw import _fastpick, picking
from tests.unit.kernel_support import Impl

# --- xxHash64 ------------------------------------------------------------------

# The first vectors are the ones published with xxHash and its bindings; the rest
# were computed with the reference implementation (python-xxhash 3.x, which wraps
# Yann Collet's C code) and cover each code path: the 32-byte stripes, the 8-byte
# and 4-byte tails, single bytes, and seeds at both ends of 64 bits.
XXH64_VECTORS = [
    (b"", 0, 0xEF46DB3751D8E999),
    (b"a", 0, 0xD24EC4F1A98C6E5B),
    (b"abc", 0, 0x44BC2CF5AD770999),
    (b"Nobody inspects the spammish repetition", 0, 0xFBCEA83C8A378BF1),
    (b"", 1, 0xD5AFBA1336A3BE4B),
    (b"abcd", 0, 0xDE0327B0D25D92CC),
    (b"abcdefgh", 0, 0x3AD351775B4634B7),
    (b"abcdefghi", 12345, 0x43EFB5BC4B9E2550),
    (b"127.0.0.1:50051", 0, 0xA210BDD4D2A541F5),
    (b"127.0.0.1:50051", 1, 0x9612812B6FFDB084),
    (b"127.0.0.1:50051_0", 0, 0x2AA0808C170B12A2),
    (bytes(range(32)), 0, 0xCBF59C5116FF32B4),
    (bytes(range(100)), 2**64 - 1, 0x09A991A091C9F6D7),
]


@pytest.mark.parametrize(("data", "seed", "expected"), XXH64_VECTORS)
def test_hash64_is_xxhash64(impl: Impl, data: bytes, seed: int, expected: int) -> None:
    assert impl.hash64(data, seed) == expected
    if seed == 0:
        assert impl.hash64(data) == expected


def test_hash64_seed_is_taken_modulo_2_64(impl: Impl) -> None:
    assert impl.hash64(b"abc", -1) == impl.hash64(b"abc", 2**64 - 1)
    assert impl.hash64(b"abc", 2**64 + 5) == impl.hash64(b"abc", 5)


def test_hash64_twins_agree_on_every_length() -> None:
    data = bytes((i * 131 + 7) % 256 for i in range(300))
    for n in range(len(data) + 1):
        for seed in (0, 1, 0x9E3779B97F4A7C15):
            assert picking.hash64(data[:n], seed) == _fastpick.hash64(data[:n], seed), n


@pytest.mark.parametrize("bad", ["abc", bytearray(b"abc"), memoryview(b"abc"), None, 3])
def test_hash64_takes_only_bytes(impl: Impl, bad: object) -> None:
    with pytest.raises(TypeError):
        impl.hash64(bad)  # type: ignore[arg-type]


def test_hash64_seed_must_be_an_integer(impl: Impl) -> None:
    with pytest.raises(TypeError):
        impl.hash64(b"abc", 1.0)  # type: ignore[arg-type]
