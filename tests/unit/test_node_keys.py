"""The node identity on disk: modes, stability, one CA under concurrent first use, crash recovery."""

import multiprocessing
import os
import stat
import time
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import hashes

from tvorch.adapters import node_keys
from tvorch.adapters.node_keys import load_or_create
from tvorch.core.launch.manifest import LaunchManifest, sign_manifest, verify_manifest
from tvorch.core.signing import verify_chain
from tvorch.errors import TrustError

FILES = ("ca.key", "ca.pem", "node.key", "node.pem")


def fingerprint(cert):
    return cert.fingerprint(hashes.SHA256()).hex()


def snapshot(pki):
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(pki.iterdir())}


def test_created_private_and_usable(tmp_path):
    identity = load_or_create(tmp_path / "state", "node1")
    pki = tmp_path / "state" / "pki"
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    modes = {name: stat.S_IMODE((pki / name).stat().st_mode) for name in FILES}
    assert modes == {"ca.key": 0o600, "ca.pem": 0o644, "node.key": 0o600, "node.pem": 0o644}
    assert (pki / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert identity.ca_pem() == (pki / "ca.pem").read_bytes()
    assert identity.ca_cert.subject.rfc4514_string() == "CN=tvorch node CA node1"
    assert identity.signing_cert.subject.rfc4514_string() == "CN=tvorch node signing node1"
    assert "PRIVATE" not in repr(identity) and "ca_key" not in repr(identity)
    now = datetime.now(timezone.utc)
    manifest = LaunchManifest(
        instance_id="i-0123456789ab", uuid="0f8fad5b-d9cb-469f-a165-70867728950e", name="vm1", node="node1",
        created_at=now.isoformat(timespec="milliseconds"), measurements=(), config_digest="c" * 64, policy_digest="d" * 64,
    )
    signed = sign_manifest(manifest, identity.signing_key, identity.signing_cert)
    assert verify_manifest(signed, identity.ca_cert, now) == manifest


def test_stable_across_loads(tmp_path):
    first = load_or_create(tmp_path, "node1")
    before = snapshot(tmp_path / "pki")
    second = load_or_create(tmp_path, "renamed-host")
    assert fingerprint(second.ca_cert) == fingerprint(first.ca_cert)
    assert fingerprint(second.signing_cert) == fingerprint(first.signing_cert)
    assert snapshot(tmp_path / "pki") == before


def _create_in_child(state_dir, barrier, results):
    barrier.wait()
    try:
        results.put(fingerprint(load_or_create(state_dir, f"node-{os.getpid()}").ca_cert))
    except Exception as err:  # report it: the parent asserts on what every child saw
        results.put(f"{type(err).__name__}: {err}")


def test_concurrent_first_use_makes_one_ca(tmp_path, monkeypatch):
    real_make_ca = node_keys.make_ca

    def slow_make_ca(*args):  # widen the window in which a second CA could be made
        time.sleep(0.2)
        return real_make_ca(*args)

    monkeypatch.setattr(node_keys, "make_ca", slow_make_ca)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    children = [ctx.Process(target=_create_in_child, args=(tmp_path, barrier, results)) for _ in range(4)]
    for child in children:
        child.start()
    fingerprints = [results.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert all(len(f) == 64 for f in fingerprints), fingerprints
    assert len(set(fingerprints)) == 1
    assert fingerprint(load_or_create(tmp_path, "node1").ca_cert) == fingerprints[0]


@pytest.mark.parametrize("lost", [("node.key", "node.pem"), ("node.pem",), ("node.key",)])
def test_lost_node_files_are_reissued_by_the_same_ca(tmp_path, lost):
    first = load_or_create(tmp_path, "node1")
    for name in lost:
        (tmp_path / "pki" / name).unlink()
    second = load_or_create(tmp_path, "node1")
    assert fingerprint(second.ca_cert) == fingerprint(first.ca_cert)
    assert fingerprint(second.signing_cert) != fingerprint(first.signing_cert)
    verify_chain(second.signing_cert, first.ca_cert, datetime.now(timezone.utc))
    assert stat.S_IMODE((tmp_path / "pki" / "node.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("lost, present", [("ca.key", "ca.pem"), ("ca.pem", "ca.key")])
def test_incomplete_ca_is_refused_and_nothing_changes(tmp_path, lost, present):
    load_or_create(tmp_path, "node1")
    pki = tmp_path / "pki"
    (pki / lost).unlink()
    before = snapshot(pki)
    with pytest.raises(TrustError, match=f"{pki / lost} is missing but {present} exists"):
        load_or_create(tmp_path, "node1")
    assert snapshot(pki) == before


def test_missing_ca_with_node_files_left_is_refused(tmp_path):
    load_or_create(tmp_path, "node1")
    pki = tmp_path / "pki"
    (pki / "ca.key").unlink()
    (pki / "ca.pem").unlink()
    before = snapshot(pki)
    with pytest.raises(TrustError, match="never replaces a CA"):
        load_or_create(tmp_path, "node1")
    assert snapshot(pki) == before


def test_key_readable_by_others_is_refused(tmp_path):
    load_or_create(tmp_path, "node1")
    os.chmod(tmp_path / "pki" / "node.key", 0o644)
    with pytest.raises(TrustError, match="node.key is readable by others \\(mode 0644\\)"):
        load_or_create(tmp_path, "node1")


def test_key_not_matching_its_certificate_is_refused(tmp_path):
    load_or_create(tmp_path, "node1")
    other = tmp_path / "other"
    load_or_create(other, "node1")
    (tmp_path / "pki" / "node.key").write_bytes((other / "pki" / "node.key").read_bytes())
    with pytest.raises(TrustError, match="node.key does not match .*node.pem"):
        load_or_create(tmp_path, "node1")
