"""The boot measurements tvorch computes from files: PCRs 4, 5, 8, 9, 11-14.

Pure: bytes in (the disk's GPT and boot file, or the direct-boot kernel,
initrd and command line), ``PredictedEvent``s out, each PCR's events in the
order the vTPM receives them. Each PCR was checked event by event against the
logs of real boots of tvorch's test guest (tests/data/eventlogs and the
integration tests):

OVMF, disk boot of a unified kernel image (systemd-stub 252, Linux 6.1):
  PCR 4  EV_EFI_ACTION "Calling EFI Application from Boot Option",
         EV_SEPARATOR 0, the boot file's Authenticode
         (EV_EFI_BOOT_SERVICES_APPLICATION), then the UKI's .linux section's
         Authenticode (the stub hands it to LoadImage, which measures it)
  PCR 5  EV_SEPARATOR 0, EV_EFI_GPT_EVENT (UEFI_GPT_DATA of the disk),
         EV_EFI_ACTION "Exit Boot Services Invocation", then
         "Exit Boot Services Returned with Success"
  PCR 8  nothing (Debian's stub is built without the PCR 8 compatibility)
  PCR 9  Linux's EFI stub: EV_EVENT_TAG of the load options systemd-stub
         passes (the .cmdline as UTF-16 with its NUL), then of the initrd
  PCR 11 systemd-stub: for .linux, .osrel, .cmdline, .initrd, .splash,
         .dtb, .pcrpkey present, in that order, EV_IPL of the section name
         with its NUL, then EV_IPL of the section's bytes (VirtualSize)
  PCR 12 nothing while the stub finds no credentials and takes no load
         options; PCR 13 nothing while it finds no system extensions
  PCR 14 nothing (no shim: nothing measures MOK lists)
OVMF, direct kernel boot (QEMU -kernel on q35): PCR 4 the kernel's
  Authenticode first (OVMF loads it before ReadyToBoot), then the boot
  option action and the separator. The kernel measured is not the file:
  QEMU 7.2's x86_load_linux patches its setup header (loader type, heap,
  command line address, and the initrd's address and size; the address
  follows the guest's memory below 4 GiB), see ``qemu_patched_kernel``.
  PCR 5 without the GPT event; PCR 9 the load options OVMF gives the kernel
  (the command line, plus " initrd=initrd" when there is an initrd, UTF-16
  with its NUL) and the initrd.
SeaBIOS, direct kernel boot: PCR 4 EV_ACTION "Calling INT 19h" and
  EV_SEPARATOR 0xffffffff; PCRs 0, 3, 5, 6 and 7 only that separator; PCRs 8
  and 9 nothing (QEMU's linuxboot option ROM measures neither kernel nor
  initrd).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import ImageError
from .bootdisk import DEFAULT_BOOT_PATH, Gpt
from .pe import PeImage, parse_pe
from .prediction import PredictedEvent

CALLING_BOOT_OPTION = b"Calling EFI Application from Boot Option"
EXIT_BOOT_SERVICES = (b"Exit Boot Services Invocation", b"Exit Boot Services Returned with Success")
SEABIOS_INT19 = b"Calling INT 19h"
UEFI_SEPARATOR = b"\0\0\0\0"
BIOS_SEPARATOR = b"\xff\xff\xff\xff"
# systemd 252 src/fundamental/tpm-pcr.c: the canonical measuring order; .pcrsig is never measured.
STUB_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrsig", ".pcrpkey")
STUB_UNMEASURED = frozenset({".pcrsig"})
# Where systemd-stub 252 looks for credentials and system extensions on the ESP.
STUB_DROPIN_DIRS = ("\\loader\\credentials",)
STUB_DROPIN_SUFFIX = ".extra.d"

PCR_BOOT_APPS, PCR_GPT, PCR_GRUB_COMPAT, PCR_KERNEL_STUB = 4, 5, 8, 9
PCR_UKI, PCR_KERNEL_PARAMETERS, PCR_SYSEXTS = 11, 12, 13
# What a direct kernel boot leaves on the PCRs this side covers: nothing beyond the events below.
DIRECT_BOOT_PCRS = (4, 5, 8, 9, 11, 12, 13, 14)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ev(pcr: int, type_name: str, data_digest: str, what: str) -> PredictedEvent:
    return PredictedEvent(pcr, type_name, data_digest, what)


@dataclass(frozen=True)
class BootPrediction:
    """Events computed from files, the PCRs they fully determine, and why others are left out."""

    events: tuple[PredictedEvent, ...]
    covered: frozenset[int]
    not_predicted: tuple[tuple[int, str], ...]  # (PCR, reason) for PCRs this side cannot compute
    # The boot applications the firmware itself loads (and verifies under Secure Boot), in load order:
    # (name, PE bytes as loaded, Authenticode sha256), what PCR 7's db authority events follow.
    firmware_loads: tuple[tuple[str, bytes, str], ...] = ()


def _uefi_pcr4_head() -> list[PredictedEvent]:
    return [_ev(4, "EV_EFI_ACTION", sha256(CALLING_BOOT_OPTION), CALLING_BOOT_OPTION.decode()),
            _ev(4, "EV_SEPARATOR", sha256(UEFI_SEPARATOR), "separator")]


def _uefi_pcr5(gpt: Gpt | None) -> list[PredictedEvent]:
    out = [_ev(5, "EV_SEPARATOR", sha256(UEFI_SEPARATOR), "separator")]
    if gpt is not None:
        out.append(_ev(5, "EV_EFI_GPT_EVENT", sha256(gpt.event_data),
                       f"GPT of disk {gpt.disk_guid} ({len(gpt.partitions)} partitions)"))
    out += [_ev(5, "EV_EFI_ACTION", sha256(text), text.decode()) for text in EXIT_BOOT_SERVICES]
    return out


def _utf16z(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def _linux_pcr9(load_options: bytes | None, initrd: bytes | None) -> list[PredictedEvent]:
    """Linux 6.1's EFI stub: its load options, then the initrd it loads through LoadFile2."""
    out = []
    if load_options:
        out.append(_ev(9, "EV_EVENT_TAG", sha256(load_options), "LOADED_IMAGE::LoadOptions"))
    if initrd:
        out.append(_ev(9, "EV_EVENT_TAG", sha256(initrd), "Linux initrd"))
    return out


