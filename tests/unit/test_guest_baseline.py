"""Guest boot baselines, on the event logs captured from the test guest (tests/data/eventlogs/README.txt).

The observed boots are the captured logs with one event changed, added or
removed in the parsed structure: exactly the differences a rebuilt kernel, a
changed Secure Boot variable or an extra boot application make.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path

import pytest

from tvorch.core.attestation.eventlog import EventLog, TcgEvent, parse_event_log
from tvorch.core.attestation.guest_baseline import (
    ADDED,
    CHANGED,
    EARLY_BOOT,
    LATE_BOOT,
    MISSING,
    TYPE_CHANGED,
    BaselineVerdict,
    compare,
    compare_prediction,
    group_of,
)
from tvorch.core.launch.manifest import canonical_json
from tvorch.core.boot.prediction import PredictedEvent, Prediction
from tvorch.errors import EvidenceError, InputError

DATA = Path(__file__).resolve().parent.parent / "data" / "eventlogs"
EV_NO_ACTION, EV_EFI_ACTION = 0x3, 0x80000007
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


@pytest.fixture(scope="module")
def crb() -> EventLog:
    return parse_event_log((DATA / "uefi-crb.bin").read_bytes())


def other_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def edited(log: EventLog, change) -> EventLog:
    """LOG with its events passed through CHANGE (a function of the event list returning a new list)."""
    return EventLog(log.spec_algorithms, tuple(change(list(log.events))))


def with_event(log: EventLog, index: int, **changes: object) -> EventLog:
    return edited(log, lambda events: [dataclasses.replace(e, **changes) if e.index == index else e for e in events])


def first(log: EventLog, pcr: int, type_name: str, **decoded: object) -> TcgEvent:
    return next(e for e in log.events if e.pcr == pcr and e.type_name == type_name
                and all((e.decoded or {}).get(k) == v for k, v in decoded.items()))


def test_a_boot_identical_to_its_baseline_matches(crb: EventLog) -> None:
    tis = parse_event_log((DATA / "uefi-tis.bin").read_bytes())  # the same boot with the TIS front end
    verdict = compare(crb, tis)
    assert verdict.matches and verdict.differences == ()
    assert verdict.by_group() == {EARLY_BOOT: (), LATE_BOOT: ()}
    assert verdict.to_json() == {"bank": "sha256", "pcrs": None, "matches": True, "differences": []}


def test_a_changed_boot_application_is_one_early_boot_difference_on_pcr4(crb: EventLog) -> None:
    app = first(crb, 4, "EV_EFI_BOOT_SERVICES_APPLICATION")
    new = other_digest("another BOOTX64.EFI")
    verdict = compare(crb, with_event(crb, app.index, digests={"sha256": new}))
    assert not verdict.matches
    (diff,) = verdict.differences
    assert (diff.pcr, diff.group, diff.kind) == (4, EARLY_BOOT, CHANGED)
    assert diff.event_type == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert (diff.expected, diff.found, diff.index) == (app.digests["sha256"], new, 2)  # EFI action, separator, app
    assert diff.describe() == (f"PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed "
                               f"(expected {app.digests['sha256'][:8]}…, found {new[:8]}…)")
    assert verdict.by_group() == {EARLY_BOOT: (diff,), LATE_BOOT: ()}


def test_a_changed_secure_boot_variable_is_named(crb: EventLog) -> None:
    secure_boot = first(crb, 7, "EV_EFI_VARIABLE_DRIVER_CONFIG", name="SecureBoot")
    verdict = compare(crb, with_event(crb, secure_boot.index, digests={"sha256": other_digest("SecureBoot=1")}))
    (diff,) = verdict.differences
    assert (diff.pcr, diff.variable, diff.index, diff.group) == (7, "SecureBoot", 0, EARLY_BOOT)
    assert diff.describe().startswith("PCR7: EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot changed (expected 115aa827…")


def test_an_added_event_and_a_missing_one_are_late_boot_differences(crb: EventLog) -> None:
    tag = first(crb, 9, "EV_EVENT_TAG")
    extra = dataclasses.replace(tag, digests={"sha256": other_digest("second initrd")})
    section = [e for e in crb.events if e.pcr == 11][2]  # the first '.osrel' EV_IPL

    def change(events: list[TcgEvent]) -> list[TcgEvent]:
        out = [e for e in events if e.index != section.index]
        out.append(extra)
        return out

    verdict = compare(crb, edited(crb, change))
    added, missing = verdict.differences  # PCR order: 9, then 11
    assert (added.pcr, added.kind, added.event_type, added.index) == (9, ADDED, "EV_EVENT_TAG", 2)
    assert (added.expected, added.found) == (None, extra.digests["sha256"])
    assert added.describe() == f"PCR9: EV_EVENT_TAG added (found {extra.digests['sha256'][:8]}…)"
    assert (missing.pcr, missing.kind, missing.event_type, missing.index) == (11, MISSING, "EV_IPL", 2)
    assert (missing.expected, missing.found) == (section.digests["sha256"], None)
    assert missing.describe() == f"PCR11: EV_IPL missing (expected {section.digests['sha256'][:8]}…)"
    assert verdict.by_group() == {EARLY_BOOT: (), LATE_BOOT: (added, missing)}


def test_an_event_of_another_type_in_the_same_place_is_a_type_change(crb: EventLog) -> None:
    action = first(crb, 4, "EV_EFI_ACTION")
    observed = with_event(crb, action.index, event_type=EV_EFI_BOOT_SERVICES_APPLICATION,
                          type_name="EV_EFI_BOOT_SERVICES_APPLICATION", digests={"sha256": other_digest("app")})
    (diff,) = compare(crb, observed).differences
    assert (diff.kind, diff.expected_type, diff.event_type, diff.index) == (
        TYPE_CHANGED, "EV_EFI_ACTION", "EV_EFI_BOOT_SERVICES_APPLICATION", 0)
    assert diff.describe().startswith(
        "PCR4: event 0 type changed from EV_EFI_ACTION to EV_EFI_BOOT_SERVICES_APPLICATION (")
    # The variable's name goes with the event that measured a variable.
    secure_boot = first(crb, 7, "EV_EFI_VARIABLE_DRIVER_CONFIG", name="SecureBoot")
    observed = with_event(crb, secure_boot.index, event_type=EV_EFI_ACTION, type_name="EV_EFI_ACTION", decoded=None)
    (diff,) = compare(crb, observed).differences
    assert (diff.kind, diff.variable) == (TYPE_CHANGED, "SecureBoot")
    assert diff.describe().startswith(
        "PCR7: event 0 type changed from EV_EFI_VARIABLE_DRIVER_CONFIG SecureBoot to EV_EFI_ACTION (")


def test_differences_are_grouped_early_and_late_in_pcr_order(crb: EventLog) -> None:
    app = first(crb, 4, "EV_EFI_BOOT_SERVICES_APPLICATION")
    section = [e for e in crb.events if e.pcr == 11][0]
    observed = with_event(with_event(crb, section.index, digests={"sha256": other_digest("kernel")}),
                          app.index, digests={"sha256": other_digest("loader")})
    verdict = compare(crb, observed)
    assert [(d.pcr, d.group) for d in verdict.differences] == [(4, EARLY_BOOT), (11, LATE_BOOT)]
    groups = verdict.by_group()
    assert [d.pcr for d in groups[EARLY_BOOT]] == [4] and [d.pcr for d in groups[LATE_BOOT]] == [11]
    assert [group_of(p) for p in (0, 7, 8, 9, 23)] == [EARLY_BOOT] * 2 + [LATE_BOOT] * 3


def test_only_the_pcrs_asked_for_are_compared(crb: EventLog) -> None:
    section = [e for e in crb.events if e.pcr == 11][0]
    observed = with_event(crb, section.index, digests={"sha256": other_digest("kernel")})
    verdict = compare(crb, observed, pcrs=[0, 1, 2, 3, 4, 5, 6, 7, 9])
    assert verdict.matches and verdict.pcrs == (0, 1, 2, 3, 4, 5, 6, 7, 9)
    assert not compare(crb, observed, pcrs=[11]).matches
    with pytest.raises(InputError, match="PCR 32 is out of range"):
        compare(crb, crb, pcrs=[32])


def test_no_action_events_are_not_compared(crb: EventLog) -> None:
    marker = TcgEvent(99, 0, EV_NO_ACTION, "EV_NO_ACTION", {"sha256": "00" * 32}, b"StartupLocality\0\0", None)
    assert compare(crb, edited(crb, lambda events: [*events, marker])).matches


def test_a_boot_from_other_firmware_differs_in_every_pcr_it_touches(crb: EventLog) -> None:
    seabios = parse_event_log((DATA / "seabios-direct.bin").read_bytes())
    verdict = compare(crb, seabios)
    pcrs = {d.pcr for d in verdict.differences}
    assert pcrs == {0, 1, 2, 3, 4, 5, 6, 7, 9, 11}
    assert {d.kind for d in verdict.differences} >= {CHANGED, MISSING, TYPE_CHANGED}
    late = verdict.by_group()[LATE_BOOT]
    assert late and all(d.kind == MISSING and d.pcr in (9, 11) for d in late)  # SeaBIOS measures no kernel
    # The JSON form is canonical JSON (what a bundle signs) and says what each difference is.
    doc = verdict.to_json()
    canonical_json(doc)
    assert [d["description"] for d in doc["differences"]] == [d.describe() for d in verdict.differences]


def test_the_stored_baseline_is_the_raw_log_and_reparses_the_same(crb: EventLog) -> None:
    raw = (DATA / "uefi-crb.bin").read_bytes()
    stored = base64.b64encode(raw).decode("ascii")
    assert compare(parse_event_log(base64.b64decode(stored)), crb).matches


def test_a_bank_either_log_lacks_is_evidence_error(crb: EventLog) -> None:
    with pytest.raises(EvidenceError, match="baseline event log has no sha1 bank"):
        compare(crb, crb, bank="sha1")
    no_digest = with_event(crb, 5, digests={"sha384": "00" * 48})
    with pytest.raises(EvidenceError, match="observed event log: event 5 .PCR 7. has no sha256 digest"):
        compare(crb, no_digest)


def test_the_verdict_is_frozen(crb: EventLog) -> None:
    verdict = compare(crb, crb)
    assert isinstance(verdict, BaselineVerdict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.bank = "sha1"  # type: ignore[misc]


# --- a first boot against the launch prediction -------------------------------------


def predicted(log: EventLog, pcrs: set[int]) -> Prediction:
    """What a launch would have predicted for PCRS if it was right about LOG's boot."""
    return Prediction(tuple(PredictedEvent(e.pcr, e.type_name, e.digests["sha256"], f"event {e.index}")
                            for e in log.events if e.pcr in pcrs and e.event_type != EV_NO_ACTION), frozenset(pcrs))


