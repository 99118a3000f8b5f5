"""A throwaway firmware reference VM: boot it, read its firmware event log from its memory, remove it.

The VM is a domain tvorch renders like any launch (core.launch.domain_xml), with an
empty raw disk and without tvorch's metadata (it is no instance: the hook
lets it start and reconcile ignores it). OVMF finds nothing to boot on the
disk after it has measured everything up to the separators; a memory-only
dump then holds the log (core.boot.firmware_reference.event_log_in_memory). The
domain, its NVRAM, its vTPM state, the disk and the dump are removed whatever
happens, the dump as soon as it is read.
"""

from __future__ import annotations

import mmap
import os
import shutil
import time
from pathlib import Path

from ..core.attestation.eventlog import EventLog
from ..core.boot.firmware_reference import event_log_in_memory, reference_events
from ..errors import EvidenceError, OperationTimeout, TvorchError
from ..logs import get_logger
from .files import ensure_private_dir
from .hypervisor import Hypervisor

log = get_logger(__name__)

EMPTY_DISK_BYTES = 64 * 1024 * 1024
FIRST_LOOK_S = 4.0  # OVMF under TCG needs at least this long to reach its boot options
POLL_S = 3.0


def make_empty_disk(path: Path) -> None:
    """A sparse raw disk of zeros: no partition table, nothing to boot."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, EMPTY_DISK_BYTES)
    finally:
        os.close(fd)


def boot_and_read_log(hv: Hypervisor, name: str, xml: str, work_dir: Path, dump_dir: Path,
                      timeout: float) -> EventLog:
    """Define and start NAME from XML, return its firmware event log once PCRs 0-7 have their separators.

    WORK_DIR (the disk, the console log) and the domain are removed on the
    way out, whatever happened.
    """
    ensure_private_dir(dump_dir)
    dump = dump_dir / f"{name}.dump"
    defined = False
    try:
        hv.define(xml)
        defined = True
        started = time.monotonic()
        hv.start(name)
        time.sleep(FIRST_LOOK_S)
        last: EvidenceError | None = None
        while True:
            hv.dump_memory(name, str(dump))
            try:
                found = _read_dump(dump)
                reference_events(found)  # every separator there: the firmware is done with PCRs 0-7
                log.info("firmware_reference_booted", name=name, seconds=round(time.monotonic() - started, 1))
                return found
            except EvidenceError as err:
                last = err
            if time.monotonic() - started > timeout:
                raise OperationTimeout(f"firmware reference VM {name}: no complete event log within {timeout:g} s "
                                       f"({last})")
            time.sleep(POLL_S)
    finally:
        _remove(hv, name, defined)
        for path in (dump,):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(work_dir, ignore_errors=True)


def _read_dump(path: Path) -> EventLog:
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as memory:
            return event_log_in_memory(memory)
    finally:
        path.unlink()


def _remove(hv: Hypervisor, name: str, defined: bool) -> None:
    if not defined:
        return
    for what, step in (("power off", lambda: hv.power_off(name)),
                       ("undefine", lambda: hv.undefine(name, purge_tpm=True))):
        try:
            step()
        except TvorchError as err:
            log.error("firmware_reference_cleanup_failed", name=name, step=what, error=str(err))
