"""tvorch's firmware resolution agrees with what libvirt and QEMU really use here.

UEFI: libvirt 9.0 picks the firmware when it builds the command line, so
``virsh domxml-to-native qemu-argv`` of tvorch's rendered XML shows its
choice (nothing is defined or started). BIOS: QEMU is started paused, with
no guest, and the 256 KiB it maps below 4 GiB are compared with the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import IO

import pytest

from tests.components import missing
from tvorch.adapters.firmware_files import (
    expand_machine,
    resolve_bios,
    resolve_for_spec,
    resolve_uefi,
)
from tvorch.core.launch.domain_xml import render_domain_xml
from tvorch.core.launch.firmware import FirmwareRequest
from tvorch.core.launch.spec import DomainSpec, Firmware, TpmModel, VirtType

pytestmark = pytest.mark.integration

URI = "qemu:///system"
EMULATOR = "/usr/bin/qemu-system-x86_64"
SPEC = DomainSpec(
    name="tvtest-fw-resolution",
    uuid="5c0a7e1d-8f3b-4a26-9d41-00000000f1f1",
    instance_id="i-fw-resolution",
    memory_mib=512,
    vcpus=1,
    virt_type=VirtType.QEMU,
    emulator=EMULATOR,
    firmware=Firmware.EFI,
    secure_boot=False,
    tpm_model=TpmModel.CRB,
    # domxml-to-native opens nothing: the disk need not exist.
    disk_path="/var/lib/libvirt/images/tvtest-fw-resolution.qcow2",
    disk_format="qcow2",
    console_log="/var/log/libvirt/qemu/tvtest-fw-resolution-console.log",
)
BIOS_SIZE = 256 * 1024


@pytest.fixture(scope="module")
def virsh() -> str:
    path = shutil.which("virsh")
    if path is None:
        missing("virsh is not installed (package libvirt-clients)")
    if subprocess.run([path, "-c", URI, "version"], capture_output=True, check=False).returncode != 0:
        missing(f"libvirt at {URI} is unreachable")
    return path


@pytest.fixture(scope="module")
def emulator() -> str:
    if not os.access(EMULATOR, os.X_OK):
        missing(f"{EMULATOR} is not installed (package qemu-system-x86)")
    return EMULATOR


def _libvirt_argv(virsh: str, xml: str) -> list[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".xml", encoding="utf-8") as file:
        file.write(xml)
        file.flush()
        proc = subprocess.run(
            [virsh, "-c", URI, "domxml-to-native", "qemu-argv", file.name],
            capture_output=True,
            text=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _pflash_code(argv: list[str]) -> str:
    """The file behind pflash0, from libvirt's ``-blockdev`` JSON."""
    for option, value in zip(argv, argv[1:]):
        if option == "-blockdev":
            blockdev = json.loads(value)
            if blockdev.get("node-name") == "libvirt-pflash0-storage":
                return blockdev["filename"]
    raise AssertionError(f"no pflash0 blockdev in {argv}")


def _machine(argv: list[str]) -> str:
    return argv[argv.index("-machine") + 1].split(",")[0]


def _with_enrolled_keys_off(xml: str) -> str:
    """tvorch renders both features alike; libvirt also takes Secure Boot with an empty key store."""
    root = ET.fromstring(xml)
    features = root.findall("os/firmware/feature[@name='enrolled-keys']")
    assert len(features) == 1
    features[0].set("enabled", "no")
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("secure_boot", [False, True], ids=["sb-off", "sb-on-enrolled-keys"])
def test_uefi_resolution_agrees_with_libvirt(virsh: str, emulator: str, secure_boot: bool) -> None:
    spec = dataclasses.replace(SPEC, secure_boot=secure_boot)
    argv = _libvirt_argv(virsh, render_domain_xml(spec))
    resolved = resolve_for_spec(spec)
    assert resolved.kind == "uefi"
    assert resolved.code == _pflash_code(argv)
    assert expand_machine(emulator, spec.machine) == _machine(argv)


def test_uefi_resolution_agrees_with_libvirt_without_enrolled_keys(virsh: str, emulator: str) -> None:
    spec = dataclasses.replace(SPEC, secure_boot=True)
    argv = _libvirt_argv(virsh, _with_enrolled_keys_off(render_domain_xml(spec)))
    request = FirmwareRequest(machine=expand_machine(emulator, spec.machine), secure_boot=True, enrolled_keys=False)
    assert resolve_uefi(request).code == _pflash_code(argv)


def _qmp(stream_in: IO[str], stream_out: IO[str], command: str, **arguments: object) -> None:
    stream_in.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
    stream_in.flush()
    for line in stream_out:
        reply = json.loads(line)
        if "event" in reply:
            continue
        assert "return" in reply, reply
        return
    raise AssertionError(f"QEMU closed QMP before answering {command}")


def test_bios_resolution_is_what_qemu_maps_below_4g(emulator: str, tmp_path: Path) -> None:
    resolved = resolve_bios(emulator)
    assert resolved.kind == "bios"
    assert resolved.code == os.path.realpath(resolved.code)
    dump = tmp_path / "bios.dump"
    qemu = subprocess.Popen(
        [emulator, "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert qemu.stdin is not None and qemu.stdout is not None
        assert "QMP" in json.loads(qemu.stdout.readline())
        _qmp(qemu.stdin, qemu.stdout, "qmp_capabilities")
        _qmp(qemu.stdin, qemu.stdout, "pmemsave", val=2**32 - BIOS_SIZE, size=BIOS_SIZE, filename=str(dump))
        _qmp(qemu.stdin, qemu.stdout, "quit")
        qemu.wait(timeout=30)
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    assert dump.read_bytes() == Path(resolved.code).read_bytes()
