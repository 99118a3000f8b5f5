"""UEFI event log parsing and replay, checked against logs and PCRs captured from the test guest.

tests/data/eventlogs/README.txt says how the logs were captured. The guest's
own PCRs are the ground truth for replay; tpm2_eventlog (tpm2-tools) is an
independent second opinion on every PCR of every bank. Synthetic logs cover
what the captures do not (several banks, StartupLocality, the SHA-1 format,
every kind of framing fault).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.components import require
from tvorch.cli import main
from tvorch.core.attestation.eventlog import (
    EVENT_TYPES,
    SPEC_ID_SIGNATURE,
    EventLog,
    parse_event_log,
    replay,
)
from tvorch.errors import EvidenceError, ExitCode, InputError

DATA = Path(__file__).resolve().parent.parent / "data" / "eventlogs"
LOGS = sorted(DATA.glob("*.bin"))
UEFI_LOGS = [p for p in LOGS if p.name.startswith("uefi-")]  # OVMF booting the UKI from the GPT disk
OVMF_LOGS = UEFI_LOGS + [p for p in LOGS if p.name.startswith("ovmf-")]  # ... and OVMF direct kernel boot
# Logs captured with the PCRs the guest read beside them.
READ_LOGS = [p for p in LOGS if p.with_name(p.stem + ".pcrs.json").exists()]
SEABIOS_LOG = DATA / "seabios-direct.bin"
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}

EV_NO_ACTION, EV_SEPARATOR, EV_ACTION, EV_S_CRTM_VERSION = 0x3, 0x4, 0x5, 0x8
EV_EFI_VARIABLE_BOOT, EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000002, 0x80000003
EV_EFI_PLATFORM_FIRMWARE_BLOB, EV_EFI_HCRTM_EVENT = 0x80000008, 0x80000010


def guest_pcrs(path: Path) -> dict[int, str]:
    doc = json.loads(path.with_name(path.stem + ".pcrs.json").read_text())
    return {int(k): v for k, v in doc["sha256"].items()}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# --- synthetic logs -----------------------------------------------------------------

def spec_event(algs: list[tuple[int, int]], trailer: bytes = b"") -> bytes:
    """Event 0: a TCG_PCR_EVENT whose data is a Spec ID Event03 declaring ``algs``."""
    spec = (SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
            + b"".join(struct.pack("<HH", a, s) for a, s in algs) + b"\0" + trailer)
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec


def event2(pcr: int, event_type: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
    return (struct.pack("<III", pcr, event_type, len(digests))
            + b"".join(struct.pack("<H", alg) + d for alg, d in digests)
            + struct.pack("<I", len(data)) + data)


def measured(pcr: int, event_type: int, data: bytes, banks: tuple[str, ...] = ("sha256",)) -> bytes:
    """A TCG_PCR_EVENT2 whose digests are those of its data (zeros for EV_NO_ACTION)."""
    digests = [(ALG_IDS[b], bytes(hashlib.new(b).digest_size) if event_type == EV_NO_ACTION
                else hashlib.new(b, data).digest()) for b in banks]
    return event2(pcr, event_type, digests, data)


def agile_log(*events: bytes, banks: tuple[str, ...] = ("sha256",)) -> bytes:
    return spec_event([(ALG_IDS[b], hashlib.new(b).digest_size) for b in banks]) + b"".join(events)


def extend_all(bank: str, start: bytes, datas: list[bytes]) -> str:
    value = start
    for data in datas:
        value = hashlib.new(bank, value + hashlib.new(bank, data).digest()).digest()
    return value.hex()


def startup_locality(locality: int, banks: tuple[str, ...] = ("sha256",)) -> bytes:
    return measured(0, EV_NO_ACTION, b"StartupLocality\0" + bytes([locality]), banks)


def variable_data(name: str, value: bytes) -> bytes:
    guid = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")  # EFI global variable GUID, as stored
    return guid + struct.pack("<QQ", len(name), len(value)) + name.encode("utf-16-le") + value


def image_load_data(path: bytes) -> bytes:
    return struct.pack("<QQQQ", 0x1000, 0x2000, 0, len(path)) + path


def file_node(text: str) -> bytes:
    body = (text + "\0").encode("utf-16-le")
    return struct.pack("<BBH", 4, 4, 4 + len(body)) + body


END_NODE = struct.pack("<BBH", 0x7F, 0xFF, 4)


def refused(raw: bytes, *words: str) -> str:
    with pytest.raises(EvidenceError) as info:
        parse_event_log(raw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# --- the captured logs --------------------------------------------------------------

def test_the_captures_are_all_here():
    assert ids(LOGS) == ["ovmf-direct", "seabios-direct", "uefi-crb", "uefi-secureboot", "uefi-tis"]
    assert ids(READ_LOGS) == ["seabios-direct", "uefi-crb", "uefi-secureboot", "uefi-tis"]


@pytest.mark.parametrize("path", READ_LOGS, ids=ids(READ_LOGS))
def test_replay_equals_the_pcrs_the_guest_read(path):
    log = parse_event_log(path.read_bytes())
    guest = guest_pcrs(path)
    touched = replay(log)
    expected_touched = [0, 1, 2, 3, 4, 5, 6, 7] + ([9, 11] if path in UEFI_LOGS else [])
    assert sorted(touched) == expected_touched
    for pcr, value in touched.items():
        if pcr in guest:  # the guest reports PCRs 0-9; PCR 11 is checked by tpm2_eventlog below
            assert value == guest[pcr], f"PCR {pcr}"
    # PCRs the log never extends (8, and 9 for SeaBIOS) replay to their reset value, as read.
    assert replay(log, pcrs=guest) == guest


@pytest.mark.parametrize("path", LOGS, ids=ids(LOGS))
def test_spec_id_event_and_separators(path):
    log = parse_event_log(path.read_bytes())
    assert dict(log.spec_algorithms) == {"sha256": 32}
    header = log.events[0]
    assert header.type_name == "EV_NO_ACTION" and header.decoded is not None
    assert header.decoded["signature"] == "Spec ID Event03"
    assert header.decoded["spec_version"] == "2.0"
    assert [a["name"] for a in header.decoded["algorithms"]] == ["sha256"]
    separators = [e for e in log.events if e.type_name == "EV_SEPARATOR"]
    assert sorted(e.pcr for e in separators) == list(range(8))
    firmware_value = 0 if path in OVMF_LOGS else 0xFFFFFFFF  # SeaBIOS keeps the TPM 1.2 BIOS value
    assert {e.decoded["value"] for e in separators} == {firmware_value}
    assert [e.index for e in log.events] == list(range(len(log.events)))
    assert not [e.index for e in log.events if e.decoded is None or "decode_error" in e.decoded]


@pytest.mark.parametrize("path", UEFI_LOGS, ids=ids(UEFI_LOGS))
def test_uefi_events_decode(path):
    log = parse_event_log(path.read_bytes())
    assert len(log.events) == 37
    apps = [e for e in log.events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"]
    uki = apps[0].decoded
    assert uki["file_path"] == "\\EFI\\BOOT\\BOOTX64.EFI"
    assert uki["device_path"] == ("PciRoot(0x0)/Pci(0x1,0x1)/Pci(0x0,0x0)/"
                                  "HD(1,GPT,54564f52-4348-4755-4553-543030303032,0x800,0x1f000)/\\EFI\\BOOT\\BOOTX64.EFI")
    assert uki["device_path_length"] == len(bytes.fromhex(uki["device_path_hex"])) == 118
    assert apps[0].pcr == 4 and uki["image_length"] > 1_000_000
    variables = {e.decoded["name"]: e for e in log.events if e.type_name.startswith("EV_EFI_VARIABLE")}
    assert {"SecureBoot", "PK", "KEK", "db", "dbx", "BootOrder"} <= set(variables)
    secure_boot = variables["SecureBoot"].decoded
    assert secure_boot["guid"] == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    enabled = b"\1" if path.stem == "uefi-secureboot" else b"\0"
    assert secure_boot["data_length"] == 1 and secure_boot["data_sha256"] == hashlib.sha256(enabled).hexdigest()
    gpt = next(e for e in log.events if e.type_name == "EV_EFI_GPT_EVENT").decoded
    assert gpt["disk_guid"] == "54564f52-4348-4755-4553-543030303031"
    assert [(p["name"], p["first_lba"]) for p in gpt["partitions"]] == [("ESP", 2048)]
    stub = [e.decoded["text"] for e in log.events if e.type_name == "EV_IPL"]
    assert {e.pcr for e in log.events if e.type_name == "EV_IPL"} == {11}
    assert stub == [".linux", ".linux", ".osrel", ".osrel", ".cmdline", ".cmdline", ".initrd", ".initrd"]
    tags = {e.decoded["tag_id"]: e.decoded["text"] for e in log.events if e.type_name == "EV_EVENT_TAG"}
    assert tags == {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "LOADED_IMAGE::LoadOptions"}
    actions = [e.decoded["text"] for e in log.events if e.type_name == "EV_EFI_ACTION"]
    assert actions[-2:] == ["Exit Boot Services Invocation", "Exit Boot Services Returned with Success"]
    blobs = [e.decoded for e in log.events if e.type_name == "EV_EFI_PLATFORM_FIRMWARE_BLOB"]
    assert len(blobs) == 2 and all(b["length"] > 0 for b in blobs)


def test_seabios_events_decode():
    log = parse_event_log(SEABIOS_LOG.read_bytes())
    assert len(log.events) == 14
    assert not [e for e in log.events if e.event_type & 0x80000000]  # no UEFI event types
    actions = [(e.pcr, e.decoded["text"]) for e in log.events if e.type_name == "EV_ACTION"]
    assert actions == [(2, "Start Option ROM Scan"), (4, "Calling INT 19h")]
    tags = [(e.pcr, e.decoded["tag_id"], e.decoded["data_length"]) for e in log.events if e.type_name == "EV_EVENT_TAG"]
    assert tags == [(1, 1, 20), (2, 7, 24), (2, 7, 24)]


# --- tpm2_eventlog agrees -----------------------------------------------------------

def tpm2_eventlog(path: Path) -> tuple[int, dict[str, dict[int, str]]]:
    """Event count and the `pcrs:` section of tpm2_eventlog's YAML, parsed by hand (no PyYAML here)."""
    require(shutil.which("tpm2_eventlog") is not None, "tpm2_eventlog (package tpm2-tools)")
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    count = sum(1 for line in lines if line.startswith("- EventNum:"))
    banks: dict[str, dict[int, str]] = {}
    bank = ""
    for line in lines[lines.index("pcrs:") + 1:]:
        if not line.startswith("  "):
            break
        if not line.startswith("    "):
            bank = line.strip().rstrip(":")
            banks[bank] = {}
        else:
            index, value = line.split(":", 1)
            banks[bank][int(index)] = value.strip().removeprefix("0x").lower()
    return count, banks


