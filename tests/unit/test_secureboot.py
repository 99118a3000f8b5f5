"""PCR 7 from files: OVMF vars templates, signature databases, the boot file's signer, against real logs."""

from __future__ import annotations

import datetime
import gzip
import json
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.boot.prediction import replay
from tvorch.core.boot.secureboot import (
    CERT_X509_GUID,
    db_authority,
    pcr7_events,
    pe_signatures,
    secure_boot_enabled,
    signature_entries,
)
from tvorch.core.boot.uefi_vars import GLOBAL_VARIABLE_GUID, IMAGE_SECURITY_DATABASE_GUID, VariableStore, Variable, \
    parse_vars_file
from tvorch.errors import InputError, TrustError

DATA = Path(__file__).resolve().parents[1] / "data"
PLAIN_VARS = gzip.decompress((DATA / "ovmf/OVMF_VARS_4M.fd.gz").read_bytes())
SNAKEOIL_VARS = gzip.decompress((DATA / "ovmf/OVMF_VARS_4M.snakeoil.fd.gz").read_bytes())
# The Authenticode signature of the test guest's snakeoil-signed UKI (its certificate table entry's PKCS#7).
UKI_SIGNATURE = (DATA / "ovmf/test-guest-uki.p7").read_bytes()


def minimal_pe(signatures: list[bytes] = ()) -> bytes:
    """A PE32+ with no sections and a certificate table of WIN_CERTIFICATE entries at its end."""
    optional = bytearray(240)  # PE32+ optional header with 16 data directories
    struct.pack_into("<H", optional, 0, 0x20B)
    struct.pack_into("<I", optional, 108, 16)
    head = bytearray(0x40)
    head[:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, 0x40)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, 0, 0, 0, 0, len(optional), 0x22)
    table = b""
    for blob in signatures:
        entry = struct.pack("<IHH", 8 + len(blob), 0x0200, 0x0002) + blob
        table += entry + b"\0" * (-len(entry) % 8)
    body = bytes(head) + coff
    cert_at = len(body) + len(optional)
    if table:
        struct.pack_into("<II", optional, 112 + 8 * 4, cert_at, len(table))
    return body + bytes(optional) + table


def pcrs(name: str) -> dict[str, str]:
    return json.loads((DATA / f"eventlogs/{name}.pcrs.json").read_text())["sha256"]


def logged_pcr7(name: str) -> list[tuple[str, str]]:
    log = parse_event_log((DATA / f"eventlogs/{name}.bin").read_bytes())
    return [(e.type_name, e.digests["sha256"]) for e in log.events if e.pcr == 7]


def test_plain_vars_template_holds_no_keys_and_boots_without_secure_boot():
    store = parse_vars_file(PLAIN_VARS)
    assert store.authenticated and not store.variables
    assert not secure_boot_enabled(store)


def test_secure_boot_off_reproduces_every_pcr7_event_of_the_logged_boot():
    events = pcr7_events(parse_vars_file(PLAIN_VARS), [("BOOTX64.EFI", minimal_pe([UKI_SIGNATURE]), None)])
    assert [(e.type_name, e.digest) for e in events] == logged_pcr7("uefi-crb")
    assert replay(events)[7] == pcrs("uefi-crb")["7"]


def test_snakeoil_secure_boot_reproduces_every_pcr7_event_including_the_db_authority():
    store = parse_vars_file(SNAKEOIL_VARS)
    assert secure_boot_enabled(store)
    events = pcr7_events(store, [("BOOTX64.EFI", minimal_pe([UKI_SIGNATURE]), None)])
    assert [(e.type_name, e.digest) for e in events] == logged_pcr7("uefi-secureboot")
    assert replay(events)[7] == pcrs("uefi-secureboot")["7"]
    assert events[-1].type_name == "EV_EFI_VARIABLE_AUTHORITY"


def test_one_authority_event_per_db_entry_however_many_files_it_verified():
    pe = minimal_pe([UKI_SIGNATURE])
    events = pcr7_events(parse_vars_file(SNAKEOIL_VARS), [("a.efi", pe, None), ("b.efi", pe, None)])
    assert [e.type_name for e in events].count("EV_EFI_VARIABLE_AUTHORITY") == 1


