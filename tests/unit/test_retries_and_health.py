"""What a cloud controller and a monitor rely on: retried removals exit 0, `tvorch status`
exits 16 for a daemon that is not following libvirt, one daemon per store, and a config
integer too large for what it feeds is refused by name.

The config points libvirt at a socket that does not exist: a retried destroy that reached
libvirt would exit 7.
"""

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tvorch.adapters.locks import StoreLock
from tvorch.adapters.store import Store
from tvorch.cli import main
from tvorch.config import INT_MAX, Config, parse_config
from tvorch.core.attestation.hostverdict import DaemonStatus
from tvorch.core.launch.instance import InstanceRecord, InstanceState
from tvorch.core.timestamps import utc_now
from tvorch.errors import ConfigError, ConflictError, ExitCode
from tvorch.service.measure import policy_digest

UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


@pytest.fixture
def node(tmp_path, monkeypatch):
    cfg = tmp_path / "tvorch.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\noverlay_dir = "{tmp_path / "overlays"}"\n'
        f'console_log_dir = "{tmp_path / "logs"}"\nswtpm_state_dir = "{tmp_path / "swtpm"}"\n'
        f'libvirt_uri = "{UNREACHABLE}"\nvirt_type = "qemu"\n'
    )
    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    return tmp_path


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvorch: error: "), err
    return lines[0]


def put_instance(root, name, state, id_="i-0000000000a1", uuid="00000000-0000-0000-0000-0000000000a1"):
    store = Store(root / "state" / "tvorch.db")
    now = utc_now()
    store.create_instance(InstanceRecord(
        id=id_, name=name, uuid=uuid, image="/img.qcow2", overlay=str(root / "overlays" / f"{name}.{id_}.qcow2"),
        console_log="/log", state=InstanceState.LAUNCHING, virt_type="qemu", domain_xml="<domain/>",
        created_at=now, updated_at=now))
    store.update_instance(id_, state=state, event=("destroyed", "vTPM state kept"))
    store.close()


# -- destroy ------------------------------------------------------------------


