"""Canonical domain configuration: one digest per configuration, whoever serialised it.

tests/data/libvirt/<scenario>/ holds real libvirt 9.0 output (QEMU 7.2, Debian
12, TCG) for domains rendered by tvorch: ``rendered.xml`` is what was defined,
``inactive.xml`` and ``live.xml`` are ``virsh dumpxml [--inactive]``, and
``hook-<op>-<subop>.xml`` is what libvirtd piped to /etc/libvirt/hooks/qemu.
Files under ``after-restart/`` were taken after libvirtd was restarted with
the domain running (reconnect, dumpxml, then a save or destroy: stopped and
release); under ``after-restore/``, from ``virsh restore`` of that save
(restore, prepare, start, started, dumpxml, then destroy). ``efi-guest-channel``
(with the guest channel and the RNG, so libvirt adds its virtio-serial
controller) was defined without ``<metadata>`` and has only the two dumps.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tvorch.core.launch.canonical import (
    AutoSelectedFirmware,
    canonical_domain,
    config_digest,
    firmware_features,
)
from tvorch.errors import InputError

DATA = Path(__file__).resolve().parent.parent / "data" / "libvirt"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _read(scenario: str, name: str = "rendered.xml") -> str:
    return (DATA / scenario / name).read_text(encoding="utf-8")


def _auto_firmware(scenario: str) -> bool:
    return ET.fromstring(_read(scenario)).find("os[@firmware='efi']") is not None


def _samples() -> Iterator[tuple[str, str]]:
    for directory in sorted(DATA.iterdir()):
        for path in sorted(directory.rglob("*.xml")):
            if path.name != "rendered.xml":
                yield directory.name, path.relative_to(directory).as_posix()


SAMPLES = list(_samples())
# libvirt 9.0 forgets the firmware feature list of an auto-selected firmware
# when it re-reads a running domain's state (libvirtd restart) or a save image.
KNOWN_GAP = [
    (scenario, sample)
    for scenario, sample in SAMPLES
    if _auto_firmware(scenario) and sample.startswith(("after-restart/", "after-restore/"))
]
MATCHING = [sample for sample in SAMPLES if sample not in KNOWN_GAP]


def _ids(sample: tuple[str, str]) -> str:
    return "/".join(sample)


def test_fixtures_cover_every_hook_operation_and_dump() -> None:
    names = {Path(sample).name for _, sample in SAMPLES}
    for op in ("prepare-begin", "start-begin", "started-begin", "stopped-end", "release-end",
               "reconnect-begin", "restore-begin"):  # fmt: skip
        assert f"hook-{op}.xml" in names
    assert {"inactive.xml", "live.xml"} <= names
    assert len(MATCHING) > 2 * len(KNOWN_GAP)


@pytest.mark.parametrize("sample", MATCHING, ids=_ids)
def test_libvirt_output_has_the_digest_of_what_tvorch_rendered(sample: tuple[str, str]) -> None:
    scenario, name = sample
    assert canonical_domain(_read(scenario, name)) == canonical_domain(_read(scenario))


@pytest.mark.parametrize("sample", KNOWN_GAP, ids=_ids)
def test_auto_selected_firmware_after_restart_or_restore_differs_only_in_os(
    sample: tuple[str, str],
) -> None:
    scenario, name = sample
    theirs, ours = canonical_domain(_read(scenario, name)), canonical_domain(_read(scenario))
    assert theirs != ours
    without_os = re.compile(rb"<os[ >].*?</os>")
    assert without_os.sub(b"", theirs) == without_os.sub(b"", ours)
    assert b"<loader " in theirs and b"<loader " not in ours


def _hint_from(scenario: str, name: str) -> AutoSelectedFirmware:
    """What the hook knows: the rendered features, and the files libvirt resolved (as measured)."""
    resolved = ET.fromstring(_read(scenario, name)).find("os")
    assert resolved is not None
    features = firmware_features(_read(scenario))
    assert features is not None
    return AutoSelectedFirmware(
        features, resolved.findtext("loader", "").strip(), resolved.find("nvram").get("template", "")
    )


@pytest.mark.parametrize("sample", KNOWN_GAP, ids=_ids)
def test_known_resolution_closes_the_gap(sample: tuple[str, str]) -> None:
    scenario, name = sample
    hint = _hint_from(scenario, name)
    assert canonical_domain(_read(scenario, name), hint) == canonical_domain(_read(scenario))
    # A loader other than the one the launch resolved is not mapped back.
    other = AutoSelectedFirmware(hint.features, "/usr/share/OVMF/OVMF_CODE_4M.other.fd", hint.vars_template)
    assert canonical_domain(_read(scenario, name), other) != canonical_domain(_read(scenario))


@pytest.mark.parametrize("sample", [m for m in MATCHING if _auto_firmware(m[0])], ids=_ids)
def test_the_hint_changes_nothing_where_there_is_no_gap(sample: tuple[str, str]) -> None:
    scenario, name = sample
    hint = AutoSelectedFirmware(firmware_features(_read(scenario)) or (), "/x/code.fd", "/x/vars.fd")
    assert canonical_domain(_read(scenario, name), hint) == canonical_domain(_read(scenario))


def test_every_scenario_has_its_own_digest() -> None:
    scenarios = [path.name for path in DATA.iterdir()]
    assert len({config_digest(_read(s)) for s in scenarios}) == len(scenarios)


def test_digest_is_sha256_hex_of_the_canonical_bytes() -> None:
    xml = _read("efi")
    digest = config_digest(xml)
    assert digest == hashlib.sha256(canonical_domain(xml)).hexdigest()
    assert re.fullmatch("[0-9a-f]{64}", digest)


# --- noise: what must not change the digest ----------------------------------


def _get(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    assert element is not None, f"no {path}"
    return element


def _reserialised_noisily(xml: str) -> str:
    """Same configuration: attributes reversed, other indentation, a comment, a declaration."""
    root = ET.fromstring(xml)
    for element in root.iter():
        items = list(element.attrib.items())
        element.attrib.clear()
        element.attrib.update(reversed(items))
    ET.indent(root, space="\t   ")
    text = ET.tostring(root, encoding="unicode").replace("<devices>", "<devices>\n\n<!-- c -->")
    return "<?xml version='1.0' encoding='UTF-8'?>\n" + text.replace(" />", "\n    />")


def _with_runtime_additions(xml: str) -> str:
    root = ET.fromstring(xml)
    root.set("id", "42")
    for number, device in enumerate(_get(root, "devices")):
        ET.SubElement(device, "alias", name=f"ua-dev{number}")
        ET.SubElement(device, "address", type="pci", domain="0x0000", bus="0x07", slot="0x00")
    ET.SubElement(_get(root, "devices/serial"), "source", path="/dev/pts/9")
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("scenario", ["efi-network", "bios-direct-kernel", "efi-firmware-profile"])
@pytest.mark.parametrize("change", [_reserialised_noisily, _with_runtime_additions])
def test_serialisation_and_runtime_noise_do_not_change_the_digest(
    scenario: str, change: Callable[[str], str]
) -> None:
    xml = _read(scenario, "inactive.xml")
    changed = change(xml)
    assert changed != xml
    assert config_digest(changed) == config_digest(xml) == config_digest(_read(scenario))


def _memory(unit: str, amount: int) -> str:
    xml = _read("tis", "inactive.xml")
    memory = "<memory unit='KiB'>524288</memory>"
    assert memory in xml
    return xml.replace(memory, f"<memory unit='{unit}'>{amount}</memory>")


@pytest.mark.parametrize(
    ("unit", "amount"),
    [("KiB", 524288), ("k", 524288), ("MiB", 512), ("M", 512), ("bytes", 536870912),
     ("b", 536870912), ("kib", 524288)],
)  # fmt: skip
def test_same_memory_in_another_unit_has_the_same_digest(unit: str, amount: int) -> None:
    assert config_digest(_memory(unit, amount)) == config_digest(_read("tis"))


@pytest.mark.parametrize(
    ("unit", "amount"), [("MiB", 524288), ("MB", 512), ("GiB", 512), ("KiB", 524289)]
)
def test_same_number_in_a_unit_meaning_another_amount_changes_the_digest(
    unit: str, amount: int
) -> None:
    assert config_digest(_memory(unit, amount)) != config_digest(_read("tis"))


def test_namespace_prefix_does_not_matter() -> None:
    xml = _read("efi", "inactive.xml")
    with_qemu = xml.replace(
        "<domain type='qemu'>",
        f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'>",
    ).replace("</domain>", "<qemu:commandline><qemu:arg value='-s'/></qemu:commandline></domain>")
    with_q = with_qemu.replace("xmlns:qemu=", "xmlns:q=").replace("qemu:", "q:")
    assert with_q != with_qemu
    assert config_digest(with_q) == config_digest(with_qemu) != config_digest(xml)


# --- tampering: every edit that changes what the guest runs or reaches --------

Tamper = Callable[[ET.Element], None]


def _set(path: str, attribute: str, value: str) -> Tamper:
    def tamper(root: ET.Element) -> None:
        element = _get(root, path)
        assert element.get(attribute) != value
        element.set(attribute, value)

    return tamper


def _text(path: str, value: str) -> Tamper:
    def tamper(root: ET.Element) -> None:
        element = _get(root, path)
        assert element.text != value
        element.text = value

    return tamper


def _remove(parent: str, child: str) -> Tamper:
    def tamper(root: ET.Element) -> None:
        _get(root, parent).remove(_get(root, f"{parent}/{child}"))

    return tamper


def _add(parent: str, fragment: str) -> Tamper:
    def tamper(root: ET.Element) -> None:
        _get(root, parent).append(ET.fromstring(fragment))

    return tamper


def _all(*tampers: Tamper) -> Tamper:
    def tamper(root: ET.Element) -> None:
        for one in tampers:
            one(root)

    return tamper


HOSTDEV = (
    "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
    "<address domain='0x0000' bus='0x{bus}' slot='0x00' function='0x0'/></source></hostdev>"
)
IMAGES = "/var/lib/libvirt/images"
TAMPERS: dict[str, tuple[str, Tamper]] = {
    "disk-source": ("efi", _set("devices/disk/source", "file", f"{IMAGES}/other.qcow2")),
    "backing-layer-path": (
        "tis",
        _set("devices/disk/backingStore/backingStore/source", "file", f"{IMAGES}/evil.qcow2"),
    ),
    "backing-layer-format": ("tis", _set("devices/disk/backingStore/format", "type", "raw")),
    "backing-chain-cut": (
        "tis",
        lambda root: _get(root, "devices/disk/backingStore/backingStore").clear(),
    ),
    "backing-layer-relabelled": ("efi", _remove("devices/disk/backingStore/source", "seclabel")),
    "tpm-removed": ("efi", _remove("devices", "tpm")),
    "tpm-model": ("efi", _set("devices/tpm", "model", "tpm-tis")),
    "tpm-passthrough": (
        "tis",
        _all(
            _remove("devices/tpm", "backend"),
            _add("devices/tpm", "<backend type='passthrough'><device path='/dev/tpm0'/></backend>"),
        ),
    ),
    "efi-to-bios": (
        "efi",
        _all(_remove("os", "firmware"), lambda root: _get(root, "os").attrib.clear()),
    ),
    "secure-boot-flipped": (
        "efi",
        _all(
            _set("os/firmware/feature[@name='secure-boot']", "enabled", "yes"),
            _set("os/firmware/feature[@name='enrolled-keys']", "enabled", "yes"),
        ),
    ),
    "secure-boot-off": (
        "efi-secure-boot",
        _set("os/firmware/feature[@name='secure-boot']", "enabled", "no"),
    ),
    "loader-path": ("efi-firmware-profile", _text("os/loader", "/usr/share/OVMF/OVMF_CODE_4M.fd")),
    "loader-not-secure": ("efi-firmware-profile", _set("os/loader", "secure", "no")),
    "vars-template": (
        "efi-firmware-profile",
        _set("os/nvram", "template", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ),
    "vars-file-of-another-domain": ("efi", _add("os", "<nvram>/srv/prepared_VARS.fd</nvram>")),
    "memory": ("efi", _text("memory", "1048576")),
    "current-memory": ("efi", _text("currentMemory", "262144")),
    "vcpus": ("efi", _text("vcpu", "2")),
    "machine-family": ("efi", _set("os/type", "machine", "pc-i440fx-7.2")),
    "virt-type": ("efi", lambda root: root.set("type", "kvm")),
    "emulator": ("efi", _text("devices/emulator", "/usr/local/bin/qemu-system-x86_64")),
    "hostdev": ("efi", _add("devices", HOSTDEV.format(bus="03"))),
    "second-disk": (
        "efi",
        _add(
            "devices",
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{IMAGES}/extra.raw'/><target dev='vdb' bus='virtio'/></disk>",
        ),
    ),
    "filesystem": (
        "efi",
        _add(
            "devices",
            "<filesystem type='mount' accessmode='passthrough'><source dir='/'/>"
            "<target dir='host'/></filesystem>",
        ),
    ),
    "vsock": ("efi", _add("devices", "<vsock model='virtio'><cid auto='yes'/></vsock>")),
    "usb-tablet": ("efi", _add("devices", "<input type='tablet' bus='usb'/>")),
    "qemu-commandline": (
        "efi",
        _add(".", f"<q:commandline xmlns:q='{QEMU_NS}'><q:arg value='-s'/></q:commandline>"),
    ),
    "domain-seclabel-none": ("efi", _add(".", "<seclabel type='none' model='dac'/>")),
    "kernel-cmdline": ("bios-direct-kernel", _text("os/cmdline", "console=ttyS0 ima=off")),
    "kernel-path-leading-space": (
        "bios-direct-kernel",
        _text("os/kernel", " /var/cache/tvorch/test-guest/vmlinuz"),
    ),
    "initrd": ("bios-direct-kernel", _remove("os", "initrd")),
    "boot-device": ("bios-direct-kernel", _set("os/boot", "dev", "cdrom")),
    "network": ("efi-network", _set("devices/interface/source", "network", "default")),
    "serial-to-tcp": (
        "efi",
        _all(
            _set("devices/serial", "type", "tcp"),
            _add("devices/serial", "<source mode='bind' host='0.0.0.0' service='4555'/>"),
        ),
    ),
    # The CPU: libvirt's TCG default is left out, never a feature or setting added to it.
    "cpu-feature-required": ("efi", _add("cpu", "<feature policy='require' name='vmx'/>")),
    "cpu-feature-forced": ("tis", _add("cpu", "<feature policy='force' name='pdpe1gb'/>")),
    "cpu-feature-disabled": ("efi", _add("cpu", "<feature policy='disable' name='lahf_lm'/>")),
    "cpu-feature-policy": ("efi", _add("cpu", "<feature policy='disable' name='hypervisor'/>")),
    "cpu-model": ("efi", _text("cpu/model", "Skylake-Client")),
    "cpu-match-minimum": ("efi", _set("cpu", "match", "minimum")),
    "cpu-fallback-allow": ("efi", _set("cpu/model", "fallback", "allow")),
    "cpu-topology": ("efi", _add("cpu", "<topology sockets='1' dies='1' cores='1' threads='1'/>")),
    # Controllers: libvirt's own q35 set is left out, never one added or changed.
    "scsi-controller": ("efi", _add("devices", "<controller type='scsi' index='0' model='virtio-scsi'/>")),
    "scsi-controller-lsilogic": ("tis", _add("devices", "<controller type='scsi' index='0' model='lsilogic'/>")),
    "second-usb-controller": ("efi", _add("devices", "<controller type='usb' index='1' model='qemu-xhci'/>")),
    "usb-controller-model": ("efi", _set("devices/controller[@type='usb']", "model", "piix3-uhci")),
    "usb-controller-none": ("efi", _set("devices/controller[@type='usb']", "model", "none")),
    "usb-controller-ports": ("efi", _set("devices/controller[@type='usb']", "ports", "15")),
    "sata-controller-second": ("efi", _add("devices", "<controller type='sata' index='1'/>")),
    "virtio-serial-ports": (
        "efi-guest-channel",
        _set("devices/controller[@type='virtio-serial']", "ports", "31"),
    ),
    "root-port-hotplug-off": (
        "efi",
        _set("devices/controller[@model='pcie-root-port']/target", "hotplug", "off"),
    ),
    "root-port-model": (
        "efi",
        _set("devices/controller[@model='pcie-root-port']/model", "name", "ioh3420"),
    ),
    "pci-bridge": (
        "efi",
        _add("devices", "<controller type='pci' index='9' model='pcie-to-pci-bridge'/>"),
    ),
}


@pytest.mark.parametrize(
    ("tamper", "form"),
    [
        (tamper, form)
        for tamper in sorted(TAMPERS)
        for form in ("inactive.xml", "hook-prepare-begin.xml", "live.xml")
        if (DATA / TAMPERS[tamper][0] / form).is_file()
    ],
)
def test_each_edit_changes_the_digest(tamper: str, form: str) -> None:
    scenario, change = TAMPERS[tamper]
    root = ET.fromstring(_read(scenario, form))
    change(root)
    assert config_digest(ET.tostring(root, encoding="unicode")) != config_digest(
        _read(scenario)
    )


def test_host_address_of_a_passed_through_device_counts() -> None:
    xml = _read("efi", "inactive.xml")
    one = xml.replace("</devices>", HOSTDEV.format(bus="03") + "</devices>")
    other = xml.replace("</devices>", HOSTDEV.format(bus="04") + "</devices>")
    assert config_digest(one) != config_digest(other)


# --- refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain><name>x</domain>", "not well-formed"),
        ("<network><name>x</name></network>", "root element is <network>"),
        ("<domain><memory unit='parsec'>1</memory></domain>", "parsec"),
        ("<domain><memory unit='KiB'>-1</memory></domain>", "-1"),
    ],
)
def test_unreadable_domain_xml_is_an_input_error(xml: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        canonical_domain(xml)
