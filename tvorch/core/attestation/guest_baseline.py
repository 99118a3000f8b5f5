"""A VM's first verified boot as its baseline, and later boots compared with it event by event.

Why event by event: a PCR value says only *that* a boot differed; the event
log says which firmware volume, Secure Boot variable, boot application or
kernel section did. Replay (``core.attestation.eventlog.replay``) already ties each log
to its quote; this module explains the difference between two trusted logs.

Per PCR, the events of each log (EV_NO_ACTION left out: they are never
extended) are aligned in log order on (event type, digest) with difflib;
unmatched runs are paired position by position into "changed" (same type,
other digest) or "type changed", and what is left over is "added" (only in
the observed boot) or "missing" (only in the baseline). Results are grouped as
integrity monitoring usually reports them: "early boot" is the firmware,
PCRs 0-7; "late boot" is the boot loader and kernel onward, PCRs 8 and above.

Stored form of a baseline: the raw bytes of the event log of the first
verified boot (``binary_bios_measurements`` exactly as the guest read it;
base64 inside JSON), re-parsed with ``parse_event_log`` for every comparison.
Nothing derived from a parse is stored, so a verifier trusts only the bytes,
and a better parser later reads old baselines with no migration.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tvorch.core.attestation.eventlog import EV_NO_ACTION, MAX_PCR, EventLog, TcgEvent
from tvorch.core.boot.prediction import BANK, PredictedEvent, Prediction
from tvorch.errors import EvidenceError, InputError

EARLY_BOOT = "early boot"
LATE_BOOT = "late boot"
GROUPS = (EARLY_BOOT, LATE_BOOT)
LAST_EARLY_PCR = 7

CHANGED = "changed"
ADDED = "added"
MISSING = "missing"
TYPE_CHANGED = "type changed"

_SHOWN_HEX = 8  # digest characters in a one-line description
_VARIABLE_EVENT = "EV_EFI_VARIABLE_"  # EV_EFI_VARIABLE_DRIVER_CONFIG, _BOOT, _BOOT2, _AUTHORITY


def group_of(pcr: int) -> str:
    """EARLY_BOOT for the firmware's PCRs 0-7, LATE_BOOT for 8 and above."""
    return EARLY_BOOT if pcr <= LAST_EARLY_PCR else LATE_BOOT


@dataclass(frozen=True)
class Difference:
    """One event that differs from the baseline."""

    pcr: int
    group: str  # EARLY_BOOT or LATE_BOOT
    kind: str  # CHANGED, ADDED, MISSING or TYPE_CHANGED
    event_type: str  # e.g. EV_EFI_BOOT_SERVICES_APPLICATION: the observed event's (the baseline's if missing)
    index: int  # position in that PCR's events: the observed boot's (the baseline's if missing)
    expected: str | None  # hex digest in the baseline; None if added
    found: str | None  # hex digest observed; None if missing
    expected_type: str | None = None  # the baseline's event type, when the kind is TYPE_CHANGED
    variable: str | None = None  # UEFI variable name, for EV_EFI_VARIABLE_* events
    # With a launch prediction (compare_prediction) instead of a baseline: what the predicted event measured.
    predicted: bool = False
    predicted_what: str | None = None

    def describe(self) -> str:
        """One line, e.g. "PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed (expected 3d458cfe…, found …)"."""
        what = _named(self.event_type, self.variable)
        if self.predicted:
            return self._describe_vs_prediction(what)
        if self.kind == CHANGED:
            change = "changed" if self.variable else "digest changed"
            return f"PCR{self.pcr}: {what} {change} (expected {_short(self.expected)}, found {_short(self.found)})"
        if self.kind == TYPE_CHANGED:
            was = str(self.expected_type)
            if what == self.event_type:  # the variable, if any, was the baseline's event
                was = _named(was, self.variable)
            return (f"PCR{self.pcr}: event {self.index} type changed from {was} to {what} "
                    f"(expected {_short(self.expected)}, found {_short(self.found)})")
        if self.kind == ADDED:
            return f"PCR{self.pcr}: {what} added (found {_short(self.found)})"
        return f"PCR{self.pcr}: {what} missing (expected {_short(self.expected)})"

    def _describe_vs_prediction(self, what: str) -> str:
        """E.g. "PCR4: EV_EFI_BOOT_SERVICES_APPLICATION: predicted 3d458cfe… (\\EFI\\BOOT\\BOOTX64.EFI), found 1f2e…"."""
        measured = "" if self.predicted_what is None else f" ({self.predicted_what})"
        if self.kind == CHANGED:
            return f"PCR{self.pcr}: {what}: predicted {_short(self.expected)}{measured}, found {_short(self.found)}"
        if self.kind == TYPE_CHANGED:
            return (f"PCR{self.pcr}: event {self.index}: predicted {self.expected_type} {_short(self.expected)}"
                    f"{measured}, found {what} {_short(self.found)}")
        if self.kind == ADDED:
            return f"PCR{self.pcr}: {what}: not predicted, found {_short(self.found)}"
        return f"PCR{self.pcr}: {what}: predicted {_short(self.expected)}{measured}, found none"

    def to_json(self) -> dict[str, Any]:
        out = {
            "pcr": self.pcr, "group": self.group, "kind": self.kind, "event_type": self.event_type,
            "expected_type": self.expected_type, "variable": self.variable, "index": self.index,
            "expected": self.expected, "found": self.found, "description": self.describe(),
        }
        if self.predicted:  # a baseline difference's JSON stays what it was (verify compares it)
            out["predicted_what"] = self.predicted_what
        return out


