"""Start paths (README, "Start paths"): autostart, the managed saves tvorch made, the vTPM key lent."""

from __future__ import annotations

from ...core.vtpm.ledger import LedgerEntry
from ...core.timestamps import utc_now
from .database import Database
from .instances import insert_event
from .ledgers import insert_ledger_entry


class StartPaths(Database):
    """autostart, managed_saves and vtpms.key_lent_at."""

    def set_autostart(self, instance_id: str, on: bool) -> bool:
        """Record whether `tvorch serve` starts the instance when it starts; True when that changed."""
        with self._write() as db:
            was = db.execute("SELECT 1 FROM autostart WHERE instance_id = ?", (instance_id,)).fetchone() is not None
            if on and not was:
                db.execute("INSERT INTO autostart (instance_id, since) VALUES (?, ?)", (instance_id, utc_now()))
            elif was and not on:
                db.execute("DELETE FROM autostart WHERE instance_id = ?", (instance_id,))
            if was != on:
                insert_event(db, instance_id, "autostart", "on: tvorch serve starts it" if on else "off")
        return was != on

    def autostart_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT instance_id FROM autostart")}

    def record_managed_save(self, instance_id: str, path: str, image_digest: str, vtpm_digest: str) -> LedgerEntry:
        """Ledger the vTPM state at rest as `saved` and the save image's digest bound to that entry."""
        with self._write() as db:
            entry = insert_ledger_entry(db, instance_id, "saved", vtpm_digest)
            db.execute("INSERT INTO managed_saves (instance_id, ledger_seq, path, digest, saved_at) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET ledger_seq = excluded.ledger_seq, "
                       "path = excluded.path, digest = excluded.digest, saved_at = excluded.saved_at",
                       (instance_id, entry.seq, path, image_digest, entry.at))
            insert_event(db, instance_id, "vtpm-saved",
                            f"vTPM state sha256:{vtpm_digest}; save image {path} sha256:{image_digest}")
        return entry

    def managed_save(self, instance_id: str) -> tuple[str, str] | None:
        """(path, digest) of the save image tvorch made, while it is the instance's latest state; else None."""
        row = self._db.execute(
            "SELECT m.path, m.digest FROM managed_saves m WHERE m.instance_id = ? AND m.ledger_seq = "
            "(SELECT MAX(seq) FROM vtpm_ledger WHERE instance_id = m.instance_id)", (instance_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def set_key_lent(self, instance_id: str, lent: bool) -> None:
        with self._write() as db:
            db.execute("UPDATE vtpms SET key_lent_at = ? WHERE instance_id = ?",
                       (utc_now() if lent else None, instance_id))

    def key_lent(self, instance_id: str) -> bool:
        row = self._db.execute("SELECT key_lent_at FROM vtpms WHERE instance_id = ?", (instance_id,)).fetchone()
        return row is not None and row[0] is not None
