"""`tvorch launch`: plan, admit, commit.

`plan` turns the request into a typed LaunchPlan (config defaults, checks,
the image's chain read; no side effects), `admit` decides under the name's
lock that this node runs it (the name, the host, the domain spec, the
measurements judged against the reference values), and `commit` writes it:
direct-boot copies, vTPM, record, signed manifest, overlay, domain, start.

Nothing is written before every check has passed: the inputs, the image's
backing chain, the name, the host, and the measurements against the reference
values. Then the record, the signed manifest, the overlay, the domain; a
failure after that point undoes what was created and records why. The name's
lock is held from the name check to the end, so a launcher killed half-way
is recognised and its launch settled by `reconcile` (or the next launch of its name).
"""

from __future__ import annotations

import dataclasses
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from ..adapters import boot_files, imagefiles
from ..adapters.files import ensure_private_dir
from ..adapters.guest_channel import prepare_socket_dir, remove_socket_dir, socket_path
from ..adapters.hostcaps import is_executable, probe_kvm
from ..adapters.locks import instance_lock
from ..config import Config
from ..core.launch.canonical import config_digest
from ..core.launch.domain_xml import render_domain_xml
from ..core.attestation.hostverdict import host_problem
from ..core.launch.images import judge_layer_writers
from ..core.launch.instance import (
    InstanceRecord,
    InstanceState,
    new_instance_id,
    validate_memory,
    validate_name,
    validate_vcpus,
)
from ..core.launch.manifest import BootPredictionRecord, manifest_digest
from ..core.launch.spec import DirectBoot, DiskLayer, DomainSpec, Firmware, FirmwareImages, TpmModel
from ..core.timestamps import utc_now
from ..errors import ConflictError, HostError, ImageError, InputError, TrustError, TvorchError
from ..faults import crash_point
from ..logs import get_logger
from .instances import remove_instance
from .launch_options import choose_virt_type, firmware_choice
from .node import Node
from .manifests import issue_manifest
from .measure import Measured, judge, measure_launch
from . import vtpm
from .reconcile import reconcile_name

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
    rehash: bool = False
    allow_untrusted_image: bool = False


def _check_file(option: str, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"refused {option} {path}: not a readable file")
    return str(p.resolve())


