"""The host's records: attestation verdicts (the hook reads the latest) and the daemon's heartbeat."""

from __future__ import annotations

import json
import time

from ...core.attestation.hostverdict import DaemonStatus, HostVerdict
from ...core.timestamps import utc_now
from .database import Database


class HostRecords(Database):
    """host_verdicts and daemon_status."""

    def add_host_verdict(self, verdict: HostVerdict) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO host_verdicts (at, at_epoch, passed, failures, policy_digest, quote) VALUES (?,?,?,?,?,?)",
                (verdict.at, verdict.at_epoch, int(verdict.passed), json.dumps(list(verdict.failures)),
                 verdict.policy_digest, verdict.quote_json),
            )

    def latest_host_verdict(self) -> HostVerdict | None:
        row = self._db.execute(
            "SELECT at, at_epoch, passed, failures, policy_digest, quote FROM host_verdicts ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return HostVerdict(row["at"], row["at_epoch"], bool(row["passed"]), tuple(json.loads(row["failures"])),
                           row["policy_digest"], row["quote"])

    def daemon_heartbeat(self, pid: int, started_at: str, connected: bool, detail: str,
                         libvirt_uri: str | None = None) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO daemon_status (id, pid, started_at, heartbeat_at, heartbeat_epoch, connected, "
                "detail, libvirt_uri) VALUES (1,?,?,?,?,?,?,?)",
                (pid, started_at, utc_now(), time.time(), int(connected), detail, libvirt_uri),
            )

    def daemon_status(self) -> DaemonStatus | None:
        row = self._db.execute(
            "SELECT pid, started_at, heartbeat_at, heartbeat_epoch, connected, detail, libvirt_uri FROM daemon_status"
        ).fetchone()
        return DaemonStatus(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6]) if row else None