def assert_tpm2_eventlog_agrees(path: Path) -> None:
    log = parse_event_log(path.read_bytes())
    # tpm2-tools 5.4 (Debian 12) extends EV_NO_ACTION events after the header and
    # ignores StartupLocality (tpm2-tools issue 3224, PR 3242): only logs without
    # such events can be compared with it.
    assert not [e for e in log.events[1:] if e.type_name == "EV_NO_ACTION"]
    count, theirs = tpm2_eventlog(path)
    assert count == len(log.events)
    assert set(theirs) == set(log.spec_algorithms)
    for bank in log.spec_algorithms:
        assert replay(log, bank) == theirs[bank], bank


@pytest.mark.parametrize("path", LOGS, ids=ids(LOGS))
def test_tpm2_eventlog_agrees_on_captured_logs(path):
    assert_tpm2_eventlog_agrees(path)


def test_tpm2_eventlog_agrees_on_three_banks(tmp_path):
    banks = ("sha1", "sha256", "sha384")
    raw = agile_log(measured(0, EV_S_CRTM_VERSION, b"1\0.\0\0\0", banks),
                    measured(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x800000, 0x10000), banks),
                    measured(7, EV_SEPARATOR, bytes(4), banks),
                    measured(4, EV_EFI_BOOT_SERVICES_APPLICATION, image_load_data(file_node("\\a.efi") + END_NODE), banks),
                    *(measured(pcr, EV_SEPARATOR, bytes(4), banks) for pcr in range(7)),
                    banks=banks)
    path = tmp_path / "three-banks.bin"
    path.write_bytes(raw)
    assert_tpm2_eventlog_agrees(path)
    log = parse_event_log(raw)
    assert dict(log.spec_algorithms) == {"sha1": 20, "sha256": 32, "sha384": 48}
    assert replay(log, "sha384", [7])[7] == extend_all("sha384", bytes(48), [bytes(4)])


