import multiprocessing
import sqlite3
import stat

import pytest

from tvorch.adapters.store import SCHEMA_VERSION, Store
from tvorch.core.launch.instance import InstanceRecord, InstanceState
from tvorch.core.timestamps import utc_now
from tvorch.errors import ConflictError, NotFoundError, StoreError


def record(name="vm1", id_="i-000000000001", uuid="00000000-0000-0000-0000-000000000001"):
    now = utc_now()
    return InstanceRecord(
        id=id_, name=name, uuid=uuid, image="/img.qcow2", overlay="/ov.qcow2", console_log="/log",
        state=InstanceState.LAUNCHING, virt_type="qemu", domain_xml="<domain/>", created_at=now, updated_at=now,
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state" / "tvorch.db")
    yield s
    s.close()


def test_new_store_is_private_and_migrated(tmp_path, store):
    assert store.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "tvorch.db").stat().st_mode) == 0o600
    mode = sqlite3.connect(tmp_path / "state" / "tvorch.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_create_update_and_events(store):
    store.create_instance(record())
    updated = store.update_instance("i-000000000001", state=InstanceState.RUNNING, event=("started", "x"))
    assert updated.state is InstanceState.RUNNING
    assert store.get_live("vm1").state is InstanceState.RUNNING
    assert [e.kind for e in store.events("i-000000000001")] == ["created", "started"]


def test_live_name_is_unique_but_reusable_after_destroy(store):
    store.create_instance(record())
    with pytest.raises(ConflictError, match="'vm1' already exists"):
        store.create_instance(record(id_="i-2", uuid="u2"))
    store.update_instance("i-000000000001", state=InstanceState.DESTROYED)
    store.create_instance(record(id_="i-2", uuid="u2"))
    assert store.get_live("vm1").id == "i-2"
    assert len(store.list_instances(include_destroyed=True)) == 2
    assert [r.id for r in store.list_instances()] == ["i-2"]


def test_unknown_names_and_ids(store):
    with pytest.raises(NotFoundError, match="no instance named 'x'"):
        store.get_live("x")
    with pytest.raises(NotFoundError):
        store.update_instance("i-nope", state=InstanceState.RUNNING)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(StoreError, match="newer than this tvorch"):
        Store(path)


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="unusable"):
        Store(path)


def _writer(path, n, worker):
    s = Store(path)
    for i in range(n):
        s.add_event("i-000000000001", "tick", f"{worker}-{i}")
    s.close()


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "db"
    s = Store(path)
    s.create_instance(record())
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, 50, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ticks = [e.detail for e in s.events("i-000000000001") if e.kind == "tick"]
    assert len(ticks) == 200 and len(set(ticks)) == 200
    s.close()


def test_a_second_connection_in_one_process_keeps_the_first_ones_locks(tmp_path):
    """The daemon opens a store per thread. Opening one must not close a descriptor of the
    database file: that drops every POSIX lock of the process on it, and another process
    closing its connection then checkpoints and deletes the WAL the first one still writes to,
    so its later commits are seen by nobody until it closes."""
    import subprocess
    import sys

    path = tmp_path / "tvorch.db"
    first = Store(path)
    first.daemon_heartbeat(1, "t", True, "first")
    second = Store(path)
    second.daemon_heartbeat(2, "t", True, "second")
    other = f"from pathlib import Path; from tvorch.adapters.store import Store; Store(Path({str(path)!r})).close()"
    subprocess.run([sys.executable, "-c", other], check=True)
    first.daemon_heartbeat(3, "t", True, "after another process came and went")
    reader = subprocess.run([sys.executable, "-c", other.replace(".close()", ".daemon_status().pid)").replace(
        "; Store(", "; print(Store(")], capture_output=True, text=True, check=True)
    assert reader.stdout.strip() == "3"
    first.close()
    second.close()


def test_guests_running_under_an_older_hook_keep_their_run(tmp_path, monkeypatch):
    """The migration that adds the hook's runs gives one to an instance whose last start operation was
    `started begin` (running, or stopped without a release the old hook saw), and none to the others."""
    from tvorch.adapters.store import database as store_module

    index = next(i for i, m in enumerate(store_module.MIGRATIONS) if "CREATE TABLE gate_runs" in m)
    path = tmp_path / "state" / "tvorch.db"
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:index])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", index)
    old = Store(path)
    for n, ops in ((1, ("prepare begin", "start begin", "started begin")), (2, ("started begin", "prepare begin"))):
        old.create_instance(record(f"vm{n}", f"i-00000000000{n}", f"00000000-0000-0000-0000-00000000000{n}"))
        for op in ops:
            old.add_hook_event(f"i-00000000000{n}", f"vm{n}", op, "allowed", ())
        old.add_hook_event(f"i-00000000000{n}", f"vm{n}", "reconnect begin", "allowed", ())
    old.close()
    monkeypatch.undo()
    s = Store(path)
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.run_open("i-000000000001") and not s.run_open("i-000000000002")
        assert s.close_run("i-000000000001", "vm1", "release end", "a" * 64, None)
        assert not s.run_open("i-000000000001") and [e.event for e in s.ledger("i-000000000001")] == ["stopped"]
    finally:
        s.close()


def test_a_baseline_records_its_source_and_older_rows_are_read_by_their_reason(store):
    store.create_instance(record())
    assert store.guest_baseline_source("i-000000000001") is None
    store.set_guest_baseline("i-000000000001", b"log", "first verified boot, matching the launch prediction",
                             "baseline-predicted", "predicted")
    assert store.guest_baseline_source("i-000000000001") == "predicted"
    with pytest.raises(ValueError, match="not one of"):
        store.set_guest_baseline("i-000000000001", b"log", "x", "baseline-learned", "trusted")
    # A row from before the source column: what its reason says.
    for reason, source in (("first verified boot", "learned"), ("accepted by root: kernel update", "accepted")):
        with store._write() as db:
            db.execute("UPDATE guest_baselines SET source = NULL, reason = ?", (reason,))
        assert store.guest_baseline_source("i-000000000001") == source
