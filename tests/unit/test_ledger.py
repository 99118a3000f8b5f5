"""The vTPM ledger's hash chain (tvorch.core.vtpm.ledger) and its appends in the store.

The rollback check trusts the last entry, so the chain must expose any edit,
removal or reordering, and concurrent appenders (the hook runs once per
libvirt operation, possibly in parallel) must never fork or lose a link.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path

import pytest

from tvorch.adapters.store import Store
from tvorch.core.launch.instance import InstanceRecord, InstanceState
from tvorch.core.vtpm.ledger import GENESIS, LedgerEntry, broken_link, chain_entry
from tvorch.core.timestamps import utc_now

INSTANCE = "i-000000000001"


def chain(n: int, instance_id: str = INSTANCE) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for seq in range(n):
        prev = entries[-1].entry_hash if entries else None
        entries.append(chain_entry(instance_id, seq, f"2026-01-01T00:00:0{seq}.000+00:00", "stopped",
                                   f"{seq:064x}", prev))
    return entries


def test_first_entry_links_to_genesis_and_each_next_to_its_predecessor() -> None:
    entries = chain(3)
    assert entries[0].prev_hash == GENESIS == "0" * 64
    assert entries[1].prev_hash == entries[0].entry_hash
    assert entries[2].prev_hash == entries[1].entry_hash
    assert len({e.entry_hash for e in entries}) == 3


def test_entry_hash_covers_every_field() -> None:
    base = chain_entry(INSTANCE, 0, "t", "stopped", "a" * 64, None)
    variants = [
        chain_entry("i-other", 0, "t", "stopped", "a" * 64, None),
        chain_entry(INSTANCE, 1, "t", "stopped", "a" * 64, None),
        chain_entry(INSTANCE, 0, "t2", "stopped", "a" * 64, None),
        chain_entry(INSTANCE, 0, "t", "released", "a" * 64, None),
        chain_entry(INSTANCE, 0, "t", "stopped", "b" * 64, None),
        chain_entry(INSTANCE, 0, "t", "stopped", "a" * 64, "1" * 64),
    ]
    assert all(v.entry_hash != base.entry_hash for v in variants)


def test_clean_chain_has_no_broken_link() -> None:
    assert broken_link(chain(5)) is None
    assert broken_link([]) is None


def test_edited_digest_is_found() -> None:
    entries = chain(4)
    entries[2] = dataclasses.replace(entries[2], state_digest="f" * 64)
    assert broken_link(entries) == 2


def test_edited_digest_with_its_own_hash_recomputed_breaks_the_next_link() -> None:
    """An editor who fixes up the edited entry's hash still cannot fix its successor's link."""
    entries = chain(4)
    e = entries[1]
    entries[1] = chain_entry(e.instance_id, e.seq, e.at, e.event, "f" * 64, e.prev_hash)
    assert broken_link(entries) == 2


def test_removed_entry_is_found() -> None:
    entries = chain(4)
    del entries[1]
    assert broken_link(entries) == 2


def test_removed_last_entry_is_not_a_broken_link_but_a_shorter_chain() -> None:
    """Truncation at the end leaves a valid chain: the store's row count is what detects it."""
    assert broken_link(chain(4)[:3]) is None


def test_reordering_is_found() -> None:
    entries = chain(4)
    entries[1], entries[2] = entries[2], entries[1]
    assert broken_link(entries) == 2


def test_changed_prev_hash_is_found() -> None:
    entries = chain(4)
    entries[3] = dataclasses.replace(entries[3], prev_hash=GENESIS)
    assert broken_link(entries) == 3


def test_chain_not_starting_at_seq_zero_is_found() -> None:
    """A self-consistent chain whose numbering is off (entries dropped and re-chained) is still refused."""
    entries: list[LedgerEntry] = []
    for seq in (1, 2):
        entries.append(chain_entry(INSTANCE, seq, "t", "stopped", "a" * 64, entries[-1].entry_hash if entries else None))
    assert broken_link(entries) == 1


def test_entry_from_another_instance_is_found() -> None:
    entries = chain(3)
    entries[1] = chain(3, "i-other")[1]
    assert broken_link(entries) == 1


# -- the store ----------------------------------------------------------------


def _record() -> InstanceRecord:
    now = utc_now()
    return InstanceRecord(
        id=INSTANCE, name="vm1", uuid="00000000-0000-0000-0000-000000000001", image="/img.qcow2",
        overlay="/ov.qcow2", console_log="/log", state=InstanceState.RUNNING, virt_type="qemu",
        domain_xml="<domain/>", created_at=now, updated_at=now,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "state" / "tvorch.db")
    s.create_instance(_record())
    yield s
    s.close()


def test_store_appends_a_chain(store: Store) -> None:
    first = store.append_ledger(INSTANCE, "stopped", "a" * 64)
    second = store.append_ledger(INSTANCE, "stopped", "b" * 64)
    assert (first.seq, first.prev_hash) == (0, GENESIS)
    assert (second.seq, second.prev_hash) == (1, first.entry_hash)
    assert store.ledger(INSTANCE) == [first, second]
    assert store.last_ledger_entry(INSTANCE) == second
    assert broken_link(store.ledger(INSTANCE)) is None


def test_store_ledger_of_unknown_instance_is_empty(store: Store) -> None:
    assert store.ledger("i-nope") == []
    assert store.last_ledger_entry("i-nope") is None


def _appender(path: Path, worker: int, n: int) -> None:
    s = Store(path)
    for i in range(n):
        s.append_ledger(INSTANCE, "stopped", f"{worker:032x}{i:032x}")
    s.close()


def test_concurrent_appends_from_four_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "state" / "tvorch.db"
    s = Store(path)
    s.create_instance(_record())
    s.close()  # no connection of ours is inherited by the forked writers
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = Store(path)
    try:
        entries = s.ledger(INSTANCE)
    finally:
        s.close()
    assert [e.seq for e in entries] == list(range(100))
    assert len({e.state_digest for e in entries}) == 100  # nothing lost, nothing written twice
    assert broken_link(entries) is None