# --- replay rules -------------------------------------------------------------------

def test_startup_locality_sets_pcr0_start():
    banks = ("sha1", "sha256")
    log = parse_event_log(agile_log(startup_locality(3, banks), measured(0, EV_S_CRTM_VERSION, b"v\0", banks),
                                    measured(1, EV_SEPARATOR, bytes(4), banks), banks=banks))
    assert dict(log.events[1].decoded) == {"signature": "StartupLocality", "locality": 3}
    assert replay(log, "sha256") == {0: extend_all("sha256", bytes(31) + b"\3", [b"v\0"]),
                                     1: extend_all("sha256", bytes(32), [bytes(4)])}
    assert replay(log, "sha1", [0]) == {0: extend_all("sha1", bytes(19) + b"\3", [b"v\0"])}
    # Asked for, never extended: the reset value, locality included.
    only_locality = parse_event_log(agile_log(startup_locality(3), measured(1, EV_SEPARATOR, bytes(4))))
    assert replay(only_locality, pcrs=[0, 2]) == {0: (bytes(31) + b"\3").hex(), 2: bytes(32).hex()}
    assert replay(only_locality) == {1: extend_all("sha256", bytes(32), [bytes(4)])}


def test_startup_locality_after_a_pcr0_measurement_does_not_count():
    log = parse_event_log(agile_log(measured(0, EV_S_CRTM_VERSION, b"v\0"), startup_locality(3)))
    assert replay(log) == {0: extend_all("sha256", bytes(32), [b"v\0"])}


