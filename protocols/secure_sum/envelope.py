"""HPKE-style sealed envelopes: X25519 + HKDF-SHA256 + ChaCha20-Poly1305.

``seal(recipient_pk, plaintext, info, aad)`` draws a fresh ephemeral X25519 key, derives a
single-use AEAD key and nonce from the shared secret with HKDF-SHA256 (the derivation binds the
protocol label, ``info``, the ephemeral key and the recipient key), and encrypts with
ChaCha20-Poly1305 over ``aad``. Layout (all fixed-size but the ciphertext)::

    version (1) ‖ recipient key id (8) ‖ ephemeral public key (32) ‖ ciphertext ‖ tag (16)

The key id lets ``open`` say "wrong recipient" instead of a bare authentication failure; it
is the same for every envelope to one server, so it reveals nothing but the recipient.
A fresh ephemeral key per envelope means two envelopes from one sender cannot be linked.

A participant that must be able to rebuild a request byte for byte after a crash seals with
``ephemeral_seed`` (a secret it derives from its persisted secret): the ephemeral key is then a
PRF of the seed and of everything the envelope encrypts (:func:`derive_ephemeral`), so the same
request gives the same envelope and two different plaintexts never share an AEAD key and nonce.

Symmetric boxes (``box_seal``/``box_open``) carry replies under a key the device sent inside a
sealed envelope (the relay cannot read them).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationFailed, EnvelopeError, TruncatedEnvelope, WrongRecipient

VERSION = 1
KEY_ID_BYTES = 8
PUBLIC_KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
HEADER_BYTES = 1 + KEY_ID_BYTES + PUBLIC_KEY_BYTES
#: bytes an envelope adds to its plaintext
OVERHEAD = HEADER_BYTES + TAG_BYTES
_LABEL = b"decentsim/seal/v1"
_BOX_LABEL = b"decentsim/box/v1"
_EPHEMERAL_LABEL = b"decentsim/derived-ephemeral/v1"
#: bytes of an ``ephemeral_seed`` (a 256-bit secret)
EPHEMERAL_SEED_BYTES = 32


def key_id(public_key: bytes) -> bytes:
    """The 8-byte identifier of an X25519 public key."""
    return hashlib.sha256(b"decentsim/keyid/v1" + public_key).digest()[:KEY_ID_BYTES]


@functools.lru_cache(maxsize=256)
def _recipient(public_key: bytes) -> tuple[X25519PublicKey, bytes]:
    """Parsed key and key id of a recipient; a deployment has two, so sealing reuses them."""
    return X25519PublicKey.from_public_bytes(public_key), key_id(public_key)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-and-expand, from ``cryptography``."""
    return HKDF(hashes.SHA256(), length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class KeyPair:
    """A server's long-term X25519 key pair. Never logged; ``repr`` shows only the key id."""

    private: X25519PrivateKey
    public: bytes
    #: ``key_id(public)``, computed once (every open compares it)
    key_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id(self.public))

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS CSPRNG."""
        sk = X25519PrivateKey.generate()
        return cls(sk, sk.public_key().public_bytes_raw())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Load a key pair from its 32-byte private key."""
        sk = X25519PrivateKey.from_private_bytes(raw)
        return cls(sk, sk.public_key().public_bytes_raw())

    def __repr__(self) -> str:
        return f"KeyPair(key_id={self.key_id.hex()})"


def derive_key_nonce(
    shared: bytes, enc: bytes, recipient: bytes, info: bytes
) -> tuple[bytes, bytes]:
    """The single-use AEAD key and nonce of an envelope (written out so it can be re-derived).

    ``HKDF-SHA256(ikm=shared, salt=label, info=label ‖ len(info) (u32 BE) ‖ info ‖ enc ‖
    recipient)``, 44 bytes: the first 32 are the ChaCha20-Poly1305 key, the last 12 the nonce.
    """
    context = _LABEL + len(info).to_bytes(4, "big") + info + enc + recipient
    okm = hkdf_sha256(shared, _LABEL, context, 32 + NONCE_BYTES)
    return okm[:32], okm[32:]


