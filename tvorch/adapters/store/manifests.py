"""The signed launch manifest of each instance, byte for byte."""

from __future__ import annotations

from ...core.timestamps import utc_now
from .database import Database
from .instances import insert_event


class Manifests(Database):
    """The manifests table."""

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
            insert_event(db, instance_id, "manifest", f"signed launch manifest sha256:{digest}")

    def manifest(self, instance_id: str) -> bytes | None:
        row = self._db.execute("SELECT body FROM manifests WHERE instance_id = ?", (instance_id,)).fetchone()
        return bytes(row[0]) if row else None
