"""Two libvirt nodes on one host (scripts/two-nodes.sh), the harness live migration (issue #18) needs.

Node B is a second libvirtd in its own mount and UTS namespaces. This checks
that libvirt takes it for another host and that a running VM with a vTPM
migrates live (under TCG) from this node to B and back over 127.0.0.1, its
vTPM state travelling in QEMU's migration stream. tvorch itself plays no part
yet: the domain is a plain one (the hook lets it through).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from .conftest import PREFIX, URI

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "two-nodes.sh"


@pytest.fixture(scope="module")
def node_b(libvirt_ready):
    where = Path(f"/var/tmp/{PREFIX}node-b-{secrets.token_hex(3)}")
    up = subprocess.run([str(SCRIPT), "up", str(where)], capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        b_uri, a_uri = subprocess.run([str(SCRIPT), "uri", str(where)], capture_output=True, text=True,
                                      check=True).stdout.split()
        yield b_uri, a_uri, where / "root"
    finally:
        down = subprocess.run([str(SCRIPT), "down", str(where)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not where.exists()


def _virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"virsh -c {uri} {' '.join(args)}: {proc.stderr}"
    return proc


def _running(uri: str) -> set[str]:
    return set(_virsh(uri, "list", "--name").stdout.split())


def _status(uri: str, name: str) -> dict:
    out = _virsh(uri, "qemu-monitor-command", name, '{"execute": "query-status"}').stdout
    return json.loads(out)["return"]


def test_node_b_is_another_host(node_b):
    b_uri, _a_uri, _ = node_b
    assert _virsh(b_uri, "hostname").stdout.strip() == "tvorch-node-b"
    uuid_of = [_virsh(u, "capabilities").stdout.split("<uuid>")[1].split("</uuid>")[0] for u in (URI, b_uri)]
    assert uuid_of[0] != uuid_of[1]


def test_a_vm_with_a_vtpm_migrates_live_to_b_and_back(node_b, guest_dir: Path):
    b_uri, a_uri, b_root = node_b
    name, uuid = f"{PREFIX}mig-{secrets.token_hex(2)}", str(uuidlib.uuid4())
    files = Path(f"/var/tmp/{name}")
    files.mkdir(mode=0o755)
    try:
        for f in ("vmlinuz", "initrd.img"):
            shutil.copyfile(guest_dir / f, files / f)
            (files / f).chmod(0o644)
        xml = files / "domain.xml"
        xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{files / 'vmlinuz'}</kernel><initrd>{files / 'initrd.img'}</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><serial type='pty'/>
    <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm></devices>
</domain>""")
        _virsh(URI, "create", str(xml))
        port = 49152 + secrets.randbelow(60)
        _virsh(URI, "migrate", "--live", "--p2p", name, b_uri, "--migrateuri", f"tcp://127.0.0.1:{port}")
        assert name in _running(b_uri) and name not in _running(URI)
        assert _status(b_uri, name)["status"] == "running"
        # The vTPM state came with the migration stream, into B's own swtpm directory.
        assert (b_root / "var/lib/libvirt/swtpm" / uuid / "tpm2" / "tpm2-00.permall").is_file()
        _virsh(b_uri, "migrate", "--live", "--p2p", name, a_uri, "--migrateuri", f"tcp://127.0.0.1:{port + 1}")
        assert name in _running(URI) and name not in _running(b_uri)
        assert _status(URI, name)["status"] == "running"
    finally:
        for uri in (URI, b_uri):
            _virsh(uri, "destroy", name, check=False)
        shutil.rmtree(files, ignore_errors=True)
    assert name not in _running(URI)
