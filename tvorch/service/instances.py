"""Instance use cases: launch, start, stop, destroy, list, show.

These are written against the store and the hypervisor adapter only, so the
CLI (and later the daemon) call the same code. Each change is recorded as an
event on the instance, so `tvorch show` says what happened, including why a
launch failed.
"""

from __future__ import annotations

import shutil
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from ..adapters import imagefiles
from ..adapters.files import ensure_private_dir
from ..adapters.hostcaps import is_executable, probe_kvm
from ..adapters.hypervisor import Hypervisor
from ..adapters.store import Store, utc_now
from ..config import Config
from ..core.domain_xml import render_domain_xml
from ..core.instance import (
    InstanceRecord,
    InstanceState,
    new_instance_id,
    validate_memory,
    validate_name,
    validate_vcpus,
)
from ..core.spec import DirectBoot, DomainSpec, Firmware, FirmwareImages, TpmModel, VirtType
from ..errors import ConflictError, HostError, InputError, TvorchError
from ..logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class LaunchRequest:
    image: str
    name: str
    memory_mib: int | None = None
    vcpus: int | None = None
    firmware: str | None = None
    secure_boot: bool | None = None
    firmware_profile: str | None = None
    tpm_model: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    network: str | None = None


class Node:
    """The store and the libvirt connection, opened on first use and closed once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._store: Store | None = None
        self._hv: Hypervisor | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.cfg.db_path)
        return self._store

    @property
    def hypervisor(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.cfg.libvirt_uri)
        return self._hv

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
        if self._store is not None:
            self._store.close()


# -- launch ------------------------------------------------------------------


def choose_virt_type(setting: str, kvm_problem: str | None) -> VirtType:
    """`auto` takes KVM when it is usable and falls back to TCG, saying why."""
    if setting != "auto":
        return VirtType(setting)
    if kvm_problem is None:
        return VirtType.KVM
    log.warning("kvm_unusable_using_tcg", reason=kvm_problem)
    return VirtType.QEMU


def _check_file(option: str, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"refused {option} {path}: not a readable file")
    return str(p.resolve())


def _firmware_choice(req: LaunchRequest, cfg: Config) -> tuple[Firmware, bool, FirmwareImages | None]:
    if req.firmware_profile is not None:
        profile = cfg.firmware_profiles.get(req.firmware_profile)
        if profile is None:
            known = ", ".join(sorted(cfg.firmware_profiles)) or "none configured"
            raise InputError(f"refused firmware profile '{req.firmware_profile}': unknown (known: {known})")
        if req.firmware == Firmware.BIOS.value:
            raise InputError("refused --firmware-profile with --firmware bios: profiles are UEFI firmware")
        if req.secure_boot is not None and req.secure_boot != profile.secure_boot:
            raise InputError(f"refused --secure-boot setting: firmware profile '{req.firmware_profile}' fixes it")
        for path in (profile.code, profile.vars_template):
            if not Path(path).is_file():
                raise HostError(f"firmware profile '{req.firmware_profile}': {path} does not exist")
        images = FirmwareImages(profile.code, profile.vars_template, profile.secure_boot)
        return Firmware.EFI, profile.secure_boot, images
    firmware = Firmware(req.firmware or cfg.launch.firmware)
    secure_boot = cfg.launch.secure_boot if req.secure_boot is None else req.secure_boot
    if firmware is Firmware.BIOS and secure_boot:
        if req.secure_boot:
            raise InputError("refused --secure-boot with --firmware bios: Secure Boot needs UEFI firmware")
        secure_boot = False  # the configured default applies to UEFI only
    return firmware, secure_boot, None


def launch(node: Node, req: LaunchRequest) -> InstanceRecord:
    """Check everything, then build overlay, define and start; undo all on failure."""
    cfg = node.cfg
    name = validate_name(req.name)
    memory = validate_memory(cfg.launch.memory_mib if req.memory_mib is None else req.memory_mib, cfg.launch.max_memory_mib)
    vcpus = validate_vcpus(cfg.launch.vcpus if req.vcpus is None else req.vcpus, cfg.launch.max_vcpus)
    tpm_model = TpmModel(req.tpm_model or cfg.launch.tpm_model)
    firmware, secure_boot, firmware_images = _firmware_choice(req, cfg)
    kernel = _check_file("--kernel", req.kernel)
    initrd = _check_file("--initrd", req.initrd)
    if kernel is None and (initrd or req.cmdline):
        raise InputError("refused --initrd/--cmdline without --kernel")
    chain = imagefiles.inspect_image(req.image, cfg.max_backing_depth)
    if not is_executable(cfg.emulator):
        raise HostError(f"emulator {cfg.emulator} is not an executable file (config key 'emulator')")

    hv = node.hypervisor
    if node.store.find_live(name) is not None or hv.domain_exists(name):
        raise ConflictError(f"an instance or libvirt domain named '{name}' already exists")
    if req.network is not None and not hv.network_exists(req.network):
        raise InputError(f"refused --network {req.network}: libvirt has no such network")
    virt_type = choose_virt_type(cfg.virt_type, probe_kvm() if cfg.virt_type == "auto" else None)

    instance_id = new_instance_id()
    overlay_dir, log_dir = Path(cfg.overlay_dir), Path(cfg.console_log_dir)
    spec = DomainSpec(
        name=name,
        uuid=str(uuidlib.uuid4()),
        instance_id=instance_id,
        memory_mib=memory,
        vcpus=vcpus,
        virt_type=virt_type,
        emulator=cfg.emulator,
        firmware=firmware,
        secure_boot=secure_boot,
        tpm_model=tpm_model,
        disk_path=str(overlay_dir / f"{name}.{instance_id}.qcow2"),
        disk_format="qcow2",
        console_log=str(log_dir / f"{name}.{instance_id}.log"),
        network=req.network,
        direct_boot=DirectBoot(kernel, initrd, req.cmdline) if kernel else None,
        firmware_images=firmware_images,
    )
    xml = render_domain_xml(spec)
    now = utc_now()
    record = InstanceRecord(
        id=instance_id, name=name, uuid=spec.uuid, image=chain.top.path, overlay=spec.disk_path,
        console_log=spec.console_log, state=InstanceState.LAUNCHING, virt_type=virt_type.value, domain_xml=xml,
        created_at=now, updated_at=now,
    )
    node.store.create_instance(record)
    log.info("launching", name=name, id=instance_id, image=chain.top.path, virt_type=virt_type.value)

    defined = False
    try:
        # libvirt's qemu user must traverse to the overlay; the log dir is virtlogd's (root).
        ensure_private_dir(overlay_dir, 0o711)
        ensure_private_dir(log_dir)
        imagefiles.create_overlay(chain, spec.disk_path)
        hv.define(xml)
        defined = True
        node.store.add_event(instance_id, "defined", f"libvirt domain {name} ({spec.uuid})")
        hv.start(name)
    except BaseException as err:
        reason = str(err) if isinstance(err, TvorchError) else f"{type(err).__name__}: {err}"
        _roll_back_launch(node, spec, defined)
        node.store.update_instance(
            instance_id, state=InstanceState.FAILED, error=reason, event=("launch-failed", reason)
        )
        raise
    return node.store.update_instance(
        instance_id, state=InstanceState.RUNNING, event=("started", f"virt_type={virt_type.value}")
    )


def _roll_back_launch(node: Node, spec: DomainSpec, defined: bool) -> None:
    """Leave no domain and no overlay behind a failed launch.

    The vTPM state libvirt may have created while starting never held a running
    guest's secrets, so it goes too (the only deletion not asked for by purge).
    """
    hv = node.hypervisor
    if defined:
        for step in (lambda: hv.power_off(spec.name), lambda: hv.undefine(spec.name, purge_tpm=True)):
            try:
                step()
            except TvorchError as err:
                log.error("rollback_step_failed", name=spec.name, error=str(err))
    imagefiles.remove_overlay(spec.disk_path)


# -- lifecycle ---------------------------------------------------------------


def _owns_domain(node: Node, record: InstanceRecord) -> bool:
    """True when libvirt's domain of that name is this instance's (same UUID)."""
    return node.hypervisor.domain_uuid(record.name) == record.uuid


def refresh(node: Node, record: InstanceRecord) -> InstanceRecord:
    """Bring the record's state in line with what libvirt says now."""
    if record.state in (InstanceState.LAUNCHING, InstanceState.FAILED, InstanceState.DESTROYED):
        return record
    hv = node.hypervisor
    if not _owns_domain(node, record):
        return node.store.update_instance(
            record.id, state=InstanceState.FAILED, error="libvirt domain is missing",
            event=("domain-missing", "libvirt no longer has the domain"),
        )
    live = hv.state(record.name)
    if live is record.state:
        return record
    return node.store.update_instance(record.id, state=live, event=("observed", f"libvirt reports {live.value}"))