@dataclass(frozen=True)
class BaselineVerdict:
    """How an observed boot compares with the baseline, for BANK and PCRS (None: every PCR either log uses)."""

    bank: str
    pcrs: tuple[int, ...] | None
    differences: tuple[Difference, ...]

    @property
    def matches(self) -> bool:
        return not self.differences

    def by_group(self) -> dict[str, tuple[Difference, ...]]:
        """Differences under EARLY_BOOT and LATE_BOOT (both keys always present), in PCR and log order."""
        return {group: tuple(d for d in self.differences if d.group == group) for group in GROUPS}

    def to_json(self) -> dict[str, Any]:
        return {
            "bank": self.bank, "pcrs": None if self.pcrs is None else list(self.pcrs), "matches": self.matches,
            "differences": [d.to_json() for d in self.differences],
        }


def compare(
    baseline: EventLog, observed: EventLog, bank: str = "sha256", pcrs: Iterable[int] | None = None
) -> BaselineVerdict:
    """Every event of OBSERVED that differs from BASELINE in BANK, on PCRS (default: all the logs use)."""
    wanted = None if pcrs is None else tuple(sorted(set(pcrs)))
    for pcr in wanted or ():
        if not 0 <= pcr <= MAX_PCR:
            raise InputError(f"PCR {pcr} is out of range (0-{MAX_PCR})")
    expected = _events_by_pcr(baseline, bank, "baseline")
    found = _events_by_pcr(observed, bank, "observed")
    chosen = wanted if wanted is not None else sorted(set(expected) | set(found))
    differences: list[Difference] = []
    for pcr in chosen:
        differences.extend(_compare_pcr(pcr, expected.get(pcr, []), found.get(pcr, []), bank))
    return BaselineVerdict(bank, wanted, tuple(differences))


def _events_by_pcr(log: EventLog, bank: str, which: str) -> dict[int, list[TcgEvent]]:
    if bank not in log.spec_algorithms:
        raise EvidenceError(f"{which} event log has no {bank} bank (it has {', '.join(log.spec_algorithms)})")
    by_pcr: dict[int, list[TcgEvent]] = {}
    for event in log.events:
        if event.event_type == EV_NO_ACTION:
            continue
        if bank not in event.digests:
            raise EvidenceError(f"{which} event log: event {event.index} (PCR {event.pcr}) has no {bank} digest")
        by_pcr.setdefault(event.pcr, []).append(event)
    return by_pcr