def test_destroy_of_a_destroyed_instance_is_a_no_op(capsys, node):
    put_instance(node, "vm1", InstanceState.DESTROYED)
    rc, out, err = run(capsys, "destroy", "vm1")
    assert rc == 0, err
    assert out.startswith("vm1 was already destroyed (at ")
    rc, out, err = run(capsys, "destroy", "vm1", "--purge-vtpm", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["already_destroyed"] is True and doc["state"] == "destroyed"
    assert doc["vtpm_purged"] is True  # nothing of it was left to purge


def test_destroy_of_a_name_never_known_is_not_found(capsys, node):
    put_instance(node, "vm1", InstanceState.DESTROYED)
    rc, _, err = run(capsys, "destroy", "vm2")
    assert rc == ExitCode.NOT_FOUND and "no instance named 'vm2'" in one_error_line(err)
    rc, _, err = run(capsys, "destroy", "a<b")
    assert rc == ExitCode.INVALID_INPUT, err


# -- reference values ------------------------------------------------------------


def test_reference_remove_twice_then_unknown(capsys, node):
    firmware = node / "code.fd"
    firmware.write_bytes(b"firmware bytes")
    assert run(capsys, "reference", "add", "firmware", str(firmware))[0] == 0
    rc, out, err = run(capsys, "reference", "remove", "firmware", str(firmware))
    assert rc == 0 and out.startswith("no longer trusted: firmware "), err
    digest = out.split()[-1]
    for spelling in (str(firmware), digest, f"sha256:{digest}"):
        rc, out, err = run(capsys, "reference", "remove", "firmware", spelling)
        assert rc == 0 and out.startswith(f"already gone: firmware {digest} (removed at "), err
    rc, out, _ = run(capsys, "reference", "remove", "firmware", digest, "--json")
    doc = json.loads(out)
    assert doc["removed"] is False and doc["already_removed_at"] and doc["digest"] == digest
    # Another kind never had it; another digest was never trusted: not found, as before.
    rc, _, err = run(capsys, "reference", "remove", "kernel", digest)
    assert rc == ExitCode.NOT_FOUND and f"no trusted kernel with digest {digest}" in one_error_line(err)
    rc, _, err = run(capsys, "reference", "remove", "firmware", "0" * 64)
    assert rc == ExitCode.NOT_FOUND, err
    # Trusted again, removed again: a real removal, not "already gone".
    assert run(capsys, "reference", "add", "firmware", str(firmware))[0] == 0
    assert run(capsys, "reference", "remove", "firmware", digest)[1].startswith("no longer trusted")


def test_image_untrust_twice(capsys, node):
    image = node / "disk.qcow2"
    raw = node / "disk.raw"
    raw.write_bytes(bytes(510) + b"\x55\xaa" + bytes((1 << 20) - 512))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    assert run(capsys, "image", "trust", str(image))[0] == 0
    rc, out, err = run(capsys, "image", "untrust", str(image))
    assert rc == 0 and out.startswith("no longer trusted: "), err
    rc, out, err = run(capsys, "image", "untrust", str(image))
    assert rc == 0 and out.startswith("already gone: ") and "(untrusted at " in out, err
    rc, _, err = run(capsys, "image", "untrust", "f" * 64)
    assert rc == ExitCode.NOT_FOUND, err


# -- status ---------------------------------------------------------------------


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def beat(root, pid, connected=True, age=0.0, uri="qemu:///system"):
    store = Store(root / "state" / "tvorch.db")
    store.daemon_heartbeat(pid, utc_now(), connected, f"connected to libvirt at {uri}", uri)
    if age:
        store._db.execute("UPDATE daemon_status SET heartbeat_epoch = heartbeat_epoch - ?", (age,))
    store.close()


def test_status_exits_16_unless_the_daemon_is_healthy(capsys, node):
    rc, out, err = run(capsys, "status")
    assert rc == ExitCode.UNHEALTHY == 16 and "never ran" in one_error_line(err)

    beat(node, os.getpid())
    rc, out, err = run(capsys, "status", "--json")
    daemon = json.loads(out)["daemon"]
    assert rc == 0, err
    assert daemon["healthy"] is True and daemon["connected"] is True and daemon["libvirt_uri"] == "qemu:///system"

    # Killed: its row still says connected; status must not.
    beat(node, dead_pid())
    rc, out, err = run(capsys, "status", "--json")
    daemon = json.loads(out)["daemon"]
    assert rc == 16 and daemon["healthy"] is False and daemon["connected"] is False
    assert "is gone" in daemon["problem"] and "is gone" in one_error_line(err)
    rc, out, err = run(capsys, "status")
    assert rc == 16 and "daemon:    NOT HEALTHY: not running" in out and "connected" not in out.splitlines()[0]

    # Alive (our pid) but hung: no heartbeat for three intervals (3 x 5 s by default).
    beat(node, os.getpid(), age=16)
    rc, out, err = run(capsys, "status", "--json")
    assert rc == 16 and json.loads(out)["daemon"]["connected"] is False and "heartbeat 16 s old" in err
    beat(node, os.getpid(), age=14)
    assert run(capsys, "status")[0] == 0

    beat(node, os.getpid(), connected=False)
    rc, _, err = run(capsys, "status")
    assert rc == 16 and "not healthy" in one_error_line(err)


def test_daemon_problem_rules():
    now = time.time()
    up = DaemonStatus(1, "t", "t", now - 1, True, "connected to libvirt at qemu:///system", "qemu:///system")
    assert up.problem(now, 5, alive=True) is None
    assert "gone" in up.problem(now, 5, alive=False)
    assert "beyond 3 x serve.heartbeat_interval (15 s)" in up.problem(now + 15, 5, alive=True)
    down = dataclasses.replace(up, connected=False, detail="waiting for libvirtd at qemu:///system")
    assert down.problem(now, 5, alive=True) == "waiting for libvirtd at qemu:///system"
    assert down.to_json(now, False)["connected"] is False


# -- one daemon per store ------------------------------------------------------


def test_store_lock_is_exclusive_and_names_its_holder(tmp_path):
    first = StoreLock(tmp_path / "state")
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    with pytest.raises(ConflictError, match=rf"another tvorch serve \(pid {os.getpid()}\) holds the store"):
        StoreLock(tmp_path / "state")
    first.release()
    StoreLock(tmp_path / "state").release()
    # Held by another process; free again once it is gone (even killed).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tvorch.adapters.locks import "
         "StoreLock; StoreLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(tmp_path / "state")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConflictError, match=rf"pid {holder.pid}\)"):
            StoreLock(tmp_path / "state")
    finally:
        holder.kill()
        holder.wait()
    StoreLock(tmp_path / "state").release()


# -- huge integers in the config -------------------------------------------------


def int_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name) if cls is not Config else getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            yield from int_keys(type(value), f"{prefix}{f.name}.")
        elif type(value) is int or (isinstance(value, tuple) and value and type(value[0]) is int):
            yield prefix + f.name, value


def toml_for(key, value):
    table, _, leaf = key.rpartition(".")
    return (f"[{table}]\n" if table else "") + f"{leaf} = {value}\n"


@pytest.mark.parametrize("key,default", list(int_keys()))
def test_huge_integers_are_refused_by_name(key, default):
    huge = "99999999999999999999"
    for text in (toml_for(key, huge if isinstance(default, int) else f"[{huge}]"),
                 toml_for(key, str(INT_MAX + 1) if isinstance(default, int) else f"[{INT_MAX + 1}]")):
        with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
            parse_config(text.encode())


def test_the_largest_integers_accepted_still_make_a_policy_digest():
    # Every integer key at once, as TOML dotted keys (`serve.heartbeat_interval = ...`).
    cfg = parse_config("".join(f"{k} = {INT_MAX}\n" for k, d in int_keys() if isinstance(d, int)).encode())
    assert cfg.launch.max_vcpus == cfg.serve.heartbeat_interval == INT_MAX
    assert len(policy_digest(cfg)) == 64


def test_huge_max_vcpus_is_one_line_with_the_config_code(capsys, node, monkeypatch):
    bad = node / "huge.toml"
    bad.write_text((node / "tvorch.toml").read_text() + "[launch]\nmax_vcpus = 99999999999999999999\n")
    monkeypatch.setenv("TVORCH_CONFIG", str(bad))
    rc, _, err = run(capsys, "launch", str(node / "absent.qcow2"), "--name", "vm1")
    assert rc == ExitCode.CONFIG and "launch.max_vcpus" in one_error_line(err)
