"""Two tvorch nodes of one fleet on this host, for live migration tests (issue #18).

A migration test module takes them with
``from .nodes import fleet_fixture, node_a_fixture, node_b_fixture  # noqa: F401`` and test parameters
``fleet``, ``node_a``, ``node_b`` (module-scoped; the functions' names differ from the fixtures' so a
parameter does not shadow an import, ruff F811, as in tests/tpm_fixtures.py). Node A is this host's libvirtd, node B the second libvirtd of
scripts/two-nodes.sh in its own mount and UTS namespaces. Each is a whole
tvorch node: its own config and state_dir, its own simulated host (a real
swtpm whose PCRs replay a real UEFI log and IMA list; tests/host_fixtures.py)
with a host policy and a passing verdict, the test images trusted, and its
node CA certified under one fleet root. libvirt's hook on each node points at
that node's config: on A for the module only (then back at the session's), on
B from its start.

Both configs name the same overlay_dir, boot_files_dir and console_log_dir: a
domain's XML names them and is the same on both nodes. On B, /var/lib/libvirt
and /run/tvorch are B's own (bind mounts inside its namespace); /tmp and
/var/tmp are shared, so the console log directory is simply shared, and so is
B's state_dir (under two-nodes.sh's DIR) as a path, though only B uses it.
Node A is not the session's `tv` state: installing a fleet chain there would
change what other tests see.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.host_fixtures import Host, simulated_host
from tvorch.config import Config, parse_config

from .conftest import PREFIX, URI, Tv

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "two-nodes.sh"
TEST_IMAGES = ("guest.qcow2", "guest-signed.qcow2")


@dataclass(frozen=True)
class Node:
    """One tvorch node as this test process reaches it.

    uri: the libvirt URI this process uses for the node; peer_uri: the URI the
    OTHER node's libvirtd reaches this one by (`virsh migrate --p2p`'s
    destination). prefix: the argv that enters the node's namespaces (empty on
    A; `two-nodes.sh exec DIR --` on B). host.run/json run the CLI the same way.
    """

    name: str
    config: Path
    state_dir: Path
    uri: str
    peer_uri: str
    host: Host
    prefix: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The argv prefix that runs `python -m tvorch.cli` as this node (inside its namespaces)."""
        return [*self.prefix, "env", f"TVORCH_CONFIG={self.config}", sys.executable, "-m", "tvorch.cli"]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.command(), *args], capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"tvorch {' '.join(args)} on node {self.name} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def sh(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A shell command inside the node's namespaces (on A: here)."""
        proc = subprocess.run([*self.prefix, "sh", "-c", cmd], capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"sh -c {cmd!r} on node {self.name} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    @property
    def cfg(self) -> Config:
        return parse_config(self.config.read_bytes())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey, pathlen: int | None, days: int) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Fleet:
    """A fleet root and an intermediate under it (pathlen 1) that certifies node CAs.

    root: the root's PEM (what `tvorch verify/manifest verify/migrate --ca` take);
    chain: intermediate then root (what `tvorch ca install --chain` takes).
    """

    dir: Path
    root: Path
    chain: Path
    intermediate: x509.Certificate = field(repr=False)
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def make(cls, where: Path, name: str = "tvtest Fleet") -> Fleet:
        root_key, int_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        root = _ca(f"{name} Root", root_key, None, root_key, None, days=60)
        intermediate = _ca(f"{name} Intermediate", int_key, root, root_key, 1, days=30)
        where.mkdir(parents=True, exist_ok=True)
        (where / "root.pem").write_bytes(_pem(root))
        (where / "chain.pem").write_bytes(_pem(intermediate, root))
        return cls(where, where / "root.pem", where / "chain.pem", intermediate, int_key)

    def sign(self, csr_pem: bytes, days: int = 20) -> bytes:
        """The intermediate's certificate for a node's `tvorch ca csr`, its requested extensions copied."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        now = datetime.now(timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.intermediate.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        )
        for ext in csr.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        ski = self.intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        return _pem(builder.sign(self.intermediate_key, hashes.SHA256()))

    def join(self, node: Node, where: Path) -> Path:
        """Node's CA certified under the fleet: `ca csr`, signed here, `ca install CERT --chain`; CERT's path.
        WHERE: a directory both this process and the node see."""
        csr, cert = where / f"node-{node.name}-ca.csr", where / f"node-{node.name}-ca.pem"
        node.run("ca", "csr", "--out", str(csr))
        cert.write_bytes(self.sign(csr.read_bytes()))
        node.run("ca", "install", str(cert), "--chain", str(self.chain))
        return cert


def _node_config(session: str, **paths: str | Path) -> str:
    """The session config's text with each top-level KEY = "..." line of PATHS replaced."""
    lines = session.splitlines(keepends=True)
    for key, value in paths.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key} = ")]
        assert len(at) == 1, f"{key} not once in the session config"
        lines[at[0]] = f'{key} = "{value}"\n'
    return "".join(lines)


