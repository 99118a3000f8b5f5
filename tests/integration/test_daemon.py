"""`tvorch serve` against the real libvirtd: systemd notifications, lifecycle events,
reconnecting after a libvirtd restart, catching up after being killed, signals."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PREFIX, Tv, require, virsh
from .test_hook_gate import _restart_libvirtd

pytestmark = pytest.mark.integration
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "tvorch.service"


class Notifications:
    """A NOTIFY_SOCKET like systemd's: collects the datagrams the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.seen:
                return
            try:
                self.seen.extend(self.sock.recv(4096).decode().splitlines())
            except socket.timeout:
                pass
        raise AssertionError(f"no {line!r} from the daemon within {timeout} s; got {self.seen}")


def leaves_guests_running(text: str) -> str:
    """The config TEXT with serve.on_shutdown = "none" unless it names one: a daemon a test stops must not
    shut down the session's other guests (test_start_paths tests the other settings)."""
    if "on_shutdown" in text:
        return text
    if "[serve]\n" in text:
        return text.replace("[serve]\n", '[serve]\non_shutdown = "none"\n', 1)
    return text + '[serve]\non_shutdown = "none"\n'


def start_daemon(tv: Tv, tmp: Path, config: Path | None = None) -> tuple[subprocess.Popen, Notifications]:
    notes = Notifications(tmp / f"notify-{secrets.token_hex(2)}")
    text = (config or tv.config).read_text()
    config = config or tv.config.with_name("tvorch-serve.toml")
    config.write_text(leaves_guests_running(text))
    env = {**os.environ, "TVORCH_CONFIG": str(config), "NOTIFY_SOCKET": str(notes.path),
           "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([sys.executable, "-m", "tvorch.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "ab"))
    notes.wait_for("READY=1")
    return proc, notes


