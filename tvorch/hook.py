"""`tvorch hook`: libvirt's qemu hook, run by libvirtd on every domain operation.

libvirtd waits for this process and, on `prepare`/`start`/`restore`/`migrate
begin`, refuses to start the guest when it exits non-zero, showing its stderr.
So the path must be fast and self-contained: it never calls libvirt (libvirtd
would deadlock), imports neither libvirt, tpm2_pytss, structlog nor
cryptography, reads digests from the cache instead of hashing unchanged
images, writes nothing on stdout (libvirt takes stdout of `migrate`/`restore`
as replacement XML), and has a hard deadline: past it, a start is refused and
anything else is let through.

Invoked as `python -m tvorch.hook NAME OPERATION SUB_OPERATION EXTRA` with the
domain XML on stdin (which is also what the `hooks/qemu` shim does), or as
`tvorch hook ...`.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import time
from pathlib import Path
from types import FrameType

from .adapters.digests import measure_file, sha256_file
from .adapters.imagefiles import overlay_problem
from .adapters.store import Store
from .adapters.vtpm_state import state_digest
from .config import Config, load_config
from .core.launch.canonical import autoselection_hint, config_digest
from .core.launch.metadata import parse_instance_metadata
from .core.launch.gate import (FILE_KINDS, FileEvidence, Phase, StartEvidence, managed_save_path, nvram_path,
                               phase_of, start_path_refusal, start_refusals)
from .core.attestation.hostverdict import host_problem
from .core.launch.manifest_format import Measurement, manifest_digest, stored_manifest
from .core.launch.instance import InstanceRecord, InstanceState
from .service.owned_files import stranger_refusals
from .errors import StoreError, TvorchError, describe_os_error

ALLOW, REFUSE = 0, 1


class DeadlineExceeded(Exception):
    pass


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise DeadlineExceeded


def gather(
    cfg: Config, store: Store, record: InstanceRecord, meta_manifest: str | None, xml: str, running: bool
) -> StartEvidence:
    """Observe what is on disk now for RECORD, for the pure judgement in core.launch.gate.

    RUNNING (a reconnect): swtpm is using the vTPM state, so it is not compared.
    """
    body = store.manifest(record.id)
    if body is None:
        raise StoreError(f"instance {record.id} has no launch manifest in the store")
    manifest = stored_manifest(body)
    measurements = manifest.measurements
    # Every file the launch measured, not only the image: the digest cache keeps the unchanged ones cheap.
    files = []
    for m in measurements:
        if m.kind not in FILE_KINDS or not m.path:
            continue
        try:
            files.append(FileEvidence(m.path, m.digest, measure_file(m.path, store).digest, kind=m.kind))
        except TvorchError as err:
            files.append(FileEvidence(m.path, m.digest, None, str(err), kind=m.kind))
    layers = [f for f in files if f.kind == "image-layer"]
    top = layers[-1].path if layers else None
    last = None if running else store.last_ledger_entry(record.id)
    nvram = (None, None, None) if running else _nvram_evidence(store, record, measurements, xml)
    host = None
    if cfg.policy.host_verdict == "require":
        host = host_problem(store.latest_host_verdict(), time.time(), cfg.host.verdict_max_age)
    return StartEvidence(
        manifest_in_xml=meta_manifest,
        manifest_stored=manifest_digest(body),
        config_now=config_digest(xml, autoselection_hint(record.domain_xml, measurements)),
        config_manifest=manifest.config_digest,
        files=tuple(files),
        overlay_problem=overlay_problem(record.overlay, store.overlay_identity(record.id), top),
        vtpm_now=None if running else state_digest(Path(cfg.swtpm_state_dir) / record.uuid),
        vtpm_recorded=last.state_digest if last else None,
        host_problem=host,
        vtpm_pending=not running and store.vtpm_pending(record.id) is not None,
        nvram_path=nvram[0],
        nvram_now=nvram[1],
        nvram_recorded=nvram[2],
    )


def _nvram_evidence(
    store: Store, record: InstanceRecord, measurements: tuple[Measurement, ...], xml: str
) -> tuple[str | None, str | None, str | None]:
    """(path, digest now, last ledgered digest) of the instance's UEFI variable store; Nones when it
    has none (SeaBIOS) or no NVRAM ledger yet (launched before tvorch kept one)."""
    template = next((m.digest for m in measurements if m.kind == "firmware-vars"), None)
    last = store.last_ledger_entry(record.id, "nvram_ledger") if template is not None else None
    if last is None:
        return None, None, None
    path = nvram_path(xml, record.name)
    if not os.path.lexists(path):
        return path, template, last.state_digest  # libvirt makes it from the (re-checked) template
    return path, _digest_or_none(path), last.state_digest


def _digest_or_none(path: str) -> str | None:
    try:
        return sha256_file(path)
    except TvorchError:
        return None


def _nvram_at_rest(xml: str, name: str) -> str | None:
    """Digest of the domain's UEFI variable store as QEMU left it; None without UEFI vars."""
    if "<nvram" not in xml:
        return None
    path = nvram_path(xml, name)
    return _digest_or_none(path) if os.path.isfile(path) else None


