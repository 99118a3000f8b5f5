"""Live migration's records: an instance's rows leaving or arriving, its handoff statements, the
migration in flight (for `tvorch reconcile`), and the tombstone a migrated-out instance leaves."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from ...core.migration.records import TABLES
from ...core.timestamps import utc_now
from ...core.vtpm.ledger import LedgerEntry
from ...errors import ConflictError, StoreError
from .database import Database
from .instances import insert_event

# What else names an instance and stays behind on the node it leaves, or is dropped on one it never reached
# (the guest AK's certification is the certifying node's: another node certifies the AK again).
_LOCAL_TABLES = ("gate_runs", "autostart", "managed_saves", "migrations", "guest_aks")


def _insert_entry(db: sqlite3.Connection, entry: LedgerEntry, statement: dict[str, Any]) -> None:
    """Append ENTRY exactly as made (and signed) elsewhere; it must chain onto the last entry here."""
    row = db.execute("SELECT seq, entry_hash FROM vtpm_ledger WHERE instance_id = ? ORDER BY seq DESC LIMIT 1",
                     (entry.instance_id,)).fetchone()
    if row is None or (row[0] + 1, row[1]) != (entry.seq, entry.prev_hash):
        raise StoreError(f"ledger entry {entry.seq} of {entry.instance_id} does not chain onto the last one")
    db.execute("INSERT INTO vtpm_ledger (instance_id, seq, at, event, state_digest, prev_hash, entry_hash) "
               "VALUES (?,?,?,?,?,?,?)", (entry.instance_id, entry.seq, entry.at, entry.event, entry.state_digest,
                                          entry.prev_hash, entry.entry_hash))
    db.execute("INSERT INTO ledger_handoffs (instance_id, seq, statement) VALUES (?,?,?)",
               (entry.instance_id, entry.seq, json.dumps(statement, sort_keys=True)))


class Migrations(Database):
    """Rows out, rows in, handoffs, the migration journal, tombstones."""

    def table_columns(self) -> dict[str, frozenset[str]]:
        """This node's columns of every table that travels (the schema checks what arrives)."""
        return {t: frozenset(r[1] for r in self._db.execute(f"PRAGMA table_info({t})")) for t in TABLES}

    def export_rows(self, instance_id: str) -> dict[str, list[dict[str, object]]]:
        out = {}
        for table, key in TABLES.items():
            order = "seq" if table in ("instance_events", "vtpm_ledger", "nvram_ledger", "ledger_handoffs",
                                       "guest_boots") else "rowid"
            rows = self._db.execute(f"SELECT * FROM {table} WHERE {key} = ? ORDER BY {order}", (instance_id,))
            out[table] = [dict(r) for r in rows.fetchall()]
        return out

    def handoffs(self, instance_id: str) -> dict[int, dict[str, Any]]:
        rows = self._db.execute("SELECT seq, statement FROM ledger_handoffs WHERE instance_id = ? ORDER BY seq",
                                (instance_id,)).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    # -- the journal -----------------------------------------------------------------------------

    def begin_migration(self, instance_id: str, direction: str, peer_uri: str, peer_node: str,
                        statement: dict[str, Any]) -> None:
        try:
            with self._write() as db:
                db.execute("INSERT INTO migrations (instance_id, direction, peer_uri, peer_node, statement, "
                           "started_at) VALUES (?,?,?,?,?,?)", (instance_id, direction, peer_uri, peer_node,
                                                                 json.dumps(statement, sort_keys=True), utc_now()))
                insert_event(db, instance_id, f"migration-{direction}-begun", f"peer {peer_uri}")
        except sqlite3.IntegrityError:
            raise ConflictError(f"instance {instance_id} is being migrated already") from None

    def migration(self, instance_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM migrations WHERE instance_id = ?", (instance_id,)).fetchone()
        if row is None:
            return None
        found = dict(row)
        found["statement"] = json.loads(found["statement"])
        return found

    def migrations(self) -> list[dict[str, Any]]:
        return [m for (i,) in self._db.execute("SELECT instance_id FROM migrations").fetchall()
                if (m := self.migration(i)) is not None]

    def end_migration(self, instance_id: str, why: str) -> None:
        """The source's migration did not happen: the instance stays here as it was."""
        with self._write() as db:
            db.execute("DELETE FROM migrations WHERE instance_id = ?", (instance_id,))
            insert_event(db, instance_id, "migration-abandoned", why)

    # -- the two ends ----------------------------------------------------------------------------

    def leave_tombstone(self, instance_id: str, entry: LedgerEntry, statement: dict[str, Any], peer_uri: str) -> None:
        """The VM runs on the destination now: ledger `migrated-out`, forget the key, keep a tombstone."""
        with self._write() as db:
            _insert_entry(db, entry, statement)
            db.execute("UPDATE vtpms SET sealed_key = NULL, escrow_key = NULL, key_lent_at = NULL, updated_at = ? "
                       "WHERE instance_id = ?", (utc_now(), instance_id))
            db.execute("UPDATE instances SET state = 'migrated', updated_at = ? WHERE id = ?", (utc_now(), instance_id))
            for table in ("gate_runs", "autostart", "managed_saves"):
                db.execute(f"DELETE FROM {table} WHERE instance_id = ?", (instance_id,))
            db.execute("UPDATE migrations SET direction = 'out-done' WHERE instance_id = ?", (instance_id,))
            insert_event(db, instance_id, "migrated-out", f"to {peer_uri}; its vTPM key is forgotten here")

    def take_in(self, rows: dict[str, list[dict[str, object]]], sealed_key: bytes | None, seal_pcrs: tuple[int, ...],
                escrow_key: bytes | None, escrow_fingerprint: str | None, peer_uri: str, peer_node: str,
                statement: dict[str, Any]) -> None:
        """Store the arriving rows as an `incoming` instance, with the key sealed here, in one transaction.
        A tombstone of the same instance (it left this node before) is replaced."""
        instance_id = str(rows["instances"][0]["id"])
        with self._write() as db:
            old = db.execute("SELECT state FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if old is not None and old[0] != "migrated":
                raise ConflictError(f"instance {instance_id} is already on this node ({old[0]})")
            _delete_instance(db, instance_id)
            for table in TABLES:
                for row in rows[table]:
                    if table == "instances":
                        row = {**row, "state": "incoming"}
                    cols = ", ".join(row)
                    db.execute(f"INSERT INTO {table} ({cols}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))
            db.execute("UPDATE vtpms SET sealed_key = ?, seal_pcrs = ?, escrow_key = ?, escrow_fingerprint = ?, "
                       "pending = NULL, key_lent_at = NULL, updated_at = ? WHERE instance_id = ?",
                       (sealed_key, json.dumps(list(seal_pcrs)), escrow_key, escrow_fingerprint, utc_now(),
                        instance_id))
            db.execute("INSERT INTO migrations (instance_id, direction, peer_uri, peer_node, statement, started_at) "
                       "VALUES (?,?,?,?,?,?)", (instance_id, "in", peer_uri, peer_node,
                                                json.dumps(statement, sort_keys=True), utc_now()))
            insert_event(db, instance_id, "migration-in-begun", f"from {peer_uri}")

    def arrived(self, instance_id: str, out_entry: LedgerEntry, out_statement: dict[str, Any],
                in_entry: LedgerEntry, in_statement: dict[str, Any], peer_uri: str) -> None:
        """The VM runs here: ledger both handoffs, the instance is running, its run open for the hook."""
        with self._write() as db:
            _insert_entry(db, out_entry, out_statement)
            _insert_entry(db, in_entry, in_statement)
            db.execute("UPDATE instances SET state = 'running', updated_at = ? WHERE id = ?", (utc_now(), instance_id))
            db.execute("DELETE FROM migrations WHERE instance_id = ?", (instance_id,))
            # libvirt calls no `started` hook for an incoming migration: the run is opened here, so that
            # the guest's stop on this node is ledgered like any other.
            db.execute("INSERT INTO gate_runs (instance_id, allowed, run_token, updated_at) VALUES (?, NULL, ?, ?) "
                       "ON CONFLICT(instance_id) DO UPDATE SET allowed = NULL, run_token = excluded.run_token, "
                       "updated_at = excluded.updated_at", (instance_id, os.urandom(16).hex(), utc_now()))
            insert_event(db, instance_id, "migrated-in", f"from {peer_uri}")

    def forget_incoming(self, instance_id: str) -> None:
        """The VM did not come: drop every row that arrived for it (its sealed key with them)."""
        with self._write() as db:
            row = db.execute("SELECT state FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if row is not None and row[0] == "incoming":
                _delete_instance(db, instance_id)


def _delete_instance(db: sqlite3.Connection, instance_id: str) -> None:
    for table in (*_LOCAL_TABLES, *reversed(TABLES)):
        key = TABLES.get(table, "instance_id")
        db.execute(f"DELETE FROM {table} WHERE {key} = ?", (instance_id,))
