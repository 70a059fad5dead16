"""Mask expansion: a 32-byte seed -> n pseudo-random words of Z_{2^32}, from the ChaCha20 stream cipher.

The words are the first 4n bytes of the ChaCha20 keystream of RFC 8439 (section 2.4) with the seed as key,
a nonce of 12 zero bytes and the block counter starting at 1, read as little-endian uint32. Any ChaCha20
implementation reproduces them (RFC 8439's own encryption example starts its counter at 1 too, and
tests/test_secagg_primitives.py checks its test vector). A seed is used for one mask only, so the fixed nonce
never repeats under one key.

OpenSSL computes it, through the ``cryptography`` package: its ChaCha20 takes a 16-byte IV, the 32-bit block
counter (little-endian) followed by the RFC's 12-byte nonce. Here it writes a 4 MB mask (a 1M-parameter model)
in about 1.3 ms; libsodium's ChaCha20 through pynacl took about 2.1 ms. A device adds k + 1 masks to its
input and the aggregator takes hundreds off a sum, so :func:`add_masks` expands all of them together, a chunk
of words at a time into one small buffer that stays in the CPU cache, and adds each chunk in place: no mask
is ever held whole, and no large buffer is allocated (first-touch page faults of fresh 4 MB arrays cost as
much as the additions).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_IV = (1).to_bytes(4, "little") + bytes(12)  # block counter 1, then the 12 zero bytes of the nonce
_MAX_WORDS = 16 * (2**32 - 1)  # blocks 1 .. 2^32 - 1 of 16 words: the counter never wraps
CHUNK_WORDS = 16384  # 64 KiB of keystream per step: the buffer, the zeros and a chunk of the sum stay in cache


def _keystream(seed: bytes):
    """A ChaCha20 encryptor of ``seed`` positioned at word 0 of the mask: encrypting zeros gives the words."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _IV), mode=None).encryptor()


def _check_count(count: int) -> None:
    if count < 0 or count > _MAX_WORDS:
        raise ValueError(f"cannot expand a seed to {count} words")


def keystream_words(seed: bytes, count: int) -> np.ndarray:
    """``count`` words of the ChaCha20 keystream of ``seed`` (see the module docstring), as little-endian uint32."""
    stream = _keystream(seed)
    _check_count(count)
    out = np.empty(count, dtype="<u4")
    if count:
        stream.update_into(bytes(4 * count), memoryview(out).cast("B"))
    return out


def add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """``acc += sum of sign * keystream(seed)`` over ``masks`` ((seed, +1 or -1) pairs), in Z_{2^32}, in place.

    ``acc`` is a contiguous uint32 vector; uint32 arithmetic wraps, which is the ring."""
    if acc.dtype != np.dtype("<u4") or not acc.flags.c_contiguous or acc.ndim != 1:
        raise ValueError("masks are added to a contiguous little-endian uint32 vector")
    _check_count(acc.size)
    streams = [(_keystream(seed), np.add if sign > 0 else np.subtract) for seed, sign in masks]
    if not streams or not acc.size:
        return
    buffer = np.empty(min(CHUNK_WORDS, acc.size), dtype="<u4")
    zeros = bytes(4 * buffer.size)
    for start in range(0, acc.size, buffer.size):
        part = acc[start : start + buffer.size]
        words = buffer[: part.size]
        plain = zeros if part.size == buffer.size else zeros[: 4 * part.size]
        out = memoryview(words).cast("B")
        for stream, operation in streams:
            stream.update_into(plain, out)
            operation(part, words, out=part)


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """``acc += sign * keystream(seed)`` in Z_{2^32}, in place: :func:`add_masks` with one mask."""
    add_masks(acc, [(seed, sign)])
