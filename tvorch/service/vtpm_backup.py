"""An instance's vTPM kept and recovered by the operator: backup, restore and rekey.

A backup is the stopped instance's state files with a header signed by the
node key (core.vtpm.backup); a restore takes back only a backup of that same
vTPM, as a ledger entry, so the hook's rollback check agrees with it. Rekey
seals the state key again to the host TPM as it is now, with the operator's
escrow key when the host's boot state changed.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ..adapters import vtpm_state
from ..adapters.files import create_new, read_bounded
from ..adapters.locks import instance_lock
from ..core.launch.instance import InstanceRecord, InstanceState
from ..core.timestamps import utc_now
from ..core.vtpm.records import LedgerEvent, check_key
from ..core.vtpm.backup import MAX_BACKUP, backup_header, pack_backup, sign_backup, unpack_backup, verify_backup
from ..core.vtpm.escrow import escrow_unwrap, load_escrow_private_key
from ..errors import ConflictError, HostError, InputError, NotFoundError, TpmError, TrustError
from ..faults import crash_point
from .manifests import node_identity
from .node import Node
from .records import show as show_instance
from .vtpm import instance_dir, read_key_file, seal, settle, unseal
from .vtpm_records import record_of


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
        packed = pack_backup(sign_backup(header, identity.signing_key), files)
        try:
            create_new(dest, packed)
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
        header_file, files = unpack_backup(data, src)
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


def _read_backup_file(src: Path) -> bytes:
    try:
        return read_bounded(str(src), MAX_BACKUP)
    except FileNotFoundError:
        raise InputError(f"refused vTPM restore: {src} does not exist") from None
    except OSError as err:
        raise InputError(f"refused vTPM restore: cannot read {src}: {err.strerror or err}") from None


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
                key = unseal(node.cfg, vtpm.sealed_key)
            except TpmError as err:
                raise TrustError(f"refused rekey of '{name}': {err}; give the operator's escrow key with "
                                 "--escrow-key") from None
            how = "unsealed with the previous seal"
        else:
            if vtpm.escrow_key is None:
                raise ConflictError(f"the vTPM key of '{name}' was not wrapped to an escrow key "
                                    "(vtpm.escrow_public_key was empty at launch)")
            private = load_escrow_private_key(read_key_file(str(escrow_key), "--escrow-key"), str(escrow_key))
            key = escrow_unwrap(vtpm.escrow_key, private, vtpm.escrow_fingerprint)
            how = f"recovered with the escrow key sha256:{(vtpm.escrow_fingerprint or '')[:16]}"
        check_key(key, vtpm.key_check, "the escrow key" if escrow_key else "the host TPM")
        sealed = seal(node.cfg, key)
        pcrs = tuple(node.cfg.vtpm.seal_pcrs)
        node.store.reseal_vtpm(record.id, sealed, pcrs,
                               f"{how}; sealed to {node.cfg.vtpm.seal_bank} PCRs {','.join(map(str, pcrs))}")
    return {"name": name, "sealed_to": {"bank": node.cfg.vtpm.seal_bank, "pcrs": list(pcrs)}, "how": how}
