"""What tvorch records about an instance, and the checks on user-chosen values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ...errors import InputError

NAME_MAX = 64
# Domain names become file names, libvirt names and XML text: letters, digits
# and . _ - only, starting with a letter or digit (so never '.' or '..').
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MEMORY_MIN_MIB = 128


class InstanceState(str, Enum):
    LAUNCHING = "launching"  # record made; overlay/domain may be half-built
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    CRASHED = "crashed"
    FAILED = "failed"  # launch failed and was rolled back; see `error`
    DESTROYED = "destroyed"  # domain undefined, overlay removed; record kept
    INCOMING = "incoming"  # records taken in by `tvorch migrate-in`; the VM is on its way here
    MIGRATED = "migrated"  # moved to another node: a tombstone that refuses to start it here again


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    name: str
    uuid: str
    image: str
    overlay: str
    console_log: str
    state: InstanceState
    virt_type: str
    domain_xml: str
    created_at: str
    updated_at: str
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "uuid": self.uuid,
            "image": self.image,
            "overlay": self.overlay,
            "console_log": self.console_log,
            "state": self.state.value,
            "virt_type": self.virt_type,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
        }


@dataclass(frozen=True)
class InstanceEvent:
    instance_id: str
    at: str
    kind: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"at": self.at, "kind": self.kind, "detail": self.detail}


def new_instance_id() -> str:
    import secrets  # not at import time: the hook imports this module and never needs it

    return "i-" + secrets.token_hex(6)


def validate_name(name: str) -> str:
    if not name:
        raise InputError("refused name '': a name must not be empty")
    if len(name) > NAME_MAX:
        raise InputError(f"refused name: {len(name)} characters, at most {NAME_MAX} allowed")
    if not _NAME_RE.fullmatch(name):
        raise InputError(
            f"refused name {name!r}: use letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit"
        )
    return name


def validate_memory(memory_mib: int, maximum: int) -> int:
    if not MEMORY_MIN_MIB <= memory_mib <= maximum:
        raise InputError(f"refused memory {memory_mib} MiB: must be between {MEMORY_MIN_MIB} and {maximum} MiB")
    return memory_mib


def validate_vcpus(vcpus: int, maximum: int) -> int:
    if not 1 <= vcpus <= maximum:
        raise InputError(f"refused vcpus {vcpus}: must be between 1 and {maximum}")
    return vcpus
