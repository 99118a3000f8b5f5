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

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.codec import canonical_json, parse_json
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
from tvorch.core.signed import SIGNATURE_ALGORITHM, sign_block, verify_block  # noqa: F401 - its name, here too
from tvorch.errors import TrustError


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
    return canonical_json({"manifest": body, "signature": sign_block(body, key, cert, chain)})


def verify_manifest(file_bytes: bytes, ca_cert: x509.Certificate, at: datetime,
                    untrusted: Sequence[x509.Certificate] = ()) -> LaunchManifest:
    """The manifest in FILE_BYTES, if the file is canonical and signed by a key the CA vouches for at AT."""
    return verify_manifest_under(file_bytes, ca_cert, at, untrusted)[0]


def verify_manifest_under(file_bytes: bytes, ca_cert: x509.Certificate, at: datetime,
                          untrusted: Sequence[x509.Certificate] = ()) -> tuple[LaunchManifest, x509.Certificate]:
    """(manifest, the node CA that issued its signer), as ``verify_manifest`` checks them.

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
    _cert, node_ca = verify_block(top["signature"], top["manifest"], ca_cert, at, untrusted)
    return manifest_from_dict(top["manifest"]), node_ca


_FILE_FIELDS = ("manifest", "signature")
