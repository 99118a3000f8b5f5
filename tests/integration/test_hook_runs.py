"""Issue #13, the hook gate's holes, through libvirt's own start path.

A start refused for any reason (here: the hook's deadline) is recorded, and the
`release end` libvirt runs after it ledgers nothing; every file the launch
measured is checked again at each start, and the direct-boot files stay out of
QEMU's reach while the guest runs; the instance's UEFI variable store (NVRAM) is
ledgered at each stop and checked at each start like its vTPM state.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PREFIX, SNAKEOIL_VARS, Tv, virsh
from .guest import wait_for_ready
from .test_hook_gate import last_prepare, ledger_length, refused, starts_clean

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _hook_points_here(hook_for, tv: Tv) -> None:
    """Test sessions running at the same time on this node take turns pointing libvirt's one hook at
    their own config: point it back at this session's before each test."""
    hook_for(tv.config)


@dataclass
class Direct:
    name: str
    record: dict
    base: Path  # a 1 GiB layer: hashing it takes longer than a short hook deadline
    kernel: Path
    initrd: Path


@pytest.fixture(scope="module")
def direct(tv_clear: Tv, guest_dir: Path, hook_for, tv: Tv) -> Direct:
    """A direct-boot guest (SeaBIOS, TIS) on a large base layer, booted once and stopped (vTPM ledgered).

    Its vTPM state is in clear (tv_clear) so that `virsh start` reaches the gate."""
    hook_for(tv.config)
    tv = tv_clear
    images = Path(f"/var/lib/libvirt/images/{PREFIX}direct-{secrets.token_hex(3)}")
    images.mkdir(mode=0o755)
    base = images / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", str(base), "1G"],
                   check=True)
    kernel, initrd = images / "vmlinuz", images / "initrd.img"
    for source, copy in ((guest_dir / "vmlinuz", kernel), (guest_dir / "initrd.img", initrd), (None, base)):
        if source is not None:
            shutil.copyfile(source, copy)
        os.chmod(copy, 0o644)
    name = f"{PREFIX}direct-{secrets.token_hex(2)}"
    try:  # a 1 GiB layer left behind by a failed set-up would fill the disk run by run
        tv.run("image", "trust", str(base), "--label", "direct boot test base")
        record = tv.launch(base, name, "--firmware", "bios", "--tpm-model", "tis", "--kernel", str(kernel),
                           "--initrd", str(initrd), "--cmdline", "console=ttyS0")
        wait_for_ready(Path(record["console_log"]))
        tv.run("stop", "--force", name)
        yield Direct(name, record, base, kernel, initrd)
    finally:
        tv.run("destroy", "--purge-vtpm", name, check=False)
        shutil.rmtree(images, ignore_errors=True)


def _boot_and_stop(name: str, console_log: Path) -> None:
    console_log.unlink(missing_ok=True)
    virsh("start", name)
    wait_for_ready(console_log)
    virsh("destroy", name)


def test_deadline_refusal_does_not_bless_a_rolled_back_vtpm(tv: Tv, direct: Direct, tmp_path: Path):
    """A start refused by the hook's deadline is recorded, and its release ledgers nothing: the
    rolled-back state put there before it is still refused at the next start."""
    state = Path(f"/var/lib/libvirt/swtpm/{direct.record['uuid']}/tpm2")
    old = tmp_path / "old"
    shutil.copytree(state, old)
    before = ledger_length(tv, direct.name)
    _boot_and_stop(direct.name, Path(direct.record["console_log"]))
    assert ledger_length(tv, direct.name) == before + 1
    newer = tmp_path / "newer"
    shutil.copytree(state, newer)
    assert (old / "tpm2-00.permall").read_bytes() != (newer / "tpm2-00.permall").read_bytes()

    shutil.copy2(old / "tpm2-00.permall", state / "tpm2-00.permall")  # the rollback
    try:
        os.chmod(direct.base, 0o644)  # a new ctime: the 1 GiB layer's digest is no longer cached
        original = tv.config.read_text()
        tv.config.write_text("hook_deadline_ms = 300\n" + original)
        try:
            proc = virsh("start", direct.name, check=False)
        finally:
            tv.config.write_text(original)
        assert proc.returncode != 0 and "deadline" in proc.stderr, proc.stderr
        prepare = last_prepare(tv, direct.name)
        # The release libvirt runs after the refused start must not ledger the rolled-back state.
        assert ledger_length(tv, direct.name) == before + 1
        refused(direct.name, "vTPM state differs from the last recorded stop")
        # The refusal is on record, and says what to do: hash the files outside the hook's deadline.
        assert prepare["verdict"] == "refused" and "deadline" in prepare["reasons"][0], prepare
        assert f"tvorch: refused to start {direct.name}" in proc.stderr
        assert f"tvorch check {direct.name}" in proc.stderr
    finally:
        shutil.copy2(newer / "tpm2-00.permall", state / "tpm2-00.permall")
    starts_clean(direct.name)


