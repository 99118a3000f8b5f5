"""Reference values and the launch policy check against them.

A reference value is a digest the operator trusts for one kind of measured
thing (an image layer, a firmware file, the emulator ...). The check collects
every failure instead of stopping at the first, so one refusal names all that
did not match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# Measured things whose digests can be required to match a reference value.
REFERENCE_KINDS = ("image", "firmware", "kernel", "initrd", "emulator", "swtpm")
# Those `tvorch reference` manages; images go through `tvorch image trust`, which checks the backing chain.
FILE_REFERENCE_KINDS = REFERENCE_KINDS[1:]


@dataclass(frozen=True)
class ReferenceValue:
    kind: str
    digest: str
    label: str
    path: str  # where it was measured when trusted (informational)
    size: int
    signer: str | None  # subject of the certificate that signed it, if any
    added_at: str

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind, "digest": self.digest, "label": self.label, "path": self.path,
            "size": self.size, "signer": self.signer, "added_at": self.added_at,
        }


@dataclass(frozen=True)
class Checked:
    """One measured file as the policy sees it."""

    kind: str  # one of REFERENCE_KINDS
    path: str
    digest: str


@dataclass(frozen=True)
class PolicyFailure:
    kind: str
    path: str
    digest: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path} (sha256:{self.digest[:16]}...) is not a trusted reference value"


@dataclass(frozen=True)
class PolicyVerdict:
    failures: tuple[PolicyFailure, ...]
    waived: tuple[PolicyFailure, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def reason(self) -> str:
        return "; ".join(str(f) for f in self.failures)


def check_references(
    measured: Iterable[Checked],
    trusted: set[tuple[str, str]],
    required_kinds: Iterable[str],
    waive_kinds: Iterable[str] = (),
) -> PolicyVerdict:
    """Every measurement of a required kind must be in TRUSTED (kind, digest) pairs.

    Failures of a kind in WAIVE_KINDS (an operator's explicit, policy-permitted
    override) are reported as waived instead of failing the verdict.
    """
    required, waived_kinds = set(required_kinds), set(waive_kinds)
    failures: list[PolicyFailure] = []
    waived: list[PolicyFailure] = []
    for m in measured:
        if m.kind in required and (m.kind, m.digest) not in trusted:
            (waived if m.kind in waived_kinds else failures).append(PolicyFailure(m.kind, m.path, m.digest))
    return PolicyVerdict(tuple(failures), tuple(waived))
