"""The tamper matrix: libvirt's own start path refuses what tvorch did not vouch for.

Every case edits the domain, an image or the vTPM behind tvorch's back, starts
the domain with `virsh start` (not tvorch), expects libvirt's error to carry
the hook's reason, then puts things back and expects a clean start.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PREFIX, Tv, virsh
from .guest import wait_for_ready

pytestmark = pytest.mark.integration


@dataclass
class Gated:
    name: str
    record: dict
    base: Path
    xml: Path  # the clean inactive definition


def refused(name: str, *words: str) -> str:
    proc = virsh("start", name, check=False)
    assert proc.returncode != 0, f"{name} started although it should have been refused"
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert "tvorch: refused to start" in proc.stderr
    return proc.stderr


def starts_clean(name: str) -> None:
    proc = virsh("start", name, check=False)
    assert proc.returncode == 0, proc.stderr
    virsh("destroy", name)


def redefine(xml: str) -> None:
    path = Path(f"/tmp/{PREFIX}{secrets.token_hex(4)}.xml")
    path.write_text(xml)
    try:
        virsh("define", str(path))
    finally:
        path.unlink()


def edited(gated: Gated, edit) -> str:
    root = ET.fromstring(gated.xml.read_text())
    edit(root)
    return ET.tostring(root, encoding="unicode")


def ledger_length(tv: Tv, name: str) -> int:
    ledger = tv.json("vtpm", "ledger", name)
    assert ledger["intact"] is True
    return len(ledger["entries"])


def last_prepare(tv: Tv, name: str) -> dict:
    return [e for e in tv.json("events", name) if e["operation"] == "prepare begin"][-1]


@pytest.fixture(scope="module")
def gated(tv_clear: Tv, guest_dir: Path, tmp_path_factory) -> Gated:
    """A guest on a private copy of the base image, booted once and stopped (vTPM ledgered).

    Its vTPM state is in clear (tv_clear) so that libvirt's own start paths can reach the gate."""
    tv = tv_clear
    images = Path(f"/var/lib/libvirt/images/{PREFIX}gate-{secrets.token_hex(3)}")
    images.mkdir(mode=0o755)
    base = images / "base.qcow2"
    shutil.copyfile(guest_dir / "guest.qcow2", base)
    os.chmod(base, 0o644)
    tv.run("image", "trust", str(base), "--label", "gate test base")
    name = f"{PREFIX}gate-{secrets.token_hex(2)}"
    record = tv.launch(base, name)
    wait_for_ready(Path(record["console_log"]))
    tv.run("stop", "--force", name)
    xml = tmp_path_factory.mktemp("gate") / "clean.xml"
    xml.write_text(virsh("dumpxml", "--inactive", name).stdout)
    yield Gated(name, record, base, xml)
    tv.run("destroy", "--purge-vtpm", name, check=False)
    shutil.rmtree(images, ignore_errors=True)


def test_clean_start_is_allowed_and_recorded(tv: Tv, gated: Gated):
    starts_clean(gated.name)
    ops = [(e["operation"], e["verdict"]) for e in tv.json("events", gated.name)]
    assert ("prepare begin", "allowed") in ops and ("start begin", "allowed") in ops
    assert tv.json("show", gated.name)["id"] == gated.record["id"]


def _swap_disk(tmp: Path):
    def edit(root: ET.Element) -> None:
        root.find("./devices/disk/source").set("file", str(tmp))
    return edit


def _drop_tpm(root: ET.Element) -> None:
    devices = root.find("devices")
    devices.remove(devices.find("tpm"))


def _to_seabios(root: ET.Element) -> None:
    os_element = root.find("os")
    os_element.attrib.pop("firmware", None)
    for child in os_element.findall("firmware"):
        os_element.remove(child)


def _more_memory(root: ET.Element) -> None:
    for tag in ("memory", "currentMemory"):
        root.find(tag).text = str(int(root.find(tag).text) * 2)


def _cpu_feature(root: ET.Element) -> None:
    """Nested virtualisation asked of libvirt's TCG CPU (qemu64): the guest would see VMX."""
    cpu = root.find("cpu")
    assert cpu is not None and cpu.findtext("model") == "qemu64"
    ET.SubElement(cpu, "feature", policy="require", name="vmx")


def _scsi_controller(root: ET.Element) -> None:
    ET.SubElement(root.find("devices"), "controller", type="scsi", index="0", model="virtio-scsi")


@pytest.mark.parametrize("case", ["disk-swapped", "tpm-removed", "firmware-changed", "memory-changed",
                                  "cpu-feature-added", "scsi-controller-added"])
