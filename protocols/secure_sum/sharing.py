"""Two-server additive sharing in Z_2^64 with PRG-expanded masks.

A batch of encoded vectors ``x`` (int64, any shape) is split as ``a = x − r`` (sent as a vector to
the coordinator C) and ``b = r`` (sent to the aggregator A as a 16-byte seed), where
``r = PRG(seed)`` is AES-128 in CTR mode keyed by a fresh ``os.urandom`` seed. Each seed is used
for exactly one expansion, so a fixed counter block is safe. ``a + b = x`` modulo 2^64.

The CTR keystream is computed as AES-ECB over the counter blocks ``IV, IV+1, …`` (128-bit
big-endian increment — exactly NIST SP 800-38A CTR). The counter blocks for a given length are
cached, and an ECB context is about half the per-key set-up cost of a CTR context, which matters
because every shuffled item needs its own key (tests check it against ``modes.CTR`` and the
SP 800-38A F.5.1 vector).

Numpy is used only for wrap-around arithmetic on the PRG output, never as a source of randomness.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import WrongLength

SEED_BYTES = 16
#: initial CTR block; a domain-separation constant (seeds are single-use, so it may be fixed)
PRG_IV = b"decentsim/prg/v1"
_WORD = np.dtype("<i8")


def new_seed() -> bytes:
    """A fresh uniformly random PRG seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_BYTES:
        raise WrongLength(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")


#: keystreams up to this many blocks (64 KiB) come from cached counter blocks (an ECB context
#: is cheaper to set up than a CTR one: one per shuffled item); longer ones from CTR mode
_CACHED_BLOCKS = 4096


@functools.lru_cache(maxsize=64)
def _counter_blocks(iv: bytes, n_blocks: int) -> bytes:
    """``IV + i`` for ``i < n_blocks`` as 16-byte big-endian blocks (mod 2^128)."""
    hi, lo = np.frombuffer(iv, dtype=">u8").astype(np.uint64)
    low = lo + np.arange(n_blocks, dtype=np.uint64)  # wraps modulo 2^64 ...
    high = hi + (low < lo).astype(np.uint64)  # ... with the carry into the high word
    return np.stack([high, low], axis=1).astype(">u8").tobytes()


def aes_ctr_keystream(key: bytes, iv: bytes, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the AES-CTR keystream for ``key`` and initial counter ``iv``."""
    if len(iv) != 16:
        raise WrongLength(f"AES-CTR initial counter block must be 16 bytes, got {len(iv)}")
    n_blocks = -(-n_bytes // 16)
    if n_blocks > _CACHED_BLOCKS:
        # a long stream (a dense post's mask): CTR mode over zeros, with no counter blocks to
        # build; the same keystream (OpenSSL increments all 128 bits, as SP 800-38A does)
        return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(bytes(n_bytes))
    blocks = _counter_blocks(iv, n_blocks)
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)[:n_bytes]


def _keystream(seed: bytes, n_bytes: int) -> bytes:
    return aes_ctr_keystream(seed, PRG_IV, n_bytes)


def expand_seed(seed: bytes, n_words: int) -> npt.NDArray[np.int64]:
    """Expand ``seed`` to ``n_words`` uniform int64 ring elements (little-endian words).

    Raises:
        WrongLength: the seed is not :data:`SEED_BYTES` long.
    """
    _check_seed(seed)
    if n_words < 0:
        raise WrongLength(f"n_words must be >= 0, got {n_words}")
    return np.frombuffer(_keystream(seed, 8 * n_words), dtype=_WORD).astype(np.int64)


def expand_seeds(seeds: Sequence[bytes] | bytes, dim: int) -> npt.NDArray[np.int64]:
    """Expand one seed per row: returns shape ``(len(seeds), dim)``.

    ``seeds`` is a sequence of seeds or their concatenation. One AES context per seed is
    inherent (each row is an independent share); the words are gathered into a single buffer
    and converted once.
    """
    if isinstance(seeds, bytes):
        if len(seeds) % SEED_BYTES:
            raise WrongLength(f"{len(seeds)} seed bytes is not a multiple of {SEED_BYTES}")
        seeds = [seeds[i : i + SEED_BYTES] for i in range(0, len(seeds), SEED_BYTES)]
    elif any(len(s) != SEED_BYTES for s in seeds):
        raise WrongLength(f"every PRG seed must be {SEED_BYTES} bytes")
    n_bytes = 8 * dim
    stream = b"".join([_keystream(s, n_bytes) for s in seeds])
    return np.frombuffer(stream, dtype=_WORD).astype(np.int64).reshape(len(seeds), dim)


def expand_seed_runs(seeds: Sequence[bytes], n_words: Sequence[int]) -> npt.NDArray[np.int64]:
    """``expand_seed(seeds[i], n_words[i])`` for every ``i``, concatenated into one 1-D array.

    For batches whose seeds mask runs of different lengths (posts of participants hosting
    different numbers of devices): one AES context per seed, one conversion for the batch.

    Raises:
        WrongLength: a seed of the wrong size, a negative length, or mismatched sequences.
    """
    if len(seeds) != len(n_words):
        raise WrongLength(f"{len(seeds)} seeds but {len(n_words)} run lengths")
    if any(len(s) != SEED_BYTES for s in seeds):
        raise WrongLength(f"every PRG seed must be {SEED_BYTES} bytes")
    if any(n < 0 for n in n_words):
        raise WrongLength("run lengths must be >= 0")
    out = np.empty(sum(n_words), dtype=np.int64)
    at = 0
    for s, n in zip(seeds, n_words, strict=True):  # one AES context per seed, one copy per run
        out[at : at + n] = np.frombuffer(_keystream(s, 8 * n), dtype=_WORD)
        at += n
    return out


def split_with_seed(encoded: npt.NDArray[np.int64], seed: bytes) -> npt.NDArray[np.int64]:
    """The C-share ``a = x − PRG(seed)`` of a whole batch (any shape), masked by one seed."""
    x = np.ascontiguousarray(encoded, dtype=np.int64)
    return x - expand_seed(seed, x.size).reshape(x.shape)


def mask_in_place(x: npt.NDArray[np.int64], seed: bytes) -> None:
    """Turn ``x`` (int64, C-contiguous, writable) into its C-share ``x − PRG(seed)`` in place:
    :func:`split_with_seed` without a copy of ``x`` or of the mask (a dense post's megabytes)."""
    _check_seed(seed)
    if x.dtype != np.int64 or not x.flags.c_contiguous or not x.flags.writeable:
        raise WrongLength("mask_in_place needs a writable C-contiguous int64 array")
    flat = x.reshape(-1)  # a view: x is C-contiguous
    flat -= np.frombuffer(_keystream(seed, 8 * x.size), dtype=_WORD)


def split_rows(encoded: npt.NDArray[np.int64], seeds: Sequence[bytes]) -> npt.NDArray[np.int64]:
    """C-shares of ``(n, dim)`` rows, row ``i`` masked by ``seeds[i]``."""
    x = np.ascontiguousarray(encoded, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != len(seeds):
        raise WrongLength(f"need one seed per row: shape {x.shape}, {len(seeds)} seeds")
    return x - expand_seeds(seeds, x.shape[1])


def reconstruct(
    share_c: npt.NDArray[np.int64], share_a: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Recombine two share arrays (or two share sums): ``a + b`` modulo 2^64."""
    a = np.asarray(share_c, dtype=np.int64)
    b = np.asarray(share_a, dtype=np.int64)
    if a.shape != b.shape:
        raise WrongLength(f"share shapes differ: {a.shape} vs {b.shape}")
    return a + b