def _record_stop(cfg: Config, store: Store, record: InstanceRecord, phase: Phase, name: str, op: str,
                 xml: str) -> None:
    """Ledger the vTPM state and NVRAM at rest, but only when closing a run: one this hook allowed and
    libvirt started (`started begin` after an allowed start). libvirt also calls stopped/release after
    a refused or failed start, and recording then would bless the very state (say, a rolled-back copy)
    that was just refused."""
    migration = store.migration(record.id) if phase is Phase.RELEASED else None
    if migration is not None and migration["direction"].startswith("out"):
        # The source's QEMU stops when the migration completes: its state here is no longer the vTPM's.
        store.add_hook_event(record.id, name, op, "recorded", ("migrated away: nothing recorded here",))
        return
    if phase is Phase.STOPPED or not store.run_open(record.id):
        ran = store.run_open(record.id)
        store.add_hook_event(record.id, name, op, "recorded",
                             ("guest stopped" if ran else "start did not happen; nothing recorded",))
        return
    store.close_run(record.id, name, op, state_digest(Path(cfg.swtpm_state_dir) / record.uuid),
                    _nvram_at_rest(xml, record.name))


_BOOT_FILE = re.compile(r"<(kernel|initrd)>([^<]+)</\1>")


def _protect_boot_files(cfg: Config, xml: str) -> tuple[str, ...]:
    """libvirt hands the direct-boot kernel and initrd to the qemu user for the whole run, so any QEMU
    could rewrite them. An instance launched before tvorch staged them (boot_files_dir's read-only view,
    which libvirt cannot chown) boots the operator's own files: QEMU has read them by `started begin`
    (the guest has not run yet), so give them back to root, not writable by group or others, for the
    rest of the run. Returns what failed."""
    problems = []
    view = cfg.boot_files_dir.rstrip("/") + "/"
    for _, path in _BOOT_FILE.findall(xml):
        if path.startswith(view):
            continue
        try:
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                os.chown(path, 0, 0, follow_symlinks=False)
                os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)
        except OSError as err:
            problems.append(f"cannot give {path} back to root: {err.strerror}")
    return tuple(problems)


def boot_view_problem(cfg: Config, xml: str) -> str | None:
    """Staged direct-boot files are read through a read-only mount that a reboot takes away: make it
    again before they are re-checked, and before libvirt would chown them (adapters.boot_files)."""
    view = cfg.boot_files_dir.rstrip("/") + "/"
    if not any(path.startswith(view) for _, path in _BOOT_FILE.findall(xml)):
        return None
    from .adapters.boot_files import ensure_view  # ctypes: only for a direct boot

    try:
        ensure_view(cfg.state_dir, cfg.boot_files_dir)
    except TvorchError as err:
        return str(err)
    return None


