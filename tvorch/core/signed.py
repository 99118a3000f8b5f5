"""The node's signature block on a JSON document: ECDSA P-256 over the document's canonical JSON.

Launch manifests and the statements nodes exchange when a VM migrates carry
the same block: ``{"algorithm", "value", "certificate"[, "chain"]}``, the
signing certificate (issued by the node CA) and, in a fleet, the node CA and
the certificates above it, so a verifier needs only the fleet's root. A
signature has one encoding only (DER, low S, canonical base64) and a
certificate one PEM, so no second document with the same content verifies.
WHAT names the document in every refusal ("manifest", "handoff statement").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from tvorch.core.chain import MAX_PATH, issuer_under
from tvorch.core.codec import b64decode, b64encode, canonical_json
from tvorch.core.launch.manifest_format import fields_of
from tvorch.core.signing import DOCUMENT_SIGNING, verify_chain
from tvorch.errors import TrustError

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
SIGNATURE_FIELDS = ("algorithm", "value", "certificate")
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def sign_block(body: Any, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
               chain: Sequence[x509.Certificate] = ()) -> dict[str, Any]:
    """The signature block over BODY's canonical JSON; refuses a key that is not CERT's or not P-256."""
    if cert.public_key() != key.public_key():
        raise TrustError(f"the signing key does not match certificate '{cert.subject.rfc4514_string()}'")
    if not isinstance(key.curve, ec.SECP256R1):
        raise TrustError(f"the signing key is on curve {key.curve.name}, not P-256")
    r, s = decode_dss_signature(key.sign(canonical_json(body), ec.ECDSA(hashes.SHA256())))
    signature = encode_dss_signature(r, min(s, _P256_ORDER - s))
    signed: dict[str, Any] = {
        "algorithm": SIGNATURE_ALGORITHM,
        "value": b64encode(signature),
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }
    if chain:
        signed["chain"] = [c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain]
    return signed


def verify_block(block: object, body: Any, anchor: x509.Certificate, at: datetime,
                 untrusted: Sequence[x509.Certificate] = (), what: str = "manifest"
                 ) -> tuple[x509.Certificate, x509.Certificate]:
    """(signing certificate, its issuer: the node CA), if BLOCK signs BODY with a key ANCHOR vouches for at AT.

    ANCHOR is the verifier's: a node CA, or a fleet root above it, reached
    through the block's chain and UNTRUSTED by ``core.chain.issuer_under``."""
    sig = fields_of(block, "signature", SIGNATURE_FIELDS, optional=("chain",))
    if sig["algorithm"] != SIGNATURE_ALGORITHM:
        raise TrustError(f"{what} signature algorithm {sig['algorithm']!r} is not {SIGNATURE_ALGORITHM!r}")
    cert = certificate(sig["certificate"], what)
    carried = _chain(sig["chain"], what) if "chain" in sig else ()
    issuer = issuer_under(cert, anchor, (*carried, *untrusted), at)
    verify_chain(cert, issuer, at, purpose=DOCUMENT_SIGNING)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TrustError(f"{what} signing certificate does not hold a P-256 key")
    try:
        public.verify(_signature(sig["value"], what), canonical_json(body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError(f"{what} signature does not verify with the signing certificate's key") from None
    return cert, issuer


def key_fingerprint(cert: x509.Certificate) -> str:
    """sha256 of a certificate's SubjectPublicKeyInfo: a node CA's identity, the same across renewals."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def carried_chain(block: object, what: str = "manifest") -> tuple[x509.Certificate, ...]:
    """The certificates a signature block carries above its signing certificate (none without a fleet)."""
    sig = fields_of(block, "signature", SIGNATURE_FIELDS, optional=("chain",))
    return _chain(sig["chain"], what) if "chain" in sig else ()


def certificate(pem: object, what: str = "manifest", where: str = "certificate") -> x509.Certificate:
    if not isinstance(pem, str):
        raise TrustError(f"{what} signature field '{where}': must be a PEM string")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError:
        raise TrustError(f"{what} signature field '{where}': not a PEM certificate") from None
    # The PEM must be the one encoding of the certificate, so no byte of it can change unnoticed.
    if cert.public_bytes(serialization.Encoding.PEM).decode("ascii") != pem:
        raise TrustError(f"{what} signature field '{where}': PEM is not in canonical form")
    return cert


def _chain(value: object, what: str) -> tuple[x509.Certificate, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_PATH:
        raise TrustError(f"{what} signature field 'chain': must be a list of 1 to {MAX_PATH} PEM certificates")
    return tuple(certificate(pem, what, f"chain[{i}]") for i, pem in enumerate(value))


def _signature(value: object, what: str) -> bytes:
    der = b64decode(value, f"{what} signature field 'value'", TrustError)
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise TrustError(f"{what} signature field 'value': not a base64 DER ECDSA signature") from None
    # One encoding per signature: canonical base64 (b64decode) and DER, and the low of the two S values.
    if encode_dss_signature(r, s) != der or s > _P256_ORDER // 2:
        raise TrustError(f"{what} signature field 'value': signature is not in canonical form")
    return der
