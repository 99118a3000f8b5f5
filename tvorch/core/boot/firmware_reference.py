"""Firmware references: the events a firmware and virtual platform measure, kept from one reference boot.

PCRs 0-3 and 6 (and PCR 1's boot variables) under OVMF follow from the
firmware build and the virtual platform, not from files tvorch can parse: a
reference VM with the same firmware, vars template and platform but an empty
disk is booted once, its firmware event log read from its memory, and the
events of those PCRs up to their separators are kept here, signed by the node
key, for every later launch with the same inputs.

Where the log comes from: the TCG2 protocol keeps the log in boot-services
memory, starting with the "Spec ID Event03" header event. A memory-only dump
of the reference VM holds it; ``event_log_in_memory`` finds the header,
walks the crypto-agile records until the first that cannot be one (the area
after the last event is 0xFF fill), and frames exactly that span with
``tvorch.core.attestation.eventlog``. No guest OS is needed: with no bootable disk OVMF
has measured everything up to its separators before it gives up on the disk.

What keys a reference (``ReferenceKey``) is what was found to change these
events (docs/firmware-references.md): the code, vars template and QEMU
digests, the machine and virt type, memory and vCPUs (OVMF's PEI volume,
measured into PCR 0, differs with both), Secure Boot and the device layout
(PCR 1's boot options name PCI paths). The TPM model and the domain UUID
changed no event and are left out.

Pure: bytes and dataclasses in and out; signing uses the node key handed in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ..attestation.eventlog import SPEC_ID_SIGNATURE, EventLog, parse_event_log
from ..launch.manifest import canonical_json
from .prediction import EventSource, PredictedEvent
from ...errors import EvidenceError, TrustError

# The PCRs a reference provides. PCR 7 is computed from the vars template and
# the boot file (core.boot.secureboot); the reference's PCR 7 events serve to check
# that computation, not to replace it.
REFERENCE_PCRS = (0, 1, 2, 3, 6)
CHECKED_PCRS = (7,)
FORMAT = "tvorch-firmware-reference-1"
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_EV_SEPARATOR = "EV_SEPARATOR"


@dataclass(frozen=True)
class ReferenceKey:
    """What a firmware reference is valid for; its digest names it."""

    code_sha256: str
    vars_sha256: str
    emulator_sha256: str  # QEMU builds the platform (device paths, firmware configuration)
    machine: str  # expanded, e.g. pc-q35-7.2
    virt_type: str  # qemu (TCG) | kvm
    memory_mib: int  # OVMF's PEI firmware volume, measured into PCR 0, differs with memory ...
    vcpus: int  # ... and with the vCPU count (the TPM model, CRB or TIS, changes nothing: not a key)
    secure_boot: bool  # SMM on, loader secure
    devices: str  # the device layout PCR 1's boot options follow: "virtio-disk+channel", "+nic"

    def to_json(self) -> dict[str, object]:
        return {"code_sha256": self.code_sha256, "vars_sha256": self.vars_sha256,
                "emulator_sha256": self.emulator_sha256, "machine": self.machine, "virt_type": self.virt_type,
                "memory_mib": self.memory_mib, "vcpus": self.vcpus,
                "secure_boot": self.secure_boot, "devices": self.devices}

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()


@dataclass(frozen=True)
class FirmwareReference:
    key: ReferenceKey
    events: tuple[PredictedEvent, ...]  # PCRs REFERENCE_PCRS and CHECKED_PCRS, log order
    created_at: str
    firmware: str  # the code image path, for people
    vars_template: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))

    def provided(self) -> tuple[PredictedEvent, ...]:
        """The events a prediction takes from this reference (PCRs 0-3, 6)."""
        return tuple(e for e in self.events if e.pcr in REFERENCE_PCRS)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key.to_json(), "key_digest": self.key.digest,
                "created_at": self.created_at, "firmware": self.firmware, "vars_template": self.vars_template,
                "events": [e.to_json() for e in self.events]}


# --- the log in a memory dump ---------------------------------------------------------

def event_log_in_memory(memory: bytes | mmap.mmap) -> EventLog:
    """The longest crypto-agile firmware event log in MEMORY; EvidenceError when there is none."""
    best: EventLog | None = None
    at = memory.find(SPEC_ID_SIGNATURE)
    while at != -1:
        start = at - 32  # the header event's pcr, type, SHA-1 digest and size come before its data
        if start >= 0 and memory[start:start + 28] == struct.pack("<II", 0, 3) + bytes(20):
            end = _log_end(memory, start)
            if end is not None:
                try:
                    log = parse_event_log(memory[start:end])
                except EvidenceError:
                    log = None
                if log is not None and (best is None or len(log.events) > len(best.events)):
                    best = log
        at = memory.find(SPEC_ID_SIGNATURE, at + 1)
    if best is None:
        raise EvidenceError("no firmware event log (Spec ID Event03 header) in the reference VM's memory")
    return best


def _log_end(memory: bytes | mmap.mmap, start: int) -> int | None:
    """Where the records that follow the header at START stop being records."""
    size = struct.unpack_from("<I", memory, start + 28)[0]
    data = start + 32
    if size < 28 or data + size > len(memory):
        return None
    count = struct.unpack_from("<I", memory, data + 24)[0]
    if not 0 < count <= 8 or 28 + 4 * count > size:
        return None
    sizes = dict(struct.unpack_from("<HH", memory, data + 28 + 4 * i) for i in range(count))
    pos = data + size
    while pos + 12 <= len(memory):
        pcr, _type, digests = struct.unpack_from("<III", memory, pos)
        if pcr > 31 or not 0 < digests <= len(sizes):
            break
        cursor = pos + 12
        for _ in range(digests):
            if cursor + 2 > len(memory):
                return pos
            alg = struct.unpack_from("<H", memory, cursor)[0]
            if alg not in sizes:
                return pos
            cursor += 2 + sizes[alg]
        if cursor + 4 > len(memory):
            break
        cursor += 4 + struct.unpack_from("<I", memory, cursor)[0]
        if cursor > len(memory):
            break
        pos = cursor
    return pos


def reference_events(log: EventLog) -> tuple[PredictedEvent, ...]:
    """The sha256 events of PCRs 0-3, 6 and 7 up to and including each one's separator.

    EvidenceError when a PCR has no separator yet: the firmware had not
    reached its boot options when the log was read.
    """
    wanted = set(REFERENCE_PCRS) | set(CHECKED_PCRS)
    closed: set[int] = set()
    out: list[PredictedEvent] = []
    for event in log.events[1:]:
        if event.pcr not in wanted or event.pcr in closed or event.type_name == "EV_NO_ACTION":
            continue
        digest = event.digests.get("sha256")
        if digest is None:
            raise EvidenceError(f"reference event log: event {event.index} has no sha256 digest")
        out.append(PredictedEvent(event.pcr, event.type_name, digest, _what(event.type_name, event.decoded),
                                  EventSource.FIRMWARE_REFERENCE))
        if event.type_name == _EV_SEPARATOR:
            closed.add(event.pcr)
    missing = sorted(wanted - closed)
    if missing:
        raise EvidenceError(f"reference event log has no separator on PCR {missing}: the firmware had not reached "
                            f"its boot options")
    return tuple(out)


def _what(type_name: str, decoded: object) -> str:
    if not isinstance(decoded, dict) and not hasattr(decoded, "get"):
        return type_name
    info = dict(decoded)  # type: ignore[call-overload]
    for field in ("name", "text", "version"):
        if info.get(field):
            return f"{type_name} {info[field]}"
    if "base" in info and "length" in info:
        return f"firmware volume at {info['base']:#x}, {info['length']} bytes"
    return type_name


# --- differences ----------------------------------------------------------------------

def differences(predicted: Sequence[PredictedEvent], found: Iterable[PredictedEvent], pcrs: Iterable[int]) -> list[str]:
    """Event-by-event differences on PCRS: "PCR7: EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot: predicted … found …"."""
    out: list[str] = []
    found = list(found)
    for pcr in sorted(set(pcrs)):
        mine = [e for e in predicted if e.pcr == pcr]
        theirs = [e for e in found if e.pcr == pcr]
        for i in range(max(len(mine), len(theirs))):
            a = mine[i] if i < len(mine) else None
            b = theirs[i] if i < len(theirs) else None
            if a is not None and b is not None and (a.type_name, a.digest) == (b.type_name, b.digest):
                continue
            label = (a or b).what if (a or b) is not None else ""  # type: ignore[union-attr]
            kind = (a or b).type_name  # type: ignore[union-attr]
            out.append(f"PCR{pcr}: {kind} ({label}): predicted {_show(a)} found {_show(b)}")
    return out


def _show(event: PredictedEvent | None) -> str:
    return "nothing" if event is None else f"{event.type_name} {event.digest}"


# --- signing --------------------------------------------------------------------------

def sign_reference(ref: FirmwareReference, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bytes:
    """The stored reference file: the reference and an ECDSA P-256 signature over its canonical JSON."""
    body = ref.to_json()
    r, s = decode_dss_signature(key.sign(canonical_json(body), ec.ECDSA(hashes.SHA256())))
    signature = encode_dss_signature(r, min(s, _P256_ORDER - s))
    doc = {"reference": body, "signature": {
        "algorithm": SIGNATURE_ALGORITHM,
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "value": base64.b64encode(signature).decode("ascii")}}
    return canonical_json(doc)


def verify_reference(raw: bytes, cert: x509.Certificate) -> FirmwareReference:
    """The reference in RAW if CERT (the node's signing certificate) signed it; TrustError otherwise."""
    try:
        doc = json.loads(raw)
        body, sig = doc["reference"], doc["signature"]
        signature = base64.b64decode(sig["value"], validate=True)
        if sig["algorithm"] != SIGNATURE_ALGORITHM or body["format"] != FORMAT:
            raise ValueError("unknown format or algorithm")
    except (ValueError, KeyError, TypeError) as err:
        raise TrustError(f"firmware reference is not a signed reference document ({err})") from None
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TrustError("the node signing certificate does not hold an EC key")
    try:
        public.verify(signature, canonical_json(body), ec.ECDSA(hashes.SHA256()))
    except Exception:  # noqa: BLE001 - InvalidSignature and malformed DER alike
        raise TrustError("firmware reference signature does not verify with the node signing key") from None
    try:
        key = ReferenceKey(**body["key"])
        if key.digest != body["key_digest"]:
            raise ValueError("key digest does not match the key")
        events = tuple(PredictedEvent(int(e["pcr"]), str(e["type"]), str(e["digest"]), str(e["what"]),
                                      EventSource(e["source"])) for e in body["events"])
        return FirmwareReference(key, events, str(body["created_at"]), str(body["firmware"]),
                                 str(body["vars_template"]))
    except (ValueError, KeyError, TypeError) as err:
        raise TrustError(f"firmware reference is malformed ({err})") from None
