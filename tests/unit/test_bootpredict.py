"""Predicted boot measurements from bytes: GPT, FAT, PE Authenticode, UKI sections, PCRs 4/5/8/9/11-14.

The ground truth is the test guest's real firmware logs (tests/data/eventlogs):
every event of a PCR this side predicts is checked against them, digest by
digest where the bytes measured are known here (the GPT, the fixed actions and
separators, the section names, the command line), and by type and order
where they are the captured guest's own kernel and initrd (the integration
tests check those against a first boot of the current guest).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.components import require
from tvorch.core.boot.bootdisk import Fat, Slice, parse_gpt, read_boot_file
from tvorch.core.boot.bootpredict import (
    mangle_stub_cmdline,
    ovmf_load_options,
    predict_seabios_direct,
    predict_uefi_direct,
    predict_uefi_disk,
    qemu_patched_kernel,
    stub_pcr11,
)
from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.boot.pe import parse_pe
from tvorch.core.boot.prediction import replay
from tvorch.errors import ImageError

DATA = Path(__file__).resolve().parent.parent / "data" / "eventlogs"
GUEST_CMDLINE = "console=ttyS0 panic=-1"  # scripts/build-test-guest.sh CMDLINE


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.read_total = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        self.read_total += min(length, max(0, len(self.data) - offset))
        return self.data[offset:offset + length]


def _log(name: str):
    return parse_event_log((DATA / f"{name}.bin").read_bytes())


def _pcrs(name: str) -> dict[int, str]:
    return {int(k): v for k, v in json.loads((DATA / f"{name}.pcrs.json").read_text())["sha256"].items()}


def _logged(name: str, pcr: int) -> list[tuple[str, str]]:
    return [(e.type_name, e.digests["sha256"]) for e in _log(name).events if e.pcr == pcr and "sha256" in e.digests]


# --- GPT ------------------------------------------------------------------------------

def _gpt_disk_from_log(esp: bytes = b"") -> bytes:
    """The test guest's disk as sfdisk wrote it, rebuilt from the GPT event's own bytes."""
    data = next(e.data for e in _log("uefi-crb").events if e.type_name == "EV_EFI_GPT_EVENT")
    header, count, entries = data[:92], struct.unpack_from("<Q", data, 92)[0], data[100:]
    assert count == 1
    array = entries + bytes(127 * 128)
    disk = bytearray(131072 * 512)
    disk[446:462] = bytes.fromhex("00 000200 ee ffffff 01000000 ffff0100".replace(" ", ""))  # protective MBR
    disk[510:512] = b"\x55\xaa"
    disk[512:512 + 92] = header
    disk[1024:1024 + len(array)] = array
    disk[2048 * 512:2048 * 512 + len(esp)] = esp
    return bytes(disk)


def _fix_gpt_crcs(disk: bytearray) -> None:
    """Recompute the partition array's and the header's CRC32 after an edit, so the edit is what is judged."""
    disk[512 + 88:512 + 92] = struct.pack("<I", zlib.crc32(bytes(disk[1024:1024 + 128 * 128])))
    hdr = bytearray(disk[512:512 + 92])
    hdr[16:20] = bytes(4)
    disk[512 + 16:512 + 20] = struct.pack("<I", zlib.crc32(bytes(hdr)))


def test_gpt_event_data_is_the_logged_event() -> None:
    logged = next(e for e in _log("uefi-crb").events if e.type_name == "EV_EFI_GPT_EVENT")
    gpt = parse_gpt(Bytes(_gpt_disk_from_log()))
    assert gpt.event_data == logged.data
    assert hashlib.sha256(gpt.event_data).hexdigest() == logged.digests["sha256"]
    esp = gpt.esp()
    assert (esp.number, esp.first_lba, esp.last_lba, esp.name) == (1, 2048, 129023, "ESP")


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:512] + bytes(512) + d[1024:], "has no GPT"),
    (lambda d: d[:600] + b"\xff" + d[601:], "GPT header CRC does not match"),
    (lambda d: d[:1024 + 200] + b"\x01" + d[1024 + 201:], "partition array CRC does not match"),
    (lambda d: d[:1100], "cut short"),
])
def test_gpt_refusals(damage, message) -> None:
    with pytest.raises(ImageError, match=message):
        parse_gpt(Bytes(damage(_gpt_disk_from_log())))


def test_gpt_without_esp_is_refused() -> None:
    disk = bytearray(_gpt_disk_from_log())
    disk[1024:1040] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # Linux filesystem type
    _fix_gpt_crcs(disk)
    with pytest.raises(ImageError, match="no EFI system partition"):
        parse_gpt(Bytes(bytes(disk))).esp()


# --- FAT ------------------------------------------------------------------------------

def _fat_image(tmp_path: Path, files: dict[str, bytes], sectors: int = 4096, fat_bits: int | None = None) -> bytes:
    for tool in ("mformat", "mmd", "mcopy"):
        require(shutil.which(tool) is not None, f"{tool} (Debian package mtools)")
    img = tmp_path / "esp.img"
    img.write_bytes(bytes(sectors * 512))
    env = {"MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    fmt = ["mformat", "-i", str(img), "-T", str(sectors), "-h", "64", "-s", "32"]
    if fat_bits:
        fmt += ["-F"] if fat_bits == 32 else []
    subprocess.run(fmt + ["::"], check=True, env=env, capture_output=True)
    made: set[str] = set()
    for path, data in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                subprocess.run(["mmd", "-i", str(img), "::/" + d], check=True, env=env, capture_output=True)
                made.add(d)
        src = tmp_path / "src"
        src.write_bytes(data)
        subprocess.run(["mcopy", "-i", str(img), str(src), "::/" + path], check=True, env=env, capture_output=True)
    return img.read_bytes()


@pytest.mark.parametrize("sectors, fat_bits, bits", [(4096, None, 12), (131072, None, 16), (140000, 32, 32)])
def test_fat_reads_long_names_case_insensitively(tmp_path, sectors, fat_bits, bits) -> None:
    payload = bytes(range(256)) * 300  # 76800 bytes: many clusters
    image = _fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": payload, "EFI/Linux/a-long-file-name.efi": b"x" * 5},
                       sectors, fat_bits)
    fat = Fat(Bytes(image))
    assert fat.bits == bits
    assert fat.read_file(r"\efi\boot\bootx64.efi") == payload
    assert fat.read_file(r"\EFI\linux\A-Long-File-Name.EFI") == b"xxxxx"
    with pytest.raises(ImageError, match=r"no file \\EFI\\BOOT\\GRUBX64.EFI"):
        fat.read_file(r"\EFI\BOOT\GRUBX64.EFI")


def _first_cluster(fat: Fat, image: bytes) -> int:
    entries = fat._directory(fat._directory(fat._root_cluster, "/")[0].cluster, "EFI")
    boot = next(e for e in entries if e.name == "BOOT")
    return next(e for e in fat._directory(boot.cluster, "BOOT") if e.name == "BOOTX64.EFI").cluster


def _set_fat16(image: bytes, fat: Fat, cluster: int, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into("<H", out, fat._fat_offset + 2 * cluster, value)
    return bytes(out)


@pytest.mark.parametrize("value, message", [
    ("self", "loops back to cluster"),
    (0xFFF0, "outside 2-"),
    (0xFFFF, "cut short"),  # the chain ends after one cluster: shorter than the file
])
def test_fat_broken_chains_are_refused(tmp_path, value, message) -> None:
    image = _fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": b"\x11" * 40000}, 131072)
    fat = Fat(Bytes(image))
    first = _first_cluster(fat, image)
    second = fat._next(first)
    image = _set_fat16(image, fat, second, first if value == "self" else value)
    if value == 0xFFFF:
        image = _set_fat16(image, fat, first, 0xFFFF)
    with pytest.raises(ImageError, match=message):
        Fat(Bytes(image)).read_file(r"\EFI\BOOT\BOOTX64.EFI")


def test_fat_truncated_volume_is_refused(tmp_path) -> None:
    image = _fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": b"\x22" * 40000}, 131072)
    with pytest.raises(ImageError, match="larger than its partition"):
        Fat(Bytes(image[:1 << 20]))
    with pytest.raises(ImageError, match="no FAT file system"):
        Fat(Bytes(bytes(4096)))


def test_boot_file_is_found_through_gpt_and_reads_only_what_it_needs(tmp_path) -> None:
    esp = _fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": b"\x33" * 50000}, 129023 - 2048 + 1)
    disk = Bytes(_gpt_disk_from_log(esp))
    gpt, fat, data = read_boot_file(disk)
    assert data == b"\x33" * 50000
    assert disk.read_total < 200_000  # of a 64 MiB disk: tables, directories, the file
    assert isinstance(Slice(disk, 0, 10).read(5, 100), bytes)


# --- PE -------------------------------------------------------------------------------

def _pe(sections: list[tuple[str, int, bytes]], cert: bytes = b"", trailer: bytes = b"",
        cert_entry: tuple[int, int] | None = None) -> bytes:
    """A minimal PE32+: MZ, PE header, optional header with 16 directories, SECTIONS (name, offset, data)."""
    opt_size = 112 + 16 * 8
    headers = 0x200
    out = bytearray(headers)
    out[:2] = b"MZ"
    struct.pack_into("<I", out, 0x3C, 0x40)
    out[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", out, 0x44, 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    opt = 0x58
    struct.pack_into("<H", out, opt, 0x20B)
    struct.pack_into("<I", out, opt + 60, headers)  # SizeOfHeaders
    struct.pack_into("<I", out, opt + 64, 0x12345678)  # CheckSum: excluded from the hash
    struct.pack_into("<I", out, opt + 108, 16)
    body = bytearray()
    for i, (name, offset, data) in enumerate(sections):
        struct.pack_into("<8sIIII", out, opt + opt_size + 40 * i, name.encode(), len(data), 0x1000 * (i + 1),
                         len(data), offset)
        end = offset - headers + len(data)
        if len(body) < end:
            body.extend(bytes(end - len(body)))
        body[offset - headers:end] = data
    image = bytes(out) + bytes(body) + trailer
    if cert or cert_entry:
        off, size = cert_entry or (len(image), len(cert))
        image = bytearray(image + cert)
        struct.pack_into("<II", image, opt + 112 + 32, off, size)
        image = bytes(image)
    return image


def _authenticode_by_hand(image: bytes, cert_size: int) -> str:
    """Headers without CheckSum (opt+64) and the Certificate Table entry (opt+144), everything up to the table."""
    opt = 0x58
    end = len(image) - cert_size
    return hashlib.sha256(image[:opt + 64] + image[opt + 68:opt + 144] + image[opt + 152:end]).hexdigest()


def test_authenticode_skips_checksum_and_certificate_entry_and_table() -> None:
    plain = _pe([(".text", 0x200, b"A" * 0x200), (".data", 0x400, b"B" * 0x100)], trailer=b"T" * 8)
    signed = _pe([(".text", 0x200, b"A" * 0x200), (".data", 0x400, b"B" * 0x100)], trailer=b"T" * 8,
                 cert=b"\x08\x01\0\0" + b"S" * 0x104)
    a, b = parse_pe(plain), parse_pe(signed)
    assert a.authenticode_sha256() == b.authenticode_sha256() == _authenticode_by_hand(plain, 0)
    changed = bytearray(signed)
    struct.pack_into("<I", changed, 0x58 + 64, 1)  # another CheckSum: same hash
    assert parse_pe(bytes(changed)).authenticode_sha256() == a.authenticode_sha256()
    assert parse_pe(plain).section_data(".data") == b"B" * 0x100


def test_sections_are_hashed_in_file_offset_order() -> None:
    one = _pe([(".b", 0x400, b"B" * 0x100), (".a", 0x200, b"A" * 0x200)])
    assert parse_pe(one).authenticode_sha256() == _authenticode_by_hand(one, 0)


@pytest.mark.parametrize("image, message", [
    (_pe([(".a", 0x200, b"A" * 0x200), (".b", 0x300, b"B" * 0x100)]), "overlap"),
    (_pe([(".a", 0x200, b"A" * 0x200)], cert=b"C" * 16, cert_entry=(0x300, 0x100)), "certificate table"),
    (_pe([(".a", 0x200, b"A" * 0x200)], cert=b"C" * 16, cert_entry=(0x210, 0x10)), "certificate table"),
    (_pe([(".a", 0x200, b"A" * 0x200)])[:0x300], "outside the file"),
    (b"MZ" + bytes(100), "no PE signature"),
    (b"\x7fELF" + bytes(100), "not a PE image"),
])
def test_pe_refusals(image, message) -> None:
    with pytest.raises(ImageError, match=message):
        parse_pe(image, "test.efi")


def test_authenticode_agrees_with_osslsigncode_on_a_signed_kernel() -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    require(bool(kernels) and shutil.which("osslsigncode") is not None,
            "a signed kernel in /boot and osslsigncode (Debian package osslsigncode)")
    data = kernels[-1].read_bytes()
    out = subprocess.run(["osslsigncode", "verify", "-in", str(kernels[-1])], capture_output=True, text=True).stdout
    calculated = [line.split(":")[1].strip().lower() for line in out.splitlines() if "Calculated message digest" in line]
    require(bool(calculated), f"{kernels[-1]} is not signed")
    assert parse_pe(data).authenticode_sha256() == calculated[0]


# --- PCRs against the real logs -------------------------------------------------------

def _uki(cmdline: bytes, linux: bytes, initrd: bytes, osrel: bytes = b"ID=x\n") -> bytes:
    return _pe([(".osrel", 0x200, osrel), (".cmdline", 0x400, cmdline), (".linux", 0x600, linux),
                (".initrd", 0x600 + len(linux), initrd)])


def test_pcr5_is_the_logged_pcr5(tmp_path) -> None:
    kernel = _pe([(".text", 0x200, b"K" * 0x200)])
    gpt = parse_gpt(Bytes(_gpt_disk_from_log()))
    p = predict_uefi_disk(gpt, _uki(GUEST_CMDLINE.encode(), kernel, b"initrd"))
    ours = [(e.type_name, e.digest) for e in p.events if e.pcr == 5]
    assert ours == _logged("uefi-crb", 5) == _logged("uefi-tis", 5)
    assert replay(e for e in p.events if e.pcr == 5)[5] == _pcrs("uefi-crb")[5]


def test_pcr4_events_match_the_log_in_type_order_and_fixed_digests() -> None:
    kernel = _pe([(".text", 0x200, b"K" * 0x200)])
    uki = _uki(GUEST_CMDLINE.encode(), kernel, b"initrd")
    p = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())), uki)
    ours = [(e.type_name, e.digest) for e in p.events if e.pcr == 4]
    logged = _logged("uefi-crb", 4)
    assert [t for t, _ in ours] == [t for t, _ in logged]
    assert ours[:2] == logged[:2]  # the boot option action and the separator
    assert ours[2][1] == parse_pe(uki).authenticode_sha256()
    assert ours[3][1] == parse_pe(kernel).authenticode_sha256()
    assert {4, 5, 8, 9, 11, 12, 13, 14} <= p.covered
    assert replay(e for e in p.events if e.pcr == 8).get(8) is None  # nothing, as the log: PCR 8 stays zero
    assert _pcrs("uefi-crb")[8] == "00" * 32


def test_under_secure_boot_pcr4_holds_the_uki_alone_as_the_log() -> None:
    """systemd-stub loads .linux under its own security override, which skips the firmware's measurement."""
    kernel = _pe([(".text", 0x200, b"K" * 0x200)])
    uki = _uki(GUEST_CMDLINE.encode(), kernel, b"initrd")
    p = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())), uki, secure_boot=True)
    ours = [(e.type_name, e.digest) for e in p.events if e.pcr == 4]
    logged = _logged("uefi-secureboot", 4)
    assert [t for t, _ in ours] == [t for t, _ in logged]
    assert ours[:2] == logged[:2] and ours[2][1] == parse_pe(uki).authenticode_sha256()
    # The rest of the disk side does not depend on it.
    plain = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())), uki)
    assert [e for e in p.events if e.pcr != 4] == [e for e in plain.events if e.pcr != 4]


