"""Guest attestation's records: the certified AK, the boot baseline, every verified boot."""

from __future__ import annotations

import json
from typing import Any

from ...core.timestamps import utc_now
from .database import Database
from .instances import insert_event

BASELINE_SOURCES = ("predicted", "learned", "accepted")  # guest_baselines.source


class GuestEvidence(Database):
    """guest_aks, guest_baselines and guest_boots."""

    def save_guest_ak(self, instance_id: str, ak_public: bytes, ak_name: bytes, certification: str,
                      certified_at: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO guest_aks (instance_id, ak_public, ak_name, certification, "
                       "certified_at) VALUES (?,?,?,?,?)", (instance_id, ak_public, ak_name, certification,
                                                             certified_at))
            insert_event(db, instance_id, "ak-certified", f"AK name {ak_name.hex()} (credential activation)")

    def guest_ak(self, instance_id: str) -> tuple[bytes, bytes, str, str] | None:
        """(AK public, AK name, signed certification JSON, certified at) of the instance's certified AK."""
        row = self._db.execute("SELECT ak_public, ak_name, certification, certified_at FROM guest_aks "
                               "WHERE instance_id = ?", (instance_id,)).fetchone()
        return (bytes(row[0]), bytes(row[1]), row[2], row[3]) if row else None

    def set_guest_baseline(self, instance_id: str, eventlog: bytes, reason: str, event: str,
                           source: str) -> None:
        """Record EVENTLOG as the baseline; SOURCE is one of BASELINE_SOURCES."""
        if source not in BASELINE_SOURCES:
            raise ValueError(f"baseline source {source!r} is not one of {BASELINE_SOURCES}")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO guest_baselines (instance_id, eventlog, learned_at, reason, source) "
                       "VALUES (?,?,?,?,?)", (instance_id, eventlog, utc_now(), reason, source))
            insert_event(db, instance_id, event, reason)

    def guest_baseline_source(self, instance_id: str) -> str | None:
        """Where the baseline came from (BASELINE_SOURCES); rows from before the column, by their reason."""
        row = self._db.execute("SELECT source, reason FROM guest_baselines WHERE instance_id = ?",
                               (instance_id,)).fetchone()
        if row is None:
            return None
        return row[0] or ("accepted" if str(row[1]).startswith("accepted by") else "learned")

    def guest_baseline(self, instance_id: str) -> tuple[bytes, str, str] | None:
        """(event log, learned at, reason) of the instance's baseline."""
        row = self._db.execute("SELECT eventlog, learned_at, reason FROM guest_baselines WHERE instance_id = ?",
                               (instance_id,)).fetchone()
        return (bytes(row[0]), row[1], row[2]) if row else None

    def add_guest_boot(self, instance_id: str, reset_count: int, matches: bool, verdict: str,
                       eventlog: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT INTO guest_boots (instance_id, at, reset_count, matches, verdict, eventlog) "
                       "VALUES (?,?,?,?,?,?)", (instance_id, utc_now(), reset_count, int(matches), verdict,
                                                eventlog))

    def guest_boots(self, instance_id: str, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT seq, at, reset_count, matches, verdict FROM guest_boots "
                                "WHERE instance_id = ? ORDER BY seq DESC LIMIT ?", (instance_id, limit)).fetchall()
        return [{"seq": r[0], "at": r[1], "reset_count": r[2], "matches": bool(r[3]),
                 "verdict": json.loads(r[4])} for r in reversed(rows)]

    def last_guest_boot_log(self, instance_id: str) -> bytes | None:
        row = self._db.execute("SELECT eventlog FROM guest_boots WHERE instance_id = ? ORDER BY seq DESC LIMIT 1",
                               (instance_id,)).fetchone()
        return bytes(row[0]) if row else None