def predict_boot(node: Node, req: LaunchRequest, spec: DomainSpec, image: str) -> BootPredictionRecord:
    """What the first boot's vTPM will hold (service.predict), for the manifest.

    Under UEFI the platform's firmware reference is booted first when there is
    none yet (launch.firmware_reference = "create"; once per platform). A
    prediction refused (no GPT, a broken FAT or PE, ...) does not refuse the
    launch: the manifest says it is unavailable and why, and the first boot is
    learned as before.
    """
    from .predict import PredictRequest, predict

    direct = spec.direct_boot
    request = PredictRequest(
        image=image, firmware=spec.firmware.value, secure_boot=spec.secure_boot,
        firmware_profile=req.firmware_profile, tpm_model=spec.tpm_model.value,
        kernel=direct.kernel if direct else None, initrd=direct.initrd if direct else None,
        cmdline=direct.cmdline if direct else None, memory_mib=spec.memory_mib, vcpus=spec.vcpus,
    )
    try:
        result = predict(request, lambda: node, create_reference=node.cfg.launch.firmware_reference == "create")
    except (TvorchError, OSError) as err:
        log.warning("boot_prediction_unavailable", reason=str(err))
        return BootPredictionRecord("unavailable", reason=str(err))
    return BootPredictionRecord("predicted", result.prediction, dict(result.not_predicted))


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch asks for, checked against the config and read from its files: no side effects."""

    request: LaunchRequest
    name: str
    memory_mib: int
    vcpus: int
    tpm_model: TpmModel
    firmware: Firmware
    secure_boot: bool
    firmware_images: FirmwareImages | None
    direct_boot: DirectBoot | None
    chain: imagefiles.ImageChain
    layer_writers: tuple[str, ...]  # who else may write an image layer (warned, per policy.unsafe_image_files)


@dataclass(frozen=True)
class Admitted:
    """A plan this node accepts: its domain, and its measurements judged against the reference values."""

    plan: LaunchPlan
    spec: DomainSpec
    measured: Measured
    previous: InstanceRecord | None  # a failed launch of the same name, cleared at commit


def launch(node: Node, req: LaunchRequest) -> InstanceRecord:
    """Plan, admit, commit: nothing is written before every check has passed; a failure after that is undone."""
    planned = plan(node.cfg, req)
    node.connect()
    if node.cfg.policy.host_verdict == "require":  # the hook would refuse the start anyway: say so first
        problem = host_problem(node.store.latest_host_verdict(), time.time(), node.cfg.host.verdict_max_age)
        if problem:
            raise TrustError(f"launch refused: {problem}")
    # Held to the end: a `launching` record whose lock is free is an interrupted launch (see reconcile).
    with instance_lock(Path(node.cfg.state_dir), planned.name):
        return commit(node, admit(node, planned))


def plan(cfg: Config, req: LaunchRequest) -> LaunchPlan:
    """The request's values with the config's defaults, each checked; the image's backing chain read."""
    if req.allow_untrusted_image and not cfg.policy.allow_untrusted_image:
        raise TrustError("refused --allow-untrusted-image: the policy does not permit it (policy.allow_untrusted_image)")
    name = validate_name(req.name)
    memory = validate_memory(cfg.launch.memory_mib if req.memory_mib is None else req.memory_mib, cfg.launch.max_memory_mib)
    vcpus = validate_vcpus(cfg.launch.vcpus if req.vcpus is None else req.vcpus, cfg.launch.max_vcpus)
    tpm_model = TpmModel(req.tpm_model or cfg.launch.tpm_model)
    firmware, secure_boot, firmware_images = firmware_choice(cfg, req.firmware, req.secure_boot,
                                                             req.firmware_profile)
    kernel = _check_file("--kernel", req.kernel)
    initrd = _check_file("--initrd", req.initrd)
    if kernel is None and (initrd or req.cmdline):
        raise InputError("refused --initrd/--cmdline without --kernel")
    chain = imagefiles.inspect_image(req.image, cfg.max_backing_depth)
    unsafe, writers = judge_layer_writers(chain, cfg.policy.unsafe_image_files)
    if unsafe:
        raise ImageError(f"launch refused: {'; '.join(unsafe)}: someone other than root can change what the guest "
                         f"reads (policy.unsafe_image_files = \"{cfg.policy.unsafe_image_files}\")")
    for writer in writers:
        log.warning("image_layer_writable", detail=writer)
    if not is_executable(cfg.emulator):
        raise HostError(f"emulator {cfg.emulator} is not an executable file (config key 'emulator')")
    return LaunchPlan(req, name, memory, vcpus, tpm_model, firmware, secure_boot, firmware_images,
                      DirectBoot(kernel, initrd, req.cmdline) if kernel else None, chain, tuple(writers))


