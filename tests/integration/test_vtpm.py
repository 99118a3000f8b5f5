"""Per-instance vTPMs with the real libvirtd, swtpm, OVMF and test guest.

One guest boots for the read-only checks (the shared `booted_guest`); one more
goes through the life of a vTPM that changes: NV kept across stop/start, a
backup and its restore, a rolled-back state file refused, a host whose boot
state changed and the escrow key that brings the VM back. That guest's key is
sealed to its own stand-in host TPM (a second config on the same store), so
extending that TPM's PCRs leaves every other test's VMs alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.tpm import open_tpm
from tvorch.adapters.store import Store
from tvorch.core.vtpm.ekcert import verify_ek_certificate
from tvorch.core.vtpm.sealed import SealedKey
from tvorch.errors import ExitCode

from .conftest import PREFIX, BootedGuest, Tv, virsh
from .guest import wait_for_ready

pytestmark = pytest.mark.integration

EK_CERT_INDEX = "0x01c00002"


def _vtpm_row(tv: Tv, instance_id: str):
    store = Store(tv.state_dir / "tvorch.db")
    try:
        return store.vtpm(instance_id)
    finally:
        store.close()


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tvorch: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_the_guest_vtpm_is_the_one_tvorch_manufactured(tv: Tv, booted_guest: BootedGuest):
    """The EK the guest reads from its TPM's NV is the certificate tvorch keeps, issued by the node CA."""
    name = booted_guest.name
    pem = tv.run("vtpm", "ek", name, "--pem").stdout.encode()
    cert = x509.load_pem_x509_certificate(pem)
    ca = x509.load_pem_x509_certificate(tv.run("ca", "show", "--pem").stdout.encode())
    verify_ek_certificate(cert, ca, datetime.now(timezone.utc))  # raises if it does not chain
    info = tv.json("vtpm", "ek", name)
    assert info["chain"].startswith("valid")
    assert info["platform_certificate"].startswith("valid"), info  # issued by the node CA for this EK certificate
    assert info["issuer"] == ca.subject.rfc4514_string()

    assert booted_guest.report.ek_cert is not None, "the guest printed no EK certificate"
    assert booted_guest.report.ek_cert == cert.public_bytes(serialization.Encoding.DER)

    # The signed manifest names that EK certificate.
    manifest = json.loads(tv.run("manifest", "show", name, "--json").stdout)
    body = manifest.get("manifest", manifest)
    ek = [m for m in body["measurements"] if m["kind"] == "vtpm-ek"]
    assert len(ek) == 1
    assert ek[0]["digest"] == hashlib.sha256(booted_guest.report.ek_cert).hexdigest()
    assert ek[0]["details"]["ek_fingerprint"] == info["ek_fingerprint"]
    assert ek[0]["details"]["encrypted"] is True


def test_vtpm_record_and_ledger_after_launch(tv: Tv, booted_guest: BootedGuest):
    shown = tv.json("vtpm", "show", booted_guest.name)
    assert shown["key_protection"] == "host-tpm" and shown["sealed"] is True
    assert shown["seal_pcrs"] == [0, 2, 4, 7]
    assert shown["escrow"]  # the tv config names an escrow key
    assert shown["state_dir"] == f"/var/lib/libvirt/swtpm/{booted_guest.record['uuid']}"
    ledger = tv.json("vtpm", "ledger", booted_guest.name)
    assert ledger["intact"] and ledger["entries"][0]["event"] == "manufactured"
    # The domain names the secret; libvirt holds it only during a start.
    xml = virsh("dumpxml", booted_guest.name).stdout
    assert f"<encryption secret='{shown['secret_uuid']}'/>" in xml
    assert shown["secret_uuid"] not in virsh("secret-list").stdout


def test_state_at_rest_is_unreadable_without_the_key(tv: Tv, booted_guest: BootedGuest, host_tpm: str, tmp_path: Path):
    """A copy of the state: swtpm cannot start on it without the key, and with the unsealed key it serves the EK."""
    record = booted_guest.record
    state = Path(f"/var/lib/libvirt/swtpm/{record['uuid']}/tpm2")
    ek_der = x509.load_pem_x509_certificate(tv.run("vtpm", "ek", booted_guest.name, "--pem").stdout.encode()) \
        .public_bytes(serialization.Encoding.DER)
    permall = (state / "tpm2-00.permall").read_bytes()
    assert ek_der not in permall and ek_der[:64] not in permall  # an unencrypted state holds the cert in clear

    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    # Without the key swtpm cannot decrypt the state and gives up at once.
    without = subprocess.run(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={copy}", "--flags", "not-need-init,startup-clear",
         "--server", "type=unixio,path=" + str(tmp_path / "srv"), "--ctrl", "type=unixio,path=" + str(tmp_path / "ctl")],
        capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "Decrypt" in without.stderr, without.stderr

    # With the key unsealed from the host TPM, the same copy serves the EK certificate.
    row = _vtpm_row(tv, record["id"])
    with open_tpm(host_tpm) as tpm:
        key = tpm.unseal(SealedKey.from_bytes(row.sealed_key))
    keyfile = tmp_path / "key"
    keyfile.write_bytes(key)
    keyfile.chmod(0o600)
    with running_swtpm(copy, extra_args=("--key", f"pwdfile={keyfile},mode=aes-256-cbc")) as tcti:
        read = subprocess.run(["tpm2_nvread", EK_CERT_INDEX], capture_output=True, timeout=30,
                              env={**os.environ, "TPM2TOOLS_TCTI": tcti})
    assert read.returncode == 0, read.stderr
    assert read.stdout == ek_der


