"""`tvorch launch` and the lifecycle commands against the real libvirtd + swtpm."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tvorch.adapters.hostcaps import probe_kvm
from tvorch.core.launch.domain_xml import parse_instance_metadata

from .conftest import PREFIX, BootedGuest, Tv, our_domains, virsh
from .guest import wait_for_ready

pytestmark = pytest.mark.integration

ZERO = "0" * 64
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The refusal lines; log lines (e.g. the TCG fallback warning) may precede them."""
    return [line for line in proc.stderr.splitlines() if line.startswith("tvorch: ")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_guest_boots_with_vtpm_and_measured_firmware(booted_guest: BootedGuest):
    report = booted_guest.report
    assert report.tpm_present
    assert sorted(report.pcrs) == list(range(10))
    assert all(report.pcrs[i] != ZERO for i in range(8)), report.pcrs
    # The firmware event log is in the TCG crypto-agile format: first event is the Spec ID event.
    assert SPEC_ID_SIGNATURE in report.eventlog[:100]
    assert report.secure_boot == "disabled"


def test_domain_carries_metadata_tpm_and_overlay(tv: Tv, booted_guest: BootedGuest, guest_dir: Path):
    record = booted_guest.record
    xml = virsh("dumpxml", booted_guest.name).stdout
    assert parse_instance_metadata(xml).instance_id == record["id"]
    root = ET.fromstring(xml)
    assert root.get("type") == record["virt_type"]
    assert root.findtext("uuid") == record["uuid"]
    backend = root.find("./devices/tpm/backend")
    assert backend is not None and backend.get("type") == "emulator" and backend.get("version") == "2.0"
    assert root.find("./devices/disk/source").get("file") == record["overlay"]
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", record["overlay"]],
        capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(guest_dir / "guest.qcow2")
    # swtpm runs for this domain, with its state where libvirt keeps it.
    assert Path(f"/var/lib/libvirt/swtpm/{record['uuid']}/tpm2").is_dir()


def test_virt_type_follows_what_the_host_can_do(booted_guest: BootedGuest):
    expected = "kvm" if probe_kvm() is None else "qemu"
    assert booted_guest.record["virt_type"] == expected


def test_list_and_show(tv: Tv, booted_guest: BootedGuest):
    listed = {r["name"]: r for r in tv.json("list")}
    assert listed[booted_guest.name]["state"] == "running"
    shown = tv.json("show", booted_guest.name)
    assert shown["id"] == booted_guest.record["id"]
    assert [e["kind"] for e in shown["events"]][:5] == ["created", "vtpm-manufactured", "manifest", "defined", "started"]
    text = tv.run("show", booted_guest.name).stdout
    assert f"name:       {booted_guest.name}" in text


def test_same_name_twice_changes_nothing(tv: Tv, booted_guest: BootedGuest, guest_dir: Path):
    overlays = sorted(tv.overlay_dir.iterdir())
    proc = tv.run("launch", str(guest_dir / "guest.qcow2"), "--name", booted_guest.name, check=False)
    assert proc.returncode == 6
    assert "already exists" in proc.stderr and len(error_lines(proc)) == 1
    assert sorted(tv.overlay_dir.iterdir()) == overlays
    assert tv.json("show", booted_guest.name)["state"] == "running"


def test_base_image_is_never_written(booted_guest: BootedGuest, guest_dir: Path):
    info = json.loads((guest_dir / "build-info.json").read_text())
    digest = info.get("sha256", {}).get("guest.qcow2") or next(
        v for k, v in info.items() if "guest.qcow2" in k and isinstance(v, str) and len(v) == 64)
    assert sha256(guest_dir / "guest.qcow2") == digest


def test_bad_input_leaves_libvirt_untouched(tv: Tv, tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 50)
    before = virsh("list", "--all", "--uuid").stdout
    for args in (
        [str(text), "--name", f"{PREFIX}bad"],
        [str(tmp_path / "absent.img"), "--name", f"{PREFIX}bad"],
        [str(text), "--name", "a<b"],
    ):
        proc = tv.run("launch", *args, check=False)
        assert proc.returncode in (3, 4) and len(error_lines(proc)) == 1
    assert virsh("list", "--all", "--uuid").stdout == before


def test_lifecycle_stop_start_destroy_keeps_vtpm(tv: Tv, guest_dir: Path):
    name = f"{PREFIX}life-{secrets.token_hex(2)}"
    record = tv.launch(guest_dir / "guest.qcow2", name)
    log = Path(record["console_log"])
    first = wait_for_ready(log)

    stopped = tv.json("stop", name)
    assert stopped["state"] == "stopped" and stopped["changed"] is True
    assert virsh("domstate", name).stdout.strip() == "shut off"
    assert tv.json("stop", name)["changed"] is False  # idempotent

    tpm_dir = Path(f"/var/lib/libvirt/swtpm/{record['uuid']}/tpm2")
    assert any(tpm_dir.iterdir()), "vTPM state must persist across a stop"

    log.unlink()
    assert tv.json("start", name)["changed"] is True
    second = wait_for_ready(log)
    # Same firmware and configuration: the early-boot PCRs repeat exactly.
    for pcr in (0, 1, 2, 3, 5, 6, 7):
        assert second.pcrs[pcr] == first.pcrs[pcr], pcr

    destroyed = tv.json("destroy", name)
    assert destroyed["state"] == "destroyed" and destroyed["vtpm_purged"] is False
    assert name not in our_domains()
    assert not Path(record["overlay"]).exists()
    assert not Path(f"/run/tvorch/channels/{record['id']}").exists()  # the channel socket's own directory
    assert tpm_dir.is_dir(), "destroy without --purge-vtpm keeps the vTPM state"
    assert tv.run("show", name, check=False).returncode == 5

    # A controller's retry: already destroyed, exit 0, libvirt untouched; --purge-vtpm now purges what was kept.
    retried = tv.run("destroy", name)
    assert retried.stdout.startswith(f"{name} was already destroyed (at ") and retried.stdout.rstrip().endswith("kept")
    purged = tv.json("destroy", "--purge-vtpm", name)
    assert purged["already_destroyed"] is True and purged["vtpm_purged"] is True and purged["id"] == record["id"]
    assert not tpm_dir.parent.exists()
    assert tv.json("destroy", "--purge-vtpm", name)["vtpm_purged"] is True
    assert name not in our_domains()
    never = tv.run("destroy", f"{PREFIX}never-{secrets.token_hex(2)}", check=False)
    assert never.returncode == 5 and "no instance named" in never.stderr

    # The name is free again; a purge removes the vTPM state.
    again = tv.launch(guest_dir / "guest.qcow2", name, "--firmware", "bios", "--kernel",
                      str(guest_dir / "vmlinuz"), "--initrd", str(guest_dir / "initrd.img"),
                      "--cmdline", "console=ttyS0 tvorch.poweroff=1")
    assert again["uuid"] != record["uuid"]
    tv.run("destroy", "--purge-vtpm", name)
    assert not Path(f"/var/lib/libvirt/swtpm/{again['uuid']}").exists()


def test_secure_boot_with_firmware_profile(tv: Tv, guest_dir: Path):
    name = f"{PREFIX}sb-{secrets.token_hex(2)}"
    record = tv.launch(guest_dir / "guest-signed.qcow2", name, "--firmware-profile", "snakeoil")
    try:
        report = wait_for_ready(Path(record["console_log"]))
        assert report.secure_boot == "enabled"
        assert report.tpm_present and report.pcrs[7] != ZERO
    finally:
        tv.destroy(name)


def test_direct_kernel_boot_with_seabios_and_tis(tv: Tv, guest_dir: Path):
    name = f"{PREFIX}bios-{secrets.token_hex(2)}"
    record = tv.launch(
        guest_dir / "guest.qcow2", name, "--firmware", "bios", "--tpm-model", "tis",
        "--kernel", str(guest_dir / "vmlinuz"), "--initrd", str(guest_dir / "initrd.img"),
        "--cmdline", "console=ttyS0",
    )
    try:
        xml = virsh("dumpxml", name).stdout
        assert "tpm-tis" in xml and "<kernel>" in xml
        report = wait_for_ready(Path(record["console_log"]))
        assert report.tpm_present
        assert report.secure_boot == "unknown"
        assert report.pcrs[0] != ZERO  # SeaBIOS measures itself
    finally:
        tv.destroy(name)


def test_raw_ext4_image_launches_with_direct_kernel_boot(tv: Tv, guest_dir: Path):
    """Issue #12: a raw file system image without a partition table (mkfs.ext4, e2fsprogs) is a disk
    image: trusted without a warning, launched with the test guest's kernel and initrd, the guest up."""
    images = Path(f"/var/lib/libvirt/images/{PREFIX}raw-{secrets.token_hex(3)}")
    images.mkdir(mode=0o755)
    root_fs = images / "root.ext4"
    name = f"{PREFIX}raw-{secrets.token_hex(2)}"
    try:
        with open(root_fs, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "tvtest-root", str(root_fs)], check=True)
        root_fs.chmod(0o644)
        (trusted,) = tv.json("image", "trust", str(root_fs), "--label", "raw ext4")
        assert trusted["path"] == str(root_fs) and trusted["warnings"] == []
        record = tv.launch(root_fs, name, "--firmware", "bios", "--kernel", str(guest_dir / "vmlinuz"),
                           "--initrd", str(guest_dir / "initrd.img"), "--cmdline", "console=ttyS0")
        report = wait_for_ready(Path(record["console_log"]))
        assert report.tpm_present
        body = tv.json("manifest", "show", name)["manifest"]
        (layer,) = [m for m in body["measurements"] if m["kind"] == "image-layer"]
        assert (layer["path"], layer["digest"], layer["details"]["format"]) == (str(root_fs), sha256(root_fs), "raw")
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--force-share", "--output=json", record["overlay"]],
            capture_output=True, text=True, check=True).stdout)
        assert (info["backing-filename"], info["backing-filename-format"]) == (str(root_fs), "raw")
    finally:
        tv.destroy(name)
        tv.run("image", "untrust", str(root_fs), check=False)
        shutil.rmtree(images, ignore_errors=True)


