"""The recovery wrapping of a vTPM state key: RSA-OAEP-SHA256 to an operator-held escrow key.

The everyday wrapping is the host TPM's seal, which a firmware update can make
unusable; the escrow key (kept off the node) can always unwrap, and `tvorch
vtpm rekey --escrow-key` then seals the key again to the host as it is now.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tvorch.errors import InputError, TrustError

ESCROW_MIN_BITS = 2048
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=b"tvorch-vtpm-key")


def load_escrow_public_key(pem: bytes, source: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise InputError(f"{source} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InputError(f"{source} is a {type(key).__name__}; the escrow key must be RSA")
    if key.key_size < ESCROW_MIN_BITS:
        raise InputError(f"{source} is RSA {key.key_size}; the escrow key needs at least {ESCROW_MIN_BITS} bits")
    return key


def load_escrow_private_key(pem: bytes, source: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise InputError(f"{source} is encrypted; give the escrow key in clear (from a tmpfs) for the rekey") from None
    except ValueError:
        raise InputError(f"{source} is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InputError(f"{source} is a {type(key).__name__}; the escrow key is RSA")
    return key


def public_key_fingerprint(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def escrow_wrap(key: bytes, escrow: rsa.RSAPublicKey) -> bytes:
    return escrow.encrypt(key, _OAEP)


def escrow_unwrap(blob: bytes, escrow: rsa.RSAPrivateKey, expected_fingerprint: str | None) -> bytes:
    if expected_fingerprint and public_key_fingerprint(escrow.public_key()) != expected_fingerprint:
        raise TrustError(f"this escrow key is not the one the state key was wrapped to "
                         f"(sha256:{expected_fingerprint[:16]}...)")
    try:
        return escrow.decrypt(blob, _OAEP)
    except ValueError:
        raise TrustError("the escrow key cannot unwrap this vTPM's state key") from None
