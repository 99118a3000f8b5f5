"""Detached image signatures, the way cloud image services define them.

The signature is over the image file's bytes with SHA-256, made with an RSA
key (PSS padding, MGF1-SHA-256) or an ECDSA key, by a certificate that chains
to the CA the operator configured (`policy.image_signing_ca`): issued by it
directly, or by an intermediate under it that the operator hands over with
the signature (`tvorch image trust --chain`; ``core.chain``). We verify
against the digest tvorch already measured, so the image is read once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ...errors import TrustError
from ..chain import issuer_under
from ..signing import verify_chain


def decode_signature(data: bytes) -> bytes:
    """Accept the raw signature or its base64 text (as image services store it)."""
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data


def verify_image_signature(
    digest_hex: str, signature: bytes, cert: x509.Certificate, ca_cert: x509.Certificate, at: datetime,
    intermediates: Sequence[x509.Certificate] = (),
) -> str:
    """Check SIGNATURE over the image whose SHA-256 is DIGEST_HEX; return the signer's subject.

    CERT is issued by CA_CERT, or by one of INTERMEDIATES on a path up to it.
    """
    verify_chain(cert, issuer_under(cert, ca_cert, intermediates, at), at)
    digest = bytes.fromhex(digest_hex)
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(signature, digest, pss, Prehashed(hashes.SHA256()))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            raise TrustError(f"image signing key type {type(key).__name__} is not supported (RSA-PSS or ECDSA)")
    except InvalidSignature:
        raise TrustError("image signature does not verify with the signing certificate's key") from None
    return cert.subject.rfc4514_string()