_UUID = re.compile(r"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def _stripped(cfg: Config, name: str, xml: str, uuid: re.Match[str] | None, op: str) -> tuple[int, str | None]:
    """A domain without tvorch metadata is not an instance, so nothing of an instance's may be in it: not an
    instance's UUID (its metadata was removed, which would otherwise take it past every check), nor a file
    tvorch owns (a copy under a new name and UUID would run the tenant's overlay with a vTPM libvirt makes,
    recorded nowhere: service.owned_files). Refused; any other domain passes."""
    store = Store(cfg.db_path) if cfg.db_path.exists() else None
    try:
        if store is not None and uuid is not None and (record := store.by_uuid(uuid.group(1).lower())):
            reason = f"its tvorch metadata was removed (instance {record.id}); configuration changed since launch"
            store.add_hook_event(record.id, name, op, "refused", (reason,))
            return REFUSE, f"tvorch: refused to start {name}: {reason}"
        reasons = stranger_refusals(cfg, store, xml, uuid.group(1).lower() if uuid is not None else None)
        if not reasons:
            return ALLOW, None
        if store is not None:  # under the domain's name: the instances it names did not ask for this start
            store.add_hook_event(None, name, op, "refused", reasons)
        return REFUSE, f"tvorch: refused to start {name}: not a tvorch instance, yet " + "; ".join(reasons)
    finally:
        if store is not None:
            store.close()


def decide(argv: list[str], xml: str, cfg: Config) -> tuple[int, str | None]:
    """(exit status, reason line) for one hook call; records the decision."""
    name, operation, sub_operation = (argv + ["", "", ""])[:3]
    phase = phase_of(operation, sub_operation)
    if phase is Phase.IGNORED:
        return ALLOW, None
    meta = parse_instance_metadata(xml) if xml.strip() else None
    op = f"{operation} {sub_operation}"
    if meta is None:
        if phase is Phase.START and cfg.policy.require_tvorch_domains:
            return _refused_on_record(cfg, None, name, op, "not launched by tvorch (policy.require_tvorch_domains)")
        if phase is Phase.START:
            return _stripped(cfg, name, xml, _UUID.search(xml), op)
        return ALLOW, None
    store = Store(cfg.db_path, busy_timeout_ms=cfg.hook_deadline_ms)
    try:
        record = store.by_id(meta.instance_id)
        if record is None or record.name != name:
            reason = f"domain {name} claims tvorch instance {meta.instance_id}, which this node did not launch"
            store.add_hook_event(None, name, op, "refused" if phase is Phase.START else "warning", (reason,))
            return (REFUSE, f"tvorch: refused to start {name}: {reason}") if phase is Phase.START else (ALLOW, None)
        if record.state is InstanceState.MIGRATED and phase is Phase.START:
            return _refused_on_record(cfg, record.id, name, op, "it migrated to another node and runs there; this "
                                      "node keeps only its tombstone (a second copy would be a clone)")
        if phase is Phase.STARTED:
            problems = _protect_boot_files(cfg, xml)
            store.begin_run(record.id, name, op)
            if problems:
                store.add_hook_event(record.id, name, op, "warning", problems)
            return ALLOW, None
        if phase in (Phase.STOPPED, Phase.RELEASED):
            _record_stop(cfg, store, record, phase, name, op, xml)
            return ALLOW, None
        if phase is Phase.START:
            # First, before anything slow: whatever this start was allowed before no longer counts.
            store.open_start_check(record.id)
            path_refusal = _start_path(store, record, operation)
            if path_refusal is not None:
                store.record_start_decision(record.id, name, op, (path_refusal,))
                return REFUSE, f"tvorch: refused to start {name}: {path_refusal}"
            view_problem = boot_view_problem(cfg, xml)
            if view_problem is not None:
                store.record_start_decision(record.id, name, op, (view_problem,))
                return REFUSE, f"tvorch: refused to start {name}: {view_problem}"
        # An incoming migration's vTPM state and NVRAM arrive in QEMU's stream: nothing at rest to compare.
        in_flight = phase is Phase.RECONNECT or record.state is InstanceState.INCOMING
        evidence = gather(cfg, store, record, meta.manifest_digest, xml, running=in_flight)
        reasons = start_refusals(evidence)
        if phase is Phase.RECONNECT:
            # A failing reconnect hook makes libvirtd kill a running guest: warn only.
            store.add_hook_event(record.id, name, op, "warning" if reasons else "allowed", reasons)
            return ALLOW, None
        store.record_start_decision(record.id, name, op, reasons)
        if reasons:
            return REFUSE, f"tvorch: refused to start {name}: " + "; ".join(reasons)
        return ALLOW, None
    finally:
        store.close()


def _start_path(store: Store, record: InstanceRecord, operation: str) -> str | None:
    """Whether this start can go this way at all (core.launch.gate.start_path_refusal): a sealed vTPM key lent by
    tvorch, and for a restore (libvirt resumes from the managed save image whenever there is one) the save
    image tvorch made."""
    vtpm = store.vtpm(record.id)
    sealed = vtpm is not None and vtpm.encrypted and vtpm.sealed_key is not None
    image = managed_save_path(record.name)
    restoring = operation == "restore" or os.path.exists(image)
    saved = store.managed_save(record.id) if restoring else None
    digest = None
    if saved is not None:
        try:
            digest = measure_file(saved[0], store).digest if saved[0] == image else None
        except TvorchError:
            digest = None
    return start_path_refusal(record.name, sealed, store.key_lent(record.id), restoring,
                              saved[1] if saved else None, digest)


# Of a start's deadline, the share (at most RECORD_MAX_S) kept to record a refusal when the decision overruns.
RECORD_SHARE, RECORD_MAX_S = 0.25, 1.0


def deadline_reason(name: str, deadline_ms: int) -> str:
    """Why a start was refused at the deadline, and what the operator does about it."""
    return (f"the hook's deadline (hook_deadline_ms = {deadline_ms}) passed before a decision: a file the launch "
            f"measured is not in the digest cache (new, or its ctime changed) and takes longer to hash; "
            f"`tvorch check {name}` hashes them outside the hook, then start it again")


def _refused_on_record(cfg: Config, instance_id: str | None, name: str, op: str, reason: str) -> tuple[int, str]:
    store = Store(cfg.db_path, busy_timeout_ms=cfg.hook_deadline_ms)
    try:
        store.refuse_start(instance_id, name, op, (reason,))
    finally:
        store.close()
    return REFUSE, f"tvorch: refused to start {name}: {reason}"


def _record_undecided(cfg: Config, args: list[str], xml: str, reason: str, seconds: float) -> None:
    """Put a start refused without a decision (the deadline, an error) on record within SECONDS, under the
    instance the XML names, clearing its allowance and run. Best effort: the hook cleared those before
    judging anyway, so a refusal this cannot record still opens no run."""
    name, operation, sub_operation = (args + ["", "", ""])[:3]
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        try:
            meta = parse_instance_metadata(xml) if xml.strip() else None
        except TvorchError:
            meta = None
        store = Store(cfg.db_path, busy_timeout_ms=max(1, int(seconds * 1000)))
        try:
            record = store.by_id(meta.instance_id) if meta is not None else None
            instance_id = record.id if record is not None and record.name == name else None
            store.refuse_start(instance_id, name, f"{operation} {sub_operation}", (reason,))
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - the deadline, a store that cannot be opened: the refusal stands anyway
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _read_stdin() -> str:
    """libvirt writes UTF-8; anything undecodable cannot match a manifest anyway."""
    raw = getattr(sys.stdin, "buffer", None)
    return raw.read().decode("utf-8", "replace") if raw is not None else sys.stdin.read()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Nothing libvirtd left open (its sockets, its locks) stays open in here.
    os.closerange(3, 1024)
    phase = phase_of(*(args + ["", "", ""])[1:3])
    if phase is Phase.IGNORED:
        return ALLOW  # attach, detach, migrate end ...: nothing to read, nothing to decide
    fail = REFUSE if phase is Phase.START else ALLOW
    name = args[0] if args else ""
    signal.signal(signal.SIGALRM, _on_alarm)
    cfg: Config | None = None
    xml, reserve, undecided = "", 0.0, None
    try:
        cfg = load_config()
        deadline = cfg.hook_deadline_ms / 1000
        # A start keeps part of its deadline to put a refusal on record when the decision overruns.
        reserve = min(deadline * RECORD_SHARE, RECORD_MAX_S) if fail else 0.0
        signal.setitimer(signal.ITIMER_REAL, deadline - reserve)
        xml = _read_stdin()
        status, line = decide(args, xml, cfg)
    except DeadlineExceeded:
        if fail:
            undecided = deadline_reason(name, cfg.hook_deadline_ms if cfg else 0)
            status, line = fail, f"tvorch: refused to start {name}: {undecided}"
        else:
            status, line = fail, "tvorch: hook deadline passed before a decision"
    except TvorchError as err:
        undecided = f"hook error: {err}"
        status, line = fail, f"tvorch: {undecided}"
    except OSError as err:
        undecided = f"hook error: {describe_os_error(err)}"
        status, line = fail, f"tvorch: {undecided}"
    except Exception as err:  # a bug must not let an unchecked start through
        undecided = f"hook internal error: {type(err).__name__}: {err}"
        status, line = fail, f"tvorch: {undecided}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if undecided is not None and fail and cfg is not None:
        _record_undecided(cfg, args, xml, undecided, reserve)
    if line:
        print(" ".join(line.split()), file=sys.stderr)
    return status


if __name__ == "__main__":
    status = main()
    # Skip the interpreter's teardown (milliseconds on libvirt's critical
    # path): the store is closed and nothing is registered to run at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
