"""Host attestation end to end: a real swtpm as the host TPM, real logs, the CLI.

The "host" is a swtpm whose PCRs are extended with the events of a UEFI event
log captured from the test guest under OVMF (tests/data/eventlogs) and with an
IMA measurement list, in the kernel's binary format, that measures the
binaries trusted launch relies on with their real digests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.host_fixtures import EVENTLOG, Host, sha256, simulated_host
from tvorch.adapters.node_keys import load_or_create
from tvorch.adapters.tpm import open_tpm, read_ak
from tvorch.core.attestation.akcert import verify_host_ak_certification
from tvorch.config import parse_config
from tvorch.core.attestation.eventlog import parse_event_log, replay
from tvorch.core.attestation.ima import ima_ng_entry
from tvorch.service.host import must_measure

pytestmark = pytest.mark.integration

@pytest.fixture
def host(tmp_path: Path):
    with simulated_host(tmp_path) as node:
        yield node


def baseline(host: Host) -> dict:
    assert host.run("host", "baseline", "--out", str(host.root / "host-policy.json")).returncode == 0
    return json.loads((host.root / "host-policy.json").read_text())


def test_init_is_idempotent(host: Host):
    first, second = host.json("host", "init"), host.json("host", "init")
    assert first["ak_fingerprint"] == second["ak_fingerprint"]
    assert first["ak_certification"] == second["ak_certification"]  # certified once per AK
    assert oct((host.root / "state" / "host" / "ak.priv").stat().st_mode & 0o777) == "0o600"
    assert oct((host.root / "state" / "host" / "ak-cert.json").stat().st_mode & 0o777) == "0o600"


def test_init_certifies_the_ak_by_credential_activation_against_the_tpms_ek(host: Host):
    """Issue #13: the host section proved nothing beyond the node key; now the AK is tied to the TPM's EK."""
    statement = host.json("host", "init")["ak_certification"]
    identity = load_or_create(host.root / "state", "unused")
    cert = verify_host_ak_certification(statement, identity.signing_cert.public_key())
    ak = read_ak(host.root / "state")
    assert ak is not None and cert.ak_public == ak.public and cert.hostname == socket.gethostname()
    with open_tpm(host.tcti) as tpm:
        assert cert.ek_public == tpm.ek_public()  # the EK this TPM derives, which released the credential
    # A certification of another AK (the AK was replaced behind tvorch's back) is made again, by activation.
    (host.root / "state" / "host" / "ak-cert.json").write_text(json.dumps({**statement, "ak_public": "AAAA"}))
    assert host.json("host", "init")["ak_certification"]["certified_at"] >= statement["certified_at"]
    assert json.loads((host.root / "state" / "host" / "ak-cert.json").read_text())["ak_public"] == statement["ak_public"]