def test_configuration_drift_is_refused(tv: Tv, gated: Gated, case: str):
    other = Path(gated.record["overlay"]).with_name(f"{PREFIX}other.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(gated.base), str(other)],
                   check=True)
    edits = {"disk-swapped": _swap_disk(other), "tpm-removed": _drop_tpm,
             "firmware-changed": _to_seabios, "memory-changed": _more_memory,
             "cpu-feature-added": _cpu_feature, "scsi-controller-added": _scsi_controller}
    try:
        redefine(edited(gated, edits[case]))
        refused(gated.name, "configuration changed since launch")
        assert last_prepare(tv, gated.name)["verdict"] == "refused"
    finally:
        redefine(gated.xml.read_text())
        other.unlink()
    starts_clean(gated.name)


def test_refusal_reaches_tvorch_start_as_one_line(tv: Tv, gated: Gated):
    redefine(edited(gated, _more_memory))
    try:
        proc = tv.run("start", gated.name, check=False)
        assert proc.returncode == 7
        lines = [line for line in proc.stderr.splitlines() if line.startswith("tvorch: error")]
        assert len(lines) == 1 and "configuration changed since launch" in lines[0]
    finally:
        redefine(gated.xml.read_text())
    starts_clean(gated.name)


def test_base_image_changed_by_one_byte(gated: Gated):
    with open(gated.base, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        original = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([original[0] ^ 0x01]))
    try:
        refused(gated.name, f"image layer {gated.base} changed")
    finally:
        with open(gated.base, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(original)
    starts_clean(gated.name)


def test_overlay_replaced(gated: Gated):
    overlay = Path(gated.record["overlay"])
    aside = overlay.with_name(overlay.name + ".aside")
    os.rename(overlay, aside)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(gated.base),
                        str(overlay)], check=True)
        refused(gated.name, f"overlay {overlay} was replaced")
    finally:
        os.replace(aside, overlay)
    starts_clean(gated.name)


def test_vtpm_rollback_is_refused(tv: Tv, gated: Gated, tmp_path: Path):
    state = Path(f"/var/lib/libvirt/swtpm/{gated.record['uuid']}/tpm2")
    old = tmp_path / "old"
    shutil.copytree(state, old)
    ledger_before = ledger_length(tv, gated.name)
    # Run the guest long enough to change its vTPM (resetCount, NV clock), then stop: ledgered.
    virsh("start", gated.name)
    wait_for_ready(Path(gated.record["console_log"]))
    virsh("destroy", gated.name)
    assert ledger_length(tv, gated.name) == ledger_before + 1
    newer = tmp_path / "newer"
    shutil.copytree(state, newer)
    assert (old / "tpm2-00.permall").read_bytes() != (newer / "tpm2-00.permall").read_bytes()

    shutil.copy2(old / "tpm2-00.permall", state / "tpm2-00.permall")
    refused(gated.name, "vTPM state differs from the last recorded stop")
    # The refused start must not have blessed the old state in the ledger.
    assert ledger_length(tv, gated.name) == ledger_before + 1
    shutil.copy2(newer / "tpm2-00.permall", state / "tpm2-00.permall")
    starts_clean(gated.name)


def test_domain_tvorch_never_launched(tv: Tv, gated: Gated):
    impostor = f"{PREFIX}impostor-{secrets.token_hex(2)}"

    def edit(root: ET.Element) -> None:
        root.find("name").text = impostor
        root.find("uuid").text = "1c8a3f64-0000-4000-8000-" + secrets.token_hex(6)

    redefine(edited(gated, edit))
    try:
        refused(impostor, "which this node did not launch")
        # No record, but the refusal is on file under the domain's name.
        assert [e["verdict"] for e in tv.json("events", impostor) if e["operation"] == "prepare begin"] == ["refused"]
    finally:
        virsh("undefine", "--nvram", "--keep-tpm", impostor, check=False)


