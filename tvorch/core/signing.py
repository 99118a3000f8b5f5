"""The node's certificate authority and the certificates it issues, on objects.

Pure: keys and certificates come in and go out as ``cryptography`` objects;
``tvorch.adapters.node_keys`` keeps them on disk. One CA per node issues the
node's manifest-signing certificate today and the vTPMs' EK certificates
later, so a verifier needs nothing but the CA certificate
(``<state_dir>/pki/ca.pem``).

Chains here are one level deep (CA, then leaf; the path from a node CA up to
a fleet root is ``tvorch.core.chain``'s) and are checked by hand in
``verify_chain``: ``cryptography.x509.verification`` implements the Web PKI
profile (its client verifier demands the clientAuth EKU), and bending it to
a private CA needs custom extension policies (cryptography 45 and later),
while the few rules that matter here fit in a dozen explicit checks, each
with its own one-line reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tvorch.errors import TrustError

# id-kp-documentSigning (RFC 9336): the node key signs launch manifests, which
# are documents, not executable code (codeSigning) nor TLS peers. Requiring it
# when verifying a manifest stops any other certificate from the same CA (a
# vTPM EK certificate, a future TLS certificate) standing in for the signer.
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")

CA_YEARS = 20
SIGNING_CERT_YEARS = 5
# Certificates start a little before "now" so a verifier whose clock is
# slightly behind the node's does not see them as not yet valid.
_BACKDATE = timedelta(minutes=5)

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key: the curve every TPM 2.0 and every verifier supports."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed node CA that may sign leaves only (pathlen 0), valid 20 years."""
    _require_aware(now)
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(_add_years(now, CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    now: datetime,
    *,
    years: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A leaf signed by the CA, with the key identifiers every leaf needs plus EXTENSIONS.

    EXTENSIONS are ``(extension, critical)`` pairs: the signing certificate and
    the vTPM EK certificates differ only in subject, lifetime and these.
    """
    _require_aware(now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(_add_years(now, years))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca_key, hashes.SHA256())


def issue_signing_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject_key_public: ec.EllipticCurvePublicKey,
    common_name: str,
    now: datetime,
) -> x509.Certificate:
    """The node's manifest-signing certificate: digitalSignature and documentSigning only, 5 years."""
    return issue_certificate(
        ca_key,
        ca_cert,
        subject_key_public,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
        now,
        years=SIGNING_CERT_YEARS,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage([DOCUMENT_SIGNING]), False),
        ],
    )


def verify_chain(
    leaf: x509.Certificate,
    ca_cert: x509.Certificate,
    at: datetime,
    *,
    purpose: x509.ObjectIdentifier | None = None,
) -> None:
    """Raise TrustError unless LEAF is a signing leaf issued by CA_CERT, both valid AT.

    PURPOSE, when given, must be among the leaf's extended key usages.
    """
    _require_aware(at)
    try:
        _verify_chain(leaf, ca_cert, at, purpose)
    except ValueError as err:  # cryptography parses extensions and signatures lazily
        raise TrustError(f"a certificate is malformed: {err}") from None


def _verify_chain(
    leaf: x509.Certificate, ca_cert: x509.Certificate, at: datetime, purpose: x509.ObjectIdentifier | None
) -> None:
    ca_name = ca_cert.subject.rfc4514_string()
    leaf_name = leaf.subject.rfc4514_string()
    constraints = _extension(ca_cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise TrustError(f"CA certificate '{ca_name}' is not a CA (no BasicConstraints CA=true)")
    ca_usage = _extension(ca_cert, x509.KeyUsage)
    if ca_usage is None or not ca_usage.key_cert_sign:
        raise TrustError(f"CA certificate '{ca_name}' may not sign certificates (no keyCertSign)")
    _check_validity(ca_cert, "CA certificate", at)
    if leaf.issuer != ca_cert.subject:
        raise TrustError(
            f"certificate '{leaf_name}' was issued by '{leaf.issuer.rfc4514_string()}', not by the CA '{ca_name}'"
        )
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, TypeError):  # TypeError: a key type that cannot have signed it
        raise TrustError(f"certificate '{leaf_name}' is not signed by the CA '{ca_name}'") from None
    _check_validity(leaf, "certificate", at)
    leaf_constraints = _extension(leaf, x509.BasicConstraints)
    if leaf_constraints is not None and leaf_constraints.ca:
        raise TrustError(f"certificate '{leaf_name}' is a CA certificate, not a signing certificate")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise TrustError(f"certificate '{leaf_name}' may not sign (no digitalSignature key usage)")
    if purpose is not None:
        eku = _extension(leaf, x509.ExtendedKeyUsage)
        if eku is None or purpose not in eku:
            raise TrustError(f"certificate '{leaf_name}' lacks extended key usage {purpose.dotted_string}")


def _check_validity(cert: x509.Certificate, what: str, at: datetime) -> None:
    name = cert.subject.rfc4514_string()
    if at < cert.not_valid_before_utc:
        raise TrustError(f"{what} '{name}' is not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise TrustError(f"{what} '{name}' expired at {cert.not_valid_after_utc.isoformat()}")


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage with only the GRANTED uses (cryptography wants every flag spelled out)."""
    flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    unknown = set(granted) - set(flags)
    if unknown:
        raise TypeError(f"unknown key usage {sorted(unknown)}")
    return x509.KeyUsage(**{flag: granted.get(flag, False) for flag in flags})


def _add_years(now: datetime, years: int) -> datetime:
    try:
        return now.replace(year=now.year + years)
    except ValueError:  # 29 February in a year that has none
        return now.replace(year=now.year + years, day=28)


def _require_aware(moment: datetime) -> None:
    # Comparing with the certificates' UTC times needs a zone; a naive time is a bug.
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