@pytest.fixture
def own_host_tpm(tv: Tv, tmp_path: Path):
    """A second config on the same store whose host TPM is a swtpm of this test only."""
    with running_swtpm(tmp_path / "host-tpm") as tcti:
        config = tmp_path / "own-tpm.toml"
        text = tv.config.read_text()
        start = text.index('tcti = "')
        end = text.index("\n", start)
        config.write_text(text[:start] + f'tcti = "{tcti}"' + text[end:])
        yield Tv(config=config, state_dir=tv.state_dir, overlay_dir=tv.overlay_dir, log_dir=tv.log_dir), tcti


def test_vtpm_lives_through_stop_start_backup_restore_rollback_and_rekey(
    tv: Tv, own_host_tpm, guest_dir: Path, escrow_key: Path, tmp_path: Path
):
    node, host_tcti = own_host_tpm
    name = f"{PREFIX}vtpm-{secrets.token_hex(2)}"
    try:
        record = node.launch(guest_dir / "guest.qcow2", name)
        first = wait_for_ready(Path(record["console_log"]))
        assert first.nv is not None and first.nv[0] == "stored", first.nv
        stored = first.nv[1]

        # Stop and start: the guest finds the value it stored in its vTPM's NV.
        node.run("stop", name)
        assert node.json("vtpm", "ledger", name)["entries"][-1]["event"] == "stopped"
        node.run("start", name)
        again = wait_for_ready(Path(record["console_log"]))
        assert again.nv == ("found", stored)
        node.run("stop", "--force", name)

        # Backup: a file of the encrypted state, a ledger entry.
        backup = tmp_path / "vtpm.tar"
        done = node.json("vtpm", "backup", name, str(backup))
        assert oct(backup.stat().st_mode & 0o777) == "0o600"
        with tarfile.open(backup) as tar:
            assert sorted(tar.getnames()) == ["state/tpm2-00.permall", "tvorch-vtpm-backup.json"]
        ledger = node.json("vtpm", "ledger", name)["entries"]
        assert ledger[-1]["event"] == "backup" and ledger[-1]["state_digest"] == done["state_digest"]
        state = Path(f"/var/lib/libvirt/swtpm/{record['uuid']}/tpm2")
        old_permall = (state / "tpm2-00.permall").read_bytes()

        # The guest runs on; its state moves on from the backup.
        node.run("start", name)
        wait_for_ready(Path(record["console_log"]))
        node.run("stop", "--force", name)
        moved_on = node.json("vtpm", "show", name)["state_digest"]
        assert moved_on != done["state_digest"]

        # A rolled-back state file put there behind tvorch's back: the hook refuses the start.
        current = (state / "tpm2-00.permall").read_bytes()
        (state / "tpm2-00.permall").write_bytes(old_permall)
        refused = node.run("start", name, check=False)
        assert refused.returncode == ExitCode.LIBVIRT, refused.stderr
        assert "vTPM state differs from the last recorded stop" in _one_error_line(refused)
        assert virsh("domstate", name).stdout.strip() == "shut off"
        (state / "tpm2-00.permall").write_bytes(current)

        # The same old state through `vtpm restore` is recorded, so the start is allowed.
        restored = node.json("vtpm", "restore", name, str(backup))
        assert restored["state_digest"] == done["state_digest"]
        entries = node.json("vtpm", "ledger", name)
        assert entries["intact"] and entries["entries"][-1]["event"] == "restored"
        assert (state / "tpm2-00.permall").read_bytes() == old_permall
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert state.owner() == "tss" and (state / "tpm2-00.permall").owner() == "tss"
        node.run("start", name)
        node.run("stop", "--force", name)

        # The host's boot state changes (PCR 7 extended): the key does not unseal, the start is refused.
        with open_tpm(host_tcti) as tpm:
            tpm.extend(7, {"sha256": hashlib.sha256(b"a firmware update").digest()})
        locked = node.run("start", name, check=False)
        assert locked.returncode == ExitCode.TRUST_REFUSED, locked.stderr
        line = _one_error_line(locked)
        assert "boot state changed" in line and "vtpm rekey" in line
        assert virsh("domstate", name).stdout.strip() == "shut off"
        # Without the escrow key, rekey cannot help; with it, the VM comes back with its vTPM.
        no_escrow = node.run("vtpm", "rekey", name, check=False)
        assert no_escrow.returncode == ExitCode.TRUST_REFUSED and "--escrow-key" in _one_error_line(no_escrow)
        node.run("vtpm", "rekey", name, "--escrow-key", str(escrow_key))
        node.run("start", name)
        back = wait_for_ready(Path(record["console_log"]))
        assert back.nv == ("found", stored)
        assert "vtpm-rekeyed" in [e["kind"] for e in node.json("show", name)["events"]]
    finally:
        node.destroy(name)


def test_backup_and_restore_refusals(tv: Tv, booted_guest: BootedGuest, tmp_path: Path):
    """A running VM is neither backed up nor restored; a backup of another VM or a changed byte is refused."""
    running = tv.run("vtpm", "backup", booted_guest.name, str(tmp_path / "b.tar"), check=False)
    assert running.returncode == ExitCode.CONFLICT and "stop it first" in _one_error_line(running)
    assert not (tmp_path / "b.tar").exists()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file" * 10)
    refused = tv.run("vtpm", "restore", booted_guest.name, str(bad), check=False)
    assert refused.returncode in (ExitCode.CONFLICT, ExitCode.INVALID_INPUT)
    _one_error_line(refused)