def _self_signed(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return key, cert


def _signed_by(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    return (pkcs7.PKCS7SignatureBuilder().set_data(b"authenticode digest").add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))


def _store_with_db(*certs: x509.Certificate) -> VariableStore:
    """The snakeoil store with its db replaced by one X.509 signature list per certificate."""
    store = parse_vars_file(SNAKEOIL_VARS)
    db = b""
    for cert in certs:
        entry = uuid.uuid4().bytes_le + cert.public_bytes(serialization.Encoding.DER)
        db += CERT_X509_GUID.bytes_le + struct.pack("<III", 28 + len(entry), 0, len(entry)) + entry
    variables = dict(store.variables)
    variables[(IMAGE_SECURITY_DATABASE_GUID, "db")] = Variable(IMAGE_SECURITY_DATABASE_GUID, "db", 0x27, db)
    return VariableStore(True, variables)


def test_the_authority_is_the_db_entry_that_signed_the_file_not_the_first_one():
    other_key, other = _self_signed("another db key")
    key, signer = _self_signed("the boot file's key")
    store = _store_with_db(other, signer)
    pe = minimal_pe([_signed_by(key, signer)])
    entry = db_authority(signature_entries(store.get(IMAGE_SECURITY_DATABASE_GUID, "db")), pe)
    assert x509.load_der_x509_certificate(entry.data) == signer


def test_a_different_db_key_changes_the_predicted_db_and_refuses_the_snakeoil_signed_file():
    _, other = _self_signed("not the snakeoil key")
    store = _store_with_db(other)
    with pytest.raises(TrustError, match="signed by no key in db: Secure Boot would refuse"):
        pcr7_events(store, [("BOOTX64.EFI", minimal_pe([UKI_SIGNATURE]), None)])
    plain = pcr7_events(store)
    assert [e.digest for e in plain] != [d for _, d in logged_pcr7("uefi-secureboot")][:len(plain)]


def test_an_unsigned_file_under_secure_boot_is_refused_and_allowed_without_it():
    with pytest.raises(TrustError, match="is not signed"):
        pcr7_events(parse_vars_file(SNAKEOIL_VARS), [("BOOTX64.EFI", minimal_pe(), None)])
    assert pcr7_events(parse_vars_file(PLAIN_VARS), [("BOOTX64.EFI", minimal_pe(), None)])


def test_a_sha256_db_entry_matching_the_authenticode_digest_is_the_authority():
    digest = bytes(range(32))
    entry = uuid.uuid4().bytes_le + digest
    from tvorch.core.boot.secureboot import CERT_SHA256_GUID
    db = CERT_SHA256_GUID.bytes_le + struct.pack("<III", 28 + len(entry), 0, len(entry)) + entry
    found = db_authority(signature_entries(db), minimal_pe(), digest.hex())
    assert found.data == digest


def test_secure_boot_enable_zero_turns_secure_boot_off_even_with_pk():
    from tvorch.core.boot.uefi_vars import SECURE_BOOT_ENABLE_GUID
    store = parse_vars_file(SNAKEOIL_VARS)
    variables = dict(store.variables)
    variables[(SECURE_BOOT_ENABLE_GUID, "SecureBootEnable")] = Variable(SECURE_BOOT_ENABLE_GUID, "SecureBootEnable",
                                                                        3, b"\0")
    assert not secure_boot_enabled(VariableStore(True, variables))
    del variables[(GLOBAL_VARIABLE_GUID, "PK")]
    assert not secure_boot_enabled(VariableStore(True, variables))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:40], "too short"),
    (lambda b: b[:40] + b"XXXX" + b[44:], "no firmware volume signature"),
    (lambda b: b[:72] + bytes(16) + b[88:], "is not a variable store"),
    # the first variable (byte 100) claims a name larger than the store: its NameSize is at byte 136
    (lambda b: b[:136] + struct.pack("<I", 0x7FFFFFFF) + b[140:], "runs past"),
])
def test_a_broken_vars_file_is_refused_in_one_line(mutate, message):
    with pytest.raises(InputError, match=message):
        parse_vars_file(mutate(SNAKEOIL_VARS))


def test_broken_signature_lists_and_certificate_tables_are_refused():
    with pytest.raises(InputError, match="inconsistent sizes"):
        signature_entries(CERT_X509_GUID.bytes_le + struct.pack("<III", 10, 0, 20))
    pe = bytearray(minimal_pe([UKI_SIGNATURE]))
    struct.pack_into("<I", pe, len(pe) - len(UKI_SIGNATURE) - 8 - (-(len(UKI_SIGNATURE) + 8) % 8), 0xFFFF)
    with pytest.raises(InputError, match="certificate entry"):
        pe_signatures(bytes(pe))
    with pytest.raises(InputError, match="not a PE file"):
        pe_signatures(b"not a pe")
    garbage = minimal_pe([b"\x30\x03\x02\x01\x01"])
    with pytest.raises(InputError, match="not a PKCS#7"):
        pcr7_events(parse_vars_file(SNAKEOIL_VARS), [("x.efi", garbage, None)])
