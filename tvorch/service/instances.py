"""Instance use cases: start, stop, destroy, list, show (launch is in `launch`).

These are written against the store and the hypervisor adapter only, so the
CLI (and later the daemon) call the same code. Each change is recorded as an
event on the instance, so `tvorch show` says what happened, including why a
launch failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..adapters import imagefiles
from ..adapters.files import ensure_private_dir
from ..adapters.guest_channel import prepare_socket_dir, remove_socket_dir, socket_path
from ..adapters.locks import instance_lock
from ..core.launch.instance import InstanceRecord, InstanceState, validate_name
from ..errors import ConflictError, NotFoundError
from ..logs import get_logger
from . import vtpm
from .node import Node
from .reconcile import reconcile
from .records import owns_domain, prune_boot_files, show  # show: `tvorch show`, a use case of this module too

log = get_logger(__name__)


# -- lifecycle ---------------------------------------------------------------


def list_instances(node: Node) -> list[InstanceRecord]:
    """Every instance not destroyed, after reconciling the store with libvirt."""
    reconcile(node)
    return node.store.list_instances()


def _require_domain(node: Node, name: str) -> InstanceRecord:
    record = show(node, name)
    if record.state in (InstanceState.FAILED, InstanceState.LAUNCHING):
        raise ConflictError(f"instance '{name}' is {record.state.value}; destroy it and launch again")
    return record


def _channel(node: Node, record: InstanceRecord) -> Path:
    return socket_path(Path(node.cfg.guest.channel_dir), record.id, record.domain_xml)


def start(node: Node, name: str, why: str = "tvorch start") -> tuple[InstanceRecord, bool]:
    """Start a stopped instance, or resume a saved one (libvirt restores its managed save image, the
    vTPM key lent for that as for any start); (record, False) when it was already running."""
    with instance_lock(Path(node.cfg.state_dir), name):
        record = _require_domain(node, name)
        if record.state is InstanceState.RUNNING:
            return record, False
        prepare_socket_dir(_channel(node, record), Path(node.cfg.guest.channel_dir))  # /run is empty after a reboot
        ensure_private_dir(Path(node.cfg.console_log_dir))  # libvirt opens the console log, but makes no directory
        restoring = node.hypervisor.has_managed_save(name)
        with vtpm.unlocked(node, record):
            node.hypervisor.start(name)
        how = f"{why}: resumed from its managed save image" if restoring else why
        return node.store.update_instance(record.id, state=InstanceState.RUNNING,
                                          event=("restored" if restoring else "started", how)), True


def stop(node: Node, name: str, force: bool, timeout: float | None) -> tuple[InstanceRecord, bool]:
    """Graceful shutdown within TIMEOUT, or power off at once with FORCE."""
    with instance_lock(Path(node.cfg.state_dir), name):
        record = _require_domain(node, name)
        if record.state is InstanceState.STOPPED:
            return record, False
        if force:
            node.hypervisor.power_off(name)
        else:
            node.hypervisor.shutdown(name, float(node.cfg.stop_timeout if timeout is None else timeout))
        how = "powered off (--force)" if force else "shut down by the guest"
        return node.store.update_instance(record.id, state=InstanceState.STOPPED, event=("stopped", how)), True


@dataclass(frozen=True)
class Destroyed:
    record: InstanceRecord
    already: bool  # destroyed before this call: a cloud controller's retry
    vtpm_purged: bool  # the vTPM state is gone now (by this call or an earlier one)


def destroy(node: Node, name: str, purge_vtpm: bool) -> Destroyed:
    """Power off, undefine (keeping vTPM state unless PURGE_VTPM), remove the overlay.

    Idempotent: a destroyed record is kept (state `destroyed`), so a name whose
    last instance was destroyed is "already destroyed" (with --purge-vtpm its
    kept vTPM state is purged now); a name the store never knew is not found.
    """
    with instance_lock(Path(node.cfg.state_dir), name):
        live = node.store.find_live(validate_name(name))
        if live is not None:
            return Destroyed(remove_instance(node, live, purge_vtpm), False, purge_vtpm)
        gone = node.store.find_destroyed(name)
        if gone is None:
            raise NotFoundError(f"no instance named '{name}'")
        if purge_vtpm and _vtpm_kept(node, gone):
            vtpm.remove_state(node, gone)
            node.store.add_event(gone.id, "vtpm-purged", "tvorch destroy --purge-vtpm of the destroyed instance")
            return Destroyed(gone, True, True)
        return Destroyed(gone, True, not _vtpm_kept(node, gone))


def _vtpm_kept(node: Node, record: InstanceRecord) -> bool:
    """Whether a destroyed instance's vTPM state or key is still there to purge."""
    kept = node.store.vtpm(record.id)
    return vtpm.instance_dir(node.cfg, record).exists() or (kept is not None and kept.purged_at is None)


def remove_instance(node: Node, record: InstanceRecord, purge_vtpm: bool) -> InstanceRecord:
    """What destroy does, for a caller that holds the name's lock already (launch clearing a failed one)."""
    hv = node.hypervisor
    if owns_domain(node, record):
        hv.power_off(record.name)
        hv.undefine(record.name, purge_tpm=purge_vtpm)
    if purge_vtpm:
        # libvirt removed the state with the domain, or the domain was gone already; the key goes too.
        vtpm.remove_state(node, record)
    imagefiles.remove_overlay(record.overlay)
    remove_socket_dir(_channel(node, record), Path(node.cfg.guest.channel_dir))
    kept = "purged" if purge_vtpm else f"kept in {node.cfg.swtpm_state_dir}/{record.uuid}"
    gone = node.store.update_instance(
        record.id, state=InstanceState.DESTROYED, event=("destroyed", f"vTPM state {kept}")
    )
    prune_boot_files(node)
    return gone

