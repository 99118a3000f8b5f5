"""`tvorch predict` before a first boot equals what the vTPM holds at that boot (real OVMF, SeaBIOS, swtpm).

Per scenario the prediction is made before the launch, then the guest's own
event log (which replays to its PCRs 0-9, checked) is compared with it event
by event on every PCR the prediction covers, and its PCRs 0-9 with the
predicted values:

  UKI on GPT under OVMF (guest.qcow2)       PCRs 4, 5, 8, 9, 11, 12, 13, 14
  the same with another .cmdline (raw disk) PCRs 4, 5, 8, 9, 11, 12, 13, 14
  the same with another initramfs (raw)     PCRs 4, 5, 8, 9, 11, 12, 13, 14
  OVMF direct kernel boot                   PCRs 4, 5, 8, 9, 11, 12, 13, 14
  the same with another initramfs, cmdline  PCRs 4, 5, 8, 9, 11, 12, 13, 14
  the same with another kernel              PCRs 4, 5, 8, 9, 11, 12, 13, 14
  the signed UKI, Secure Boot on, 3 builds  PCRs 4, 5, 7, 8, 9, 11, 12, 13, 14
  SeaBIOS direct kernel boot, TPM TIS (3 builds) PCRs 4, 5, 8, 9, 11, 12, 13, 14
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.boot.pe import parse_pe

from .conftest import PREFIX, BootedGuest, Tv
from .guest import GuestReport, wait_for_ready

pytestmark = pytest.mark.integration

GUEST_CMDLINE = b"console=ttyS0 panic=-1"


def _check(prediction: dict, report: GuestReport) -> None:
    log = parse_event_log(report.eventlog)
    covered = prediction["covered"]
    assert set(covered) >= {4, 5, 8, 9, 11, 12, 13, 14}
    for pcr in covered:
        predicted = [(e["type"], e["digest"]) for e in prediction["events"] if e["pcr"] == pcr]
        found = [(e.type_name, e.digests["sha256"]) for e in log.events if e.pcr == pcr and "sha256" in e.digests]
        assert predicted == found, f"PCR {pcr}"
        if pcr in report.pcrs:
            assert prediction["pcrs"][str(pcr)] == report.pcrs[pcr], f"PCR {pcr}"


def _signed_prediction(tv: Tv, name: str, out: Path) -> dict:
    """The boot_prediction of NAME's signed launch manifest."""
    tv.run("manifest", "show", name, "--out", str(out))
    return json.loads(out.read_bytes())["manifest"]["boot_prediction"]


def _same(signed: dict, prediction: dict) -> None:
    """The launch's signed prediction is predict's, for every PCR the launch covered.

    A firmware reference made after the launch (another test's) lets predict
    cover PCRs 0-3 and 6 too; the launch must then have said why it did not.
    """
    assert signed["status"] == "predicted"
    covered = set(signed["covered"])
    assert covered <= set(prediction["covered"])
    assert signed["pcrs"] == {p: v for p, v in prediction["pcrs"].items() if int(p) in covered}
    assert signed["events"] == [e for e in prediction["events"] if e["pcr"] in covered]
    assert covered | {int(p) for p in signed["not_predicted"]} >= set(prediction["covered"])


def _launch_and_check(tv: Tv, image: Path, launch: tuple[str, ...], predict: tuple[str, ...] = ()) -> None:
    name = f"{PREFIX}predict-{secrets.token_hex(2)}"
    try:
        record = tv.launch(image, name, *launch)
        # Predicted from the files alone; after the launch, which made the platform's firmware reference
        # if there was none. The manifest shows the launch predicted the same before the guest ran.
        prediction = tv.json("predict", str(image), "--memory", "512", *launch, *predict)  # tv.launch: 512 MiB
        _same(_signed_prediction(tv, name, Path(record["console_log"]).with_suffix(".manifest.json")), prediction)
        _check(prediction, wait_for_ready(Path(record["console_log"])))
    finally:
        tv.destroy(name)


def test_uki_on_gpt_under_ovmf(tv: Tv, booted_guest: BootedGuest, guest_dir: Path, tmp_path: Path) -> None:
    # booted_guest is a first boot of guest.qcow2 with the defaults (OVMF, CRB): predict it now, unchanged files.
    prediction = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512")
    _check(prediction, booted_guest.report)
    # launch made the same prediction before that boot, and signed it into the manifest
    _same(_signed_prediction(tv, booted_guest.name, tmp_path / "manifest.json"), prediction)