def test_quote_file_verifies_and_carries_the_logs(host: Host):
    out = host.root / "quote.json"
    host.json("host", "quote", "--nonce", "00112233445566778899aabbccddeeff", "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["nonce"] == "00112233445566778899aabbccddeeff"
    # host.pcrs (0-7 and 10), and 8-9 because IMA's boot_aggregate covers them.
    assert sorted(map(int, doc["pcrs"])) == list(range(11))
    assert doc["eventlog"] and doc["ima_log"]
    expected = replay(parse_event_log(EVENTLOG.read_bytes()), "sha256", range(8))
    assert {int(i): v for i, v in doc["pcrs"].items() if int(i) < 8} == expected


def test_baseline_then_attest_passes(host: Host):
    policy = baseline(host)
    assert set(policy["ima"]["required"]) == set(must_measure(parse_config(host.config.read_bytes())))
    assert policy["pcrs"]["0"] == replay(parse_event_log(EVENTLOG.read_bytes()), "sha256", [0])[0]
    verdict = host.json("host", "attest")
    assert verdict["passed"] is True and verdict["failures"] == []
    status = host.json("host", "status")
    assert status["passed"] is True and status["age_seconds"] < 60


def test_changed_boot_and_unknown_program_are_all_listed(host: Host):
    baseline(host)
    with open_tpm(host.tcti) as tpm:
        tpm.extend(4, {"sha256": sha256(b"a boot loader nobody measured into the log")})
    host.measure(ima_ng_entry("/opt/evil/miner", sha256(b"evil")))
    proc = host.run("host", "attest")
    assert proc.returncode == 12
    assert proc.stderr.strip().splitlines()[-1].startswith("tvorch: error: host attestation failed")
    failures = host.json("host", "status")["failures"]
    text = "\n".join(failures)
    assert "PCR 4: quoted" in text  # against the policy's reference value
    assert "PCR 4: event log replays" in text  # the log no longer explains the PCR
    assert "/opt/evil/miner" in text
    assert host.json("host", "status")["passed"] is False


def test_a_boot_aggregate_that_is_not_the_quoted_boot_pcrs_fails(host: Host, tmp_path: Path):
    """An IMA list whose first entry does not hash the quoted PCRs 0-9 is not this boot's (issue #12)."""
    policy = host.root / "host-policy.json"
    assert host.run("host", "baseline", "--out", str(policy)).returncode == 0
    with simulated_host(tmp_path / "other", boot_aggregate=sha256(b"another boot")) as other:
        proc = other.run("host", "baseline", "--out", str(other.root / "host-policy.json"))
        assert proc.returncode == 12 and "boot_aggregate" in proc.stderr, proc.stderr
        # Same boot PCRs and files as HOST: HOST's reviewed policy fits it but for boot_aggregate.
        (other.root / "host-policy.json").write_bytes(policy.read_bytes())
        assert other.run("host", "attest").returncode == 12
        failures = other.json("host", "status")["failures"]
        assert len(failures) == 1 and failures[0].startswith(
            f"IMA: boot_aggregate {sha256(b'another boot').hex()[:16]}... is not the digest of the quoted PCRs 0-9")


def test_garbled_logs_are_failures_not_crashes(host: Host):
    baseline(host)
    data = host.ima_log.read_bytes()
    host.ima_log.write_bytes(data[: len(data) - 7])
    garbled = host.root / "garbled.bin"
    garbled.write_bytes(EVENTLOG.read_bytes()[:300])
    host.config.write_text(host.config.read_text().replace(str(EVENTLOG), str(garbled)))
    proc = host.run("host", "attest")
    assert proc.returncode == 12, proc.stderr
    text = "\n".join(host.json("host", "status")["failures"])
    assert "event log:" in text and "IMA:" in text


def test_wrong_nonce_and_missing_policy(host: Host):
    proc = host.run("host", "attest")
    assert proc.returncode == 8 and "no host policy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = host.run("host", "quote", "--nonce", "xyz", "--out", str(host.root / "q.json"))
    assert proc.returncode == 3 and not (host.root / "q.json").exists()


def test_policy_must_require_what_launch_relies_on(host: Host):
    policy = baseline(host)
    policy["ima"]["required"] = [p for p in policy["ima"]["required"] if "swtpm" not in p]
    (host.root / "host-policy.json").write_text(json.dumps(policy))
    assert host.run("host", "attest").returncode == 12
    assert any("does not require /usr/bin/swtpm" in f for f in host.json("host", "status")["failures"])


def test_attest_without_init(tmp_path: Path):
    config = tmp_path / "tvorch.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[host]\npolicy = "{os.devnull}"\n')
    proc = subprocess.run([sys.executable, "-m", "tvorch.cli", "--config", str(config), "host", "quote",
                           "--nonce", "00" * 16, "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert proc.returncode == 11 and "tvorch host init" in proc.stderr


def test_daemon_keeps_the_verdict_fresh(host: Host):
    """`tvorch serve` attests every serve.attest_interval seconds."""
    baseline(host)
    host.config.write_text(host.config.read_text() + "[serve]\nattest_interval = 1\n")
    log = open(host.root / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tvorch.cli", "--config", str(host.config), "serve"],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while len(set(seen)) < 2 and time.monotonic() < deadline:
            status = host.run("host", "status", "--json")
            doc = json.loads(status.stdout) if status.returncode == 0 else {}
            if doc.get("passed"):
                seen.append(doc["at"])
            time.sleep(0.5)
        assert len(set(seen)) >= 2, (host.root / "serve.log").read_text()[-2000:]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()
