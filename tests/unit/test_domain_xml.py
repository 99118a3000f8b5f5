"""Domain XML rendering: golden files, schema validity, and the rules behind them."""

from __future__ import annotations

import dataclasses
import difflib
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.components import missing
from tvorch.core.launch.domain_xml import (
    InstanceMetadata,
    parse_instance_metadata,
    render_domain_xml,
)
from tvorch.core.launch.spec import (
    METADATA_NAMESPACE,
    DirectBoot,
    DiskLayer,
    DomainSpec,
    Firmware,
    FirmwareImages,
    TpmModel,
    VirtType,
)
from tvorch.errors import InputError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

# The integration test defines the golden files in libvirt as they are, so
# names carry its prefix and the disk is the throwaway image it creates.
BASE = DomainSpec(
    name="tvtest-xml-base",
    uuid="00000000-0000-4000-8000-000000000000",
    instance_id="i-base",
    memory_mib=512,
    vcpus=1,
    virt_type=VirtType.QEMU,
    emulator="/usr/bin/qemu-system-x86_64",
    firmware=Firmware.EFI,
    secure_boot=False,
    tpm_model=TpmModel.CRB,
    disk_path="/var/lib/libvirt/images/tvtest-xml-disk.qcow2",
    disk_format="qcow2",
    console_log="/var/log/libvirt/qemu/tvtest-xml-console.log",
)


MANIFEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def _scenario(name: str, number: int, **changes: Any) -> DomainSpec:
    return dataclasses.replace(
        BASE,
        name=f"tvtest-xml-{name}",
        uuid=f"5c0a7e1d-8f3b-4a26-9d41-{number:012d}",
        instance_id=f"i-{name}",
        console_log=f"/var/log/libvirt/qemu/tvtest-xml-{name}-console.log",
        **changes,
    )


SCENARIOS: dict[str, DomainSpec] = {
    "efi": _scenario("efi", 1, network="default"),
    "efi-secure-boot": _scenario("efi-secure-boot", 2, secure_boot=True),
    "bios": _scenario("bios", 3, firmware=Firmware.BIOS),
    "direct-kernel": _scenario(
        "direct-kernel",
        4,
        firmware=Firmware.BIOS,
        direct_boot=DirectBoot(
            kernel="/var/lib/tvorch/boot/vmlinuz",
            initrd="/var/lib/tvorch/boot/initrd.img",
            cmdline="console=ttyS0 ima_policy=tcb",
        ),
    ),
    "tis": _scenario("tis", 5, tpm_model=TpmModel.TIS),
    "efi-firmware-profile": _scenario(
        "efi-firmware-profile",
        6,
        secure_boot=True,
        firmware_images=FirmwareImages(
            code="/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd",
            vars_template="/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd",
            secure_boot=True,
        ),
    ),
    "efi-backing-chain": _scenario(
        "efi-backing-chain",
        7,
        backing_chain=(
            DiskLayer("/var/lib/libvirt/images/tvtest-xml-layer.qcow2", "qcow2"),
            DiskLayer("/var/lib/libvirt/images/tvtest-xml-base.raw", "raw"),
        ),
    ),
    "efi-manifest": _scenario("efi-manifest", 8, manifest_digest=MANIFEST),
    "efi-vtpm-secret": _scenario("efi-vtpm-secret", 9, vtpm_secret="7d0e1c2b-3a4f-4b5c-8d6e-9f0a1b2c3d4e"),
    "efi-guest-channel": _scenario("efi-guest-channel", 10, guest_channel="/run/tvorch/channels/i-efi-guest-channel/attest.sock"),
}


