"""Faults that must lose nothing: `tvorch launch` killed at each step, a full disk under the store.

The launch is killed with SIGKILL through tvorch's crash points (TVORCH_CRASH_AT,
tvorch/faults.py): no cleanup runs, as with `kill -9`. The next command
reconciles, and must leave no domain, overlay or vTPM state without a record and
no record without its parts. Only the "started" step boots a guest; nothing
waits for a guest to be ready.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tvorch.adapters.locks import instance_lock, is_held
from tvorch.adapters.store import Store
from tvorch.core.launch.instance import InstanceState
from tvorch.errors import StoreError

from .conftest import PREFIX, Tv, our_domains, require, virsh

pytestmark = pytest.mark.integration

SWTPM_STATE = Path("/var/lib/libvirt/swtpm")
BEFORE_DEFINE = ("measured", "recorded", "manufactured", "vtpm", "overlay")
NO_OVERLAY = ("measured", "recorded", "manufactured", "vtpm")


def crash(tv: Tv, step: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run tvorch with the crash point STEP armed."""
    env = {**os.environ, "TVORCH_CONFIG": str(tv.config), "TVORCH_CRASH_AT": step}
    return subprocess.run([sys.executable, "-m", "tvorch.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def crash_launch(tv: Tv, step: str, image: Path, name: str) -> None:
    proc = crash(tv, step, "launch", str(image), "--name", name, "--memory", "512")
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def overlays_of(tv: Tv, name: str) -> list[Path]:
    """NAME's overlays, and qemu-img's temporary files for them."""
    if not tv.overlay_dir.is_dir():
        return []
    return [p for p in tv.overlay_dir.iterdir() if p.name.lstrip(".").startswith(name + ".")]


def stored(tv: Tv, name: str):
    """NAME's newest record straight from the store (no reconciliation)."""
    store = Store(tv.state_dir / "tvorch.db")
    try:
        return store.find_live(name)
    finally:
        store.close()


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("tvorch: ")]


@pytest.mark.parametrize("step", [*BEFORE_DEFINE, "defined", "started"])
def test_launch_killed_at_each_step_loses_nothing(tv: Tv, guest_dir: Path, step: str):
    image = guest_dir / "guest.qcow2"
    name = f"{PREFIX}crash-{step}-{secrets.token_hex(2)}"
    try:
        crash_launch(tv, step, image, name)
        # The crash point is where it claims to be: what the launcher left behind.
        left = stored(tv, name)
        assert (left is None) == (step == "measured")
        assert left is None or left.state is InstanceState.LAUNCHING
        assert bool(overlays_of(tv, name)) == (step not in NO_OVERLAY)
        assert (name in our_domains()) == (step in ("defined", "started"))
        if left is not None:  # the vTPM state is made right after the record
            assert (SWTPM_STATE / left.uuid / "tpm2").is_dir() == (step not in ("measured", "recorded"))

        records = {r["name"]: r for r in tv.json("list")}  # the next command reconciles
        record = records.get(name)
        if step == "started":
            # libvirt runs it: the launch is adopted, with all its parts.
            assert record["state"] == "running" and record["error"] is None
            assert virsh("domuuid", name).stdout.strip() == record["uuid"]
            assert virsh("domstate", name).stdout.strip() == "running"
            assert Path(record["overlay"]).is_file()
            assert tv.run("manifest", "show", name).stdout
            assert "launch-adopted" in [e["kind"] for e in tv.json("show", name)["events"]]
            tv.run("destroy", "--purge-vtpm", name)
        else:
            assert name not in our_domains()
            assert overlays_of(tv, name) == []
            if step == "measured":
                assert record is None
            else:
                assert record["state"] == "failed" and record["error"] == "launch interrupted"
                assert not (SWTPM_STATE / record["uuid"]).exists()
                assert "launch-interrupted" in [e["kind"] for e in tv.json("show", name)["events"]]
        assert not is_held(tv.state_dir, name)

        again = tv.launch(image, name)  # the user retries by name
        assert again["state"] == "running" and again["id"] != (record or {}).get("id")
        assert virsh("domuuid", name).stdout.strip() == again["uuid"]
    finally:
        tv.destroy(name)
    assert name not in our_domains() and overlays_of(tv, name) == []


def test_reconcile_leaves_a_launch_in_progress_alone(tv: Tv, guest_dir: Path):
    """A `launching` record whose name lock is held is a launch in progress, whoever looks."""
    name = f"{PREFIX}busy-{secrets.token_hex(2)}"
    try:
        crash_launch(tv, "overlay", guest_dir / "guest.qcow2", name)
        overlays = overlays_of(tv, name)
        assert len(overlays) == 1
        with instance_lock(tv.state_dir, name):  # as a launcher still at work would
            assert is_held(tv.state_dir, name)
            lines = tv.json("reconcile")
            assert not [line for line in lines if name in line]
            assert [r["state"] for r in tv.json("list") if r["name"] == name] == ["launching"]
            assert overlays_of(tv, name) == overlays
        lines = tv.json("reconcile")
        assert [line for line in lines if name in line and "rolled back" in line], lines
        assert [r["state"] for r in tv.json("list") if r["name"] == name] == ["failed"]
        assert overlays_of(tv, name) == []
    finally:
        tv.destroy(name)


def test_launch_settles_its_own_name_only(tv: Tv, guest_dir: Path):
    """A retry by name settles that name's interrupted launch itself; another name's is left to reconcile.

    So a launch costs the same however many instances the node holds
    (benchmarks/launch_scale.py).
    """
    image = guest_dir / "guest.qcow2"
    mine, other = (f"{PREFIX}own-{secrets.token_hex(2)}" for _ in range(2))
    try:
        crash_launch(tv, "overlay", image, mine)
        crash_launch(tv, "overlay", image, other)
        left = stored(tv, mine)
        assert left is not None and left.state is InstanceState.LAUNCHING
        again = tv.launch(image, mine)  # no `list` or `reconcile` in between
        assert again["state"] == "running" and again["id"] != left.id
        settled = Store(tv.state_dir / "tvorch.db")
        try:
            before = settled.by_id(left.id)
        finally:
            settled.close()
        # Rolled back as interrupted (then retired by the new launch, as a failed record of the name is).
        assert before is not None and before.error == "launch interrupted"
        untouched = stored(tv, other)
        assert untouched is not None and untouched.state is InstanceState.LAUNCHING
        assert len(overlays_of(tv, other)) == 1
        lines = tv.json("reconcile")
        assert [line for line in lines if other in line and "rolled back" in line], lines
        assert overlays_of(tv, other) == []
    finally:
        tv.destroy(mine)
        tv.destroy(other)


@pytest.fixture(scope="module")
def stopped_with_backup(tv: Tv, guest_dir: Path, tmp_path_factory) -> Iterator[tuple[str, dict, Path]]:
    """An instance whose guest ran, stopped, with a backup of its vTPM."""
    name = f"{PREFIX}restore-{secrets.token_hex(2)}"
    record = tv.launch(guest_dir / "guest.qcow2", name)
    tv.run("stop", "--force", name)
    backup = tmp_path_factory.mktemp("vtpm-backup") / "vtpm.tar"
    tv.run("vtpm", "backup", name, str(backup))
    yield name, record, backup
    tv.destroy(name)


@pytest.mark.parametrize("step", ["restore-staged", "restore-exchanged"])
def test_restore_killed_at_each_step_is_settled(tv: Tv, stopped_with_backup, step: str):
    """State, ledger and store agree again after a kill -9 in the middle of `vtpm restore`."""
    name, record, backup = stopped_with_backup
    tv.run("start", name)
    tv.run("stop", "--force", name)
    before = tv.json("vtpm", "show", name)
    assert before["state_matches_ledger"] and before["pending"] is None
    backed_up = tar_state_digest(backup)

    proc = crash(tv, step, "vtpm", "restore", name, str(backup))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    instance_dir = SWTPM_STATE / record["uuid"]
    store = Store(tv.state_dir / "tvorch.db")
    try:
        assert store.vtpm_pending(record["id"]) is not None  # the intent is on record
    finally:
        store.close()
    staged = [p.name for p in instance_dir.iterdir() if p.name.startswith("tpm2.staged-")]
    assert len(staged) == 1
    on_disk = tv_state_digest(instance_dir)
    assert on_disk == (before["state_digest"] if step == "restore-staged" else backed_up)

    lines = tv.json("reconcile")  # what `tvorch list`, `launch` and the daemon run too
    assert [line for line in lines if name in line and "restore" in line], lines
    after = tv.json("vtpm", "show", name)
    assert after["pending"] is None and after["state_matches_ledger"] and after["ledger_intact"]
    assert sorted(p.name for p in instance_dir.iterdir()) == ["tpm2"]
    assert after["state_digest"] == on_disk
    tv.run("start", name)  # the hook agrees
    tv.run("stop", "--force", name)


def tv_state_digest(instance_dir: Path) -> str | None:
    from tvorch.adapters.vtpm_state import state_digest

    return state_digest(instance_dir)


def tar_state_digest(backup: Path) -> str:
    import json
    import tarfile

    with tarfile.open(backup) as tar:
        member = tar.extractfile("tvorch-vtpm-backup.json")
        assert member is not None
        return json.loads(member.read())["header"]["state_digest"]


# -- a full disk under the store ------------------------------------------------


@contextmanager
def filled(mount: Path) -> Iterator[None]:
    """Fill the file system at MOUNT until ENOSPC for the block, then free it."""
    path = mount / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\0" * 65536
        try:
            while True:
                os.write(fd, chunk)  # a short write fills the last pages; the next one fails
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        assert os.statvfs(mount).f_bavail == 0
        yield
    finally:
        os.close(fd)
        path.unlink()


@pytest.fixture
def small_node(tv: Tv, guest_dir: Path, tmp_path: Path) -> Iterator[tuple[Tv, str]]:
    """A node whose state_dir is a 2 MiB tmpfs, holding one failed launch (record and manifest).

    Its own overlay_dir: reconciliation removes overlays this store does not know.
    """
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "root, to mount a tmpfs")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], check=True)
    small = Tv(config=tmp_path / "tvorch.toml", state_dir=mount / "state",
               overlay_dir=Path(f"/var/lib/libvirt/images/{PREFIX}full-{secrets.token_hex(3)}"), log_dir=tv.log_dir)
    text = tv.config.read_text()
    for key, old, new in (("state_dir", tv.state_dir, small.state_dir),
                          ("overlay_dir", tv.overlay_dir, small.overlay_dir)):
        assert f'{key} = "{old}"\n' in text
        text = text.replace(f'{key} = "{old}"\n', f'{key} = "{new}"\n')
    small.config.write_text(text)
    try:
        image = guest_dir / "guest.qcow2"
        small.run("image", "trust", str(image))
        # Killed once recorded: the store gets a record, a manifest, the node keys and warm digests.
        failed = f"{PREFIX}full-{secrets.token_hex(2)}"
        crash_launch(small, "recorded", image, failed)
        assert [r["state"] for r in small.json("list")] == ["failed"]
        yield small, failed
    finally:
        # Lazy: the mount goes even if a test left a file open on it.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
        shutil.rmtree(small.overlay_dir, ignore_errors=True)