def admit(node: Node, p: LaunchPlan) -> Admitted:
    """Under the name's lock: the name is free, the host can run it, and what it runs is trusted."""
    cfg, hv = node.cfg, node.hypervisor
    # Before the name check, so that a retry by name after a crash finds the old launch settled;
    # its own name only: other instances are `reconcile`'s, `list`'s and the daemon's.
    reconcile_name(node, p.name)
    previous = node.store.find_live(p.name)
    if (previous is not None and previous.state is not InstanceState.FAILED) or hv.domain_exists(p.name):
        raise ConflictError(f"an instance or libvirt domain named '{p.name}' already exists")
    if p.request.network is not None and not hv.network_exists(p.request.network):
        raise InputError(f"refused --network {p.request.network}: libvirt has no such network")
    virt_type = choose_virt_type(cfg.virt_type, probe_kvm() if cfg.virt_type == "auto" else None)
    if not is_executable(cfg.swtpm):
        raise HostError(f"swtpm {cfg.swtpm} is not an executable file (config key 'swtpm')")
    instance_id = new_instance_id()
    overlay_dir, log_dir = Path(cfg.overlay_dir), Path(cfg.console_log_dir)
    spec = DomainSpec(
        name=p.name,
        uuid=str(uuidlib.uuid4()),
        instance_id=instance_id,
        memory_mib=p.memory_mib,
        vcpus=p.vcpus,
        virt_type=virt_type,
        emulator=cfg.emulator,
        firmware=p.firmware,
        secure_boot=p.secure_boot,
        tpm_model=p.tpm_model,
        disk_path=str(overlay_dir / f"{p.name}.{instance_id}.qcow2"),
        disk_format="qcow2",
        console_log=str(log_dir / f"{p.name}.{instance_id}.log"),
        network=p.request.network,
        direct_boot=p.direct_boot,
        firmware_images=p.firmware_images,
        backing_chain=tuple(DiskLayer(layer.path, layer.format.value) for layer in reversed(p.chain.layers)),
        guest_channel=str(socket_path(Path(cfg.guest.channel_dir), instance_id)),
    )
    measured = judge(cfg, node.store, measure_launch(cfg, node.store, spec, p.chain, p.request.rehash),
                     p.request.allow_untrusted_image)
    return Admitted(p, spec, measured, previous)


def commit(node: Node, admitted: Admitted) -> InstanceRecord:
    """Write, define and start what was admitted; on any failure undo it all and record why."""
    cfg, hv, p = node.cfg, node.hypervisor, admitted.plan
    spec, measured = _stage_boot_files(cfg, admitted.spec, admitted.measured)
    # The vTPM key is made and sealed before anything is written: a host TPM that cannot seal refuses here.
    keys = vtpm.make_keys(cfg)
    if keys.key is not None:
        spec = dataclasses.replace(spec, vtpm_secret=str(uuidlib.uuid4()))
    crash_point("measured")
    now = utc_now()
    record = InstanceRecord(
        id=spec.instance_id, name=spec.name, uuid=spec.uuid, image=p.chain.top.path, overlay=spec.disk_path,
        console_log=spec.console_log, state=InstanceState.LAUNCHING, virt_type=spec.virt_type.value,
        domain_xml="", created_at=now, updated_at=now,
    )
    if admitted.previous is not None:  # a failed launch of that name: clear what is left of it
        remove_instance(node, admitted.previous, purge_vtpm=False)
    node.store.create_instance(record)
    crash_point("recorded")
    log.info("launching", name=spec.name, id=spec.instance_id, image=p.chain.top.path, virt_type=spec.virt_type.value)

    defined = False
    try:
        ek_measurement = vtpm.manufacture_for_launch(node, record, keys, spec.vtpm_secret)
        crash_point("vtpm")
        measured = dataclasses.replace(measured, measurements=(*measured.measurements, ek_measurement))
        # The manifest signs the configuration's digest, and the domain's metadata names the manifest: the
        # canonical form leaves metadata out, so the XML rendered with the digest has the signed configuration.
        launched = config_digest(render_domain_xml(spec))
        manifest = issue_manifest(cfg, spec, measured, launched, predict_boot(node, p.request, spec, p.chain.top.path))
        spec = dataclasses.replace(spec, manifest_digest=manifest_digest(manifest))
        xml = render_domain_xml(spec)
        assert config_digest(xml) == launched, "the manifest digest changed the canonical configuration"
        _record_launch(node, spec, measured, manifest, xml, p.layer_writers)
        _make_files(cfg, spec)
        imagefiles.create_overlay(p.chain, spec.disk_path)
        node.store.set_overlay_identity(spec.instance_id, imagefiles.file_identity(spec.disk_path))
        crash_point("overlay")
        hv.define(xml)
        crash_point("defined")
        defined = True
        node.store.add_event(spec.instance_id, "defined", f"libvirt domain {spec.name} ({spec.uuid})")
        with vtpm.unlocked(node, record):
            hv.start(spec.name)
        crash_point("started")
    except BaseException as err:
        reason = str(err) if isinstance(err, TvorchError) else f"{type(err).__name__}: {err}"
        _roll_back_launch(node, record, defined)
        node.store.update_instance(
            spec.instance_id, state=InstanceState.FAILED, error=reason, event=("launch-failed", reason)
        )
        raise
    return node.store.update_instance(
        spec.instance_id, state=InstanceState.RUNNING, event=("started", f"virt_type={spec.virt_type.value}")
    )


