"""The host policy and the judgement of host evidence against it.

The policy is a reviewable JSON file (written by `tvorch host baseline`, read
by `tvorch host attest`): reference values for the boot PCRs, and an IMA
allowlist (path -> allowed digests) with the paths that must have been
measured (the binaries a trusted launch relies on) and the paths to ignore.

Judging is pure: the caller verifies the quote and replays the logs; this
module compares and collects every failure, so a verdict lists them all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ...errors import ConfigError
from ..codec import parse_json
from .quote import pcr_index

POLICY_VERSION = 1
_HEX = re.compile(r"[0-9a-f]+")
_FIELDS = {"version", "bank", "pcrs", "ima"}
_IMA_FIELDS = {"allowlist", "required", "excludes"}
# Paths no sensible IMA policy can allowlist by digest: they change all the time.
DEFAULT_EXCLUDES = ("/tmp/*", "/var/tmp/*", "/run/*", "/var/log/*", "/var/cache/*", "/proc/*", "/sys/*")


@dataclass(frozen=True)
class HostPolicy:
    bank: str
    pcrs: Mapping[int, str]  # PCR index -> expected hex value in BANK
    ima_allowlist: Mapping[str, frozenset[str]]  # path -> allowed hex file digests
    ima_required: tuple[str, ...]  # paths that must appear in the IMA log
    ima_excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))
        object.__setattr__(self, "ima_allowlist", MappingProxyType(dict(self.ima_allowlist)))


def policy_to_json(policy: HostPolicy) -> bytes:
    """Stable, indented JSON for review and diff (sorted keys, sorted digests)."""
    doc = {
        "version": policy.version,
        "bank": policy.bank,
        "pcrs": {str(i): policy.pcrs[i] for i in sorted(policy.pcrs)},
        "ima": {
            "allowlist": {p: sorted(d) for p, d in sorted(policy.ima_allowlist.items())},
            "required": sorted(policy.ima_required),
            "excludes": list(policy.ima_excludes),
        },
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _require(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ConfigError(f"host policy: '{where}' {what}")


def parse_policy(data: bytes, source: str = "host policy") -> HostPolicy:
    """Strict: an unknown or missing key, or a malformed value, is refused by name."""
    doc: Any = parse_json(data, source, ConfigError, top=None)
    _require(isinstance(doc, dict) and set(doc) == _FIELDS, "top level",
             f"must have exactly the keys {', '.join(sorted(_FIELDS))}")
    _require(doc["version"] == POLICY_VERSION, "version", f"must be {POLICY_VERSION}")
    _require(isinstance(doc["bank"], str), "bank", "must be a string")
    pcrs = doc["pcrs"]
    _require(isinstance(pcrs, dict), "pcrs", "must be an object")
    for key, value in pcrs.items():
        _require(pcr_index(key) is not None, f"pcrs.{key[:24]}", "is not a PCR index 0-23")
        _require(isinstance(value, str) and bool(_HEX.fullmatch(value)), f"pcrs.{key}", "must be lowercase hex")
    ima = doc["ima"]
    _require(isinstance(ima, dict) and set(ima) == _IMA_FIELDS, "ima",
             f"must have exactly the keys {', '.join(sorted(_IMA_FIELDS))}")
    allow = ima["allowlist"]
    _require(isinstance(allow, dict), "ima.allowlist", "must be an object")
    for path, digests in allow.items():
        _require(isinstance(digests, list) and all(isinstance(d, str) and _HEX.fullmatch(d) for d in digests),
                 f"ima.allowlist.{path}", "must be a list of lowercase hex digests")
    for key in ("required", "excludes"):
        _require(isinstance(ima[key], list) and all(isinstance(p, str) for p in ima[key]),
                 f"ima.{key}", "must be a list of paths")
    return HostPolicy(
        bank=doc["bank"],
        pcrs={int(k): v for k, v in pcrs.items()},
        ima_allowlist={p: frozenset(d) for p, d in allow.items()},
        ima_required=tuple(ima["required"]),
        ima_excludes=tuple(ima["excludes"]),
    )


@dataclass(frozen=True)
class HostEvidence:
    """What the caller established before judging (see tvorch.service.host)."""

    quoted_pcrs: Mapping[int, str]  # authenticated by a verified quote; empty if the quote failed
    quote_problem: str | None  # why the quote did not verify
    eventlog_pcrs: Mapping[int, str] | None  # replayed; None when the log is unusable
    eventlog_problem: str | None
    ima_pcr: str | None  # IMA log replayed to PCR 10; None when unusable
    ima_problems: tuple[str, ...]  # parse errors, bad template hashes, allowlist failures


def judge_host(policy: HostPolicy, evidence: HostEvidence, must_measure: tuple[str, ...]) -> tuple[str, ...]:
    """Every failure of the host's evidence against POLICY; empty when it passes.

    MUST_MEASURE are the binaries a trusted launch relies on (qemu, swtpm,
    libvirtd, tvorch's interpreter): the policy must require each of them.
    """
    failures: list[str] = []
    quoted = evidence.quoted_pcrs
    if evidence.quote_problem:
        failures.append(f"quote: {evidence.quote_problem}")
    for pcr in sorted(policy.pcrs):
        if evidence.quote_problem:
            break
        if pcr not in quoted:
            failures.append(f"PCR {pcr}: the policy needs it but the quote does not cover it")
        elif quoted[pcr] != policy.pcrs[pcr]:
            failures.append(f"PCR {pcr}: quoted {quoted[pcr][:16]}..., policy expects {policy.pcrs[pcr][:16]}...")
    if evidence.eventlog_problem:
        failures.append(f"event log: {evidence.eventlog_problem}")
    elif evidence.eventlog_pcrs is not None and not evidence.quote_problem:
        for pcr, value in sorted(evidence.eventlog_pcrs.items()):
            if pcr in quoted and quoted[pcr] != value:
                failures.append(f"PCR {pcr}: event log replays to {value[:16]}..., TPM quoted {quoted[pcr][:16]}...")
    failures.extend(f"IMA: {p}" for p in evidence.ima_problems)
    if evidence.ima_pcr is not None and not evidence.quote_problem:
        if 10 not in quoted:
            failures.append("PCR 10: the quote does not cover it, so the IMA log cannot be checked")
        elif quoted[10] != evidence.ima_pcr:
            failures.append(f"PCR 10: IMA log replays to {evidence.ima_pcr[:16]}..., TPM quoted {quoted[10][:16]}...")
    for path in must_measure:
        if path not in policy.ima_required:
            failures.append(f"policy: the IMA allowlist does not require {path}, which trusted launch relies on")
    return tuple(failures)