def test_domain_without_tvorch_metadata_passes(gated: Gated, tmp_path: Path):
    plain = f"{PREFIX}plain-{secrets.token_hex(2)}"
    disk = Path(f"/var/lib/libvirt/images/{plain}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)

    def edit(root: ET.Element) -> None:
        root.find("name").text = plain
        root.find("uuid").text = "2c8a3f64-0000-4000-8000-" + secrets.token_hex(6)
        root.remove(root.find("metadata"))
        source = root.find("./devices/disk/source")
        source.set("file", str(disk))
        disk_element = root.find("./devices/disk")
        disk_element.remove(disk_element.find("backingStore"))
        for serial_log in root.iter("log"):
            serial_log.set("file", str(tmp_path / "plain.log"))
        devices = root.find("devices")
        for channel in devices.findall("channel"):  # the instance's attestation socket is tvorch's
            devices.remove(channel)

    redefine(edited(gated, edit))
    try:
        starts_clean(plain)
    finally:
        virsh("undefine", "--nvram", "--tpm", plain, check=False)
        disk.unlink()


def _stranger(gated: Gated, name: str) -> ET.Element:
    """GATED's definition as someone copying it would leave it: another name and UUID, no tvorch
    metadata, no vTPM secret (libvirt then makes the copy a vTPM of its own)."""
    root = ET.fromstring(gated.xml.read_text())
    root.find("name").text = name
    root.find("uuid").text = str(uuidlib.uuid4())
    root.remove(root.find("metadata"))
    for backend in root.iter("backend"):
        for encryption in backend.findall("encryption"):
            backend.remove(encryption)
    return root


def _harmless(root: ET.Element, disk: Path, log: Path) -> None:
    """Leave the stranger nothing of tvorch's: its own empty disk, no channel, its own console log."""
    disk_element = root.find("./devices/disk")
    disk_element.find("source").set("file", str(disk))
    disk_element.remove(disk_element.find("backingStore"))
    devices = root.find("devices")
    for channel in devices.findall("channel"):
        devices.remove(channel)
    for serial_log in root.iter("log"):
        serial_log.set("file", str(log))


def _starts_and_goes(name: str, xml: str, refusal: tuple[str, ...] | None, keep_nvram: bool = False) -> None:
    """KEEP_NVRAM: the domain names an instance's NVRAM file, which `undefine --nvram` would delete (and
    the instance's next start would then be refused: its UEFI variables reset to the template)."""
    redefine(xml)
    try:
        if refusal is None:
            starts_clean(name)
        else:
            refused(name, *refusal)
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", "--keep-nvram" if keep_nvram else "--nvram", "--tpm", name, check=False)


def test_copy_of_an_instance_without_metadata_is_refused(tv: Tv, gated: Gated):
    """Issue #13: the instance's definition stripped of <metadata>, <uuid> and <encryption> and defined
    under another name would run the tenant's overlay with a vTPM libvirt made, recorded nowhere."""
    copy = f"{PREFIX}copy-{secrets.token_hex(2)}"
    root = _stranger(gated, copy)
    _starts_and_goes(copy, ET.tostring(root, encoding="unicode"),
                     (gated.record["overlay"], f"tvorch instance {gated.record['id']}"))
    assert [e["verdict"] for e in tv.json("events", copy) if e["operation"] == "prepare begin"] == ["refused"]


@pytest.mark.parametrize("case", ["base-read-write", "instance-nvram", "overlay-dir", "state-dir", "base-read-only"])
def test_stranger_using_tvorch_files_is_refused(tv: Tv, gated: Gated, tmp_path: Path, case: str):
    """A domain that is not the instance may not touch what tvorch owns; a trusted image it may only read."""
    name = f"{PREFIX}stranger-{secrets.token_hex(2)}"
    disk = Path(f"/var/lib/libvirt/images/{name}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    planted = tv.overlay_dir / f"{name}.qcow2" if case == "overlay-dir" else tv.state_dir / f"{name}.qcow2"
    root = _stranger(gated, name)
    _harmless(root, disk, tmp_path / "console.log")
    source = root.find("./devices/disk/source")
    refusal: tuple[str, ...] | None
    if case.startswith("base-"):
        source.set("file", str(gated.base))
        if case == "base-read-only":
            ET.SubElement(source, "seclabel", model="dac", relabel="no")  # leave the base's owner alone
            ET.SubElement(root.find("./devices/disk"), "readonly")
        refusal = None if case == "base-read-only" else (
            f"{gated.base} is the image of tvorch instance {gated.record['id']}", "opened writable")
    elif case == "instance-nvram":
        nvram = f"/var/lib/libvirt/qemu/nvram/{gated.name}_VARS.fd"
        assert Path(nvram).exists()
        ET.SubElement(root.find("os"), "nvram").text = nvram
        refusal = (nvram, f"tvorch instance {gated.record['id']}")
    else:
        shutil.copyfile(disk, planted)
        source.set("file", str(planted))
        refusal = (str(planted), "tvorch's")
    try:
        _starts_and_goes(name, ET.tostring(root, encoding="unicode"), refusal, keep_nvram=case == "instance-nvram")
    finally:
        disk.unlink()
        planted.unlink(missing_ok=True)


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def test_stranger_passing_qemu_the_overlay_on_its_command_line_is_refused(gated: Gated, tmp_path: Path):
    """<qemu:commandline> hands QEMU arguments libvirt never reads: while the instance runs, its overlay is
    libvirt-qemu's, and another QEMU given `-drive file=<overlay>` would read the tenant's disk."""
    name = f"{PREFIX}argv-{secrets.token_hex(2)}"
    disk = Path(f"/var/lib/libvirt/images/{name}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    root = _stranger(gated, name)
    _harmless(root, disk, tmp_path / "console.log")
    commandline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in ("-drive", f"file={gated.record['overlay']},format=qcow2,if=none,id=tenant,readonly=on,"
                          "file.locking=off"):
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    virsh("start", gated.name)
    try:
        _starts_and_goes(name, ET.tostring(root, encoding="unicode"),
                         (gated.record["overlay"], f"tvorch instance {gated.record['id']}"))
    finally:
        virsh("destroy", gated.name, check=False)
        disk.unlink()


def _restart_libvirtd() -> None:
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "libvirtd.service"], check=True)
    else:
        subprocess.run(["pkill", "-x", "libvirtd"], check=True)
        for _ in range(50):
            if subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0:
                break
            time.sleep(0.2)
        subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(50):
        if virsh("version", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("libvirtd did not come back")


def test_libvirtd_restart_keeps_the_guest_running(tv: Tv, gated: Gated):
    virsh("start", gated.name)
    try:
        _restart_libvirtd()
        assert virsh("domstate", gated.name).stdout.strip() == "running"
        reconnect = [e for e in tv.json("events", gated.name) if e["operation"] == "reconnect begin"]
        # libvirt forgets the auto-selected firmware's features on reconnect; the hook maps it back.
        assert reconnect and reconnect[-1]["verdict"] == "allowed", reconnect
    finally:
        virsh("destroy", gated.name, check=False)


def test_save_and_restore_pass_the_gate(tv: Tv, gated: Gated, tmp_path: Path):
    """A restore goes through the hook too; libvirt's save image forgets the firmware
    features, and the hook maps the resolved firmware back (see tvorch.core.launch.canonical)."""
    saved = tmp_path / "saved.img"
    virsh("start", gated.name)
    try:
        # A save image tvorch did not make carries a vTPM state nobody ledgered: refused.
        virsh("save", gated.name, str(saved))
        proc = virsh("restore", str(saved), check=False)
        assert proc.returncode != 0 and "was not made by `tvorch save`" in proc.stderr, proc.stderr
        virsh("start", gated.name)
        # tvorch save + tvorch start: the restore passes the gate, canonical form included.
        tv.run("save", gated.name)
        tv.run("start", gated.name)
        assert virsh("domstate", gated.name).stdout.strip() == "running"
        restore = [e for e in tv.json("events", gated.name) if e["operation"] in ("restore begin", "prepare begin")]
        assert restore and restore[-1]["verdict"] == "allowed", restore
    finally:
        virsh("destroy", gated.name, check=False)


def test_host_verdict_gates_starts_when_required(tv: Tv, gated: Gated):
    """With policy.host_verdict = "require", a failing or stale host verdict refuses the start."""
    from tvorch.adapters.store import Store
    from tvorch.core.timestamps import utc_now
    from tvorch.core.attestation.hostverdict import HostVerdict

    original = tv.config.read_text()
    tv.config.write_text(original.replace(
        "[firmware_profiles.snakeoil]", '[policy]\nhost_verdict = "require"\n[firmware_profiles.snakeoil]'))
    store = Store(tv.state_dir / "tvorch.db")
    try:
        store.add_host_verdict(HostVerdict(utc_now(), time.time(), False, ("PCR 4: quoted 1234",), "0" * 64, "{}"))
        refused(gated.name, "host attestation failed", "PCR 4: quoted 1234")
        # tvorch launch says so before measuring or writing anything.
        proc = tv.run("launch", str(gated.base), "--name", f"{PREFIX}hostfail", check=False)
        assert proc.returncode == 12 and "launch refused: host attestation failed" in proc.stderr
        store.add_host_verdict(HostVerdict(utc_now(), time.time() - 100000, True, (), "0" * 64, "{}"))
        refused(gated.name, "older than host.verdict_max_age")
        store.add_host_verdict(HostVerdict(utc_now(), time.time(), True, (), "0" * 64, "{}"))
        starts_clean(gated.name)
    finally:
        store.close()
        tv.config.write_text(original)
