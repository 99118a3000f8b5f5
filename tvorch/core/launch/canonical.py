"""Canonical form of a domain configuration, and its digest.

The launch manifest records ``config_digest`` of the XML tvorch defines; the
libvirt hook recomputes it from the XML libvirtd hands it. Both must agree
while the configuration is unchanged, whatever libvirt added or re-serialised,
and differ after any edit that changes what the guest runs or can reach. So
the canonical form drops only noise named below (never an allowlist of
fields): an unknown element or attribute stays in and changes the digest.

Rules, applied in this order to the parsed ``<domain>`` (checked against
libvirt 9.0's inactive and live XML and its hook XML on prepare, start,
started, stopped, release, reconnect and restore):

1. Dropped: ``<domain id>``; ``<metadata>`` (it carries the manifest digest:
   circular), ``<title>``, ``<description>``; ``<resource>`` holding only
   ``<partition>/machine</partition>`` (libvirt's default, added at start); a
   domain-level ``<seclabel type='dynamic'>`` with relabel on and no children
   but ``<label>``/``<imagelabel>`` (libvirt's default DAC label, added at
   start; any other seclabel, and every device-level one, stays).
2. ``<memory>``, ``<currentMemory>``, ``<maxMemory>``: the amount in KiB
   (rounded up), ``unit='KiB'``; ``<currentMemory>`` dropped when equal to
   ``<memory>``.
3. Machine type: ``pc-q35-X.Y`` becomes ``q35`` and ``pc-i440fx-X.Y`` becomes
   ``pc``. At define libvirt replaces the alias tvorch writes with the newest
   versioned type of the installed QEMU; the version follows the QEMU binary,
   which tvorch measures on its own.
4. Firmware: an ``<os>`` with a ``<firmware>`` feature list but no
   ``firmware`` attribute is libvirt's live form of auto-selection (libvirt
   refuses to define it): it becomes ``firmware='efi'`` again without the
   resolved ``<loader>`` and nvram ``template``. An nvram path equal to
   libvirt's default for the domain (``/var/lib/libvirt/qemu/nvram/<name>_VARS.fd``,
   filled in at define or start) is dropped, and the ``<nvram>`` with it when
   nothing is left; any other path stays. An explicit ``<loader>`` and nvram
   ``template`` stay. ``<os><boot dev='hd'/>``, libvirt's default when nothing
   sets a boot order, is dropped when it is the only boot setting.
5. ``<cpu>``: its ``check`` attribute (libvirt's own verification setting) is
   dropped. Under TCG (``type='qemu'``) libvirt's default CPU is dropped, and
   only in the forms libvirt writes: ``<cpu mode='custom' match='exact'>``
   with ``<model fallback='forbid'>qemu64</model>`` and no other child (at
   define), or with exactly the ``policy='require'`` features ``hypervisor``
   and ``lahf_lm`` besides (at start: QEMU 7.2's qemu64 has both, so asking
   for them changes nothing). Any other feature, policy, model, match,
   fallback or topology keeps the whole ``<cpu>`` in.
6. Devices: each device's own ``<address>`` and ``<alias>`` (addresses
   under ``<source>``, such as a host device's, stay); ``index`` of disk
   ``<source>`` and ``<backingStore>``; for pty character devices the
   ``tty`` attribute and a ``<source>`` with only a ``path``; every
   ``<console>`` whose target is a serial port (a second view of that
   ``<serial>``); the controllers libvirt adds to a q35 domain by itself,
   each only in the exact form it writes (``_is_default_controller``:
   ``pci`` 0 ``pcie-root``, each ``pcie-root-port`` with only its
   ``<model name='pcie-root-port'/>`` and ``<target chassis port>``, as many
   as the devices need, ``usb`` 0 ``qemu-xhci``, ``sata`` 0 (q35's built-in
   AHCI), ``virtio-serial`` 0 for the guest channel), while any other
   controller (SCSI, a second USB, a bridge) or setting (ports, hotplug,
   another model) stays; ``<input bus='ps2'>``; ``<audio type='none'>``;
   an ``<interface>``'s ``<mac>`` (generated at define) and, for a network
   interface, its runtime ``<target>`` and source ``portid``/``bridge``; a
   virtio ``<channel>`` target's ``state`` (whether the guest has the port
   open, in live XML).
7. Serialised as ``<tag a="v" b="w">text<child>...</child>tail</tag>``,
   UTF-8: elements in document order, attributes sorted by name, text kept
   as written except that whitespace-only text (indentation) is left out,
   no comments or processing instructions, ``& < > "`` and tab, newline,
   carriage return escaped. Text is not trimmed because libvirt passes it on
   as it is (``<kernel> /boot/x</kernel>`` makes qemu open `` /boot/x``). A
   namespaced name is written ``{uri}local``, so the prefix an editor chose
   never matters (C14N would keep it, and ElementTree's re-serialisation
   picks one from process-wide state).

libvirt 9.0 quirk: once libvirtd has re-read a running domain's state (a
libvirtd restart: reconnect, dumpxml, the stop that follows) or a save image
(restore, and the prepare, start, started and stop of the restored domain),
an auto-selected firmware has lost its feature list and looks like an
explicit ``<loader>``. A caller that knows what the launch asked for and what
it resolved to passes ``AutoSelectedFirmware``, and that form is mapped back
(only when the loader and vars template are exactly the launch's). Known
gap: under KVM libvirt expands
``host-model`` into a full CPU at start (not observable on a host without
working KVM).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tvorch.core.launch.gate import LIBVIRT_NVRAM_DIR
from tvorch.core.launch.manifest_format import Measurement
from tvorch.errors import InputError

# libvirt's memory units, in bytes (its virScaleInteger table).
_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 10**3, "k": 2**10, "kib": 2**10,
    "mb": 10**6, "m": 2**20, "mib": 2**20,
    "gb": 10**9, "g": 2**30, "gib": 2**30,
    "tb": 10**12, "t": 2**40, "tib": 2**40,
    "pb": 10**15, "p": 2**50, "pib": 2**50,
    "eb": 10**18, "e": 2**60, "eib": 2**60,
}  # fmt: skip
_VERSIONED_MACHINE = re.compile(r"pc-(q35|i440fx)-\d+\.\d+")
_MACHINE_FAMILY = {"q35": "q35", "i440fx": "pc"}
_AMOUNT = re.compile("[0-9]+")
# What libvirt 9.0 adds to its TCG default CPU at start (rule 5).
_TCG_START_FEATURES = frozenset({"hypervisor", "lahf_lm"})
# The controllers libvirt 9.0 adds to a q35 domain, as (type, index, model); rule 6.
_DEFAULT_CONTROLLERS = frozenset({
    ("pci", "0", "pcie-root"), ("usb", "0", "qemu-xhci"), ("sata", "0", None), ("virtio-serial", "0", None),
})
_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
     "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
)  # fmt: skip


@dataclass(frozen=True)
class AutoSelectedFirmware:
    """What libvirt's firmware auto-selection chose for a domain tvorch launched.

    After a libvirtd restart (and in a save image) libvirt keeps only the
    resolved ``<loader>`` and nvram template, which look like an explicit
    loader. Knowing what the launch asked for (FEATURES, as rendered) and
    what it resolved to (CODE, VARS_TEMPLATE, as measured), that form is
    mapped back to ``<os firmware='efi'>``, and only when the paths agree.
    """

    features: tuple[tuple[str, str], ...]  # (name, enabled) of each <feature>
    code: str
    vars_template: str


def canonical_domain(xml: str, autoselected: AutoSelectedFirmware | None = None) -> bytes:
    """Return the canonical bytes of a domain XML (rules in the module docstring).

    Raises ``InputError`` for XML that is not well-formed, is not a
    ``<domain>``, or carries a memory amount libvirt could not read.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"domain XML is not well-formed: {err}") from err
    if root.tag != "domain":
        raise InputError(f"not a domain XML: the root element is <{root.tag}>")
    _drop_runtime_domain_parts(root)
    _normalise_memory(root)
    os_element = root.find("os")
    if os_element is not None:
        if autoselected is not None:
            _restore_autoselection(os_element, autoselected)
        _normalise_os(os_element, root)
    _normalise_cpu(root)
    devices = root.find("devices")
    if devices is not None:
        _normalise_devices(devices)
    out: list[str] = []
    _write(root, out)
    return "".join(out).encode("utf-8")


