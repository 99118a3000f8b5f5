"""PCR 7 predicted from files: the Secure Boot state, its key databases, and the db authority of the boot file.

OVMF (edk2's Tcg2Dxe) measures into PCR 7, before any boot option runs, one
EV_EFI_VARIABLE_DRIVER_CONFIG event for each of SecureBoot, PK, KEK, db and
dbx (and dbt when present and not empty), an absent variable with empty
data, then the separator; with Secure Boot on, DxeImageVerificationLib adds
one EV_EFI_VARIABLE_AUTHORITY event for each db entry that verified an image
it loaded (once per entry). Every one of these digests is the sha256 of a
UEFI_VARIABLE_DATA (variable GUID, name length, data length, UTF-16 name,
data): so PCR 7 follows from the vars template and the boot file alone.

The SecureBoot value is what edk2's AuthVariableLib sets at start: 1 when PK
is enrolled (user mode) and SecureBootEnable is 1 or absent, else 0. The
authority is the first db X.509 entry that is the boot file's signer or a
certificate of its chain, or that issued one of them, as
``IsAllowedByDb`` tries them in order; a sha256 db entry equal to the file's
Authenticode digest is the fallback it takes next.

Pure: bytes in, PredictedEvents out.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from .. import der
from .prediction import PredictedEvent
from .uefi_vars import GLOBAL_VARIABLE_GUID, IMAGE_SECURITY_DATABASE_GUID, SECURE_BOOT_ENABLE_GUID, VariableStore
from ...errors import InputError, TrustError

PCR = 7
EV_DRIVER_CONFIG = "EV_EFI_VARIABLE_DRIVER_CONFIG"
EV_AUTHORITY = "EV_EFI_VARIABLE_AUTHORITY"
EV_SEPARATOR = "EV_SEPARATOR"
SEPARATOR_DIGEST = hashlib.sha256(b"\0\0\0\0").hexdigest()

CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

# Tcg2Dxe's mVariableType, in its order; dbt follows only when present and not empty.
SECURE_BOOT_VARIABLES: tuple[tuple[uuid.UUID, str], ...] = (
    (GLOBAL_VARIABLE_GUID, "SecureBoot"),
    (GLOBAL_VARIABLE_GUID, "PK"),
    (GLOBAL_VARIABLE_GUID, "KEK"),
    (IMAGE_SECURITY_DATABASE_GUID, "db"),
    (IMAGE_SECURITY_DATABASE_GUID, "dbx"),
)
DBT = (IMAGE_SECURITY_DATABASE_GUID, "dbt")

WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
_SECURITY_DIRECTORY = 4


@dataclass(frozen=True)
class SignatureEntry:
    """One EFI_SIGNATURE_DATA of a signature database: what an authority event carries."""

    type_guid: uuid.UUID
    owner: uuid.UUID
    data: bytes  # the certificate (DER) or hash, without the owner

    @property
    def signature_data(self) -> bytes:
        return self.owner.bytes_le + self.data


def variable_data(guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA: the structure whose sha256 is the event digest."""
    unicode_name = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + unicode_name + data


def variable_event(event_type: str, guid: uuid.UUID, name: str, data: bytes, what: str) -> PredictedEvent:
    return PredictedEvent(PCR, event_type, hashlib.sha256(variable_data(guid, name, data)).hexdigest(), what)


def secure_boot_enabled(store: VariableStore) -> bool:
    """The SecureBoot value OVMF will set from this store: PK enrolled and SecureBootEnable not 0."""
    pk = store.get(GLOBAL_VARIABLE_GUID, "PK")
    if not pk:
        return False
    enable = store.get(SECURE_BOOT_ENABLE_GUID, "SecureBootEnable")
    return enable is None or enable[:1] == b"\x01"


def signature_entries(database: bytes, what: str = "db") -> list[SignatureEntry]:
    """The entries of an EFI_SIGNATURE_LIST sequence (db, dbx), in order."""
    entries: list[SignatureEntry] = []
    pos = 0
    while pos < len(database):
        if len(database) - pos < 28:
            raise InputError(f"refused {what}: signature list at byte {pos} is truncated")
        type_bytes = database[pos:pos + 16]
        list_size, header_size, sig_size = struct.unpack_from("<III", database, pos + 16)
        if list_size < 28 + header_size or pos + list_size > len(database) or sig_size <= 16 \
                or (list_size - 28 - header_size) % sig_size:
            raise InputError(f"refused {what}: signature list at byte {pos} has inconsistent sizes "
                             f"(list {list_size}, header {header_size}, signature {sig_size})")
        type_guid = uuid.UUID(bytes_le=type_bytes)
        for at in range(pos + 28 + header_size, pos + list_size, sig_size):
            entry = database[at:at + sig_size]
            entries.append(SignatureEntry(type_guid, uuid.UUID(bytes_le=entry[:16]), entry[16:]))
        pos += list_size
    return entries


# --- the boot file's signature ----------------------------------------------------

