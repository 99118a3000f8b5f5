"""The launch manifest: what a VM was started from, signed by the node key.

The format itself (fields, reading, digest) is ``core.launch.manifest_format``,
which the hook imports without ``cryptography``; its names are here too.

Pure: dataclasses and bytes in, bytes and dataclasses out. The signed file is
one JSON object in canonical form (docs/launch-manifest.md); its SHA-256 is
what the domain's ``<metadata>`` names, so the file is checked byte for byte:
a verifier refuses anything that is not exactly the canonical serialisation
of what it parsed, and signatures have one encoding only (DER, low S), so no
second file with the same content can verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from tvorch.core.chain import MAX_PATH, issuer_under
from tvorch.core.codec import b64decode, b64encode, canonical_json, parse_json
from tvorch.core.launch.manifest_format import (  # noqa: F401 - the format's names, where callers have always found them
    DIGEST_ALGORITHM,
    MANIFEST_VERSION,
    MEASUREMENT_KINDS,
    PREDICTION_STATUSES,
    BootPredictionRecord,
    DetailValue,
    LaunchManifest,
    Measurement,
    fields_of,
    manifest_digest,
    manifest_from_dict,
    manifest_to_dict,
    stored_manifest,
)
from tvorch.core.signing import DOCUMENT_SIGNING, verify_chain
from tvorch.errors import TrustError

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def sign_manifest(manifest: LaunchManifest, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                  chain: Sequence[x509.Certificate] = ()) -> bytes:
    """The signed manifest file: the manifest and an ECDSA P-256 signature over its canonical JSON.

    CHAIN (the node CA and the certificates above it, in a fleet) is carried
    in ``signature.chain`` so a verifier needs only the fleet's root; without
    it the file is exactly what it was before fleets.
    Refuses (TrustError) a manifest that ``verify_manifest`` would refuse, and
    a key that is not the certificate's, so a bad file is never written.
    """
    body = manifest_to_dict(manifest)
    manifest_from_dict(body)
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
    return canonical_json({"manifest": body, "signature": signed})


def verify_manifest(file_bytes: bytes, ca_cert: x509.Certificate, at: datetime,
                    untrusted: Sequence[x509.Certificate] = ()) -> LaunchManifest:
    """The manifest in FILE_BYTES, if the file is canonical and signed by a key the CA vouches for at AT.

    CA_CERT is the verifier's anchor: the node CA, or a fleet root above it,
    reached through the file's ``signature.chain`` and UNTRUSTED (more
    intermediates the verifier has, say for a manifest made before its node
    joined the fleet) by ``core.chain.issuer_under``.
    """
    parsed = parse_json(file_bytes, "manifest file", TrustError)
    try:
        canonical = canonical_json(parsed)
    except ValueError as err:
        raise TrustError(f"manifest file holds a value that has no canonical form: {err}") from None
    if canonical != file_bytes:
        raise TrustError("manifest is not in canonical form")
    top = fields_of(parsed, "file", _FILE_FIELDS)
    sig = fields_of(top["signature"], "signature", _SIGNATURE_FIELDS, optional=("chain",))
    if sig["algorithm"] != SIGNATURE_ALGORITHM:
        raise TrustError(f"manifest signature algorithm {sig['algorithm']!r} is not {SIGNATURE_ALGORITHM!r}")
    cert = _certificate(sig["certificate"])
    carried = _chain(sig["chain"]) if "chain" in sig else ()
    verify_chain(cert, issuer_under(cert, ca_cert, (*carried, *untrusted), at), at, purpose=DOCUMENT_SIGNING)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TrustError("manifest signing certificate does not hold a P-256 key")
    try:
        public.verify(_signature(sig["value"]), canonical_json(top["manifest"]), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError("manifest signature does not verify with the signing certificate's key") from None
    return manifest_from_dict(top["manifest"])


_FILE_FIELDS = ("manifest", "signature")
_SIGNATURE_FIELDS = ("algorithm", "value", "certificate")


def _certificate(pem: object, where: str = "certificate") -> x509.Certificate:
    if not isinstance(pem, str):
        raise TrustError(f"manifest signature field '{where}': must be a PEM string")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError:
        raise TrustError(f"manifest signature field '{where}': not a PEM certificate") from None
    # The PEM must be the one encoding of the certificate, so no byte of it can change unnoticed.
    if cert.public_bytes(serialization.Encoding.PEM).decode("ascii") != pem:
        raise TrustError(f"manifest signature field '{where}': PEM is not in canonical form")
    return cert


def _chain(value: object) -> tuple[x509.Certificate, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_PATH:
        raise TrustError(f"manifest signature field 'chain': must be a list of 1 to {MAX_PATH} PEM certificates")
    return tuple(_certificate(pem, f"chain[{i}]") for i, pem in enumerate(value))


def _signature(value: object) -> bytes:
    der = b64decode(value, "manifest signature field 'value'", TrustError)
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise TrustError("manifest signature field 'value': not a base64 DER ECDSA signature") from None
    # One encoding per signature: canonical base64 (b64decode) and DER, and the low of the two S values.
    if encode_dss_signature(r, s) != der or s > _P256_ORDER // 2:
        raise TrustError("manifest signature field 'value': signature is not in canonical form")
    return der