def _element(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    assert element is not None, f"no <{path}>"
    return element


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendering_matches_golden_file(scenario: str, regen_golden: bool) -> None:
    rendered = render_domain_xml(SCENARIOS[scenario])
    golden = GOLDEN / f"{scenario}.xml"
    if regen_golden:
        golden.write_text(rendered, encoding="utf-8")
        return
    if not golden.exists():
        pytest.fail(f"{golden} is missing; run pytest with --regen-golden to create it")
    expected = golden.read_text(encoding="utf-8")
    if rendered != expected:
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            rendered.splitlines(keepends=True),
            fromfile=str(golden),
            tofile="rendered",
        )
        pytest.fail(
            "rendering differs from the golden file (run with --regen-golden if intended):\n"
            + "".join(diff),
            pytrace=False,
        )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_file_is_valid_domain_xml(scenario: str) -> None:
    validator = shutil.which("virt-xml-validate")
    if validator is None:
        missing("virt-xml-validate is not installed (package libvirt-clients)")
    result = subprocess.run(
        [validator, str(GOLDEN / f"{scenario}.xml"), "domain"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_output_has_no_declaration_and_ends_with_newline() -> None:
    xml = render_domain_xml(BASE)
    assert xml.startswith('<domain type="qemu">\n  <name>')
    assert xml.endswith("</domain>\n")
    assert not xml.endswith("\n\n")


def test_rendering_is_deterministic() -> None:
    twin = dataclasses.replace(BASE, direct_boot=DirectBoot(kernel="/k", initrd="/i"))
    other = dataclasses.replace(BASE, direct_boot=DirectBoot(kernel="/k", initrd="/i"))
    assert twin is not other
    assert render_domain_xml(twin).encode() == render_domain_xml(other).encode()
    assert render_domain_xml(BASE).encode() == render_domain_xml(BASE).encode()


def test_kvm_asks_for_host_cpu_model_right_after_features() -> None:
    root = ET.fromstring(render_domain_xml(dataclasses.replace(BASE, virt_type=VirtType.KVM)))
    assert root.get("type") == "kvm"
    tags = [child.tag for child in root]
    assert tags[tags.index("features") + 1] == "cpu"
    cpus = root.findall("cpu")
    assert [cpu.attrib for cpu in cpus] == [{"mode": "host-model"}]
    assert len(cpus[0]) == 0


def test_qemu_tcg_has_no_cpu_element() -> None:
    root = ET.fromstring(render_domain_xml(BASE))
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None


def test_secure_boot_with_bios_is_refused() -> None:
    spec = dataclasses.replace(BASE, firmware=Firmware.BIOS, secure_boot=True)
    with pytest.raises(InputError) as err:
        render_domain_xml(spec)
    assert "\n" not in str(err.value)
    assert "Secure Boot" in str(err.value)


def test_firmware_images_with_bios_are_refused() -> None:
    spec = dataclasses.replace(
        SCENARIOS["efi-firmware-profile"], firmware=Firmware.BIOS, secure_boot=False
    )
    with pytest.raises(InputError, match="BIOS"):
        render_domain_xml(spec)


@pytest.mark.parametrize("spec_secure_boot", [True, False])
def test_firmware_images_must_agree_with_secure_boot(spec_secure_boot: bool) -> None:
    images = FirmwareImages(
        code="/fw/CODE.fd", vars_template="/fw/VARS.fd", secure_boot=not spec_secure_boot
    )
    spec = dataclasses.replace(BASE, secure_boot=spec_secure_boot, firmware_images=images)
    with pytest.raises(InputError, match="/fw/CODE.fd"):
        render_domain_xml(spec)


def test_efi_without_secure_boot_disables_both_firmware_features_and_smm() -> None:
    root = ET.fromstring(render_domain_xml(BASE))
    features = root.findall("os/firmware/feature")
    assert {f.get("name"): f.get("enabled") for f in features} == {
        "enrolled-keys": "no",
        "secure-boot": "no",
    }
    assert root.find("features/smm") is None


def test_direct_boot_under_efi_has_no_disk_boot_order() -> None:
    spec = dataclasses.replace(BASE, direct_boot=DirectBoot(kernel="/boot/vmlinuz"))
    root = ET.fromstring(render_domain_xml(spec))
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.find("os/initrd") is None and root.find("os/cmdline") is None
    assert root.find("devices/disk/boot") is None


ODD = "/srv/a&b <c> \"d\" 'e' ]]> \u00e9\u4e2d\U0001f512"


def test_odd_characters_come_out_escaped_and_round_trip() -> None:
    spec = dataclasses.replace(
        BASE,
        instance_id=f"i-{ODD}",
        emulator=f"{ODD}/qemu",
        disk_path=f"{ODD}.qcow2",
        console_log=f"{ODD}\n.log",
        network=ODD,
        direct_boot=DirectBoot(kernel=f"{ODD}/k", initrd=f"{ODD}/i", cmdline=f"x={ODD}"),
        firmware_images=FirmwareImages(
            code=f"{ODD}/C", vars_template=f"{ODD}/V", secure_boot=False
        ),
    )
    xml = render_domain_xml(spec)
    root = ET.fromstring(xml)  # well-formed
    assert "]]>" not in xml and "a&b" not in xml
    assert root.findtext("devices/emulator") == f"{ODD}/qemu"
    assert _element(root, "devices/disk/source").get("file") == f"{ODD}.qcow2"
    assert _element(root, "devices/serial/log").get("file") == f"{ODD}\n.log"
    assert _element(root, "devices/interface/source").get("network") == ODD
    assert root.findtext("os/kernel") == f"{ODD}/k"
    assert root.findtext("os/cmdline") == f"x={ODD}"
    assert root.findtext("os/loader") == f"{ODD}/C"
    assert _element(root, "os/nvram").get("template") == f"{ODD}/V"
    assert parse_instance_metadata(xml) == InstanceMetadata(f"i-{ODD}", None)


@pytest.mark.parametrize("bad", ["\x00", "\x01", "\x1b", "\ufffe", "\ud800"])
def test_characters_xml_cannot_hold_are_refused(bad: str) -> None:
    spec = dataclasses.replace(BASE, disk_path=f"/images/a{bad}b.qcow2")
    with pytest.raises(InputError, match="disk path"):
        render_domain_xml(spec)


def test_metadata_round_trips_through_our_own_rendering() -> None:
    xml = render_domain_xml(BASE)
    assert (
        '<tvorch:instance xmlns:tvorch="https://tvorch.dev/xmlns/instance/1" '
        'id="i-base" version="1" />' in xml
    )
    assert parse_instance_metadata(xml) == InstanceMetadata("i-base", None)


def test_manifest_digest_is_an_attribute_of_our_element_and_round_trips() -> None:
    xml = render_domain_xml(SCENARIOS["efi-manifest"])
    assert (
        '<tvorch:instance xmlns:tvorch="https://tvorch.dev/xmlns/instance/1" '
        f'id="i-efi-manifest" version="1" manifest="sha256:{MANIFEST}" />' in xml
    )
    assert parse_instance_metadata(xml) == InstanceMetadata("i-efi-manifest", MANIFEST)


@pytest.mark.parametrize("digest", ["", "sha256:" + MANIFEST, MANIFEST.upper(), MANIFEST[:-1]])
def test_malformed_manifest_digest_is_refused(digest: str) -> None:
    with pytest.raises(InputError, match="manifest digest"):
        render_domain_xml(dataclasses.replace(BASE, manifest_digest=digest))


def test_backing_chain_is_pinned_nearest_first_and_ends_in_an_empty_store() -> None:
    root = ET.fromstring(render_domain_xml(SCENARIOS["efi-backing-chain"]))
    disk = _element(root, "devices/disk")
    assert [child.tag for child in disk] == ["driver", "source", "backingStore", "target", "boot"]
    layers = []
    store = _element(disk, "backingStore")
    while len(store):
        assert store.attrib == {"type": "file"}
        source = _element(store, "source")
        seclabels = [s.attrib for s in source]
        assert seclabels == [{"model": "dac", "relabel": "no"}]
        layers.append((source.get("file"), _element(store, "format").get("type")))
        store = _element(store, "backingStore")
    assert store.attrib == {}
    chain = SCENARIOS["efi-backing-chain"].backing_chain
    assert layers == [(layer.path, layer.format) for layer in chain]


def test_manifest_digest_is_read_from_the_xml_libvirtd_gives_the_hook() -> None:
    # Real hook input (see tests/unit/test_canonical.py), rendered with digest 05...05.
    hook_xml = GOLDEN.parent / "data" / "libvirt" / "tis" / "hook-start-begin.xml"
    metadata = parse_instance_metadata(hook_xml.read_text(encoding="utf-8"))
    assert metadata == InstanceMetadata("i-canon-tis", "05" * 32)


def test_no_backing_chain_leaves_probing_to_libvirt() -> None:
    assert ET.fromstring(render_domain_xml(BASE)).find("devices/disk/backingStore") is None


def test_backing_layer_of_unknown_format_is_refused() -> None:
    spec = dataclasses.replace(BASE, backing_chain=(DiskLayer("/images/a.vmdk", "vmdk"),))
    with pytest.raises(InputError, match="/images/a.vmdk"):
        render_domain_xml(spec)


# `virsh dumpxml --inactive` of tests/golden/bios.xml as libvirt 9.0 stores it:
# attributes re-quoted, defaults and devices added, our element kept verbatim.
LIBVIRT_DUMP = """\
<domain type='qemu'>
  <name>tvtest-xml-bios</name>
  <uuid>5c0a7e1d-8f3b-4a26-9d41-000000000003</uuid>
  <metadata>
    <tvorch:instance xmlns:tvorch="https://tvorch.dev/xmlns/instance/1" id="i-bios" version="1"/>
  </metadata>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/tvtest-xml-disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </controller>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x8'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0' multifunction='on'/>
    </controller>
    <controller type='pci' index='2' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='2' port='0x9'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <controller type='pci' index='3' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='3' port='0xa'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/tvtest-xml-bios-console.log' append='off'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <log file='/var/log/libvirt/qemu/tvtest-xml-bios-console.log' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0' persistent_state='yes'/>
    </tpm>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

# Defined with the namespace declared on <domain> and prefix tv: libvirt 9.0
# moves the declaration to <metadata> (excerpt of `virsh dumpxml --inactive`).
LIBVIRT_DUMP_ROOT_DECLARATION = """\
<domain type='qemu'>
  <name>tvtest-xml-efi</name>
  <uuid>6f1e3a52-0000-4000-8000-000000000001</uuid>
  <metadata xmlns:tv="https://tvorch.dev/xmlns/instance/1">
    <tv:instance id="i-0001" version="1"/>
  </metadata>
  <memory unit='KiB'>524288</memory>
</domain>
"""

# After `virsh metadata --config --key ins --uri NS --set '<instance id=...>'`
# on that domain: libvirt uses the key as prefix and declares it on the
# element, leaving the old declaration behind (excerpt).
LIBVIRT_DUMP_SET_METADATA = """\
<domain type='qemu'>
  <name>tvtest-xml-efi</name>
  <uuid>6f1e3a52-0000-4000-8000-000000000001</uuid>
  <metadata xmlns:tv="https://tvorch.dev/xmlns/instance/1">
    <ins:instance xmlns:ins="https://tvorch.dev/xmlns/instance/1" id="i-&amp;&lt;2" version="1">
      <ins:x/>
    </ins:instance>
  </metadata>
  <memory unit='KiB'>524288</memory>
</domain>
"""


@pytest.mark.parametrize(
    ("xml", "instance_id"),
    [
        (LIBVIRT_DUMP, "i-bios"),
        (LIBVIRT_DUMP_ROOT_DECLARATION, "i-0001"),
        (LIBVIRT_DUMP_SET_METADATA, "i-&<2"),
    ],
    ids=["dumpxml", "root-declaration", "set-metadata"],
)
def test_metadata_is_found_in_libvirt_reserialised_xml(xml: str, instance_id: str) -> None:
    assert parse_instance_metadata(xml) == InstanceMetadata(instance_id, None)


@pytest.mark.parametrize(
    "manifest", ["sha1:" + "0" * 40, MANIFEST, "sha256:" + MANIFEST.upper(), "sha256:"]
)
def test_malformed_manifest_in_domain_xml_is_an_input_error(manifest: str) -> None:
    xml = (
        f"<domain><metadata><tv:instance xmlns:tv='{METADATA_NAMESPACE}' id='i-1' "
        f"manifest='{manifest}'/></metadata></domain>"
    )
    with pytest.raises(InputError, match="manifest digest"):
        parse_instance_metadata(xml)


@pytest.mark.parametrize(
    "xml",
    [
        "<domain type='qemu'><name>x</name></domain>",
        "<domain type='qemu'><metadata/></domain>",
        # Same local name and prefix, other namespace: not ours.
        "<domain><metadata><tvorch:instance xmlns:tvorch='urn:other' id='i-1'/>"
        "</metadata></domain>",
        # Ours, but outside <metadata>.
        f"<domain><tvorch:instance xmlns:tvorch='{METADATA_NAMESPACE}' id='i-1'/></domain>",
        f"<domain><metadata><tvorch:instance xmlns:tvorch='{METADATA_NAMESPACE}'/>"
        "</metadata></domain>",
    ],
    ids=["no-metadata", "empty-metadata", "other-namespace", "outside-metadata", "no-id"],
)
def test_metadata_absent_gives_none(xml: str) -> None:
    assert parse_instance_metadata(xml) is None


def test_malformed_domain_xml_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not well-formed"):
        parse_instance_metadata("<domain><metadata></domain>")
