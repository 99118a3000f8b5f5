"""Per-instance vTPMs: the state key and the state's life: manufacture at launch, unlock for a start, settle.

The state key never rests in clear: it is made and sealed to the host TPM
before anything is written, handed to swtpm_setup through a pipe, and at each
start unsealed and given to libvirt as an ephemeral secret for the seconds of
the start (``Hypervisor.vtpm_secret``). A host whose boot state changed cannot
unseal it, so the start is refused; `rekey` (``vtpm_backup``) with the
operator's escrow key seals it again to the host as it is now.

Every change to the state at rest is a ledger entry, so the hook's rollback
check (state on disk == last entry) always has the right answer. A restore
(``vtpm_backup``) changes files and the ledger, which cannot be one
transaction; it records its intent first (``pending``), swaps the state
directory atomically, then ledgers and clears the intent together. ``settle``
finishes or forgets an interrupted restore from what is on disk, and runs
before every vTPM operation, start and reconciliation.

What `tvorch vtpm show` and `ek` read is in ``vtpm_records``; backup, restore
and rekey in ``vtpm_backup``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..adapters import vtpm_state
from ..adapters.files import ensure_private_dir, read_bounded
from ..adapters.locks import try_instance_lock
from ..adapters.vtpm_manufacture import manufacture, swtpm_version
from ..config import Config
from ..core.launch.instance import InstanceRecord, InstanceState
from ..core.launch.manifest_format import Measurement, manifest_digest
from ..core.launch.metadata import parse_instance_metadata
from ..core.timestamps import utc_now
from ..core.vtpm.records import KeyProtection, LedgerEvent, VtpmRecord, check_key, key_check_value, new_state_key
from ..core.vtpm.escrow import escrow_wrap, load_escrow_public_key, public_key_fingerprint
from ..errors import ConflictError, InputError, TpmError, TrustError
from ..faults import crash_point
from ..logs import get_logger
from .node import Node

log = get_logger(__name__)

_KEY_FILE_MAX = 64 * 1024


@dataclass(frozen=True)
class Keys:
    """A new state key in its wrappings, made before anything is written (the key itself stays in memory)."""

    key: bytes | None  # None: key_protection = none
    sealed: bytes | None
    seal_pcrs: tuple[int, ...]
    escrow: bytes | None
    escrow_fingerprint: str | None


def instance_dir(cfg: Config, record: InstanceRecord) -> Path:
    return Path(cfg.swtpm_state_dir) / record.uuid


# -- launch -------------------------------------------------------------------


def make_keys(cfg: Config) -> Keys:
    """A fresh state key, sealed to the host TPM (and wrapped to the escrow key), per vtpm.key_protection."""
    if KeyProtection(cfg.vtpm.key_protection) is KeyProtection.NONE:
        return Keys(None, None, (), None, None)
    return wrap_key(cfg, new_state_key())


def wrap_key(cfg: Config, key: bytes) -> Keys:
    """KEY sealed to this host's TPM and wrapped to this node's escrow key (a key arriving by migration too)."""
    escrow_public = None
    if cfg.vtpm.escrow_public_key:
        source = cfg.vtpm.escrow_public_key
        escrow_public = load_escrow_public_key(read_key_file(source, "vtpm.escrow_public_key"), source)
    sealed = seal(cfg, key)
    return Keys(
        key, sealed, tuple(cfg.vtpm.seal_pcrs),
        escrow_wrap(key, escrow_public) if escrow_public else None,
        public_key_fingerprint(escrow_public) if escrow_public else None,
    )


def manufacture_for_launch(node: Node, record: InstanceRecord, keys: Keys, secret_uuid: str | None) -> Measurement:
    """Make the instance's vTPM where libvirt will look for it, record it, and return its manifest entry."""
    cfg = node.cfg
    directory = instance_dir(cfg, record)
    # libvirt makes <swtpm_state_dir> (0711, root) only the first time it runs a vTPM
    # itself; a new node has none. swtpm (tss) must traverse both levels.
    ensure_private_dir(directory.parent, 0o711)
    ensure_private_dir(directory, 0o711)
    os.chmod(directory, 0o711)
    made = manufacture(vtpm_state.tpm2_dir(directory), Path(cfg.state_dir), record.id, cfg.vtpm.swtpm_user,
                       key=keys.key)
    crash_point("manufactured")
    digest = vtpm_state.state_digest(directory)
    if digest is None:
        raise TpmError(f"swtpm_setup left no vTPM state in {directory}")
    now = utc_now()
    vtpm = VtpmRecord(
        instance_id=record.id, state_dir=str(directory), swtpm_version=swtpm_version(cfg.swtpm),
        ek_fingerprint=made.ek_fingerprint, ek_cert=made.ek_cert_der, ek_public_pem=made.ek_public_pem,
        key_protection=KeyProtection(cfg.vtpm.key_protection), secret_uuid=secret_uuid, sealed_key=keys.sealed,
        seal_pcrs=keys.seal_pcrs, escrow_key=keys.escrow, escrow_fingerprint=keys.escrow_fingerprint,
        key_check=key_check_value(keys.key) if keys.key else None, created_at=now, updated_at=now,
        platform_cert=made.platform_cert_der,
    )
    node.store.create_vtpm(vtpm, digest)
    return Measurement(
        kind="vtpm-ek", digest=hashlib.sha256(made.ek_cert_der).hexdigest(), size=len(made.ek_cert_der),
        details={"ek_fingerprint": made.ek_fingerprint, "encrypted": vtpm.encrypted,
                 "swtpm_version": vtpm.swtpm_version},
    )


