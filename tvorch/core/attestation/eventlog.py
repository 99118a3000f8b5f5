"""UEFI (TCG PC Client) firmware event log: parse, decode, replay.

Host and guest attestation replay these logs against quoted PCRs, so the
parser frames nothing it cannot frame exactly: every length is checked
against the bytes that remain, and a framing fault is an EvidenceError naming
the byte offset and the event index. Event *data* is untrusted content that
replay never looks at (it extends the logged digests), so decoding it is best
effort: a malformed payload becomes ``decoded["decode_error"]`` and never
fails the parse.

Two formats: the crypto-agile log Linux exposes in
``/sys/kernel/security/tpm0/binary_bios_measurements`` (a SHA-1-format
TCG_PCR_EVENT carrying the "Spec ID Event03" header, then TCG_PCR_EVENT2
records), and the older SHA-1-only log (TCG_PCR_EVENT records throughout).
Layouts are from the TCG PC Client Platform Firmware Profile (1.05) and, for
device paths, the UEFI specification (2.10, chapter 10).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, TypeVar

from ...errors import EvidenceError, InputError

EV_NO_ACTION = 0x3
EV_EFI_HCRTM_EVENT = 0x80000010

EVENT_TYPES: Mapping[int, str] = MappingProxyType({
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x2: "EV_UNUSED",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x13: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
})

# TPM_ALG_ID -> (name, digest size). A Spec ID event may declare others; they
# are framed by the size it gives and named "alg_0x....", but cannot be replayed.
ALGORITHMS: Mapping[int, tuple[str, int]] = MappingProxyType({
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
    0x0027: ("sha3_256", 32),
    0x0028: ("sha3_384", 48),
    0x0029: ("sha3_512", 64),
})
_HASHLIB_NAMES = {"sm3_256": "sm3"}
_T = TypeVar("_T")

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"
MAX_PCR = 31  # no TPM has more than 32 PCRs; a larger index is garbage, not a PCR
_MAX_DIGEST = 64  # the largest digest of any TPM algorithm (sha512, sha3_512)


class _Malformed(ValueError):
    """A structure does not fit its bytes; framing turns it into an EvidenceError."""


class _Reader:
    """Little-endian reads that never run past the end; ``base`` offsets the reported positions."""

    def __init__(self, buf: bytes, base: int = 0) -> None:
        self.buf = buf
        self.base = base
        self.pos = 0

    @property
    def at(self) -> int:
        return self.base + self.pos

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise _Malformed(f"{what} needs {n} bytes at byte {self.at}, only {self.left} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")

    def guid(self, what: str) -> str:
        return str(uuid.UUID(bytes_le=self.take(16, what)))

    def end(self, what: str) -> None:
        if self.left:
            raise _Malformed(f"{self.left} unexpected bytes after the {what} at byte {self.at}")


def _freeze(value: object) -> object:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TcgEvent:
    """One logged measurement; ``digests`` maps bank name to lowercase hex."""

    index: int
    pcr: int
    event_type: int
    type_name: str
    digests: Mapping[str, str]
    data: bytes
    decoded: Mapping[str, object] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "digests", MappingProxyType(dict(self.digests)))
        if self.decoded is not None:
            object.__setattr__(self, "decoded", _freeze(self.decoded))

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "index": self.index, "pcr": self.pcr, "event_type": self.event_type, "type_name": self.type_name,
            "digests": dict(self.digests), "data_size": len(self.data), "decoded": _thaw(self.decoded),
        }
        if self.decoded is None or "decode_error" in self.decoded:
            out["data"] = self.data.hex()
        return out


@dataclass(frozen=True)
class EventLog:
    """A parsed log: the banks it carries (name -> digest size) and every event, header included."""

    spec_algorithms: Mapping[str, int]
    events: tuple[TcgEvent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec_algorithms", MappingProxyType(dict(self.spec_algorithms)))
        object.__setattr__(self, "events", tuple(self.events))

    def to_json(self) -> dict[str, object]:
        return {"spec_algorithms": dict(self.spec_algorithms), "events": [e.to_json() for e in self.events]}


# --- parsing ------------------------------------------------------------------------

def parse_event_log(raw: bytes) -> EventLog:
    """Frame and decode a firmware event log; EvidenceError on any framing fault."""
    if not raw:
        raise EvidenceError("event log is empty")
    r = _Reader(bytes(raw))
    first = _framed(0, 0, lambda: _sha1_event(r, 0))
    if first.event_type == EV_NO_ACTION and first.data.startswith(SPEC_ID_SIGNATURE):
        # Event 0's data starts after pcr, type, SHA-1 digest and size: byte 32.
        spec, algs = _framed(0, 0, lambda: _spec_id(first.data, 32))
        events = [TcgEvent(0, first.pcr, first.event_type, first.type_name, first.digests, first.data, spec)]
        while r.left:
            index = len(events)
            events.append(_framed(index, r.at, lambda: _agile_event(r, index, algs)))
        banks = {name: size for name, size in algs.values()}
    else:
        events = [first]
        while r.left:
            index = len(events)
            events.append(_framed(index, r.at, lambda: _sha1_event(r, index)))
        banks = {"sha1": 20}
    return EventLog(banks, tuple(events))


def _framed(index: int, start: int, read: Callable[[], _T]) -> _T:
    try:
        return read()
    except _Malformed as err:
        raise EvidenceError(f"event log: event {index} (starting at byte {start}): {err}") from None


def _header(r: _Reader) -> tuple[int, int]:
    at = r.at
    pcr = r.uint(4, "PCR index")
    if pcr > MAX_PCR:
        raise _Malformed(f"PCR index {pcr} at byte {at} is out of range (0-{MAX_PCR})")
    return pcr, r.uint(4, "event type")


def _sha1_event(r: _Reader, index: int) -> TcgEvent:
    pcr, event_type = _header(r)
    digest = r.take(20, "SHA-1 digest")
    data = r.take(r.uint(4, "event size"), "event data")
    return _event(index, pcr, event_type, {"sha1": digest.hex()}, data)


def _agile_event(r: _Reader, index: int, algs: Mapping[int, tuple[str, int]]) -> TcgEvent:
    pcr, event_type = _header(r)
    at = r.at
    count = r.uint(4, "digest count")
    if not 1 <= count <= len(algs):
        raise _Malformed(f"digest count {count} at byte {at} is not 1 to {len(algs)} (the Spec ID event's algorithms)")
    digests: dict[str, str] = {}
    for _ in range(count):
        at = r.at
        alg = r.uint(2, "algorithm id")
        if alg not in algs:
            raise _Malformed(f"algorithm 0x{alg:04x} at byte {at} is not declared in the Spec ID event")
        name, size = algs[alg]
        if name in digests:
            raise _Malformed(f"second {name} digest at byte {at}")
        digests[name] = r.take(size, f"{name} digest").hex()
    data = r.take(r.uint(4, "event size"), "event data")
    return _event(index, pcr, event_type, digests, data)


def _spec_id(data: bytes, base: int) -> tuple[dict[str, object], dict[int, tuple[str, int]]]:
    """TCG_EfiSpecIDEvent: the banks every later event carries, and their digest sizes."""
    r = _Reader(data, base)
    r.take(len(SPEC_ID_SIGNATURE), "Spec ID signature")
    platform_class = r.uint(4, "platform class")
    minor, major, errata, uintn = r.take(4, "spec version and uintn size")
    at = r.at
    count = r.uint(4, "number of algorithms")
    if count == 0 or count * 4 > r.left:
        raise _Malformed(f"Spec ID event declares {count} algorithms at byte {at}, room for {r.left // 4}")
    algs: dict[int, tuple[str, int]] = {}
    listed: list[dict[str, object]] = []
    for _ in range(count):
        at = r.at
        alg, size = r.uint(2, "algorithm id"), r.uint(2, "digest size")
        name, known_size = ALGORITHMS.get(alg, (f"alg_0x{alg:04x}", size))
        if alg in algs:
            raise _Malformed(f"algorithm 0x{alg:04x} declared twice in the Spec ID event (byte {at})")
        if size != known_size or not 0 < size <= _MAX_DIGEST:
            raise _Malformed(f"Spec ID event gives {name} a digest size of {size} at byte {at}")
        algs[alg] = (name, size)
        listed.append({"id": f"0x{alg:04x}", "name": name, "digest_size": size})
    vendor = r.take(r.uint(1, "vendor info size"), "vendor info")
    r.end("Spec ID event")
    decoded: dict[str, object] = {
        "signature": "Spec ID Event03", "platform_class": platform_class, "spec_version": f"{major}.{minor}",
        "spec_errata": errata, "uintn_size": uintn, "algorithms": listed, "vendor_info": vendor.hex(),
    }
    return decoded, algs


def _event(index: int, pcr: int, event_type: int, digests: dict[str, str], data: bytes) -> TcgEvent:
    decoder = _DECODERS.get(event_type)
    decoded: dict[str, object] | None = None
    if decoder is not None:
        try:
            decoded = decoder(data)
        except ValueError as err:  # _Malformed and bad text alike: the data, not the log, is broken
            decoded = {"decode_error": " ".join(str(err).split())}
    name = EVENT_TYPES.get(event_type, f"EV_UNKNOWN_0x{event_type:08x}")
    return TcgEvent(index, pcr, event_type, name, digests, data, decoded)


# --- event data ---------------------------------------------------------------------

def _as_text(data: bytes) -> str | None:
    """Event text is ASCII/UTF-8 or (systemd-stub, S-CRTM versions) UTF-16LE, NUL-terminated or not."""
    utf16 = len(data) >= 2 and len(data) % 2 == 0 and any(data[0::2]) and not any(data[1::2])
    try:
        text = data.decode("utf-16-le" if utf16 else "utf-8")
    except UnicodeDecodeError:
        return None
    text = text.rstrip("\0")
    return text if text.isprintable() else None


def _text(data: bytes) -> dict[str, object]:
    text = _as_text(data)
    if text is None:
        raise _Malformed(f"{len(data)} bytes that are not text")
    return {"text": text}


def _no_action(data: bytes) -> dict[str, object]:
    if data.startswith(SPEC_ID_SIGNATURE):
        return _spec_id(data, 0)[0]
    if data.startswith(STARTUP_LOCALITY_SIGNATURE):
        r = _Reader(data)
        r.take(len(STARTUP_LOCALITY_SIGNATURE), "signature")
        locality = r.uint(1, "startup locality")
        r.end("StartupLocality event")
        return {"signature": "StartupLocality", "locality": locality}
    signature = _as_text(data[:16])
    if not signature:
        raise _Malformed("EV_NO_ACTION data without a known signature")
    return {"signature": signature}


def _separator(data: bytes) -> dict[str, object]:
    if len(data) != 4:
        raise _Malformed(f"separator of {len(data)} bytes, not 4")
    return {"value": int.from_bytes(data, "little")}


def _blob(data: bytes) -> dict[str, object]:
    r = _Reader(data)
    out: dict[str, object] = {"base": r.uint(8, "blob base"), "length": r.uint(8, "blob length")}
    r.end("firmware blob")
    return out


def _blob2(data: bytes) -> dict[str, object]:
    r = _Reader(data)
    description = r.take(r.uint(1, "description size"), "blob description")
    out: dict[str, object] = {"description": _as_text(description) or description.hex(),
                              "base": r.uint(8, "blob base"), "length": r.uint(8, "blob length")}
    r.end("firmware blob")
    return out


def _post_code(data: bytes) -> dict[str, object]:
    # Either a text ("ACPI DATA", "SMM CODE") or a UEFI_PLATFORM_FIRMWARE_BLOB.
    text = _as_text(data)
    if text is not None:
        return {"text": text}
    return _blob(data)


def _crtm_version(data: bytes) -> dict[str, object]:
    text = _as_text(data)
    if text is not None:
        return {"version": text}
    if len(data) == 16:  # some firmware logs a GUID
        return {"version": _Reader(data).guid("version GUID")}
    raise _Malformed(f"S-CRTM version of {len(data)} bytes is neither text nor a GUID")


def _variable(data: bytes) -> dict[str, object]:
    """UEFI_VARIABLE_DATA: the variable's identity, and a digest of its (possibly large) value."""
    r = _Reader(data)
    guid = r.guid("variable GUID")
    name_chars = r.uint(8, "name length")
    value_size = r.uint(8, "data length")
    name = r.take(name_chars * 2, "variable name").decode("utf-16-le", errors="replace")
    value = r.take(value_size, "variable data")
    r.end("variable data")
    return {"guid": guid, "name": name, "data_length": value_size, "data_sha256": hashlib.sha256(value).hexdigest()}


