"""The signed hand-over of a vTPM's ledger from one node to another.

A migration adds two entries to the instance's vTPM ledger: ``migrated-out``
(made and signed by the source) and ``migrated-in`` (chained onto it, made
and signed by the destination). Each comes with a *handoff statement*: the
entry, the instance, its manifest, and the two nodes (each a node CA key's
fingerprint), signed by the node that made the entry. So the hash chain runs
unbroken across nodes, and a verifier holding the fleet's root can check
which node handed the vTPM to which, and that neither entry was made up.

Pure: dataclasses and JSON in, signed JSON and verdicts out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.launch.manifest_format import fields_of
from tvorch.core.signed import key_fingerprint, sign_block, verify_block
from tvorch.core.vtpm.ledger import LedgerEntry, broken_link, chain_entry
from tvorch.errors import TrustError

PROTOCOL = "tvorch-migrate/1"
HANDOFF_FORMAT = "tvorch-handoff/1"


class HandoffEvent(str, Enum):
    OUT = "migrated-out"  # the source gave the vTPM away
    IN = "migrated-in"  # the destination took it


@dataclass(frozen=True)
class Handoff:
    """One migration entry of the vTPM ledger and who made it for whom."""

    event: HandoffEvent
    entry: LedgerEntry
    uuid: str
    name: str
    manifest_digest: str
    node: str  # key fingerprint of the signing node's CA (core.signed.key_fingerprint)
    peer: str  # the other node's
    peer_uri: str  # the libvirt URI the other node was reached at (informational)
    session: str  # sha256 of the source's nonce: binds the statement to one migration, so none is replayed

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HANDOFF_FORMAT, "event": self.event.value, "instance_id": self.entry.instance_id,
            "entry": self.entry.to_json(), "uuid": self.uuid, "name": self.name,
            "manifest_digest": self.manifest_digest, "node": self.node, "peer": self.peer, "peer_uri": self.peer_uri,
            "session": self.session,
        }


_FIELDS = ("format", "event", "instance_id", "entry", "uuid", "name", "manifest_digest", "node", "peer", "peer_uri",
           "session")
_ENTRY_FIELDS = ("seq", "at", "event", "state_digest", "prev_hash", "entry_hash")


def handoff_from_json(data: object) -> Handoff:
    f = fields_of(data, "handoff statement", _FIELDS)
    if f["format"] != HANDOFF_FORMAT:
        raise TrustError(f"handoff statement format {f['format']!r} is not {HANDOFF_FORMAT!r}")
    try:
        event = HandoffEvent(f["event"])
    except ValueError:
        raise TrustError(f"handoff statement event {f['event']!r} is neither migrated-out nor migrated-in") from None
    e = fields_of(f["entry"], "handoff statement entry", _ENTRY_FIELDS)
    texts = [f[k] for k in ("instance_id", "uuid", "name", "manifest_digest", "node", "peer", "peer_uri", "session")]
    texts += [e[k] for k in ("at", "event", "state_digest", "prev_hash", "entry_hash")]
    if not all(isinstance(t, str) for t in texts) or type(e["seq"]) is not int:
        raise TrustError("handoff statement: a field has the wrong type")
    entry = LedgerEntry(f["instance_id"], e["seq"], e["at"], e["event"], e["state_digest"], e["prev_hash"],
                        e["entry_hash"])
    if entry.event != event.value:
        raise TrustError(f"handoff statement for {event.value} carries a {entry.event!r} entry")
    if chain_entry(entry.instance_id, entry.seq, entry.at, entry.event, entry.state_digest,
                   entry.prev_hash) != entry:
        raise TrustError("handoff statement: its ledger entry's hash does not match the entry")
    return Handoff(event, entry, f["uuid"], f["name"], f["manifest_digest"], f["node"], f["peer"], f["peer_uri"],
                   f["session"])


def session_of(nonce: bytes) -> str:
    return hashlib.sha256(nonce).hexdigest()


def next_entry(last: LedgerEntry, event: HandoffEvent, at: str) -> LedgerEntry:
    """The migration entry chained onto LAST: no state came to rest, so it keeps LAST's state digest."""
    return chain_entry(last.instance_id, last.seq + 1, at, event.value, last.state_digest, last.entry_hash)


def sign_handoff(handoff: Handoff, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                 chain: Sequence[x509.Certificate] = ()) -> dict[str, Any]:
    body = handoff.to_json()
    handoff_from_json(body)
    return {"handoff": body, "signature": sign_block(body, key, cert, chain)}


def verify_handoff(doc: object, anchor: x509.Certificate, at: datetime,
                   untrusted: Sequence[x509.Certificate] = ()) -> Handoff:
    """The handoff in DOC, if a node under ANCHOR signed it and it names that node as its maker."""
    top = fields_of(doc, "signed handoff statement", ("handoff", "signature"))
    _cert, node_ca = verify_block(top["signature"], top["handoff"], anchor, at, untrusted, "handoff statement")
    handoff = handoff_from_json(top["handoff"])
    if key_fingerprint(node_ca) != handoff.node:
        raise TrustError(f"handoff statement names node {handoff.node[:16]} but was signed under node CA "
                         f"{key_fingerprint(node_ca)[:16]}")
    return handoff


def verify_ledger(entries: Sequence[LedgerEntry], handoffs: Mapping[int, object], anchor: x509.Certificate,
                  at: datetime, untrusted: Sequence[x509.Certificate] = ()) -> list[Handoff]:
    """The ledger's migrations, once its chain holds and every migration entry is vouched for.

    HANDOFFS: the signed statement of each migration entry, by seq. A
    migrated-in must follow a migrated-out, be signed by the node the
    migrated-out named as its peer, and name the source back."""
    bad = broken_link(list(entries))
    if bad is not None:
        raise TrustError(f"the vTPM ledger's chain breaks at entry {bad}")
    found: list[Handoff] = []
    by_seq = {e.seq: e for e in entries}
    for e in entries:
        if e.event not in (HandoffEvent.OUT.value, HandoffEvent.IN.value):
            continue
        if e.seq not in handoffs:
            raise TrustError(f"ledger entry {e.seq} ({e.event}) has no signed handoff statement")
        h = verify_handoff(handoffs[e.seq], anchor, at, untrusted)
        if h.entry != e:
            raise TrustError(f"ledger entry {e.seq}: its handoff statement is for another entry")
        if h.event is HandoffEvent.IN:
            before = by_seq.get(e.seq - 1)
            out = found[-1] if found else None
            if before is None or before.event != HandoffEvent.OUT.value or out is None or out.entry != before:
                raise TrustError(f"ledger entry {e.seq}: migrated-in without the migrated-out before it")
            if out.peer != h.node or h.peer != out.node:
                raise TrustError(f"ledger entry {e.seq}: taken in by node {h.node[:16]}, but node {out.node[:16]} "
                                 f"handed it to {out.peer[:16]}")
            if out.session != h.session:
                raise TrustError(f"ledger entry {e.seq}: taken in by another migration than the one handing it out")
        found.append(h)
    return found
