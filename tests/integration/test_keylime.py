"""tvorch's evidence judged by a real Keylime 7.14.3 verifier (tests/keylime_verifier.py), one booted guest.

The node is a simulated host (tests/host_fixtures.py) whose config sets
keylime.verifier_url; the guest is the test guest launched by it. Shown: the
real boot evidence is valid in Keylime with the policies `tvorch keylime
policy` exports; a changed PCR 4 event, a wrong nonce, and an IMA entry
outside the allowlist are invalid in Keylime with the failure named; evidence
tvorch rejects itself (a bad signature) never reaches the verifier, which
would call it valid under a tpm_policy naming no PCR; an unreachable verifier
leaves tvorch's verdict standing and the submission queued.
"""

from __future__ import annotations

import base64
import shutil
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host_fixtures import Host, sha256, simulated_host
from tests.keylime_verifier import KeylimeUnavailable, Verifier, keylime_verifier
from tvorch.adapters.keylime import KeylimeClient
from tvorch.adapters.tpm import HOST_DIR
from tvorch.config import load_config
from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.attestation.ima import ima_ng_entry
from tvorch.core.attestation.keylime import Evidence, evidence_payload
from tvorch.core.attestation.quote import HostQuote
from tvorch.errors import TrustError
from tvorch.service import keylime as service
from tvorch.service.node import Node

from .conftest import Tv
from .test_guest_attestation import guest  # noqa: F401  (the one booted guest of this module, launched by `node`)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def verifier(tmp_path_factory) -> Verifier:
    try:
        with keylime_verifier(tmp_path_factory.mktemp("keylime")) as running:
            yield running
    except KeylimeUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Keylime is required in CI: {err}")
        pytest.skip(f"no Keylime verifier here: {err}")


def keylime_table(url: str, ca: Path) -> str:
    return f'\n[keylime]\nverifier_url = "{url}"\nca_file = "{ca}"\ntimeout = 5\n'


@pytest.fixture(scope="module")
def node(tv: Tv, verifier: Verifier, tmp_path_factory) -> Host:
    root = tmp_path_factory.mktemp("keylime-node")
    # This node shares the session's state (its instances) but has a TPM of its own, so it needs
    # an AK of its own: the session's host AK (if an earlier test made one) is put aside meanwhile.
    host_dir = tv.state_dir / HOST_DIR
    aside = tv.state_dir / f"{HOST_DIR}.session"
    if host_dir.exists():
        host_dir.rename(aside)
    try:
        with simulated_host(root, tv.config.read_text() + keylime_table(verifier.url, verifier.ca_file)) as host:
            proc = host.run("host", "baseline", "--out", str(root / "host-policy.json"))
            assert proc.returncode == 0, proc.stderr
            assert host.json("host", "attest")["passed"] is True
            yield host
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
        if aside.exists():
            aside.rename(host_dir)


def client(verifier: Verifier) -> KeylimeClient:
    return KeylimeClient(verifier.url, str(verifier.ca_file))