def _image_load(data: bytes) -> dict[str, object]:
    """UEFI_IMAGE_LOAD_EVENT: where the image was loaded from and to."""
    r = _Reader(data)
    location = r.uint(8, "image location")
    length = r.uint(8, "image length")
    link_time = r.uint(8, "link-time address")
    path_size = r.uint(8, "device path length")
    path = r.take(path_size, "device path")
    r.end("image load event")
    text, file_path = _device_path(path)
    return {"image_location": location, "image_length": length, "link_time_address": link_time,
            "device_path_length": path_size, "device_path": text, "file_path": file_path,
            "device_path_hex": path.hex()}


def _gpt(data: bytes) -> dict[str, object]:
    """UEFI_GPT_DATA: the partition table header, then the partitions it lists."""
    r = _Reader(data)
    if r.take(8, "GPT signature") != b"EFI PART":
        raise _Malformed("GPT header without the 'EFI PART' signature")
    r.take(48, "GPT header")  # revision, sizes, CRC, reserved, LBAs
    disk_guid = r.guid("disk GUID")
    r.take(12, "GPT header")  # partition entry LBA, number of entries
    entry_size = r.uint(4, "partition entry size")
    r.take(4, "GPT header")  # entries CRC
    count = r.uint(8, "number of partitions")
    if entry_size < 128:
        raise _Malformed(f"partition entries of {entry_size} bytes (at least 128)")
    if count * entry_size > r.left:
        raise _Malformed(f"{count} partitions of {entry_size} bytes, only {r.left} bytes left")
    partitions = []
    for _ in range(count):
        e = _Reader(r.take(entry_size, "partition entry"), r.at)
        partitions.append({
            "type_guid": e.guid("type GUID"), "unique_guid": e.guid("partition GUID"),
            "first_lba": e.uint(8, "first LBA"), "last_lba": e.uint(8, "last LBA"),
            "attributes": e.uint(8, "attributes"),
            "name": e.take(72, "partition name").decode("utf-16-le", errors="replace").rstrip("\0"),
        })
    r.end("GPT event")
    return {"disk_guid": disk_guid, "partitions": partitions}