def mangle_stub_cmdline(cmdline: str) -> str:
    """systemd-stub's mangle_stub_cmdline: control characters become spaces, trailing spaces go."""
    return "".join(" " if ord(c) < 0x20 else c for c in cmdline).rstrip(" ")


def uki_sections(uki: PeImage) -> dict[str, bytes]:
    """The UKI's sections that systemd-stub knows, as it maps them (present ones only)."""
    out = {}
    for name in STUB_SECTIONS:
        data = uki.section_data(name)
        if data:
            out[name] = data
    return out


def stub_pcr11(sections: dict[str, bytes]) -> list[PredictedEvent]:
    """systemd-stub 252's PCR 11: name (ASCII with NUL) then bytes, per measured section, canonical order."""
    out = []
    for name in STUB_SECTIONS:
        if name in STUB_UNMEASURED or name not in sections:
            continue
        out.append(_ev(11, "EV_IPL", sha256(name.encode() + b"\0"), f"{name} (section name)"))
        out.append(_ev(11, "EV_IPL", sha256(sections[name]), f"{name} (section data)"))
    return out


def predict_uefi_disk(gpt: Gpt, boot_file: bytes, *, stub_dropins: bool = False,
                      boot_path: str = DEFAULT_BOOT_PATH, secure_boot: bool = False) -> BootPrediction:
    """OVMF booting BOOT_FILE from the ESP of the disk with GPT; a UKI is followed into its stub.

    With SECURE_BOOT on, systemd-stub 252 loads its unsigned .linux section under its own security
    policy override, which answers for the firmware's image check and so skips the firmware's measurement
    of it: PCR 4 then holds the UKI alone (as tests/data/eventlogs/uefi-secureboot.bin shows)."""
    app = parse_pe(boot_file, boot_path)
    app_hash = app.authenticode_sha256()
    loads = ((boot_path, boot_file, app_hash),)
    events = _uefi_pcr4_head()
    events.append(_ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", app_hash, f"{boot_path} (Authenticode)"))
    events += _uefi_pcr5(gpt)
    sections = uki_sections(app)
    if ".linux" not in sections:
        return BootPrediction(tuple(events), frozenset({5}), (
            (4, f"{boot_path} is not a unified kernel image: what it loads next is not known"),
            (8, "not a unified kernel image"), (9, "not a unified kernel image"),
            (11, "not a unified kernel image"), (12, "not a unified kernel image"),
            (13, "not a unified kernel image"), (14, "not a unified kernel image")), loads)
    kernel = parse_pe(sections[".linux"], f"{boot_path} .linux section")
    if not secure_boot:
        events.append(_ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", kernel.authenticode_sha256(),
                          f"{boot_path} .linux section (Authenticode)"))
    cmdline = sections.get(".cmdline")
    load_options = _utf16z(mangle_stub_cmdline(cmdline.decode("utf-8", "replace"))) if cmdline else None
    covered = {4, 5, 8, 11, 14}
    not_predicted: list[tuple[int, str]] = []
    if stub_dropins:
        # Credentials and sysexts are packed into extra initrds: PCR 9's initrd and PCRs 12/13 change.
        reason = "systemd-stub finds credentials or system extensions on the ESP"
        not_predicted += [(9, reason), (12, reason), (13, reason)]
    else:
        events += _linux_pcr9(load_options, sections.get(".initrd"))
        covered |= {9, 12, 13}
    events += stub_pcr11(sections)
    return BootPrediction(tuple(events), frozenset(covered), tuple(not_predicted), loads)