def stop_daemon(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def wait_until(check, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} not reached within {timeout} s")


def daemon_status(tv: Tv) -> tuple[int, dict]:
    """`tvorch status --json`: its exit code (16 unless the daemon is healthy) and the daemon's part."""
    proc = tv.run("status", "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)["daemon"]


def state_of(tv: Tv, name: str) -> str:
    """The record's state as the store has it (show --json would refresh it from libvirt)."""
    from tvorch.adapters.store import Store

    store = Store(tv.state_dir / "tvorch.db")
    try:
        record = store.find_live(name)
        return record.state.value if record else "absent"
    finally:
        store.close()


@pytest.fixture
def guest(tv_clear: Tv, guest_dir: Path):
    """A guest libvirt can start by itself (`virsh start`): its vTPM state is in clear."""
    tv = tv_clear
    name = f"{PREFIX}svc-{secrets.token_hex(2)}"
    tv.launch(guest_dir / "guest.qcow2", name, "--memory", "256")
    yield name
    tv.run("destroy", "--purge-vtpm", name, check=False)


def test_notify_watchdog_status_and_sigterm(tv: Tv, tmp_path: Path):
    proc, notes = start_daemon(tv, tmp_path)
    try:
        notes.wait_for("WATCHDOG=1", timeout=10)
        rc, daemon = daemon_status(tv)
        assert rc == 0 and daemon["pid"] == proc.pid and daemon["healthy"] is True
    finally:
        assert stop_daemon(proc) == 0
    notes.wait_for("STOPPING=1", timeout=5)
    rc, daemon = daemon_status(tv)
    assert rc == 16 and daemon["healthy"] is False and daemon["connected"] is False


def test_follows_lifecycle_outside_tvorch(tv: Tv, tmp_path: Path, guest: str):
    proc, _ = start_daemon(tv, tmp_path)
    try:
        virsh("destroy", guest)
        wait_until(lambda: state_of(tv, guest) == "stopped", what="record stopped after virsh destroy")
        virsh("start", guest)
        wait_until(lambda: state_of(tv, guest) == "running", what="record running after virsh start")
        kinds = [e["detail"] for e in tv.json("show", guest)["events"] if e["kind"] == "libvirt"]
        assert any("destroyed" in k for k in kinds) and any("booted" in k for k in kinds)
    finally:
        assert stop_daemon(proc) == 0


def test_reconnects_after_libvirtd_restart(tv: Tv, tmp_path: Path, guest: str):
    proc, _ = start_daemon(tv, tmp_path)
    try:
        _restart_libvirtd()
        assert virsh("domstate", guest).stdout.strip() == "running"
        # Events flow again on the new connection.
        time.sleep(1)
        wait_until(lambda: daemon_status(tv)[1]["connected"] is True, what="daemon reconnected")
        virsh("destroy", guest)
        wait_until(lambda: state_of(tv, guest) == "stopped", what="event seen after reconnect")
    finally:
        assert stop_daemon(proc) == 0


def test_catches_up_after_being_killed(tv: Tv, tmp_path: Path, guest: str):
    proc, _ = start_daemon(tv, tmp_path)
    proc.kill()
    proc.wait()
    virsh("destroy", guest)  # happens while no daemon watches
    assert state_of(tv, guest) == "running"
    proc, _ = start_daemon(tv, tmp_path)
    try:
        wait_until(lambda: state_of(tv, guest) == "stopped", what="reconciled on restart")
    finally:
        assert stop_daemon(proc) == 0


def test_sighup_reloads(tv: Tv, tmp_path: Path):
    proc, notes = start_daemon(tv, tmp_path)
    try:
        proc.send_signal(signal.SIGHUP)
        notes.wait_for("RELOADING=1", timeout=10)
        wait_until(lambda: "config_reloaded" in (tmp_path / "serve.log").read_text(), what="reload logged")
    finally:
        assert stop_daemon(proc) == 0


def test_unit_file_verifies(tmp_path: Path):
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (package systemd)")
    unit = tmp_path / "tvorch.service"
    unit.write_text(UNIT.read_text().replace("/opt/tvorch/bin/tvorch", str(Path(sys.executable).with_name("tvorch"))))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    text = UNIT.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "PrivateTmp=yes", "CapabilityBoundingSet=", "ReadWritePaths=", "After=libvirtd.service",
                      "StateDirectory=tvorch", "StateDirectoryMode=0700"):
        assert directive in text


def test_status_of_a_killed_daemon_is_not_healthy(tv: Tv, tmp_path: Path):
    proc, _ = start_daemon(tv, tmp_path)
    proc.kill()
    proc.wait()
    rc, daemon = daemon_status(tv)
    assert rc == 16 and daemon["pid"] == proc.pid
    assert daemon["connected"] is False and "is gone" in daemon["problem"]


def test_a_second_daemon_on_the_same_store_refuses_to_start(tv: Tv, tmp_path: Path):
    proc, _ = start_daemon(tv, tmp_path)
    try:
        second = tv.run("serve", check=False)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 6 and lines[-1] == (
            f"tvorch: error: refused: another tvorch serve (pid {proc.pid}) holds the store in {tv.state_dir}")
        rc, daemon = daemon_status(tv)
        assert rc == 0 and daemon["pid"] == proc.pid
    finally:
        assert stop_daemon(proc) == 0
    # Its lock goes with it: the next one starts.
    proc, _ = start_daemon(tv, tmp_path)
    assert stop_daemon(proc) == 0


@pytest.fixture(scope="module")
def sealed_guest(tv: Tv, guest_dir: Path, hook_for):
    """A running guest whose vTPM key is sealed (only `tvorch start` lends it to libvirt)."""
    hook_for(tv.config)  # the hook is the node's: point it at this store again in case another session moved it
    name = f"{PREFIX}sealed-{secrets.token_hex(2)}"
    tv.launch(guest_dir / "guest.qcow2", name, "--memory", "256")
    yield name
    tv.run("destroy", "--purge-vtpm", name, check=False)


def test_sighup_follows_a_new_libvirt_uri(tv: Tv, tmp_path: Path, sealed_guest: str):
    """The same libvirtd under another spelling: the daemon must drop its old connection for the new one."""
    config = tmp_path / "serve.toml"
    config.write_text(tv.config.read_text())
    own = Tv(config=config, state_dir=tv.state_dir, overlay_dir=tv.overlay_dir, log_dir=tv.log_dir)
    proc, notes = start_daemon(tv, tmp_path, config)
    try:
        wait_until(lambda: daemon_status(own)[1]["libvirt_uri"] == "qemu:///system", what="first URI reported")
        config.write_text(leaves_guests_running(tv.config.read_text()).replace('libvirt_uri = "qemu:///system"',
                                                        'libvirt_uri = "qemu+unix:///system"'))
        proc.send_signal(signal.SIGHUP)
        notes.wait_for("RELOADING=1", timeout=10)
        wait_until(lambda: daemon_status(own)[1]["libvirt_uri"] == "qemu+unix:///system"
                   and daemon_status(own)[0] == 0, what="new URI reported, healthy")
        assert "connected to libvirt at qemu+unix:///system" in daemon_status(own)[1]["detail"]
        # Lifecycle events arrive on the new connection.
        virsh("destroy", sealed_guest)
        wait_until(lambda: state_of(tv, sealed_guest) == "stopped", what="event seen on the new connection")
        log = (tmp_path / "serve.log").read_text()
        assert '"libvirt_uri_changed"' in log and log.count('"libvirt_connected"') == 2
    finally:
        assert stop_daemon(proc) == 0


def test_a_vtpm_secret_left_by_a_killed_start_is_taken_back(tv: Tv, tmp_path: Path, sealed_guest: str):
    from .test_faults import crash

    proc, _ = start_daemon(tv, tmp_path)
    try:
        tv.run("stop", "--force", sealed_guest)
        secret = tv.json("vtpm", "show", sealed_guest)["secret_uuid"]
        assert secret not in virsh("secret-list").stdout
        killed = crash(tv, "secret-lent", "start", sealed_guest)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        lent = time.monotonic()
        # Gone within a heartbeat (serve.heartbeat_interval, 5 s), not at the next libvirt reconnect.
        wait_until(lambda: secret not in virsh("secret-list").stdout, timeout=8, what="leftover secret removed")
        print(f"leftover vTPM secret removed {time.monotonic() - lent:.1f} s after the kill")
        assert "removed its vTPM secret left in libvirt" in (tmp_path / "serve.log").read_text()
    finally:
        assert stop_daemon(proc) == 0
