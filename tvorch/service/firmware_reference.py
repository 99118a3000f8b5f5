"""Firmware-side predicted events: PCR 7 computed from files, PCRs 0-3 and 6 from a firmware reference.

``firmware_events`` is what `tvorch predict` and `tvorch launch` call. A
firmware reference is made by booting a throwaway reference VM once per
(firmware code, vars template, emulator, machine, virt type, memory, vCPUs,
Secure Boot, device layout; not the TPM model, which changes no event) and kept, signed by the node key, as
``<state_dir>/firmware-references/<key digest>.json``; every later call with
the same inputs reuses it without booting anything, whatever the image.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..adapters.digests import sha256_file
from ..adapters.files import atomic_write, ensure_private_dir, read_bounded
from ..adapters.firmware_files import expand_machine, resolve_for_spec
from ..adapters.guest_channel import prepare_socket_dir, remove_socket_dir, socket_path
from ..adapters.hostcaps import probe_kvm
from ..adapters.locks import instance_lock
from ..adapters.node_keys import NodeIdentity, load_or_create
from ..adapters.progress import tell
from ..adapters.reference_vm import boot_and_read_log, make_empty_disk
from ..config import Config
from ..core.launch.domain_xml import render_domain_xml
from ..core.launch.firmware import ResolvedFirmware
from ..core.boot.firmware_reference import (
    CHECKED_PCRS,
    FirmwareReference,
    ReferenceKey,
    differences,
    reference_events,
    sign_reference,
    verify_reference,
)
from ..core.boot.prediction import PredictedEvent
from ..core.boot.secureboot import pcr7_events
from ..core.launch.spec import DomainSpec, Firmware, FirmwareImages, TpmModel, VirtType
from ..core.timestamps import utc_now
from ..core.boot.uefi_vars import parse_vars_file
from ..errors import EvidenceError, InputError, NotFoundError, TrustError
from ..logs import get_logger
from .launch_options import choose_virt_type, firmware_choice
from .node import Node

log = get_logger(__name__)

REFERENCE_DIR = "firmware-references"
MAX_REFERENCE_BYTES = 1024 * 1024
MAX_VARS_BYTES = 64 * 1024 * 1024
REFERENCE_BOOT_TIMEOUT_S = 180.0
COVERED_PCRS = (0, 1, 2, 3, 6, 7)


@dataclass(frozen=True)
class FirmwareChoice:
    """What a launch decides about firmware and platform, as `tvorch launch` takes it.

    ``firmware_images`` names a profile's code and vars template; None lets
    libvirt auto-select OVMF by ``secure_boot`` (as launch renders it).
    ``network``: a launch with --network has a NIC, another device layout
    (PCR 1's boot options follow it). ``guest_channel``: launches always
    have one.
    """

    secure_boot: bool
    memory_mib: int
    vcpus: int
    tpm_model: TpmModel
    firmware_images: FirmwareImages | None = None
    machine: str = "q35"
    network: str | None = None
    guest_channel: bool = True


def choice_from_spec(spec: DomainSpec) -> FirmwareChoice:
    """The firmware choice of a launch's DomainSpec."""
    return FirmwareChoice(spec.secure_boot, spec.memory_mib, spec.vcpus, spec.tpm_model, spec.firmware_images,
                          spec.machine, spec.network, spec.guest_channel is not None)


def firmware_events(node: Node, choice: FirmwareChoice,
                    boot_files: Iterable[tuple[str, bytes, str | None]] = (), *,
                    create: bool = True) -> tuple[PredictedEvent, ...]:
    """The predicted firmware-side events of PCRs 0, 1, 2, 3, 6 and 7, in log order per PCR.

    PCR 7 is computed from the vars template (SecureBoot, PK, KEK, db, dbx,
    separator) and, with Secure Boot on, from BOOT_FILES ((name, PE bytes,
    Authenticode sha256 or None) of the boot applications the firmware
    verifies, in load order: their db authority events). PCRs 0-3 and 6 come
    from the firmware reference of CHOICE, booted first when there is none
    (CREATE=False: NotFoundError instead). The reference's own PCR 7 events
    must equal the computed ones up to the separator, or this refuses
    (EvidenceError): a computation the firmware disagrees with predicts
    nothing. Not covered: PCRs 4, 5, 8-15 (the boot path; see the disk side).
    """
    _key, resolved = reference_key(node.cfg, choice)
    assert resolved.vars_template is not None  # reference_key refuses firmware without one
    store = parse_vars_file(_read(resolved.vars_template, MAX_VARS_BYTES), resolved.vars_template)
    computed = pcr7_events(store, boot_files)
    reference = reference_for(node, choice, create=create)
    upto_separator = computed[:[e.type_name for e in computed].index("EV_SEPARATOR") + 1]
    disagree = differences(upto_separator, [e for e in reference.events if e.pcr in CHECKED_PCRS], CHECKED_PCRS)
    if disagree:
        raise EvidenceError(f"computed PCR 7 disagrees with firmware reference {reference.key.digest[:12]}: "
                            f"{disagree[0]}")
    return (*reference.provided(), *computed)


# --- references ----------------------------------------------------------------------

def reference_key(cfg: Config, choice: FirmwareChoice) -> tuple[ReferenceKey, ResolvedFirmware]:
    """What identifies CHOICE's reference, and the OVMF files it resolves to."""
    spec = reference_spec(cfg, choice, name="tvorch-fwref", work=_beside(cfg.overlay_dir))
    resolved = resolve_for_spec(spec)
    if resolved.kind != "uefi" or resolved.vars_template is None:
        raise InputError("firmware references are made for UEFI (OVMF) launches, not SeaBIOS")
    devices = "virtio-disk" + ("+channel" if choice.guest_channel else "") + ("+nic" if choice.network else "")
    key = ReferenceKey(
        code_sha256=sha256_file(resolved.code), vars_sha256=sha256_file(resolved.vars_template),
        emulator_sha256=sha256_file(cfg.emulator), machine=expand_machine(cfg.emulator, choice.machine),
        virt_type=spec.virt_type.value, memory_mib=choice.memory_mib, vcpus=choice.vcpus,
        secure_boot=choice.secure_boot, devices=devices)
    return key, resolved


def reference_spec(cfg: Config, choice: FirmwareChoice, name: str, work: Path) -> DomainSpec:
    """The reference VM's domain: the launch's rendering with an empty raw disk, no metadata once rendered."""
    virt_type = choose_virt_type(cfg.virt_type, probe_kvm() if cfg.virt_type == "auto" else None)
    channel = socket_path(_beside(cfg.guest.channel_dir), name) if choice.guest_channel else None
    return DomainSpec(
        name=name, uuid=str(uuidlib.uuid4()), instance_id=name, memory_mib=choice.memory_mib, vcpus=choice.vcpus,
        virt_type=VirtType(virt_type), emulator=cfg.emulator, firmware=Firmware.EFI, secure_boot=choice.secure_boot,
        tpm_model=choice.tpm_model, disk_path=str(work / "disk.img"), disk_format="raw",
        console_log=str(work / "console.log"), machine=choice.machine, network=choice.network,
        firmware_images=choice.firmware_images, guest_channel=str(channel) if channel else None)


def _beside(directory: str) -> Path:
    """A sibling of a tvorch directory for reference VMs' files: the hook refuses a domain that is not an
    instance yet uses files in overlay_dir or guest.channel_dir, so reference VMs keep out of both."""
    path = Path(directory)
    return path.with_name(path.name + "-fwref")


def _directory(cfg: Config) -> Path:
    return Path(cfg.state_dir) / REFERENCE_DIR


def _identity(cfg: Config) -> NodeIdentity:
    return load_or_create(Path(cfg.state_dir), socket.gethostname())


def _read(path: str, limit: int) -> bytes:
    try:
        return read_bounded(path, limit)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None


def reference_for(node: Node, choice: FirmwareChoice, *, create: bool = True) -> FirmwareReference:
    """The signed reference for CHOICE: the stored one, or one made now by booting a reference VM."""
    cfg = node.cfg
    key, _resolved = reference_key(cfg, choice)
    path = _directory(cfg) / f"{key.digest}.json"
    identity = _identity(cfg)
    if path.exists():
        return _load(path, identity, key)
    if not create:
        raise NotFoundError(f"no firmware reference {key.digest[:12]} for this firmware and platform")
    ensure_private_dir(_directory(cfg))
    name = f"tvorch-fwref-{key.digest[:12]}"
    with instance_lock(Path(cfg.state_dir), name):  # one reference boot per key at a time
        if path.exists():  # made while we waited
            return _load(path, identity, key)
        tell(f"booting the firmware reference VM for this firmware and platform ({key.digest[:12]}), once: "
             f"about 15 s under TCG")
        reference = _boot_reference(node, choice, key, name)
        atomic_write(path, sign_reference(reference, identity.signing_key, identity.signing_cert))
        log.info("firmware_reference_made", key=key.digest, path=str(path))
        return reference


def _load(path: Path, identity: NodeIdentity, key: ReferenceKey | None) -> FirmwareReference:
    try:
        raw = read_bounded(str(path), MAX_REFERENCE_BYTES)
    except OSError as err:
        raise InputError(f"cannot read firmware reference {path}: {err.strerror or err}") from None
    reference = verify_reference(raw, identity.signing_cert)
    if reference.key.digest != path.stem or (key is not None and reference.key != key):
        raise TrustError(f"firmware reference {path} is not the reference its name says")
    return reference


def _boot_reference(node: Node, choice: FirmwareChoice, key: ReferenceKey, name: str) -> FirmwareReference:
    cfg = node.cfg
    work = _beside(cfg.overlay_dir) / name
    ensure_private_dir(work.parent, 0o711)  # qemu must traverse to the disk
    spec = reference_spec(cfg, choice, name, work)
    resolved = resolve_for_spec(spec)
    if node.hypervisor.domain_exists(name):  # left by a reference boot that was killed: it is ours to remove
        node.hypervisor.power_off(name)
        node.hypervisor.undefine(name, purge_tpm=True)
    channel = Path(spec.guest_channel) if spec.guest_channel else None
    try:
        ensure_private_dir(work, 0o711)
        make_empty_disk(work / "disk.img")
        if channel is not None:
            prepare_socket_dir(channel, _beside(cfg.guest.channel_dir))
        root = ET.fromstring(render_domain_xml(spec))
        metadata = root.find("metadata")
        if metadata is not None:
            root.remove(metadata)  # not an instance: the hook and reconcile leave it alone
        xml = ET.tostring(root, encoding="unicode")
        event_log = boot_and_read_log(node.hypervisor, name, xml, work, _directory(cfg) / "tmp",
                                      REFERENCE_BOOT_TIMEOUT_S)
    finally:
        if channel is not None:
            remove_socket_dir(channel, _beside(cfg.guest.channel_dir))
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.parent.rmdir()  # only when no other reference boot is using it
        except OSError:
            pass
    return FirmwareReference(key, reference_events(event_log), utc_now(), resolved.code,
                             resolved.vars_template or "")


def list_references(cfg: Config) -> list[FirmwareReference]:
    """Every stored reference, each verified; ordered by creation time."""
    directory = _directory(cfg)
    if not directory.is_dir():
        return []
    identity = _identity(cfg)
    refs = [_load(p, identity, None) for p in sorted(directory.glob("*.json"))]
    return sorted(refs, key=lambda r: r.created_at)


def find_reference(cfg: Config, prefix: str) -> Path:
    """The stored reference whose key digest starts with PREFIX (at least 6 hex digits, unambiguous)."""
    if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
        raise InputError(f"refused reference '{prefix}': give at least 6 lowercase hex digits of its key digest")
    directory = _directory(cfg)
    matches = sorted(directory.glob(f"{prefix}*.json")) if directory.is_dir() else []
    if not matches:
        raise NotFoundError(f"no firmware reference {prefix}")
    if len(matches) > 1:
        raise InputError(f"refused reference '{prefix}': it names {len(matches)} references")
    return matches[0]


def show_reference(cfg: Config, prefix: str) -> FirmwareReference:
    return _load(find_reference(cfg, prefix), _identity(cfg), None)


def remove_reference(cfg: Config, prefix: str) -> str:
    """Remove a stored reference (the next launch with its inputs boots a new one); its key digest."""
    path = find_reference(cfg, prefix)
    os.unlink(path)
    return path.stem


def choice_from_options(cfg: Config, *, memory_mib: int | None = None, vcpus: int | None = None,
                        secure_boot: bool | None = None, firmware_profile: str | None = None,
                        tpm_model: str | None = None, network: str | None = None) -> FirmwareChoice:
    """The firmware choice `tvorch launch` would make from these options and the configured defaults."""
    from ..core.launch.instance import validate_memory, validate_vcpus

    _firmware, secure, images = firmware_choice(cfg, Firmware.EFI.value, secure_boot, firmware_profile)
    return FirmwareChoice(
        secure_boot=secure,
        memory_mib=validate_memory(cfg.launch.memory_mib if memory_mib is None else memory_mib,
                                   cfg.launch.max_memory_mib),
        vcpus=validate_vcpus(cfg.launch.vcpus if vcpus is None else vcpus, cfg.launch.max_vcpus),
        tpm_model=TpmModel(tpm_model or cfg.launch.tpm_model), firmware_images=images, network=network)
