"""Each instance's vTPM record: identity, how its state key is kept, an operation in progress."""

from __future__ import annotations

import json
from typing import Any

from ...core.vtpm.ledger import LedgerEntry
from ...core.timestamps import utc_now
from ...core.vtpm.records import KeyProtection, VtpmRecord
from .database import Database
from .instances import insert_event
from .ledgers import insert_ledger_entry

_VTPM_COLUMNS = (
    "instance_id, state_dir, swtpm_version, ek_fingerprint, ek_cert, ek_public_pem, key_protection, secret_uuid, "
    "sealed_key, seal_pcrs, escrow_key, escrow_fingerprint, key_check, created_at, updated_at, purged_at, "
    "platform_cert"
)


def _blob(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


class Vtpms(Database):
    """The vtpms table (its ledger is in .ledgers)."""

    def create_vtpm(self, record: VtpmRecord, state_digest: str) -> None:
        """The record and its ledger's first entry ("manufactured"), together."""
        with self._write() as db:
            db.execute(
                f"INSERT INTO vtpms ({_VTPM_COLUMNS}) VALUES ({','.join('?' * _VTPM_COLUMNS.count(','))},?)",
                (record.instance_id, record.state_dir, record.swtpm_version, record.ek_fingerprint, record.ek_cert,
                 record.ek_public_pem, record.key_protection.value, record.secret_uuid, record.sealed_key,
                 json.dumps(list(record.seal_pcrs)), record.escrow_key, record.escrow_fingerprint, record.key_check,
                 record.created_at, record.updated_at, record.purged_at, record.platform_cert),
            )
            insert_ledger_entry(db, record.instance_id, "manufactured", state_digest)
            insert_event(db, record.instance_id, "vtpm-manufactured", f"EK sha256:{record.ek_fingerprint}")

    def vtpm(self, instance_id: str) -> VtpmRecord | None:
        row = self._db.execute(f"SELECT {_VTPM_COLUMNS} FROM vtpms WHERE instance_id = ?", (instance_id,)).fetchone()
        if row is None:
            return None
        return VtpmRecord(
            instance_id=row["instance_id"], state_dir=row["state_dir"], swtpm_version=row["swtpm_version"],
            ek_fingerprint=row["ek_fingerprint"], ek_cert=bytes(row["ek_cert"]),
            ek_public_pem=bytes(row["ek_public_pem"]), key_protection=KeyProtection(row["key_protection"]),
            secret_uuid=row["secret_uuid"], sealed_key=_blob(row["sealed_key"]),
            seal_pcrs=tuple(json.loads(row["seal_pcrs"])), escrow_key=_blob(row["escrow_key"]),
            escrow_fingerprint=row["escrow_fingerprint"], key_check=row["key_check"], created_at=row["created_at"],
            updated_at=row["updated_at"], purged_at=row["purged_at"], platform_cert=_blob(row["platform_cert"]),
        )

    def reseal_vtpm(self, instance_id: str, sealed_key: bytes, seal_pcrs: tuple[int, ...], why: str) -> None:
        with self._write() as db:
            db.execute("UPDATE vtpms SET sealed_key = ?, seal_pcrs = ?, updated_at = ? WHERE instance_id = ?",
                       (sealed_key, json.dumps(list(seal_pcrs)), utc_now(), instance_id))
            insert_event(db, instance_id, "vtpm-rekeyed", why)

    def vtpm_pending(self, instance_id: str) -> dict[str, Any] | None:
        """The vTPM operation begun and not yet recorded as done (a restore), if any."""
        row = self._db.execute("SELECT pending FROM vtpms WHERE instance_id = ?", (instance_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def set_vtpm_pending(self, instance_id: str, pending: dict[str, Any] | None) -> None:
        with self._write() as db:
            db.execute("UPDATE vtpms SET pending = ?, updated_at = ? WHERE instance_id = ?",
                       (json.dumps(pending) if pending else None, utc_now(), instance_id))

    def complete_vtpm_change(self, instance_id: str, event: str, state_digest: str, detail: str) -> LedgerEntry:
        """Ledger the state now at rest and clear the pending operation, in one transaction."""
        with self._write() as db:
            entry = insert_ledger_entry(db, instance_id, event, state_digest)
            db.execute("UPDATE vtpms SET pending = NULL, updated_at = ? WHERE instance_id = ?",
                       (utc_now(), instance_id))
            insert_event(db, instance_id, f"vtpm-{event}", detail)
        return entry

    def purge_vtpm(self, instance_id: str) -> None:
        """Forget the state key (both wrappings): a backup of the purged state can no longer be read."""
        with self._write() as db:
            db.execute("UPDATE vtpms SET sealed_key = NULL, escrow_key = NULL, pending = NULL, purged_at = ?, "
                       "updated_at = ? WHERE instance_id = ?", (utc_now(), utc_now(), instance_id))