def config_digest(xml: str, autoselected: AutoSelectedFirmware | None = None) -> str:
    """sha256 hex of ``canonical_domain(xml, autoselected)``."""
    return hashlib.sha256(canonical_domain(xml, autoselected)).hexdigest()


def autoselection_hint(defined_xml: str,
                       measurements: Iterable[Measurement] | Iterable[Mapping[str, Any]]) -> AutoSelectedFirmware | None:
    """The hint for XML libvirt re-read after a restart: the features tvorch defined (DEFINED_XML)
    and the firmware files its launch manifest measured (its measurements, or their JSON)."""
    features = firmware_features(defined_xml)
    paths: dict[str, str | None] = {}
    for m in measurements:
        kind, path = (m.kind, m.path) if isinstance(m, Measurement) else (m["kind"], m["path"])
        paths.setdefault(kind, path)  # the first of a kind, as before
    code, vars_template = paths.get("firmware-code"), paths.get("firmware-vars")
    if features is None or code is None or vars_template is None:
        return None
    return AutoSelectedFirmware(features, code, vars_template)


def firmware_features(xml: str) -> tuple[tuple[str, str], ...] | None:
    """The auto-selection features a rendered domain asks for; None without auto-selection."""
    os_element = ET.fromstring(xml).find("os")
    if os_element is None or os_element.get("firmware") != "efi":
        return None
    return tuple((f.get("name", ""), f.get("enabled", "")) for f in os_element.findall("firmware/feature"))


