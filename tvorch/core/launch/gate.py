"""The hook gate's judgement: what libvirt is about to start versus what was vouched for.

Pure: the hook adapter gathers the evidence (digests of what is on disk now,
the records tvorch keeps) and this module compares, collecting every reason
to refuse rather than stopping at the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# Where libvirt keeps a domain's UEFI variable store when its XML names none (it fills this in at
# define or start; tvorch never names another).
LIBVIRT_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
# Where libvirt's system qemu driver keeps managed save images (`virsh managedsave`): NAME.save.
LIBVIRT_SAVE_DIR = "/var/lib/libvirt/qemu/save"

# The measurement kinds that are files, re-checked at every start, and how a refusal names each.
FILE_KINDS = {
    "image-layer": "image layer",
    "firmware-code": "firmware code",
    "firmware-vars": "firmware vars template",
    "kernel": "kernel",
    "initrd": "initrd",
    "emulator": "emulator",
    "swtpm": "swtpm",
}


class Phase(str, Enum):
    """What a libvirt qemu hook call (operation, sub-operation) means to tvorch."""

    START = "start"  # about to run the guest: check, refuse on any mismatch
    STARTED = "started"  # the guest is running: record, so a stop can be told from a refused start
    RECONNECT = "reconnect"  # libvirtd restarted: check, but never refuse
    STOPPED = "stopped"  # the guest is gone: record
    RELEASED = "released"  # resources released, vTPM at rest: record its state
    IGNORED = "ignored"


_PHASES = {
    ("prepare", "begin"): Phase.START,
    ("start", "begin"): Phase.START,
    ("restore", "begin"): Phase.START,
    ("migrate", "begin"): Phase.START,
    ("started", "begin"): Phase.STARTED,
    ("reconnect", "begin"): Phase.RECONNECT,
    ("stopped", "end"): Phase.STOPPED,
    ("release", "end"): Phase.RELEASED,
}


def phase_of(operation: str, sub_operation: str) -> Phase:
    return _PHASES.get((operation, sub_operation), Phase.IGNORED)


@dataclass(frozen=True)
class FileEvidence:
    """One file the launch measured (an image layer, the firmware, kernel, initrd, emulator, swtpm), now."""

    path: str
    expected: str  # digest in the manifest
    actual: str | None  # digest now; None when it could not be read
    problem: str | None = None  # why it could not be read
    kind: str = "image-layer"  # one of FILE_KINDS


@dataclass(frozen=True)
class StartEvidence:
    """Everything the hook observed for one tvorch instance about to start."""

    manifest_in_xml: str | None  # digest named by the domain's metadata
    manifest_stored: str  # sha256 of the manifest tvorch keeps for the instance
    config_now: str  # canonical digest of the XML libvirt passed
    config_manifest: str
    files: tuple[FileEvidence, ...]  # every measured file, image layers base first
    overlay_problem: str | None  # None when the overlay is the one tvorch created
    vtpm_now: str | None  # digest of the vTPM state on disk; None if there is none yet
    vtpm_recorded: str | None  # last ledger entry; None before the first stop
    host_problem: str | None  # None when the host verdict allows starting
    vtpm_pending: bool = False  # a vTPM restore began and was not recorded as done
    nvram_path: str | None = None  # the instance's UEFI variable store; None without UEFI vars
    nvram_now: str | None = None  # its digest (the template's when libvirt would copy it); None if unreadable
    nvram_recorded: str | None = None  # last NVRAM ledger entry; None when there is none


def start_refusals(e: StartEvidence) -> tuple[str, ...]:
    """Every reason not to start; empty when everything matches."""
    reasons: list[str] = []
    if e.manifest_in_xml != e.manifest_stored:
        reasons.append(
            f"domain metadata names manifest {_short(e.manifest_in_xml)}, the instance's is {_short(e.manifest_stored)}"
        )
    if e.config_now != e.config_manifest:
        reasons.append(
            f"configuration changed since launch (digest {_short(e.config_now)}, manifest {_short(e.config_manifest)})"
        )
    for f in e.files:
        what = FILE_KINDS.get(f.kind, f.kind)
        if f.actual is None:
            reasons.append(f"{what} {f.path}: {f.problem}")
        elif f.actual != f.expected:
            reasons.append(f"{what} {f.path} changed (sha256 {_short(f.actual)}, manifest {_short(f.expected)})")
    if e.overlay_problem:
        reasons.append(e.overlay_problem)
    if e.vtpm_recorded is not None and e.vtpm_now != e.vtpm_recorded:
        found = _short(e.vtpm_now) if e.vtpm_now else "no state"
        reasons.append(f"vTPM state differs from the last recorded stop ({found}, recorded "
                       f"{_short(e.vtpm_recorded)}): rollback or tampering")
    if e.nvram_recorded is not None and e.nvram_now != e.nvram_recorded:
        found = _short(e.nvram_now) if e.nvram_now else "unreadable"
        reasons.append(f"NVRAM {e.nvram_path} differs from the last recorded stop ({found}, recorded "
                       f"{_short(e.nvram_recorded)}): UEFI variables replaced or rolled back")
    if e.vtpm_pending:
        reasons.append("a vTPM restore was interrupted and is not settled (`tvorch reconcile` settles it)")
    if e.host_problem:
        reasons.append(e.host_problem)
    return tuple(reasons)


def _short(digest: str | None) -> str:
    return f"sha256:{digest[:12]}" if digest else "none"


_NVRAM = re.compile(r"<nvram\b[^>]*>([^<]+)</nvram>")


def nvram_path(xml: str, name: str) -> str:
    """The UEFI variable store the domain's QEMU uses: the path libvirt's XML names, else libvirt's
    default for the domain (what it fills in at define or start)."""
    found = _NVRAM.search(xml)
    return found.group(1).strip() if found else f"{LIBVIRT_NVRAM_DIR}/{name}_VARS.fd"


def managed_save_path(name: str) -> str:
    return f"{LIBVIRT_SAVE_DIR}/{name}.save"


def start_path_refusal(name: str, sealed: bool, key_lent: bool, restoring: bool, saved_digest: str | None,
                       image_digest: str | None) -> str | None:
    """Why a start of instance NAME cannot go this way, before anything is measured; None when it may.

    SEALED: its vTPM key is sealed to the host TPM, so libvirt holds it only while tvorch lends it
    (KEY_LENT): any other start (`virsh start`, libvirt's autostart, libvirt-guests) would fail on a
    missing secret, and is told which command works instead. RESTORING: libvirt resumes it from a save
    image, which carries the vTPM state too: only the image `tvorch save` made (SAVED_DIGEST, valid until
    the next stop) may be resumed, never an older copy (IMAGE_DIGEST: the image's digest now)."""
    if sealed and not key_lent:
        return (f"its vTPM key is sealed to this host's TPM and libvirt gets it only from tvorch, for one start: "
                f"start it with `tvorch start {name}`")
    if not restoring:
        return None
    if saved_digest is None:
        return (f"its save image was not made by `tvorch save` or is older than its last stop (resuming it would "
                f"roll its vTPM back): remove it with `virsh managedsave-remove {name}`, then `tvorch start {name}`")
    if image_digest != saved_digest:
        return (f"its save image is not the one `tvorch save` made (sha256:{image_digest or 'unreadable'}, "
                f"recorded sha256:{saved_digest}): remove it with `virsh managedsave-remove {name}`, "
                f"then `tvorch start {name}`")
    return None