def test_failed_start_rolls_back(tv: Tv, guest_dir: Path):
    """A network that exists but is inactive: define works, start fails."""
    net = f"{PREFIX}net-{secrets.token_hex(2)}"
    net_xml = tv.state_dir.parent / "net.xml"
    net_xml.write_text(f"<network><name>{net}</name><bridge name='tvt{secrets.token_hex(3)}'/></network>")
    virsh("net-define", str(net_xml))
    name = f"{PREFIX}fail-{secrets.token_hex(2)}"
    try:
        proc = tv.run("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--network", net, check=False)
        assert proc.returncode == 7, proc.stderr
        assert len(error_lines(proc)) == 1 and "refused to start" in proc.stderr
        assert name not in our_domains()
        assert not any(p.name.startswith(name + ".") for p in tv.overlay_dir.iterdir())
        failed = [r for r in tv.json("list") if r["name"] == name]
        assert failed and failed[0]["state"] == "failed" and failed[0]["error"]
        # A failed record does not block the name forever: destroy clears it.
        tv.run("destroy", name)
        assert all(r["name"] != name for r in tv.json("list"))
    finally:
        virsh("net-undefine", net, check=False)


def test_guest_event_log_replays_to_its_pcrs(booted_guest: BootedGuest, tmp_path: Path):
    """The firmware event log the guest read from securityfs replays to the PCRs it read
    from sysfs, with tvorch's parser and with tpm2-tools' tpm2_eventlog."""
    from tvorch.core.attestation.eventlog import parse_event_log, replay

    report = booted_guest.report
    ours = replay(parse_event_log(report.eventlog), "sha256")
    for pcr, value in ours.items():
        if pcr in report.pcrs:
            assert report.pcrs[pcr] == value, pcr
    log = tmp_path / "guest.bin"
    log.write_bytes(report.eventlog)
    cli = json.loads(subprocess.run([sys.executable, "-m", "tvorch.cli", "eventlog", "replay", str(log), "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert {int(k): v for k, v in cli["pcrs"].items()} == ours
    tools = subprocess.run(["tpm2_eventlog", str(log)], capture_output=True, text=True, check=True).stdout
    theirs = {}
    in_sha256 = False
    for line in tools.splitlines():
        stripped = line.strip()
        if stripped == "sha256:":
            in_sha256 = True
        elif in_sha256 and stripped.split(":")[0].strip().isdigit():
            index, value = stripped.split(":")
            theirs[int(index.strip())] = value.strip().lower().removeprefix("0x")
        elif in_sha256 and stripped.endswith(":"):
            in_sha256 = False
    assert theirs and all(theirs[p] == v for p, v in ours.items()), (theirs, ours)