def exported(node: Host, name: str, kind: str, tmp: Path) -> dict:
    out = tmp / f"{name}-{kind}.json"
    proc = node.run("keylime", "policy", name, "--kind", kind, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def bundle_evidence(doc: dict, nonce: bytes, eventlog: bytes | None = None) -> Evidence:
    g = doc["guest"]
    return Evidence(nonce=nonce, bank=g["bank"], pcrs={int(k): bytes.fromhex(v) for k, v in g["pcrs"].items()},
                    attest=base64.b64decode(g["attest"]), signature=base64.b64decode(g["signature"]),
                    ak_public=base64.b64decode(g["ak_public"]), ek=doc["vtpm"]["ek_cert_pem"].encode(),
                    eventlog=base64.b64decode(g["eventlog"]) if eventlog is None else eventlog)


@pytest.fixture(scope="module")
def attested(node: Host, guest, tmp_path_factory):  # noqa: F811
    """One `tvorch attest` with Keylime on: its summary, the bundle, its nonce."""
    name, _, _ = guest
    out = tmp_path_factory.mktemp("bundle") / "bundle.json"
    nonce = secrets.token_hex(20)
    proc = node.run("attest", name, "--nonce", nonce, "--out", str(out), "--timeout", "120", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), json.loads(out.read_text()), bytes.fromhex(nonce)


def test_verified_boot_and_host_quote_are_valid_in_keylime(node: Host, guest, attested,  # noqa: F811
                                                            tmp_path: Path):
    name, _, _ = guest
    summary, doc, nonce = attested
    assert summary["keylime"]["guest"] == {"submitted": True, "valid": True, "failures": []}, summary
    assert summary["keylime"]["host"] == {"submitted": True, "valid": True, "failures": []}, summary
    events = node.json("show", name)["events"]
    assert [e for e in events if e["kind"] == "keylime-valid"], events
    proc = node.run("events", name)
    assert proc.returncode == 0 and re.search(r"\bkeylime +valid\b", proc.stdout), proc.stdout + proc.stderr
    # The bundle carries both verdicts, signed; verify shows Keylime's as information.
    assert doc["keylime"] == summary["keylime"]
    ca, bundle = tmp_path / "ca.pem", tmp_path / "bundle.json"
    ca.write_text(node.run("ca", "show", "--pem").stdout)
    bundle.write_text(json.dumps(doc))
    proc = node.run("verify", str(bundle), "--ca", str(ca), "--nonce", nonce.hex(), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"], proc.stdout + proc.stderr
    assert report["checks"][-1]["name"] == "keylime" and report["checks"][-1]["result"] == "info"
    assert "guest valid, host valid" in report["checks"][-1]["detail"]


def test_exported_policies_judge_the_real_boot_valid(node: Host, guest, attested, verifier: Verifier,  # noqa: F811
                                                     tmp_path: Path):
    name, _, _ = guest
    _, doc, nonce = attested
    tpm, mb = exported(node, name, "tpm", tmp_path), exported(node, name, "mb", tmp_path)
    assert set(tpm) - {"mask"} == set(doc["guest"]["pcrs"])  # every quoted PCR named
    assert mb["scrtm_and_bios"][0]["platform_firmware"] and mb["has_secureboot"] is False
    signed = tmp_path / "manifest.json"
    assert node.run("manifest", "show", name, "--out", str(signed)).returncode == 0
    prediction = json.loads(signed.read_text())["manifest"].get("boot_prediction") or {}
    for pcr, value in prediction.get("pcrs", {}).items() if prediction.get("status") == "predicted" else ():
        assert tpm[pcr] == [value], pcr  # the signed prediction, where it covers the PCR
    verdict = client(verifier).verify(evidence_payload(bundle_evidence(doc, nonce), tpm, mb))
    assert verdict.valid, verdict.failures


def test_changed_pcr4_event_wrong_nonce_are_invalid(node: Host, guest, attested, verifier: Verifier,  # noqa: F811
                                                    tmp_path: Path):
    name, _, _ = guest
    _, doc, nonce = attested
    tpm, mb = exported(node, name, "tpm", tmp_path), exported(node, name, "mb", tmp_path)
    raw = base64.b64decode(doc["guest"]["eventlog"])
    app = next(e for e in parse_event_log(raw).events if e.pcr == 4 and e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION")
    digest = bytes.fromhex(app.digests["sha256"])
    assert raw.count(digest) == 1
    changed = raw.replace(digest, sha256(b"another boot application"))
    verdict = client(verifier).verify(evidence_payload(bundle_evidence(doc, nonce, changed), tpm, mb))
    assert not verdict.valid and any(f.startswith("measured_boot.invalid_pcr_4") or "invalid_pcr_4" in f
                                     for f in verdict.failures), verdict.failures

    verdict = client(verifier).verify(evidence_payload(bundle_evidence(doc, secrets.token_bytes(20)), tpm, mb))
    assert not verdict.valid and any("quote_validation" in f and "nonce" in f.lower()
                                     for f in verdict.failures), verdict.failures


def host_quote(node: Host, tmp: Path) -> HostQuote:
    out = tmp / "host-quote.json"
    proc = node.run("host", "quote", "--nonce", secrets.token_hex(20), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return HostQuote.from_json(json.loads(out.read_text()))


def test_bad_signature_is_never_submitted(node: Host, verifier: Verifier, tmp_path: Path):
    cfg = load_config(str(node.config))
    quote = host_quote(node, tmp_path)
    sig = bytearray(quote.signature)
    sig[-1] ^= 1
    forged = HostQuote(**{**quote.__dict__, "signature": bytes(sig)})
    with pytest.raises(TrustError):
        service.host_payload(cfg, forged)
    before = verifier.verifications()
    n = Node(cfg)
    try:
        done = service.submit_host(n, forged)
    finally:
        n.close()
    assert done is not None and done.verdict is None and "not submitted" in (done.queued or "")
    assert verifier.verifications() == before
    # Why: Keylime alone takes that quote as valid when the tpm_policy names no PCR (its weakness here).
    weak = {"type": "tpm", "data": {**evidence_payload(Evidence(
        forged.nonce, forged.bank, forged.pcrs, forged.attest, forged.signature, forged.ak_public,
        forged.ak_pem.encode()), {"mask": "0x0", **{str(i): [v.hex()] for i, v in forged.pcrs.items()}})["data"],
        "tpm_policy": json.dumps({"mask": "0x0"})}}
    assert client(verifier).verify(weak).valid is True


def test_unreachable_keylime_queues_and_status_shows_it(node: Host, guest, verifier: Verifier,  # noqa: F811
                                                        tmp_path: Path):
    name, _, _ = guest
    dead = tmp_path / "dead.toml"
    text = node.config.read_text()
    dead.write_text(text[:text.index("\n[keylime]")] + keylime_table("https://127.0.0.1:9", verifier.ca_file))
    proc = subprocess.run([sys.executable, "-m", "tvorch.cli", "--config", str(dead), "attest", name, "--nonce",
                           secrets.token_hex(16), "--out", str(tmp_path / "b.json"), "--json", "--timeout", "120"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # tvorch's own verdict stands
    summary = json.loads(proc.stdout)
    assert summary["baseline"] == "matches" and summary["keylime"]["guest"]["submitted"] is False
    status = json.loads(node.run("status", "--json").stdout)
    assert status["keylime"]["pending"] >= 1 and "unreachable" in status["keylime"]["last_error"]
    assert "keylime-queued" in [e["kind"] for e in node.json("show", name)["events"]]
    # The verifier back (the node's own config): the daemon's retry submits what waited.
    n = Node(load_config(str(node.config)))
    try:
        assert service.retry_pending(n, now=float("inf")) >= 1
    finally:
        n.close()
    assert json.loads(node.run("status", "--json").stdout)["keylime"]["pending"] == 0
    assert [e for e in node.json("show", name)["events"] if e["kind"] == "keylime-valid"]


def test_the_daemon_submits_its_host_attestations(node: Host, tv: Tv, verifier: Verifier, tmp_path: Path):
    from .test_daemon import start_daemon, stop_daemon, wait_until

    verdict = tv.state_dir / "keylime" / "host.json"
    verdict.unlink(missing_ok=True)
    before = verifier.verifications()
    config = tmp_path / "serve.toml"
    config.write_text(node.config.read_text() + "[serve]\nattest_interval = 2\n")
    proc, _ = start_daemon(tv, tmp_path, config)
    try:
        wait_until(verdict.exists, 60, "Keylime's verdict on a host quote the daemon submitted")
    finally:
        stop_daemon(proc)
    assert json.loads(verdict.read_text())["valid"] is True and verifier.verifications() > before
    status = json.loads(node.run("status", "--json").stdout)
    assert status["keylime"]["host"]["valid"] is True and status["keylime"]["pending"] == 0


def test_ima_entry_outside_the_allowlist_is_invalid(node: Host, verifier: Verifier, tmp_path: Path):
    """Last: it adds a measurement to the host's IMA list."""
    runtime = exported(node, "host", "runtime", tmp_path)
    assert runtime["digests"] and runtime["meta"]["version"] == 1
    node.measure(ima_ng_entry("/usr/local/bin/not-allowed", sha256(b"a binary nobody reviewed")))
    cfg = load_config(str(node.config))
    payload = service.host_payload(cfg, host_quote(node, tmp_path))  # verified here: the quote itself is good
    verdict = client(verifier).verify(payload)
    assert not verdict.valid and any("not_in_allowlist" in f and "/usr/local/bin/not-allowed" in f
                                     for f in verdict.failures), verdict.failures
