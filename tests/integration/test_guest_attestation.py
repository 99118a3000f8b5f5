"""Guest attestation and the evidence bundle, with the real libvirtd, swtpm, OVMF and the test guest's agent.

The node here is a config on the test store whose host TPM is a simulated host
(tests/host_fixtures.py: a swtpm that measured a real UEFI log and IMA list),
attested once so the bundle carries a passing host verdict and a host quote.
One guest boots for the bundle checks; the same guest is then changed the way
a guest's own kernel update changes it (a new UKI written to its disk), and
its next boot must be named as differing from its baseline.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.host_fixtures import Host, simulated_host
from tvorch.config import parse_config
from tvorch.core.attestation.eventlog import parse_event_log, replay
from tvorch.core.attestation.guest_baseline import compare
from tvorch.errors import ExitCode

from .conftest import PREFIX, BootedGuest, Tv, virsh
from .guest import wait_for_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tv: Tv, tmp_path_factory) -> Host:
    root = tmp_path_factory.mktemp("attested-node")
    with simulated_host(root, tv.config.read_text()) as host:
        proc = host.run("host", "baseline", "--out", str(root / "host-policy.json"))
        assert proc.returncode == 0, proc.stderr
        assert host.json("host", "attest")["passed"] is True
        yield host


@pytest.fixture(scope="module")
def ca(node: Host) -> Path:
    path = node.root / "node-ca.pem"
    path.write_text(node.run("ca", "show", "--pem").stdout)
    return path


@pytest.fixture(scope="module")
def guest(node: Host, guest_dir: Path):
    name = f"{PREFIX}attest-{secrets.token_hex(2)}"
    record = node.json("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "512")
    report = wait_for_ready(Path(record["console_log"]))
    yield name, record, report
    node.run("destroy", "--purge-vtpm", name)


def attest(node: Host, name: str, out: Path, nonce: str) -> subprocess.CompletedProcess[str]:
    return node.run("attest", name, "--nonce", nonce, "--out", str(out), "--timeout", "120")


def verify(node: Host, bundle: Path, ca: Path, nonce: str, *extra: str) -> tuple[int, dict]:
    proc = node.run("verify", str(bundle), "--ca", str(ca), "--nonce", nonce, "--json", *extra)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def failed_checks(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if c["result"] == "fail"]


def test_attest_then_verify_offline(node: Host, guest, ca: Path, tmp_path: Path):
    name, record, report = guest
    nonce = secrets.token_hex(20)
    bundle = tmp_path / "bundle.json"
    proc = attest(node, name, bundle, nonce)
    assert proc.returncode == 0, proc.stderr
    rc, result = verify(node, bundle, ca, nonce)
    assert rc == 0, result
    assert result["passed"] and [c["name"] for c in result["checks"]] == [
        "format", "node certificate", "bundle signature", "bundle age", "launch manifest", "live configuration",
        "vTPM EK certificate", "AK certification", "guest quote", "guest event log", "baseline", "prediction",
        "host"]
    host_detail = result["checks"][-1]["detail"]  # the host AK certified at `host init`, IMA's boot_aggregate
    assert result["created_at"] and "by the host AK certified at" in host_detail
    assert "boot_aggregate is the quoted PCRs 0-9" in host_detail
    # The text form is a table, one line per check.
    table = node.run("verify", str(bundle), "--ca", str(ca), "--nonce", nonce, "--max-age", "10m").stdout
    assert table.count("PASS") == 13 and "FAIL" not in table

    doc = json.loads(bundle.read_text())
    assert doc["instance"] == {"id": record["id"], "name": name, "uuid": record["uuid"]}
    # What the guest's kernel shows in sysfs, what the bundle quotes, and the replay of its log agree.
    eventlog = tmp_path / "guest-eventlog.bin"
    eventlog.write_bytes(base64.b64decode(doc["guest"]["eventlog"]))
    replayed = json.loads(node.run("eventlog", "replay", str(eventlog), "--json").stdout)["pcrs"]
    for pcr in range(10):
        assert report.pcrs[pcr] == doc["guest"]["pcrs"][str(pcr)], pcr
        if str(pcr) in replayed:
            assert replayed[str(pcr)] == report.pcrs[pcr], pcr
    # The AK was certified once, against the EK tvorch issued; a second attest reuses it.
    events = [e["kind"] for e in node.json("show", name)["events"]]
    assert events.count("ak-certified") == 1 and "baseline-predicted" in events and "baseline-learned" not in events
    # The first boot was judged against the launch manifest's signed prediction, and matched it.
    prediction = node.json("manifest", "show", name)["manifest"]["boot_prediction"]
    assert prediction["status"] == "predicted" and {4, 5, 11} <= set(prediction["covered"])
    checks = {c["name"]: c["detail"] for c in result["checks"]}
    assert checks["prediction"].startswith(f"quoted PCRs {','.join(map(str, sorted(prediction['covered'])))} are "
                                           "the launch manifest's prediction")
    shown = node.json("baseline", "show", name)
    assert shown["baseline"]["source"] == "predicted" and "matching the launch prediction" in shown["baseline"]["reason"]
    assert shown["boots"][0]["verdict"]["first_boot"] == "judged against the launch prediction"
    assert attest(node, name, tmp_path / "again.json", secrets.token_hex(16)).returncode == 0
    assert [e["kind"] for e in node.json("show", name)["events"]].count("ak-certified") == 1


def test_a_certified_ak_the_vtpm_does_not_hold_is_not_believed(node: Host, guest, ca: Path, tmp_path: Path):
    """attest asks a guest whose AK it certified for the quote alone (no hello). A quote that AK did not
    sign (the vTPM's AK changed since) is not evidence: tvorch says hello, certifies the AK the agent
    reports against the EK, and the bundle verifies."""
    name, record, _ = guest
    assert attest(node, name, tmp_path / "first.json", secrets.token_hex(16)).returncode == 0
    db = parse_config(node.config.read_bytes()).db_path
    with sqlite3.connect(db) as conn:
        (real,) = conn.execute("SELECT ak_public FROM guest_aks WHERE instance_id = ?", (record["id"],)).fetchone()
        other = bytes(real[:-1]) + bytes([real[-1] ^ 1])  # another key than the one in the vTPM
        conn.execute("UPDATE guest_aks SET ak_public = ? WHERE instance_id = ?", (other, record["id"]))
    certified = [e["kind"] for e in node.json("show", name)["events"]].count("ak-certified")
    nonce = secrets.token_hex(20)
    proc = attest(node, name, tmp_path / "again.json", nonce)
    assert proc.returncode == 0, proc.stderr
    assert [e["kind"] for e in node.json("show", name)["events"]].count("ak-certified") == certified + 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT ak_public FROM guest_aks WHERE instance_id = ?",
                            (record["id"],)).fetchone()[0] == real
    doc = json.loads((tmp_path / "again.json").read_text())
    assert base64.b64decode(doc["guest"]["ak_public"]) == bytes(real)
    rc, result = verify(node, tmp_path / "again.json", ca, nonce)
    assert rc == 0 and result["passed"], failed_checks(result)


_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as err:
    print(type(err).__name__)
    sys.exit(3)
print("connected")
"""


def channel_socket(name: str) -> str:
    root = ET.fromstring(virsh("dumpxml", name).stdout)
    paths = [c.find("source").get("path") for c in root.iter("channel") if c.get("type") == "unix"]
    assert len(paths) == 1, paths
    return paths[0]


def test_no_qemu_can_reach_an_instance_attestation_channel(node: Host, guest, booted_guest: BootedGuest,
                                                          tmp_path: Path):
    """Issue #13: every QEMU runs as libvirt-qemu; one that connects to another VM's attestation socket
    (QEMU serves one client at a time) makes that VM's `tvorch attest` fail. Only tvorch may connect."""
    name, _, _ = guest
    for domain in (name, booted_guest.name):
        path = channel_socket(domain)
        proc = subprocess.run(["runuser", "-u", "libvirt-qemu", "--", "/usr/bin/python3", "-c", _CONNECT, path],
                              capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout.strip()) == (3, "PermissionError"), (domain, path, proc)
    assert attest(node, name, tmp_path / "bundle.json", secrets.token_hex(16)).returncode == 0


def test_a_disk_hot_plugged_into_the_running_vm_fails_verify(node: Host, guest, ca: Path, tmp_path: Path, tv: Tv):
    """Issue #13: `virsh attach-disk --live` changes what runs; the hook never sees it, so the bundle must
    (and `tvorch serve` records it as it happens)."""
    from .test_daemon import start_daemon, stop_daemon, wait_until

    name, record, _ = guest
    disk = Path(f"/var/lib/libvirt/images/{PREFIX}hotplug-{secrets.token_hex(3)}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    nonce = secrets.token_hex(16)
    service = Tv(config=node.config, state_dir=tv.state_dir, overlay_dir=tv.overlay_dir, log_dir=tv.log_dir)
    proc, _ = start_daemon(service, tmp_path)
    try:
        virsh("attach-disk", name, str(disk), "sdz", "--targetbus", "usb", "--subdriver", "qcow2", "--live")
        wait_until(lambda: any(e["kind"] == "live-change" and "added" in e["detail"]
                               for e in node.json("show", name)["events"]), what="the hot-plug recorded")
        # The bundle is written (a relying party may want it), and attest itself fails, naming the change.
        attested = attest(node, name, tmp_path / "changed.json", nonce)
        assert attested.returncode == ExitCode.TRUST_REFUSED, attested.stderr
        assert "running configuration" in attested.stderr and "changed while it runs" in attested.stderr
        assert len(attested.stderr.strip().splitlines()) == 1, attested.stderr
        rc, result = verify(node, tmp_path / "changed.json", ca, nonce)
        assert rc == ExitCode.TRUST_REFUSED and failed_checks(result) == ["live configuration"], result
        assert "changed while running" in [c for c in result["checks"] if c["name"] == "live configuration"][0][
            "detail"]
        assert "live-config-differs" in [e["kind"] for e in node.json("show", name)["events"]]
    finally:
        virsh("detach-disk", name, "sdz", "--live", check=False)
        for _ in range(50):
            if str(disk) not in virsh("dumpxml", name).stdout:
                break
            time.sleep(0.2)
        disk.unlink()
        try:
            wait_until(lambda: any(e["kind"] == "live-change" and "removed" in e["detail"]
                                   for e in node.json("show", name)["events"]), what="the unplug recorded")
        finally:
            assert stop_daemon(proc) == 0
    # Unplugged again: the VM runs as launched, and the bundle says so.
    assert attest(node, name, tmp_path / "again.json", nonce).returncode == 0
    rc, result = verify(node, tmp_path / "again.json", ca, nonce)
    assert rc == 0, result


def test_the_service_attests_every_boot(node: Host, guest, tv: Tv, tmp_path: Path):
    """`tvorch serve` attests the boot libvirt starts, once the agent answers, and records its verdict."""
    from .test_daemon import start_daemon, stop_daemon, wait_until

    name, _, _ = guest
    service = Tv(config=node.config, state_dir=tv.state_dir, overlay_dir=tv.overlay_dir, log_dir=tv.log_dir)
    before = len(node.json("baseline", "show", name)["boots"])
    proc, _ = start_daemon(service, tmp_path)
    try:
        # An orderly stop (ACPI): a forced one is a TPM reset without TPM2_Shutdown, which the
        # vTPM counts against dictionary-attack lockout, and a few of them lock the agent's AK out.
        assert node.run("stop", name).returncode == 0
        assert node.run("start", name).returncode == 0
        wait_until(lambda: len(node.json("baseline", "show", name)["boots"]) > before, timeout=180,
                   what="the new boot attested by tvorch serve")
    finally:
        assert stop_daemon(proc) == 0
    boot = node.json("baseline", "show", name)["boots"][-1]
    assert boot["matches"] is True and boot["verdict"]["baseline"] == "matches"


def test_a_changed_or_foreign_bundle_fails_with_its_reason(node: Host, guest, ca: Path, tmp_path: Path,
                                                           booted_guest: BootedGuest, tv: Tv):
    name, record, _ = guest
    nonce = secrets.token_hex(16)
    bundle = tmp_path / "bundle.json"
    assert attest(node, name, bundle, nonce).returncode == 0
    doc = json.loads(bundle.read_text())

    rc, result = verify(node, bundle, ca, secrets.token_hex(16))  # not the nonce it was made for
    assert rc == ExitCode.TRUST_REFUSED and "guest quote" in failed_checks(result)

    other_ca = tmp_path / "other-ca.pem"  # a CA that did not issue the EK (nor the node certificate)
    other = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", str(tmp_path / "k.pem"), "-subj", "/CN=another CA", "-days", "1",
                            "-out", str(other_ca)], capture_output=True)
    assert other.returncode == 0, other.stderr
    rc, result = verify(node, bundle, other_ca, nonce)
    assert rc == ExitCode.TRUST_REFUSED and {"node certificate", "vTPM EK certificate"} <= set(failed_checks(result))

    for field in ("manifest", "guest", "vtpm", "instance", "host", "ak_certification", "created_at"):
        changed = dict(doc)
        if field == "created_at":
            changed[field] = "2020-01-01T00:00:00.000+00:00"
        elif field == "manifest":
            raw = bytearray(base64.b64decode(doc["manifest"]))
            raw[len(raw) // 2] ^= 1
            changed[field] = base64.b64encode(bytes(raw)).decode()
        elif field == "guest":
            changed[field] = {**doc["guest"], "pcrs": {**doc["guest"]["pcrs"], "4": "00" * 32}}
        elif field == "vtpm":
            changed[field] = {"ek_cert_pem": doc["vtpm"]["ek_cert_pem"].replace("A", "B", 1)}
        elif field == "instance":
            changed[field] = {**doc["instance"], "uuid": "00000000-0000-4000-8000-000000000000"}
        elif field == "host":
            changed[field] = {**doc["host"], "verdict": {**doc["host"]["verdict"], "passed": False}}
        else:
            name_hex = doc[field]["ak_name"]
            changed[field] = {**doc[field], "ak_name": name_hex[:-1] + ("0" if name_hex[-1] != "0" else "1")}
        path = tmp_path / f"changed-{field}.json"
        path.write_text(json.dumps(changed))
        rc, result = verify(node, path, ca, nonce)
        assert rc == ExitCode.TRUST_REFUSED, field
        assert "bundle signature" in failed_checks(result), (field, result)

    # Another VM's evidence: its guest section spliced into this bundle, or its whole bundle taken for this VM.
    theirs = tmp_path / "theirs.json"
    proc = tv.run("attest", booted_guest.name, "--nonce", nonce, "--out", str(theirs), "--timeout", "120",
                  check=False)
    assert theirs.exists(), proc.stderr  # written even though that node has no host evidence
    spliced = {**doc, "guest": json.loads(theirs.read_text())["guest"]}
    (tmp_path / "spliced.json").write_text(json.dumps(spliced))
    rc, result = verify(node, tmp_path / "spliced.json", ca, nonce)
    # Its quote is good on its own, but by an AK the node never certified for this VM (and unsigned here).
    assert rc == ExitCode.TRUST_REFUSED
    assert {"bundle signature", "AK certification"} <= set(failed_checks(result))
    rc, result = verify(node, theirs, ca, nonce, "--uuid", record["uuid"])
    assert rc == ExitCode.TRUST_REFUSED and "instance" in failed_checks(result)
    assert "host" in failed_checks(result)  # that config has no host attestation: said, not hidden
    # What `make demo` does on a node without measured boot: the host check is shown skipped, not passed.
    rc, result = verify(node, theirs, ca, nonce, "--skip-check", "host")
    assert rc == 0 and result["passed"] and result["skipped"] == ["host"], result
    host = result["checks"][-1]
    assert (host["name"], host["result"], host["passed"]) == ("host", "skipped", False)
    assert "it fails: no host" in host["detail"]  # quote (this config has no host AK), or evidence at all


def _esp_offset(raw: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    return table["partitions"][0]["start"] * table.get("sectorsize", 512)


def install_changed_uki(overlay: Path, work: Path) -> None:
    """What a kernel update inside the guest does: a new UKI on its ESP, written into the overlay in place.

    The new UKI differs in its .osrel section (same length, so the PE layout
    holds): firmware measures a different boot application (PCR 4) and
    systemd-stub a different section (PCR 11). The overlay keeps its inode
    and backing file, so the hook lets the start through: only attestation
    can tell.
    """
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    offset = _esp_offset(raw)
    uki = work / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-n", "-i", f"{raw}@@{offset}", "::EFI/BOOT/BOOTX64.EFI", str(uki)], check=True)
    osrel = work / "osrel"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.osrel", str(uki), str(osrel)], check=True)
    text = osrel.read_bytes()
    assert b"=" in text
    changed_osrel = work / "osrel.new"
    changed_osrel.write_bytes(text.replace(b"=", b"~", 1) if b"~" not in text else text.replace(b"~", b"=", 1))
    new_uki = work / "BOOTX64.new.EFI"
    subprocess.run(["objcopy", f"--update-section=.osrel={changed_osrel}", str(uki), str(new_uki)], check=True)
    before = raw.read_bytes()
    subprocess.run(["mcopy", "-o", "-i", f"{raw}@@{offset}", str(new_uki), "::EFI/BOOT/BOOTX64.EFI"], check=True)
    after = raw.read_bytes()
    chunk = 64 * 1024
    changed = [i for i in range(0, len(after), chunk) if before[i:i + chunk] != after[i:i + chunk]]
    assert changed
    for start in changed:
        piece = work / "piece"
        piece.write_bytes(after[start:start + chunk])
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {piece} {start} {len(after[start:start + chunk])}",
                        str(overlay)], check=True, capture_output=True)


