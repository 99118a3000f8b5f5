"""The libvirt qemu hook (tvorch.hook) end to end against a node state made by tvorch itself.

Each test builds what a launch leaves behind: a config, the SQLite store, an
instance record, a manifest signed with the node key, a real qcow2 overlay
over a real image layer, and the domain XML rendered from a DomainSpec. The
hook then gets that XML as libvirtd would pass it. Nothing is mocked: there
is no libvirt or TPM on this path, and the hook must never touch either.

`main` is run in a forked child: it closes every descriptor from 3 up (so
nothing libvirtd left open survives), which in pytest's own process would
close pytest's capture files and databases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tvorch import hook
from tvorch.adapters.imagefiles import file_identity
from tvorch.adapters.node_keys import load_or_create
from tvorch.adapters.store import Store
from tvorch.adapters.vtpm_state import state_digest
from tvorch.config import Config, parse_config
from tvorch.core.launch.canonical import config_digest
from tvorch.core.launch.domain_xml import render_domain_xml
from tvorch.core.launch.instance import InstanceRecord, InstanceState
from tvorch.core.vtpm.ledger import broken_link
from tvorch.core.launch.manifest import (
    LaunchManifest,
    Measurement,
    manifest_digest,
    sign_manifest,
)
from tvorch.core.launch.spec import DirectBoot, DiskLayer, DomainSpec, Firmware, TpmModel, VirtType
from tvorch.core.timestamps import utc_now

REPO = Path(__file__).resolve().parents[2]
LIBVIRT_XML = REPO / "tests" / "data" / "libvirt"
NAME = "tvtest-hook"
INSTANCE = "i-hooktest0001"
UUID = "6b1d2c3e-4f50-4a61-8b72-000000000001"
LAYER_BYTES = b"tvorch test image layer\n" * 43691  # ~1 MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")


@dataclasses.dataclass(frozen=True)
class Node:
    """What a launch of NAME left on this node, and where."""

    cfg: Config
    config_path: Path
    spec: DomainSpec
    xml: str  # the domain XML as libvirt hands it to the hook
    layer: Path
    overlay: Path
    vtpm: Path  # <swtpm_state_dir>/<uuid>, libvirt's vTPM directory for the domain

    def store(self) -> Store:
        return Store(self.cfg.db_path)

    def events(self) -> list[dict[str, object]]:
        s = self.store()
        try:
            return s.hook_events(INSTANCE, NAME)
        finally:
            s.close()

    def ledger_length(self) -> int:
        s = self.store()
        try:
            entries = s.ledger(INSTANCE)
        finally:
            s.close()
        assert broken_link(entries) is None
        return len(entries)

    def write_vtpm(self, data: bytes) -> None:
        (self.vtpm / "tpm2").mkdir(parents=True, exist_ok=True)
        (self.vtpm / "tpm2" / "tpm2-00.permall").write_bytes(data)


def write_config(tmp_path: Path, top: str = "", policy: str = "") -> tuple[Path, Config]:
    """A config file keeping every path of the node under TMP_PATH."""
    text = (
        f'state_dir = "{tmp_path}/state"\n'
        f'swtpm_state_dir = "{tmp_path}/swtpm"\n'
        f'overlay_dir = "{tmp_path}/overlays"\n'
        f'console_log_dir = "{tmp_path}/logs"\n'
        f"{top}\n[policy]\n{policy}\n"
    )
    path = tmp_path / "tvorch.toml"
    path.write_text(text)
    return path, parse_config(text.encode(), str(path))


def qemu_img(*args: object) -> None:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def make_overlay(layer: Path, overlay: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", layer, overlay)


def build_node(tmp_path: Path, top: str = "", policy: str = "") -> Node:
    """Leave on disk what `tvorch launch` leaves, made with tvorch's own code."""
    config_path, cfg = write_config(tmp_path, top, policy)
    images, overlays = tmp_path / "images", tmp_path / "overlays"
    images.mkdir()
    overlays.mkdir()
    layer = images / "base.raw"
    layer.write_bytes(LAYER_BYTES)
    overlay = overlays / f"{NAME}.{INSTANCE}.qcow2"
    make_overlay(layer, overlay)
    spec = DomainSpec(
        name=NAME, uuid=UUID, instance_id=INSTANCE, memory_mib=512, vcpus=1, virt_type=VirtType.QEMU,
        emulator="/usr/bin/qemu-system-x86_64", firmware=Firmware.EFI, secure_boot=False, tpm_model=TpmModel.CRB,
        disk_path=str(overlay), disk_format="qcow2", console_log=str(tmp_path / "logs" / "console.log"),
        backing_chain=(DiskLayer(str(layer), "raw"),),
    )
    identity = load_or_create(Path(cfg.state_dir), "hook-test-node")
    manifest = LaunchManifest(
        instance_id=INSTANCE, uuid=UUID, name=NAME, node="hook-test-node",
        created_at="2026-01-01T00:00:00.000+00:00",
        measurements=(Measurement(kind="image-layer", path=str(layer), digest=hashlib.sha256(LAYER_BYTES).hexdigest(),
                                  size=len(LAYER_BYTES), details={"format": "raw", "layer": 0}),),
        config_digest=config_digest(render_domain_xml(spec)),
        policy_digest=hashlib.sha256(cfg.raw).hexdigest(),
    )
    body = sign_manifest(manifest, identity.signing_key, identity.signing_cert)
    spec = dataclasses.replace(spec, manifest_digest=manifest_digest(body))
    xml = render_domain_xml(spec)
    # The metadata (which now names the manifest) is not part of the configuration.
    assert config_digest(xml) == manifest.config_digest
    now = utc_now()
    record = InstanceRecord(
        id=INSTANCE, name=NAME, uuid=UUID, image=str(layer), overlay=str(overlay),
        console_log=spec.console_log, state=InstanceState.RUNNING, virt_type="qemu", domain_xml=xml,
        created_at=now, updated_at=now,
    )
    store = Store(cfg.db_path)
    try:
        store.create_instance(record)
        store.save_manifest(INSTANCE, manifest_digest(body), body)
        store.set_overlay_identity(INSTANCE, file_identity(str(overlay)))
    finally:
        store.close()
    return Node(cfg, config_path, spec, xml, layer, overlay, Path(cfg.swtpm_state_dir) / UUID)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return build_node(tmp_path)


