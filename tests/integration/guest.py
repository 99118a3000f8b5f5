"""Reading what the test guest reports on its serial console.

The guest's init prints lines starting with ``TVORCH-GUEST:`` (see
scripts/build-test-guest.sh); a test waits for ``ready`` and parses the rest.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "TVORCH-GUEST: "


@dataclass(frozen=True)
class GuestReport:
    tpm_present: bool
    pcrs: dict[int, str]
    eventlog: bytes
    secure_boot: str


def wait_for_ready(log: Path, timeout: float = 180.0) -> GuestReport:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if f"{PREFIX}ready" in text:
            return parse_report(text)
        time.sleep(1)
    tail = "\n".join(text.splitlines()[-15:])
    raise AssertionError(f"guest did not report ready within {timeout:.0f} s; console tail:\n{tail}")


def parse_report(text: str) -> GuestReport:
    lines = [line.strip() for line in text.splitlines()]
    ours = [line[len(PREFIX):] for line in lines if line.startswith(PREFIX)]
    pcrs: dict[int, str] = {}
    tpm_present, secure_boot = False, "unknown"
    for line in ours:
        words = line.split()
        if words[:2] == ["tpm", "present"]:
            tpm_present = True
        elif words[:2] == ["pcr", "sha256"]:
            pcrs[int(words[2])] = words[3]
        elif words[0] == "secureboot":
            secure_boot = words[1]
    eventlog = b""
    if f"{PREFIX}eventlog-begin" in lines:
        start = lines.index(f"{PREFIX}eventlog-begin") + 1
        end = lines.index(f"{PREFIX}eventlog-end", start)
        eventlog = base64.b64decode("".join(lines[start:end]))
    return GuestReport(tpm_present, pcrs, eventlog, secure_boot)
