"""The SQLite store: instance records and their event history.

One file under the state directory, in WAL mode so readers (the hook, `list`)
never wait for a writer. Writers take the database lock up front
(`BEGIN IMMEDIATE`) and wait up to the busy timeout, so concurrent tvorch
processes queue instead of failing. The schema is versioned with
``PRAGMA user_version``; each migration runs in its own transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..core.instance import InstanceEvent, InstanceRecord, InstanceState, validate_name
from ..core.ledger import LedgerEntry, chain_entry
from ..core.vtpm import KeyProtection, VtpmRecord
from ..core.hostverdict import DaemonStatus, HostVerdict
from ..core.references import ReferenceValue
from ..core.timestamps import utc_now
from ..errors import ConflictError, NotFoundError, StoreError
from .files import ensure_private_dir

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
)
SCHEMA_VERSION = len(MIGRATIONS)
BASELINE_SOURCES = ("predicted", "learned", "accepted")  # guest_baselines.source

_VTPM_COLUMNS = (
    "instance_id, state_dir, swtpm_version, ek_fingerprint, ek_cert, ek_public_pem, key_protection, secret_uuid, "
    "sealed_key, seal_pcrs, escrow_key, escrow_fingerprint, key_check, created_at, updated_at, purged_at, "
    "platform_cert"
)
_COLUMNS = "id, name, uuid, image, overlay, console_log, state, virt_type, domain_xml, created_at, updated_at, error"


def _row_to_record(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        id=row["id"],
        name=row["name"],
        uuid=row["uuid"],
        image=row["image"],
        overlay=row["overlay"],
        console_log=row["console_log"],
        state=InstanceState(row["state"]),
        virt_type=row["virt_type"],
        domain_xml=row["domain_xml"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        error=row["error"],
    )


LEDGERS = ("vtpm_ledger", "nvram_ledger")


def _ledger(table: str) -> str:
    """A ledger table's name, checked: it is put into SQL text."""
    if table not in LEDGERS:
        raise ValueError(f"no ledger table {table!r}")
    return table