def test_a_uki_changed_before_the_first_boot_is_refused_against_the_prediction(node: Host, guest_dir: Path,
                                                                             ca: Path, tmp_path: Path):
    """The attack a launch prediction stops: the overlay rewritten between launch and the first verified boot.

    Launch predicts the first boot from the image and signs it; the instance is
    then stopped before anything attested it, and a UKI one byte different
    (its .osrel) is written into its overlay in place, which the hook cannot
    see (same inode, same backing file). Learning on first boot would take it
    as the baseline; judged against the prediction it is refused, named, and
    not learned.
    """
    name = f"{PREFIX}predict-{secrets.token_hex(2)}"
    record = node.json("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "512")
    try:
        node.run("stop", "--force", name)
        install_changed_uki(Path(record["overlay"]), tmp_path)
        assert node.run("start", name).returncode == 0  # the hook sees the same overlay and configuration
        wait_for_ready(Path(record["console_log"]))
        nonce = secrets.token_hex(16)
        proc = attest(node, name, tmp_path / "tampered.json", nonce)
        assert proc.returncode == ExitCode.TRUST_REFUSED, proc.stderr
        assert "differs from the launch manifest's boot prediction (not learned)" in proc.stderr
        assert "PCR4: EV_EFI_BOOT_SERVICES_APPLICATION: predicted " in proc.stderr
        assert "PCR11: EV_IPL: predicted " in proc.stderr
        shown = node.json("baseline", "show", name)
        assert shown["baseline"] is None  # never learned
        assert shown["boots"][-1]["matches"] is False
        assert {d["pcr"] for d in shown["boots"][-1]["verdict"]["differences"]} == {4, 11}
        assert "boot-differs-from-prediction" in [e["kind"] for e in node.json("show", name)["events"]]
        # A second attestation of the same boot is refused again: nothing was learned in between.
        assert attest(node, name, tmp_path / "again.json", secrets.token_hex(16)).returncode == ExitCode.TRUST_REFUSED
        # The tenant's verify names the same PCRs in its prediction check.
        rc, report = verify(node, tmp_path / "tampered.json", ca, nonce)
        assert rc != 0 and failed_checks(report) == ["prediction"], report
        detail = {c["name"]: c["detail"] for c in report["checks"]}["prediction"]
        assert detail.startswith("quoted PCRs 4,11 are not the launch manifest's prediction: PCR4: "
                                 "EV_EFI_BOOT_SERVICES_APPLICATION: predicted "), detail
    finally:
        node.run("destroy", "--purge-vtpm", name)


def test_a_changed_boot_is_named_and_can_be_accepted(node: Host, guest, tmp_path: Path):
    name, record, _ = guest
    assert attest(node, name, tmp_path / "first.json", secrets.token_hex(16)).returncode == 0  # baseline known
    # An orderly stop (ACPI): a forced one is a TPM reset without TPM2_Shutdown, which the
    # vTPM counts against dictionary-attack lockout, and a few of them lock the agent's AK out.
    assert node.run("stop", name).returncode == 0
    install_changed_uki(Path(record["overlay"]), tmp_path)
    assert node.run("start", name).returncode == 0  # the hook sees nothing wrong: same overlay, same config
    wait_for_ready(Path(record["console_log"]))

    proc = attest(node, name, tmp_path / "changed.json", secrets.token_hex(16))
    assert proc.returncode == ExitCode.TRUST_REFUSED, proc.stderr
    assert "PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed" in proc.stdout + proc.stderr
    assert "PCR11" in proc.stdout + proc.stderr
    boots = node.json("baseline", "show", name)["boots"]
    assert boots[-1]["verdict"]["baseline"] == "differs"
    assert {d["pcr"] for d in boots[-1]["verdict"]["differences"]} >= {4, 11}
    assert "boot-differs" in [e["kind"] for e in node.json("show", name)["events"]]

    # The change was intended: accept it; the next attestation matches.
    node.json("baseline", "accept", name, "--reason", "guest kernel update")
    assert attest(node, name, tmp_path / "accepted.json", secrets.token_hex(16)).returncode == 0
    events = node.json("show", name)["events"]
    assert [e for e in events if e["kind"] == "baseline-accepted" and "guest kernel update" in e["detail"]]


def test_a_planned_boot_change_predicted_from_the_guest_disk_becomes_the_baseline(node: Host, guest,
                                                                                   tmp_path: Path):
    """A kernel update inside the guest, predicted before its boot (`tvorch predict --instance`): no accept."""
    name, record, _ = guest
    assert node.json("baseline", "show", name)["baseline"] is not None  # after the accepted change above
    # An orderly stop (ACPI): a forced one is a TPM reset without TPM2_Shutdown, which the
    # vTPM counts against dictionary-attack lockout, and a few of them lock the agent's AK out.
    assert node.run("stop", name).returncode == 0
    install_changed_uki(Path(record["overlay"]), tmp_path)  # another UKI: differs from the baseline in PCRs 4, 11
    refused = node.run("predict", "--instance", name, "--kernel", "/boot/vmlinuz")
    assert refused.returncode == ExitCode.INVALID_INPUT and "refused --kernel with --instance" in refused.stderr
    done = node.json("predict", "--instance", name, "--boot-file", "/EFI/BOOT/BOOTX64.EFI")
    assert {4, 5, 11} <= set(done["prediction"]["covered"]) and done["boot_file"] == "/EFI/BOOT/BOOTX64.EFI"
    assert node.run("start", name).returncode == 0
    wait_for_ready(Path(record["console_log"]))

    proc = node.run("attest", name, "--nonce", secrets.token_hex(16), "--out", str(tmp_path / "b.json"),
                    "--timeout", "120")
    assert proc.returncode == 0, proc.stderr
    assert "boot matches its expected next boot" in proc.stdout
    shown = node.json("baseline", "show", name)
    assert shown["baseline"]["source"] == "predicted" and "tvorch predict --instance" in shown["baseline"]["reason"]
    kinds = [e["kind"] for e in node.json("show", name)["events"]]
    assert "next-boot-predicted" in kinds and kinds.count("baseline-predicted") >= 1
    # The expectation is used up: the next verified boot is judged against the new baseline.
    assert attest(node, name, tmp_path / "again.json", secrets.token_hex(16)).returncode == 0


def test_secure_boot_on_versus_off_is_named_in_pcr7(tv: Tv, booted_guest: BootedGuest, guest_dir: Path,
                                                     tmp_path: Path):
    """Two real boots of the test guest, Secure Boot off and on: the comparison names PCR 7's SecureBoot."""
    name = f"{PREFIX}sb-{secrets.token_hex(2)}"
    try:
        record = tv.launch(guest_dir / "guest-signed.qcow2", name, "--firmware-profile", "snakeoil")
        on = wait_for_ready(Path(record["console_log"]))
        assert on.secure_boot == "enabled"
        off_log, on_log = tmp_path / "off.bin", tmp_path / "on.bin"
        off_log.write_bytes(booted_guest.report.eventlog)
        on_log.write_bytes(on.eventlog)
        verdict = compare(parse_event_log(off_log.read_bytes()), parse_event_log(on_log.read_bytes()))
        described = [d.describe() for d in verdict.differences if d.pcr == 7]
        assert any("SecureBoot" in line for line in described), described
        proc = tv.run("eventlog", "compare", str(off_log), str(on_log), check=False)
        assert proc.returncode == ExitCode.TRUST_REFUSED and "PCR7" in proc.stdout
        # Each log replays to what that guest's kernel shows in sysfs.
        assert replay(parse_event_log(on.eventlog))[7] == on.pcrs[7]
    finally:
        tv.destroy(name)
        assert name not in virsh("list", "--all", "--name").stdout