def _length_prefixed(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def derive_ephemeral(
    ephemeral_seed: bytes, recipient_public: bytes, plaintext: bytes, info: bytes, aad: bytes
) -> X25519PrivateKey:
    """The ephemeral key of a deterministic envelope.

    ``HKDF-SHA256(ikm=seed, salt=label, info=label ‖ recipient ‖ len ‖ info ‖ SHA-256(aad) ‖
    SHA-256(plaintext))``, 32 bytes, used as an X25519 scalar (clamped by X25519 itself).

    Nonce safety: an envelope's AEAD key and nonce are a function of (ephemeral key, recipient,
    ``info``) (:func:`derive_key_nonce`). Here the ephemeral key is a function of (seed,
    recipient, ``info``, ``aad``, plaintext), so two envelopes can share an AEAD key and nonce
    only if they share all of those — that is, only if they encrypt the same plaintext under the
    same AAD, and then they are the same bytes (ChaCha20-Poly1305 is deterministic). No
    keystream or Poly1305 key ever covers two different messages, except through a collision
    of SHA-256 or HKDF outputs. With a secret seed the derived key is pseudorandom and never
    seen by anyone, so envelopes stay unlinkable to each other and to the sender; what becomes
    visible is only that two identical requests from one seed are identical.

    Raises:
        EnvelopeError: the seed is not :data:`EPHEMERAL_SEED_BYTES` long.
    """
    if len(ephemeral_seed) != EPHEMERAL_SEED_BYTES:
        raise EnvelopeError(
            f"ephemeral seed must be {EPHEMERAL_SEED_BYTES} bytes, got {len(ephemeral_seed)}"
        )
    context = b"".join(
        (
            _EPHEMERAL_LABEL,
            _length_prefixed(recipient_public),
            _length_prefixed(info),
            hashlib.sha256(aad).digest(),
            hashlib.sha256(plaintext).digest(),
        )
    )
    scalar = hkdf_sha256(ephemeral_seed, _EPHEMERAL_LABEL, context, 32)
    return X25519PrivateKey.from_private_bytes(scalar)


def seal(
    recipient_public: bytes,
    plaintext: bytes,
    info: bytes,
    aad: bytes = b"",
    ephemeral_seed: bytes | None = None,
) -> bytes:
    """Seal ``plaintext`` to ``recipient_public``; ``info`` and ``aad`` must match on open.

    Without ``ephemeral_seed`` the ephemeral key is fresh from the OS CSPRNG. With it (a
    32-byte secret known only to the sender), the envelope is deterministic: the same
    (seed, recipient, plaintext, info, aad) always gives the same bytes, and anything else gives
    an unrelated ephemeral key (see :func:`derive_ephemeral` for why that is nonce-safe).

    Raises:
        EnvelopeError: a malformed recipient key or seed.
    """
    if ephemeral_seed is None:
        ephemeral = X25519PrivateKey.generate()
    else:
        ephemeral = derive_ephemeral(ephemeral_seed, recipient_public, plaintext, info, aad)
    return seal_with_ephemeral(ephemeral, recipient_public, plaintext, info, aad)


def seal_with_ephemeral(
    ephemeral: X25519PrivateKey,
    recipient_public: bytes,
    plaintext: bytes,
    info: bytes,
    aad: bytes = b"",
) -> bytes:
    """:func:`seal` with a caller-chosen ephemeral key — for test vectors only.

    Reusing an ephemeral key for different plaintexts would link envelopes and repeat an AEAD
    key; production code calls :func:`seal`, which draws a fresh one per envelope or derives
    one from the sender's secret and the whole plaintext.
    """
    if len(recipient_public) != PUBLIC_KEY_BYTES:
        raise EnvelopeError(
            f"recipient public key must be {PUBLIC_KEY_BYTES} bytes, got {len(recipient_public)}"
        )
    recipient, rid = _recipient(recipient_public)
    enc = ephemeral.public_key().public_bytes_raw()
    key, nonce = derive_key_nonce(ephemeral.exchange(recipient), enc, recipient_public, info)
    ct = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    return b"".join((bytes([VERSION]), rid, enc, ct))


def open_envelope(keypair: KeyPair, envelope: bytes, info: bytes, aad: bytes = b"") -> bytes:
    """Open an envelope sealed to ``keypair``.

    Raises:
        TruncatedEnvelope: shorter than header + tag.
        EnvelopeError: unknown version or an invalid ephemeral key.
        WrongRecipient: sealed to another public key.
        AuthenticationFailed: tampered ciphertext/header, or a different info/aad.
    """
    if len(envelope) < OVERHEAD:
        raise TruncatedEnvelope(
            f"envelope is {len(envelope)} bytes; at least {OVERHEAD} (header + tag) needed"
        )
    if envelope[0] != VERSION:
        raise EnvelopeError(f"unsupported envelope version {envelope[0]} (expected {VERSION})")
    if envelope[1 : 1 + KEY_ID_BYTES] != keypair.key_id:
        raise WrongRecipient("envelope was sealed to a different public key")
    enc = envelope[1 + KEY_ID_BYTES : HEADER_BYTES]
    try:
        shared = keypair.private.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError as err:  # low-order point: all-zero shared secret
        raise AuthenticationFailed("envelope carries an invalid ephemeral public key") from err
    key, nonce = derive_key_nonce(shared, enc, keypair.public, info)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, envelope[HEADER_BYTES:], aad)
    except InvalidTag as err:
        raise AuthenticationFailed(
            "envelope authentication failed: tampered bytes or wrong info/aad binding"
        ) from err


def _box_key(secret: bytes, info: bytes) -> bytes:
    return hkdf_sha256(secret, _BOX_LABEL, _BOX_LABEL + info, 32)


def box_seal(secret: bytes, plaintext: bytes, info: bytes, aad: bytes = b"") -> bytes:
    """Encrypt under a shared 32-byte secret: ``nonce (12) ‖ ciphertext ‖ tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(_box_key(secret, info)).encrypt(nonce, plaintext, aad)


def box_open(secret: bytes, box: bytes, info: bytes, aad: bytes = b"") -> bytes:
    """Decrypt a :func:`box_seal` box.

    Raises:
        TruncatedEnvelope: shorter than nonce + tag.
        AuthenticationFailed: wrong secret, tampering, or a different info/aad.
    """
    if len(box) < NONCE_BYTES + TAG_BYTES:
        raise TruncatedEnvelope(
            f"box is {len(box)} bytes; at least {NONCE_BYTES + TAG_BYTES} needed"
        )
    try:
        return ChaCha20Poly1305(_box_key(secret, info)).decrypt(
            box[:NONCE_BYTES], box[NONCE_BYTES:], aad
        )
    except InvalidTag as err:
        raise AuthenticationFailed(
            "box authentication failed: wrong key, tampered bytes or wrong info/aad"
        ) from err