def _tables(r: _Reader) -> list[dict[str, object]]:
    count = r.uint(8, "number of tables")
    if count * 24 > r.left:
        raise _Malformed(f"{count} tables, only {r.left} bytes left")
    tables: list[dict[str, object]] = [{"guid": r.guid("table GUID"), "address": r.uint(8, "table address")}
                                       for _ in range(count)]
    r.end("handoff tables")
    return tables


def _handoff(data: bytes) -> dict[str, object]:
    return {"tables": _tables(_Reader(data))}


def _handoff2(data: bytes) -> dict[str, object]:
    r = _Reader(data)
    description = r.take(r.uint(1, "description size"), "table description")
    return {"description": _as_text(description) or description.hex(), "tables": _tables(r)}


def _tagged(data: bytes) -> dict[str, object]:
    """TCG_PCClientTaggedEvent (Linux tags its initrd and load options this way)."""
    r = _Reader(data)
    tag = r.uint(4, "tag id")
    payload = r.take(r.uint(4, "tag data size"), "tag data")
    r.end("tagged event")
    out: dict[str, object] = {"tag_id": tag, "data_length": len(payload)}
    text = _as_text(payload)
    out.update({"text": text} if text else {"data": payload.hex()})
    return out


def _ipl(data: bytes) -> dict[str, object]:
    # Text from boot loaders (systemd-stub's section names); boot code from a BIOS.
    text = _as_text(data)
    return {"text": text} if text is not None else {"binary_length": len(data)}


