"""The hash-chained ledgers of each instance's vTPM state and UEFI variable store (core.vtpm.ledger)."""

from __future__ import annotations

import sqlite3

from ...core.vtpm.ledger import LedgerEntry, chain_entry
from ...core.timestamps import utc_now
from .database import Database

LEDGERS = ("vtpm_ledger", "nvram_ledger")


def _ledger(table: str) -> str:
    """A ledger table's name, checked: it is put into SQL text."""
    if table not in LEDGERS:
        raise ValueError(f"no ledger table {table!r}")
    return table


def insert_ledger_entry(db: sqlite3.Connection, instance_id: str, event: str, state_digest: str,
                        table: str = "vtpm_ledger") -> LedgerEntry:
    """Chain a new entry onto the instance's last one in TABLE, inside the caller's write transaction."""
    table = _ledger(table)
    row = db.execute(
        f"SELECT seq, entry_hash FROM {table} WHERE instance_id = ? ORDER BY seq DESC LIMIT 1",
        (instance_id,),
    ).fetchone()
    entry = chain_entry(instance_id, row[0] + 1 if row else 0, utc_now(), event, state_digest,
                        row[1] if row else None)
    db.execute(
        f"INSERT INTO {table} (instance_id, seq, at, event, state_digest, prev_hash, entry_hash) "
        "VALUES (?,?,?,?,?,?,?)",
        (entry.instance_id, entry.seq, entry.at, entry.event, entry.state_digest, entry.prev_hash,
         entry.entry_hash),
    )
    return entry


class Ledgers(Database):
    """vtpm_ledger and nvram_ledger, one code for both (TABLE names which)."""

    def ledger(self, instance_id: str, table: str = "vtpm_ledger") -> list[LedgerEntry]:
        """The instance's vTPM ledger, or with TABLE="nvram_ledger" its NVRAM ledger."""
        rows = self._db.execute(
            f"SELECT instance_id, seq, at, event, state_digest, prev_hash, entry_hash FROM {_ledger(table)} "
            "WHERE instance_id = ? ORDER BY seq",
            (instance_id,),
        ).fetchall()
        return [LedgerEntry(*row) for row in rows]

    def last_ledger_entry(self, instance_id: str, table: str = "vtpm_ledger") -> LedgerEntry | None:
        row = self._db.execute(
            f"SELECT instance_id, seq, at, event, state_digest, prev_hash, entry_hash FROM {_ledger(table)} "
            "WHERE instance_id = ? ORDER BY seq DESC LIMIT 1",
            (instance_id,),
        ).fetchone()
        return LedgerEntry(*row) if row else None

    def append_ledger(self, instance_id: str, event: str, state_digest: str,
                      table: str = "vtpm_ledger") -> LedgerEntry:
        """Chain a new entry onto the last one, under the write lock so none is lost."""
        with self._write() as db:
            return insert_ledger_entry(db, instance_id, event, state_digest, table)