def integrity(db: Path) -> str:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def test_disk_full_while_recording_a_launch(small_node: tuple[Tv, str], guest_dir: Path, tv: Tv, hook_for):
    small, failed = small_node
    db = small.state_dir / "tvorch.db"
    before = small.json("list")
    name = f"{PREFIX}full-{secrets.token_hex(2)}"
    # Held open across the fill: its -shm stays allocated, so tvorch can still open (and read) the store.
    holder = Store(db)
    try:
        with filled(db.parent.parent):
            proc = small.run("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "512", check=False)
            assert proc.returncode == 9, proc.stderr
            lines = error_lines(proc)
            assert len(lines) == 1 and "state database" in lines[0] and "full" in lines[0], proc.stderr
            assert name not in our_domains()
            assert overlays_of(small, name) == []
    finally:
        holder.close()
    assert integrity(db) == "ok"
    assert small.json("list") == before

    # With room again, a launch works (the hook judges it by this node's store meanwhile).
    hook_for(small.config)
    try:
        record = small.launch(guest_dir / "guest.qcow2", name)
        assert record["state"] == "running"
        assert sorted(r["name"] for r in small.json("list")) == sorted([failed, name])
    finally:
        small.destroy(name)
        hook_for(tv.config)
    assert name not in our_domains()


def test_disk_full_while_appending_to_the_ledger(small_node: tuple[Tv, str]):
    small, failed = small_node
    db = small.state_dir / "tvorch.db"
    store = Store(db)
    try:
        instance = store.get_live(failed).id
        store.append_ledger(instance, "stopped", "ab" * 32)
        before = store.ledger(instance)
        with filled(db.parent.parent):
            with pytest.raises(StoreError, match="state database .*full"):
                store.append_ledger(instance, "stopped", "cd" * 32)
            assert store.ledger(instance) == before
        assert integrity(db) == "ok"
        assert store.ledger(instance) == before
        store.append_ledger(instance, "stopped", "cd" * 32)
        assert [e.state_digest for e in store.ledger(instance)] == ["ab" * 32, "cd" * 32]
    finally:
        store.close()


def test_reconcile_never_deletes_an_overlay_it_cannot_account_for(tv: Tv):
    """A disk named like an overlay but unknown to this store (another store's, a restored
    database) may be in use: reconcile leaves it alone."""
    tv.overlay_dir.mkdir(mode=0o711, exist_ok=True)
    stranger = tv.overlay_dir / f"{PREFIX}stranger.i-0123456789ab.qcow2"
    stranger.write_bytes(b"someone's disk")
    try:
        tv.run("reconcile")
        tv.json("list")
        assert stranger.read_bytes() == b"someone's disk"
    finally:
        stranger.unlink()
