"""Per-instance vTPMs: manufacture at launch, unlock for a start, records, backup, restore, rekey.

The state key never rests in clear: it is made and sealed to the host TPM
before anything is written, handed to swtpm_setup through a pipe, and at each
start unsealed and given to libvirt as an ephemeral secret for the seconds of
the start (``Hypervisor.vtpm_secret``). A host whose boot state changed cannot
unseal it, so the start is refused; `rekey` with the operator's escrow key
seals it again to the host as it is now.

Every change to the state at rest is a ledger entry, so the hook's rollback
check (state on disk == last entry) always has the right answer. A restore
changes files and the ledger, which cannot be one transaction; it records its
intent first (``pending``), swaps the state directory atomically, then ledgers
and clears the intent together. ``settle`` finishes or forgets an interrupted
restore from what is on disk, and runs before every vTPM operation, start and
reconciliation.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..adapters import vtpm_state
from ..adapters.files import create_new, ensure_private_dir, read_bounded
from ..adapters.locks import instance_lock, try_instance_lock
from ..adapters.vtpm_manufacture import manufacture, swtpm_version
from ..config import Config
from ..core.instance import InstanceRecord, InstanceState
from ..core.ledger import LedgerEntry, broken_link
from ..core.ekcert import verify_ek_certificate
from ..core.manifest_format import Measurement, manifest_digest
from ..core.metadata import parse_instance_metadata
from ..core.platformcert import verify_platform_certificate
from ..core.timestamps import utc_now
from ..core.vtpm import KeyProtection, LedgerEvent, VtpmRecord, check_key, key_check_value, new_state_key
from ..core.vtpm_backup import backup_header, sign_backup, verify_backup
from ..core.vtpm_escrow import (
    escrow_unwrap,
    escrow_wrap,
    load_escrow_private_key,
    load_escrow_public_key,
    public_key_fingerprint,
)
from ..errors import ConflictError, HostError, InputError, NotFoundError, TpmError, TrustError, TvorchError
from ..faults import crash_point
from ..logs import get_logger
from .manifests import node_identity
from .node import Node
from .records import show as show_instance

log = get_logger(__name__)

HEADER_MEMBER = "tvorch-vtpm-backup.json"
STATE_PREFIX = "state/"
_MAX_BACKUP = 64 * 1024 * 1024
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
    escrow_public = None
    if cfg.vtpm.escrow_public_key:
        source = cfg.vtpm.escrow_public_key
        escrow_public = load_escrow_public_key(_read_key_file(source, "vtpm.escrow_public_key"), source)
    key = new_state_key()
    sealed = _seal(cfg, key)
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
        key = check_key(_unseal(node.cfg, vtpm.sealed_key), vtpm.key_check, "the host TPM")
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


# -- records ------------------------------------------------------------------


def record_of(node: Node, name: str) -> tuple[InstanceRecord, VtpmRecord]:
    record = node.store.get_live(name)
    vtpm = node.store.vtpm(record.id)
    if vtpm is None:
        raise NotFoundError(f"instance '{name}' has no vTPM record (launched before tvorch manufactured vTPMs)")
    return record, vtpm


def show(node: Node, name: str) -> dict[str, Any]:
    record = show_instance(node, name)
    _, vtpm = record_of(node, name)
    ledger = node.store.ledger(record.id)
    on_disk = vtpm_state.state_digest(instance_dir(node.cfg, record))
    last = ledger[-1] if ledger else None
    in_use = record.state in (InstanceState.RUNNING, InstanceState.PAUSED)  # swtpm is writing it
    return {
        "name": record.name, **vtpm.to_json(),
        "ledger_entries": len(ledger), "ledger_intact": broken_link(ledger) is None,
        "ledger_last": last.to_json() if last else None,
        "state_digest": on_disk,
        # None while the VM runs: the state moves on until the stop is ledgered.
        "state_matches_ledger": None if in_use else (
            on_disk is not None and last is not None and on_disk == last.state_digest),
        "pending": node.store.vtpm_pending(record.id),
    }


def ek(node: Node, name: str) -> tuple[x509.Certificate, VtpmRecord]:
    _, vtpm = record_of(node, name)
    return x509.load_der_x509_certificate(vtpm.ek_cert), vtpm


def ledger(node: Node, name: str) -> list[LedgerEntry]:
    record = node.store.get_live(name)
    entries = node.store.ledger(record.id)
    broken = broken_link(entries)
    if broken is not None:
        raise TrustError(f"the vTPM ledger of '{name}' is broken at entry {broken}")
    return entries


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


# -- backup and restore ---------------------------------------------------------


def _stopped(node: Node, name: str, what: str) -> InstanceRecord:
    record = show_instance(node, name)
    if record.state is not InstanceState.STOPPED:
        raise ConflictError(f"refused {what} of '{name}': it is {record.state.value}; stop it first")
    return record


def backup(node: Node, name: str, dest: Path) -> dict[str, Any]:
    """Write the stopped instance's vTPM state, with a header signed by the node key, to DEST (a new file)."""
    exists = ConflictError(f"refused backup to {dest}: it exists; a backup never overwrites a file")
    if dest.exists() or dest.is_symlink():
        raise exists
    if not dest.parent.is_dir():
        raise InputError(f"refused backup to {dest}: {dest.parent} is not a directory")
    with instance_lock(Path(node.cfg.state_dir), name):
        record = _stopped(node, name, "vTPM backup")
        _, vtpm = record_of(node, name)
        settle(node, record)
        files = vtpm_state.read_state(instance_dir(node.cfg, record))
        if not files:
            raise NotFoundError(f"instance '{name}' has no vTPM state on disk")
        header = backup_header(record.id, record.uuid, vtpm.ek_fingerprint, files, utc_now(), vtpm.encrypted)
        last = node.store.last_ledger_entry(record.id)
        if last is None or last.state_digest != header.state_digest:
            raise TrustError(f"refused vTPM backup of '{name}': the state on disk is not the one the ledger "
                             "recorded last (rollback or tampering); nothing written")
        identity = node_identity(node.cfg)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_member(tar, HEADER_MEMBER, sign_backup(header, identity.signing_key))
            for file_name, content in sorted(files.items()):
                _add_member(tar, STATE_PREFIX + file_name, content)
        try:
            create_new(dest, buf.getvalue())
        except FileExistsError:
            raise exists from None
        except OSError as err:
            raise InputError(f"refused backup to {dest}: {err.strerror or err}") from None
        node.store.complete_vtpm_change(record.id, LedgerEvent.BACKUP.value, header.state_digest, f"to {dest}")
    return {"name": name, "backup": str(dest), "state_digest": header.state_digest, "files": sorted(files)}


