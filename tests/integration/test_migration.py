"""Live migration of a sealed-vTPM VM between two tvorch nodes of one fleet (issue #18).

Node A is this host's libvirtd, node B the second libvirtd of
scripts/two-nodes.sh (tests/integration/nodes.py): each a whole tvorch node
with its own store, node CA under one fleet root, and simulated host TPM. One
guest, launched on A, is moved back and forth: the tests run in order, each
finding it where the one before left it (`_where`).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tvorch.adapters import boot_files

from .conftest import PREFIX
from .guest import parse_report
from .nodes import Node, fleet_fixture, node_a_fixture, node_b_fixture  # noqa: F401

pytestmark = pytest.mark.integration


def _via(node: Node) -> str:
    """How the other node runs this node's tvorch: B's own prefix enters B's namespaces; from inside B,
    A's namespaces are this test process's."""
    if node.name == "a":
        return shlex.join(["nsenter", "-t", str(os.getpid()), "-m", "-u", "--", *node.command()])
    return shlex.join(node.command())


def _ports() -> tuple[str, str]:
    """QEMU's and the disk copy's ports: below the ephemeral range (32768-60999 here), where a local client's
    outgoing port can hold 127.0.0.1:PORT and leave QEMU listening on IPv6 only."""
    port = 20000 + 2 * secrets.randbelow(5000)
    return f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"


def migrate(src: Node, dest: Node, name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    migrate_uri, disks_uri = _ports()
    return src.run("migrate", name, dest.peer_uri, "--via", _via(dest), "--migrate-uri", migrate_uri,
                   "--disks-uri", disks_uri, *extra, check=check)


def _running(node: Node) -> set[str]:
    out = subprocess.run(["virsh", "-c", node.uri, "list", "--name"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def _defined(node: Node) -> set[str]:
    out = subprocess.run(["virsh", "-c", node.uri, "list", "--all", "--name"], capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


class Guest:
    def __init__(self, name: str, record: dict) -> None:
        self.name, self.record = name, record
        self.log = Path(record["console_log"])

    def report_after(self, offset: int, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace") if self.log.exists() else ""
            if "TVORCH-GUEST: ready" in text:
                return parse_report(text)
            time.sleep(1)
        raise AssertionError(f"{self.name} did not report ready again")


@pytest.fixture(scope="module")
def guest(node_a: Node, node_b: Node, guest_dir: Path):
    name = f"{PREFIX}mig-{secrets.token_hex(2)}"
    record = node_a.json("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "512")
    g = Guest(name, record)
    g.first = g.report_after(0)  # type: ignore[attr-defined]
    yield g
    for node in (node_a, node_b):
        node.run("destroy", "--purge-vtpm", name, check=False)


def _where(node_a: Node, node_b: Node, name: str) -> tuple[Node, Node]:
    """(the node running NAME, the other): exactly one runs it."""
    on_a, on_b = name in _running(node_a), name in _running(node_b)
    assert on_a != on_b, f"{name} runs on {'both nodes' if on_a else 'neither node'}"
    return (node_a, node_b) if on_a else (node_b, node_a)


def _ledger(node: Node, name: str) -> dict:
    return node.json("vtpm", "ledger", name)


def test_moves_to_b_with_its_vtpm_and_records_then_back(node_a: Node, node_b: Node, guest: Guest, fleet,
                                                         tmp_path: Path):
    name = guest.name
    before = node_a.json("show", name)
    manifest = node_a.run("manifest", "show", name).stdout
    ek_pem = node_a.run("vtpm", "ek", name, "--pem").stdout
    old_xml = subprocess.run(["virsh", "-c", node_a.uri, "dumpxml", "--inactive", name], capture_output=True,
                             text=True, check=True).stdout
    ledger_before = _ledger(node_a, name)["entries"]
    done = json.loads(migrate(node_a, node_b, name, "--json").stdout)
    assert done["destination"] == node_b.peer_uri
    assert name in _running(node_b) and name not in _defined(node_a)

    # Attested on B, the guest's evidence verifies under the fleet root alone: its vTPM (the EK A's node
    # certified, the PCRs of the boot on A) came along, and the bundle carries the signed path from A to B.
    nonce = secrets.token_hex(16)
    bundle = tmp_path / "on-b.json"
    node_b.run("attest", name, "--nonce", nonce, "--out", str(bundle), "--timeout", "120")
    checked = node_b.run("verify", str(bundle), "--ca", str(fleet.root), "--nonce", nonce, "--json", check=False)
    report = json.loads(checked.stdout)
    assert checked.returncode == 0, [c for c in report["checks"] if c["result"] == "fail"]
    assert json.loads(bundle.read_text())["vtpm"]["ek_cert_pem"] == ek_pem
    assert "migrated 1 time(s) to this node" in json.dumps(report)

    # B has the instance, its manifest and its vTPM record; A only a tombstone.
    shown = node_b.json("show", name)
    assert (shown["id"], shown["uuid"], shown["state"]) == (before["id"], before["uuid"], "running")
    assert node_b.run("manifest", "show", name).stdout == manifest
    gone = node_a.run("show", name, check=False)
    assert gone.returncode == 5 and "migrated to" in gone.stderr, gone.stderr
    assert node_a.run("start", name, check=False).returncode == 5
    # The definition put back on A behind tvorch's back: A's hook refuses to start a second copy.
    xml_file = Path(f"/var/tmp/{name}-old.xml")
    xml_file.write_text(old_xml)
    try:
        subprocess.run(["virsh", "-c", node_a.uri, "define", str(xml_file)], capture_output=True, check=True)
        clone = subprocess.run(["virsh", "-c", node_a.uri, "start", name], capture_output=True, text=True)
        assert clone.returncode != 0 and "migrated to another node" in clone.stderr, clone.stderr
        assert name not in _running(node_a)
    finally:
        subprocess.run(["virsh", "-c", node_a.uri, "undefine", "--nvram", "--keep-tpm", name], capture_output=True)
        xml_file.unlink()

    # The ledger continues across the nodes: A's entries, A's migrated-out, B's migrated-in; both signed.
    ledger = _ledger(node_b, name)
    events = [e["event"] for e in ledger["entries"]]
    assert events[:len(ledger_before)] == [e["event"] for e in ledger_before]
    assert events[len(ledger_before):] == ["migrated-out", "migrated-in"]
    assert ledger["intact"] is True and ledger["handoffs_verified"] is True, ledger

    # Stopped and started on B: the key B sealed to its own TPM opens the state, whose NV kept the
    # marker the first boot on A stored, and whose EK is the one A's node CA certified.
    size = guest.log.stat().st_size
    node_b.run("stop", name)
    node_b.run("start", name)
    report = guest.report_after(size)
    assert report.nv == ("found", guest.first.nv.value), report.nv  # type: ignore[attr-defined]
    assert report.ek_cert == guest.first.ek_cert  # type: ignore[attr-defined]
    assert [e["event"] for e in _ledger(node_b, name)["entries"]][-1] == "stopped"

    # And back to A, which takes it in over its own tombstone.
    migrate(node_b, node_a, name)
    assert name in _running(node_a) and name not in _defined(node_b)
    assert node_a.json("show", name)["state"] == "running"
    ledger = _ledger(node_a, name)
    assert [e["event"] for e in ledger["entries"]][-2:] == ["migrated-out", "migrated-in"]
    assert ledger["intact"] is True and ledger["handoffs_verified"] is True, ledger
    assert node_b.run("show", name, check=False).returncode == 5


def _state_in_store(node: Node, name: str) -> str:
    import sqlite3

    db = sqlite3.connect(node.state_dir / "tvorch.db")
    try:
        row = db.execute("SELECT state FROM instances WHERE name = ? ORDER BY rowid DESC LIMIT 1", (name,)).fetchone()
        return row[0] if row else "absent"
    finally:
        db.close()


def test_the_sources_daemon_keeps_the_tombstone(node_a: Node, node_b: Node, guest: Guest, tmp_path: Path):
    """`tvorch serve` on the source sees libvirt's "stopped: migrated away" while (or after) tvorch leaves the
    tombstone: the event is recorded, the tombstone stays (a `stopped` record would be startable here)."""
    from .test_daemon import start_daemon, stop_daemon

    src, dest = _where(node_a, node_b, guest.name)
    if src is not node_a:
        migrate(src, dest, guest.name)
        src, dest = dest, src
    proc, _ = start_daemon(src, tmp_path, src.config)  # type: ignore[arg-type]
    try:
        # Held still until the tombstone is left, so that it handles libvirt's events after it.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            migrate(src, dest, guest.name)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not any("migrated away" in e["detail"] for e in _events(src, guest.name)):
            assert time.monotonic() < deadline, _events(src, guest.name)
            time.sleep(0.3)
        time.sleep(1)
        assert _state_in_store(src, guest.name) == "migrated"
    finally:
        assert stop_daemon(proc) == 0
    assert src.run("start", guest.name, check=False).returncode == 5


def _events(node: Node, name: str) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(node.state_dir / "tvorch.db")
    try:
        rows = db.execute("SELECT e.kind, e.detail FROM instance_events e JOIN instances i ON i.id = e.instance_id "
                          "WHERE i.name = ? ORDER BY e.seq", (name,)).fetchall()
        return [{"kind": k, "detail": d} for k, d in rows]
    finally:
        db.close()


def test_destination_refuses_a_changed_image_layer(node_a: Node, node_b: Node, guest: Guest, guest_dir: Path,
                                                    tmp_path: Path):
    src, dest = _where(node_a, node_b, guest.name)
    base = guest_dir / "guest.qcow2"
    changed = Path(f"/var/tmp/{PREFIX}changed-{secrets.token_hex(2)}.qcow2")
    shutil.copyfile(base, changed)
    with changed.open("r+b") as f:
        f.seek(changed.stat().st_size - 1)
        f.write(b"\x01")
    try:
        dest.sh(f"mount --bind {changed} {base}")
        proc = migrate(src, dest, guest.name, check=False)
    finally:
        dest.sh(f"umount {base}", check=False)
        changed.unlink()
    assert proc.returncode == 12, proc.stderr
    assert "image layer" in proc.stderr and str(base) in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _where(node_a, node_b, guest.name)[0] is src
    assert guest.name not in _defined(dest)
    assert dest.run("show", guest.name, check=False).returncode == 5
    assert src.json("show", guest.name)["state"] == "running"


def test_destination_outside_the_fleet_is_refused(node_a: Node, node_b: Node, guest: Guest, tmp_path: Path):
    from .nodes import Fleet

    other = Fleet.make(tmp_path / "other-fleet", "tvtest Other")
    src, dest = _where(node_a, node_b, guest.name)
    proc = migrate(src, dest, guest.name, "--ca", str(other.root), check=False)
    assert proc.returncode == 12 and "is not a node under" in proc.stderr, proc.stderr
    assert _where(node_a, node_b, guest.name)[0] is src
    assert dest.run("show", guest.name, check=False).returncode == 5


def test_a_failing_host_verdict_refuses(node_a: Node, node_b: Node, guest: Guest):
    """The source that requires it refuses before anything moves; a destination whose own policy requires it
    refuses at libvirt's `migrate begin`, and the source gets its reason."""
    from tvorch.core.attestation.ima import ima_ng_entry

    src, dest = _where(node_a, node_b, guest.name)
    src_text, dest_text = src.config.read_text(), dest.config.read_text()
    dest.host.measure(ima_ng_entry("/usr/bin/tvtest-unknown", os.urandom(32)))
    try:
        src.config.write_text(src_text + '[policy]\nhost_verdict = "require"\n')
        proc = migrate(src, dest, guest.name, check=False)
        assert proc.returncode == 12 and "host attestation failed" in proc.stderr, proc.stderr
        assert "tvtest-unknown" in proc.stderr
        assert _where(node_a, node_b, guest.name)[0] is src
        src.config.write_text(src_text)
        dest.config.write_text(dest_text + '[policy]\nhost_verdict = "require"\n')
        proc = migrate(src, dest, guest.name, check=False)
        assert proc.returncode == 12 and "refused by the destination's hook" in proc.stderr, proc.stderr
        assert "host attestation failed" in proc.stderr
        assert _where(node_a, node_b, guest.name)[0] is src
        assert guest.name not in _defined(dest) and dest.run("show", guest.name, check=False).returncode == 5
    finally:
        src.config.write_text(src_text)
        dest.config.write_text(dest_text)
        # B's host is healthy again for what follows: its policy learns the new program.
        dest.run("host", "baseline", "--out", str(dest.host.root / "host-policy.json"))
        assert dest.json("host", "attest")["passed"] is True


