"""QEMU firmware descriptors, and the one libvirt 9.0 picks for a domain.

tvorch measures the firmware before it defines a domain, but with
``<os firmware='efi'>`` libvirt chooses the firmware itself, from the JSON
descriptors of QEMU's firmware interop spec (docs/interop/firmware.json), when
it builds the command line. To measure what the guest will really run, tvorch
predicts that choice with libvirt 9.0's own rules (src/qemu/qemu_firmware.c):
the same parsing (unknown interface types refused, unknown features ignored)
and the same matching (first descriptor in file-name order whose interface,
architecture, machine glob and requested features fit).

Pure: descriptor bytes in, dataclasses out; reading directories is the
adapter's job (tvorch.adapters.firmware_files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ...errors import HostError

# libvirt reads at most this much of a descriptor ("1MiB should be enough").
MAX_DESCRIPTOR_SIZE = 1024 * 1024

# libvirt 9.0 refuses a descriptor naming any other interface type.
INTERFACE_TYPES = frozenset({"bios", "openfirmware", "uboot", "uefi"})

FEATURE_SECURE_BOOT = "secure-boot"
FEATURE_ENROLLED_KEYS = "enrolled-keys"
FEATURE_REQUIRES_SMM = "requires-smm"


@dataclass(frozen=True)
class FlashFile:
    filename: str
    format: str


@dataclass(frozen=True)
class FlashMapping:
    """Firmware in pflash: a read-only code image and a template for the vars store."""

    executable: FlashFile
    nvram_template: FlashFile

    device = "flash"


@dataclass(frozen=True)
class FileMapping:
    """Firmware loaded from one file: as a ROM (``memory``) or as a ``kernel``."""

    device: Literal["memory", "kernel"]
    filename: str


@dataclass(frozen=True)
class FirmwareTarget:
    architecture: str
    machines: tuple[str, ...]  # glob patterns over machine type names, e.g. pc-q35-*


@dataclass(frozen=True)
class FirmwareDescriptor:
    path: str  # where the descriptor was read; named in errors and in ResolvedFirmware
    description: str
    interface_types: tuple[str, ...]
    mapping: FlashMapping | FileMapping
    targets: tuple[FirmwareTarget, ...]
    features: tuple[str, ...]  # as written, unknown ones included (they never match anything)

    @property
    def requires_smm(self) -> bool:
        """libvirt turns ``<smm>`` on for such firmware (its vars sit behind SMM)."""
        return FEATURE_REQUIRES_SMM in self.features


@dataclass(frozen=True)
class FirmwareRequest:
    """What tvorch's domain XML asks of libvirt's firmware auto-selection.

    ``machine`` is the expanded machine type (``pc-q35-7.2``, not the alias
    ``q35``): libvirt canonicalises the alias before matching the descriptors'
    globs. ``None`` for a feature means the XML does not mention it.
    """

    machine: str
    secure_boot: bool | None
    enrolled_keys: bool | None
    interface: str = "uefi"
    architecture: str = "x86_64"


@dataclass(frozen=True)
class ResolvedFirmware:
    """The firmware files a domain will run.

    UEFI paths are as libvirt hands them to QEMU (symlinks kept, so they
    compare with the command line); the BIOS image, which QEMU finds by
    itself, is its real path.
    """

    kind: Literal["uefi", "bios"]
    code: str
    vars_template: str | None
    descriptor: str | None  # the descriptor it was chosen by; None for BIOS and explicit profiles


def _refuse(path: str, why: str) -> HostError:
    return HostError(f"firmware descriptor {path}: {why}")


_JSON_NAMES: dict[type, str] = {str: "string", list: "array", dict: "object"}


def _member(obj: dict[str, Any], key: str, kind: type, path: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise _refuse(path, f"'{key}' is missing or not a JSON {_JSON_NAMES[kind]}")
    return value


def _strings(obj: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    values = _member(obj, key, list, path)
    if not all(isinstance(value, str) for value in values):
        raise _refuse(path, f"'{key}' must hold only strings")
    return tuple(values)


def _flash_file(mapping: dict[str, Any], key: str, path: str) -> FlashFile:
    item = _member(mapping, key, dict, path)
    return FlashFile(
        filename=_member(item, "filename", str, path),
        format=_member(item, "format", str, path),
    )


def _mapping(doc: dict[str, Any], path: str) -> FlashMapping | FileMapping:
    mapping = _member(doc, "mapping", dict, path)
    device = _member(mapping, "device", str, path)
    if device == "flash":
        # libvirt 9.0 requires the vars template (it predates flash 'mode').
        return FlashMapping(
            executable=_flash_file(mapping, "executable", path),
            nvram_template=_flash_file(mapping, "nvram-template", path),
        )
    if device in ("memory", "kernel"):
        return FileMapping(device=device, filename=_member(mapping, "filename", str, path))
    raise _refuse(path, f"unknown mapping device '{device}'")


def _targets(doc: dict[str, Any], path: str) -> tuple[FirmwareTarget, ...]:
    targets = []
    for item in _member(doc, "targets", list, path):
        if not isinstance(item, dict):
            raise _refuse(path, "a target is not a JSON object")
        targets.append(
            FirmwareTarget(
                architecture=_member(item, "architecture", str, path),
                machines=_strings(item, "machines", path),
            )
        )
    return tuple(targets)


def parse_descriptor(data: bytes, path: str) -> FirmwareDescriptor:
    """Parse one descriptor; a malformed one is refused, as libvirt refuses it."""
    if len(data) > MAX_DESCRIPTOR_SIZE:
        raise _refuse(path, f"larger than {MAX_DESCRIPTOR_SIZE} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refuse(path, f"not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise _refuse(path, "not a JSON object")
    interfaces = _strings(doc, "interface-types", path)
    unknown = sorted(set(interfaces) - INTERFACE_TYPES)
    if unknown:
        raise _refuse(path, f"unknown interface type '{unknown[0]}'")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise _refuse(path, "'description' is not a JSON string")
    return FirmwareDescriptor(
        path=path,
        description=description,
        interface_types=interfaces,
        mapping=_mapping(doc, path),
        targets=_targets(doc, path),
        features=_strings(doc, "features", path),
    )


def machine_glob_matches(pattern: str, machine: str) -> bool:
    """GLib's ``g_pattern_match_simple``: ``*`` and ``?`` only, no character classes."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, machine, re.DOTALL) is not None


