"""An instance's record as libvirt sees it now: the one read that lifecycle, reconciliation and the vTPM share.

Below `instances`, `reconcile` and the vTPM modules, importing none of them,
so that the service modules import each other without a cycle
(tests/unit/test_service_layers.py).
"""

from __future__ import annotations

from ..core.launch.instance import InstanceRecord, InstanceState
from .node import Node


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
