"""Start paths for instances whose vTPM key is sealed (README, "Start paths").

libvirt never holds a sealed vTPM key: tvorch lends it for one start
(service.vtpm.unlocked). So libvirt's own autostart and libvirt-guests'
save/restore cannot start such a guest; tvorch does those itself:

- autostart: instances marked here are started by `tvorch serve` when it
  starts (after its first reconcile and, where policy requires, a passing
  host verdict), with the key lent for each start;
- host shutdown: `tvorch serve` saves (managed save, the save image's digest
  and the vTPM state ledgered) or shuts down every running instance;
- resume: a saved instance is restored by `tvorch start` or by the next
  `tvorch serve`, the key lent for the restore; the hook resumes only the
  save image `tvorch save` made and recorded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..adapters.digests import measure_file
from ..adapters.locks import instance_lock
from ..adapters.vtpm_state import state_digest
from ..config import Config
from ..core.launch.gate import managed_save_path
from ..core.launch.instance import InstanceRecord, InstanceState
from ..errors import ConflictError, OperationTimeout, TvorchError
from ..logs import get_logger
from . import instances
from .node import Node

log = get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one instance's start, save or shutdown did (for the daemon's log and the events)."""

    name: str
    done: str  # started, restored, saved, shut down, powered off, failed
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "done": self.done, "detail": self.detail}


def set_autostart(node: Node, name: str, on: bool) -> tuple[InstanceRecord, bool]:
    """Mark NAME to be started by `tvorch serve` when it starts (True: that changed)."""
    record = node.store.get_live(name)
    return record, node.store.set_autostart(record.id, on)


def autostart_names(node: Node) -> set[str]:
    ids = node.store.autostart_ids()
    return {r.name for r in node.store.list_instances() if r.id in ids}


def save(node: Node, name: str, why: str = "tvorch save") -> tuple[InstanceRecord, bool]:
    """Managed save of a running instance: libvirt writes the guest (and its vTPM state) to its save
    image and stops it; the hook closes the run and ledgers the vTPM state at rest, then this ledgers it
    again as `saved` with the image's digest, the only image the hook will resume. (record, False) when
    it is saved already."""
    with instance_lock(Path(node.cfg.state_dir), name):
        record = instances.show(node, name)
        if record.state is InstanceState.STOPPED:
            if node.store.managed_save(record.id) is not None and node.hypervisor.has_managed_save(name):
                return record, False
            raise ConflictError(f"instance '{name}' is stopped; there is nothing to save")
        if record.state not in (InstanceState.RUNNING, InstanceState.PAUSED):
            raise ConflictError(f"instance '{name}' is {record.state.value}; only a running instance can be saved")
        node.hypervisor.managed_save(name)
        path = managed_save_path(name)
        image = measure_file(path, node.store).digest  # also puts it in the digest cache the hook reads
        vtpm_digest = state_digest(Path(node.cfg.swtpm_state_dir) / record.uuid)
        if vtpm_digest is None:
            raise ConflictError(f"'{name}' was saved, but it has no vTPM state at {node.cfg.swtpm_state_dir}")
        node.store.record_managed_save(record.id, path, image, vtpm_digest)
        return node.store.update_instance(record.id, state=InstanceState.STOPPED,
                                          event=("saved", f"{why}: managed save image {path}")), True


def stop_for_shutdown(node: Node, name: str, why: str) -> Outcome:
    """ACPI shutdown within stop_timeout, then power off: the hook ledgers the vTPM state either way."""
    try:
        instances.stop(node, name, force=False, timeout=None)
        return Outcome(name, "shut down", why)
    except OperationTimeout:
        instances.stop(node, name, force=True, timeout=None)
        record = node.store.get_live(name)
        node.store.add_event(record.id, "stopped", f"{why}: powered off after stop_timeout ({node.cfg.stop_timeout} s)")
        return Outcome(name, "powered off", f"no shutdown within stop_timeout ({node.cfg.stop_timeout} s)")


def _each(cfg: Config, names: list[str], concurrency: int, act: Callable[[Node, str], Outcome]) -> list[Outcome]:
    """ACT on each name, CONCURRENCY at a time, each worker with its own store and libvirt connection;
    a failure is an outcome, never stops the others."""

    def one(name: str) -> Outcome:
        node = Node(cfg)
        try:
            return act(node, name)
        except TvorchError as err:
            try:
                record = node.store.find_live(name)
                if record is not None:
                    node.store.add_event(record.id, "start-path-failed", str(err))
            except TvorchError:
                pass
            return Outcome(name, "failed", str(err))
        finally:
            node.close()

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, sorted(names)))


def boot_starts(node: Node) -> list[Outcome]:
    """What `tvorch serve` starts when it starts: every stopped instance saved by tvorch (resumed), and
    every stopped one marked autostart (booted), start_concurrency at a time."""
    auto = node.store.autostart_ids()
    names = []
    for record in node.store.list_instances():
        if record.state is not InstanceState.STOPPED:
            continue
        if record.id in auto or node.store.managed_save(record.id) is not None:
            names.append(record.name)

    def act(worker: Node, name: str) -> Outcome:
        record, changed = instances.start(worker, name, why="tvorch serve (node start)")
        return Outcome(name, record_event(worker, record) if changed else "running", "tvorch serve (node start)")

    return _each(node.cfg, names, node.cfg.serve.start_concurrency, act)


def record_event(node: Node, record: InstanceRecord) -> str:
    events = node.store.events(record.id)
    return events[-1].kind if events else "started"


def host_shutdown(node: Node, how: str) -> list[Outcome]:
    """serve.on_shutdown: `save` or `shutdown` every running instance (`none`: nothing)."""
    if how == "none":
        return []
    names = [r.name for r in instances.list_instances(node) if r.state in (InstanceState.RUNNING, InstanceState.PAUSED)]
    why = f"tvorch serve stopping (serve.on_shutdown = {how})"

    def act(worker: Node, name: str) -> Outcome:
        if how == "save":
            save(worker, name, why)
            return Outcome(name, "saved", why)
        return stop_for_shutdown(worker, name, why)

    return _each(node.cfg, names, node.cfg.serve.start_concurrency, act)
