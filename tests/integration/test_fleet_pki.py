"""Fleet PKI with a real launch: the node CA joins a root made with openssl; the vTPM's EK certificate
(`tvorch vtpm ek --pem`) then chains to that root under `openssl verify`, and so do the guest's manifest and
a fresh evidence bundle under `tvorch manifest verify` / `tvorch verify` given only the root.

It reuses the session's booted guest, launched before the node joined: what was issued then must still
verify. The session's node CA certificate is put back afterwards (same key and subject either way).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_fleet_pki import Fleet
from tvorch.adapters.files import atomic_write
from tvorch.errors import ExitCode

from .conftest import BootedGuest, Tv

pytestmark = pytest.mark.integration


@pytest.fixture
def joined(tv: Tv, tmp_path: Path):
    """The session node under a fleet root, for one test; its self-signed CA certificate restored after."""
    pki = tv.state_dir / "pki"
    selfsigned = (pki / "ca.pem").read_bytes()
    fleet = Fleet.make(tmp_path / "fleet")
    try:
        tv.run("ca", "csr", "--out", str(tmp_path / "node-ca.csr"))
        cert = fleet.issue(tmp_path / "node-ca.csr", tmp_path / "node-ca.pem")
        tv.run("ca", "install", str(cert), "--chain", str(fleet.chain))
        yield fleet
    finally:
        atomic_write(pki / "ca.pem", selfsigned, 0o644)
        (pki / "chain.pem").unlink(missing_ok=True)


def test_the_ek_manifest_and_bundle_of_a_real_launch_chain_to_the_fleet_root(
        tv: Tv, booted_guest: BootedGuest, joined: Fleet, tmp_path: Path) -> None:
    name = booted_guest.name
    chain = tmp_path / "chain.pem"
    chain.write_text(tv.run("ca", "show", "--chain", "--pem").stdout)
    ek = tmp_path / "ek.pem"
    ek.write_text(tv.run("vtpm", "ek", name, "--pem").stdout)
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(joined.root), "-untrusted", str(chain), str(ek)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{ek}: OK", proc.stdout + proc.stderr
    assert "valid: issued by the node CA" in tv.json("vtpm", "ek", name)["chain"]

    # The manifest was signed before the node joined: it carries no chain; the node's chain completes it.
    manifest = tmp_path / "manifest.json"
    tv.run("manifest", "show", name, "--out", str(manifest))
    proc = tv.run("manifest", "verify", str(manifest), "--ca", str(joined.root), check=False)
    assert proc.returncode == ExitCode.TRUST_REFUSED and "not by the CA 'CN=Fleet Root'" in proc.stderr
    tv.run("manifest", "verify", str(manifest), "--ca", str(joined.root), "--chain", str(chain))

    # A bundle made now carries the chain: the root alone verifies it (this config has no host attestation).
    nonce = secrets.token_hex(16)
    bundle = tmp_path / "bundle.json"
    tv.run("attest", name, "--nonce", nonce, "--out", str(bundle), "--timeout", "120", check=False)
    assert bundle.exists()
    proc = tv.run("verify", str(bundle), "--ca", str(joined.root), "--nonce", nonce, "--skip-check", "host",
                  "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["passed"], proc.stdout
    node = next(c for c in result["checks"] if c["name"] == "node certificate")
    assert node["detail"].endswith("under the root 'CN=Fleet Root'")
    other = Fleet.make(tmp_path / "other", "Other")
    proc = tv.run("verify", str(bundle), "--ca", str(other.root), "--nonce", nonce, "--skip-check", "host",
                  check=False)
    assert proc.returncode == ExitCode.TRUST_REFUSED
    assert "'CN=Fleet Root': a self-signed root that is not the root given ('CN=Other Root')" in proc.stdout
