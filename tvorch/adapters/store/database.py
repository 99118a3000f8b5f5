"""The state database: its connection, the write transaction, the schema and its migrations.

One file under the state directory, in WAL mode so readers (the hook, `list`)
never wait for a writer. Writers take the database lock up front
(`BEGIN IMMEDIATE`) and wait up to the busy timeout, so concurrent tvorch
processes queue instead of failing. The schema is versioned with
``PRAGMA user_version``; each migration runs in its own transaction.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...errors import StoreError
from ..files import ensure_private_dir

BUSY_TIMEOUT_MS = 15000

# Append only: a released migration is never edited, a new one is added.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        uuid TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,
        overlay TEXT NOT NULL,
        console_log TEXT NOT NULL,
        state TEXT NOT NULL,
        virt_type TEXT NOT NULL,
        domain_xml TEXT NOT NULL,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    -- A name is unique among instances that still exist.
    CREATE UNIQUE INDEX instances_live_name ON instances(name) WHERE state != 'destroyed';
    CREATE TABLE instance_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id TEXT NOT NULL REFERENCES instances(id),
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX instance_events_by_instance ON instance_events(instance_id, seq);
    """,
    """
    -- Reference values: digests the node trusts, by kind (image, firmware ...).
    CREATE TABLE reference_values (
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        label TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        signer TEXT,
        added_at TEXT NOT NULL,
        PRIMARY KEY (kind, digest)
    );
    -- File digests, valid while the file's identity and times are unchanged.
    CREATE TABLE digest_cache (
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (dev, ino)
    );
    -- The signed launch manifest of each instance, byte for byte.
    CREATE TABLE manifests (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        digest TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    """
    -- The overlay tvorch created, as "device:inode": a replaced file is another inode.
    ALTER TABLE instances ADD COLUMN overlay_identity TEXT;
    -- Every decision of the libvirt hook; instance_id is NULL for unknown domains.
    CREATE TABLE hook_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id TEXT,
        domain TEXT NOT NULL,
        at TEXT NOT NULL,
        operation TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reasons TEXT NOT NULL
    );
    CREATE INDEX hook_events_by_instance ON hook_events(instance_id, seq);
    -- Hash-chained vTPM state digests: each entry's hash covers the previous one.
    CREATE TABLE vtpm_ledger (
        instance_id TEXT NOT NULL REFERENCES instances(id),
        seq INTEGER NOT NULL,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        state_digest TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        entry_hash TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    """,
    """
    -- Host attestation verdicts; the hook reads the latest.
    CREATE TABLE host_verdicts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        at_epoch REAL NOT NULL,
        passed INTEGER NOT NULL,
        failures TEXT NOT NULL,
        policy_digest TEXT NOT NULL,
        quote TEXT NOT NULL
    );
    """,
    """
    -- A failed launch no longer holds its name: it can be retried by name.
    DROP INDEX instances_live_name;
    CREATE UNIQUE INDEX instances_live_name ON instances(name) WHERE state NOT IN ('destroyed', 'failed');
    -- The daemon's heartbeat, one row, for `tvorch status`.
    CREATE TABLE daemon_status (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        heartbeat_epoch REAL NOT NULL,
        connected INTEGER NOT NULL,
        detail TEXT NOT NULL
    );
    """,
    """
    -- Each instance's vTPM: identity, how its state key is kept, an operation in progress.
    CREATE TABLE vtpms (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        state_dir TEXT NOT NULL,
        swtpm_version TEXT NOT NULL,
        ek_fingerprint TEXT NOT NULL,
        ek_cert BLOB NOT NULL,
        ek_public_pem BLOB NOT NULL,
        key_protection TEXT NOT NULL,
        secret_uuid TEXT,
        sealed_key BLOB,
        seal_pcrs TEXT NOT NULL,
        escrow_key BLOB,
        escrow_fingerprint TEXT,
        key_check TEXT,
        pending TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        purged_at TEXT
    );
    """,
    """
    -- Guest attestation: the certified AK of each instance's vTPM (its latest; earlier ones in events).
    CREATE TABLE guest_aks (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        ak_public BLOB NOT NULL,
        ak_name BLOB NOT NULL,
        certification TEXT NOT NULL,
        certified_at TEXT NOT NULL
    );
    -- The instance's boot baseline: the event log of its first verified boot, or one accepted since.
    CREATE TABLE guest_baselines (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        eventlog BLOB NOT NULL,
        learned_at TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    -- One verdict per verified boot (the vTPM's reset count tells boots apart).
    CREATE TABLE guest_boots (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id TEXT NOT NULL REFERENCES instances(id),
        at TEXT NOT NULL,
        reset_count INTEGER NOT NULL,
        matches INTEGER NOT NULL,
        verdict TEXT NOT NULL,
        eventlog BLOB NOT NULL
    );
    CREATE INDEX guest_boots_by_instance ON guest_boots(instance_id, seq);
    """,
    """
    -- The vTPM's TCG platform certificate (an attribute certificate naming its EK certificate).
    ALTER TABLE vtpms ADD COLUMN platform_cert BLOB;
    """,
    """
    -- Reference values removed (image untrust, reference remove): a retried removal is told it is
    -- already gone, a digest never trusted stays an error.
    CREATE TABLE reference_tombstones (
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        label TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        signer TEXT,
        added_at TEXT NOT NULL,
        removed_at TEXT NOT NULL,
        PRIMARY KEY (kind, digest)
    );
    -- The libvirt connection the daemon follows, for tvorch status.
    ALTER TABLE daemon_status ADD COLUMN libvirt_uri TEXT;
    """,
    """
    -- The hook's runs (tvorch.hook): the start it allowed last, until `started begin` turns it into a
    -- run, and that run, until `release end` closes it and ledgers the state at rest. A start being
    -- checked clears both, so nothing but a run this hook allowed and libvirt started is ledgered.
    CREATE TABLE gate_runs (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        allowed TEXT,
        run_token TEXT,
        updated_at TEXT NOT NULL
    );
    -- Guests running under the hook before runs were kept (their last start operation was
    -- `started begin`) keep their run, so their next stop is ledgered.
    INSERT INTO gate_runs (instance_id, allowed, run_token, updated_at)
        SELECT h.instance_id, NULL, 'before-gate-runs', h.at FROM hook_events h
        WHERE h.instance_id IS NOT NULL AND h.operation = 'started begin' AND h.seq = (
            SELECT MAX(seq) FROM hook_events WHERE instance_id = h.instance_id AND operation IN
            ('prepare begin', 'start begin', 'restore begin', 'migrate begin', 'started begin'));
    -- Each instance's UEFI variable store (NVRAM) digests, hash-chained like vtpm_ledger:
    -- `launched` (the vars template libvirt copies), then each `stopped`.
    CREATE TABLE nvram_ledger (
        instance_id TEXT NOT NULL REFERENCES instances(id),
        seq INTEGER NOT NULL,
        at TEXT NOT NULL,
        event TEXT NOT NULL,
        state_digest TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        entry_hash TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    """,
    """
    -- Start paths for sealed vTPMs (README, "Start paths"). Instances `tvorch serve` starts when it starts.
    CREATE TABLE autostart (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        since TEXT NOT NULL
    );
    -- The managed save tvorch made of each instance: the image's digest, valid only while the vTPM
    -- ledger's last entry is the `saved` one it was made with (a restore and a stop after it end it).
    CREATE TABLE managed_saves (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        ledger_seq INTEGER NOT NULL,
        path TEXT NOT NULL,
        digest TEXT NOT NULL,
        saved_at TEXT NOT NULL
    );
    -- While tvorch lends the vTPM key to libvirt for a start (service.vtpm.unlocked): the hook
    -- refuses a start with no key lent by naming `tvorch start` instead of libvirt's "Secret not found".
    ALTER TABLE vtpms ADD COLUMN key_lent_at TEXT;
    """,
    """
    -- Where a boot baseline came from (README, "Predicted boot measurements"): "predicted" (a first boot
    -- that matched the launch manifest's signed prediction), "learned" or "accepted"; NULL in rows from
    -- before, read by their reason.
    ALTER TABLE guest_baselines ADD COLUMN source TEXT;
    """,
    """
    -- Live migration (README, "Live migration"). A migrated-out instance stays as a tombstone that no
    -- longer holds its name; the signed statement of each migration entry of the vTPM ledger; the
    -- migration in flight per instance, for `tvorch reconcile` to settle after a crash.
    DROP INDEX instances_live_name;
    CREATE UNIQUE INDEX instances_live_name ON instances(name) WHERE state NOT IN ('destroyed', 'failed', 'migrated');
    CREATE TABLE ledger_handoffs (
        instance_id TEXT NOT NULL REFERENCES instances(id),
        seq INTEGER NOT NULL,
        statement TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );
    CREATE TABLE migrations (
        instance_id TEXT PRIMARY KEY REFERENCES instances(id),
        direction TEXT NOT NULL,
        peer_uri TEXT NOT NULL,
        peer_node TEXT NOT NULL,
        statement TEXT NOT NULL,
        started_at TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """One connection to the state database; the areas of the Store (this package) build on it."""

    def __init__(self, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        """BUSY_TIMEOUT_MS: how long to wait for another writer (the hook waits no longer than its deadline)."""
        self.path = path
        try:
            ensure_private_dir(path.parent)
            # Create the file 0600 before SQLite does (it would honour umask). Never open an
            # existing one: closing any descriptor of the file drops every POSIX lock this
            # process holds on it, the locks of its other connections too (the daemon's
            # threads), and another process would then take its WAL for abandoned and delete it.
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            self._db = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as err:
            raise StoreError(f"state database {path} is unusable: {err}") from None
        except OSError as err:
            raise StoreError(f"cannot open state database {path}: {err.strerror}") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time across processes: take the lock first."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise StoreError(f"state database {self.path} is busy: {err}") from None
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as err:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(err, sqlite3.IntegrityError):
                raise  # callers turn these into their own refusals (a taken name)
            if isinstance(err, sqlite3.Error):
                # A full disk, an I/O error: the transaction is rolled back, nothing half-written.
                raise StoreError(f"state database {self.path}: {err}; nothing was changed") from None
            raise

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state database {self.path} has schema {version}, newer than this tvorch ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._write() as db:
                # Re-check under the lock: another process may have migrated.
                if db.execute("PRAGMA user_version").fetchone()[0] != number:
                    continue
                # executescript() would commit our transaction: run statement by statement.
                code = "\n".join(line for line in MIGRATIONS[number].splitlines() if not line.strip().startswith("--"))
                for statement in code.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])