def _record_launch(node: Node, spec: DomainSpec, measured: Measured, manifest: bytes, xml: str,
                   writers: tuple[str, ...]) -> None:
    """The signed manifest and the domain XML, the NVRAM ledger's first entry, and what the policy waived."""
    assert spec.manifest_digest is not None
    node.store.save_manifest(spec.instance_id, spec.manifest_digest, manifest, domain_xml=xml)
    vars_template = next((m for m in measured.measurements if m.kind == "firmware-vars"), None)
    if vars_template is not None:  # libvirt makes the instance's NVRAM from it at the first start
        node.store.append_ledger(spec.instance_id, "launched", vars_template.digest, "nvram_ledger")
    for m in measured.measurements:
        if m.details.get("waived"):
            node.store.add_event(spec.instance_id, "policy-waived", f"--allow-untrusted-image: {m.kind} {m.path}")
    for writer in writers:
        node.store.add_event(spec.instance_id, "policy-warning", f"{writer} (policy.unsafe_image_files)")


def _make_files(cfg: Config, spec: DomainSpec) -> None:
    """The directories libvirt and QEMU use, and the overlay."""
    # libvirt's qemu user must traverse to the overlay; the log dir is virtlogd's (root).
    ensure_private_dir(Path(cfg.overlay_dir), 0o711)
    ensure_private_dir(Path(cfg.console_log_dir))
    assert spec.guest_channel is not None
    prepare_socket_dir(Path(spec.guest_channel), Path(cfg.guest.channel_dir))  # libvirt binds the socket there


def _stage_boot_files(cfg: Config, spec: DomainSpec, measured: Measured) -> tuple[DomainSpec, Measured]:
    """Boot root's read-only copies of the direct-boot files (adapters.boot_files: libvirt would hand the
    operator's own files to the qemu user for the run). The manifest names the copy, and the original
    in `details.source`."""
    if spec.direct_boot is None:
        return spec, measured
    staged: dict[str, str] = {}
    out = []
    for m in measured.measurements:
        if m.kind in ("kernel", "initrd") and m.path is not None:
            staged[m.path] = boot_files.stage(cfg.state_dir, cfg.boot_files_dir, m.path, m.digest)
            m = dataclasses.replace(m, path=staged[m.path], details={**m.details, "source": m.path})
        out.append(m)
    boot = spec.direct_boot
    direct = DirectBoot(staged[boot.kernel], staged[boot.initrd] if boot.initrd else None, boot.cmdline)
    return dataclasses.replace(spec, direct_boot=direct), dataclasses.replace(measured, measurements=tuple(out))


def _roll_back_launch(node: Node, record: InstanceRecord, defined: bool) -> None:
    """Leave no domain, overlay or vTPM state behind a failed launch.

    The vTPM state never held a running guest's secrets, so it goes too (the
    only deletion not asked for by purge).
    """
    hv = node.hypervisor
    if defined:
        for step in (lambda: hv.power_off(record.name), lambda: hv.undefine(record.name, purge_tpm=True)):
            try:
                step()
            except TvorchError as err:
                log.error("rollback_step_failed", name=record.name, error=str(err))
    vtpm.remove_state(node, record)
    imagefiles.remove_overlay(record.overlay)
    remove_socket_dir(socket_path(Path(node.cfg.guest.channel_dir), record.id), Path(node.cfg.guest.channel_dir))
