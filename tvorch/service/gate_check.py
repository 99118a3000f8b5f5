"""`tvorch check`: what the hook would decide at an instance's next start, without its deadline.

The hook refuses a start when its deadline passes before a decision, which
happens when a file the launch measured (a large image layer, say) is not in
the digest cache because it is new or its ctime changed. This gathers the
same evidence the hook does, hashing every measured file through the digest
cache (so the hook then finds them there), and judges it with the same pure
function. It records nothing and leaves the hook's runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.launch.gate import start_refusals
from ..core.launch.instance import InstanceState
from ..core.launch.metadata import parse_instance_metadata
from ..hook import boot_view_problem, gather
from .node import Node


@dataclass(frozen=True)
class StartCheck:
    name: str
    running: bool  # the vTPM state and NVRAM are in use, so they were not compared
    reasons: tuple[str, ...]  # empty: the hook would allow the start

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "running": self.running, "allowed": not self.reasons,
                "reasons": list(self.reasons)}


def check_start(node: Node, name: str) -> StartCheck:
    record = node.store.get_live(name)
    hv = node.hypervisor
    running = hv.state(record.name) is InstanceState.RUNNING
    # libvirt's definition, as its hook gets it at `prepare begin` (the live one when running).
    xml = hv.domain_xml(record.name, inactive=not running)
    meta = parse_instance_metadata(xml)
    view = boot_view_problem(node.cfg, xml)  # the direct-boot view, made again as the hook would
    if view is not None:
        return StartCheck(record.name, running, (view,))
    evidence = gather(node.cfg, node.store, record, meta.manifest_digest if meta else None, xml, running)
    return StartCheck(record.name, running, start_refusals(evidence))