def remove_state(node: Node, record: InstanceRecord) -> bool:
    """Delete the instance's vTPM state and forget its key: for purge and for a launch that never ran."""
    directory = instance_dir(node.cfg, record)
    existed = directory.exists()
    shutil.rmtree(directory, ignore_errors=True)
    if node.store.vtpm(record.id) is not None:
        node.store.purge_vtpm(record.id)
    return existed


# -- start ----------------------------------------------------------------------


@contextmanager
def unlocked(node: Node, record: InstanceRecord) -> Iterator[None]:
    """Around a start: finish an interrupted restore, unseal the key, lend it to libvirt for the start."""
    vtpm = node.store.vtpm(record.id)
    if vtpm is None:
        yield  # launched before tvorch kept vTPM records
        return
    settle(node, record)
    if not vtpm.encrypted:
        yield  # state in clear: libvirt needs nothing from tvorch
        return
    if vtpm.sealed_key is None or vtpm.secret_uuid is None:
        raise ConflictError(f"the vTPM of '{record.name}' was purged; it cannot start again")
    _require_own_domain(node, record)
    from ..adapters.tpm import SealedKeyLocked

    try:
        key = check_key(unseal(node.cfg, vtpm.sealed_key), vtpm.key_check, "the host TPM")
    except SealedKeyLocked as err:
        node.store.add_event(record.id, "vtpm-unseal-refused", str(err))
        raise TrustError(
            f"start of '{record.name}' refused: its vTPM key does not unseal: {err}; if the host's firmware or "
            f"boot chain changed on purpose, recover with `tvorch vtpm rekey {record.name} --escrow-key KEY`"
        ) from None
    # On record first: the hook tells a start with the key lent from one libvirt would fail (hook.py).
    node.store.set_key_lent(record.id, True)
    try:
        with node.hypervisor.vtpm_secret(vtpm.secret_uuid, f"tvorch-vtpm-{record.id}", key):
            crash_point("secret-lent")  # killed here, the key stays in libvirtd until the daemon takes it back
            yield
    finally:
        node.store.set_key_lent(record.id, False)


def _require_own_domain(node: Node, record: InstanceRecord) -> None:
    """The key is lent only to the domain tvorch defined: libvirt's definition must still name this
    instance and its manifest (a domain stripped of its metadata would pass the hook unchecked)."""
    meta = parse_instance_metadata(node.hypervisor.domain_xml(record.name, inactive=True))
    body = node.store.manifest(record.id)
    if meta is None or meta.instance_id != record.id or body is None \
            or meta.manifest_digest != manifest_digest(body):
        node.store.add_event(record.id, "vtpm-key-withheld", "libvirt's definition no longer names this instance")
        raise TrustError(f"start of '{record.name}' refused: libvirt's definition of it no longer carries its "
                         "tvorch metadata and manifest; the vTPM key is not lent to it")