def test_hcrtm_without_startup_locality_starts_pcr0_at_4():
    log = parse_event_log(agile_log(measured(0, EV_EFI_HCRTM_EVENT, b"HCRTM"), measured(0, EV_SEPARATOR, bytes(4))))
    assert log.events[1].decoded == {"text": "HCRTM"}
    assert replay(log)[0] == extend_all("sha256", bytes(31) + b"\4", [b"HCRTM", bytes(4)])


def test_sha1_only_log():
    def event(pcr: int, event_type: int, data: bytes) -> bytes:
        return struct.pack("<II", pcr, event_type) + hashlib.sha1(data).digest() + struct.pack("<I", len(data)) + data

    raw = event(0, EV_S_CRTM_VERSION, b"1.0\0") + event(4, EV_ACTION, b"Calling INT 19h") + event(0, EV_SEPARATOR, bytes(4))
    log = parse_event_log(raw)
    assert dict(log.spec_algorithms) == {"sha1": 20}
    assert [e.type_name for e in log.events] == ["EV_S_CRTM_VERSION", "EV_ACTION", "EV_SEPARATOR"]
    assert log.events[0].decoded == {"version": "1.0"}
    assert replay(log, "sha1") == {0: extend_all("sha1", bytes(20), [b"1.0\0", bytes(4)]),
                                   4: extend_all("sha1", bytes(20), [b"Calling INT 19h"])}
    with pytest.raises(EvidenceError, match="no sha256 bank"):
        replay(log)