def pe_signatures(pe: bytes, what: str = "boot file") -> list[bytes]:
    """The PKCS#7 SignedData blobs of a PE's certificate table (empty for an unsigned file)."""
    def bad(why: str) -> InputError:
        return InputError(f"refused {what}: {why}")

    if len(pe) < 0x40 or pe[:2] != b"MZ":
        raise bad("not a PE file (no MZ header)")
    e_lfanew = struct.unpack_from("<I", pe, 0x3C)[0]
    if e_lfanew + 24 > len(pe) or pe[e_lfanew:e_lfanew + 4] != b"PE\0\0":
        raise bad("no PE signature where the MZ header points")
    optional = e_lfanew + 24
    optional_size = struct.unpack_from("<H", pe, e_lfanew + 20)[0]
    magic = struct.unpack_from("<H", pe, optional)[0] if optional + 2 <= len(pe) else 0
    directories = {0x10B: optional + 96, 0x20B: optional + 112}.get(magic)
    if directories is None:
        raise bad(f"optional header magic {magic:#x} is neither PE32 nor PE32+")
    count_at = directories - 4
    entry = directories + 8 * _SECURITY_DIRECTORY
    if entry + 8 > optional + optional_size or entry + 8 > len(pe) \
            or struct.unpack_from("<I", pe, count_at)[0] <= _SECURITY_DIRECTORY:
        return []
    offset, size = struct.unpack_from("<II", pe, entry)
    if not size:
        return []
    if offset + size > len(pe) or offset < optional:
        raise bad(f"certificate table ({size} bytes at {offset}) lies outside the file")
    blobs = []
    pos, end = offset, offset + size
    while pos + 8 <= end:
        length, _revision, cert_type = struct.unpack_from("<IHH", pe, pos)
        if length < 8 or pos + length > end:
            raise bad(f"certificate entry at byte {pos} claims {length} bytes of a {size}-byte table")
        if cert_type == WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            blobs.append(pe[pos + 8:pos + length])
        pos += (length + 7) & ~7
    return blobs


@dataclass(frozen=True)
class Signer:
    """The certificates of one Authenticode signature: the signer first, then the rest of its chain."""

    chain: tuple[x509.Certificate, ...]


def signature_signer(blob: bytes, what: str = "boot file") -> Signer:
    """The signer of a PKCS#7 Authenticode signature and the chain its certificates make above it."""
    try:
        element, _end = der.read_prefix(blob)
        content = element.children()[1].children()[0]  # ContentInfo.content [0] -> SignedData
        signer_info = content.children()[-1].children()[0]  # signerInfos SET -> first SignerInfo
        issuer_serial = signer_info.children()[1].children()
        issuer, serial = issuer_serial[0].raw, issuer_serial[1].as_int()
        certs = pkcs7.load_der_pkcs7_certificates(element.raw)
    except (der.DerError, IndexError, ValueError) as err:
        raise InputError(f"refused {what}: its signature is not a PKCS#7 SignedData ({err})") from None
    signer = next((c for c in certs if c.serial_number == serial and c.issuer.public_bytes() == issuer), None)
    if signer is None:
        raise InputError(f"refused {what}: its signature does not carry the signer's certificate")
    chain = [signer]
    while True:  # up through the certificates the signature carries, no loops
        top = chain[-1]
        parent = next((c for c in certs if c.subject == top.issuer and c not in chain and _issued(c, top)), None)
        if parent is None:
            return Signer(tuple(chain))
        chain.append(parent)


def _issued(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - any failure means "not issued by"
        return False


def _entry_allows(entry: SignatureEntry, signer: Signer) -> bool:
    if entry.type_guid != CERT_X509_GUID:
        return False
    try:
        trusted = x509.load_der_x509_certificate(entry.data)
    except ValueError:
        return False
    return any(trusted == c or (c.issuer == trusted.subject and _issued(trusted, c)) for c in signer.chain)


def db_authority(db: Sequence[SignatureEntry], boot_file: bytes, authenticode: str | None = None,
                 what: str = "boot file") -> SignatureEntry:
    """The db entry Secure Boot will verify BOOT_FILE with; TrustError when none would (the boot is refused)."""
    signers = [signature_signer(blob, what) for blob in pe_signatures(boot_file, what)]
    for signer in signers:
        for entry in db:
            if _entry_allows(entry, signer):
                return entry
    if authenticode is not None:
        for entry in db:
            if entry.type_guid == CERT_SHA256_GUID and entry.data.hex() == authenticode:
                return entry
    state = "is not signed" if not signers else "is signed by no key in db"
    raise TrustError(f"{what} {state}: Secure Boot would refuse to run it")


def pcr7_events(store: VariableStore, boot_files: Iterable[tuple[str, bytes, str | None]] = ()) -> tuple[PredictedEvent, ...]:
    """PCR 7's events from a vars template and the boot applications the firmware verifies.

    BOOT_FILES: (name, PE bytes, Authenticode sha256 hex or None), in load
    order; their authority events follow the separator, one per distinct db
    entry, only when Secure Boot is on.
    """
    enabled = secure_boot_enabled(store)
    events = []
    for guid, name in SECURE_BOOT_VARIABLES:
        data = bytes([enabled]) if name == "SecureBoot" else store.get(guid, name) or b""
        events.append(variable_event(EV_DRIVER_CONFIG, guid, name, data, f"{name} ({len(data)} bytes)"))
    dbt = store.get(*DBT)
    if dbt:
        events.append(variable_event(EV_DRIVER_CONFIG, *DBT, dbt, f"dbt ({len(dbt)} bytes)"))
    events.append(PredictedEvent(PCR, EV_SEPARATOR, SEPARATOR_DIGEST, "separator"))
    if enabled:
        db = signature_entries(store.get(IMAGE_SECURITY_DATABASE_GUID, "db") or b"")
        measured: set[bytes] = set()
        for name, pe, authenticode in boot_files:
            entry = db_authority(db, pe, authenticode, name)
            if entry.signature_data in measured:
                continue
            measured.add(entry.signature_data)
            events.append(variable_event(EV_AUTHORITY, IMAGE_SECURITY_DATABASE_GUID, "db", entry.signature_data,
                                         f"db entry of owner {entry.owner} that verified {name}"))
    return tuple(events)
