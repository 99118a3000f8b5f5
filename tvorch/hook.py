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

import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .adapters.digests import measure_file
from .adapters.imagefiles import overlay_problem
from .adapters.store import Store
from .adapters.vtpm_state import state_digest
from .config import Config, load_config
from .core.canonical import autoselection_hint, config_digest
from .core.metadata import parse_instance_metadata
from .core.gate import LayerEvidence, Phase, StartEvidence, phase_of, start_refusals
from .core.hostverdict import host_problem
from .core.instance import InstanceRecord
from .errors import StoreError, TvorchError, describe_os_error

ALLOW, REFUSE = 0, 1


class DeadlineExceeded(Exception):
    pass


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise DeadlineExceeded


def gather(
    cfg: Config, store: Store, record: InstanceRecord, meta_manifest: str | None, xml: str, running: bool
) -> StartEvidence:
    """Observe what is on disk now for RECORD, for the pure judgement in core.gate.

    RUNNING (a reconnect): swtpm is using the vTPM state, so it is not compared.
    """
    body = store.manifest(record.id)
    if body is None:
        raise StoreError(f"instance {record.id} has no launch manifest in the store")
    manifest = json.loads(body)["manifest"]
    measurements = manifest["measurements"]
    layers = []
    for m in (m for m in measurements if m["kind"] == "image-layer"):
        try:
            layers.append(LayerEvidence(m["path"], m["digest"], measure_file(m["path"], store).digest))
        except TvorchError as err:
            layers.append(LayerEvidence(m["path"], m["digest"], None, str(err)))
    top = layers[-1].path if layers else None
    last = None if running else store.last_ledger_entry(record.id)
    host = None
    if cfg.policy.host_verdict == "require":
        host = host_problem(store.latest_host_verdict(), time.time(), cfg.host.verdict_max_age)
    return StartEvidence(
        manifest_in_xml=meta_manifest,
        manifest_stored=hashlib.sha256(body).hexdigest(),
        config_now=config_digest(xml, autoselection_hint(record.domain_xml, measurements)),
        config_manifest=manifest["config_digest"],
        layers=tuple(layers),
        overlay_problem=overlay_problem(record.overlay, store.overlay_identity(record.id), top),
        vtpm_now=None if running else state_digest(Path(cfg.swtpm_state_dir) / record.uuid),
        vtpm_recorded=last.state_digest if last else None,
        host_problem=host,
        vtpm_pending=not running and store.vtpm_pending(record.id) is not None,
    )


def _record_stop(cfg: Config, store: Store, record: InstanceRecord, phase: Phase) -> str:
    """Ledger the vTPM state at rest, but only after a run: libvirt also calls
    stopped/release after a refused start, and recording then would bless the
    very state (say, a rolled-back copy) that was just refused."""
    ran = store.last_hook_operation(record.id, _START_OPERATIONS) == "started begin"
    if not ran:
        return "start did not happen; nothing recorded"
    if phase is Phase.STOPPED:
        return "guest stopped"
    digest = state_digest(Path(cfg.swtpm_state_dir) / record.uuid)
    if digest is None:
        return "no vTPM state"
    store.append_ledger(record.id, "stopped", digest)
    return f"vTPM state sha256:{digest}"


_UUID = re.compile(r"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")


def _stripped(cfg: Config, name: str, uuid: re.Match[str] | None, op: str) -> tuple[int, str | None]:
    """A domain without tvorch metadata that is one of tvorch's instances (its UUID): its metadata was
    removed, which would otherwise take it past every check. Refused; any other domain passes."""
    if uuid is None or not cfg.db_path.exists():
        return ALLOW, None
    store = Store(cfg.db_path)
    try:
        record = store.by_uuid(uuid.group(1).lower())
        if record is None:
            return ALLOW, None
        reason = f"its tvorch metadata was removed (instance {record.id}); configuration changed since launch"
        store.add_hook_event(record.id, name, op, "refused", (reason,))
        return REFUSE, f"tvorch: refused to start {name}: {reason}"
    finally:
        store.close()


_START_OPERATIONS = ("prepare begin", "start begin", "restore begin", "migrate begin", "started begin")


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
            return REFUSE, f"tvorch: refused to start {name}: not launched by tvorch (policy.require_tvorch_domains)"
        if phase is Phase.START:
            return _stripped(cfg, name, _UUID.search(xml), op)
        return ALLOW, None
    store = Store(cfg.db_path)
    try:
        record = store.by_id(meta.instance_id)
        if record is None or record.name != name:
            reason = f"domain {name} claims tvorch instance {meta.instance_id}, which this node did not launch"
            store.add_hook_event(None, name, op, "refused" if phase is Phase.START else "warning", (reason,))
            return (REFUSE, f"tvorch: refused to start {name}: {reason}") if phase is Phase.START else (ALLOW, None)
        if phase is Phase.STARTED:
            store.add_hook_event(record.id, name, op, "recorded", ("guest running",))
            return ALLOW, None
        if phase in (Phase.STOPPED, Phase.RELEASED):
            store.add_hook_event(record.id, name, op, "recorded", (_record_stop(cfg, store, record, phase),))
            return ALLOW, None
        evidence = gather(cfg, store, record, meta.manifest_digest, xml, running=phase is Phase.RECONNECT)
        reasons = start_refusals(evidence)
        if phase is Phase.RECONNECT:
            # A failing reconnect hook makes libvirtd kill a running guest: warn only.
            store.add_hook_event(record.id, name, op, "warning" if reasons else "allowed", reasons)
            return ALLOW, None
        store.add_hook_event(record.id, name, op, "refused" if reasons else "allowed", reasons)
        if reasons:
            return REFUSE, f"tvorch: refused to start {name}: " + "; ".join(reasons)
        return ALLOW, None
    finally:
        store.close()


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
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        cfg = load_config()
        signal.setitimer(signal.ITIMER_REAL, cfg.hook_deadline_ms / 1000)
        xml = _read_stdin()
        status, line = decide(args, xml, cfg)
    except DeadlineExceeded:
        status, line = fail, "tvorch: hook deadline passed before a decision" + (
            ": refusing the start" if fail else "")
    except TvorchError as err:
        status, line = fail, f"tvorch: hook error: {err}"
    except OSError as err:
        status, line = fail, f"tvorch: hook error: {describe_os_error(err)}"
    except Exception as err:  # a bug must not let an unchecked start through
        status, line = fail, f"tvorch: hook internal error: {type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
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