def test_replay_refuses_what_it_cannot_do():
    log = parse_event_log(SEABIOS_LOG.read_bytes())
    with pytest.raises(EvidenceError, match="no sha384 bank"):
        replay(log, "sha384")
    with pytest.raises(InputError):
        replay(log, pcrs=[32])
    # An event without the bank's digest cannot be replayed in that bank (but can in the others).
    partial = parse_event_log(spec_event([(0x0004, 20), (0x000B, 32)])
                              + event2(0, EV_SEPARATOR, [(0x000B, hashlib.sha256(bytes(4)).digest())], bytes(4)))
    assert replay(partial, "sha256")
    with pytest.raises(EvidenceError, match="event 1 .* no sha1 digest"):
        replay(partial, "sha1")
    # A declared algorithm tvorch has no name or hash for frames fine but does not replay.
    odd = parse_event_log(spec_event([(0x0099, 24)]) + event2(0, EV_SEPARATOR, [(0x0099, bytes(24))], bytes(4)))
    assert dict(odd.spec_algorithms) == {"alg_0x0099": 24}
    with pytest.raises(EvidenceError, match="cannot replay"):
        replay(odd, "alg_0x0099")


# --- decoding is best effort --------------------------------------------------------

def test_bad_event_data_is_kept_not_fatal():
    raw = agile_log(measured(1, EV_EFI_VARIABLE_BOOT, variable_data("BootOrder", b"\1\0")[:-5]),
                    measured(2, EV_SEPARATOR, b"\0\0\0"),
                    measured(3, 0x7777, b"\xde\xad"),
                    measured(4, EV_ACTION, b"\xff\xfe\x00binary"))
    log = parse_event_log(raw)
    variable, separator, unknown, action = log.events[1:]
    assert "decode_error" in variable.decoded and "variable name" in variable.decoded["decode_error"]
    assert separator.decoded == {"decode_error": "separator of 3 bytes, not 4"}
    assert unknown.type_name == "EV_UNKNOWN_0x00007777" and unknown.decoded is None
    assert "not text" in action.decoded["decode_error"]
    as_json = json.loads(json.dumps(log.to_json()))
    assert as_json["events"][3]["data"] == "dead" and as_json["events"][2]["data"] == "000000"
    assert "data" not in as_json["events"][0]  # decoded: the fields say it all
    assert replay(log)[3] == extend_all("sha256", bytes(32), [b"\xde\xad"])


def test_device_paths():
    path = (struct.pack("<BBHBB", 1, 1, 6, 2, 3) + file_node("\\EFI") + file_node("linux.efi")
            + struct.pack("<BBH", 9, 9, 6) + b"\xab\xcd" + END_NODE)
    log = parse_event_log(agile_log(measured(4, EV_EFI_BOOT_SERVICES_APPLICATION, image_load_data(path))))
    decoded = log.events[1].decoded
    assert decoded["device_path"] == "Pci(0x3,0x2)/\\EFI/linux.efi/Path(9,9,abcd)"
    assert decoded["file_path"] == "\\EFI\\linux.efi"
    broken = struct.pack("<BBH", 4, 4, 2) + b"junk"  # a node length under 4 would loop forever
    decoded = parse_event_log(agile_log(measured(4, EV_EFI_BOOT_SERVICES_APPLICATION, image_load_data(broken)))).events[1].decoded
    assert decoded["device_path"] == "<malformed at byte 0>" and decoded["file_path"] is None


