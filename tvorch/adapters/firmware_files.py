"""Where this host's firmware comes from, found the way libvirt and QEMU find it.

UEFI: libvirt's descriptor directories (``qemuInteropFetchConfigs``), read
here and matched by tvorch.core.launch.firmware. BIOS: the SeaBIOS image QEMU loads
for q35 when no firmware is named, looked up in QEMU's own data directories.
The answers name the files tvorch must measure before launch.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..core.launch.firmware import (
    MAX_DESCRIPTOR_SIZE,
    FirmwareDescriptor,
    FirmwareRequest,
    ResolvedFirmware,
    parse_descriptor,
    select_firmware,
)
from ..core.launch.spec import DomainSpec, Firmware, FirmwareImages
from ..errors import HostError

# libvirt's system daemon: /etc overrides /usr/share (no per-user directory).
FIRMWARE_SEARCH_DIRS: tuple[Path, ...] = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))

# What QEMU's pc/q35 machines load when no -bios is given.
SEABIOS_IMAGE = "bios-256k.bin"

QEMU_HELP_TIMEOUT_S = 30

_ALIAS = re.compile(r"\(alias of (\S+)\)\s*$")


def descriptor_paths(search_dirs: Sequence[Path] = FIRMWARE_SEARCH_DIRS) -> list[Path]:
    """Descriptor files in libvirt's order; SEARCH_DIRS come highest precedence first.

    A file in a more important directory replaces a same-named one in a less
    important directory, and an empty file there hides it. Dot files and
    non-regular files are skipped; a file that cannot be stat'ed (a dangling
    symlink) is refused, as libvirt refuses it.
    """
    chosen: dict[str, tuple[Path, int]] = {}
    for directory in reversed(search_dirs):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise HostError(f"cannot list firmware descriptors in {directory}: {err.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = os.stat(entry.path)
            except OSError as err:
                raise HostError(f"cannot access firmware descriptor {entry.path}: {err.strerror}") from None
            if stat.S_ISREG(info.st_mode):
                chosen[entry.name] = (Path(entry.path), info.st_size)
    # libvirt sorts with strcmp: byte order of the file names.
    return [path for name, (path, size) in sorted(chosen.items(), key=lambda item: os.fsencode(item[0])) if size]


def load_descriptors(search_dirs: Sequence[Path] = FIRMWARE_SEARCH_DIRS) -> list[FirmwareDescriptor]:
    """Every descriptor libvirt would consider, parsed, in its order."""
    descriptors = []
    for path in descriptor_paths(search_dirs):
        try:
            with path.open("rb") as file:
                data = file.read(MAX_DESCRIPTOR_SIZE + 1)
        except OSError as err:
            raise HostError(f"cannot read firmware descriptor {path}: {err.strerror}") from None
        descriptors.append(parse_descriptor(data, str(path)))
    return descriptors


@lru_cache(maxsize=16)
def _qemu_help_cached(emulator: str, option: str, identity: tuple[int, int, int, int]) -> str:
    """The output of ``EMULATOR OPTION help``; IDENTITY (the binary's stat) keys the cache."""
    del identity  # only part of the cache key: an upgraded QEMU is asked again
    try:
        proc = subprocess.run(
            [emulator, option, "help"], capture_output=True, text=True, timeout=QEMU_HELP_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HostError(f"cannot run {emulator} {option} help: {err}") from None
    if proc.returncode != 0:
        raise HostError(f"{emulator} {option} help exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _qemu_help(emulator: str, option: str) -> str:
    try:
        info = os.stat(emulator)
    except OSError as err:
        raise HostError(f"emulator {emulator} is not usable: {err.strerror}") from None
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    return _qemu_help_cached(emulator, option, identity)


def expand_machine(emulator: str, machine: str) -> str:
    """The versioned machine type an alias stands for (``q35`` -> ``pc-q35-7.2``).

    libvirt canonicalises the alias before matching descriptor globs, so the
    expansion must come from the same QEMU.
    """
    for line in _qemu_help(emulator, "-machine").splitlines():
        name, _, rest = line.partition(" ")
        if name != machine:
            continue
        alias = _ALIAS.search(rest)
        return alias.group(1) if alias else machine
    raise HostError(f"{emulator} has no machine type '{machine}'")


def qemu_data_dirs(emulator: str) -> tuple[Path, ...]:
    """The directories QEMU searches for firmware and ROMs, in its order (``-L help``)."""
    return tuple(Path(line) for line in _qemu_help(emulator, "-L").splitlines() if line.startswith("/"))


def find_seabios(data_dirs: Sequence[Path]) -> ResolvedFirmware:
    """SeaBIOS as QEMU finds it: the first data directory holding it, symlinks resolved."""
    for directory in data_dirs:
        candidate = directory / SEABIOS_IMAGE
        if candidate.is_file():
            return ResolvedFirmware(kind="bios", code=os.path.realpath(candidate), vars_template=None, descriptor=None)
    searched = ", ".join(str(d) for d in data_dirs) or "no directories"
    raise HostError(f"BIOS image {SEABIOS_IMAGE} not found in QEMU's data directories ({searched})")


def resolve_bios(emulator: str) -> ResolvedFirmware:
    return find_seabios(qemu_data_dirs(emulator))


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise HostError(f"{what} {path} does not exist or is not a regular file")


def resolve_uefi(request: FirmwareRequest, search_dirs: Sequence[Path] = FIRMWARE_SEARCH_DIRS) -> ResolvedFirmware:
    """The OVMF code and vars template libvirt will choose for REQUEST; both must exist."""
    resolved = select_firmware(load_descriptors(search_dirs), request)
    _require_file(resolved.code, f"firmware code (from {resolved.descriptor})")
    assert resolved.vars_template is not None  # a pflash choice always has one
    _require_file(resolved.vars_template, f"firmware vars template (from {resolved.descriptor})")
    return resolved


def resolve_firmware_images(images: FirmwareImages) -> ResolvedFirmware:
    """An operator's firmware profile: named files, no selection."""
    _require_file(images.code, "firmware profile code")
    _require_file(images.vars_template, "firmware profile vars template")
    return ResolvedFirmware(kind="uefi", code=images.code, vars_template=images.vars_template, descriptor=None)


def resolve_for_spec(spec: DomainSpec, search_dirs: Sequence[Path] = FIRMWARE_SEARCH_DIRS) -> ResolvedFirmware:
    """The firmware the domain rendered from SPEC will run.

    Mirrors tvorch.core.launch.domain_xml: auto-selected UEFI asks for ``secure-boot``
    and ``enrolled-keys`` both on or both off, as ``spec.secure_boot`` says.
    """
    if spec.firmware is Firmware.BIOS:
        return resolve_bios(spec.emulator)
    if spec.firmware_images is not None:
        return resolve_firmware_images(spec.firmware_images)
    request = FirmwareRequest(
        machine=expand_machine(spec.emulator, spec.machine),
        secure_boot=spec.secure_boot,
        enrolled_keys=spec.secure_boot,
    )
    return resolve_uefi(request, search_dirs)
