"""vTPM platform certificates issued by the node CA, as bytes.

Pure: the counterpart of the certificate a platform maker issues with a
machine. It says "the platform whose TPM has this EK certificate is a
tvorch VM of this model and version", and a verifier that trusts the node
CA checks it as it would a vendor's. swtpm_setup writes it into the vTPM's
NV index 0x01c08000 (``tvorch.adapters.swtpm_certs``).

The layout is the TCG "Platform Attribute Credential Profile" (Platform
Certificate Profile 1.1): an X.509 attribute certificate (RFC 5755
AttributeCertificate v2), DER, hand-encoded because ``cryptography`` has no
attribute certificates::

    AttributeCertificate
      acinfo
        version                 v2 (INTEGER 1)
        holder                  baseCertificateID [0]: issuer and serial of the vTPM's RSA EK certificate
        issuer                  v2Form [0]: issuerName = directoryName of the node CA's subject
        signature               ecdsa-with-SHA256
        serialNumber            random, positive, at most 20 octets
        attrCertValidityPeriod  GeneralizedTime, the EK certificate's policy (5 minutes back, 30 years on,
                                never past the CA nor the EK certificate)
        attributes
          tcg-at-tcgCredentialType           tcg-kp-PlatformAttributeCertificate
          tcg-at-tcgCredentialSpecification  1.1 rev 19 (the profile followed)
          tcg-at-tcgPlatformSpecification   PC Client, 1.05 rev 23 (the firmware profile OVMF follows)
        extensions (none critical)
          subjectAltName       directoryName: platformManufacturerStr, platformModel, platformVersion
                               [, platformSerial = the VM id], UTF8String each
          certificatePolicies  anyPolicy with the userNotice "TCG Trusted Platform Endorsement"
          authorityKeyIdentifier
      signatureAlgorithm        ecdsa-with-SHA256
      signatureValue            the node CA's ECDSA P-256 signature over acinfo

The names in holder and issuer are the certificates' own DER bytes, so a
verifier compares them byte for byte (no name-matching rules needed: this
CA issues both).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import CertificatePoliciesOID, ExtensionOID

from tvorch.core import der
from tvorch.core.der import DerError, Element
from tvorch.core.vtpm.ekcert import EK_CERT_YEARS
from tvorch.errors import TrustError

# TCG OIDs (Platform Certificate Profile 1.1, "Object Identifiers").
PLATFORM_MANUFACTURER_STR = "2.23.133.5.1.1"  # tcg-at-platformManufacturerStr
PLATFORM_MODEL = "2.23.133.5.1.4"  # tcg-at-platformModel
PLATFORM_VERSION = "2.23.133.5.1.5"  # tcg-at-platformVersion
PLATFORM_SERIAL = "2.23.133.5.1.6"  # tcg-at-platformSerial
TCG_PLATFORM_SPECIFICATION = "2.23.133.2.17"  # tcg-at-tcgPlatformSpecification
TCG_CREDENTIAL_SPECIFICATION = "2.23.133.2.23"  # tcg-at-tcgCredentialSpecification
TCG_CREDENTIAL_TYPE = "2.23.133.2.25"  # tcg-at-tcgCredentialType
PLATFORM_ATTRIBUTE_CERTIFICATE = "2.23.133.8.2"  # tcg-kp-PlatformAttributeCertificate
ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
TRUSTED_PLATFORM_ENDORSEMENT = "TCG Trusted Platform Endorsement"  # the profile's certificatePolicies notice

DEFAULT_MANUFACTURER = "tvorch"
DEFAULT_MODEL = "tvorch-vm"
STRMAX = 255  # the profile's bound on every platform string
_BACKDATE = timedelta(minutes=5)  # as tvorch.core.vtpm.ekcert: the platform certificate follows the EK's
_PLATFORM_NAMES = {PLATFORM_MANUFACTURER_STR: "manufacturer", PLATFORM_MODEL: "model",
                   PLATFORM_VERSION: "version", PLATFORM_SERIAL: "serial"}


@dataclass(frozen=True)
class Platform:
    """What the certificate says the platform is: a tvorch VM of this model and version, VM id as serial."""

    manufacturer: str = DEFAULT_MANUFACTURER
    model: str = DEFAULT_MODEL
    version: str = ""
    serial: str | None = None


@dataclass(frozen=True)
class SpecVersion:
    """TCGSpecificationVersion: major, minor, revision."""

    major: int
    minor: int
    revision: int


@dataclass(frozen=True)
class PlatformSpecification:
    """TCGPlatformSpecification: the platform specification's version and its 4-octet TCG platform class."""

    version: SpecVersion
    platform_class: int


