"""Which host files a domain XML makes libvirt and QEMU open, and which of those are tvorch's.

The hook reads this for every domain that carries no tvorch metadata: such a
domain is not an instance, so nothing of an instance's may be in it. A copy of
an instance's definition stripped of its metadata, UUID and vTPM secret would
otherwise run the tenant's overlay (with a vTPM libvirt makes for it) without
any check or record. So every path in the XML counts, wherever it appears
(disks, nvram, loader, chardevs and their logs, filesystems, vTPM state ...),
not just the elements tvorch renders: an element this module does not know is
still read as "opens that path for writing".

Imports nothing but ElementTree and re: the hook imports it on every start.
"""

from __future__ import annotations

import posixpath
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tvorch.errors import InputError

# Attributes that name a host file, directory or socket even when relative; any
# other attribute or text that starts with "/" is taken as a path as well.
_PATH_ATTRIBUTES = frozenset({"file", "path", "dir", "socket", "template"})
# Elements whose text names a host file (rng's <backend> names its source device or file).
_PATH_TEXT = frozenset({"loader", "nvram", "kernel", "initrd", "dtb", "emulator", "table", "backend"})
# Elements QEMU or libvirt only read from.
_READ_ONLY_TEXT = frozenset({"kernel", "initrd", "dtb", "emulator", "table", "backend"})
# libvirt's namespace for arguments and properties handed to QEMU unread (<qemu:commandline>,
# <qemu:override>): any absolute path in their values counts, e.g. "file=/path,format=qcow2".
_QEMU_NAMESPACE = "{http://libvirt.org/schemas/domain/qemu/1.0}"
_PATH_IN_ARGUMENT = re.compile(r"(?<![\w.~-])/[^\s,=;'\"]+")
# Free text, and tvorch's own record of the instance: never a file libvirt opens.
_NOT_CONFIGURATION = frozenset({"description", "title", "metadata"})


@dataclass(frozen=True)
class FileUse:
    """One host path the domain names; WRITABLE unless libvirt opens it read-only."""

    path: str  # absolute and normalised ("..", "//" resolved; a relative path is taken from /)
    element: str  # the element naming it, for the reason line
    writable: bool
    # A storage volume (<source pool= volume=>): PATH is the volume's name, to be looked up in the pool.
    pool: str | None = None


@dataclass(frozen=True)
class OwnedPath:
    path: str
    owner: str  # who it belongs to, as the reason line says it: "tvorch's overlay directory"


@dataclass(frozen=True)
class OwnedFiles:
    """What a domain other than the instance may not use.

    TREES: directories nothing outside tvorch may use anything under.
    FILES: files (or directories) no other domain may use at all.
    SHARED: images others may use read-only (as a backing layer or a read-only disk), never writable.
    """

    trees: tuple[OwnedPath, ...] = ()
    files: tuple[OwnedPath, ...] = ()
    shared: tuple[OwnedPath, ...] = ()


def file_uses(xml: str) -> tuple[FileUse, ...]:
    """Every host path the domain XML names, in document order, with whether it may be written.

    In <qemu:commandline> and <qemu:override>, whose values libvirt hands
    QEMU without reading them, every absolute path in a value counts,
    writable. Read-only: anything in a <backingStore>; a disk with <readonly/> (libvirt
    writes it for every cdrom); a <loader readonly='yes'>; an nvram template;
    kernel, initrd, dtb, emulator, ACPI tables and rng sources. Everything else
    is taken as writable.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"domain XML is not well-formed: {err}") from err
    uses: list[FileUse] = []
    _walk(root, read_only=False, uses=uses)
    return tuple(uses)


def _walk(element: ET.Element, read_only: bool, uses: list[FileUse]) -> None:
    tag = element.tag
    if not isinstance(tag, str) or tag in _NOT_CONFIGURATION:
        return
    if tag.startswith(_QEMU_NAMESPACE):
        shown = "qemu:" + tag[len(_QEMU_NAMESPACE):]
        for value in (*element.attrib.values(), element.text or ""):
            uses.extend(FileUse(_normal(p), shown, True) for p in _PATH_IN_ARGUMENT.findall(value))
        for child in element:
            _walk(child, read_only, uses)
        return
    if tag == "backingStore" or (tag == "disk" and element.find("readonly") is not None):
        read_only = True
    for name, value in element.attrib.items() if tag != "target" else ():  # <target>: the guest's side
        if (name in _PATH_ATTRIBUTES and value.strip()) or value.startswith("/"):
            uses.append(FileUse(_normal(value), tag, not (read_only or name == "template")))
    if element.get("pool") and element.get("volume"):
        uses.append(FileUse(element.get("volume", ""), tag, not read_only, pool=element.get("pool")))
    text = (element.text or "").strip()
    if text and (tag in _PATH_TEXT or text.startswith("/")):
        fixed = tag in _READ_ONLY_TEXT or (tag == "loader" and element.get("readonly") == "yes")
        uses.append(FileUse(_normal(text), tag, not (read_only or fixed)))
    for child in element:
        _walk(child, read_only, uses)


def _normal(value: str) -> str:
    """libvirtd runs in /, so a relative path is taken from there; "//x" is "/x" to the kernel."""
    return "/" + posixpath.normpath(posixpath.join("/", value.strip())).lstrip("/")


def volume_path(pool_xml: str, volume: str) -> str | None:
    """Where a volume of the pool described by POOL_XML (libvirt's pool definition) lives: its target
    path joined with the volume's name; None when the pool names no target path."""
    try:
        target = ET.fromstring(pool_xml).findtext("target/path")
    except ET.ParseError:
        return None
    return _normal(posixpath.join(target, volume)) if target and target.strip() else None


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def owned_file_uses(uses: tuple[FileUse, ...], owned: OwnedFiles) -> tuple[str, ...]:
    """One reason per use of something tvorch owns, in the order the XML names them.

    Paths on both sides must already be resolved the same way (the hook
    resolves symbolic links on both before asking).
    """
    reasons: list[str] = []
    for use in uses:
        reason = _owner(use, owned)
        if reason and reason not in reasons:
            reasons.append(reason)
    return tuple(reasons)


def _owner(use: FileUse, owned: OwnedFiles) -> str | None:
    for item in owned.files:
        if _within(use.path, item.path):
            return f"<{use.element}> {use.path} belongs to {item.owner}"
    for item in owned.trees:
        if _within(use.path, item.path):
            return f"<{use.element}> {use.path} is in {item.owner}"
    if use.writable:
        for item in owned.shared:
            if use.path == item.path:
                return f"<{use.element}> {use.path} is {item.owner}, opened writable (only read-only is allowed)"
    return None
