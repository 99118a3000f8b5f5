"""What a libvirt lifecycle event means for an instance's record.

libvirt's event and detail numbers (virDomainEventType and its detail enums)
are stable ABI; they are spelled out here so the core needs no libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .instance import InstanceState

_STARTED, _SUSPENDED, _RESUMED, _STOPPED, _SHUTDOWN, _PMSUSPENDED, _CRASHED = 2, 3, 4, 5, 6, 7, 8
_STOPPED_DETAILS = {
    0: "shut down", 1: "destroyed (powered off)", 2: "crashed", 3: "migrated away",
    4: "saved", 5: "failed", 6: "reverted to a snapshot",
}
_STARTED_DETAILS = {0: "booted", 1: "migrated in", 2: "restored", 3: "reverted to a snapshot", 4: "woken up"}


@dataclass(frozen=True)
class LifecycleEvent:
    uuid: str
    name: str
    event: int
    detail: int
    # A change to the running configuration libvirt reported (a device added or removed, the
    # balloon set ...), in words; EVENT and DETAIL are then LIVE_CHANGE and 0. The hook never sees
    # these, so they are recorded as they happen; `tvorch attest` compares the whole live configuration.
    change: str | None = None


LIVE_CHANGE = -1  # not a virDomainEventType: the event of a LifecycleEvent that carries a change


def interpret(event: int, detail: int) -> tuple[InstanceState | None, str]:
    """The state the record should move to (None: no change) and why, in words."""
    if event == _STARTED:
        return InstanceState.RUNNING, f"started: {_STARTED_DETAILS.get(detail, 'started')}"
    if event == _RESUMED:
        return InstanceState.RUNNING, "resumed"
    if event in (_SUSPENDED, _PMSUSPENDED):
        return InstanceState.PAUSED, "paused"
    if event == _STOPPED:
        why = _STOPPED_DETAILS.get(detail, "stopped")
        return (InstanceState.CRASHED if detail == 2 else InstanceState.STOPPED), f"stopped: {why}"
    if event == _CRASHED:
        return InstanceState.CRASHED, "guest crashed (panic)"
    if event == _SHUTDOWN:
        return None, "guest is shutting down"
    if event == LIVE_CHANGE:
        return None, "running configuration changed"
    return None, f"libvirt event {event}/{detail}"


def follows_libvirt(state: InstanceState) -> bool:
    """Whether libvirt's events move a record in STATE: not while a live migration decides it (an incoming
    instance, which becomes running when the migration records its arrival, or dropped; a tombstone, whose
    domain runs on another node and whose "stopped: migrated away" may arrive after it was left)."""
    return state not in (InstanceState.INCOMING, InstanceState.MIGRATED)


def is_boot(event: int, detail: int) -> bool:
    """A fresh boot of the guest (not a restore, a migration or a wakeup): its firmware measures anew."""
    return event == _STARTED and detail == 0