# A q35 VM with OVMF or SeaBIOS is a PC Client platform (class 1); OVMF measures per the
# PC Client Platform Firmware Profile, version 1.05 revision 23.
PC_CLIENT = PlatformSpecification(SpecVersion(1, 5, 23), 0x00000001)
CREDENTIAL_SPECIFICATION = SpecVersion(1, 1, 19)  # TCG Platform Certificate Profile 1.1 rev 19


@dataclass(frozen=True)
class PlatformCertificate:
    """A parsed platform certificate. Names are DER bytes (a ``Name``), compared byte for byte."""

    serial: int
    holder_issuer: bytes
    holder_serial: int
    issuer: bytes
    not_before: datetime
    not_after: datetime
    platform: Platform
    credential_type: str | None
    platform_specification: PlatformSpecification | None
    signature_algorithm: str
    tbs: bytes  # acinfo as signed
    signature: bytes


def issue_platform_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ek_cert: x509.Certificate,
    platform: Platform,
    now: datetime,
    *,
    serial: int | None = None,
    specification: PlatformSpecification = PC_CLIENT,
) -> bytes:
    """The DER platform certificate for the TPM whose EK certificate is EK_CERT, signed by the node CA.

    SERIAL, when given, must be positive and below 2**159 (at most 20 octets); None draws a random one.
    """
    if now.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    serial = x509.random_serial_number() if serial is None else serial
    if not 0 < serial < 2**159:
        raise ValueError(f"serial number {serial} is out of range (1 .. 2**159-1)")
    fields = [(PLATFORM_MANUFACTURER_STR, platform.manufacturer), (PLATFORM_MODEL, platform.model),
              (PLATFORM_VERSION, platform.version)]
    if platform.serial is not None:
        fields.append((PLATFORM_SERIAL, platform.serial))
    for oid, value in fields:
        if not 1 <= len(value) <= STRMAX:
            raise ValueError(f"platform {_PLATFORM_NAMES[oid]} must have 1 to {STRMAX} characters, not {len(value)}")
    not_before = (now - _BACKDATE).replace(microsecond=0)
    not_after = min(_add_years(now, EK_CERT_YEARS), ca_cert.not_valid_after_utc,
                    ek_cert.not_valid_after_utc).replace(microsecond=0)
    san = x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(x509.ObjectIdentifier(oid), value)])
        for oid, value in fields
    ]))])
    policies = x509.CertificatePolicies([x509.PolicyInformation(
        CertificatePoliciesOID.ANY_POLICY, [x509.UserNotice(None, TRUSTED_PLATFORM_ENDORSEMENT)])])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    algorithm = der.sequence(der.oid(ECDSA_WITH_SHA256))
    tbs = der.sequence(
        der.integer(1),  # v2
        der.sequence(der.context(0, _general_names(issuer_name(ek_cert)) + der.integer(ek_cert.serial_number))),
        der.context(0, _general_names(subject_name(ca_cert))),
        algorithm,
        der.integer(serial),
        der.sequence(der.generalized_time(not_before), der.generalized_time(not_after)),
        der.sequence(
            _attribute(TCG_CREDENTIAL_TYPE, der.sequence(der.oid(PLATFORM_ATTRIBUTE_CERTIFICATE))),
            _attribute(TCG_CREDENTIAL_SPECIFICATION, _spec_version(CREDENTIAL_SPECIFICATION)),
            _attribute(TCG_PLATFORM_SPECIFICATION, der.sequence(
                _spec_version(specification.version), der.octet_string(specification.platform_class.to_bytes(4, "big")))),
        ),
        der.sequence(
            _extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string, san.public_bytes()),
            _extension(ExtensionOID.CERTIFICATE_POLICIES.dotted_string, policies.public_bytes()),
            _extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string, aki.public_bytes()),
        ),
    )
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der.sequence(tbs, algorithm, der.bit_string(signature))


