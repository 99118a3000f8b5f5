"""Predicted boot measurements: what a VM's vTPM will hold, computed before it runs.

Pure: the events tvorch can compute from files (boot applications, the GPT,
UKI sections, Secure Boot variables) and those kept from a firmware reference
boot are both ``PredictedEvent``; a ``Prediction`` is their ordered list and
the PCR values it replays to, for the PCRs it covers. A first boot is judged
against it event by event, so a difference names the PCR and the event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

BANK = "sha256"
ZERO = "00" * 32


class EventSource(str, Enum):
    """Where a predicted event's digest came from."""

    COMPUTED = "computed"  # from the files themselves (image, kernel, vars template)
    FIRMWARE_REFERENCE = "firmware-reference"  # kept from a reference boot of the same firmware and platform


@dataclass(frozen=True)
class PredictedEvent:
    """One measurement the vTPM will receive, in log order within its PCR."""

    pcr: int
    type_name: str  # as tvorch.core.attestation.eventlog names event types, e.g. "EV_EFI_BOOT_SERVICES_APPLICATION"
    digest: str  # sha256, lowercase hex
    what: str  # what was measured, for people: r"\EFI\BOOT\BOOTX64.EFI (Authenticode)", "separator"
    source: EventSource = EventSource.COMPUTED

    def to_json(self) -> dict[str, object]:
        return {"pcr": self.pcr, "type": self.type_name, "digest": self.digest, "what": self.what,
                "source": self.source.value}


def extend(value: str, digest: str) -> str:
    """PCR_new = H(PCR_old || digest), in hex."""
    return hashlib.sha256(bytes.fromhex(value) + bytes.fromhex(digest)).hexdigest()


def replay(events: Iterable[PredictedEvent]) -> dict[int, str]:
    """The sha256 PCR values EVENTS extend to, from all-zero PCRs (the locality-0 start of every PCR here)."""
    pcrs: dict[int, str] = {}
    for event in events:
        pcrs[event.pcr] = extend(pcrs.get(event.pcr, ZERO), event.digest)
    return pcrs


@dataclass(frozen=True)
class Prediction:
    """The predicted events of the PCRs in COVERED, and the values they replay to."""

    events: tuple[PredictedEvent, ...]
    covered: frozenset[int]
    pcrs: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "covered", frozenset(self.covered))
        stray = sorted({e.pcr for e in self.events} - self.covered)
        if stray:
            raise ValueError(f"predicted events on PCRs {stray} that the prediction does not cover")
        replayed = replay(self.events)
        object.__setattr__(self, "pcrs", MappingProxyType({p: replayed.get(p, ZERO) for p in sorted(self.covered)}))

    def to_json(self) -> dict[str, object]:
        return {"bank": BANK, "covered": sorted(self.covered), "pcrs": {str(p): v for p, v in self.pcrs.items()},
                "events": [e.to_json() for e in self.events]}