def _feature_fits(requested: bool | None, present: bool) -> bool:
    return requested is None or requested == present


def descriptor_matches(descriptor: FirmwareDescriptor, request: FirmwareRequest) -> bool:
    """libvirt 9.0's ``qemuFirmwareMatchDomain`` for the XML tvorch writes.

    ``requires-smm`` does not take part: libvirt 9.0 only weighs it against an
    explicit ``<loader secure='yes'>``, which auto-selected domains do not
    have; after choosing, it turns SMM on for such firmware.
    """
    if request.interface not in descriptor.interface_types:
        return False
    if not any(
        target.architecture == request.architecture
        and any(machine_glob_matches(glob, request.machine) for glob in target.machines)
        for target in descriptor.targets
    ):
        return False
    features = descriptor.features
    return _feature_fits(request.secure_boot, FEATURE_SECURE_BOOT in features) and _feature_fits(
        request.enrolled_keys, FEATURE_ENROLLED_KEYS in features
    )


def _describe(request: FirmwareRequest) -> str:
    def word(value: bool | None) -> str:
        return "any" if value is None else "yes" if value else "no"

    return (
        f"{request.interface} firmware for {request.architecture} machine {request.machine} "
        f"(secure-boot {word(request.secure_boot)}, enrolled-keys {word(request.enrolled_keys)})"
    )


def select_firmware(
    descriptors: Iterable[FirmwareDescriptor], request: FirmwareRequest
) -> ResolvedFirmware:
    """The firmware libvirt will choose: the first matching descriptor, in the order given.

    If that descriptor is one tvorch cannot account for (not raw pflash),
    this refuses rather than trying the next one: libvirt would not.
    """
    chosen = next((d for d in descriptors if descriptor_matches(d, request)), None)
    if chosen is None:
        raise HostError(f"no firmware descriptor offers {_describe(request)}")
    mapping = chosen.mapping
    if not isinstance(mapping, FlashMapping):
        raise _refuse(chosen.path, f"maps {_describe(request)} as '{mapping.device}', not pflash")
    for image in (mapping.executable, mapping.nvram_template):
        if image.format != "raw":
            raise _refuse(chosen.path, f"{image.filename} has format '{image.format}', not raw")
    return ResolvedFirmware(
        kind="uefi",
        code=mapping.executable.filename,
        vars_template=mapping.nvram_template.filename,
        descriptor=chosen.path,
    )
