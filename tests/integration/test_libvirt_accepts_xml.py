"""The real libvirtd accepts every golden domain XML and keeps what tvorch relies on.

The golden files are the renderer's output (tests/unit/test_domain_xml.py
checks that), so they are defined here as they are. Domains are only defined,
never started, and only ones named tvtest-xml-* that did not exist before.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.components import missing
from tvorch.core.launch.domain_xml import parse_instance_metadata
from tvorch.core.launch.spec import METADATA_NAMESPACE

pytestmark = pytest.mark.integration

URI = "qemu:///system"
PREFIX = "tvtest-xml-"
GOLDEN_FILES = sorted((Path(__file__).resolve().parent.parent / "golden").glob("*.xml"))
# The disk every golden file points at.
DISK = Path("/var/lib/libvirt/images/tvtest-xml-disk.qcow2")


def _element(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    assert element is not None, f"no <{path}>"
    return element


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as err:
        missing(f"libvirt at {URI} is unreachable: {err}")
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture(scope="module")
def disk() -> Iterator[Path]:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        missing("qemu-img is not installed (package qemu-utils)")
    if DISK.exists():
        pytest.fail(f"{DISK} already exists (left by an earlier run?); remove it and rerun")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(DISK), "64M"], check=True)
    try:
        yield DISK
    finally:
        DISK.unlink(missing_ok=True)


def _backing_chain(root: ET.Element) -> list[tuple[str | None, ...]]:
    """Each <backingStore> under the disk, outermost first: type, format, file, seclabels."""
    chain = []
    store = root.find("devices/disk/backingStore")
    while store is not None:
        source = store.find("source")
        chain.append((
            store.get("type"),
            store.find("format").get("type") if store.find("format") is not None else None,
            source.get("file") if source is not None else None,
            repr([seclabel.attrib for seclabel in store.iterfind("source/seclabel")]),
        ))
        store = store.find("backingStore")
    return chain


def _require_absent(conn: libvirt.virConnect, name: str, uuid: str) -> None:
    """Refuse to go on if a domain with this name or uuid exists: it is not ours."""
    for lookup, key in ((conn.lookupByName, name), (conn.lookupByUUIDString, uuid)):
        try:
            lookup(key)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue
            raise
        pytest.fail(f"a domain {key} already exists; not touching it")


@pytest.mark.parametrize("golden", GOLDEN_FILES, ids=lambda path: path.stem)
def test_libvirt_defines_golden_xml_and_keeps_metadata_and_tpm(
    conn: libvirt.virConnect, disk: Path, golden: Path
) -> None:
    xml = golden.read_text(encoding="utf-8")
    ours = ET.fromstring(xml)
    name, uuid = ours.findtext("name", ""), ours.findtext("uuid", "")
    assert name.startswith(PREFIX)
    assert _element(ours, "devices/disk/source").get("file") == str(disk)
    _require_absent(conn, name, uuid)

    domain = conn.defineXML(xml)
    try:
        dumped = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        theirs = ET.fromstring(dumped)

        instance = f"metadata/{{{METADATA_NAMESPACE}}}instance"
        assert _element(theirs, instance).attrib == _element(ours, instance).attrib
        assert parse_instance_metadata(dumped) == parse_instance_metadata(xml)

        tpms = theirs.findall("devices/tpm")
        assert [t.get("model") for t in tpms] == [_element(ours, "devices/tpm").get("model")]
        assert _element(tpms[0], "backend").attrib == {
            "type": "emulator",
            "version": "2.0",
            "persistent_state": "yes",
        }

        # A pinned chain is kept as written, down to the empty store that ends it.
        assert _backing_chain(theirs) == _backing_chain(ours)

        # libvirt 9.0 resolves <os firmware='efi'> only when building the
        # command line, so ask for that (nothing is started).
        argv = conn.domainXMLToNative("qemu-argv", dumped, 0)
        loader = ours.findtext("os/loader")
        uefi = _element(ours, "os").get("firmware") == "efi" or loader is not None
        secure = ours.find("features/smm") is not None
        assert ("pflash0=" in argv) == uefi
        assert ("property=secure,value=on" in argv) == secure
        assert ("smm=on" in argv) == secure
        if loader is not None:
            assert f'"filename":"{loader}"' in argv
    finally:
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
