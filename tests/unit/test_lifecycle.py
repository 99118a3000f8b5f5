"""tvorch.core.launch.lifecycle: what libvirt's events mean for an instance's record."""

from __future__ import annotations

from tvorch.core.launch.instance import InstanceState
from tvorch.core.launch.lifecycle import LIVE_CHANGE, LifecycleEvent, interpret, is_boot


def test_a_live_change_moves_no_state_and_is_no_boot() -> None:
    """Issue #13: a hot-plug is recorded as it happens; the instance stays as it is."""
    change = LifecycleEvent("u", "vm1", LIVE_CHANGE, 0, "device ua-disk1 added while running")
    assert interpret(change.event, change.detail) == (None, "running configuration changed")
    assert not is_boot(change.event, change.detail)


def test_lifecycle_events_carry_no_change() -> None:
    event = LifecycleEvent("u", "vm1", 2, 0)
    assert event.change is None
    assert interpret(event.event, event.detail) == (InstanceState.RUNNING, "started: booted")
    assert is_boot(event.event, event.detail)


def test_a_migration_decides_incoming_and_migrated_records_not_libvirts_events() -> None:
    from tvorch.core.launch.instance import InstanceState
    from tvorch.core.launch.lifecycle import follows_libvirt

    assert not follows_libvirt(InstanceState.MIGRATED) and not follows_libvirt(InstanceState.INCOMING)
    assert all(follows_libvirt(s) for s in InstanceState if s not in (InstanceState.MIGRATED, InstanceState.INCOMING))