def test_parsed_log_is_read_only():
    log = parse_event_log(UEFI_LOGS[0].read_bytes())
    event = log.events[4]
    with pytest.raises(TypeError):
        log.spec_algorithms["sha1"] = 20  # type: ignore[index]
    with pytest.raises(TypeError):
        event.digests["sha1"] = "00"  # type: ignore[index]
    with pytest.raises(TypeError):
        event.decoded["name"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        log.events = ()  # type: ignore[misc]
    assert isinstance(log.events, tuple)


# --- framing faults -----------------------------------------------------------------

def event_ends(log: EventLog) -> list[int]:
    """Byte offsets at which each event of a captured (single-bank sha256) log ends."""
    ends, at = [], 0
    for event in log.events:
        header = 32 if event.index == 0 else 12 + sum(2 + len(d) // 2 for d in event.digests.values()) + 4
        at += header + len(event.data)
        ends.append(at)
    return ends


@pytest.mark.parametrize("path", LOGS, ids=ids(LOGS))
def test_truncated_logs_are_refused_unless_cut_between_events(path):
    raw = path.read_bytes()
    ends = event_ends(parse_event_log(raw))
    assert ends[-1] == len(raw)
    # Every offset near an event boundary, and every 3rd one elsewhere.
    offsets = sorted({o for end in ends for o in range(end - 40, end + 3)} | set(range(0, len(raw), 3)))
    for cut in (o for o in offsets if 0 < o < len(raw)):
        if cut in ends:  # a log cut between events is a shorter, valid log: the quote catches it
            assert len(parse_event_log(raw[:cut]).events) == ends.index(cut) + 1
        else:
            refused(raw[:cut], "event log: event ", "at byte")
    refused(b"", "empty")


def test_framing_faults_name_the_event_and_offset():
    good = measured(0, EV_SEPARATOR, bytes(4))
    head = spec_event([(0x000B, 32)])
    at = len(head) + len(good)
    refused(head + good + struct.pack("<III", 1, EV_SEPARATOR, 7), f"event 2 (starting at byte {at})",
            "digest count 7", "not 1 to 1")
    refused(head + good + struct.pack("<III", 1, EV_SEPARATOR, 0), "event 2", "digest count 0")
    refused(head + event2(0, EV_SEPARATOR, [(0x0004, bytes(20))], bytes(4)), "event 1",
            "algorithm 0x0004", "not declared in the Spec ID event")
    refused(head + good + event2(0, EV_SEPARATOR, [(0x000B, bytes(32))], bytes(4))[:-2], "event 2",
            "event data needs 4 bytes")
    refused(head + struct.pack("<III", 0, EV_SEPARATOR, 1) + struct.pack("<H", 0x000B) + bytes(10), "event 1",
            "sha256 digest needs 32 bytes")
    refused(head + struct.pack("<II", 0, EV_SEPARATOR) + b"\xff\xff\xff\xff", "event 1", "digest count 4294967295")
    refused(head + event2(0, EV_SEPARATOR, [(0x000B, bytes(32))], b"")[:-4] + b"\xff\xff\xff\x7f", "event 1",
            "event data needs 2147483647 bytes")
    refused(head + event2(32, EV_SEPARATOR, [(0x000B, bytes(32))], bytes(4)), "event 1", "PCR index 32")
    two = spec_event([(0x0004, 20), (0x000B, 32)])
    refused(two + event2(0, EV_SEPARATOR, [(0x000B, bytes(32)), (0x000B, bytes(32))], bytes(4)),
            "event 1", "second sha256 digest")


def test_spec_id_faults():
    refused(spec_event([(0x000B, 20)]), "event 0 (starting at byte 0)", "sha256 a digest size of 20 at byte 60")
    refused(spec_event([]), "event 0", "declares 0 algorithms")
    refused(spec_event([(0x000B, 32), (0x000B, 32)]), "declared twice")
    refused(spec_event([(0x0099, 0)]), "digest size of 0")
    refused(spec_event([(0x000B, 32)], trailer=b"x"), "unexpected bytes after the Spec ID event")
    refused(spec_event([(0x000B, 32)])[:-1], "event 0")


# --- never anything but a log or an EvidenceError -----------------------------------

REAL = {p.stem: p.read_bytes() for p in LOGS}
AGILE_HEAD = spec_event([(0x0004, 20), (0x000B, 32)])


def parse_or_refuse(raw: bytes) -> EventLog | None:
    try:
        log = parse_event_log(raw)
    except EvidenceError as err:
        assert "\n" not in str(err)
        return None
    json.dumps(log.to_json())
    for bank in log.spec_algorithms:
        try:
            replay(log, bank)
        except EvidenceError:
            pass
    return log


FAST = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=600))
def test_random_bytes(raw):
    parse_or_refuse(raw)


@FAST
@given(st.binary(max_size=600))
def test_random_events_after_a_valid_spec_id(tail):
    parse_or_refuse(AGILE_HEAD + tail)