def drop_stale_secrets(node: Node, holding: str | None = None) -> list[str]:
    """Remove vTPM secrets a start killed half-way left in libvirtd (the key would stay lent)."""
    lent = node.hypervisor.secret_uuids()
    done = []
    for record in node.store.list_instances():
        vtpm = node.store.vtpm(record.id) if lent else None
        if vtpm is None or vtpm.secret_uuid not in lent or record.name == holding:
            continue
        with try_instance_lock(Path(node.cfg.state_dir), record.name) as got:
            if got:  # no start of it at work: nothing should hold its key
                node.hypervisor.drop_vtpm_secret(vtpm.secret_uuid)
                node.store.set_key_lent(record.id, False)
                done.append(f"{record.name}: removed its vTPM secret left in libvirt by an interrupted start")
    return done


# -- settle -------------------------------------------------------------------


def settle(node: Node, record: InstanceRecord) -> str | None:
    """Finish or forget a restore a crash interrupted, from what is on disk; a line saying which, or None."""
    directory = instance_dir(node.cfg, record)
    pending = node.store.vtpm_pending(record.id)
    if pending is None:
        if vtpm_state.sweep_staged(directory):
            return f"{record.name}: removed a staged vTPM state left by an interrupted restore"
        return None
    now = vtpm_state.state_digest(directory)
    if now is not None and now == pending["to"]:
        node.store.complete_vtpm_change(record.id, LedgerEvent.RESTORED.value, now,
                                        f"from {pending['source']} (completed after an interruption)")
        line = f"{record.name}: completed the interrupted vTPM restore from {pending['source']}"
    elif now == pending["from"]:
        node.store.set_vtpm_pending(record.id, None)
        line = f"{record.name}: the interrupted vTPM restore had not replaced the state; the state is unchanged"
    else:
        return (f"warning: {record.name}: a vTPM restore was interrupted and the state is neither the old nor "
                "the restored one; the hook will refuse its start")
    vtpm_state.sweep_staged(directory)
    log.warning("vtpm_settled", action=line)
    return line


def settle_all(node: Node, holding: str | None = None) -> list[str]:
    """Settle every instance with an operation pending or a staged directory left (reconciliation).

    HOLDING names an instance whose lock the caller holds; any other instance
    whose lock is busy (a start, a stop, a restore at work) is left for the
    next reconciliation rather than waited for.
    """
    done = []
    for record in node.store.list_instances():
        if record.state in (InstanceState.FAILED, InstanceState.LAUNCHING):
            continue
        if node.store.vtpm_pending(record.id) is None and not _has_staged(node.cfg, record):
            continue
        if record.name == holding:
            line = settle(node, record)
        else:
            with try_instance_lock(Path(node.cfg.state_dir), record.name) as got:
                line = settle(node, record) if got else None
        if line:
            done.append(line)
    return done


def _has_staged(cfg: Config, record: InstanceRecord) -> bool:
    try:
        return any(p.name.startswith(vtpm_state.STAGED_PREFIX) for p in instance_dir(cfg, record).iterdir())
    except FileNotFoundError:
        return False


# -- the host TPM ---------------------------------------------------------------
# tpm2-pytss costs 0.3 s to import: only the paths that seal or unseal pay it.


def seal(cfg: Config, key: bytes) -> bytes:
    """KEY sealed to the host TPM's vtpm.seal_pcrs as they are now."""
    from ..adapters.tpm import open_tpm

    with open_tpm(cfg.host.tcti) as tpm:
        return tpm.seal(key, cfg.vtpm.seal_pcrs, cfg.vtpm.seal_bank).to_bytes()


def unseal(cfg: Config, sealed: bytes) -> bytes:
    """The key SEALED holds, if the host TPM's PCRs are as they were at sealing (TpmError otherwise)."""
    from ..adapters.tpm import open_tpm
    from ..core.vtpm.sealed import SealedKey

    with open_tpm(cfg.host.tcti) as tpm:
        return tpm.unseal(SealedKey.from_bytes(sealed))


def read_key_file(path: str, what: str) -> bytes:
    """An escrow key file (the public one in the config, the private one an operator gives)."""
    try:
        return read_bounded(path, _KEY_FILE_MAX)
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None
