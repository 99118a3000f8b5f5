"""A fleet's certificates made in memory for unit tests: a root, node CAs under it, each node's signing key."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tvorch.core.migration.handoff import Handoff, sign_handoff
from tvorch.core.signed import key_fingerprint
from tvorch.core.signing import issue_signing_cert

KeyAndCert = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def ca(name: str, issuer: KeyAndCert | None, pathlen: int, now: datetime) -> KeyAndCert:
    """A CA certificate valid around NOW: self-signed without ISSUER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    return key, (
        x509.CertificateBuilder().subject_name(subject).issuer_name(signer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(signer_key, hashes.SHA256()))


class FleetNode:
    """A node whose CA the fleet ROOT certified, with its document-signing key."""

    def __init__(self, name: str, root: KeyAndCert, now: datetime) -> None:
        self.ca_key, self.ca = ca(f"tvorch node CA {name}", root, 0, now)
        self.root = root[1]
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = issue_signing_cert(self.ca_key, self.ca, self.key.public_key(), f"tvorch node {name}", now)
        self.name = key_fingerprint(self.ca)

    def handoff(self, h: Handoff) -> dict:
        return sign_handoff(h, self.key, self.cert, (self.ca, self.root))