def test_tvorch_check_fills_the_digest_cache_for_the_hook(tv: Tv, direct: Direct):
    """What the deadline refusal tells the operator to run: it judges like the hook, without its deadline."""
    os.chmod(direct.base, 0o644)
    original = tv.config.read_text()
    tv.config.write_text("hook_deadline_ms = 300\n" + original)
    try:
        time.sleep(2.1)  # past the digest cache's racy window, so the new digest is kept
        checked = tv.json("check", direct.name)
        assert checked["allowed"] is True and checked["reasons"] == [], checked
        starts_clean(direct.name)
    finally:
        tv.config.write_text(original)


def _writable_by_qemu(path: str) -> bool:
    return subprocess.run(["runuser", "-u", "libvirt-qemu", "--", "test", "-w", path]).returncode == 0


def _boot_paths(name: str) -> list[str]:
    """The kernel and initrd the domain boots (what libvirt hands QEMU)."""
    xml = ET.fromstring(virsh("dumpxml", "--inactive", name).stdout)
    paths = [xml.findtext("os/kernel"), xml.findtext("os/initrd")]
    assert all(paths), paths
    return [str(p) for p in paths]


def test_changed_initrd_is_refused(tv: Tv, direct: Direct):
    """Not an image layer, yet measured at launch: a changed initrd is refused at the next start. The
    instance boots tvorch's copy, so the operator's file changing later changes nothing; the copy
    changing (root, while nothing runs) is refused."""
    original = direct.initrd.read_bytes()
    with open(direct.initrd, "ab") as f:
        f.write(b"\0")
    try:
        starts_clean(direct.name)
    finally:
        direct.initrd.write_bytes(original)
    booted = _boot_paths(direct.name)[1]
    copy = tv.state_dir / "boot-files" / Path(booted).name
    assert copy.read_bytes() == original
    with open(copy, "ab") as f:
        f.write(b"\0")
    try:
        refused(direct.name, f"initrd {booted} changed")
    finally:
        copy.write_bytes(original)
    starts_clean(direct.name)


def test_boot_files_are_never_handed_to_qemu(tv: Tv, direct: Direct):
    """libvirt chowns a direct-boot kernel and initrd to the qemu user from its relabelling until the
    start's end (and the run's, for the files given back later), when any QEMU on the node could rewrite
    them. The files the domain boots are on a read-only view: libvirt's chown fails (EROFS, which it
    tolerates), so they stay root's and unwritable by libvirt-qemu at every moment, the guest boots."""
    paths = _boot_paths(direct.name)
    qemu = pwd.getpwnam("libvirt-qemu")
    for path in paths:
        with pytest.raises(OSError) as err:
            os.chown(path, qemu.pw_uid, qemu.pw_gid)  # what libvirt's DAC driver does at each start
        assert err.value.errno == errno.EROFS, err.value
    console = Path(direct.record["console_log"])
    console.unlink(missing_ok=True)
    virsh("start", direct.name)
    try:
        wait_for_ready(console)
        for path in paths:
            assert os.stat(path).st_uid == 0, f"{path} was handed to uid {os.stat(path).st_uid}"
            assert not _writable_by_qemu(path), f"{path} is writable by libvirt-qemu while the guest runs"
    finally:
        virsh("destroy", direct.name)
    starts_clean(direct.name)


def test_boot_view_is_made_again_after_a_reboot(tv: Tv, direct: Direct):
    """A reboot takes the read-only mount away (and a reset may replace its directory): the hook makes it
    again before the start's checks, and the guest boots from it."""
    view = str(Path(_boot_paths(direct.name)[0]).parent)
    while subprocess.run(["umount", "-l", view], capture_output=True).returncode == 0:
        pass
    assert not any(line.split()[4] == view for line in Path("/proc/self/mountinfo").read_text().splitlines())
    starts_clean(direct.name)
    assert any(line.split()[4] == view and "ro" in line.split()[5].split(",")
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture(scope="module")
def uefi(tv_clear: Tv, guest_dir: Path, hook_for, tv: Tv) -> str:
    """A UEFI instance (auto-selected OVMF) launched and stopped at once: libvirt made its NVRAM from the template."""
    hook_for(tv.config)
    name = f"{PREFIX}nvram-{secrets.token_hex(2)}"
    try:
        tv_clear.launch(guest_dir / "guest.qcow2", name)
        tv_clear.run("stop", "--force", name)
        yield name
    finally:
        tv_clear.run("destroy", "--purge-vtpm", name, check=False)


def test_replaced_nvram_is_refused(tv: Tv, uefi: str, tmp_path: Path):
    """Other Secure Boot keys (the snakeoil PK/KEK/db) in the instance's vars file: refused."""
    nvram = Path(f"/var/lib/libvirt/qemu/nvram/{uefi}_VARS.fd")
    assert nvram.is_file()
    saved = tmp_path / "vars.fd"
    shutil.copyfile(nvram, saved)
    shutil.copyfile(SNAKEOIL_VARS, nvram)
    try:
        refused(uefi, f"NVRAM {nvram} differs from the last recorded stop")
    finally:
        shutil.copyfile(saved, nvram)
    starts_clean(uefi)
    # That run's stop is ledgered: the vars as the guest left them are the ones accepted next.
    starts_clean(uefi)