def ovmf_load_options(cmdline: str, has_initrd: bool) -> bytes:
    """What OVMF's QemuLoadKernelImage puts in the kernel's LoadOptions (UTF-16, NUL-terminated)."""
    return _utf16z(cmdline + (" initrd=initrd" if has_initrd else ""))


# QEMU 7.2 hw/i386/x86.c x86_load_linux, for a bzImage (boot protocol >= 2.02, loaded high).
_QEMU_REAL_ADDR, _QEMU_CMDLINE_ADDR = 0x10000, 0x20000
_QEMU_ACPI_DATA_SIZE = 0x20000 + 0x8000  # pc machines since 2.x: what x86_load_linux keeps free below 4 GiB
_XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
_VGA_MODES = {"normal": 0xFFFF, "ext": 0xFFFE, "ask": 0xFFFD}


def q35_below_4g(memory_bytes: int) -> int:
    """QEMU's q35 split of guest memory: what lies below 4 GiB (pc_q35_init)."""
    lowmem = 0x80000000 if memory_bytes >= 0xB0000000 else 0xB0000000
    return min(memory_bytes, lowmem)


def qemu_patched_kernel(kernel: bytes, initrd_size: int | None, cmdline: str, memory_bytes: int) -> bytes:
    """The kernel as QEMU hands it to OVMF through fw_cfg: the file with its setup header filled in."""
    k = bytearray(kernel)
    if len(k) < 0x260 or k[0x202:0x206] != b"HdrS":
        raise ImageError("the kernel has no Linux boot protocol header (HdrS): its direct boot cannot be predicted")
    protocol = int.from_bytes(k[0x206:0x208], "little")
    if protocol < 0x202 or not k[0x211] & 0x01:
        raise ImageError(f"the kernel's boot protocol {protocol >> 8}.{protocol & 0xff:02} is older than "
                         "2.02 or not loaded high: its direct boot cannot be predicted")
    k[0x228:0x22C] = _QEMU_CMDLINE_ADDR.to_bytes(4, "little")
    for word in cmdline.split():
        if word.startswith("vga="):
            value = word[4:]
            try:
                mode = _VGA_MODES.get(value) or int(value, 0)
            except ValueError:
                mode = 0  # QEMU's strtol of a bad value
            k[0x1FA:0x1FC] = (mode & 0xFFFF).to_bytes(2, "little")
    k[0x210] = 0xB0
    k[0x211] |= 0x80
    k[0x224:0x226] = (_QEMU_CMDLINE_ADDR - _QEMU_REAL_ADDR - 0x200).to_bytes(2, "little")
    if initrd_size is not None:
        xlf = int.from_bytes(k[0x236:0x238], "little")
        if protocol >= 0x20C and xlf & _XLF_CAN_BE_LOADED_ABOVE_4G:
            initrd_max = 0xFFFFFFFF
        elif protocol >= 0x203:
            initrd_max = int.from_bytes(k[0x22C:0x230], "little")
        else:
            initrd_max = 0x37FFFFFF
        below = q35_below_4g(memory_bytes)
        if initrd_max >= below - _QEMU_ACPI_DATA_SIZE:
            initrd_max = below - _QEMU_ACPI_DATA_SIZE - 1
        if initrd_size >= initrd_max:
            raise ImageError(f"the initrd ({initrd_size} bytes) does not fit below the guest's memory limit")
        k[0x218:0x21C] = ((initrd_max - initrd_size) & ~4095).to_bytes(4, "little")
        k[0x21C:0x220] = initrd_size.to_bytes(4, "little")
    return bytes(k)


