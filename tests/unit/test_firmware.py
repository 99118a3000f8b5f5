"""Firmware descriptors and libvirt 9.0's choice among them, on real descriptor bytes.

tests/data/firmware/ holds Debian 12's descriptors (package ovmf 2022.11)
as shipped; the libvirt agreement itself is checked in
tests/integration/test_firmware_resolution.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tvorch.adapters import firmware_files
from tvorch.adapters.firmware_files import (
    descriptor_paths,
    expand_machine,
    find_seabios,
    load_descriptors,
    qemu_data_dirs,
    resolve_firmware_images,
    resolve_uefi,
)
from tvorch.core.launch.firmware import (
    FileMapping,
    FirmwareRequest,
    FirmwareTarget,
    FlashFile,
    FlashMapping,
    ResolvedFirmware,
    descriptor_matches,
    machine_glob_matches,
    parse_descriptor,
    select_firmware,
)
from tvorch.core.launch.spec import FirmwareImages
from tvorch.errors import HostError

DATA = Path(__file__).resolve().parent.parent / "data" / "firmware"
ENROLLED = "40-edk2-x86_64-secure-enrolled.json"
SECURE = "50-edk2-x86_64-secure.json"
PLAIN = "60-edk2-x86_64.json"
Q35 = "pc-q35-7.2"


def _real(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _descriptor(name: str):
    return parse_descriptor(_real(name), name)


def _debian() -> list:
    return [_descriptor(name) for name in (ENROLLED, SECURE, PLAIN)]


def _request(secure_boot: bool | None, enrolled_keys: bool | None, machine: str = Q35) -> FirmwareRequest:
    return FirmwareRequest(machine=machine, secure_boot=secure_boot, enrolled_keys=enrolled_keys)


def _doc(**changes: object) -> dict:
    doc = json.loads(_real(PLAIN))
    doc.update(changes)
    return doc


def _bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()


# --- parsing -------------------------------------------------------------------


def test_parses_a_real_descriptor_completely() -> None:
    descriptor = _descriptor(ENROLLED)
    assert descriptor.path == ENROLLED
    assert descriptor.description.startswith("UEFI firmware for x86_64, with Secure Boot and SMM")
    assert descriptor.interface_types == ("uefi",)
    assert descriptor.mapping == FlashMapping(
        executable=FlashFile("/usr/share/OVMF/OVMF_CODE_4M.ms.fd", "raw"),
        nvram_template=FlashFile("/usr/share/OVMF/OVMF_VARS_4M.ms.fd", "raw"),
    )
    assert descriptor.targets == (FirmwareTarget("x86_64", ("pc-q35-*",)),)
    assert descriptor.features == (
        "acpi-s3",
        "amd-sev",
        "enrolled-keys",
        "requires-smm",
        "secure-boot",
        "verbose-dynamic",
    )
    assert descriptor.requires_smm
    assert not _descriptor(PLAIN).requires_smm
    assert _descriptor(PLAIN).targets[0].machines == ("pc-i440fx-*", "pc-q35-*")


def test_parses_memory_mapping_and_missing_description() -> None:
    doc = _doc(mapping={"device": "memory", "filename": "/usr/share/seabios/bios-256k.bin"}, **{"interface-types": ["bios"]})
    del doc["description"]
    descriptor = parse_descriptor(_bytes(doc), "bios.json")
    assert descriptor.mapping == FileMapping(device="memory", filename="/usr/share/seabios/bios-256k.bin")
    assert descriptor.description == ""


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (_bytes(_doc(**{"interface-types": ["uefi", "efi"]})), "unknown interface type 'efi'"),
        (_bytes(_doc(**{"interface-types": "uefi"})), "'interface-types' is missing or not a JSON array"),
        (_bytes(_doc(mapping={"device": "cdrom"})), "unknown mapping device 'cdrom'"),
        (
            _bytes(_doc(mapping={"device": "flash", "executable": {"filename": "/x.fd", "format": "raw"}})),
            "'nvram-template' is missing",
        ),
        (
            _bytes(_doc(mapping={"device": "flash", "executable": {"filename": "/x.fd"}, "nvram-template": {}})),
            "'format' is missing",
        ),
        (_bytes(_doc(targets=["x86_64"])), "a target is not a JSON object"),
        (_bytes(_doc(targets=[{"architecture": "x86_64"}])), "'machines' is missing"),
        (_bytes(_doc(features=["secure-boot", 1])), "'features' must hold only strings"),
        (_bytes(_doc(description=7)), "'description' is not a JSON string"),
        (b" " * (1024 * 1024 + 1), "larger than 1048576 bytes"),
    ],
)
def test_refuses_malformed_descriptors_in_one_line(data: bytes, complaint: str) -> None:
    with pytest.raises(HostError) as caught:
        parse_descriptor(data, "/etc/qemu/firmware/99-bad.json")
    message = str(caught.value)
    assert message.startswith("firmware descriptor /etc/qemu/firmware/99-bad.json: ")
    assert complaint in message
    assert "\n" not in message


# --- matching ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "machine", "matches"),
    [
        ("pc-q35-*", "pc-q35-7.2", True),
        ("pc-q35-*", "q35", False),  # globs are matched against the expanded name
        ("pc-q35-*", "pc-i440fx-7.2", False),
        ("pc-q35-?.2", "pc-q35-7.2", True),
        ("pc-q35-?.2", "pc-q35-10.2", False),
        ("pc-q35-[7].2", "pc-q35-7.2", False),  # no character classes in GLib's simple patterns
        ("pc-q35-[7].2", "pc-q35-[7].2", True),
        ("*", "anything", True),
    ],
)
def test_machine_globs_are_glib_simple_patterns(pattern: str, machine: str, matches: bool) -> None:
    assert machine_glob_matches(pattern, machine) is matches


@pytest.mark.parametrize(
    ("secure_boot", "enrolled_keys", "chosen"),
    [
        (False, False, PLAIN),
        (True, True, ENROLLED),
        (True, False, SECURE),
        (None, None, ENROLLED),  # nothing asked: the first one in order
        (None, False, SECURE),
        (False, None, PLAIN),
    ],
)
def test_features_select_like_libvirt(secure_boot: bool | None, enrolled_keys: bool | None, chosen: str) -> None:
    assert select_firmware(_debian(), _request(secure_boot, enrolled_keys)).descriptor == chosen


def test_selection_names_code_and_vars_template() -> None:
    assert select_firmware(_debian(), _request(True, False)) == ResolvedFirmware(
        kind="uefi",
        code="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        vars_template="/usr/share/OVMF/OVMF_VARS_4M.fd",
        descriptor=SECURE,
    )


def test_first_match_in_the_given_order_wins() -> None:
    assert select_firmware(list(reversed(_debian())), _request(None, None)).descriptor == PLAIN


def test_requires_smm_does_not_decide_a_match() -> None:
    without_smm = json.loads(_real(SECURE))
    without_smm["features"].remove("requires-smm")
    descriptor = parse_descriptor(_bytes(without_smm), SECURE)
    assert descriptor_matches(descriptor, _request(True, False))


def test_unknown_features_are_ignored() -> None:
    descriptor = parse_descriptor(_bytes(_doc(features=["acpi-s3", "some-future-feature"])), PLAIN)
    assert descriptor_matches(descriptor, _request(False, False))


@pytest.mark.parametrize(
    "request_",
    [
        _request(False, True),  # keys without Secure Boot: no such build
        _request(False, False, machine="q35"),  # the unexpanded alias matches no glob
        _request(False, False, machine="microvm"),
        FirmwareRequest(machine=Q35, secure_boot=False, enrolled_keys=False, architecture="aarch64"),
        FirmwareRequest(machine=Q35, secure_boot=False, enrolled_keys=False, interface="bios"),
    ],
)
def test_no_match_is_a_host_error_naming_the_request(request_: FirmwareRequest) -> None:
    with pytest.raises(HostError) as caught:
        select_firmware(_debian(), request_)
    assert str(caught.value).startswith(f"no firmware descriptor offers {request_.interface} firmware")
    assert request_.machine in str(caught.value)


def test_a_chosen_descriptor_tvorch_cannot_measure_is_refused_not_skipped() -> None:
    memory = parse_descriptor(
        _bytes(_doc(mapping={"device": "memory", "filename": "/usr/share/qemu/OVMF.fd"})), "10-memory.json"
    )
    with pytest.raises(HostError, match="10-memory.json: maps uefi firmware .* as 'memory', not pflash"):
        select_firmware([memory, *_debian()], _request(False, False))
    qcow2 = _doc()
    qcow2["mapping"]["executable"]["format"] = "qcow2"
    with pytest.raises(HostError, match="OVMF_CODE_4M.fd has format 'qcow2', not raw"):
        select_firmware([parse_descriptor(_bytes(qcow2), PLAIN)], _request(False, False))


# --- descriptor directories ------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An /etc/qemu/firmware and a /usr/share/qemu/firmware, the latter holding Debian's files."""
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    for name in (ENROLLED, SECURE, PLAIN):
        (usr / name).write_bytes(_real(name))
    return etc, usr


