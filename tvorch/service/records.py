"""An instance's record as libvirt sees it now: the one read that lifecycle, reconciliation and the vTPM share;
and the staged boot files no record names any more.

Below `instances`, `reconcile` and the vTPM modules, importing none of them,
so that the service modules import each other without a cycle
(tests/unit/test_service_layers.py).
"""

from __future__ import annotations

from ..adapters import boot_files
from ..core.launch.domain_files import file_uses
from ..core.launch.instance import InstanceRecord, InstanceState
from ..logs import get_logger
from .node import Node

log = get_logger(__name__)


def owns_domain(node: Node, record: InstanceRecord) -> bool:
    """True when libvirt's domain of that name is this instance's (same UUID)."""
    return node.hypervisor.domain_uuid(record.name) == record.uuid


def refresh(node: Node, record: InstanceRecord) -> InstanceRecord:
    """Bring the record's state in line with what libvirt says now."""
    if record.state in (InstanceState.LAUNCHING, InstanceState.FAILED, InstanceState.DESTROYED,
                        InstanceState.INCOMING, InstanceState.MIGRATED):
        return record  # a launch or an incoming migration settles these itself, or reconcile does
    hv = node.hypervisor
    if not owns_domain(node, record):
        return node.store.update_instance(
            record.id, state=InstanceState.FAILED, error="libvirt domain is missing",
            event=("domain-missing", "libvirt no longer has the domain"),
        )
    live = hv.state(record.name)
    if live is record.state:
        return record
    return node.store.update_instance(record.id, state=live, event=("observed", f"libvirt reports {live.value}"))


def show(node: Node, name: str) -> InstanceRecord:
    """NAME's live record, refreshed from libvirt."""
    return refresh(node, node.store.get_live(name))


def prune_boot_files(node: Node) -> None:
    """Staged direct-boot files that no live instance's domain boots any more (adapters.boot_files)."""
    named = {use.path for r in node.store.list_instances() if r.domain_xml for use in file_uses(r.domain_xml)}
    for digest in boot_files.prune(node.cfg.state_dir, node.cfg.boot_files_dir, named):
        log.info("boot_file_pruned", digest=digest)
