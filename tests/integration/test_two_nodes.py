"""Two tvorch nodes on one host (scripts/two-nodes.sh, tests/integration/nodes.py), the harness live
migration (issue #18) needs.

Node B is a second libvirtd in its own mount and UTS namespaces, with tvorch's
hook pointing at its own config. This checks that libvirt takes it for another
host, that each node is a tvorch node of one fleet with its own state, host TPM
and passing host verdict, and that a running VM with a vTPM migrates live
(under TCG) from this node to B and back over 127.0.0.1, its vTPM state
travelling in QEMU's migration stream. That domain is a plain one: both hooks
let it through.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from tvorch.service.hook_install import MARKER

from .conftest import PREFIX, URI, Tv
from .nodes import Fleet, Node, fleet_fixture, node_a_fixture, node_b_fixture  # noqa: F401

pytestmark = pytest.mark.integration


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


def test_node_b_is_another_host(node_b: Node):
    assert _virsh(node_b.uri, "hostname").stdout.strip() == "tvorch-node-b"
    uuid_of = [_virsh(u, "capabilities").stdout.split("<uuid>")[1].split("</uuid>")[0] for u in (URI, node_b.uri)]
    assert uuid_of[0] != uuid_of[1]
    # B's /run/tvorch (channel sockets, boot-file views) is its own.
    probe = f"/run/tvorch/{PREFIX}probe-{secrets.token_hex(2)}"
    node_b.sh(f"touch {probe}")
    assert not Path(probe).exists()
    assert node_b.sh(f"ls {probe}; hostname").stdout.split() == [probe, "tvorch-node-b"]


def test_each_node_is_a_tvorch_node_of_the_fleet(node_a: Node, node_b: Node, fleet: Fleet, tv: Tv,
                                                  tmp_path: Path):
    cas = {}
    for node in (node_a, node_b):
        info = node.json("ca", "show")
        assert not info["self_signed"] and info["issuer"] == "CN=tvtest Fleet Intermediate", info
        assert [c["subject"] for c in info["chain"]] == ["CN=tvtest Fleet Intermediate", "CN=tvtest Fleet Root"]
        chain, ca = tmp_path / f"{node.name}-chain.pem", tmp_path / f"{node.name}-ca.pem"
        chain.write_text(node.run("ca", "show", "--chain", "--pem").stdout)
        ca.write_text(node.run("ca", "show", "--pem").stdout)
        proc = subprocess.run(["openssl", "verify", "-CAfile", str(fleet.root), "-untrusted", str(chain), str(ca)],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == f"{ca}: OK", proc.stdout + proc.stderr
        cas[node.name] = info
    # Two node CAs, each made where its node runs (the subject names the node's hostname).
    assert cas["a"]["sha256_fingerprint"] != cas["b"]["sha256_fingerprint"]
    assert cas["a"]["subject"] == f"CN=tvorch node CA {socket.gethostname()}"
    assert cas["b"]["subject"] == "CN=tvorch node CA tvorch-node-b"
    # B's state is where its config says, as B sees it; A's state and the session's are not B's.
    assert node_b.cfg.state_dir == str(node_b.state_dir) != node_a.cfg.state_dir
    assert node_b.sh(f"cat {node_b.state_dir}/pki/ca.pem").stdout == cas["b"]["pem"]
    assert (node_a.state_dir / "pki" / "ca.pem").read_text() == cas["a"]["pem"]
    assert not (tv.state_dir / "pki" / "chain.pem").exists()
    # Each libvirtd runs tvorch's hook with its own node's config.
    hooks = {"a": Path("/etc/libvirt/hooks/qemu").read_text(),
             "b": node_b.sh("cat /etc/libvirt/hooks/qemu").stdout}
    for name, node in (("a", node_a), ("b", node_b)):
        assert MARKER in hooks[name] and f"export TVORCH_CONFIG='{node.config}'" in hooks[name]


def test_b_attests_its_host_with_its_own_tpm(node_a: Node, node_b: Node):
    ak = {}
    for node in (node_a, node_b):
        verdict = node.json("host", "attest")
        assert verdict["passed"] is True and verdict["failures"] == [], verdict
        assert node.json("host", "status")["passed"] is True
        ak[node.name] = node.json("host", "init")  # the AK is made once: this reads it back
    assert node_a.host.tcti != node_b.host.tcti
    assert ak["a"]["ak_fingerprint"] != ak["b"]["ak_fingerprint"]
    assert ak["b"]["ak_certification"]["hostname"] == "tvorch-node-b"
    assert ak["a"]["ak_certification"]["hostname"] == socket.gethostname()


def test_a_vm_with_a_vtpm_migrates_live_to_b_and_back(node_a: Node, node_b: Node, guest_dir: Path):
    b_uri, a_uri = node_b.peer_uri, node_a.peer_uri
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
        port = 20000 + 2 * secrets.randbelow(5000)  # below the ephemeral range, as test_migration's
        _virsh(URI, "migrate", "--live", "--p2p", name, b_uri, "--migrateuri", f"tcp://127.0.0.1:{port}")
        assert name in _running(b_uri) and name not in _running(URI)
        assert _status(b_uri, name)["status"] == "running"
        # The vTPM state came with the migration stream, into B's own swtpm directory.
        node_b.sh(f"test -f /var/lib/libvirt/swtpm/{uuid}/tpm2/tpm2-00.permall")
        _virsh(b_uri, "migrate", "--live", "--p2p", name, a_uri, "--migrateuri", f"tcp://127.0.0.1:{port + 1}")
        assert name in _running(URI) and name not in _running(b_uri)
        assert _status(URI, name)["status"] == "running"
    finally:
        for uri in (URI, b_uri):
            _virsh(uri, "destroy", name, check=False)
        shutil.rmtree(files, ignore_errors=True)
    assert name not in _running(URI)