def _restore_autoselection(os_element: ET.Element, hint: AutoSelectedFirmware) -> None:
    loader, nvram = os_element.find("loader"), os_element.find("nvram")
    if (
        "firmware" in os_element.attrib
        or os_element.find("firmware") is not None
        or loader is None
        or (loader.text or "").strip() != hint.code
        or nvram is None
        or nvram.get("template") != hint.vars_template
    ):
        return
    firmware = ET.Element("firmware")
    for name, enabled in hint.features:
        ET.SubElement(firmware, "feature", enabled=enabled, name=name)
    os_element.insert(list(os_element).index(loader), firmware)


def _remove(parent: ET.Element, children: list[ET.Element]) -> None:
    for child in children:
        parent.remove(child)


def _drop_runtime_domain_parts(root: ET.Element) -> None:
    root.attrib.pop("id", None)
    _remove(root, [c for c in root if c.tag in ("metadata", "title", "description")])
    _remove(root, [c for c in root if c.tag == "resource" and _is_default_resource(c)])
    _remove(root, [c for c in root if c.tag == "seclabel" and _is_default_seclabel(c)])


def _is_default_resource(resource: ET.Element) -> bool:
    children = list(resource)
    return (
        not resource.attrib
        and len(children) == 1
        and children[0].tag == "partition"
        and children[0].text == "/machine"
    )


def _is_default_seclabel(seclabel: ET.Element) -> bool:
    return (
        seclabel.get("type") == "dynamic"
        and seclabel.get("relabel", "yes") == "yes"
        and all(child.tag in ("label", "imagelabel") for child in seclabel)
    )


def _normalise_memory(root: ET.Element) -> None:
    for tag in ("memory", "currentMemory", "maxMemory"):
        element = root.find(tag)
        if element is not None:
            element.text = str(_kib(element))
            element.set("unit", "KiB")
    memory, current = root.find("memory"), root.find("currentMemory")
    if memory is not None and current is not None and memory.text == current.text:
        root.remove(current)


def _kib(element: ET.Element) -> int:
    """The amount in KiB, rounded up as libvirt does."""
    text, unit = (element.text or "").strip(), element.get("unit", "KiB")
    factor = _UNITS.get(unit.lower())
    if factor is None or not _AMOUNT.fullmatch(text):
        raise InputError(f"<{element.tag}> has an amount libvirt cannot read: {text!r} {unit!r}")
    return (int(text) * factor + 1023) // 1024


def _normalise_os(os_element: ET.Element, root: ET.Element) -> None:
    os_type = os_element.find("type")
    if os_type is not None:
        versioned = _VERSIONED_MACHINE.fullmatch(os_type.get("machine", ""))
        if versioned:
            os_type.set("machine", _MACHINE_FAMILY[versioned.group(1)])
    nvram = os_element.find("nvram")
    if "firmware" not in os_element.attrib and os_element.find("firmware") is not None:
        # libvirt's own resolution of <os firmware='efi'>; it refuses to define this form.
        os_element.set("firmware", "efi")
        _remove(os_element, os_element.findall("loader"))
        if nvram is not None:
            nvram.attrib.pop("template", None)
    if nvram is not None:
        if nvram.text == f"{LIBVIRT_NVRAM_DIR}/{root.findtext('name')}_VARS.fd":
            nvram.text = None
        if not nvram.attrib and not nvram.text and len(nvram) == 0:
            os_element.remove(nvram)
    boots = os_element.findall("boot")
    if (
        len(boots) == 1
        and boots[0].attrib == {"dev": "hd"}
        and root.find("devices/*/boot") is None
    ):
        os_element.remove(boots[0])


