"""Reconciliation: make the store and libvirt agree after a crash or a change made behind tvorch's back.

`tvorch list` runs it first, `tvorch reconcile` on demand, the daemon on every
libvirt (re)connect; `tvorch launch` runs `reconcile_name`, its own name only. With nothing to fix it costs one store
query, one pass over libvirt's domains and one listing of the overlay directory.

- A `launching` record whose name lock is free was left by a launcher that
  died (the lock is held for the whole launch; the kernel drops it with its
  holder). If libvirt runs its domain, or the guest has run (a later `started`
  hook), the launch is adopted; otherwise it is undone as a failed launch is and
  the record marked failed, so the name can be launched again.
- Other live records take libvirt's state (`records.refresh`), under the
  name's lock so that a concurrent start, stop or destroy is not overwritten.
- An overlay of a failed or destroyed instance of this store is removed,
  unless a libvirt domain claims that instance or a guest ran on it (a
  tenant's data: only `tvorch destroy` removes that). An overlay of an
  instance this store does not know is never touched: it may be another
  store's disk, in use.
- A domain carrying tvorch metadata this store does not know is reported and
  left alone; domains without tvorch metadata are never touched.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..adapters import imagefiles
from ..adapters.locks import try_instance_lock
from ..core.launch.instance import InstanceRecord, InstanceState
from ..errors import TvorchError
from ..logs import get_logger
from . import vtpm
from .node import Node
from .records import owns_domain, refresh

log = get_logger(__name__)

INTERRUPTED = "launch interrupted"
# Overlays as launch names them, and qemu-img's temporary file beside one (imagefiles.create_overlay).
_OVERLAY = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<id>i-[0-9a-f]{12})\.qcow2")
_OVERLAY_TMP = re.compile(r"\.(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<id>i-[0-9a-f]{12})\.qcow2\.[a-z0-9_]+\.tmp")
_ENDED = (InstanceState.FAILED, InstanceState.DESTROYED, InstanceState.MIGRATED)
_ACTIVE = (InstanceState.RUNNING, InstanceState.PAUSED)


def reconcile(node: Node, holding: str | None = None) -> list[str]:
    """Bring the store and libvirt into agreement; returns what was done (and warnings), one line each.

    HOLDING names an instance whose lock the caller holds already: launch
    reconciles under its own name's lock, so a retry by name after a crash
    finds the interrupted launch settled.
    """
    done: list[str] = []
    records = node.store.list_instances()
    for record in records:
        if record.state is InstanceState.LAUNCHING:
            with _claim(node, record.name, holding) as ours:
                if ours:
                    _settle_launch(node, record.id, done)
    # Taken after reading the records: a record seen live had its domain already, so none looks missing wrongly.
    domains = node.hypervisor.domains()
    by_name = {d.name: d for d in domains}
    for record in records:
        if record.state in (InstanceState.LAUNCHING, InstanceState.INCOMING) or record.state in _ENDED:
            continue
        seen = by_name.get(record.name)
        observed = seen.state if seen is not None and seen.uuid == record.uuid else None
        if observed is record.state:
            continue
        with _claim(node, record.name, holding) as ours:
            if ours:
                _refresh(node, record.id, done)
    _settle_migrations(node, holding, done)
    _sweep_overlays(node, {d.instance_id for d in domains if d.instance_id}, done)
    for line in vtpm.settle_all(node, holding) + vtpm.drop_stale_secrets(node, holding):
        _note(done, line)
    known = {r.id for r in records}
    for d in domains:
        if d.instance_id and d.instance_id not in known and node.store.by_id(d.instance_id) is None:
            # Another store's instance on the same libvirtd: worth a line, not a warning on every launch.
            _note(done, f"libvirt domain {d.name} carries tvorch instance {d.instance_id}, "
                        "unknown to this store; left alone", quiet=True)
    return done


def reconcile_name(node: Node, name: str) -> list[str]:
    """Launch's reconciliation: NAME's own record only, under NAME's lock (the caller holds it).

    A launch must find an interrupted launch of its name settled and a record
    whose domain vanished marked failed, so that a retry by name works; it
    leaves every other instance to `reconcile`, `list` and the daemon, so its
    cost does not grow with the number of instances on the node.
    """
    done: list[str] = []
    record = node.store.find_live(name)
    if record is None or record.state in _ENDED:
        return done
    if record.state is InstanceState.LAUNCHING:
        _settle_launch(node, record.id, done)
        return done
    _refresh(node, record.id, done)
    record = node.store.by_id(record.id)
    if record is not None and record.state not in _ENDED:
        line = vtpm.settle(node, record)  # a restore a crash interrupted, or its staged state left
        if line:
            done.append(line)
    return done


def _settle_migrations(node: Node, holding: str | None, done: list[str]) -> None:
    """Migrations whose `tvorch migrate` or `migrate-in` is gone (their name's lock is free): the instance
    belongs to the node that runs it (service.migrate.settle, service.migrate_in.settle)."""
    from . import migrate, migrate_in

    for migration in node.store.migrations():
        record = node.store.by_id(migration["instance_id"])
        if record is None or migration["direction"] not in ("in", "out"):
            continue
        with _claim(node, record.name, holding) as ours:
            if not ours:
                continue
            try:
                line = (migrate_in.settle if migration["direction"] == "in" else migrate.settle)(node, migration)
            except TvorchError as err:
                line = f"warning: {record.name}: its migration could not be settled: {err}"
            if line:
                _note(done, line)


@contextmanager
def _claim(node: Node, name: str, holding: str | None) -> Iterator[bool]:
    """Whether we may change NAME's record now: its lock is ours already or free at once."""
    if name == holding:
        yield True
        return
    with try_instance_lock(Path(node.cfg.state_dir), name) as got:
        yield got


def _note(done: list[str], line: str, quiet: bool = False) -> None:
    done.append(line)
    if quiet:
        log.info("reconciled", action=line)
    else:
        log.warning("reconciled", action=line)


def _settle_launch(node: Node, instance_id: str, done: list[str]) -> None:
    """Adopt or undo a launch whose launcher is gone (the caller holds its name's lock)."""
    record = node.store.by_id(instance_id)
    if record is None or record.state is not InstanceState.LAUNCHING:
        return  # it finished between the listing and the lock
    hv = node.hypervisor
    owned = owns_domain(node, record)
    live = hv.state(record.name) if owned else None
    if live is not None and (live in _ACTIVE or node.store.last_hook_operation(record.id, ("started begin",))):
        node.store.update_instance(
            record.id, state=live,
            event=("launch-adopted", f"the launcher died after libvirt started the domain; libvirt reports {live.value}"),
        )
        _note(done, f"{record.name}: adopted the interrupted launch of {record.id} (libvirt reports {live.value})")
        return
    undone: list[str] = []
    try:
        if owned:
            # As a failed launch: the vTPM state never held a running guest's secrets, so it goes too.
            hv.power_off(record.name)
            hv.undefine(record.name, purge_tpm=True)
            undone.append(f"domain {record.uuid} undefined with its vTPM state")
        if vtpm.remove_state(node, record):
            undone.append(f"vTPM state of {record.uuid} removed")
        if os.path.lexists(record.overlay):
            imagefiles.remove_overlay(record.overlay)
            undone.append(f"overlay {record.overlay} removed")
    except TvorchError as err:
        # Still `launching`: the next reconciliation tries again.
        _note(done, f"warning: {record.name}: cannot roll back the interrupted launch of {record.id} yet: {err}")
        return
    detail = "the launcher died; " + ("; ".join(undone) if undone else "no overlay or domain existed yet")
    node.store.update_instance(record.id, state=InstanceState.FAILED, error=INTERRUPTED,
                               event=("launch-interrupted", detail))
    _note(done, f"{record.name}: rolled back the interrupted launch of {record.id} ({detail}); "
                "the name can be launched again")


def _refresh(node: Node, instance_id: str, done: list[str]) -> None:
    """Take libvirt's word for one record, read afresh under its lock."""
    before = node.store.by_id(instance_id)
    if before is None:
        return
    after = refresh(node, before)
    if after.state is not before.state:
        why = after.error if after.state is InstanceState.FAILED else f"libvirt reports {after.state.value}"
        _note(done, f"{after.name}: {before.state.value} -> {after.state.value} ({why})",
              quiet=after.state is not InstanceState.FAILED)


def _sweep_overlays(node: Node, claimed: set[str], done: list[str]) -> None:
    """Remove overlays no live instance owns; CLAIMED: instance ids some libvirt domain carries."""
    directory = Path(node.cfg.overlay_dir)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        match = _OVERLAY.fullmatch(entry.name) or _OVERLAY_TMP.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        # Read afresh: a record is always committed before its overlay is created.
        record = node.store.by_id(match["id"])
        if record is None:
            # Another store's (a second config, a restored database) or a disk in use:
            # never delete what this store cannot account for.
            log.info("overlay_not_ours", path=entry.path, reason="instance unknown to this store; left alone")
            continue
        if record.state not in _ENDED or record.name != match["name"] or (
            record.state is InstanceState.FAILED and _ran(node, record)
        ):
            continue
        whose = f"{record.state.value} instance"
        if match["id"] in claimed:
            log.info("overlay_kept", path=entry.path, reason=f"a libvirt domain carries instance {match['id']}")
            continue
        try:
            imagefiles.remove_overlay(entry.path)
        except TvorchError as err:
            _note(done, f"warning: cannot remove orphan overlay: {err}")
            continue
        _note(done, f"removed orphan overlay {entry.path} ({whose} {match['id']})")


def _ran(node: Node, record: InstanceRecord) -> bool:
    """Whether a guest ran on the record's overlay: then it holds a tenant's data (a failed record
    whose domain was undefined behind tvorch's back), and only `tvorch destroy` may remove it."""
    return any(e.kind in ("started", "launch-adopted") for e in node.store.events(record.id))