def list_instances(node: Node) -> list[InstanceRecord]:
    return [refresh(node, r) for r in node.store.list_instances()]


def show(node: Node, name: str) -> InstanceRecord:
    return refresh(node, node.store.get_live(name))


def _require_domain(node: Node, name: str) -> InstanceRecord:
    record = show(node, name)
    if record.state in (InstanceState.FAILED, InstanceState.LAUNCHING):
        raise ConflictError(f"instance '{name}' is {record.state.value}; destroy it and launch again")
    return record


def start(node: Node, name: str) -> tuple[InstanceRecord, bool]:
    """Start a stopped instance; (record, False) when it was already running."""
    record = _require_domain(node, name)
    if record.state is InstanceState.RUNNING:
        return record, False
    node.hypervisor.start(name)
    return node.store.update_instance(record.id, state=InstanceState.RUNNING, event=("started", "tvorch start")), True


def stop(node: Node, name: str, force: bool, timeout: float | None) -> tuple[InstanceRecord, bool]:
    """Graceful shutdown within TIMEOUT, or power off at once with FORCE."""
    record = _require_domain(node, name)
    if record.state is InstanceState.STOPPED:
        return record, False
    if force:
        node.hypervisor.power_off(name)
    else:
        node.hypervisor.shutdown(name, float(node.cfg.stop_timeout if timeout is None else timeout))
    how = "powered off (--force)" if force else "shut down by the guest"
    return node.store.update_instance(record.id, state=InstanceState.STOPPED, event=("stopped", how)), True


def destroy(node: Node, name: str, purge_vtpm: bool) -> InstanceRecord:
    """Power off, undefine (keeping vTPM state unless PURGE_VTPM), remove the overlay."""
    record = node.store.get_live(name)
    hv = node.hypervisor
    if _owns_domain(node, record):
        hv.power_off(name)
        hv.undefine(name, purge_tpm=purge_vtpm)
    elif purge_vtpm:
        # The domain is gone already; its vTPM state may not be.
        shutil.rmtree(Path(node.cfg.swtpm_state_dir) / record.uuid, ignore_errors=True)
    imagefiles.remove_overlay(record.overlay)
    kept = "purged" if purge_vtpm else f"kept in {node.cfg.swtpm_state_dir}/{record.uuid}"
    return node.store.update_instance(
        record.id, state=InstanceState.DESTROYED, event=("destroyed", f"vTPM state {kept}")
    )