def restore(node: Node, name: str, src: Path) -> dict[str, Any]:
    """Replace the stopped instance's vTPM state with a backup of that same vTPM, as a ledger entry."""
    data = _read_backup_file(src)
    with instance_lock(Path(node.cfg.state_dir), name):
        record = _stopped(node, name, "vTPM restore")
        _, vtpm = record_of(node, name)
        if vtpm.purged_at is not None:
            raise ConflictError(f"refused vTPM restore of '{name}': its vTPM was purged")
        header_file, files = _unpack(data, src)
        signer = node_identity(node.cfg).signing_cert.public_key()
        if not isinstance(signer, ec.EllipticCurvePublicKey):
            raise TrustError("the node signing key is not an EC key")
        header = verify_backup(header_file, files, signer)
        if header.instance_id != record.id or header.uuid != record.uuid:
            raise TrustError(f"refused vTPM restore of '{name}': {src} is a backup of instance {header.instance_id}, "
                             f"not of {record.id}")
        if header.ek_fingerprint != vtpm.ek_fingerprint:
            raise TrustError(f"refused vTPM restore of '{name}': {src} holds another vTPM (EK differs)")
        settle(node, record)
        directory = instance_dir(node.cfg, record)
        before = vtpm_state.state_digest(directory)
        if before is None:
            raise NotFoundError(f"instance '{name}' has no vTPM state on disk to replace")
        try:
            staged = vtpm_state.stage_state(directory, files, node.cfg.vtpm.swtpm_user, secrets.token_hex(4))
        except OSError as err:
            vtpm_state.sweep_staged(directory)
            raise HostError(f"cannot stage the restored vTPM state in {directory}: {err.strerror or err}") from None
        node.store.set_vtpm_pending(record.id, {"op": "restore", "from": before, "to": header.state_digest,
                                                "source": str(src)})
        crash_point("restore-staged")
        vtpm_state.exchange(directory, staged)
        crash_point("restore-exchanged")
        node.store.complete_vtpm_change(record.id, LedgerEvent.RESTORED.value, header.state_digest,
                                        f"from {src} (backup of {header.created_at})")
        vtpm_state.sweep_staged(directory)
    return {"name": name, "restored_from": str(src), "state_digest": header.state_digest,
            "backup_created_at": header.created_at}


