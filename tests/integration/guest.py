"""Reading what the test guest reports on its serial console.

The guest's init prints lines starting with ``TVORCH-GUEST:`` (see
scripts/build-test-guest.sh); a test waits for ``ready`` and parses the rest:

    TVORCH-GUEST: tpm present /dev/tpm0          (or "tpm absent")
    TVORCH-GUEST: pcr sha256 N HEX               (PCRs 0-9)
    TVORCH-GUEST: eventlog-begin                 firmware event log, base64 lines
    TVORCH-GUEST: eventlog-end                   (nothing between: no log)
    TVORCH-GUEST: ekcert-begin                   RSA EK certificate (DER) from NV
    TVORCH-GUEST: ekcert-end                     index 0x01c00002, base64 lines
                  or "ekcert none" (no such index) or "ekcert error LINE"
    TVORCH-GUEST: nv stored HEX                  16-byte marker in owner NV index
                  or "nv found HEX"              0x01000100: "stored" when this boot
                  or "nv error LINE"             defined it, "found" when it was there
    TVORCH-GUEST: secureboot enabled|disabled|unknown
    TVORCH-GUEST: ready
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

PREFIX = "TVORCH-GUEST: "
NV_MARKER_KINDS = ("stored", "found", "error")
_HEX16 = re.compile(r"[0-9a-f]{32}")


class NvMarker(NamedTuple):
    """The guest's NV persistence marker (owner NV index 0x01000100).

    ``kind`` is ``stored`` (this boot defined the index and wrote ``value``),
    ``found`` (the index held ``value`` already: the vTPM's NV survived) or
    ``error`` (``value`` is the guest's one-line reason). A tuple, so
    ``report.nv == ("found", value)`` reads as it should.
    """

    kind: str
    value: str


@dataclass(frozen=True)
class GuestReport:
    tpm_present: bool
    pcrs: dict[int, str]
    eventlog: bytes
    secure_boot: str
    # DER bytes of the vTPM's RSA EK certificate; None when the guest found no
    # certificate index (or no TPM), or could not read it (see ek_cert_error).
    ek_cert: bytes | None = None
    ek_cert_error: str | None = None
    # None only from a guest that printed no "nv" line (built before tpm2-tools).
    nv: NvMarker | None = None


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


def _base64_block(lines: list[str], name: str) -> bytes | None:
    """The bytes between ``NAME-begin`` and ``NAME-end``; None without a begin marker."""
    begin, end = f"{PREFIX}{name}-begin", f"{PREFIX}{name}-end"
    if begin not in lines:
        return None
    start = lines.index(begin) + 1
    try:
        stop = lines.index(end, start)
    except ValueError:
        raise ValueError(f"guest report: {name}-begin without {name}-end") from None
    return base64.b64decode("".join(lines[start:stop]), validate=True)


def _nv_marker(rest: str) -> NvMarker:
    kind, _, value = rest.partition(" ")
    if kind not in NV_MARKER_KINDS:
        raise ValueError(f"guest report: unknown nv marker line {rest!r}")
    if kind != "error" and not _HEX16.fullmatch(value):
        raise ValueError(f"guest report: nv {kind} needs 32 hex digits, got {value!r}")
    return NvMarker(kind, value)


def parse_report(text: str) -> GuestReport:
    lines = [line.strip() for line in text.splitlines()]
    ours = [line[len(PREFIX):] for line in lines if line.startswith(PREFIX)]
    pcrs: dict[int, str] = {}
    tpm_present, secure_boot = False, "unknown"
    ek_cert_error: str | None = None
    nv: NvMarker | None = None
    for line in ours:
        words = line.split()
        if not words:
            continue
        if words[:2] == ["tpm", "present"]:
            tpm_present = True
        elif words[:2] == ["pcr", "sha256"]:
            pcrs[int(words[2])] = words[3]
        elif words[0] == "secureboot":
            secure_boot = words[1]
        elif words[:2] == ["ekcert", "error"]:
            ek_cert_error = line.split(" ", 2)[2] if len(words) > 2 else ""
        elif words[0] == "nv":
            nv = _nv_marker(line.split(" ", 1)[1] if len(words) > 1 else "")
    eventlog = _base64_block(lines, "eventlog") or b""
    ek_cert = _base64_block(lines, "ekcert")
    return GuestReport(tpm_present, pcrs, eventlog, secure_boot, ek_cert, ek_cert_error, nv)