def _compare_pcr(pcr: int, expected: Sequence[TcgEvent], found: Sequence[TcgEvent], bank: str) -> list[Difference]:
    out: list[Difference] = []
    for kind, e, f in _align([(x.type_name, x.digests[bank]) for x in expected],
                             [(x.type_name, x.digests[bank]) for x in found]):
        old = None if e is None else expected[e]
        new = None if f is None else found[f]
        event = new if new is not None else old
        assert event is not None
        out.append(_difference(pcr, kind, event, f if f is not None else e or 0, old, new, bank))
    return out


def _align(expected: Sequence[tuple[str, str]], found: Sequence[tuple[str, str]]
           ) -> list[tuple[str, int | None, int | None]]:
    """(kind, index in EXPECTED, index in FOUND) of every unmatched event of two (type, digest) sequences."""
    out: list[tuple[str, int | None, int | None]] = []
    matcher = difflib.SequenceMatcher(None, list(expected), list(found), autojunk=False)
    for op, e1, e2, f1, f2 in matcher.get_opcodes():
        if op == "equal":
            continue
        paired = min(e2 - e1, f2 - f1)
        for k in range(paired):
            kind = CHANGED if expected[e1 + k][0] == found[f1 + k][0] else TYPE_CHANGED
            out.append((kind, e1 + k, f1 + k))
        out += [(MISSING, k, None) for k in range(e1 + paired, e2)]
        out += [(ADDED, None, k) for k in range(f1 + paired, f2)]
    return out


def compare_prediction(prediction: Prediction, observed: EventLog) -> BaselineVerdict:
    """Every event of OBSERVED on the PCRs PREDICTION covers that differs from the predicted events (sha256).

    Aligned like a baseline comparison; each difference says "predicted"
    where a baseline's says "expected", and names what the prediction measured.
    """
    found = _events_by_pcr(observed, BANK, "observed")
    predicted: dict[int, list[PredictedEvent]] = {}
    for p in prediction.events:
        predicted.setdefault(p.pcr, []).append(p)
    differences: list[Difference] = []
    for pcr in sorted(prediction.covered):
        want, got = predicted.get(pcr, []), found.get(pcr, [])
        for kind, e, f in _align([(p.type_name, p.digest) for p in want],
                                 [(x.type_name, x.digests[BANK]) for x in got]):
            old = None if e is None else want[e]
            new = None if f is None else got[f]
            differences.append(Difference(
                pcr=pcr, group=group_of(pcr), kind=kind,
                event_type=new.type_name if new is not None else old.type_name if old is not None else "",
                index=f if f is not None else e or 0,
                expected=None if old is None else old.digest, found=None if new is None else new.digests[BANK],
                expected_type=old.type_name if kind == TYPE_CHANGED and old is not None else None,
                variable=_variable(new, None), predicted=True, predicted_what=None if old is None else old.what))
    return BaselineVerdict(BANK, tuple(sorted(prediction.covered)), tuple(differences))


def _difference(pcr: int, kind: str, event: TcgEvent, index: int, old: TcgEvent | None, new: TcgEvent | None,
                bank: str) -> Difference:
    return Difference(
        pcr=pcr, group=group_of(pcr), kind=kind, event_type=event.type_name, index=index,
        expected=None if old is None else old.digests[bank], found=None if new is None else new.digests[bank],
        expected_type=old.type_name if kind == TYPE_CHANGED and old is not None else None,
        variable=_variable(new, old),
    )


def _variable(new: TcgEvent | None, old: TcgEvent | None) -> str | None:
    """The UEFI variable an event measured (the observed one's, else the baseline's), if the parser read it."""
    for event in (new, old):
        if event is not None and event.type_name.startswith(_VARIABLE_EVENT) and event.decoded:
            name = event.decoded.get("name")
            if isinstance(name, str) and name:
                return name
    return None


def _named(type_name: str, variable: str | None) -> str:
    """TYPE_NAME, followed by VARIABLE when the type is one that measures a UEFI variable."""
    return f"{type_name} {variable}" if variable and type_name.startswith(_VARIABLE_EVENT) else type_name


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:_SHOWN_HEX] + "…"
