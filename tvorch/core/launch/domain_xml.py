"""Render a ``DomainSpec`` as libvirt domain XML, and read tvorch's metadata back.

The XML is built with ElementTree on the skeleton in ``xml_templates/domain.xml``
(package ``tvorch.xml_templates``) and always comes out in the same order and
layout, so a rendering can be compared byte for byte with golden files and
with what a launch manifest recorded.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from functools import lru_cache

from tvorch.core.launch.metadata import (  # noqa: F401  (re-exported: the parser lives with the constants)
    MANIFEST_DIGEST_PREFIX,
    METADATA_VERSION,
    InstanceMetadata,
    parse_instance_metadata,
)
from tvorch.core.launch.spec import (
    METADATA_NAMESPACE,
    METADATA_PREFIX,
    DiskLayer,
    DomainSpec,
    Firmware,
    FirmwareImages,
    VirtType,
)
from tvorch.errors import InputError

# The virtio-serial port the guest agent opens (/dev/virtio-ports/<name>); docs/tvorch-attest.md.
GUEST_CHANNEL_NAME = "org.tvorch.attest.0"

TEMPLATE_PACKAGE = "tvorch.xml_templates"
TEMPLATE_NAME = "domain.xml"

# Characters XML 1.0 cannot carry at all, escaped or not (its "Char" production).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SHA256_HEX = re.compile("[0-9a-f]{64}")
# Formats a layer under the overlay may have (what image inspection accepts).
_LAYER_FORMATS = frozenset({"qcow2", "raw"})


def render_domain_xml(spec: DomainSpec) -> str:
    """Return the domain XML for ``spec``: deterministic, indented, newline-terminated.

    Raises ``InputError`` for combinations libvirt cannot honour (Secure Boot
    without UEFI, explicit firmware images that disagree with the spec) and for
    values XML cannot represent.
    """
    _check_firmware(spec)
    root = ET.fromstring(_template())
    root.set("type", spec.virt_type.value)
    _find(root, "name").text = _xml_value(spec.name, "name")
    _find(root, "uuid").text = _xml_value(spec.uuid, "uuid")
    _find(root, "metadata").append(_instance_element(spec))
    _find(root, "memory").text = str(spec.memory_mib)
    _find(root, "currentMemory").text = str(spec.memory_mib)
    _find(root, "vcpu").text = str(spec.vcpus)
    _render_os(_find(root, "os"), spec)
    features = _find(root, "features")
    if spec.secure_boot:
        # OVMF's Secure Boot builds keep their variable store behind SMM.
        ET.SubElement(features, "smm", state="on")
    if spec.virt_type is VirtType.KVM:
        # Under TCG, host-model would make QEMU emulate the host's CPU features
        # one by one; libvirt's default model (qemu64) is the sensible choice.
        root.insert(list(root).index(features) + 1, ET.Element("cpu", mode="host-model"))
    _render_devices(_find(root, "devices"), spec)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


@lru_cache(maxsize=1)
def _template() -> str:
    from importlib import resources  # only when rendering: the hook imports this module
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def _find(parent: ET.Element, path: str) -> ET.Element:
    element = parent.find(path)
    if element is None:
        raise LookupError(f"domain template has no <{path}>")
    return element


def _xml_value(value: str, what: str) -> str:
    """Refuse characters no XML document can hold; ElementTree escapes the rest."""
    bad = _NOT_XML_CHAR.search(value)
    if bad:
        raise InputError(f"{what} contains a character XML cannot hold: {bad.group()!r}")
    return value


def _check_firmware(spec: DomainSpec) -> None:
    images = spec.firmware_images
    if spec.firmware is Firmware.BIOS:
        if spec.secure_boot:
            raise InputError("Secure Boot needs UEFI firmware, not BIOS")
        if images is not None:
            raise InputError("firmware images are UEFI (OVMF) images; BIOS cannot use them")
    if images is not None and images.secure_boot != spec.secure_boot:
        wanted = "on" if spec.secure_boot else "off"
        built = "with" if images.secure_boot else "without"
        raise InputError(
            f"Secure Boot is {wanted} but firmware {images.code} is built {built} Secure Boot"
        )


def _instance_element(spec: DomainSpec) -> ET.Element:
    """tvorch's metadata element, declaring its namespace on itself.

    ElementTree would hoist a namespace declaration to <domain>; writing it as
    a plain attribute keeps the element self-contained, which is the form
    libvirt stores and returns for a metadata namespace.
    """
    element = ET.Element(
        f"{METADATA_PREFIX}:instance",
        {
            f"xmlns:{METADATA_PREFIX}": METADATA_NAMESPACE,
            "id": _xml_value(spec.instance_id, "instance id"),
            "version": METADATA_VERSION,
        },
    )
    if spec.manifest_digest is not None:
        if not _SHA256_HEX.fullmatch(spec.manifest_digest):
            raise InputError(
                f"manifest digest is not 64 lowercase hex digits: {spec.manifest_digest!r}"
            )
        element.set("manifest", MANIFEST_DIGEST_PREFIX + spec.manifest_digest)
    return element


def _render_os(os_element: ET.Element, spec: DomainSpec) -> None:
    _find(os_element, "type").set("machine", _xml_value(spec.machine, "machine"))
    if spec.firmware is Firmware.EFI:
        if spec.firmware_images is None:
            _auto_firmware(os_element, spec.secure_boot)
        else:
            _explicit_firmware(os_element, spec.firmware_images)
    if spec.direct_boot is not None:
        boot = spec.direct_boot
        ET.SubElement(os_element, "kernel").text = _xml_value(boot.kernel, "kernel path")
        if boot.initrd is not None:
            ET.SubElement(os_element, "initrd").text = _xml_value(boot.initrd, "initrd path")
        if boot.cmdline is not None:
            cmdline = _xml_value(boot.cmdline, "kernel command line")
            ET.SubElement(os_element, "cmdline").text = cmdline


def _auto_firmware(os_element: ET.Element, secure_boot: bool) -> None:
    """Let libvirt pick OVMF from its firmware descriptors by feature.

    Both features are stated either way so the choice never depends on the
    descriptors' order: with Secure Boot, libvirt picks the Microsoft-enrolled
    build; without, the plain one.
    """
    os_element.set("firmware", "efi")
    enabled = "yes" if secure_boot else "no"
    firmware = ET.SubElement(os_element, "firmware")
    for feature in ("enrolled-keys", "secure-boot"):
        ET.SubElement(firmware, "feature", enabled=enabled, name=feature)


def _explicit_firmware(os_element: ET.Element, images: FirmwareImages) -> None:
    """Name the OVMF code and vars template, for guests signed with other keys.

    The nvram path is left out so libvirt gives each domain its own copy of
    the template under /var/lib/libvirt/qemu/nvram/.
    """
    loader = ET.SubElement(
        os_element,
        "loader",
        readonly="yes",
        secure="yes" if images.secure_boot else "no",
        type="pflash",
    )
    loader.text = _xml_value(images.code, "firmware code path")
    template = _xml_value(images.vars_template, "firmware vars path")
    ET.SubElement(os_element, "nvram", template=template)


def _render_devices(devices: ET.Element, spec: DomainSpec) -> None:
    _find(devices, "emulator").text = _xml_value(spec.emulator, "emulator path")
    disk = _find(devices, "disk")
    _find(disk, "driver").set("type", _xml_value(spec.disk_format, "disk format"))
    source = _find(disk, "source")
    source.set("file", _xml_value(spec.disk_path, "disk path"))
    if spec.backing_chain:
        disk.insert(list(disk).index(source) + 1, _backing_store(spec.backing_chain))
    if spec.firmware is Firmware.EFI and spec.direct_boot is None:
        # Per-device order (libvirt refuses it mixed with <os><boot dev>) puts
        # this disk first in OVMF's boot options, ahead of network boot.
        ET.SubElement(disk, "boot", order="1")
    if spec.network is not None:
        interface = ET.Element("interface", type="network")
        ET.SubElement(interface, "source", network=_xml_value(spec.network, "network name"))
        ET.SubElement(interface, "model", type="virtio")
        devices.insert(list(devices).index(disk) + 1, interface)
    _find(devices, "serial/log").set("file", _xml_value(spec.console_log, "console log path"))
    tpm = _find(devices, "tpm")
    tpm.set("model", spec.tpm_model.libvirt_model)
    if spec.guest_channel is not None:
        channel = ET.Element("channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=_xml_value(spec.guest_channel, "guest channel path"))
        ET.SubElement(channel, "target", type="virtio", name=GUEST_CHANNEL_NAME)
        devices.insert(list(devices).index(tpm), channel)
    if spec.vtpm_secret is not None:
        ET.SubElement(_find(devices, "tpm/backend"), "encryption", secret=_xml_value(spec.vtpm_secret, "vTPM secret"))


def guest_channel_path(xml: str) -> str | None:
    """The host socket of the guest attestation channel in a domain XML tvorch rendered; None without one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"domain XML is not well-formed: {err}") from err
    for channel in root.iterfind("./devices/channel"):
        source = channel.find("source")
        if channel.find(f"target[@name='{GUEST_CHANNEL_NAME}']") is not None and source is not None:
            return source.get("path")
    return None


def _backing_store(chain: tuple[DiskLayer, ...]) -> ET.Element:
    """The overlay's backing chain as nested <backingStore>, ending in an empty one.

    Stating the chain stops libvirt probing it, and relabel='no' stops its DAC
    driver chowning each layer to the qemu user on start and back on stop
    (which would change the base image's ctime, the key tvorch's digest cache
    relies on). qemu still opens the layers as that user: they must be
    world-readable.
    """
    outer = ET.Element("backingStore")
    store = outer
    for layer in chain:
        if layer.format not in _LAYER_FORMATS:
            raise InputError(f"backing layer {layer.path} has unsupported format {layer.format!r}")
        store.set("type", "file")
        ET.SubElement(store, "format", type=layer.format)
        source = ET.SubElement(store, "source", file=_xml_value(layer.path, "backing layer path"))
        ET.SubElement(source, "seclabel", model="dac", relabel="no")
        store = ET.SubElement(store, "backingStore")
    return outer