def _names(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def test_descriptor_order_is_by_file_name_across_directories(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    (etc / "55-local.json").write_bytes(_real(PLAIN))
    (etc / "70-local.json").write_bytes(_real(PLAIN))
    assert _names(descriptor_paths((etc, usr))) == [
        f"usr/{ENROLLED}",
        f"usr/{SECURE}",
        "etc/55-local.json",
        f"usr/{PLAIN}",
        "etc/70-local.json",
    ]


def test_same_name_in_etc_overrides_and_empty_file_disables(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    (etc / ENROLLED).write_text("")
    replacement = _doc()
    replacement["mapping"]["executable"]["filename"] = "/srv/ovmf/LOCAL_CODE.fd"
    (etc / PLAIN).write_bytes(_bytes(replacement))
    assert _names(descriptor_paths((etc, usr))) == [f"usr/{SECURE}", f"etc/{PLAIN}"]
    descriptors = load_descriptors((etc, usr))
    assert [d.path for d in descriptors] == [str(usr / SECURE), str(etc / PLAIN)]
    assert select_firmware(descriptors, _request(False, False)).code == "/srv/ovmf/LOCAL_CODE.fd"
    with pytest.raises(HostError, match="no firmware descriptor offers"):
        select_firmware(descriptors, _request(True, True))


def test_an_empty_file_without_override_is_skipped(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    (usr / "10-empty.json").write_text("")
    assert "usr/10-empty.json" not in _names(descriptor_paths((etc, usr)))


def test_dot_files_directories_and_missing_dirs_are_skipped_symlinks_followed(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    etc, usr = dirs
    (etc / ".10-hidden.json").write_bytes(_real(PLAIN))
    (etc / "20-dir.json").mkdir()
    (etc / "30-link.json").symlink_to(usr / PLAIN)
    paths = descriptor_paths((tmp_path / "absent", etc, usr))
    assert _names(paths) == ["etc/30-link.json", f"usr/{ENROLLED}", f"usr/{SECURE}", f"usr/{PLAIN}"]


def test_a_dangling_descriptor_symlink_is_refused(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    (etc / "10-dangling.json").symlink_to(etc / "nowhere.json")
    with pytest.raises(HostError, match="cannot access firmware descriptor .*10-dangling.json"):
        descriptor_paths((etc, usr))


def test_a_broken_descriptor_is_refused_even_if_a_later_one_would_match(dirs: tuple[Path, Path]) -> None:
    etc, usr = dirs
    (etc / "99-broken.json").write_text("{")
    with pytest.raises(HostError, match="99-broken.json: not valid JSON"):
        load_descriptors((etc, usr))


def _flash_descriptor(code: Path, template: Path) -> bytes:
    doc = _doc()
    doc["mapping"]["executable"]["filename"] = str(code)
    doc["mapping"]["nvram-template"]["filename"] = str(template)
    return _bytes(doc)


def test_resolve_uefi_checks_the_chosen_files_exist(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    (etc / "60-local.json").write_bytes(_flash_descriptor(code, template))
    with pytest.raises(HostError, match=f"firmware code \\(from {etc}/60-local.json\\) {code} does not exist"):
        resolve_uefi(_request(False, False), (etc,))
    code.write_bytes(b"code")
    with pytest.raises(HostError, match=f"firmware vars template .* {template} does not exist"):
        resolve_uefi(_request(False, False), (etc,))
    template.write_bytes(b"vars")
    assert resolve_uefi(_request(False, False), (etc,)) == ResolvedFirmware(
        "uefi", str(code), str(template), str(etc / "60-local.json")
    )


# --- explicit profiles, SeaBIOS, QEMU's answers ----------------------------------------


def test_explicit_profile_bypasses_selection(tmp_path: Path) -> None:
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"c")
    template.write_bytes(b"v")
    images = FirmwareImages(code=str(code), vars_template=str(template), secure_boot=True)
    assert resolve_firmware_images(images) == ResolvedFirmware("uefi", str(code), str(template), None)
    template.unlink()
    with pytest.raises(HostError, match=f"firmware profile vars template {template} does not exist"):
        resolve_firmware_images(images)


def test_seabios_is_found_in_the_first_data_dir_with_symlinks_resolved(tmp_path: Path) -> None:
    qemu, seabios, other = tmp_path / "qemu", tmp_path / "seabios", tmp_path / "other"
    for directory in (qemu, seabios, other):
        directory.mkdir()
    (seabios / "bios-256k.bin").write_bytes(b"seabios")
    (other / "bios-256k.bin").write_bytes(b"other")
    assert find_seabios((qemu, seabios, other)).code == str(seabios / "bios-256k.bin")
    (qemu / "bios-256k.bin").symlink_to(other / "bios-256k.bin")
    assert find_seabios((qemu, seabios)) == ResolvedFirmware("bios", str(other / "bios-256k.bin"), None, None)
    with pytest.raises(HostError, match="BIOS image bios-256k.bin not found in QEMU's data directories"):
        find_seabios((tmp_path / "absent",))


MACHINE_HELP = """\
Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> tuple[Path, Path]:
    """An emulator that answers -machine help / -L help and counts its runs."""
    calls = tmp_path / "calls"
    (tmp_path / "machines.txt").write_text(MACHINE_HELP)
    emulator = tmp_path / "qemu-system-x86_64"
    emulator.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {calls}\n'
        f'if [ "$1" = -machine ]; then cat {tmp_path}/machines.txt; exit 0; fi\n'
        'if [ "$1" = -L ]; then echo /usr/bin/../share/qemu; echo /usr/bin/../share/seabios; exit 0; fi\n'
        "exit 1\n"
    )
    emulator.chmod(emulator.stat().st_mode | stat.S_IXUSR)
    firmware_files._qemu_help_cached.cache_clear()
    return emulator, calls


def test_expand_machine_reads_aliases_once_per_binary(fake_qemu: tuple[Path, Path]) -> None:
    emulator, calls = fake_qemu
    assert expand_machine(str(emulator), "q35") == "pc-q35-7.2"
    assert expand_machine(str(emulator), "pc") == "pc-i440fx-7.2"
    assert expand_machine(str(emulator), "pc-q35-7.2") == "pc-q35-7.2"
    assert expand_machine(str(emulator), "microvm") == "microvm"
    assert calls.read_text() == "-machine\n"
    with pytest.raises(HostError, match="has no machine type 'virt'"):
        expand_machine(str(emulator), "virt")
    # A replaced binary (a QEMU upgrade) is asked again.
    (emulator.parent / "machines.txt").write_text(MACHINE_HELP.replace("7.2", "8.0"))
    stat_before = emulator.stat()
    os.utime(emulator, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1_000_000_000))
    assert expand_machine(str(emulator), "q35") == "pc-q35-8.0"
    assert calls.read_text() == "-machine\n-machine\n"


def test_qemu_data_dirs_in_qemus_order(fake_qemu: tuple[Path, Path]) -> None:
    emulator, _ = fake_qemu
    assert qemu_data_dirs(str(emulator)) == (Path("/usr/bin/../share/qemu"), Path("/usr/bin/../share/seabios"))


def test_an_unusable_emulator_is_a_host_error(tmp_path: Path, fake_qemu: tuple[Path, Path]) -> None:
    with pytest.raises(HostError, match="emulator .*/nothing is not usable"):
        expand_machine(str(tmp_path / "nothing"), "q35")
    emulator, _ = fake_qemu
    emulator.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    with pytest.raises(HostError, match="-machine help exited 3: broken"):
        expand_machine(str(emulator), "q35")