def test_pcr9_load_options_and_initrd_as_linux_measures_them() -> None:
    logged = _logged("uefi-crb", 9)
    initrd_digest = logged[1][1]
    p = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())),
                          _uki(GUEST_CMDLINE.encode(), _pe([(".text", 0x200, b"K" * 0x200)]), b"some initrd"))
    ours = [(e.type_name, e.digest) for e in p.events if e.pcr == 9]
    assert ours[0] == logged[0]  # LoadOptions: the .cmdline as UTF-16 with its NUL
    assert ours[1][0] == logged[1][0] and ours[1][1] == hashlib.sha256(b"some initrd").hexdigest()
    # the initrd Linux measures is the .initrd section systemd-stub measured into PCR 11
    assert initrd_digest == _logged("uefi-crb", 11)[7][1]


def test_pcr11_section_names_order_and_cmdline_as_systemd_stub_252() -> None:
    logged = _logged("uefi-crb", 11)
    events = stub_pcr11({".initrd": b"i", ".cmdline": GUEST_CMDLINE.encode(), ".linux": b"l", ".osrel": b"o",
                         ".pcrsig": b"never measured"})
    ours = [(e.type_name, e.digest) for e in events]
    assert len(ours) == len(logged) == 8
    assert [o[1] for o in ours[0::2]] == [g[1] for g in logged[0::2]]  # the names with their NUL, in order
    assert ours[5] == logged[5]  # the .cmdline bytes
    assert all(t == "EV_IPL" for t, _ in ours)