def _migrate_in_done(timeout: float = 60.0) -> None:
    """Wait until no `tvorch migrate-in` runs (the destination settles its side when it loses the source)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["pgrep", "-f", "tvorch.cli migrate-in"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the destination's migrate-in did not finish"
        time.sleep(0.2)


def _key_rows(node: Node, instance_id: str) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(node.state_dir / "tvorch.db")
    try:
        return db.execute("SELECT sealed_key IS NOT NULL, escrow_key IS NOT NULL FROM vtpms WHERE instance_id = ?",
                          (instance_id,)).fetchall()
    finally:
        db.close()


def _one_copy(node_a: Node, node_b: Node, guest: Guest, expected: Node) -> None:
    """Exactly EXPECTED runs it and holds its records and a usable key; the other has no domain and no key."""
    runner, other = _where(node_a, node_b, guest.name)
    assert runner is expected
    shown = runner.json("show", guest.name)
    assert shown["state"] == "running"
    ledger = _ledger(runner, guest.name)
    assert ledger["intact"] is True and ledger["handoffs_verified"] in (True, None), ledger
    assert guest.name not in _defined(other)
    assert other.run("show", guest.name, check=False).returncode == 5
    assert _key_rows(runner, shown["id"]) == [(1, 1)]  # sealed here, and wrapped to the node's escrow key
    assert _key_rows(other, shown["id"]) in ([], [(0, 0)])


@pytest.mark.parametrize("step, moved", [
    ("migrate-offered", False),  # the destination proved itself; nothing sent
    ("migrate-journaled", False),  # the key unsealed, the journal written; nothing sent
    ("migrate-ready", False),  # the destination took the records and the key, libvirt not called
    ("migrate-migrated", True),  # libvirt moved the VM; the source's records not yet changed
    ("migrate-left", True),  # the tombstone is left; the destination not told
])
def test_killed_migrate_leaves_one_copy_that_reconcile_settles(node_a: Node, node_b: Node, guest: Guest, step: str,
                                                               moved: bool):
    src, dest = _where(node_a, node_b, guest.name)
    migrate_uri, disks_uri = _ports()
    proc = subprocess.run([*src.command(), "migrate", guest.name, dest.peer_uri, "--via", _via(dest),
                           "--migrate-uri", migrate_uri, "--disks-uri", disks_uri],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TVORCH_CRASH_AT": step})
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr)
    _migrate_in_done()
    for node in (src, dest):
        node.run("reconcile")
    _one_copy(node_a, node_b, guest, dest if moved else src)


@pytest.mark.parametrize("step, moved", [
    ("migrate-in-taken", False),  # the records and the key stored as incoming; nothing made yet
    ("migrate-in-ready", True),  # everything ready and the key lent: libvirt migrates without it
])
def test_killed_destination_leaves_one_copy_that_reconcile_settles(node_a: Node, node_b: Node, guest: Guest,
                                                                   step: str, moved: bool):
    src, dest = _where(node_a, node_b, guest.name)
    migrate_uri, disks_uri = _ports()
    via = shlex.join(["env", f"TVORCH_CRASH_AT={step}", *shlex.split(_via(dest))])
    proc = src.run("migrate", guest.name, dest.peer_uri, "--via", via, "--migrate-uri", migrate_uri,
                   "--disks-uri", disks_uri, check=False)
    if moved:  # the source finished: the destination's side is settled by its reconcile
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 12 and "destination" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for node in (src, dest):
        node.run("reconcile")
    _one_copy(node_a, node_b, guest, dest if moved else src)
    secrets_left = subprocess.run(["virsh", "-c", dest.uri, "secret-list"], capture_output=True, text=True).stdout
    assert "vtpm" not in secrets_left.split("----")[-1], secrets_left


def test_reconcile_during_a_migration_leaves_it_to_finish(node_a: Node, node_b: Node, guest: Guest):
    """The destination's migrate-in is gone but libvirt still moves the VM (slowly): its reconcile must not
    adopt or drop a VM that is still arriving; once it has arrived, reconcile adopts it."""
    src, dest = _where(node_a, node_b, guest.name)
    migrate_uri, disks_uri = _ports()
    via = shlex.join(["env", "TVORCH_CRASH_AT=migrate-in-ready", *shlex.split(_via(dest))])
    running = subprocess.Popen([*src.command(), "migrate", guest.name, dest.peer_uri, "--via", via,
                                "--migrate-uri", migrate_uri, "--disks-uri", disks_uri, "--bandwidth", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the VM is on its way: paused on the destination by the incoming migration
            state = subprocess.run(["virsh", "-c", dest.uri, "domstate", "--reason", guest.name],
                                   capture_output=True, text=True).stdout
            if "migrating" in state:
                break
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the migration never reached the destination"
            time.sleep(0.2)
        settled = dest.run("reconcile")
        said = settled.stdout + settled.stderr
        assert "still arriving" in said, said
        assert _state_in_store(dest, guest.name) == "incoming"
        _, err = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, err
    for node in (src, dest):
        node.run("reconcile")
    _one_copy(node_a, node_b, guest, dest)


def test_destination_libvirtd_killed_mid_migration(node_a: Node, node_b: Node, guest: Guest):
    """B's libvirtd dies while the VM's memory is on its way: the source keeps running it; once B's libvirtd is
    back, reconcile on both leaves nothing of it on B."""
    src, dest = _where(node_a, node_b, guest.name)
    if dest is node_a:  # B's libvirtd must be the destination's: bring the guest home first
        migrate(src, dest, guest.name)
        src, dest = dest, src
    migrate_uri, disks_uri = _ports()
    running = subprocess.Popen([*src.command(), "migrate", guest.name, dest.peer_uri, "--via", _via(dest),
                                "--migrate-uri", migrate_uri, "--disks-uri", disks_uri, "--bandwidth", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until libvirt's migration job is under way on the source
            job = subprocess.run(["virsh", "-c", src.uri, "domjobinfo", guest.name], capture_output=True, text=True)
            if "Unbounded" in job.stdout:
                break
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the migration never started"
            time.sleep(0.2)
        time.sleep(1)
        b_dir = Path(dest.prefix[2])
        pid = int((b_dir / "libvirtd.pid").read_text())
        os.kill(pid, 9)
        _, err = running.communicate(timeout=300)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 7 and len(err.strip().splitlines()) == 1, err
    assert "libvirt did not migrate" in err, err
    _migrate_in_done()
    dest.sh(f"libvirtd -d -p {b_dir / 'libvirtd.pid'}")
    deadline = time.monotonic() + 30
    while subprocess.run(["virsh", "-c", dest.uri, "version"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "B's libvirtd did not come back"
        time.sleep(0.2)
    for node in (src, dest):
        node.run("reconcile")
    _one_copy(node_a, node_b, guest, src)
    # And it still moves once B is whole again.
    migrate(src, dest, guest.name)
    _one_copy(node_a, node_b, guest, dest)


def test_bad_requests_are_one_line_and_move_nothing(node_a: Node, node_b: Node, guest: Guest):
    src, dest = _where(node_a, node_b, guest.name)
    cases = [
        (("tvtest-no-such", dest.peer_uri, "--via", _via(dest)), 5, "no instance named"),
        ((guest.name, "qemu:///system"), 2, "names no host"),
        ((guest.name, dest.peer_uri, "--via", "false"), 12, "refused"),  # the destination's side never answers
        ((guest.name, dest.peer_uri, "--via", _via(dest), "--ca", "/nonexistent.pem"), 3, "cannot read the CA"),
    ]
    for args, code, words in cases:
        proc = src.run("migrate", *args, check=False)
        assert proc.returncode == code and words in proc.stderr, (args, proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _where(node_a, node_b, guest.name)[0] is src
    assert src.json("show", guest.name)["state"] == "running"
    assert dest.run("show", guest.name, check=False).returncode == 5


def test_a_direct_boot_instance_moves_with_its_boot_files(node_a: Node, node_b: Node, guest_dir: Path):
    """B boots root's read-only copies of the kernel and initrd like A: it makes its own from its files at the
    paths A's launch copied them from (they must have the manifest's digests)."""
    name = f"{PREFIX}mig-direct-{secrets.token_hex(2)}"
    record = node_a.json("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "256",
                         "--firmware", "bios", "--kernel", str(guest_dir / "vmlinuz"), "--initrd",
                         str(guest_dir / "initrd.img"), "--cmdline", "console=ttyS0")
    try:
        Guest(name, record).report_after(0)
        # A's copies, aged past the grace that keeps a launch's files while it is in flight.
        on_a = subprocess.run(["virsh", "-c", node_a.uri, "dumpxml", name], capture_output=True, text=True,
                              check=True).stdout
        staged = boot_files.source_dir(str(node_a.cfg.state_dir))
        copies = [staged / on_a.split(f"<{tag}>")[1].split(f"</{tag}>")[0].rsplit("/", 1)[1]
                  for tag in ("kernel", "initrd")]
        assert all(f.is_file() for f in copies)
        for f in copies:
            os.utime(f, (time.time() - 2 * boot_files.PRUNE_GRACE_S,) * 2)
        migrate(node_a, node_b, name)
        assert name in _running(node_b) and name not in _defined(node_a)
        assert not any(f.exists() for f in copies), "A kept the copies of a VM that left"
        booted = subprocess.run(["virsh", "-c", node_b.uri, "dumpxml", name], capture_output=True, text=True,
                                check=True).stdout
        view = node_b.cfg.boot_files_dir
        assert f"<kernel>{view}/" in booted
        # B's own read-only view, in B's namespace, holds the copy QEMU reads there.
        kernel = booted.split("<kernel>")[1].split("</kernel>")[0]
        assert node_b.sh(f"test -f {kernel} && ! touch {kernel} 2>/dev/null", check=False).returncode == 0
        ledger = _ledger(node_b, name)
        assert ledger["intact"] is True and ledger["handoffs_verified"] is True
    finally:
        for node in (node_a, node_b):
            node.run("destroy", "--purge-vtpm", name, check=False)