def _normalise_cpu(root: ET.Element) -> None:
    cpu = root.find("cpu")
    if cpu is None:
        return
    cpu.attrib.pop("check", None)
    if root.get("type") == "qemu" and _is_tcg_default_cpu(cpu):
        root.remove(cpu)


def _is_tcg_default_cpu(cpu: ET.Element) -> bool:
    """libvirt's TCG CPU as it writes it at define, or at start with its two features (rule 5)."""
    if cpu.attrib != {"mode": "custom", "match": "exact"} or _has_text(cpu):
        return False
    models = [c for c in cpu if c.tag == "model"]
    features = [c for c in cpu if c.tag == "feature"]
    if len(models) != 1 or len(models) + len(features) != len(cpu):
        return False
    model = models[0]
    if model.attrib != {"fallback": "forbid"} or model.text != "qemu64" or len(model):
        return False
    names = [f.get("name", "") for f in features]
    return (
        all(f.get("policy") == "require" and set(f.attrib) == {"policy", "name"} and not len(f) and not f.text
            for f in features)
        and (not names or sorted(names) == sorted(_TCG_START_FEATURES))
    )


def _has_text(element: ET.Element) -> bool:
    return bool(element.text and not element.text.isspace())


def _normalise_devices(devices: ET.Element) -> None:
    _remove(devices, [d for d in devices if _is_derived_device(d)])
    for device in devices:
        _remove(device, [c for c in device if c.tag in ("address", "alias")])
        if device.tag == "disk":
            for element in device.iter():
                if element.tag in ("source", "backingStore"):
                    element.attrib.pop("index", None)
        if device.get("type") == "pty":
            device.attrib.pop("tty", None)
            _remove(device, [c for c in device if c.tag == "source" and set(c.attrib) <= {"path"}])
        if device.tag == "channel":
            for target in device.findall("target"):
                target.attrib.pop("state", None)
        if device.tag == "interface":
            _remove(device, device.findall("mac"))
            if device.get("type") == "network":
                _remove(device, device.findall("target"))
                for source in device.findall("source"):
                    source.attrib.pop("portid", None)
                    source.attrib.pop("bridge", None)


def _is_derived_device(device: ET.Element) -> bool:
    """Devices libvirt adds or derives on its own (see rule 6)."""
    return (
        (device.tag == "controller" and _is_default_controller(device))
        or (device.tag == "console" and device.find("target[@type='serial']") is not None)
        or (device.tag == "input" and device.get("bus") == "ps2")
        or (device.tag == "audio" and device.get("type") == "none")
    )


def _is_default_controller(controller: ET.Element) -> bool:
    """A controller exactly as libvirt 9.0 adds it to a q35 domain (address and alias aside)."""
    children = [c for c in controller if c.tag not in ("address", "alias")]
    if _has_text(controller) or any(len(c) or _has_text(c) for c in children):
        return False
    kind, index, model = controller.get("type"), controller.get("index"), controller.get("model")
    if model == "pcie-root-port" and kind == "pci":
        return (
            set(controller.attrib) == {"type", "index", "model"}
            and sorted(c.tag for c in children) == ["model", "target"]
            and all(c.attrib == {"name": "pcie-root-port"} for c in children if c.tag == "model")
            and all(set(c.attrib) == {"chassis", "port"} for c in children if c.tag == "target")
        )
    expected = {"type", "index"} | ({"model"} if model is not None else set())
    return not children and set(controller.attrib) == expected and (kind, index, model) in _DEFAULT_CONTROLLERS


def _write(element: ET.Element, out: list[str]) -> None:
    out.append(f"<{element.tag}")
    for name in sorted(element.attrib):
        out.append(f' {name}="{element.attrib[name].translate(_ESCAPES)}"')
    out.append(">")
    out.append(_text(element.text))
    for child in element:
        _write(child, out)
        out.append(_text(child.tail))
    out.append(f"</{element.tag}>")


def _text(text: str | None) -> str:
    return "" if text is None or text.isspace() else text.translate(_ESCAPES)