def parse_platform_certificate(data: bytes) -> PlatformCertificate:
    """The fields of a platform certificate in the layout above; DerError (a ValueError) if it is not one."""
    outer = der.read(data).expect(der.SEQUENCE, "AttributeCertificate").children()
    if len(outer) != 3:
        raise DerError(f"AttributeCertificate has {len(outer)} parts, not 3")
    info, outer_algorithm, signature = outer
    fields = info.expect(der.SEQUENCE, "acinfo").children()
    if len(fields) < 7:
        raise DerError(f"acinfo has {len(fields)} fields, at least 7 expected")
    version, holder, issuer, algorithm, serial, validity, attributes, *rest = fields
    if version.as_int() != 1:
        raise DerError(f"attribute certificate version {version.as_int() + 1}, not 2")
    algorithm_oid = _algorithm(algorithm)
    if algorithm.raw != outer_algorithm.raw:
        raise DerError("the signed algorithm differs from the outer one")
    holder_parts = holder.expect(der.SEQUENCE, "holder").children()
    if len(holder_parts) != 1 or holder_parts[0].tag != 0xA0:
        raise DerError("holder is not a baseCertificateID")
    issuer_serial = holder_parts[0].children()
    if len(issuer_serial) not in (2, 3):
        raise DerError("holder's baseCertificateID is not an issuer and serial")
    v2form = issuer.expect(0xA0, "issuer (v2Form)").children()
    if not v2form:
        raise DerError("issuer v2Form has no issuerName")
    times = validity.expect(der.SEQUENCE, "validity").children()
    if len(times) != 2:
        raise DerError("validity is not two times")
    found = _attributes(attributes)
    extensions: dict[str, Element] = {}
    for element in rest:
        if element.tag == der.BIT_STRING:  # issuerUniqueID, unused by this profile
            continue
        extensions = _extensions(element)
    san = extensions.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)
    credential_type = found.get(TCG_CREDENTIAL_TYPE)
    platform_spec = found.get(TCG_PLATFORM_SPECIFICATION)
    return PlatformCertificate(
        serial=serial.as_int(),
        holder_issuer=_directory_name(issuer_serial[0]),
        holder_serial=issuer_serial[1].as_int(),
        issuer=_directory_name(v2form[0]),
        not_before=times[0].as_time(),
        not_after=times[1].as_time(),
        platform=_platform(san) if san is not None else Platform("", "", "", None),
        credential_type=_credential_type(credential_type) if credential_type is not None else None,
        platform_specification=_platform_spec(platform_spec) if platform_spec is not None else None,
        signature_algorithm=algorithm_oid,
        tbs=info.raw,
        signature=signature.as_bits(),
    )


