"""The vTPM ledger: a hash chain of the instance's vTPM state digests.

Each entry's hash covers its fields and the previous entry's hash, so an
entry cannot be removed, reordered or edited without breaking every later
link. The hook's rollback check compares the state on disk with the last
entry's digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tvorch.core.codec import canonical_json

GENESIS = "0" * 64


@dataclass(frozen=True)
class LedgerEntry:
    instance_id: str
    seq: int
    at: str
    event: str  # e.g. "stopped"
    state_digest: str
    prev_hash: str
    entry_hash: str

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq, "at": self.at, "event": self.event, "state_digest": self.state_digest,
            "prev_hash": self.prev_hash, "entry_hash": self.entry_hash,
        }


def _entry_hash(instance_id: str, seq: int, at: str, event: str, state_digest: str, prev_hash: str) -> str:
    body = canonical_json([instance_id, seq, at, event, state_digest, prev_hash], ensure_ascii=True)
    return hashlib.sha256(body).hexdigest()


def chain_entry(
    instance_id: str, seq: int, at: str, event: str, state_digest: str, prev_hash: str | None
) -> LedgerEntry:
    prev = prev_hash or GENESIS
    return LedgerEntry(instance_id, seq, at, event, state_digest, prev,
                       _entry_hash(instance_id, seq, at, event, state_digest, prev))


def state_digest_of(files: dict[str, bytes]) -> str:
    """The digest of a vTPM state given as {file name: content}: sha256 over the sorted
    (name, sha256(content)) pairs, so an older copy of any one file is another digest."""
    outer = hashlib.sha256()
    for name in sorted(files):
        outer.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return outer.hexdigest()


def broken_link(entries: list[LedgerEntry]) -> int | None:
    """The seq of the first entry whose link or hash does not hold, or None."""
    prev = GENESIS
    for expected_seq, e in enumerate(entries):
        if (e.seq != expected_seq or e.prev_hash != prev
                or e.entry_hash != _entry_hash(e.instance_id, e.seq, e.at, e.event, e.state_digest, e.prev_hash)):
            return e.seq
        prev = e.entry_hash
    return None