def test_mangle_stub_cmdline() -> None:
    assert mangle_stub_cmdline("a\nb  \n") == "a b"
    assert ovmf_load_options("x", True) == "x initrd=initrd\0".encode("utf-16-le")


def test_seabios_direct_is_the_logged_pcrs_0_3_to_9() -> None:
    p = predict_seabios_direct()
    pcrs = _pcrs("seabios-direct")
    replayed = replay(p.events)
    assert {1, 2} == dict(p.not_predicted).keys() and not {1, 2} & p.covered
    for pcr in (0, 3, 4, 5, 6, 7):
        assert [(e.type_name, e.digest) for e in p.events if e.pcr == pcr] == _logged("seabios-direct", pcr)
        assert replayed[pcr] == pcrs[pcr]
    assert pcrs[8] == pcrs[9] == "00" * 32 and 8 not in replayed and 9 not in replayed


def _bzimage(pe: bytes, protocol: int = 0x20F, xlf: int = 0x7F, initrd_addr_max: int = 0x7FFFFFFF) -> bytes:
    """A PE that is also a bzImage: the setup header fields QEMU reads, inside its headers."""
    k = bytearray(pe)
    k[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", k, 0x206, protocol)
    k[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", k, 0x22C, initrd_addr_max)
    struct.pack_into("<H", k, 0x236, xlf)
    return bytes(k)


def test_uefi_direct_boot_is_the_logged_order_and_fixed_digests() -> None:
    """tests/data/eventlogs/ovmf-direct.bin: the test guest's kernel, initrd and cmdline under OVMF, 512 MiB."""
    kernel = _bzimage(_pe([(".text", 0x200, b"K" * 0x200)]))
    p = predict_uefi_direct(kernel, b"initrd", GUEST_CMDLINE, 512 << 20)
    for pcr in (4, 5, 9):
        ours = [(e.type_name, e.digest) for e in p.events if e.pcr == pcr]
        logged = _logged("ovmf-direct", pcr)
        assert [t for t, _ in ours] == [t for t, _ in logged], pcr
        if pcr == 5:
            assert ours == logged
    assert [e.digest for e in p.events if e.pcr == 4][1:] == [d for _, d in _logged("ovmf-direct", 4)][1:]
    assert [e.digest for e in p.events if e.pcr == 9][0] == _logged("ovmf-direct", 9)[0][1]


def test_qemu_patches_the_setup_header_as_x86_load_linux() -> None:
    kernel = _bzimage(_pe([(".text", 0x200, b"K" * 0x200)]))
    patched = qemu_patched_kernel(kernel, 4570690, "console=ttyS0 vga=ask", 512 << 20)
    assert patched[0x210] == 0xB0 and patched[0x211] == 0x81
    assert struct.unpack_from("<H", patched, 0x224)[0] == 0xFE00  # heap end: cmdline 0x20000 - setup 0x10000 - 0x200
    assert struct.unpack_from("<I", patched, 0x228)[0] == 0x20000
    # 512 MiB below 4 GiB, less QEMU's 0x28000 of ACPI data, the initrd page-aligned under that
    assert struct.unpack_from("<II", patched, 0x218) == (((512 << 20) - 0x28000 - 1 - 4570690) & ~4095, 4570690)
    assert struct.unpack_from("<H", patched, 0x1FA)[0] == 0xFFFD
    assert patched != qemu_patched_kernel(kernel, 4570690, "console=ttyS0", 1024 << 20)  # memory moves the initrd
    no_initrd = qemu_patched_kernel(kernel, None, "", 512 << 20)
    assert no_initrd[0x218:0x220] == kernel[0x218:0x220]  # no initrd: QEMU leaves them as the file has them
    with pytest.raises(ImageError, match="no Linux boot protocol header"):
        qemu_patched_kernel(_pe([(".text", 0x200, b"K" * 0x200)]), None, "", 512 << 20)
    with pytest.raises(ImageError, match="older than 2.02"):
        qemu_patched_kernel(_bzimage(kernel, protocol=0x201), None, "", 512 << 20)


def test_boot_file_that_is_not_a_uki_covers_pcr5_only() -> None:
    p = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())), _pe([(".text", 0x200, b"K" * 0x200)]))
    assert p.covered == {5}
    assert 4 in dict(p.not_predicted)