def _make_tvorch_node(node: Node, guest_dir: Path, fleet: Fleet) -> None:
    """Host policy from a baseline, a passing host verdict, the test images trusted, the CA in the fleet."""
    node.run("host", "baseline", "--out", str(node.host.root / "host-policy.json"))
    verdict = node.json("host", "attest")
    assert verdict["passed"] is True, verdict["failures"]
    for image in TEST_IMAGES:
        node.run("image", "trust", str(guest_dir / image), "--label", f"test guest {image}")
    fleet.join(node, node.host.root)


def _uris(where: Path) -> tuple[str, str]:
    """B's URI, then A's as B's libvirtd reaches it (`two-nodes.sh uri`)."""
    out = subprocess.run([str(SCRIPT), "uri", str(where)], capture_output=True, text=True, check=True).stdout
    b_uri, a_uri = out.split()
    return b_uri, a_uri


_B_DIRS: dict[str, Path] = {}


def _b_dir(request: pytest.FixtureRequest) -> Path:
    """The test module's node B DIR for two-nodes.sh (made by `up`, removed by `down`); A's peer_uri names it.
    Chosen here rather than by a fixture of its own so that a module imports only the three fixtures."""
    return _B_DIRS.setdefault(request.module.__name__, Path(f"/var/tmp/{PREFIX}node-b-{secrets.token_hex(3)}"))


def _in_namespace(namespace: str) -> list[int]:
    """Pids whose mount namespace is NAMESPACE (`mnt:[inode]`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "ns" / "mnt") == namespace:
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module", name="fleet")
def fleet_fixture(tmp_path_factory) -> Fleet:
    return Fleet.make(tmp_path_factory.mktemp(f"{PREFIX}fleet"))


@pytest.fixture(scope="module", name="node_a")
def node_a_fixture(tv: Tv, hook_for, guest_dir: Path, fleet: Fleet, request: pytest.FixtureRequest,
                   tmp_path_factory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp(f"{PREFIX}node-a")
    tag = secrets.token_hex(3)
    overlay_dir = Path(f"/var/lib/libvirt/images/{PREFIX}{tag}")
    boot_view = Path(f"/run/tvorch/{PREFIX}boot-{tag}")
    text = _node_config(tv.config.read_text(), state_dir=root / "state", overlay_dir=overlay_dir,
                        boot_files_dir=boot_view, console_log_dir=root / "console")
    with simulated_host(root, text) as host:
        node = Node("a", host.config, root / "state", URI, _uris(_b_dir(request))[1], host)
        try:
            _make_tvorch_node(node, guest_dir, fleet)
            hook_for(node.config)
            yield node
        finally:
            hook_for(tv.config)
            held = node.run("list", "--json", check=False)  # what node A still holds (not the session's domains)
            for record in json.loads(held.stdout) if held.returncode == 0 else []:
                node.run("destroy", "--purge-vtpm", record["name"], check=False)
            shutil.rmtree(overlay_dir, ignore_errors=True)
            while subprocess.run(["umount", "-l", str(boot_view)], capture_output=True).returncode == 0:
                pass
            shutil.rmtree(boot_view, ignore_errors=True)


@pytest.fixture(scope="module", name="node_b")
def node_b_fixture(tv: Tv, node_a: Node, guest_dir: Path, fleet: Fleet, request: pytest.FixtureRequest,
                   tmp_path_factory) -> Iterator[Node]:
    """Node B up with tvorch's hook (TVORCH_B_CONFIG), then made a tvorch node from inside its namespaces."""
    where = _b_dir(request)
    a = node_a.cfg
    text = _node_config(tv.config.read_text(), state_dir=where / "state", overlay_dir=a.overlay_dir,
                        boot_files_dir=a.boot_files_dir, console_log_dir=a.console_log_dir)
    prefix = (str(SCRIPT), "exec", str(where), "--")
    cli = (*prefix, sys.executable, "-m", "tvorch.cli")
    # `host init` runs inside B once it is up: the AK certification and the node CA name B's hostname.
    with simulated_host(tmp_path_factory.mktemp(f"{PREFIX}node-b"), text, command=cli, init=False) as host:
        namespace = None
        try:
            up = subprocess.run([str(SCRIPT), "up", str(where)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "TVORCH_B_CONFIG": str(host.config)})
            assert up.returncode == 0, up.stderr
            b_uri = _uris(where)[0]
            node = Node("b", host.config, where / "state", b_uri, b_uri, host, prefix)
            namespace = node.sh("readlink /proc/self/ns/mnt").stdout.strip()
            assert namespace != os.readlink("/proc/self/ns/mnt")
            node.run("host", "init")
            _make_tvorch_node(node, guest_dir, fleet)
            yield node
        finally:
            down = subprocess.run([str(SCRIPT), "down", str(where)], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr
            assert not where.exists()
            assert namespace is None or not _in_namespace(namespace), "processes left in node B's namespace"
