"""Firmware references: the log found in a memory dump, the kept events, signing, differences."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

import pytest

from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.boot.firmware_reference import (
    FirmwareReference,
    ReferenceKey,
    differences,
    event_log_in_memory,
    reference_events,
    sign_reference,
    verify_reference,
)
from tvorch.core.boot.prediction import EventSource, PredictedEvent, replay
from tvorch.core.signing import generate_key, issue_signing_cert, make_ca
from tvorch.errors import EvidenceError, TrustError

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlogs"
LOG = (DATA / "uefi-crb.bin").read_bytes()
PCRS = json.loads((DATA / "uefi-crb.pcrs.json").read_text())["sha256"]
KEY = ReferenceKey("a" * 64, "b" * 64, "c" * 64, "pc-q35-7.2", "qemu", 512, 1, False, "virtio-disk+channel")


def memory_with(*logs: bytes) -> bytes:
    """Guest memory: noise, then each log followed by the 0xFF fill of Tcg2Dxe's log area."""
    out = os.urandom(4096)
    for log in logs:
        out += log + b"\xff" * 8192 + os.urandom(1000)
    return out


def test_the_log_is_found_in_memory_and_framed_exactly():
    found = event_log_in_memory(memory_with(LOG))
    assert len(found.events) == len(parse_event_log(LOG).events)


def _prefix_of(raw: bytes, count: int) -> bytes:
    """The first COUNT events of a crypto-agile log: what a log read earlier in the boot holds."""
    log = parse_event_log(raw)
    end = len(raw) - sum(_size(e) for e in log.events[count:])
    assert len(parse_event_log(raw[:end]).events) == count
    return raw[:end]


def _size(event) -> int:
    return 12 + sum(2 + len(d) // 2 for d in event.digests.values()) + 4 + len(event.data)


def test_the_longest_copy_wins_over_a_stale_shorter_one():
    short = _prefix_of(LOG, 10)
    found = event_log_in_memory(memory_with(short, LOG))
    assert len(found.events) == len(parse_event_log(LOG).events)
    assert len(event_log_in_memory(memory_with(short)).events) == 10


def test_no_log_in_memory_is_an_evidence_error():
    with pytest.raises(EvidenceError, match="no firmware event log"):
        event_log_in_memory(os.urandom(65536))


def test_reference_events_are_pcrs_0_to_3_6_and_7_up_to_each_separator_and_replay_to_the_logged_values():
    events = reference_events(parse_event_log(LOG))
    assert {e.pcr for e in events} == {0, 1, 2, 3, 6, 7}
    assert all(e.source is EventSource.FIRMWARE_REFERENCE for e in events)
    values = replay(events)
    for pcr in (0, 1, 2, 3, 6, 7):
        assert values[pcr] == PCRS[str(pcr)], pcr


def test_a_log_read_before_the_separators_is_refused():
    short = _prefix_of(LOG, 10)
    with pytest.raises(EvidenceError, match="no separator on PCR"):
        reference_events(parse_event_log(short))


def _identity():
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca = make_ca("test node CA", now)
    key = generate_key()
    return key, issue_signing_cert(ca_key, ca, key.public_key(), "test node", now)


def test_signed_reference_round_trips_and_tampering_is_refused():
    key, cert = _identity()
    ref = FirmwareReference(KEY, reference_events(parse_event_log(LOG)), "2026-12-04T22:00:00Z", "/c.fd", "/v.fd")
    raw = sign_reference(ref, key, cert)
    assert verify_reference(raw, cert) == ref
    doc = json.loads(raw)
    doc["reference"]["events"][0]["digest"] = "00" * 32
    with pytest.raises(TrustError, match="does not verify"):
        verify_reference(json.dumps(doc).encode(), cert)
    _, other_cert = _identity()
    with pytest.raises(TrustError, match="does not verify"):
        verify_reference(raw, other_cert)
    with pytest.raises(TrustError, match="not a signed reference"):
        verify_reference(b"{}", cert)


def test_the_key_digest_changes_with_every_input_that_matters():
    digests = {KEY.digest}
    for field, value in (("memory_mib", 1024), ("vcpus", 2), ("secure_boot", True), ("devices", "virtio-disk"),
                         ("code_sha256", "d" * 64), ("vars_sha256", "e" * 64), ("emulator_sha256", "f" * 64),
                         ("machine", "pc-q35-8.0"), ("virt_type", "kvm")):
        digests.add(dataclasses.replace(KEY, **{field: value}).digest)
    assert len(digests) == 10


def test_differences_name_the_pcr_and_the_event():
    a = PredictedEvent(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "11" * 32, "SecureBoot (1 bytes)")
    b = PredictedEvent(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "22" * 32, "SecureBoot (1 bytes)")
    sep = PredictedEvent(7, "EV_SEPARATOR", "33" * 32, "separator")
    assert differences([a, sep], [a, sep], [7]) == []
    diff = differences([a, sep], [b, sep], [7])
    assert diff == [f"PCR7: EV_EFI_VARIABLE_DRIVER_CONFIG (SecureBoot (1 bytes)): predicted "
                    f"EV_EFI_VARIABLE_DRIVER_CONFIG {'11' * 32} found EV_EFI_VARIABLE_DRIVER_CONFIG {'22' * 32}"]
    assert differences([a, sep], [a], [7]) == [f"PCR7: EV_SEPARATOR (separator): predicted EV_SEPARATOR {'33' * 32} "
                                               f"found nothing"]


@pytest.fixture
def cli_node(tmp_path, monkeypatch):
    cfg = tmp_path / "tvorch.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\noverlay_dir = "{tmp_path / "overlays"}"\n'
                   'libvirt_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"\nvirt_type = "qemu"\n')
    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    return tmp_path


@pytest.mark.parametrize("args, code, words", [
    (["firmware", "reference", "show", "zz"], 3, "at least 6 lowercase hex digits"),
    (["firmware", "reference", "remove", "abcdef12"], 5, "no firmware reference abcdef12"),
    (["firmware", "reference", "create", "--firmware-profile", "nope"], 3, "unknown"),
    (["firmware", "reference", "create", "--memory", "1"], 3, "memory"),
])
def test_cli_refusals_are_one_line_with_their_exit_code_and_write_nothing(cli_node, capsys, args, code, words):
    from tvorch.cli import main

    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tvorch: error: ") and words in err[0]
    assert not (cli_node / "state" / "firmware-references").exists()


def test_a_tampered_stored_reference_is_refused_on_list(cli_node, capsys):
    from tvorch.adapters.node_keys import load_or_create
    from tvorch.cli import main

    identity = load_or_create(cli_node / "state", "test-node")
    ref = FirmwareReference(KEY, reference_events(parse_event_log(LOG)), "2026-12-04T22:00:00Z", "/c.fd", "/v.fd")
    directory = cli_node / "state" / "firmware-references"
    directory.mkdir(mode=0o700)
    path = directory / f"{KEY.digest}.json"
    path.write_bytes(sign_reference(ref, identity.signing_key, identity.signing_cert))
    assert main(["firmware", "reference", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["key_digest"] == KEY.digest
    path.write_bytes(path.read_bytes().replace(b'"memory_mib":512', b'"memory_mib":513'))
    assert main(["firmware", "reference", "list"]) == 12
    assert "does not verify" in capsys.readouterr().err
