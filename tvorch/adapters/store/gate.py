"""The libvirt hook's record: every decision it made (hook_events) and its runs (gate_runs)."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from ...core.timestamps import utc_now
from .database import Database
from .ledgers import insert_ledger_entry


def insert_hook_event(db: sqlite3.Connection, instance_id: str | None, domain: str, operation: str, verdict: str,
                      reasons: tuple[str, ...]) -> None:
    """One hook decision, inside the caller's write transaction."""
    db.execute(
        "INSERT INTO hook_events (instance_id, domain, at, operation, verdict, reasons) VALUES (?,?,?,?,?,?)",
        (instance_id, domain, utc_now(), operation, verdict, json.dumps(list(reasons))),
    )


class Gate(Database):
    """hook_events and gate_runs: the start the hook allowed last, and the run it became."""

    def add_hook_event(
        self, instance_id: str | None, domain: str, operation: str, verdict: str, reasons: tuple[str, ...]
    ) -> None:
        with self._write() as db:
            insert_hook_event(db, instance_id, domain, operation, verdict, reasons)

    def last_hook_operation(self, instance_id: str, operations: tuple[str, ...]) -> str | None:
        """The most recent of OPERATIONS the hook recorded for the instance."""
        marks = ",".join("?" * len(operations))
        row = self._db.execute(
            f"SELECT operation FROM hook_events WHERE instance_id = ? AND operation IN ({marks}) "
            "ORDER BY seq DESC LIMIT 1",
            (instance_id, *operations),
        ).fetchone()
        return row[0] if row else None

    def hook_events(self, instance_id: str | None, domain: str) -> list[dict[str, Any]]:
        """The hook's decisions for the instance, and those about a domain of that name it did not know."""
        rows = self._db.execute(
            "SELECT at, operation, verdict, reasons FROM hook_events "
            "WHERE instance_id = ? OR (instance_id IS NULL AND domain = ?) ORDER BY seq",
            (instance_id, domain),
        ).fetchall()
        return [
            {"at": r["at"], "operation": r["operation"], "verdict": r["verdict"], "reasons": json.loads(r["reasons"])}
            for r in rows
        ]

    def open_start_check(self, instance_id: str) -> None:
        """A start is being checked: no earlier allowance and no unclosed run counts any more.

        The hook writes this before anything slow, so a start it then refuses, or never
        finishes judging (its deadline, a crash), leaves nothing a later `started begin` or
        `release end` could take for an allowed start or a finished run."""
        row = self._db.execute("SELECT allowed, run_token FROM gate_runs WHERE instance_id = ?",
                               (instance_id,)).fetchone()
        if row is not None and row[0] is None and row[1] is None:
            return  # nothing to clear: spare the write
        with self._write() as db:
            db.execute("INSERT INTO gate_runs (instance_id, allowed, run_token, updated_at) VALUES (?, NULL, NULL, ?) "
                       "ON CONFLICT(instance_id) DO UPDATE SET allowed = NULL, run_token = NULL, "
                       "updated_at = excluded.updated_at", (instance_id, utc_now()))

    def record_start_decision(self, instance_id: str, domain: str, operation: str,
                              reasons: tuple[str, ...]) -> None:
        """The hook's verdict on a start and, when it is allowed, the allowance `started begin` takes."""
        with self._write() as db:
            insert_hook_event(db, instance_id, domain, operation, "refused" if reasons else "allowed", reasons)
            db.execute("INSERT INTO gate_runs (instance_id, allowed, run_token, updated_at) VALUES (?, ?, NULL, ?) "
                       "ON CONFLICT(instance_id) DO UPDATE SET allowed = excluded.allowed, run_token = NULL, "
                       "updated_at = excluded.updated_at",
                       (instance_id, None if reasons else operation, utc_now()))

    def begin_run(self, instance_id: str, domain: str, operation: str) -> bool:
        """`started begin`: turn the hook's allowance into a run (once); False, and a warning on
        record, when libvirt started the guest without a start this hook allowed."""
        with self._write() as db:
            row = db.execute("SELECT allowed FROM gate_runs WHERE instance_id = ?", (instance_id,)).fetchone()
            allowed = row is not None and row[0] is not None
            if allowed:
                db.execute("UPDATE gate_runs SET allowed = NULL, run_token = ?, updated_at = ? WHERE instance_id = ?",
                           (os.urandom(16).hex(), utc_now(), instance_id))
                insert_hook_event(db, instance_id, domain, operation, "recorded", ("guest running",))
            else:
                insert_hook_event(db, instance_id, domain, operation, "warning", (
                    "guest running without a start this hook allowed: its stop will not be ledgered",))
        return allowed

    def run_open(self, instance_id: str) -> bool:
        row = self._db.execute("SELECT run_token FROM gate_runs WHERE instance_id = ?", (instance_id,)).fetchone()
        return row is not None and row[0] is not None

    def close_run(self, instance_id: str, domain: str, operation: str, vtpm_digest: str | None,
                  nvram_digest: str | None) -> bool:
        """`release end`: close the run (once) and ledger the states at rest, in one transaction.
        False, with nothing ledgered, when there is no run: a refused or failed start."""
        with self._write() as db:
            row = db.execute("SELECT run_token FROM gate_runs WHERE instance_id = ?", (instance_id,)).fetchone()
            if row is None or row[0] is None:
                insert_hook_event(db, instance_id, domain, operation, "recorded",
                                     ("start did not happen; nothing recorded",))
                return False
            db.execute("UPDATE gate_runs SET run_token = NULL, updated_at = ? WHERE instance_id = ?",
                       (utc_now(), instance_id))
            details = []
            if vtpm_digest is not None:
                insert_ledger_entry(db, instance_id, "stopped", vtpm_digest)
                details.append(f"vTPM state sha256:{vtpm_digest}")
            if nvram_digest is not None:
                insert_ledger_entry(db, instance_id, "stopped", nvram_digest, "nvram_ledger")
                details.append(f"NVRAM sha256:{nvram_digest}")
            insert_hook_event(db, instance_id, domain, operation, "recorded",
                                 tuple(details) or ("no vTPM state",))
        return True

    def refuse_start(self, instance_id: str | None, domain: str, operation: str, reasons: tuple[str, ...]) -> None:
        """A refusal the hook could not record as a decision (its deadline, an error): on file, and
        the instance's allowance and run cleared, in one transaction."""
        with self._write() as db:
            insert_hook_event(db, instance_id, domain, operation, "refused", reasons)
            if instance_id is not None:
                db.execute("UPDATE gate_runs SET allowed = NULL, run_token = NULL, updated_at = ? "
                           "WHERE instance_id = ?", (utc_now(), instance_id))