def _compact_hash(data: bytes) -> dict[str, object]:
    text = _as_text(data)
    return {"text": text} if text is not None else {"value": data.hex()}


_DECODERS: Mapping[int, Callable[[bytes], dict[str, object]]] = MappingProxyType({
    0x1: _post_code,
    0x3: _no_action,
    0x4: _separator,
    0x5: _text,
    0x6: _tagged,
    0x8: _crtm_version,
    0xC: _compact_hash,
    0xD: _ipl,
    0x80000001: _variable,
    0x80000002: _variable,
    0x80000003: _image_load,
    0x80000004: _image_load,
    0x80000005: _image_load,
    0x80000006: _gpt,
    0x80000007: _text,
    0x80000008: _blob,
    0x80000009: _handoff,
    0x8000000A: _blob2,
    0x8000000B: _handoff2,
    0x8000000C: _variable,
    0x80000010: _text,
    0x800000E0: _variable,
})


# --- device paths -------------------------------------------------------------------

def _device_path(path: bytes) -> tuple[str, str | None]:
    """EDK2-style text of a device path, and the file path its file nodes spell (if any).

    Best effort: a malformed node ends the text with a marker instead of failing.
    """
    r = _Reader(path)
    parts: list[str] = []
    files: list[str] = []
    while r.left:
        try:
            at = r.pos
            kind, sub = r.take(2, "node type")
            size = r.uint(2, "node length")
            if size < 4:
                raise _Malformed(f"node length {size}")
            node = _Reader(r.take(size - 4, "node"), at + 4)
        except _Malformed:
            parts.append(f"<malformed at byte {at}>")
            break
        if kind == 0x7F:
            if sub == 0xFF:
                break
            parts.append(",")
            continue
        text = _node(kind, sub, node)
        if kind == 4 and sub == 4:
            files.append(text)
        parts.append(text)
    text = "/".join(parts).replace("/,/", ",")
    file_path = None
    if files:
        file_path = files[0]
        for piece in files[1:]:
            file_path = file_path.rstrip("\\") + "\\" + piece.lstrip("\\")
    return text, file_path


