"""OVMF's variable store file (the vars template a domain's NVRAM is copied from), read-only.

tvorch predicts the Secure Boot events of PCR 7 from the variables a vars
template holds (PK, KEK, db, dbx, SecureBootEnable), so it reads the file the
way OVMF's variable driver does: a firmware volume (PiFirmwareVolume.h,
EFI_FIRMWARE_VOLUME_HEADER) whose first bytes after the header are a variable
store (VariableFormat.h, VARIABLE_STORE_HEADER, authenticated or not), then
variables back to back, each 4-byte aligned, until a header that does not
start with 0x55AA. Only variables in state VAR_ADDED count (a copy still in
deleted transition counts when no added copy exists), as in edk2's
``GetVariableStoreStatus``/``FindVariableEx``.

Pure: bytes in, dataclasses out; a file that is not such a store is an
InputError naming the byte offset.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import InputError

FV_SIGNATURE = b"_FVH"
# gEfiSystemNvDataFvGuid: the file system GUID of OVMF's NV variable volume.
NV_DATA_FV_GUID = uuid.UUID("fff12b8d-7696-4c8b-a985-2747075b4f50")
VARIABLE_STORE_GUID = uuid.UUID("ddcf3616-3275-4164-98b6-fe85707ffe7d")  # gEfiVariableGuid
AUTH_VARIABLE_STORE_GUID = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")  # gEfiAuthenticatedVariableGuid

GLOBAL_VARIABLE_GUID = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")  # PK, KEK, SecureBoot, Boot####
IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")  # db, dbx, dbt
SECURE_BOOT_ENABLE_GUID = uuid.UUID("f0a30bc7-af08-4556-99c4-001009c93a44")  # SecureBootEnable

VARIABLE_DATA = 0x55AA
VAR_ADDED = 0x3F
VAR_IN_DELETED_TRANSITION = 0xFE
_STORE_HEADER = struct.Struct("<16sIBBHI")  # Signature, Size, Format, State, Reserved, Reserved1
_AUTH_HEADER = struct.Struct("<HBBIQ16sIII16s")  # StartId .. VendorGuid: 60 bytes
_PLAIN_HEADER = struct.Struct("<HBBIII16s")  # StartId, State, Reserved, Attributes, NameSize, DataSize, VendorGuid
_FV_FIXED = struct.Struct("<16s16sQ4sIHHHBB")  # up to Revision: 56 bytes
STORE_FORMATTED = 0x5A
STORE_HEALTHY = 0xFE


@dataclass(frozen=True)
class Variable:
    guid: uuid.UUID
    name: str
    attributes: int
    data: bytes


@dataclass(frozen=True)
class VariableStore:
    """The live variables of a store, by (vendor GUID, name)."""

    authenticated: bool
    variables: Mapping[tuple[uuid.UUID, str], Variable]

    def __post_init__(self) -> None:
        object.__setattr__(self, "variables", MappingProxyType(dict(self.variables)))

    def get(self, guid: uuid.UUID, name: str) -> bytes | None:
        """The data of a variable, or None when the store does not hold it."""
        var = self.variables.get((guid, name))
        return None if var is None else var.data


def _refuse(what: str, why: str) -> InputError:
    return InputError(f"refused vars template {what}: {why}")


def parse_vars_file(raw: bytes, what: str = "file") -> VariableStore:
    """The variables of an OVMF vars file (FV + variable store); InputError if it is not one."""
    if len(raw) < _FV_FIXED.size:
        raise _refuse(what, f"{len(raw)} bytes is too short for a firmware volume header")
    (_zero, fs_guid, fv_length, signature, _attrs, header_length, _checksum, _ext, _res,
     _rev) = _FV_FIXED.unpack_from(raw)
    if signature != FV_SIGNATURE:
        raise _refuse(what, "no firmware volume signature '_FVH' at byte 40")
    if uuid.UUID(bytes_le=fs_guid) != NV_DATA_FV_GUID:
        raise _refuse(what, f"firmware volume file system {uuid.UUID(bytes_le=fs_guid)} is not the NV variable store")
    if fv_length > len(raw) or header_length < _FV_FIXED.size or header_length + _STORE_HEADER.size > fv_length:
        raise _refuse(what, f"firmware volume length {fv_length} / header length {header_length} do not fit "
                            f"its {len(raw)} bytes")
    store_guid, store_size, store_format, store_state, _r0, _r1 = _STORE_HEADER.unpack_from(raw, header_length)
    kind = uuid.UUID(bytes_le=store_guid)
    if kind not in (VARIABLE_STORE_GUID, AUTH_VARIABLE_STORE_GUID):
        raise _refuse(what, f"variable store signature {kind} at byte {header_length} is not a variable store")
    if store_format != STORE_FORMATTED or store_state != STORE_HEALTHY:
        raise _refuse(what, f"variable store at byte {header_length} is not formatted and healthy "
                            f"(format {store_format:#x}, state {store_state:#x})")
    end = header_length + store_size
    if store_size < _STORE_HEADER.size or end > fv_length:
        raise _refuse(what, f"variable store size {store_size} runs past the firmware volume")
    authenticated = kind == AUTH_VARIABLE_STORE_GUID
    return VariableStore(authenticated, _variables(raw[:end], header_length + _STORE_HEADER.size, authenticated, what))


def _align4(offset: int) -> int:
    return (offset + 3) & ~3


def _variables(store: bytes, offset: int, authenticated: bool, what: str) -> dict[tuple[uuid.UUID, str], Variable]:
    header = _AUTH_HEADER if authenticated else _PLAIN_HEADER
    added: dict[tuple[uuid.UUID, str], Variable] = {}
    in_transition: dict[tuple[uuid.UUID, str], Variable] = {}
    pos = _align4(offset)
    while pos + header.size <= len(store):
        fields = header.unpack_from(store, pos)
        start_id, state, attributes = fields[0], fields[1], fields[3]
        if start_id != VARIABLE_DATA:
            break  # the end of the variables (erased flash reads 0xFFFF)
        if authenticated:
            name_size, data_size, guid_bytes = fields[7], fields[8], fields[9]
        else:
            name_size, data_size, guid_bytes = fields[4], fields[5], fields[6]
        body = pos + header.size
        if body + name_size + data_size > len(store):
            raise _refuse(what, f"variable at byte {pos} (name {name_size} + data {data_size} bytes) runs past "
                                f"the store's end at byte {len(store)}")
        if state in (VAR_ADDED, VAR_ADDED & VAR_IN_DELETED_TRANSITION):
            name = _name(store[body:body + name_size], pos, what)
            guid = uuid.UUID(bytes_le=guid_bytes)
            var = Variable(guid, name, attributes, store[body + name_size:body + name_size + data_size])
            (added if state == VAR_ADDED else in_transition)[(guid, name)] = var
        pos = _align4(body + name_size + data_size)
    return {**in_transition, **added}


def _name(raw: bytes, pos: int, what: str) -> str:
    """A CHAR16 name with its terminating NUL."""
    if len(raw) < 2 or len(raw) % 2 or raw[-2:] != b"\0\0":
        raise _refuse(what, f"variable at byte {pos} has a name that is not NUL-terminated UTF-16")
    try:
        return raw[:-2].decode("utf-16-le")
    except UnicodeDecodeError:
        raise _refuse(what, f"variable at byte {pos} has a name that is not UTF-16") from None