def predict_uefi_direct(kernel: bytes, initrd: bytes | None, cmdline: str, memory_bytes: int) -> BootPrediction:
    """OVMF's direct kernel boot (QEMU -kernel/-initrd/-append on q35, MEMORY_BYTES of guest memory)."""
    patched = qemu_patched_kernel(kernel, len(initrd) if initrd is not None else None, cmdline, memory_bytes)
    image = parse_pe(patched, "kernel")
    kernel_hash = image.authenticode_sha256()
    events = [_ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", kernel_hash, "kernel as QEMU passes it (Authenticode)")]
    events += _uefi_pcr4_head()
    events += _uefi_pcr5(None)
    events += _linux_pcr9(ovmf_load_options(cmdline, initrd is not None), initrd)
    return BootPrediction(tuple(events), frozenset(DIRECT_BOOT_PCRS), (), (("kernel", patched, kernel_hash),))


def predict_seabios_direct() -> BootPrediction:
    """SeaBIOS's direct kernel boot: nothing of the kernel is measured, only INT 19h and separators.

    SeaBIOS also measures nothing but its separator into PCRs 0, 3, 6 and 7
    (no S-CRTM, no Secure Boot), so those are predicted here too; PCRs 1 and
    2 (SMBIOS tables, option ROMs) follow the platform and are not.
    """
    separator = sha256(BIOS_SEPARATOR)
    events = [_ev(pcr, "EV_SEPARATOR", separator, "separator") for pcr in (0, 3, 6, 7)]
    events += [_ev(4, "EV_ACTION", sha256(SEABIOS_INT19), SEABIOS_INT19.decode()),
               _ev(4, "EV_SEPARATOR", separator, "separator"),
               _ev(5, "EV_SEPARATOR", separator, "separator")]
    reason = "SeaBIOS measures the platform's SMBIOS tables and option ROMs here"
    return BootPrediction(tuple(events), frozenset(DIRECT_BOOT_PCRS) | {0, 3, 6, 7}, ((1, reason), (2, reason)))
