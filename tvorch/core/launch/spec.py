"""Typed description of what tvorch asks libvirt to run.

A ``DomainSpec`` is everything the domain XML is rendered from; nothing else
feeds the renderer, so two equal specs always give byte-identical XML.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .metadata import METADATA_NAMESPACE, METADATA_PREFIX  # noqa: F401  (part of the spec's vocabulary)


class Firmware(str, Enum):
    EFI = "efi"
    BIOS = "bios"


class TpmModel(str, Enum):
    CRB = "crb"
    TIS = "tis"

    @property
    def libvirt_model(self) -> str:
        return f"tpm-{self.value}"


class VirtType(str, Enum):
    """libvirt's domain type: hardware virtualisation or TCG emulation."""

    KVM = "kvm"
    QEMU = "qemu"


@dataclass(frozen=True)
class FirmwareImages:
    """Explicit OVMF code image and vars template, instead of auto-selection.

    Needed when the guest is signed with a key other than Microsoft's (an
    operator's own PK/KEK/db, or OVMF's snakeoil key in tests).
    """

    code: str
    vars_template: str
    secure_boot: bool


@dataclass(frozen=True)
class DirectBoot:
    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class DiskLayer:
    """A read-only layer under the instance overlay, as qemu will open it."""

    path: str
    format: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    instance_id: str
    memory_mib: int
    vcpus: int
    virt_type: VirtType
    emulator: str
    firmware: Firmware
    secure_boot: bool
    tpm_model: TpmModel
    disk_path: str
    disk_format: str
    console_log: str
    machine: str = "q35"
    network: str | None = None
    direct_boot: DirectBoot | None = None
    firmware_images: FirmwareImages | None = None
    # Layers below the overlay, nearest first (libvirt's <backingStore> nesting).
    # Pinned in the XML so libvirt neither probes nor relabels them.
    backing_chain: tuple[DiskLayer, ...] = ()
    # sha256 hex of the signed launch manifest; recorded in <metadata>.
    manifest_digest: str | None = None
    # UUID of the libvirt `vtpm` secret that encrypts the vTPM state; None: state in clear.
    vtpm_secret: str | None = None
    # Host end (a unix socket libvirt binds) of the guest attestation channel; None: no channel.
    guest_channel: str | None = None