def verify_platform_certificate(data: bytes, ca_cert: x509.Certificate, ek_cert: x509.Certificate,
                                at: datetime) -> None:
    """Raise TrustError unless DATA is a platform certificate by CA_CERT for the TPM of EK_CERT, valid AT."""
    if at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    ca_name = ca_cert.subject.rfc4514_string()
    try:
        cert = parse_platform_certificate(data)
        ca_subject = subject_name(ca_cert)
        ek_issuer = issuer_name(ek_cert)
    except ValueError as err:
        raise TrustError(f"platform certificate is malformed: {err}") from None
    if cert.issuer != ca_subject:
        raise TrustError(f"platform certificate names another issuer than the CA '{ca_name}'")
    if cert.signature_algorithm != ECDSA_WITH_SHA256:
        raise TrustError(f"platform certificate is signed with {cert.signature_algorithm}, not ecdsa-with-SHA256")
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TrustError(f"the CA '{ca_name}' has a {type(public).__name__}, not an ECDSA key")
    try:
        public.verify(cert.signature, cert.tbs, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise TrustError(f"platform certificate is not signed by the CA '{ca_name}'") from None
    if cert.credential_type != PLATFORM_ATTRIBUTE_CERTIFICATE:
        raise TrustError(f"attribute certificate is of type {cert.credential_type or 'none'}, "
                         "not tcg-kp-PlatformAttributeCertificate")
    if cert.holder_issuer != ek_issuer or cert.holder_serial != ek_cert.serial_number:
        raise TrustError(f"platform certificate is for the EK certificate with serial {cert.holder_serial:x}, "
                         f"not this one (serial {ek_cert.serial_number:x}, issuer '{ek_cert.issuer.rfc4514_string()}')")
    if not ca_cert.not_valid_before_utc <= at <= ca_cert.not_valid_after_utc:
        raise TrustError(f"CA certificate is not valid at {at.isoformat()}")
    if not cert.not_before <= at <= cert.not_after:
        raise TrustError(f"platform certificate is not valid at {at.isoformat()} "
                         f"(valid {cert.not_before.isoformat()} to {cert.not_after.isoformat()})")


def issuer_name(cert: x509.Certificate) -> bytes:
    """The DER ``Name`` of CERT's issuer, exactly as in the certificate."""
    return _tbs_fields(cert)[3].raw


def subject_name(cert: x509.Certificate) -> bytes:
    """The DER ``Name`` of CERT's subject, exactly as in the certificate."""
    return _tbs_fields(cert)[5].raw


def _tbs_fields(cert: x509.Certificate) -> list[Element]:
    """TBSCertificate's fields with the version always present: version, serial, signature, issuer, validity, subject."""
    fields = der.read(cert.tbs_certificate_bytes).expect(der.SEQUENCE, "TBSCertificate").children()
    if fields and fields[0].tag != 0xA0:  # v1: no explicit version
        fields = [Element(0xA0, b"", b""), *fields]
    if len(fields) < 7:
        raise DerError("TBSCertificate is too short")
    fields[3].expect(der.SEQUENCE, "issuer")
    fields[5].expect(der.SEQUENCE, "subject")
    return fields


def _general_names(name: bytes) -> bytes:
    """GeneralNames with one directoryName ([4], explicit because Name is a CHOICE)."""
    return der.sequence(der.tlv(0xA4, name))


def _directory_name(general_names: Element) -> bytes:
    names = general_names.expect(der.SEQUENCE, "GeneralNames").children()
    if len(names) != 1 or names[0].tag != 0xA4:
        raise DerError("GeneralNames is not one directoryName")
    inner = names[0].children()
    if len(inner) != 1:
        raise DerError("directoryName does not hold one Name")
    return inner[0].expect(der.SEQUENCE, "Name").raw


def _attribute(oid: str, value: bytes) -> bytes:
    return der.sequence(der.oid(oid), der.set_of(value))


def _extension(oid: str, value: bytes) -> bytes:
    return der.sequence(der.oid(oid), der.octet_string(value))  # critical FALSE is the DEFAULT, left out in DER


def _spec_version(version: SpecVersion) -> bytes:
    return der.sequence(der.integer(version.major), der.integer(version.minor), der.integer(version.revision))


def _algorithm(element: Element) -> str:
    parts = element.expect(der.SEQUENCE, "AlgorithmIdentifier").children()
    if not parts:
        raise DerError("empty AlgorithmIdentifier")
    return parts[0].as_oid()


def _attributes(element: Element) -> dict[str, Element]:
    """type -> its single value; an attribute given twice or with several values is refused."""
    found: dict[str, Element] = {}
    for attribute in element.expect(der.SEQUENCE, "attributes").children():
        parts = attribute.expect(der.SEQUENCE, "Attribute").children()
        if len(parts) != 2:
            raise DerError("Attribute is not a type and a set of values")
        oid = parts[0].as_oid()
        values = parts[1].expect(der.SET, "attribute values").children()
        if len(values) != 1 or oid in found:
            raise DerError(f"attribute {oid} does not have exactly one value")
        found[oid] = values[0]
    return found


def _extensions(element: Element) -> dict[str, Element]:
    """extnID -> extnValue's content, parsed; a critical extension this module does not know is refused."""
    found: dict[str, Element] = {}
    for extension in element.expect(der.SEQUENCE, "extensions").children():
        parts = extension.expect(der.SEQUENCE, "Extension").children()
        if len(parts) not in (2, 3):
            raise DerError("Extension is not an id, a criticality and a value")
        oid = parts[0].as_oid()
        critical = len(parts) == 3 and parts[1].expect(der.BOOLEAN, "critical").content != b"\x00"
        if oid in found:
            raise DerError(f"extension {oid} appears twice")
        known = (ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string, ExtensionOID.CERTIFICATE_POLICIES.dotted_string,
                 ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string)
        if critical and oid not in known:
            raise DerError(f"unknown critical extension {oid}")
        found[oid] = der.read(parts[-1].expect(der.OCTET_STRING, "extnValue").content)
    return found


def _platform(san: Element) -> Platform:
    """platformManufacturerStr, platformModel, platformVersion, platformSerial from the SAN's directoryName."""
    values: dict[str, str] = {}
    for name in san.expect(der.SEQUENCE, "subjectAltName").children():
        if name.tag != 0xA4:
            continue
        for rdn in der.read(name.content).expect(der.SEQUENCE, "Name").children():
            for pair in rdn.expect(der.SET, "RelativeDistinguishedName").children():
                parts = pair.expect(der.SEQUENCE, "AttributeTypeAndValue").children()
                if len(parts) != 2:
                    raise DerError("AttributeTypeAndValue is not a type and a value")
                key = _PLATFORM_NAMES.get(parts[0].as_oid())
                if key is not None:
                    values[key] = parts[1].as_text()
    return Platform(values.get("manufacturer", ""), values.get("model", ""), values.get("version", ""),
                    values.get("serial"))


def _credential_type(value: Element) -> str:
    parts = value.expect(der.SEQUENCE, "TCGCredentialType").children()
    if len(parts) != 1:
        raise DerError("TCGCredentialType is not one OBJECT IDENTIFIER")
    return parts[0].as_oid()


def _platform_spec(value: Element) -> PlatformSpecification:
    parts = value.expect(der.SEQUENCE, "TCGPlatformSpecification").children()
    if len(parts) != 2:
        raise DerError("TCGPlatformSpecification is not a version and a class")
    numbers = [n.as_int() for n in parts[0].expect(der.SEQUENCE, "TCGSpecificationVersion").children()]
    platform_class = parts[1].expect(der.OCTET_STRING, "platformClass").content
    if len(numbers) != 3 or len(platform_class) != 4:
        raise DerError("TCGPlatformSpecification is not three numbers and a 4-octet class")
    return PlatformSpecification(SpecVersion(*numbers), int.from_bytes(platform_class, "big"))


def _add_years(now: datetime, years: int) -> datetime:
    moment = now.astimezone(timezone.utc)
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February in a year that has none
        return moment.replace(year=moment.year + years, day=28)