def _add_member(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o600, 0
    tar.addfile(info, io.BytesIO(content))


def _read_backup_file(src: Path) -> bytes:
    try:
        return read_bounded(str(src), _MAX_BACKUP)
    except FileNotFoundError:
        raise InputError(f"refused vTPM restore: {src} does not exist") from None
    except OSError as err:
        raise InputError(f"refused vTPM restore: cannot read {src}: {err.strerror or err}") from None


def _unpack(data: bytes, src: Path) -> tuple[bytes, dict[str, bytes]]:
    """The header and state files of a backup; only regular members with the names a backup has."""
    header: bytes | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    raise TrustError(f"{src}: member {member.name!r} is not a regular file")
                content = tar.extractfile(member)
                body = content.read() if content else b""
                if member.name == HEADER_MEMBER:
                    header = body
                elif member.name.startswith(STATE_PREFIX) and "/" not in member.name[len(STATE_PREFIX):]:
                    files[member.name[len(STATE_PREFIX):]] = body
                else:
                    raise TrustError(f"{src}: unexpected member {member.name!r}")
    except tarfile.TarError as err:
        raise InputError(f"refused vTPM restore: {src} is not a tvorch vTPM backup ({err})") from None
    if header is None:
        raise InputError(f"refused vTPM restore: {src} has no {HEADER_MEMBER}")
    return header, files


# -- rekey --------------------------------------------------------------------


def rekey(node: Node, name: str, escrow_key: Path | None) -> dict[str, Any]:
    """Seal the instance's state key again to the host TPM as it is now (and to the configured PCRs).

    Without ESCROW_KEY the key must still unseal (say, vtpm.seal_pcrs
    changed); with it, the escrow wrapping is the way back after the boot
    state changed. The state itself is untouched: swtpm keeps its key.
    """
    with instance_lock(Path(node.cfg.state_dir), name):
        record, vtpm = record_of(node, name)
        if not vtpm.encrypted:
            raise ConflictError(f"the vTPM of '{name}' is not encrypted (vtpm.key_protection = none); nothing to rekey")
        if vtpm.sealed_key is None:
            raise ConflictError(f"the vTPM of '{name}' was purged; its key is gone")
        if escrow_key is None:
            try:
                key = _unseal(node.cfg, vtpm.sealed_key)
            except TpmError as err:
                raise TrustError(f"refused rekey of '{name}': {err}; give the operator's escrow key with "
                                 "--escrow-key") from None
            how = "unsealed with the previous seal"
        else:
            if vtpm.escrow_key is None:
                raise ConflictError(f"the vTPM key of '{name}' was not wrapped to an escrow key "
                                    "(vtpm.escrow_public_key was empty at launch)")
            private = load_escrow_private_key(_read_key_file(str(escrow_key), "--escrow-key"), str(escrow_key))
            key = escrow_unwrap(vtpm.escrow_key, private, vtpm.escrow_fingerprint)
            how = f"recovered with the escrow key sha256:{(vtpm.escrow_fingerprint or '')[:16]}"
        check_key(key, vtpm.key_check, "the escrow key" if escrow_key else "the host TPM")
        sealed = _seal(node.cfg, key)
        pcrs = tuple(node.cfg.vtpm.seal_pcrs)
        node.store.reseal_vtpm(record.id, sealed, pcrs,
                               f"{how}; sealed to {node.cfg.vtpm.seal_bank} PCRs {','.join(map(str, pcrs))}")
    return {"name": name, "sealed_to": {"bank": node.cfg.vtpm.seal_bank, "pcrs": list(pcrs)}, "how": how}


# -- the host TPM ---------------------------------------------------------------
# tpm2-pytss costs 0.3 s to import: only the paths that seal or unseal pay it.


def _seal(cfg: Config, key: bytes) -> bytes:
    from ..adapters.tpm import open_tpm

    with open_tpm(cfg.host.tcti) as tpm:
        return tpm.seal(key, cfg.vtpm.seal_pcrs, cfg.vtpm.seal_bank).to_bytes()


def _unseal(cfg: Config, sealed: bytes) -> bytes:
    from ..adapters.tpm import open_tpm
    from ..core.sealed import SealedKey

    with open_tpm(cfg.host.tcti) as tpm:
        return tpm.unseal(SealedKey.from_bytes(sealed))


def _read_key_file(path: str, what: str) -> bytes:
    try:
        return read_bounded(path, _KEY_FILE_MAX)
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None


def ek_summary(cert: x509.Certificate, vtpm: VtpmRecord, ca: x509.Certificate) -> dict[str, Any]:
    """What `tvorch vtpm ek` shows, with whether the certificates check against the node CA now."""
    now = datetime.now(timezone.utc)
    try:
        verify_ek_certificate(cert, ca, now)
        chain = "valid: issued by the node CA"
    except (TvorchError, ValueError) as err:
        chain = f"INVALID: {err}"
    platform = None
    if vtpm.platform_cert is not None:
        try:
            verify_platform_certificate(vtpm.platform_cert, ca, cert, now)
            platform = "valid: issued by the node CA for this EK certificate"
        except (TvorchError, ValueError) as err:
            platform = f"INVALID: {err}"
    return {
        "subject": cert.subject.rfc4514_string() or "(empty; the TPM is named in subjectAltName)",
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ek_fingerprint": vtpm.ek_fingerprint,
        "certificate_sha256": hashlib.sha256(vtpm.ek_cert).hexdigest(),
        "chain": chain,
        "platform_certificate": platform,
        "platform_certificate_sha256": hashlib.sha256(vtpm.platform_cert).hexdigest() if vtpm.platform_cert else None,
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