# --- `tvorch predict` on bad input: one line, exit 4 (image refused), nothing written ---

def _disk_with(tmp_path: Path, boot: bytes | None, damage=None) -> Path:
    files = {"EFI/BOOT/BOOTX64.EFI": boot} if boot is not None else {"EFI/OTHER.EFI": b"x"}
    esp = _fat_image(tmp_path, files, 129023 - 2048 + 1)
    if damage:
        esp = damage(esp)
    path = tmp_path / "disk.raw"
    path.write_bytes(_gpt_disk_from_log(esp))
    return path


def _cut(path: Path, size: int) -> Path:
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def _loop(esp: bytes) -> bytes:
    fat = Fat(Bytes(esp))
    first = _first_cluster(fat, esp)
    return _set_fat16(esp, fat, fat._next(first), first)


def _uki_ok() -> bytes:
    return _uki(b"console=ttyS0", _pe([(".text", 0x200, b"K" * 0x200)]), b"initrd")


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "mbr.raw").write_bytes(bytes(510) + b"\x55\xaa" + bytes(1 << 20)) and t / "mbr.raw",
     "the disk has no GPT"),
    (lambda t: _disk_with(t, None), r"EFI system partition has no directory \\EFI\\BOOT$"),
    (lambda t: _disk_with(t, _uki_ok(), _loop), "loops back to cluster"),
    (lambda t: _disk_with(t, _uki_ok(), lambda e: e[:32] + struct.pack("<I", 200000) + e[36:]),
     r"FAT file system \(102400000 bytes\) is larger than its partition"),
    (lambda t: _cut(_disk_with(t, _uki_ok()), 40 << 20), r"EFI system partition ends at byte \d+, past the disk's"),
    (lambda t: _disk_with(t, _pe([(".a", 0x200, b"A" * 0x200), (".b", 0x300, b"B" * 0x100)])), "overlap"),
    (lambda t: _disk_with(t, _pe([(".a", 0x200, b"A" * 0x200)], cert=b"C" * 16, cert_entry=(0x300, 0x100))),
     "certificate table"),
])
def test_predict_refuses_bad_images_in_one_line(tmp_path, monkeypatch, capsys, make, message) -> None:
    from tvorch.cli import main

    config = tmp_path / "tvorch.toml"
    config.write_text("")
    monkeypatch.setenv("TVORCH_CONFIG", str(config))
    image = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["predict", str(image)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.count("\n") == 1 and err.startswith("tvorch: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_predict_without_esp_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from tvorch.cli import main

    config = tmp_path / "tvorch.toml"
    config.write_text("")
    monkeypatch.setenv("TVORCH_CONFIG", str(config))
    disk = bytearray(_disk_with(tmp_path, _uki_ok()).read_bytes())
    disk[1024:1040] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")
    _fix_gpt_crcs(disk)
    (tmp_path / "noesp.raw").write_bytes(bytes(disk))
    assert main(["predict", str(tmp_path / "noesp.raw")]) == 4
    assert capsys.readouterr().err == "tvorch: error: the disk's GPT has no EFI system partition\n"


def test_stub_dropins_leave_pcrs_9_12_13_unpredicted(tmp_path) -> None:
    from tvorch.service.predict import _stub_dropins

    plain = Fat(Bytes(_fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": b"x"}, 131072)))
    assert not _stub_dropins(plain, r"\EFI\BOOT\BOOTX64.EFI")
    with_creds = Fat(Bytes(_fat_image(tmp_path, {"EFI/BOOT/BOOTX64.EFI": b"x",
                                                 "EFI/BOOT/BOOTX64.EFI.extra.d/a.cred": b"secret"}, 131072)))
    assert _stub_dropins(with_creds, r"\EFI\BOOT\BOOTX64.EFI")
    p = predict_uefi_disk(parse_gpt(Bytes(_gpt_disk_from_log())), _uki_ok(), stub_dropins=True)
    assert {9, 12, 13} <= dict(p.not_predicted).keys() and not {9, 12, 13} & p.covered


# --- hostile bytes: only ImageError, never another exception (launch predicts from untrusted disks) ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ_PE = _pe([(".osrel", 0x200, b"ID=x\n"), (".linux", 0x400, b"L" * 0x200)], cert=b"\x10\0\0\0\0\x02\x02\0" + b"S" * 8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_PE) - 1), st.integers(0, 255)), max_size=8))
def test_pe_mutations_are_parsed_or_refused(flips) -> None:
    data = bytearray(_FUZZ_PE)
    for at, value in flips:
        data[at] = value
    try:
        image = parse_pe(bytes(data))
        image.authenticode_sha256()
        image.section_data(".linux")
    except ImageError:
        pass


_FUZZ_GPT = _gpt_disk_from_log()[:34 * 512]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(512, 2 * 512 + 255), st.integers(0, 255)), max_size=6), st.booleans())
def test_gpt_mutations_are_parsed_or_refused(flips, fix_crc) -> None:
    data = bytearray(_FUZZ_GPT)
    for at, value in flips:
        data[at] = value
    if fix_crc:  # so that the fields behind the CRCs are reached
        _fix_gpt_crcs(data)
    try:
        parse_gpt(Bytes(bytes(data))).esp()
    except ImageError:
        pass


@pytest.fixture(scope="module")
def small_fat(tmp_path_factory) -> bytes:
    return _fat_image(tmp_path_factory.mktemp("fuzzfat"), {"EFI/BOOT/BOOTX64.EFI": b"\x44" * 9000}, 4096)


def test_fat_mutations_are_parsed_or_refused(small_fat) -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 64 * 512), st.integers(0, 255)), min_size=1, max_size=6))
    def run(flips) -> None:
        data = bytearray(small_fat)
        for at, value in flips:
            data[at] = value
        try:
            Fat(Bytes(bytes(data))).read_file(r"\EFI\BOOT\BOOTX64.EFI")
        except ImageError:
            pass

    run()


def test_sizes_a_hostile_image_claims_are_bounded() -> None:
    image = bytearray(_pe([(".linux", 0x200, b"L" * 0x200)]))
    struct.pack_into("<I", image, 0x58 + 112 + 16 * 8 + 8, 0xFFFFFFFF)  # .linux VirtualSize: 4 GiB of zero fill
    with pytest.raises(ImageError, match="claims 4294967295 bytes in memory"):
        parse_pe(bytes(image))
    disk = bytearray(_gpt_disk_from_log())
    struct.pack_into("<I", disk, 512 + 84, 1 << 20)  # partition entries of 1 MiB each
    _fix_gpt_crcs(disk)
    with pytest.raises(ImageError, match="is not valid"):
        parse_gpt(Bytes(bytes(disk)))