@FAST
@given(st.sampled_from(sorted(EVENT_TYPES)), st.binary(max_size=300))
def test_any_event_data_parses(event_type, data):
    """Data is content, not framing: whatever it holds, the event parses and the log replays."""
    log = parse_or_refuse(agile_log(measured(0, event_type, data)))
    assert log is not None and log.events[1].data == data


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
)


@FAST
@given(st.sampled_from(sorted(REAL)), st.lists(mutation, min_size=1, max_size=4))
def test_mutated_real_logs(name, mutations):
    raw = bytearray(REAL[name])
    for op, pos, *arg in mutations:
        pos %= len(raw) + 1
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << arg[0]
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = arg[0]
        elif op == "overwrite":
            raw[pos:pos + len(arg[0])] = arg[0]
        if not raw:
            break
    parse_or_refuse(bytes(raw))


# --- CLI ----------------------------------------------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvorch: error: "), err
    return lines[0]


def test_cli_replay_json(capsys):
    path = UEFI_LOGS[0]
    assert main(["eventlog", "replay", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"bank", "pcrs"} and out["bank"] == "sha256"
    assert sorted(out["pcrs"], key=int) == ["0", "1", "2", "3", "4", "5", "6", "7", "9", "11"]
    guest = guest_pcrs(path)
    assert all(out["pcrs"][str(pcr)] == guest[pcr] for pcr in guest if str(pcr) in out["pcrs"])
    assert main(["eventlog", "replay", str(path), "--pcr", "8", "--pcr", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bank": "sha256", "pcrs": {"0": guest[0], "8": guest[8]}}


def test_cli_replay_text(capsys):
    assert main(["eventlog", "replay", str(SEABIOS_LOG)]) == 0
    lines = capsys.readouterr().out.splitlines()
    guest = guest_pcrs(SEABIOS_LOG)
    assert lines[0].split() == ["PCR", "sha256"]
    assert [line.split() for line in lines[1:]] == [[str(pcr), guest[pcr]] for pcr in range(8)]


def test_cli_show(capsys):
    path = UEFI_LOGS[0]
    assert main(["eventlog", "show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 37 and lines[0].split()[:4] == ["#", "PCR", "TYPE", "SHA256"]
    uki = next(line for line in lines if "EV_EFI_BOOT_SERVICES_APPLICATION" in line)
    assert "\\EFI\\BOOT\\BOOTX64.EFI" in uki and uki.split()[1] == "4"
    assert "'Exit Boot Services Invocation'" in lines[36]
    assert main(["eventlog", "show", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec_algorithms"] == {"sha256": 32} and len(doc["events"]) == 37
    sep = doc["events"][9]
    assert sep["type_name"] == "EV_SEPARATOR" and sep["decoded"] == {"value": 0}
    assert sep["digests"]["sha256"] == hashlib.sha256(bytes(4)).hexdigest()
    assert doc["events"][23]["decoded"]["file_path"] == "\\EFI\\BOOT\\BOOTX64.EFI"


def test_cli_refusals(capsys, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not an event log\n" * 4)
    assert main(["eventlog", "show", str(garbage)]) == ExitCode.EVIDENCE
    assert str(garbage) in one_error_line(capsys)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(UEFI_LOGS[0].read_bytes()[:1000])
    assert main(["eventlog", "replay", str(truncated), "--json"]) == ExitCode.EVIDENCE
    assert "event 11 (starting at byte 860)" in one_error_line(capsys)
    assert main(["eventlog", "replay", str(SEABIOS_LOG), "--bank", "sha1"]) == ExitCode.EVIDENCE
    assert "no sha1 bank" in one_error_line(capsys)
    assert main(["eventlog", "show", str(tmp_path / "missing.bin")]) == ExitCode.INVALID_INPUT
    assert "cannot read" in one_error_line(capsys)
    assert main(["eventlog", "show", str(tmp_path)]) == ExitCode.INVALID_INPUT
    one_error_line(capsys)
    assert main(["eventlog", "replay", str(SEABIOS_LOG), "--pcr", "32"]) == ExitCode.USAGE
    one_error_line(capsys)