def _variant(tv: Tv, guest_dir: Path, tmp_path: Path, old: bytes, new: bytes, label: str) -> Path:
    """The test guest's disk, raw, with OLD (found once, in the UKI) replaced by NEW of the same length:
    another build of its UKI, trusted."""
    raw = tmp_path / "variant.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(guest_dir / "guest.qcow2"), str(raw)],
                   check=True)
    disk = bytearray(raw.read_bytes())
    at = disk.find(old)
    assert at > 0 and disk.find(old, at + 1) < 0 and len(old) == len(new)
    disk[at:at + len(old)] = new
    raw.write_bytes(bytes(disk))
    raw.chmod(0o644)
    tmp_path.chmod(0o755)
    image = Path(tv.overlay_dir) / f"variant-{secrets.token_hex(2)}.raw"
    image.parent.mkdir(parents=True, exist_ok=True)
    raw.replace(image)
    tv.run("image", "trust", str(image), "--label", f"test guest, {label}")
    return image


def test_another_build_with_a_changed_cmdline_section(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """The test guest with .cmdline "console=ttyS0 panic=-2": another UKI, on a raw disk this time."""
    # the .cmdline section (VirtualSize 22, zero padded)
    image = _variant(tv, guest_dir, tmp_path, GUEST_CMDLINE + b"\0", b"console=ttyS0 panic=-2\0", "another .cmdline")
    before = tv.json("predict", str(guest_dir / "guest.qcow2"))
    after = tv.json("predict", str(image))
    assert before["pcrs"]["11"] != after["pcrs"]["11"] and before["pcrs"]["4"] != after["pcrs"]["4"]
    assert before["pcrs"]["5"] == after["pcrs"]["5"]
    _launch_and_check(tv, image, ())


def test_a_third_build_with_a_changed_initramfs(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """The test guest whose .initrd differs: its gzip header names another OS (byte 9: Unix 3 -> 255,
    which gunzip and the kernel ignore), so the initramfs bytes change and the guest still boots."""
    head = (guest_dir / "initrd.img").read_bytes()[:64]
    assert head[:3] == b"\x1f\x8b\x08" and head[9] == 3, head[:10]
    image = _variant(tv, guest_dir, tmp_path, head, head[:9] + b"\xff" + head[10:], "another initramfs")
    before = tv.json("predict", str(guest_dir / "guest.qcow2"))
    after = tv.json("predict", str(image))
    for pcr in ("4", "9", "11"):  # the UKI's Authenticode, the initrd the stub hands over, its .initrd section
        assert before["pcrs"][pcr] != after["pcrs"][pcr], pcr
    assert before["pcrs"]["5"] == after["pcrs"]["5"]
    _launch_and_check(tv, image, ())


def test_launch_boots_a_missing_firmware_reference_and_its_first_boot_matches(tv: Tv, guest_dir: Path) -> None:
    """Issue #14: no reference for 2 vCPUs yet, so predict leaves PCRs 0-3 and 6 out; launch boots the
    reference itself (launch.firmware_reference = "create"), signs a prediction covering them, and the first
    boot equals it on every covered PCR, 0-3 and 6 included."""
    image = guest_dir / "guest.qcow2"
    before = {r["key_digest"] for r in tv.json("firmware", "reference", "list")}
    unreferenced = tv.json("predict", str(image), "--memory", "512", "--vcpus", "2")
    assert not {0, 1, 2, 3, 6} & set(unreferenced["covered"]), unreferenced["not_predicted"]
    name = f"{PREFIX}predict-{secrets.token_hex(2)}"
    try:
        record = tv.launch(image, name, "--vcpus", "2")
        made = {r["key_digest"] for r in tv.json("firmware", "reference", "list")} - before
        assert len(made) == 1, made
        signed = _signed_prediction(tv, name, Path(record["console_log"]).with_suffix(".manifest.json"))
        assert {0, 1, 2, 3, 4, 5, 6, 7} <= set(signed["covered"]), signed["not_predicted"]
        _check(signed, wait_for_ready(Path(record["console_log"])))
    finally:
        tv.destroy(name)
    # Reused, not booted again: predict now covers the firmware side from the stored reference.
    assert {0, 1, 2, 3, 6} <= set(tv.json("predict", str(image), "--memory", "512", "--vcpus", "2")["covered"])
    assert {r["key_digest"] for r in tv.json("firmware", "reference", "list")} - before == made


def test_ovmf_direct_kernel_boot(tv: Tv, guest_dir: Path) -> None:
    _launch_and_check(tv, guest_dir / "guest.qcow2", (
        "--firmware", "efi", "--kernel", str(guest_dir / "vmlinuz"), "--initrd", str(guest_dir / "initrd.img"),
        "--cmdline", "console=ttyS0 panic=-1"))


def test_ovmf_direct_kernel_boot_of_another_initramfs_and_cmdline(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """A second direct-boot build: another initramfs and command line; PCR 9 (initrd, load options) follows both."""
    first = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", "--kernel", str(guest_dir / "vmlinuz"),
                    "--initrd", str(guest_dir / "initrd.img"), "--cmdline", "console=ttyS0 panic=-1")
    launch = ("--firmware", "efi", "--kernel", str(guest_dir / "vmlinuz"), "--initrd",
              str(_other_initrd(guest_dir, tmp_path)), "--cmdline", "console=ttyS0 panic=-2")
    second = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", *launch)
    assert first["pcrs"]["9"] != second["pcrs"]["9"] and first["pcrs"]["4"] == second["pcrs"]["4"]
    _launch_and_check(tv, guest_dir / "guest.qcow2", launch)


def test_ovmf_direct_kernel_boot_of_another_kernel(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """A third direct-boot build: another kernel (its TimeDateStamp), so PCR 4 changes and PCR 9 does not."""
    launch = ("--firmware", "efi", "--kernel", str(_other_kernel(guest_dir, tmp_path)), "--initrd",
              str(guest_dir / "initrd.img"), "--cmdline", "console=ttyS0 panic=-1")
    first = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", "--kernel", str(guest_dir / "vmlinuz"),
                    *launch[4:])
    second = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", *launch)
    assert first["pcrs"]["4"] != second["pcrs"]["4"] and first["pcrs"]["9"] == second["pcrs"]["9"]
    _launch_and_check(tv, guest_dir / "guest.qcow2", launch)


def _resigned_build(tv: Tv, guest_dir: Path, tmp_path: Path, old: bytes, new: bytes, label: str) -> Path:
    """The Secure Boot test guest with its UKI changed (OLD -> NEW, same length) and signed again with the
    snakeoil db key, as a vendor's second build would be: a trusted raw image."""
    raw = tmp_path / "signed.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(guest_dir / "guest-signed.qcow2"),
                    str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    esp = f"{raw}@@{table['partitions'][0]['start'] * table.get('sectorsize', 512)}"
    uki, unsigned, signed, key = (tmp_path / n for n in ("uki.efi", "unsigned.efi", "resigned.efi", "key.pem"))
    mtools = {**os.environ, "MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-n", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI", str(uki)], check=True, env=mtools)
    subprocess.run(["sbattach", "--remove", str(uki)], check=True, capture_output=True)
    body = bytearray(uki.read_bytes())
    at = body.find(old)
    assert at > 0 and body.find(old, at + 1) < 0 and len(old) == len(new)
    body[at:at + len(old)] = new
    unsigned.write_bytes(bytes(body))
    subprocess.run(["openssl", "pkey", "-in", "/usr/share/ovmf/PkKek-1-snakeoil.key", "-passin", "pass:snakeoil",
                    "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["sbsign", "--key", str(key), "--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", "--output",
                    str(signed), str(unsigned)], check=True, capture_output=True)
    key.unlink()
    subprocess.run(["mcopy", "-o", "-i", esp, str(signed), "::/EFI/BOOT/BOOTX64.EFI"], check=True, env=mtools)
    raw.chmod(0o644)
    image = Path(tv.overlay_dir) / f"signed-{secrets.token_hex(2)}.raw"
    image.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(raw), image)
    tv.run("image", "trust", str(image), "--label", f"signed test guest, {label}")
    return image


@pytest.mark.parametrize("build", ["shipped", "cmdline", "initramfs"])
def test_secure_boot_first_boot_equals_the_prediction(tv: Tv, guest_dir: Path, tmp_path: Path, build: str) -> None:
    """The snakeoil-signed UKI with Secure Boot on (the snakeoil profile), over three builds: PCR 7 carries
    the db authority that verified each, and every covered PCR of the first boot equals the prediction."""
    if build == "shipped":
        image = guest_dir / "guest-signed.qcow2"
    elif build == "cmdline":
        image = _resigned_build(tv, guest_dir, tmp_path, GUEST_CMDLINE + b"\0", b"console=ttyS0 panic=-2\0",
                                "another .cmdline")
    else:
        head = (guest_dir / "initrd.img").read_bytes()[:64]
        image = _resigned_build(tv, guest_dir, tmp_path, head, head[:9] + b"\xff" + head[10:], "another initramfs")
    prediction = tv.json("predict", str(image), "--memory", "512", "--firmware-profile", "snakeoil")
    assert "EV_EFI_VARIABLE_AUTHORITY" in [e["type"] for e in prediction["events"] if e["pcr"] == 7]
    _launch_and_check(tv, image, ("--firmware-profile", "snakeoil"))


def _other_kernel(guest_dir: Path, tmp_path: Path) -> Path:
    """The test guest's kernel with its PE/COFF TimeDateStamp changed: nothing reads it, Authenticode hashes it."""
    kernel = bytearray((guest_dir / "vmlinuz").read_bytes())
    pe = int.from_bytes(kernel[0x3C:0x40], "little")
    assert kernel[pe:pe + 4] == b"PE\0\0"
    kernel[pe + 8:pe + 12] = (int.from_bytes(kernel[pe + 8:pe + 12], "little") ^ 0x5A5A5A5A).to_bytes(4, "little")
    other = tmp_path / "vmlinuz-other"
    other.write_bytes(bytes(kernel))
    return other


def _other_initrd(guest_dir: Path, tmp_path: Path) -> Path:
    """The test guest's initramfs whose gzip header names another OS (the kernel's gunzip ignores it)."""
    initrd = (guest_dir / "initrd.img").read_bytes()
    assert initrd[:3] == b"\x1f\x8b\x08" and initrd[9] == 3
    other = tmp_path / "initrd-other.img"
    other.write_bytes(initrd[:9] + b"\xff" + initrd[10:])
    return other


@pytest.mark.parametrize("build", ["shipped", "initramfs and cmdline", "kernel"])
def test_seabios_direct_kernel_boot_with_tis(tv: Tv, guest_dir: Path, tmp_path: Path, build: str) -> None:
    """SeaBIOS measures neither kernel nor initrd nor command line: every build predicts the same events."""
    kernel, initrd, cmdline = guest_dir / "vmlinuz", guest_dir / "initrd.img", "console=ttyS0 panic=-1"
    if build == "kernel":
        kernel = _other_kernel(guest_dir, tmp_path)
    elif build != "shipped":
        initrd, cmdline = _other_initrd(guest_dir, tmp_path), "console=ttyS0 panic=-2"
    launch = ("--firmware", "bios", "--tpm-model", "tis", "--kernel", str(kernel), "--initrd", str(initrd),
              "--cmdline", cmdline)
    shipped = tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", "--firmware", "bios",
                      "--tpm-model", "tis", "--kernel", str(guest_dir / "vmlinuz"), "--initrd",
                      str(guest_dir / "initrd.img"), "--cmdline", "console=ttyS0 panic=-1")
    assert tv.json("predict", str(guest_dir / "guest.qcow2"), "--memory", "512", *launch)["pcrs"] == shipped["pcrs"]
    _launch_and_check(tv, guest_dir / "guest.qcow2", launch)


def test_authenticode_agrees_with_osslsigncode_on_the_boot_files(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """Every boot file predicted: the signed UKI from the disk, and the kernel (its .linux and direct boot)."""
    from tvorch.adapters.diskread import DiskImage
    from tvorch.core.boot.bootdisk import read_boot_file

    with DiskImage(str(guest_dir / "guest-signed.qcow2")) as disk:
        _, _, uki = read_boot_file(disk)
    files = {"uki-signed.efi": uki, "vmlinuz": (guest_dir / "vmlinuz").read_bytes()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out = subprocess.run(["osslsigncode", "verify", "-in", str(tmp_path / name)], capture_output=True,
                             text=True).stdout
        calculated = [ln.split(":")[1].strip().lower() for ln in out.splitlines() if "Calculated message digest" in ln]
        assert calculated and parse_pe(data).authenticode_sha256() == calculated[0], name


def test_predict_is_cached_by_image_digest(tv: Tv, guest_dir: Path, tmp_path: Path) -> None:
    """guest.qcow2 is trusted (its digest cached): a second predict reads none of it; another image misses."""
    first = tv.json("predict", str(guest_dir / "guest.qcow2"))
    again = tv.json("predict", str(guest_dir / "guest.qcow2"))
    assert again["cached"] is True and again["image_bytes_read"] == 0
    assert {k: v for k, v in again.items() if k not in ("cached", "image_bytes_read")} == \
        {k: v for k, v in first.items() if k not in ("cached", "image_bytes_read")}
    entries = list((tv.state_dir / "predictions").iterdir())
    assert entries and all(p.stat().st_mode & 0o777 == 0o600 for p in entries)
    assert (tv.state_dir / "predictions").stat().st_mode & 0o777 == 0o700
    # a copy is another inode whose digest is not cached yet: computed, not looked up
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes((guest_dir / "guest.qcow2").read_bytes())
    other = tv.json("predict", str(copy))
    assert other["cached"] is False and other["image_bytes_read"] > 0 and other["pcrs"] == first["pcrs"]