def _blob(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


class Store:
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

    # -- instances -------------------------------------------------------

    def create_instance(self, record: InstanceRecord) -> None:
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO instances ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.id, record.name, record.uuid, record.image, record.overlay, record.console_log,
                        record.state.value, record.virt_type, record.domain_xml,
                        record.created_at, record.updated_at, record.error,
                    ),
                )
                self._add_event(db, record.id, "created", f"launch of {record.image} as {record.name}")
        except sqlite3.IntegrityError:
            raise ConflictError(f"an instance named '{record.name}' already exists") from None

    def update_instance(
        self,
        instance_id: str,
        *,
        state: InstanceState | None = None,
        domain_xml: str | None = None,
        error: str | None = None,
        event: tuple[str, str] | None = None,
    ) -> InstanceRecord:
        """Change a record and log why, in one transaction."""
        with self._write() as db:
            sets, args = ["updated_at = ?"], [utc_now()]
            if state is not None:
                sets.append("state = ?")
                args.append(state.value)
            if domain_xml is not None:
                sets.append("domain_xml = ?")
                args.append(domain_xml)
            if error is not None:
                sets.append("error = ?")
                args.append(error)
            cur = db.execute(f"UPDATE instances SET {', '.join(sets)} WHERE id = ?", (*args, instance_id))
            if cur.rowcount != 1:
                raise NotFoundError(f"no instance with id {instance_id}")
            if event is not None:
                self._add_event(db, instance_id, *event)
            row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return _row_to_record(row)

    def add_event(self, instance_id: str, kind: str, detail: str) -> None:
        with self._write() as db:
            self._add_event(db, instance_id, kind, detail)

    @staticmethod
    def _add_event(db: sqlite3.Connection, instance_id: str, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO instance_events (instance_id, at, kind, detail) VALUES (?,?,?,?)",
            (instance_id, utc_now(), kind, detail),
        )

    def by_uuid(self, uuid: str) -> InstanceRecord | None:
        """The live (not destroyed) instance whose libvirt domain has UUID."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM instances WHERE uuid = ? AND state != 'destroyed'", (uuid,)
        ).fetchone()
        return _row_to_record(row) if row else None

    def by_id(self, instance_id: str) -> InstanceRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return _row_to_record(row) if row else None

    def set_overlay_identity(self, instance_id: str, identity: str) -> None:
        with self._write() as db:
            db.execute("UPDATE instances SET overlay_identity = ? WHERE id = ?", (identity, instance_id))

    def overlay_identity(self, instance_id: str) -> str | None:
        row = self._db.execute("SELECT overlay_identity FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return row[0] if row else None

    def find_live(self, name: str) -> InstanceRecord | None:
        """The newest instance of that name that has not been destroyed (a failed one included)."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM instances WHERE name = ? AND state != 'destroyed' "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1", (name,)
        ).fetchone()
        return _row_to_record(row) if row else None

    def find_destroyed(self, name: str) -> InstanceRecord | None:
        """The newest destroyed instance of that name: a destroyed record is never deleted, so it is
        what tells a retried `tvorch destroy` from a name this store never knew."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM instances WHERE name = ? AND state = 'destroyed' "
            "ORDER BY updated_at DESC, rowid DESC LIMIT 1", (name,)
        ).fetchone()
        return _row_to_record(row) if row else None

    def get_live(self, name: str) -> InstanceRecord:
        """The record of NAME; a name no launch could have made is refused first (exit 3)."""
        record = self.find_live(validate_name(name))
        if record is None:
            raise NotFoundError(f"no instance named '{name}'")
        return record

    def list_instances(self, include_destroyed: bool = False) -> list[InstanceRecord]:
        where = "" if include_destroyed else "WHERE state != 'destroyed'"
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM instances {where} ORDER BY created_at, id").fetchall()
        return [_row_to_record(r) for r in rows]

    def events(self, instance_id: str) -> list[InstanceEvent]:
        rows = self._db.execute(
            "SELECT instance_id, at, kind, detail FROM instance_events WHERE instance_id = ? ORDER BY seq",
            (instance_id,),
        ).fetchall()
        return [InstanceEvent(r["instance_id"], r["at"], r["kind"], r["detail"]) for r in rows]

    # -- reference values --------------------------------------------------

    def add_reference(self, ref: ReferenceValue) -> bool:
        """Record REF; False when that digest was already trusted for its kind."""
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO reference_values (kind, digest, label, path, size, signer, added_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (ref.kind, ref.digest, ref.label, ref.path, ref.size, ref.signer, ref.added_at),
            )
            return cur.rowcount == 1

    def remove_reference(self, kind: str, digest: str) -> bool:
        """Forget a trusted digest, leaving a tombstone; False when it was not trusted."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO reference_tombstones (kind, digest, label, path, size, signer, added_at, "
                "removed_at) SELECT kind, digest, label, path, size, signer, added_at, ? FROM reference_values "
                "WHERE kind = ? AND digest = ?", (utc_now(), kind, digest))
            return db.execute(
                "DELETE FROM reference_values WHERE kind = ? AND digest = ?", (kind, digest)
            ).rowcount == 1

    def removed_reference(self, kind: str, digest: str) -> tuple[ReferenceValue, str] | None:
        """The reference value last removed with that digest, and when; None if it never was."""
        row = self._db.execute(
            "SELECT kind, digest, label, path, size, signer, added_at, removed_at FROM reference_tombstones "
            "WHERE kind = ? AND digest = ?", (kind, digest)).fetchone()
        return (ReferenceValue(*row[:7]), row[7]) if row else None

    def references(self, kind: str | None = None) -> list[ReferenceValue]:
        sql = "SELECT kind, digest, label, path, size, signer, added_at FROM reference_values"
        rows = self._db.execute(
            sql + (" WHERE kind = ? ORDER BY added_at" if kind else " ORDER BY kind, added_at"),
            (kind,) if kind else (),
        ).fetchall()
        return [ReferenceValue(*row) for row in rows]

    # -- digest cache (tvorch.adapters.digests.DigestCache) -----------------

    def get(self, key: tuple[int, int, int, int, int]) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM digest_cache WHERE dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=?", key
        ).fetchone()
        return row[0] if row else None

    def put(self, key: tuple[int, int, int, int, int], digest: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO digest_cache (dev, ino, size, mtime_ns, ctime_ns, digest) VALUES (?,?,?,?,?,?)",
                (*key, digest),
            )

    # -- manifests ---------------------------------------------------------

    def save_manifest(self, instance_id: str, digest: str, body: bytes, domain_xml: str | None = None) -> None:
        """The signed manifest and, when given, the domain XML that names it, in one transaction."""
        with self._write() as db:
            db.execute(
                "INSERT INTO manifests (instance_id, digest, body, created_at) VALUES (?,?,?,?)",
                (instance_id, digest, body, utc_now()),
            )
            if domain_xml is not None:
                db.execute("UPDATE instances SET domain_xml = ?, updated_at = ? WHERE id = ?",
                           (domain_xml, utc_now(), instance_id))
            self._add_event(db, instance_id, "manifest", f"signed launch manifest sha256:{digest}")

    def manifest(self, instance_id: str) -> bytes | None:
        row = self._db.execute("SELECT body FROM manifests WHERE instance_id = ?", (instance_id,)).fetchone()
        return bytes(row[0]) if row else None

    # -- hook decisions ----------------------------------------------------

    def add_hook_event(
        self, instance_id: str | None, domain: str, operation: str, verdict: str, reasons: tuple[str, ...]
    ) -> None:
        with self._write() as db:
            self._add_hook_event(db, instance_id, domain, operation, verdict, reasons)

    @staticmethod
    def _add_hook_event(db: sqlite3.Connection, instance_id: str | None, domain: str, operation: str, verdict: str,
                        reasons: tuple[str, ...]) -> None:
        db.execute(
            "INSERT INTO hook_events (instance_id, domain, at, operation, verdict, reasons) VALUES (?,?,?,?,?,?)",
            (instance_id, domain, utc_now(), operation, verdict, json.dumps(list(reasons))),
        )

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

    # -- vTPM ledger -------------------------------------------------------

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
            return self._append_ledger(db, instance_id, event, state_digest, table)

    @staticmethod
    def _append_ledger(db: sqlite3.Connection, instance_id: str, event: str, state_digest: str,
                       table: str = "vtpm_ledger") -> LedgerEntry:
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

    # -- the hook's runs (gate_runs) -----------------------------------------

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
            self._add_hook_event(db, instance_id, domain, operation, "refused" if reasons else "allowed", reasons)
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
                self._add_hook_event(db, instance_id, domain, operation, "recorded", ("guest running",))
            else:
                self._add_hook_event(db, instance_id, domain, operation, "warning", (
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
                self._add_hook_event(db, instance_id, domain, operation, "recorded",
                                     ("start did not happen; nothing recorded",))
                return False
            db.execute("UPDATE gate_runs SET run_token = NULL, updated_at = ? WHERE instance_id = ?",
                       (utc_now(), instance_id))
            details = []
            if vtpm_digest is not None:
                self._append_ledger(db, instance_id, "stopped", vtpm_digest)
                details.append(f"vTPM state sha256:{vtpm_digest}")
            if nvram_digest is not None:
                self._append_ledger(db, instance_id, "stopped", nvram_digest, "nvram_ledger")
                details.append(f"NVRAM sha256:{nvram_digest}")
            self._add_hook_event(db, instance_id, domain, operation, "recorded",
                                 tuple(details) or ("no vTPM state",))
        return True

    def refuse_start(self, instance_id: str | None, domain: str, operation: str, reasons: tuple[str, ...]) -> None:
        """A refusal the hook could not record as a decision (its deadline, an error): on file, and
        the instance's allowance and run cleared, in one transaction."""
        with self._write() as db:
            self._add_hook_event(db, instance_id, domain, operation, "refused", reasons)
            if instance_id is not None:
                db.execute("UPDATE gate_runs SET allowed = NULL, run_token = NULL, updated_at = ? "
                           "WHERE instance_id = ?", (utc_now(), instance_id))

    # -- start paths: autostart, managed saves, the key lent -----------------

    def set_autostart(self, instance_id: str, on: bool) -> bool:
        """Record whether `tvorch serve` starts the instance when it starts; True when that changed."""
        with self._write() as db:
            was = db.execute("SELECT 1 FROM autostart WHERE instance_id = ?", (instance_id,)).fetchone() is not None
            if on and not was:
                db.execute("INSERT INTO autostart (instance_id, since) VALUES (?, ?)", (instance_id, utc_now()))
            elif was and not on:
                db.execute("DELETE FROM autostart WHERE instance_id = ?", (instance_id,))
            if was != on:
                self._add_event(db, instance_id, "autostart", "on: tvorch serve starts it" if on else "off")
        return was != on

    def autostart_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT instance_id FROM autostart")}

    def record_managed_save(self, instance_id: str, path: str, image_digest: str, vtpm_digest: str) -> LedgerEntry:
        """Ledger the vTPM state at rest as `saved` and the save image's digest bound to that entry."""
        with self._write() as db:
            entry = self._append_ledger(db, instance_id, "saved", vtpm_digest)
            db.execute("INSERT INTO managed_saves (instance_id, ledger_seq, path, digest, saved_at) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET ledger_seq = excluded.ledger_seq, "
                       "path = excluded.path, digest = excluded.digest, saved_at = excluded.saved_at",
                       (instance_id, entry.seq, path, image_digest, entry.at))
            self._add_event(db, instance_id, "vtpm-saved",
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

    # -- vTPM records ------------------------------------------------------

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
            self._append_ledger(db, record.instance_id, "manufactured", state_digest)
            self._add_event(db, record.instance_id, "vtpm-manufactured", f"EK sha256:{record.ek_fingerprint}")

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
            self._add_event(db, instance_id, "vtpm-rekeyed", why)

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
            entry = self._append_ledger(db, instance_id, event, state_digest)
            db.execute("UPDATE vtpms SET pending = NULL, updated_at = ? WHERE instance_id = ?",
                       (utc_now(), instance_id))
            self._add_event(db, instance_id, f"vtpm-{event}", detail)
        return entry

    def purge_vtpm(self, instance_id: str) -> None:
        """Forget the state key (both wrappings): a backup of the purged state can no longer be read."""
        with self._write() as db:
            db.execute("UPDATE vtpms SET sealed_key = NULL, escrow_key = NULL, pending = NULL, purged_at = ?, "
                       "updated_at = ? WHERE instance_id = ?", (utc_now(), utc_now(), instance_id))

    # -- guest attestation ------------------------------------------------

    def save_guest_ak(self, instance_id: str, ak_public: bytes, ak_name: bytes, certification: str,
                      certified_at: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO guest_aks (instance_id, ak_public, ak_name, certification, "
                       "certified_at) VALUES (?,?,?,?,?)", (instance_id, ak_public, ak_name, certification,
                                                             certified_at))
            self._add_event(db, instance_id, "ak-certified", f"AK name {ak_name.hex()} (credential activation)")

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
            self._add_event(db, instance_id, event, reason)

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

    # -- host verdicts -----------------------------------------------------

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

    # -- daemon heartbeat --------------------------------------------------

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

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, COUNT(*) FROM instances WHERE state != 'destroyed' GROUP BY state"
        ).fetchall()
        return {r[0]: r[1] for r in rows}
