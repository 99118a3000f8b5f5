"""vTPM endorsement-key certificates issued by the node CA, on objects.

Pure: the counterpart of a hardware TPM's manufacturer certificate. A
verifier that trusts the node CA (``<state_dir>/pki/ca.pem``) can then tell a
vTPM this node manufactured from any other TPM, exactly as it would check a
hardware EK against the vendor's CA.

The certificate follows the TCG "EK Credential Profile for TPM Family 2.0"
as far as ``cryptography`` allows: an empty subject with a critical
subjectAltName naming the TPM (manufacturer, model, firmware version as a
directoryName), BasicConstraints CA=false, KeyUsage keyEncipherment (RSA EK)
or keyAgreement (ECC EK), extended key usage tcg-kp-EKCertificate, the
authority key identifier, and subjectDirectoryAttributes carrying the TPM
specification (hand-encoded DER: ``cryptography`` has no class for it).
It lasts 30 years like a manufacturer's (the EK lives as long as the vTPM),
but never beyond the CA certificate.

``signing.verify_chain`` cannot check these: an EK is a decryption key and
has no digitalSignature usage, by design. ``verify_ek_certificate`` is the
EK-specific check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.core import der
from tvorch.core.signing import key_usage
from tvorch.errors import TrustError

# TCG OIDs (TCG EK Credential Profile, section 5; "TCG OID" registry).
TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
TPM_SPECIFICATION = x509.ObjectIdentifier("2.23.133.2.16")
EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")  # tcg-kp-EKCertificate
_SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")

EK_CERT_YEARS = 30
_BACKDATE = timedelta(minutes=5)  # same reason as in tvorch.core.signing

EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class TpmSpecification:
    """The TPM specification the vTPM implements: family "2.0", level, revision (e.g. 0, 164)."""

    family: str
    level: int
    revision: int


def issue_ek_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ek_public_key: EkPublicKey,
    tpm_manufacturer: str,
    tpm_model: str,
    tpm_version: str,
    serial_hint: int | None,
    now: datetime,
    *,
    tpm_spec: TpmSpecification | None = None,
) -> x509.Certificate:
    """An EK certificate for EK_PUBLIC_KEY signed by the node CA (TCG EK Credential Profile).

    SERIAL_HINT, when given, becomes the serial number (it must be positive
    and below 2**159, as RFC 5280 allows); None draws a random one.
    TPM_MANUFACTURER and TPM_VERSION are as swtpm reports them ("id:00001014").
    """
    if now.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    if isinstance(ek_public_key, rsa.RSAPublicKey):
        usage = key_usage(key_encipherment=True)
    elif isinstance(ek_public_key, ec.EllipticCurvePublicKey):
        usage = key_usage(key_agreement=True)
    else:  # pragma: no cover - the type says it cannot happen
        raise TypeError(f"an EK is an RSA or ECC key, not {type(ek_public_key).__name__}")
    serial = x509.random_serial_number() if serial_hint is None else serial_hint
    if not 0 < serial < 2**159:
        raise ValueError(f"serial number {serial} is out of range (1 .. 2**159-1)")
    tpm_name = x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(TPM_MANUFACTURER, tpm_manufacturer)]),
        x509.RelativeDistinguishedName([x509.NameAttribute(TPM_MODEL, tpm_model)]),
        x509.RelativeDistinguishedName([x509.NameAttribute(TPM_VERSION, tpm_version)]),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))  # the profile's empty subject; the SAN names the TPM
        .issuer_name(ca_cert.subject)
        .public_key(ek_public_key)
        .serial_number(serial)
        .not_valid_before(now - _BACKDATE)
        # Never beyond the CA: a verifier would refuse the chain from then on anyway.
        .not_valid_after(min(_add_years(now, EK_CERT_YEARS), ca_cert.not_valid_after_utc))
        # Critical because the subject is empty (RFC 5280, 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_name)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if tpm_spec is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(_SUBJECT_DIRECTORY_ATTRIBUTES, _tpm_spec_attributes(tpm_spec)),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256())


def verify_ek_certificate(cert: x509.Certificate, ca_cert: x509.Certificate, at: datetime) -> None:
    """Raise TrustError unless CERT is an EK certificate issued by CA_CERT and valid AT.

    Unlike ``signing.verify_chain`` it does not ask for digitalSignature: an
    EK only decrypts (RSA) or agrees keys (ECC).
    """
    if at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    ca_name = ca_cert.subject.rfc4514_string()
    try:
        if cert.issuer != ca_cert.subject:
            raise TrustError(f"EK certificate was issued by '{cert.issuer.rfc4514_string()}', not by '{ca_name}'")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (InvalidSignature, TypeError):
            raise TrustError(f"EK certificate is not signed by the CA '{ca_name}'") from None
        for moment, what in ((ca_cert, "CA certificate"), (cert, "EK certificate")):
            if not moment.not_valid_before_utc <= at <= moment.not_valid_after_utc:
                raise TrustError(f"{what} is not valid at {at.isoformat()}")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or EK_CERTIFICATE not in eku:
            raise TrustError("certificate lacks the tcg-kp-EKCertificate extended key usage")
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise TrustError("EK certificate claims to be a CA")
    except x509.ExtensionNotFound as err:
        raise TrustError(f"EK certificate lacks an extension: {err}") from None
    except ValueError as err:  # cryptography parses lazily
        raise TrustError(f"EK certificate is malformed: {err}") from None


def ek_fingerprint(public_key: EkPublicKey) -> str:
    """SHA-256 of the EK's SubjectPublicKeyInfo, hex: the vTPM's identity, stable across certificate reissues."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _tpm_spec_attributes(spec: TpmSpecification) -> bytes:
    """SubjectDirectoryAttributes ::= SEQUENCE OF Attribute { tcg-at-tpmSpecification, SET { TPMSpecification } }."""
    value = der.sequence(der.utf8(spec.family), der.integer(spec.level), der.integer(spec.revision))
    attribute = der.sequence(der.oid(TPM_SPECIFICATION.dotted_string), der.set_of(value))
    return der.sequence(attribute)


def _add_years(now: datetime, years: int) -> datetime:
    try:
        return now.replace(year=now.year + years)
    except ValueError:  # 29 February in a year that has none
        return now.replace(year=now.year + years, day=28)