def changed(log: EventLog, position: int, what: bytes) -> EventLog:
    """LOG with the sha256 digest of its POSITION-th event made that of WHAT."""
    event = log.events[position]
    return with_event(log, event.index, digests={**event.digests, "sha256": hashlib.sha256(what).hexdigest()})


def test_a_boot_as_predicted_matches_on_the_covered_pcrs_only(crb: EventLog) -> None:
    prediction = predicted(crb, {4, 5})
    verdict = compare_prediction(prediction, crb)
    assert verdict.matches and verdict.pcrs == (4, 5) and verdict.bank == "sha256"
    # An event outside the covered PCRs is not the prediction's business.
    other = changed(crb, next(i for i, e in enumerate(crb.events) if e.pcr == 7), b"another PK")
    assert compare_prediction(prediction, other).matches


def test_another_boot_application_is_named_against_the_prediction(crb: EventLog) -> None:
    app = next(i for i, e in enumerate(crb.events) if e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
    observed = changed(crb, app, b"a tampered BOOTX64.EFI")
    verdict = compare_prediction(predicted(crb, {4, 5}), observed)
    (difference,) = verdict.differences
    want = crb.events[app].digests["sha256"]
    found = observed.events[app].digests["sha256"]
    assert (difference.pcr, difference.kind, difference.expected, difference.found) == (4, CHANGED, want, found)
    assert difference.describe() == (f"PCR4: EV_EFI_BOOT_SERVICES_APPLICATION: predicted {want[:8]}… "
                                     f"(event {crb.events[app].index}), found {found[:8]}…")
    assert difference.to_json()["predicted_what"] == f"event {crb.events[app].index}"


def test_an_event_not_predicted_or_a_predicted_one_missing_is_named(crb: EventLog) -> None:
    prediction = predicted(crb, {4})
    extra = dataclasses.replace(prediction, events=(*prediction.events,
                                                    PredictedEvent(4, "EV_EFI_ACTION", "ab" * 32, "an action")))
    (missing,) = compare_prediction(extra, crb).differences
    assert missing.kind == MISSING
    assert missing.describe() == "PCR4: EV_EFI_ACTION: predicted abababab… (an action), found none"
    fewer = Prediction(prediction.events[:-1], prediction.covered)
    (added,) = compare_prediction(fewer, crb).differences
    assert added.kind == ADDED
    assert added.describe().startswith(f"PCR4: {prediction.events[-1].type_name}: not predicted, found ")
    # A covered PCR the boot never extended but the prediction has events for: every event missing.
    silent = Prediction((PredictedEvent(15, "EV_IPL", "cd" * 32, "x"),), frozenset({15}))
    assert [d.kind for d in compare_prediction(silent, crb).differences] == [MISSING]


def test_a_baseline_difference_keeps_its_json_and_wording(crb: EventLog) -> None:
    app = next(i for i, e in enumerate(crb.events) if e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
    (difference,) = compare(crb, changed(crb, app, b"x")).differences
    assert "predicted_what" not in difference.to_json()
    assert difference.describe().startswith("PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed (expected ")