def _node(kind: int, sub: int, n: _Reader) -> str:
    try:
        if (kind, sub) == (1, 1):
            function, device = n.take(2, "PCI node")
            return f"Pci(0x{device:x},0x{function:x})"
        if (kind, sub) == (2, 1):
            hid, uid = n.uint(4, "ACPI HID"), n.uint(4, "ACPI UID")
            if hid == 0x0A0341D0:
                return f"PciRoot(0x{uid:x})"
            if hid == 0x0A0841D0:
                return f"PcieRoot(0x{uid:x})"
            return f"Acpi(0x{hid:08x},0x{uid:x})"
        if (kind, sub) == (3, 2):
            return f"Scsi(0x{n.uint(2, 'target'):x},0x{n.uint(2, 'LUN'):x})"
        if (kind, sub) == (3, 0x12):
            return f"Sata(0x{n.uint(2, 'port'):x},0x{n.uint(2, 'multiplier port'):x},0x{n.uint(2, 'LUN'):x})"
        if (kind, sub) == (3, 0x17):
            nsid = n.uint(4, "namespace")
            return f"NVMe(0x{nsid:x},{n.take(8, 'EUI-64').hex('-').upper()})"
        if (kind, sub) == (4, 1):
            number, start, size = n.uint(4, "partition"), n.uint(8, "start"), n.uint(8, "size")
            signature = n.take(16, "signature")
            fmt, sig_type = n.take(2, "partition format")
            label = {1: "MBR", 2: "GPT"}.get(fmt, f"0x{fmt:x}")
            sig = (str(uuid.UUID(bytes_le=signature)) if sig_type == 2
                   else f"0x{int.from_bytes(signature[:4], 'little'):08x}")
            return f"HD({number},{label},{sig},0x{start:x},0x{size:x})"
        if (kind, sub) == (4, 4):
            return n.take(n.left, "file path").decode("utf-16-le", errors="replace").split("\0")[0]
        if (kind, sub) == (4, 8):
            return f"Offset(0x{n.uint(8, 'start'):x},0x{n.uint(8, 'end'):x})"
        named = {(1, 4): "VenHw", (3, 0x0A): "VenMsg", (4, 3): "VenMedia", (4, 6): "FvFile", (4, 7): "Fv"}
        if (kind, sub) in named:
            return f"{named[kind, sub]}({n.guid('GUID')})"
    except _Malformed:
        pass  # the node is shorter than its type needs: show it raw, like unknown ones
    return f"Path({kind},{sub},{n.buf.hex()})"