def call(cfg: Config, xml: str, name: str, operation: str, sub: str,
         capfd: pytest.CaptureFixture[str]) -> tuple[int, str | None]:
    """One hook decision, in process; the hook must never write on stdout (libvirt reads it as XML)."""
    result = hook.decide([name, operation, sub, "-"], xml, cfg)
    assert capfd.readouterr().out == ""
    return result


def decide(node: Node, operation: str, sub: str, capfd: pytest.CaptureFixture[str], xml: str | None = None,
           name: str = NAME) -> tuple[int, str | None]:
    """One hook decision about NODE's instance, with its own XML unless XML is given."""
    return call(node.cfg, node.xml if xml is None else xml, name, operation, sub, capfd)


def run_main(args: list[str], xml: str, config_path: Path, monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of hook.main in a forked child, as libvirtd would see them."""
    monkeypatch.setenv("TVORCH_CONFIG", str(config_path))
    monkeypatch.setattr(sys, "stdin", io.StringIO(xml))
    out_path, err_path = tmp_path / "main.stdout", tmp_path / "main.stderr"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 98
        try:
            for fd, path in ((1, out_path), (2, err_path)):
                new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(new, fd)
                os.close(new)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            status = hook.main(args)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), out_path.read_text(), err_path.read_text()


def hook_events_of_domain(cfg: Config, domain: str) -> list[tuple[str | None, str, str, str]]:
    """Hook decisions recorded for DOMAIN, including those with no tvorch instance."""
    db = sqlite3.connect(cfg.db_path)
    try:
        return db.execute("SELECT instance_id, operation, verdict, reasons FROM hook_events WHERE domain = ? "
                          "ORDER BY seq", (domain,)).fetchall()
    finally:
        db.close()


def foreign_xml() -> str:
    """A real libvirt hook XML with tvorch's metadata taken out: a domain tvorch did not launch."""
    root = ET.fromstring((LIBVIRT_XML / "efi" / "hook-prepare-begin.xml").read_text())
    metadata = root.find("metadata")
    assert metadata is not None
    root.remove(metadata)
    return ET.tostring(root, encoding="unicode")


# -- operations the hook does not act on -----------------------------------------

IGNORED = [("attach", "begin"), ("prepare", "end"), ("start", "end"), ("started", "end"), ("stopped", "begin"),
           ("release", "begin"), ("migrate", "-"), ("restore", "-"), ("bogus", "begin")]


@pytest.mark.parametrize(("operation", "sub"), IGNORED)
def test_ignored_operation_allows_without_opening_the_store(
    tmp_path: Path, operation: str, sub: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path, cfg = write_config(tmp_path)
    xml = (LIBVIRT_XML / "efi" / "hook-prepare-begin.xml").read_text()  # carries tvorch metadata
    assert call(cfg, xml, "tvtest-canon-efi", operation, sub, capfd) == (0, None)
    assert run_main(["tvtest-canon-efi", operation, sub, "-"], xml, config_path, monkeypatch, tmp_path) == (0, "", "")
    assert not Path(cfg.state_dir).exists()


# -- domains tvorch did not launch ------------------------------------------------


def test_foreign_domain_is_allowed_and_store_untouched(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _, cfg = write_config(tmp_path)
    for operation, sub in (("prepare", "begin"), ("started", "begin"), ("release", "end"), ("reconnect", "begin")):
        assert call(cfg, foreign_xml(), "other", operation, sub, capfd) == (0, None)
    assert not Path(cfg.state_dir).exists()


def test_foreign_domain_is_refused_when_policy_requires_tvorch_domains(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _, cfg = write_config(tmp_path, policy="require_tvorch_domains = true")
    status, line = call(cfg, foreign_xml(), "other", "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert "other" in line and "require_tvorch_domains" in line
    # Only a start can be refused: a stop or reconnect of such a domain goes through.
    for operation, sub in (("release", "end"), ("reconnect", "begin"), ("started", "begin")):
        assert call(cfg, foreign_xml(), "other", operation, sub, capfd) == (0, None)


def test_unknown_instance_is_refused_on_prepare_and_warned_on_reconnect(
    node: Node, capfd: pytest.CaptureFixture[str]
) -> None:
    xml = (LIBVIRT_XML / "efi" / "hook-prepare-begin.xml").read_text()  # claims instance i-canon-efi
    status, line = decide(node, "prepare", "begin", capfd, xml=xml, name="tvtest-canon-efi")
    assert status == 1 and line is not None and "i-canon-efi" in line and "did not launch" in line
    assert decide(node, "reconnect", "begin", capfd, xml=xml, name="tvtest-canon-efi") == (0, None)
    events = hook_events_of_domain(node.cfg, "tvtest-canon-efi")
    assert [(e[0], e[1], e[2]) for e in events] == [(None, "prepare begin", "refused"),
                                                     (None, "reconnect begin", "warning")]
    assert "i-canon-efi" in events[1][3]


def test_known_instance_with_its_metadata_removed_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """Without the metadata the instance would skip every check (and `tvorch start` would lend it its key)."""
    root = ET.fromstring(node.xml)
    metadata = root.find("metadata")
    assert metadata is not None
    root.remove(metadata)
    stripped = ET.tostring(root, encoding="unicode")
    status, line = decide(node, "prepare", "begin", capfd, xml=stripped)
    assert status == 1 and line is not None and "metadata was removed" in line and INSTANCE in line
    assert [(e["operation"], e["verdict"]) for e in node.events()] == [("prepare begin", "refused")]
    assert decide(node, "release", "end", capfd, xml=stripped) == (0, None)  # only starts are refused


def stranger(node: Node, name: str = "tvtest-copy") -> ET.Element:
    """NODE's domain as a copy would carry it: another name and UUID, no tvorch metadata."""
    root = ET.fromstring(node.xml)
    root.remove(root.find("metadata"))  # type: ignore[arg-type]
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = "6b1d2c3e-4f50-4a61-8b72-0000000000ff"  # type: ignore[union-attr]
    return root


def test_copy_of_an_instance_under_a_new_name_and_uuid_is_refused(node: Node,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """Issue #13: no metadata, no known UUID, but the instance's overlay: not a tvorch instance, so refused."""
    copy = ET.tostring(stranger(node), encoding="unicode")
    status, line = call(node.cfg, copy, "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert line.startswith("tvorch: refused to start tvtest-copy: not a tvorch instance, yet <source> ")
    assert f"{node.overlay} belongs to tvorch instance {INSTANCE}" in line
    # On file under the copy's name, not the instance's: its own stop/start records stay as they were.
    assert [e[:3] for e in hook_events_of_domain(node.cfg, "tvtest-copy")] == [(None, "prepare begin", "refused")]
    assert node.events() == []
    for operation, sub in (("release", "end"), ("reconnect", "begin")):
        assert call(node.cfg, copy, "tvtest-copy", operation, sub, capfd) == (0, None)


def test_instances_image_layer_may_be_lent_read_only_only(node: Node, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    root = stranger(node)
    disk = root.find("./devices/disk")
    assert disk is not None
    disk.remove(disk.find("backingStore"))  # type: ignore[arg-type]
    disk.find("source").set("file", str(node.layer))  # type: ignore[union-attr]
    for log in root.iter("log"):
        log.set("file", str(tmp_path / "stranger.log"))
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None and f"{node.layer} is the image of tvorch instance {INSTANCE}" in line
    assert "opened writable" in line
    ET.SubElement(disk, "readonly")
    assert call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd) == (0, None)


def test_a_symbolic_link_or_a_storage_volume_does_not_hide_the_overlay(
    node: Node, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tvorch.service import owned_files

    link = tmp_path / "innocent.qcow2"
    link.symlink_to(node.overlay)
    root = stranger(node)
    root.find("./devices/disk/source").set("file", str(link))  # type: ignore[union-attr]
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None and f"{node.overlay} belongs to tvorch instance {INSTANCE}" in line

    pools = tmp_path / "pools"
    pools.mkdir()
    (pools / "p.xml").write_text(f"<pool type='dir'><name>p</name><target><path>{node.overlay.parent}</path>"
                                 "</target></pool>")
    monkeypatch.setattr(owned_files, "POOL_DIRS", (str(pools),))
    disk = root.find("./devices/disk")
    assert disk is not None
    disk.set("type", "volume")
    source = disk.find("source")
    assert source is not None
    source.attrib.clear()
    source.attrib.update(pool="p", volume=node.overlay.name)
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None and f"{node.overlay} belongs to tvorch instance {INSTANCE}" in line
    source.set("pool", "unknown")
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None and "storage pool unknown, whose target path cannot be read" in line


def test_the_host_tpm_that_seals_the_vtpm_keys_is_not_passed_through(node: Node, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """With vtpm.key_protection = "host-tpm" (the default), a domain holding the host TPM could unseal every key."""
    root = stranger(node)
    disk = root.find("./devices/disk")
    assert disk is not None
    disk.remove(disk.find("backingStore"))  # type: ignore[arg-type]
    disk.find("source").set("file", str(tmp_path / "elsewhere.qcow2"))  # type: ignore[union-attr]
    for log in root.iter("log"):
        log.set("file", str(tmp_path / "stranger.log"))
    tpm = root.find("./devices/tpm")
    assert tpm is not None and node.cfg.host.tcti == "device:/dev/tpmrm0"
    tpm.remove(tpm.find("backend"))  # type: ignore[arg-type]
    ET.SubElement(ET.SubElement(tpm, "backend", type="passthrough"), "device", path="/dev/tpm0")
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert line.endswith("<device> /dev/tpm0 belongs to the host TPM that seals the vTPM keys")


def test_a_destroyed_instances_kept_vtpm_state_is_not_given_to_another_domain(
    node: Node, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """libvirt picks a vTPM's state by UUID: a new domain with a destroyed instance's UUID would inherit it."""
    node.write_vtpm(b"kept state")
    s = node.store()
    try:
        s.update_instance(INSTANCE, state=InstanceState.DESTROYED, event=("destroyed", "vTPM state kept"))
    finally:
        s.close()
    root = stranger(node)
    root.find("uuid").text = UUID  # type: ignore[union-attr]
    disk = root.find("./devices/disk")
    assert disk is not None
    disk.remove(disk.find("backingStore"))  # type: ignore[arg-type]
    disk.find("source").set("file", str(tmp_path / "elsewhere.qcow2"))  # type: ignore[union-attr]
    for log in root.iter("log"):
        log.set("file", str(tmp_path / "stranger.log"))
    status, line = call(node.cfg, ET.tostring(root, encoding="unicode"), "tvtest-copy", "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert f"its UUID selects the vTPM state {node.vtpm} kept for destroyed tvorch instance {INSTANCE}" in line


def test_known_instance_under_another_domain_name_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A copy of a tvorch domain defined under a new name must not pass as the original."""
    status, line = decide(node, "prepare", "begin", capfd, name="tvtest-impostor")
    assert status == 1 and line is not None and INSTANCE in line


# -- starts of a tvorch instance --------------------------------------------------


def test_restore_of_a_save_tvorch_did_not_make_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A save image carries the vTPM state: only the one `tvorch save` recorded may be resumed (integration:
    test_start_paths resumes one and refuses a replayed one)."""
    status, line = decide(node, "restore", "begin", capfd)
    assert status == 1 and line is not None and "virsh managedsave-remove" in line
    assert [e["verdict"] for e in node.events()] == ["refused"]


@pytest.mark.parametrize(("operation", "sub"), [("prepare", "begin"), ("start", "begin")])
def test_clean_start_is_allowed_and_recorded(
    node: Node, operation: str, sub: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert decide(node, operation, sub, capfd) == (0, None)
    events = node.events()
    assert [(e["operation"], e["verdict"], e["reasons"]) for e in events] == [(f"{operation} {sub}", "allowed", [])]


def test_clean_start_with_libvirts_live_xml_form_is_allowed(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """libvirtd passes its own serialisation (addresses, controllers, units): the digest must not change."""
    root = ET.fromstring(node.xml)
    memory = root.find("memory")
    assert memory is not None and memory.get("unit") == "MiB"
    memory.set("unit", "KiB")
    memory.text = str(512 * 1024)
    devices = root.find("devices")
    assert devices is not None
    ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    assert decide(node, "prepare", "begin", capfd, xml=ET.tostring(root, encoding="unicode")) == (0, None)


def test_changed_memory_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    xml = render_domain_xml(dataclasses.replace(node.spec, memory_mib=4096))
    status, line = decide(node, "prepare", "begin", capfd, xml=xml)
    assert status == 1 and line is not None
    assert line.startswith(f"tvorch: refused to start {NAME}: ")
    assert "configuration changed" in line
    assert node.events()[-1]["verdict"] == "refused"


def test_modified_layer_is_refused_naming_it(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    with open(node.layer, "r+b") as f:
        f.seek(4096)
        f.write(b"X")
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert f"image layer {node.layer} changed" in line
    assert "configuration changed" not in line


def test_missing_layer_is_refused_naming_it(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    node.layer.unlink()
    status, line = decide(node, "start", "begin", capfd)
    assert status == 1 and line is not None and str(node.layer) in line


def test_replaced_overlay_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A fresh overlay over the very same layer is still not the one tvorch made (it drops the guest's disk)."""
    fresh = node.overlay.with_name("fresh.qcow2")
    make_overlay(node.layer, fresh)
    os.rename(fresh, node.overlay)
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None
    assert f"overlay {node.overlay} was replaced since launch" in line


def test_host_verdict_required_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    node = build_node(tmp_path, policy='host_verdict = "require"')
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and "host attestation verdict" in line


def test_reconnect_with_a_mismatch_is_allowed_with_a_warning(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A failing reconnect hook makes libvirtd kill the running guest: warn, never refuse."""
    xml = render_domain_xml(dataclasses.replace(node.spec, vcpus=2))
    assert decide(node, "reconnect", "begin", capfd, xml=xml) == (0, None)
    last = node.events()[-1]
    assert last["operation"] == "reconnect begin" and last["verdict"] == "warning"
    assert any("configuration changed" in r for r in last["reasons"])  # type: ignore[union-attr]


# -- the vTPM ledger and rollback ---------------------------------------------------


def run_guest(node: Node, capfd: pytest.CaptureFixture[str], state_after: bytes | None = None) -> None:
    """The hook calls of one allowed run of the guest; STATE_AFTER is what swtpm leaves at stop."""
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    assert decide(node, "start", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    if state_after is not None:
        node.write_vtpm(state_after)
    assert decide(node, "stopped", "end", capfd) == (0, None)
    assert decide(node, "release", "end", capfd) == (0, None)


def test_release_after_a_run_records_the_vtpm_state(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    node.write_vtpm(b"state v1")
    run_guest(node, capfd)
    s = node.store()
    try:
        entries = s.ledger(INSTANCE)
    finally:
        s.close()
    assert [e.state_digest for e in entries] == [state_digest(node.vtpm)]
    assert node.events()[-1]["reasons"] == [f"vTPM state sha256:{state_digest(node.vtpm)}"]
    assert decide(node, "prepare", "begin", capfd) == (0, None)  # the recorded state is accepted next time


def test_vtpm_rollback_is_refused_and_never_recorded(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    node.write_vtpm(b"state v1")
    run_guest(node, capfd, state_after=b"state v2 after the guest sealed a secret")
    assert node.ledger_length() == 1
    node.write_vtpm(b"state v1")  # an older copy put back
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and "vTPM state differs" in line
    # libvirt still calls stopped/release after a refused start: the rolled-back
    # state must not become the recorded one.
    assert decide(node, "stopped", "end", capfd) == (0, None)
    assert decide(node, "release", "end", capfd) == (0, None)
    assert node.ledger_length() == 1
    assert node.events()[-1]["reasons"] == ["start did not happen; nothing recorded"]
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and "vTPM state differs" in line


def test_vtpm_changed_in_place_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    node.write_vtpm(b"state v1")
    run_guest(node, capfd)
    node.write_vtpm(b"state v1 edited")
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and "vTPM state differs" in line


def test_vtpm_state_removed_after_a_recorded_stop_is_refused(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    node.write_vtpm(b"state v1")
    run_guest(node, capfd)
    shutil.rmtree(node.vtpm)
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and "vTPM state differs" in line and "no state" in line


def test_reconnect_does_not_compare_the_vtpm_state_in_use(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """After a libvirtd restart swtpm is running and writing its state: a difference then is no rollback."""
    node.write_vtpm(b"state v1")
    run_guest(node, capfd)
    node.write_vtpm(b"state v1 as the running guest changed it")
    assert decide(node, "reconnect", "begin", capfd) == (0, None)
    last = node.events()[-1]
    assert (last["operation"], last["verdict"], last["reasons"]) == ("reconnect begin", "allowed", [])


def test_release_without_a_run_records_nothing(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A define-then-release (or a start refused before `started`) never ran the guest."""
    node.write_vtpm(b"state v1")
    assert decide(node, "release", "end", capfd) == (0, None)
    assert node.ledger_length() == 0


# -- main: what libvirtd sees ------------------------------------------------------


def test_main_allows_a_clean_start_silently(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_main([NAME, "prepare", "begin", "-"], node.xml, node.config_path, monkeypatch, tmp_path) == (0, "", "")
    assert node.events()[-1]["verdict"] == "allowed"


def test_main_refuses_with_one_line_on_stderr(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xml = render_domain_xml(dataclasses.replace(node.spec, memory_mib=1024))
    status, out, err = run_main([NAME, "prepare", "begin", "-"], xml, node.config_path, monkeypatch, tmp_path)
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"tvorch: refused to start {NAME}: configuration changed")


def test_main_deadline_refuses_a_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 GiB layer (sparse, changed since launch) must be hashed: seconds, against a 1 ms deadline."""
    node = build_node(tmp_path, top="hook_deadline_ms = 1")
    os.truncate(node.layer, 4 << 30)
    status, out, err = run_main([NAME, "prepare", "begin", "-"], node.xml, node.config_path, monkeypatch, tmp_path)
    assert (status, out) == (1, "")
    assert err.startswith(f"tvorch: refused to start {NAME}: the hook's deadline (hook_deadline_ms = 1)")
    assert f"`tvorch check {NAME}`" in err
    assert err.count("\n") == 1

def test_main_deadline_refusal_is_recorded_and_its_release_ledgers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue #13: a start refused at the deadline was not recorded, so the release after it took the
    previous run's `started begin` for its own and ledgered a rolled-back vTPM state put there before."""
    node = build_node(tmp_path, top="hook_deadline_ms = 400")
    node.write_vtpm(b"state v1")
    run_guest(node, capfd, state_after=b"state v2")
    assert node.ledger_length() == 1
    node.write_vtpm(b"state v1")  # the rollback
    os.truncate(node.layer, 4 << 30)  # seconds to hash, against 300 ms of the 400 ms deadline
    status, _, err = run_main([NAME, "prepare", "begin", "-"], node.xml, node.config_path, monkeypatch, tmp_path)
    assert status == 1 and "deadline" in err
    last = node.events()[-1]
    assert (last["operation"], last["verdict"]) == ("prepare begin", "refused")
    assert "hook_deadline_ms = 400" in last["reasons"][0]  # type: ignore[index]
    assert run_main([NAME, "release", "end", "-"], node.xml, node.config_path, monkeypatch, tmp_path)[0] == 0
    assert node.ledger_length() == 1
    assert node.events()[-1]["reasons"] == ["start did not happen; nothing recorded"]


def test_started_without_an_allowed_start_opens_no_run(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A `started begin` whose start this hook did not allow (refused, never judged) is no run to ledger."""
    node.write_vtpm(b"state v1")
    run_guest(node, capfd)
    node.write_vtpm(b"state v0, an older copy")
    status, _ = decide(node, "prepare", "begin", capfd)
    assert status == 1
    assert decide(node, "started", "begin", capfd) == (0, None)
    assert node.events()[-1]["verdict"] == "warning"
    assert decide(node, "release", "end", capfd) == (0, None)
    assert node.ledger_length() == 1
    # An allowance is used once: a second `started begin` after one allowed start opens nothing either.
    node.write_vtpm(b"state v1")
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    assert node.events()[-1]["verdict"] == "warning"


def test_a_new_start_check_closes_a_run_its_release_missed(node: Node, capfd: pytest.CaptureFixture[str]) -> None:
    """A run whose `release end` never came (the hook's deadline, a crash) is not closed by the release
    of a later, refused start."""
    node.write_vtpm(b"state v1")
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    node.write_vtpm(b"state v0, an older copy")  # swtpm's state as a rollback left it; release was missed
    store = node.store()
    try:
        store.append_ledger(INSTANCE, "backup", "e" * 64)  # what the state on disk is not
    finally:
        store.close()
    assert decide(node, "prepare", "begin", capfd)[0] == 1
    assert decide(node, "release", "end", capfd) == (0, None)
    assert node.ledger_length() == 1


def test_main_deadline_lets_a_release_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Past the deadline anything but a start is let through (and, here, nothing is recorded)."""
    node = build_node(tmp_path, top="hook_deadline_ms = 1")
    # The guest ran (a start the hook allowed, then started), so release will hash the state.
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    node.write_vtpm(b"")
    os.truncate(node.vtpm / "tpm2" / "tpm2-00.permall", 64 << 20)  # tens of ms to read and hash
    status, out, err = run_main([NAME, "release", "end", "-"], node.xml, node.config_path, monkeypatch, tmp_path)
    assert (status, out) == (0, "")
    assert "deadline" in err and "refusing" not in err
    assert node.ledger_length() == 0


def test_main_config_error_refuses_starts_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such.toml"
    xml = render_domain_xml(DomainSpec(
        name=NAME, uuid=UUID, instance_id=INSTANCE, memory_mib=512, vcpus=1, virt_type=VirtType.QEMU,
        emulator="/usr/bin/qemu-system-x86_64", firmware=Firmware.EFI, secure_boot=False, tpm_model=TpmModel.CRB,
        disk_path="/x.qcow2", disk_format="qcow2", console_log="/x.log"))
    status, out, err = run_main([NAME, "prepare", "begin", "-"], xml, missing, monkeypatch, tmp_path)
    assert (status, out) == (1, "") and "hook error" in err and str(missing) in err
    status, out, err = run_main([NAME, "release", "end", "-"], xml, missing, monkeypatch, tmp_path)
    assert (status, out) == (0, "") and "hook error" in err


def test_main_malformed_xml_refuses_a_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, _ = write_config(tmp_path)
    status, out, err = run_main([NAME, "prepare", "begin", "-"], "<domain>", config_path, monkeypatch, tmp_path)
    assert (status, out) == (1, "") and "not well-formed" in err


def test_hook_imports_nothing_heavy() -> None:
    """libvirtd waits for the hook on every operation: the heavy libraries must stay out."""
    proc = subprocess.run(
        [sys.executable, "-c", "import tvorch.hook, sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )
    top_level = {name.split(".")[0] for name in proc.stdout.split()}
    assert "tvorch" in top_level  # the probe itself worked
    assert top_level.isdisjoint({"libvirt", "libvirtmod", "tpm2_pytss", "structlog", "cryptography", "click",
                                 "tenacity"}), sorted(top_level)


def test_tvorch_hook_command_runs_the_hook(tmp_path):
    """`tvorch hook ...` (the CLI spelling) reaches the same entry point; ignored operations exit 0 at once."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tvorch.cli", "hook", "vm", "attach", "begin", "-"],
                          input="", capture_output=True, text=True, timeout=60,
                          env={"TVORCH_CONFIG": str(tmp_path / "absent.toml"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""

# -- issue #13: every measured file, the direct-boot files, the NVRAM ----------------------


def resigned(node: Node, extra: tuple[Measurement, ...], spec: DomainSpec | None = None,
             nvram: Path | None = None) -> Node:
    """NODE with a manifest that also measures EXTRA (and SPEC's configuration, NVRAM's path in its XML)."""
    spec = dataclasses.replace(spec or node.spec, manifest_digest=None)

    def xml_of(s: DomainSpec) -> str:
        xml = render_domain_xml(s)
        if nvram is not None:  # as libvirt fills it in: a path of the test's, not libvirt's default
            xml = xml.replace("</os>", f"  <nvram template='/t.fd'>{nvram}</nvram>\n  </os>", 1)
        return xml

    layer = Measurement(kind="image-layer", path=str(node.layer), digest=hashlib.sha256(LAYER_BYTES).hexdigest(),
                        size=len(LAYER_BYTES), details={"format": "raw", "layer": 0})
    identity = load_or_create(Path(node.cfg.state_dir), "hook-test-node")
    body = sign_manifest(LaunchManifest(
        instance_id=INSTANCE, uuid=UUID, name=NAME, node="hook-test-node", created_at="2026-01-01T00:00:00.000+00:00",
        measurements=(layer, *extra), config_digest=config_digest(xml_of(spec)),
        policy_digest=hashlib.sha256(node.cfg.raw).hexdigest()), identity.signing_key, identity.signing_cert)
    db = sqlite3.connect(node.cfg.db_path)
    try:
        db.execute("UPDATE manifests SET body = ?, digest = ? WHERE instance_id = ?",
                   (body, manifest_digest(body), INSTANCE))
        db.commit()
    finally:
        db.close()
    return dataclasses.replace(node, spec=spec, xml=xml_of(dataclasses.replace(spec, manifest_digest=manifest_digest(body))))


def measured(kind: str, path: Path) -> Measurement:
    data = path.read_bytes()
    return Measurement(kind=kind, path=str(path), digest=hashlib.sha256(data).hexdigest(), size=len(data))


def test_changed_initrd_is_refused_and_boot_files_go_back_to_root_once_started(
    node: Node, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel bytes")
    initrd.write_bytes(b"initrd bytes")
    spec = dataclasses.replace(node.spec, direct_boot=DirectBoot(str(kernel), str(initrd), "console=ttyS0"))
    node = resigned(node, (measured("kernel", kernel), measured("initrd", initrd)), spec)
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    # What libvirt's DAC driver does at start: the files become the qemu user's.
    for path in (kernel, initrd):
        os.chown(path, 64055, 64055)
        os.chmod(path, 0o664)
    assert decide(node, "started", "begin", capfd) == (0, None)
    for path in (kernel, initrd):
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, 0, 0o644), path
    with open(initrd, "ab") as f:
        f.write(b"\0")
    status, line = decide(node, "prepare", "begin", capfd)
    assert status == 1 and line is not None and f"initrd {initrd} changed" in line


def test_nvram_is_ledgered_at_each_stop_and_checked_at_each_start(
    node: Node, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    template, nvram = tmp_path / "VARS.fd", tmp_path / "nvram" / f"{NAME}_VARS.fd"
    template.write_bytes(b"vars template: PK KEK db")
    nvram.parent.mkdir()
    node = resigned(node, (measured("firmware-vars", template),), nvram=nvram)
    store = node.store()
    try:  # what launch ledgers: the template libvirt copies at the first start
        store.append_ledger(INSTANCE, "launched", hashlib.sha256(template.read_bytes()).hexdigest(), "nvram_ledger")
    finally:
        store.close()
    assert decide(node, "prepare", "begin", capfd) == (0, None)  # no file yet: libvirt will copy the template
    shutil.copyfile(template, nvram)
    node.write_vtpm(b"state v1")
    assert decide(node, "start", "begin", capfd) == (0, None)
    assert decide(node, "started", "begin", capfd) == (0, None)
    nvram.write_bytes(b"vars as the guest left them: its boot entries")
    assert decide(node, "release", "end", capfd) == (0, None)
    assert node.events()[-1]["reasons"] == [f"vTPM state sha256:{state_digest(node.vtpm)}",
                                            f"NVRAM sha256:{hashlib.sha256(nvram.read_bytes()).hexdigest()}"]
    assert decide(node, "prepare", "begin", capfd) == (0, None)
    for tampered in (b"other keys: PK KEK db of someone else", None):  # replaced; removed (back to the template)
        kept = nvram.read_bytes()
        if tampered is None:
            nvram.unlink()
        else:
            nvram.write_bytes(tampered)
        status, line = decide(node, "prepare", "begin", capfd)
        assert status == 1 and line is not None and f"NVRAM {nvram} differs from the last recorded stop" in line
        nvram.write_bytes(kept)
    s = node.store()
    try:
        entries = s.ledger(INSTANCE, "nvram_ledger")
    finally:
        s.close()
    assert [e.event for e in entries] == ["launched", "stopped"] and broken_link(entries) is None
