"""Reference values (the digests the node trusts, and those removed) and the file digest cache."""

from __future__ import annotations

from ...core.launch.references import ReferenceValue
from ...core.timestamps import utc_now
from .database import Database


class References(Database):
    """reference_values and reference_tombstones."""

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


class DigestCache(Database):
    """digest_cache: file digests valid while the file's identity and times are unchanged
    (tvorch.adapters.digests.DigestCache)."""

    def cached_digest(self, key: tuple[int, int, int, int, int]) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM digest_cache WHERE dev=? AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=?", key
        ).fetchone()
        return row[0] if row else None

    def cache_digest(self, key: tuple[int, int, int, int, int], digest: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO digest_cache (dev, ino, size, mtime_ns, ctime_ns, digest) VALUES (?,?,?,?,?,?)",
                (*key, digest),
            )
