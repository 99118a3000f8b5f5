"""Instance records, their event history, and the overlay each launch made."""

from __future__ import annotations

import sqlite3

from ...core.launch.instance import InstanceEvent, InstanceRecord, InstanceState, validate_name
from ...core.timestamps import utc_now
from ...errors import ConflictError, NotFoundError
from .database import Database

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


def insert_event(db: sqlite3.Connection, instance_id: str, kind: str, detail: str) -> None:
    """One entry of the instance's history, inside the caller's write transaction."""
    db.execute(
        "INSERT INTO instance_events (instance_id, at, kind, detail) VALUES (?,?,?,?)",
        (instance_id, utc_now(), kind, detail),
    )


class Instances(Database):
    """The instances table and instance_events: what was launched, and what happened to it since."""

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
                insert_event(db, record.id, "created", f"launch of {record.image} as {record.name}")
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
                insert_event(db, instance_id, *event)
            row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return _row_to_record(row)

    def add_event(self, instance_id: str, kind: str, detail: str) -> None:
        with self._write() as db:
            insert_event(db, instance_id, kind, detail)

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
            f"SELECT {_COLUMNS} FROM instances WHERE name = ? AND state NOT IN ('destroyed', 'migrated') "
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
            gone = self._db.execute(
                "SELECT m.peer_uri, i.updated_at FROM instances i JOIN migrations m ON m.instance_id = i.id "
                "WHERE i.name = ? AND i.state = 'migrated' ORDER BY i.updated_at DESC LIMIT 1", (name,)).fetchone()
            if gone is not None:
                raise NotFoundError(f"'{name}' migrated to {gone[0]} at {gone[1]}; it runs there now")
            raise NotFoundError(f"no instance named '{name}'")
        return record

    def list_instances(self, include_destroyed: bool = False) -> list[InstanceRecord]:
        where = "" if include_destroyed else "WHERE state NOT IN ('destroyed', 'migrated')"
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM instances {where} ORDER BY created_at, id").fetchall()
        return [_row_to_record(r) for r in rows]

    def events(self, instance_id: str) -> list[InstanceEvent]:
        rows = self._db.execute(
            "SELECT instance_id, at, kind, detail FROM instance_events WHERE instance_id = ? ORDER BY seq",
            (instance_id,),
        ).fetchall()
        return [InstanceEvent(r["instance_id"], r["at"], r["kind"], r["detail"]) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, COUNT(*) FROM instances WHERE state NOT IN ('destroyed', 'migrated') GROUP BY state"
        ).fetchall()
        return {r[0]: r[1] for r in rows}
