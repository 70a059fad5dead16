"""Mask expansion: a 32-byte seed -> n pseudo-random words of Z_{2^32}, from the ChaCha20 stream cipher.

The words are the first 4n bytes of the ChaCha20 keystream of RFC 8439 (section 2.4) with the seed as key,
a nonce of 12 zero bytes and the block counter starting at 1, read as little-endian uint32. Any ChaCha20
implementation reproduces them (RFC 8439's own encryption example starts its counter at 1 too, and
tests/test_secagg_primitives.py checks its test vector). A seed is used for one mask only, so the fixed nonce
never repeats under one key.

libsodium computes it (about 1 GB/s here: 4.5 ms for the 4 MB mask of a 1M-parameter model). pynacl does not
wrap ``crypto_stream_chacha20_ietf_xor_ic``, but its libsodium exports it, so it is called through ctypes,
writing straight into the numpy buffer. Where that symbol is missing the same words come from
ChaCha20-Poly1305 (RFC 8439 section 2.8) encrypting zeros, whose ciphertext is exactly that keystream; it
costs a copy and a MAC (about 8 ms for 4 MB).
"""

from __future__ import annotations

import ctypes

import nacl._sodium
import numpy as np
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

SEED_BYTES = 32
_NONCE = bytes(12)
_FIRST_BLOCK = 1


def _libsodium_stream() -> ctypes._CFuncPtr | None:
    """libsodium's ``crypto_stream_chacha20_ietf_xor_ic`` as loaded by pynacl, or None if it is not exported."""
    try:
        function = ctypes.CDLL(nacl._sodium.__file__).crypto_stream_chacha20_ietf_xor_ic
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
    ]
    return function


_STREAM_XOR_IC = _libsodium_stream()


def _words_by_stream(seed: bytes, count: int) -> np.ndarray:
    assert _STREAM_XOR_IC is not None
    out = np.zeros(count, dtype="<u4")
    address = out.ctypes.data
    if _STREAM_XOR_IC(address, address, 4 * count, _NONCE, _FIRST_BLOCK, seed) != 0:
        raise RuntimeError("libsodium crypto_stream_chacha20_ietf_xor_ic failed")
    return out


def _words_by_aead(seed: bytes, count: int) -> np.ndarray:
    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(4 * count), None, _NONCE, seed)
    return np.frombuffer(sealed, dtype="<u4", count=count)


def keystream_words(seed: bytes, count: int) -> np.ndarray:
    """``count`` words of the ChaCha20 keystream of ``seed`` (see the module docstring), as little-endian uint32."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if count < 0 or 4 * count > 64 * (2**32 - _FIRST_BLOCK):
        raise ValueError(f"cannot expand a seed to {count} words")
    if count == 0:
        return np.zeros(0, dtype="<u4")
    if _STREAM_XOR_IC is not None:
        return _words_by_stream(seed, count)
    return _words_by_aead(seed, count)


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """``acc += sign * keystream(seed)`` in Z_{2^32}, in place (uint32 arithmetic wraps, which is the ring)."""
    words = keystream_words(seed, acc.size)
    if sign > 0:
        np.add(acc, words, out=acc)
    else:
        np.subtract(acc, words, out=acc)