# --- replay -------------------------------------------------------------------------

def _pcr0_locality(log: EventLog) -> int:
    """The locality PCR 0 was reset to: a StartupLocality event's, else 4 after an H-CRTM, else 0."""
    hcrtm = False
    for event in log.events:
        if event.pcr != 0:
            continue
        if event.event_type == EV_NO_ACTION and event.decoded and "locality" in event.decoded:
            locality = event.decoded["locality"]
            return locality if isinstance(locality, int) else 0
        if event.event_type == EV_EFI_HCRTM_EVENT:
            hcrtm = True
        elif event.event_type != EV_NO_ACTION and not hcrtm:
            return 0  # PCR 0 was extended before any StartupLocality: it started at zeros
    return 4 if hcrtm else 0


def replay(log: EventLog, bank: str = "sha256", pcrs: Iterable[int] | None = None) -> dict[int, str]:
    """The PCR values the log's measurements add up to, from the platform's reset values.

    Every PCR starts at zeros except PCR 0, which starts at the locality
    TPM2_Startup came from in its last byte: the StartupLocality event's (TCG
    PC Client PFP 10.4.5.3), or 4 when an H-CRTM measured first (TPM 2.0
    Library part 1, 34.3). EV_NO_ACTION events are never extended.
    """
    if bank not in log.spec_algorithms:
        raise EvidenceError(f"event log has no {bank} bank (it has {', '.join(log.spec_algorithms)})")
    try:
        hashlib.new(_HASHLIB_NAMES.get(bank, bank))
    except ValueError:
        raise EvidenceError(f"cannot replay the {bank} bank: no {bank} implementation here") from None
    wanted = None if pcrs is None else sorted(set(pcrs))
    for pcr in wanted or ():
        if not 0 <= pcr <= MAX_PCR:
            raise InputError(f"PCR {pcr} is out of range (0-{MAX_PCR})")
    size = log.spec_algorithms[bank]
    locality = _pcr0_locality(log)
    values: dict[int, bytes] = {}

    def initial(pcr: int) -> bytes:
        return bytes(size - 1) + bytes([locality if pcr == 0 else 0])

    for event in log.events:
        if event.event_type == EV_NO_ACTION:
            continue
        digest = event.digests.get(bank)
        if digest is None:
            raise EvidenceError(f"event log: event {event.index} (PCR {event.pcr}) has no {bank} digest")
        h = hashlib.new(_HASHLIB_NAMES.get(bank, bank))
        h.update(values.get(event.pcr, initial(event.pcr)))
        h.update(bytes.fromhex(digest))
        values[event.pcr] = h.digest()
    chosen = sorted(values) if wanted is None else wanted
    return {pcr: values.get(pcr, initial(pcr)).hex() for pcr in chosen}
