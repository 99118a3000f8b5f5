"""Platform certificates on bytes: issue, parse, verify, and every way a tampered one is refused.

The structure is also checked with ``openssl asn1parse``, which knows nothing
of tvorch's reader, and the DER helpers (tvorch.core.der) on their own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.components import require
from tvorch.core import der
from tvorch.core.der import DerError
from tvorch.core.vtpm.ekcert import issue_ek_certificate
from tvorch.core.vtpm.platformcert import (
    CREDENTIAL_SPECIFICATION,
    ECDSA_WITH_SHA256,
    PC_CLIENT,
    PLATFORM_ATTRIBUTE_CERTIFICATE,
    Platform,
    issue_platform_certificate,
    issuer_name,
    parse_platform_certificate,
    subject_name,
    verify_platform_certificate,
)
from tvorch.core.signing import make_ca
from tvorch.errors import TrustError

NOW = datetime(2025, 3, 1, 12, 0, 30, 123456, tzinfo=timezone.utc)
PLATFORM = Platform("tvorch", "tvorch-vm", "0.1.0", "inst-0001")


class Pki:
    """A node CA, an RSA EK certificate it issued, and a platform certificate for that EK."""

    def __init__(self, name: str = "tvorch node CA n1", ek_serial: int | None = None) -> None:
        self.ca_key, self.ca = make_ca(name, NOW)
        self.ek_key = _RSA_EK
        self.ek = issue_ek_certificate(self.ca_key, self.ca, self.ek_key, "id:00001014", "swtpm", "id:20191023",
                                       ek_serial, NOW)
        self.platform = issue_platform_certificate(self.ca_key, self.ca, self.ek, PLATFORM, NOW)


_RSA_EK = rsa.generate_private_key(65537, 2048).public_key()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


# --- issue and verify ---------------------------------------------------------------------------


def test_issued_certificate_verifies_and_says_what_was_asked(pki: Pki) -> None:
    verify_platform_certificate(pki.platform, pki.ca, pki.ek, NOW)
    cert = parse_platform_certificate(pki.platform)
    assert cert.holder_issuer == pki.ca.subject.public_bytes() == issuer_name(pki.ek)
    assert cert.holder_serial == pki.ek.serial_number
    assert cert.issuer == subject_name(pki.ca) == pki.ca.subject.public_bytes()
    assert cert.platform == PLATFORM
    assert cert.credential_type == PLATFORM_ATTRIBUTE_CERTIFICATE
    assert cert.platform_specification == PC_CLIENT
    assert cert.signature_algorithm == ECDSA_WITH_SHA256
    assert 0 < cert.serial < 2**159  # at most 20 octets, positive
    # The EK certificate's policy: 5 minutes back, never beyond the CA (20 years, before the EK's 30).
    assert cert.not_before == (NOW - timedelta(minutes=5)).replace(microsecond=0)
    assert cert.not_after == pki.ca.not_valid_after_utc == pki.ek.not_valid_after_utc


def test_validity_runs_thirty_years_under_a_longer_lived_ca(pki: Pki) -> None:
    ca = _ca_valid_until(pki, NOW + timedelta(days=365 * 40))
    ek = issue_ek_certificate(pki.ca_key, ca, _RSA_EK, "id:00001014", "swtpm", "id:20191023", None, NOW)
    cert = parse_platform_certificate(issue_platform_certificate(pki.ca_key, ca, ek, PLATFORM, NOW))
    assert cert.not_after == NOW.replace(year=2055, microsecond=0) == ek.not_valid_after_utc.replace(microsecond=0)


def test_serial_is_random_and_a_given_one_is_kept(pki: Pki) -> None:
    again = issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, PLATFORM, NOW)
    assert parse_platform_certificate(again).serial != parse_platform_certificate(pki.platform).serial
    fixed = issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, PLATFORM, NOW, serial=2**159 - 1)
    assert parse_platform_certificate(fixed).serial == 2**159 - 1
    for bad in (0, -1, 2**159):
        with pytest.raises(ValueError, match="out of range"):
            issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, PLATFORM, NOW, serial=bad)


def test_without_a_serial_the_platform_has_none(pki: Pki) -> None:
    der_bytes = issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, Platform(version="2.0"), NOW)
    assert parse_platform_certificate(der_bytes).platform == Platform("tvorch", "tvorch-vm", "2.0", None)
    verify_platform_certificate(der_bytes, pki.ca, pki.ek, NOW)


@pytest.mark.parametrize("platform", [Platform(version=""), Platform("", "m", "1"), Platform(version="v" * 256),
                                      Platform(version="1", serial="")])
def test_platform_strings_must_have_1_to_255_characters(pki: Pki, platform: Platform) -> None:
    with pytest.raises(ValueError, match="1 to 255 characters"):
        issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, platform, NOW)


def test_non_ascii_platform_strings_are_utf8(pki: Pki) -> None:
    platform = Platform("tvörch", "VM – q35", "1.0", "ünïcode")
    der_bytes = issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, platform, NOW)
    assert parse_platform_certificate(der_bytes).platform == platform


def test_naive_times_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_platform_certificate(pki.ca_key, pki.ca, pki.ek, PLATFORM, NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_platform_certificate(pki.platform, pki.ca, pki.ek, NOW.replace(tzinfo=None))


# --- refusals -----------------------------------------------------------------------------------


def test_every_flipped_byte_of_the_signed_part_is_refused(pki: Pki) -> None:
    tbs = parse_platform_certificate(pki.platform).tbs
    start = pki.platform.index(tbs)
    for index in range(start, start + len(tbs)):
        with pytest.raises(TrustError):
            verify_platform_certificate(_flip(pki.platform, index), pki.ca, pki.ek, NOW)


def test_a_changed_value_is_refused_by_the_signature(pki: Pki) -> None:
    index = pki.platform.index(b"tvorch-vm")
    forged = pki.platform[:index] + b"tvorch-VM" + pki.platform[index + 9:]
    assert parse_platform_certificate(forged).platform.model == "tvorch-VM"  # still well formed
    with pytest.raises(TrustError, match="not signed by the CA 'CN=tvorch node CA n1'"):
        verify_platform_certificate(forged, pki.ca, pki.ek, NOW)


def test_every_flipped_byte_of_the_signature_is_refused(pki: Pki) -> None:
    signature = parse_platform_certificate(pki.platform).signature
    start = pki.platform.rindex(signature)
    for index in range(start, start + len(signature)):
        with pytest.raises(TrustError):
            verify_platform_certificate(_flip(pki.platform, index), pki.ca, pki.ek, NOW)
    with pytest.raises(TrustError, match="not signed by the CA"):  # a valid DER signature, of something else
        other = ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
        tbs = parse_platform_certificate(pki.platform).tbs
        verify_platform_certificate(der.sequence(tbs, der.sequence(der.oid(ECDSA_WITH_SHA256)),
                                                 der.bit_string(other)), pki.ca, pki.ek, NOW)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_corruption_is_a_trust_error_never_a_crash(pki: Pki, data: st.DataObject) -> None:
    original = pki.platform
    index = data.draw(st.integers(0, len(original) - 1))
    mask = data.draw(st.integers(1, 255))
    with pytest.raises(TrustError):
        verify_platform_certificate(_flip(original, index, mask), pki.ca, pki.ek, NOW)
    cut = data.draw(st.integers(0, len(original) - 1))
    with pytest.raises(TrustError, match="malformed"):
        verify_platform_certificate(original[:cut], pki.ca, pki.ek, NOW)


@pytest.mark.parametrize("data", [b"", b"\x30\x00", b"not DER", b"\x30\x80\x00\x00"])
def test_garbage_is_malformed(pki: Pki, data: bytes) -> None:
    with pytest.raises(TrustError, match="^platform certificate is malformed: "):
        verify_platform_certificate(data, pki.ca, pki.ek, NOW)


def test_trailing_bytes_are_malformed(pki: Pki) -> None:
    with pytest.raises(TrustError, match="malformed: 1 bytes after"):
        verify_platform_certificate(pki.platform + b"\x00", pki.ca, pki.ek, NOW)


def test_an_ek_certificate_is_not_a_platform_certificate(pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(TrustError, match="malformed"):
        verify_platform_certificate(pki.ek.public_bytes(serialization.Encoding.DER), pki.ca, pki.ek, NOW)


def test_another_ca_is_refused(pki: Pki) -> None:
    other = Pki("another CA")
    with pytest.raises(TrustError, match="names another issuer than the CA 'CN=another CA'"):
        verify_platform_certificate(pki.platform, other.ca, pki.ek, NOW)
    # The same name on another key: only the signature tells them apart.
    impostor = Pki("tvorch node CA n1")
    with pytest.raises(TrustError, match="not signed by the CA 'CN=tvorch node CA n1'"):
        verify_platform_certificate(pki.platform, impostor.ca, pki.ek, NOW)
    with pytest.raises(TrustError, match="not signed by the CA"):
        verify_platform_certificate(impostor.platform, pki.ca, pki.ek, NOW)


def test_the_holder_must_be_this_ek_certificate(pki: Pki) -> None:
    # Another EK certificate from the same CA (another serial) ...
    sibling = issue_ek_certificate(pki.ca_key, pki.ca, _RSA_EK, "id:00001014", "swtpm", "id:20191023", None, NOW)
    with pytest.raises(TrustError, match=r"is for the EK certificate with serial [0-9a-f]+, not this one"):
        verify_platform_certificate(pki.platform, pki.ca, sibling, NOW)
    # ... or one with the same serial from another issuer.
    other = Pki("another CA", ek_serial=pki.ek.serial_number)
    assert other.ek.serial_number == pki.ek.serial_number
    with pytest.raises(TrustError, match="not this one .*issuer 'CN=another CA'"):
        verify_platform_certificate(pki.platform, pki.ca, other.ek, NOW)


def test_validity_is_checked_at_the_given_time(pki: Pki) -> None:
    cert = parse_platform_certificate(pki.platform)
    verify_platform_certificate(pki.platform, pki.ca, pki.ek, cert.not_before)
    verify_platform_certificate(pki.platform, pki.ca, pki.ek, cert.not_after)
    for at in (cert.not_before - timedelta(seconds=1), cert.not_after + timedelta(seconds=1)):
        with pytest.raises(TrustError, match="certificate is not valid at"):
            verify_platform_certificate(pki.platform, pki.ca, pki.ek, at)


def test_expired_while_the_ca_still_holds(pki: Pki) -> None:
    long_ca = _ca_valid_until(pki, NOW + timedelta(days=365 * 40))
    ek = issue_ek_certificate(pki.ca_key, long_ca, _RSA_EK, "id:00001014", "swtpm", "id:20191023", None, NOW)
    der_bytes = issue_platform_certificate(pki.ca_key, long_ca, ek, PLATFORM, NOW)
    late = NOW + timedelta(days=365 * 35)
    with pytest.raises(TrustError, match=r"^platform certificate is not valid at 2060-.* \(valid 2025-03-01T11:55:30"):
        verify_platform_certificate(der_bytes, long_ca, ek, late)


def test_a_signed_attribute_certificate_of_another_type_is_refused(pki: Pki) -> None:
    """Signed by the CA and for this EK, but not a platform certificate (another tcg-kp type)."""
    cert = parse_platform_certificate(pki.platform)
    other_type = cert.tbs.replace(der.oid(PLATFORM_ATTRIBUTE_CERTIFICATE), der.oid("2.23.133.8.3"))
    assert other_type != cert.tbs
    signature = pki.ca_key.sign(other_type, ec.ECDSA(hashes.SHA256()))
    forged = der.sequence(other_type, der.sequence(der.oid(ECDSA_WITH_SHA256)), der.bit_string(signature))
    with pytest.raises(TrustError, match="of type 2.23.133.8.3, not tcg-kp-PlatformAttributeCertificate"):
        verify_platform_certificate(forged, pki.ca, pki.ek, NOW)


def test_another_signature_algorithm_is_refused(pki: Pki) -> None:
    cert = parse_platform_certificate(pki.platform)
    sha384 = "1.2.840.10045.4.3.3"
    tbs = cert.tbs.replace(der.oid(ECDSA_WITH_SHA256), der.oid(sha384))
    signature = pki.ca_key.sign(tbs, ec.ECDSA(hashes.SHA384()))
    forged = der.sequence(tbs, der.sequence(der.oid(sha384)), der.bit_string(signature))
    with pytest.raises(TrustError, match="signed with 1.2.840.10045.4.3.3, not ecdsa-with-SHA256"):
        verify_platform_certificate(forged, pki.ca, pki.ek, NOW)
    mismatched = der.sequence(cert.tbs, der.sequence(der.oid(sha384)), der.bit_string(cert.signature))
    with pytest.raises(TrustError, match="signed algorithm differs from the outer one"):
        verify_platform_certificate(mismatched, pki.ca, pki.ek, NOW)


# --- an independent look at the structure -------------------------------------------------------

# (depth, what openssl asn1parse prints) for the RFC 5755 / TCG layout, with the platform serial.
EXPECTED = [
    (0, "SEQUENCE"),  # AttributeCertificate
    (1, "SEQUENCE"),  # acinfo
    (2, "INTEGER :01"),  # version v2
    (2, "SEQUENCE"),  # holder
    (3, "cont [ 0 ]"),  # baseCertificateID
    (4, "SEQUENCE"), (5, "cont [ 4 ]"), (6, "SEQUENCE"), (7, "SET"), (8, "SEQUENCE"),  # GeneralNames/directoryName
    (9, "OBJECT :commonName"), (9, "UTF8STRING :tvorch node CA n1"),
    (4, "INTEGER"),  # the EK certificate's serial
    (2, "cont [ 0 ]"),  # issuer v2Form
    (3, "SEQUENCE"), (4, "cont [ 4 ]"), (5, "SEQUENCE"), (6, "SET"), (7, "SEQUENCE"),
    (8, "OBJECT :commonName"), (8, "UTF8STRING :tvorch node CA n1"),
    (2, "SEQUENCE"), (3, "OBJECT :ecdsa-with-SHA256"),  # signature
    (2, "INTEGER"),  # serialNumber
    (2, "SEQUENCE"), (3, "GENERALIZEDTIME :20250301115530Z"), (3, "GENERALIZEDTIME :20450301120030Z"),
    (2, "SEQUENCE"),  # attributes
    (3, "SEQUENCE"), (4, "OBJECT :2.23.133.2.25"), (4, "SET"), (5, "SEQUENCE"), (6, "OBJECT :2.23.133.8.2"),
    (3, "SEQUENCE"), (4, "OBJECT :2.23.133.2.23"), (4, "SET"), (5, "SEQUENCE"),
    (6, "INTEGER :01"), (6, "INTEGER :01"), (6, "INTEGER :13"),
    (3, "SEQUENCE"), (4, "OBJECT :2.23.133.2.17"), (4, "SET"), (5, "SEQUENCE"), (6, "SEQUENCE"),
    (7, "INTEGER :01"), (7, "INTEGER :05"), (7, "INTEGER :17"), (6, "OCTET STRING [HEX DUMP] :00000001"),
    (2, "SEQUENCE"),  # extensions
    (3, "SEQUENCE"), (4, "OBJECT :X509v3 Subject Alternative Name"), (4, "OCTET STRING"),
    (3, "SEQUENCE"), (4, "OBJECT :X509v3 Certificate Policies"), (4, "OCTET STRING"),
    (3, "SEQUENCE"), (4, "OBJECT :X509v3 Authority Key Identifier"), (4, "OCTET STRING"),
    (1, "SEQUENCE"), (2, "OBJECT :ecdsa-with-SHA256"),  # signatureAlgorithm
    (1, "BIT STRING"),  # signatureValue
]
EXPECTED_SAN = [
    (0, "SEQUENCE"), (1, "cont [ 4 ]"), (2, "SEQUENCE"),
    (3, "SET"), (4, "SEQUENCE"), (5, "OBJECT :2.23.133.5.1.1"), (5, "UTF8STRING :tvorch"),
    (3, "SET"), (4, "SEQUENCE"), (5, "OBJECT :2.23.133.5.1.4"), (5, "UTF8STRING :tvorch-vm"),
    (3, "SET"), (4, "SEQUENCE"), (5, "OBJECT :2.23.133.5.1.5"), (5, "UTF8STRING :0.1.0"),
    (3, "SET"), (4, "SEQUENCE"), (5, "OBJECT :2.23.133.5.1.6"), (5, "UTF8STRING :inst-0001"),
]


def _asn1parse(data: bytes, *args: str) -> list[tuple[int, str, int]]:
    """(depth, 'TYPE[ :value]', offset) per line of ``openssl asn1parse -i``."""
    done = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-i", *args], input=data,
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    rows = []
    for line in done.stdout.decode().splitlines():
        m = re.match(r"\s*(\d+):d=(\d+)\s+hl=\s*\d+ l=\s*\d+ (?:prim|cons):\s*(.*?)\s*$", line)
        assert m, line
        kind, _, value = m.group(3).partition(":")
        text = " ".join(kind.split()) + (" :" + value.strip() if value.strip() else "")
        rows.append((int(m.group(2)), text, int(m.group(1))))
    return rows


def _openssl() -> None:
    require(shutil.which("openssl") is not None, "openssl (Debian package openssl)")


def test_openssl_parses_the_rfc5755_tcg_layout(pki: Pki) -> None:
    _openssl()
    rows = _asn1parse(pki.platform)
    shape = [(depth, text) for depth, text, _ in rows]
    # Serials, key identifiers and the signature differ per issue: where EXPECTED names no value,
    # compare the kind only (a wrong value where it names one still differs).
    for i, (depth, text) in enumerate(shape):
        if (depth, text) not in EXPECTED:
            shape[i] = (depth, text.split(" :")[0].removesuffix(" [HEX DUMP]"))
    assert shape == EXPECTED
    san_offset = next(offset for _, text, offset in rows if "Subject Alternative Name" in text)
    san_value = next(offset for _, text, offset in rows if offset > san_offset and text.startswith("OCTET STRING"))
    san = [(depth, text) for depth, text, _ in _asn1parse(pki.platform, "-strparse", str(san_value))]
    assert san == EXPECTED_SAN
    policies_offset = next(offset for _, text, offset in rows if "Certificate Policies" in text)
    policies_value = next(offset for _, text, offset in rows if offset > policies_offset
                          and text.startswith("OCTET STRING"))
    policies = [text for _, text, _ in _asn1parse(pki.platform, "-strparse", str(policies_value))]
    assert "OBJECT :X509v3 Any Policy" in policies and "OBJECT :Policy Qualifier User Notice" in policies
    assert "UTF8STRING :TCG Trusted Platform Endorsement" in policies


def test_openssl_reads_the_same_serials_and_names(pki: Pki) -> None:
    _openssl()
    rows = _asn1parse(pki.platform)
    integers = [int(text.split(":")[1], 16) for depth, text, _ in rows if text.startswith("INTEGER :")]
    cert = parse_platform_certificate(pki.platform)
    assert pki.ek.serial_number in integers and cert.serial in integers


# --- the DER helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dotted", "encoded"), [
    ("2.23.133.8.2", "0605678105080 2"),
    ("1.2.840.10045.4.3.2", "06082a8648ce3d040302"),
    ("2.23.133.5.1.1", "06066781050501 01"),
    ("2.999.1", "0603883701"),
    ("0.9.2342.19200300.100.1.1", "060a0992268993f22c640101"),
])
def test_oids_match_their_known_encodings_and_read_back(dotted: str, encoded: str) -> None:
    data = bytes.fromhex(encoded.replace(" ", ""))
    assert der.oid(dotted) == data
    assert der.read(data).as_oid() == dotted
    assert x509.ObjectIdentifier(dotted).dotted_string == dotted


@given(st.integers(0, 2**200))
def test_integers_are_minimal_and_read_back(value: int) -> None:
    data = der.integer(value)
    assert der.read(data).as_int() == value
    content = der.read(data).content
    assert len(content) == 1 or not (content[0] == 0 and content[1] < 0x80)


@given(st.binary(max_size=70000))
def test_lengths_read_back(content: bytes) -> None:
    data = der.tlv(der.OCTET_STRING, content)
    element = der.read(data)
    assert element.content == content and element.raw == data


@pytest.mark.parametrize(("data", "reason"), [
    ("3080", "indefinite length"),
    ("04810100", "shortest form"),  # long form for a length below 128
    ("0482000100", "shortest form"),  # padded length
    ("0201", "past the end"),
    ("04", "truncated"),
    ("1f0100", "high-tag-number"),
    ("0400" "00", "bytes after"),
    ("0485ffffffffff", "oversized"),
])
def test_reader_refuses_what_is_not_der(data: str, reason: str) -> None:
    with pytest.raises(DerError, match=reason):
        der.read(bytes.fromhex(data))


@pytest.mark.parametrize(("data", "method", "reason"), [
    ("020200 01", "as_int", "shortest form"),
    ("0202ff80", "as_int", "shortest form"),
    ("0200", "as_int", "empty"),
    ("06028001", "as_oid", "padded"),
    ("060181", "as_oid", "truncated"),
    ("030201ff", "as_bits", "unused bits"),
    ("180e3230323530313031313230303030", "as_time", "YYYYMMDDHHMMSSZ"),
    ("0c02c328", "as_text", "validly encoded"),
    ("0401ff", "as_text", "not a string"),
    ("0401ff", "children", "primitive"),
])
def test_values_are_read_strictly(data: str, method: str, reason: str) -> None:
    element = der.read(bytes.fromhex(data.replace(" ", "")))
    with pytest.raises(DerError, match=reason):
        getattr(element, method)()


def test_set_of_is_sorted_and_times_are_utc() -> None:
    assert der.set_of(der.integer(2), der.integer(1)) == bytes.fromhex("3106020101020102")
    cet = timezone(timedelta(hours=1))
    moment = datetime(2030, 1, 1, 1, 0, 0, tzinfo=cet)
    assert der.read(der.generalized_time(moment)).as_time() == datetime(2030, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        der.generalized_time(datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        der.integer(-1)
    with pytest.raises(ValueError):
        der.oid("3.1")


def test_names_are_the_certificates_own_bytes(pki: Pki) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tvorch node CA n1")])
    assert issuer_name(pki.ek) == subject_name(pki.ca) == issuer_name(pki.ca) == name.public_bytes()
    assert subject_name(pki.ek) == x509.Name([]).public_bytes()  # the EK profile's empty subject
    assert CREDENTIAL_SPECIFICATION.major == 1


def _ca_valid_until(pki: Pki, until: datetime) -> x509.Certificate:
    """The same CA (name and key), reissued to last until UNTIL."""
    public = pki.ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(pki.ca.subject)
        .issuer_name(pki.ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(pki.ca_key, hashes.SHA256())
    )
