"""The signed hand-over of a vTPM ledger between nodes, and the records that travel (core.migration)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from tests.fleet_certs import FleetNode, ca
from tvorch.core.migration.handoff import (
    Handoff,
    HandoffEvent,
    next_entry,
    verify_handoff,
    verify_ledger,
)
from tvorch.core.migration.records import TABLES, decode_rows, encode_rows
from tvorch.core.vtpm.ledger import chain_entry
from tvorch.errors import TrustError

NOW = datetime.now(timezone.utc)
ID = "i-0123456789ab"
UUID = "3f1c2a9e-8d7b-4c6a-9e5f-1a2b3c4d5e6f"


@pytest.fixture(scope="module")
def fleet():
    root = ca("fleet root", None, 1, NOW)
    return root, FleetNode("a", root, NOW), FleetNode("b", root, NOW)


def _ledger(n: int = 3):
    entries, prev = [], None
    for seq in range(n):
        e = chain_entry(ID, seq, "2026-12-05T00:00:0%dZ" % seq, "manufactured" if seq == 0 else "stopped",
                        f"{seq:064x}", prev)
        entries.append(e)
        prev = e.entry_hash
    return entries


def _handover(fleet, ledger):
    root, a, b = fleet
    out = Handoff(HandoffEvent.OUT, next_entry(ledger[-1], HandoffEvent.OUT, "2026-12-05T01:00:00Z"), UUID, "vm",
                  "d" * 64, a.name, b.name, "qemu+ssh://b/system", "5" * 64)
    inn = Handoff(HandoffEvent.IN, next_entry(out.entry, HandoffEvent.IN, "2026-12-05T01:00:05Z"), UUID, "vm",
                  "d" * 64, b.name, a.name, "a", "5" * 64)
    return out, a.handoff(out), inn, b.handoff(inn)


def test_a_ledger_handed_from_a_to_b_verifies_under_the_root(fleet):
    root, a, b = fleet
    ledger = _ledger()
    out, out_doc, inn, in_doc = _handover(fleet, ledger)
    found = verify_ledger([*ledger, out.entry, inn.entry], {out.entry.seq: out_doc, inn.entry.seq: in_doc}, root[1],
                          NOW)
    assert [h.event for h in found] == [HandoffEvent.OUT, HandoffEvent.IN]
    assert found[0].node == a.name and found[1].node == b.name
    # The migration entries keep the state digest: nothing came to rest in between.
    assert out.entry.state_digest == inn.entry.state_digest == ledger[-1].state_digest


def test_a_statement_cannot_be_made_up_or_moved(fleet):
    root, a, b = fleet
    ledger = _ledger()
    out, out_doc, inn, in_doc = _handover(fleet, ledger)
    entries = [*ledger, out.entry, inn.entry]
    # B signs a migrated-out in A's name: the statement names A, the signature is B's.
    forged = b.handoff(out)
    with pytest.raises(TrustError, match="signed under node CA"):
        verify_handoff(forged, root[1], NOW)
    # A migrated-in by a node other than the one A handed it to.
    c = FleetNode("c", root, NOW)
    rogue = c.handoff(replace(inn, node=c.name))
    with pytest.raises(TrustError, match="handed it to"):
        verify_ledger(entries, {out.entry.seq: out_doc, inn.entry.seq: rogue}, root[1], NOW)
    # B's migrated-in of another migration (a replayed statement) does not continue this one.
    with pytest.raises(TrustError, match="another migration"):
        verify_ledger(entries, {out.entry.seq: out_doc, inn.entry.seq: b.handoff(replace(inn, session="6" * 64))},
                      root[1], NOW)
    # A migration entry without its statement, or with another entry's.
    with pytest.raises(TrustError, match="no signed handoff"):
        verify_ledger(entries, {out.entry.seq: out_doc}, root[1], NOW)
    with pytest.raises(TrustError, match="another entry"):
        verify_ledger(entries, {out.entry.seq: in_doc, inn.entry.seq: in_doc}, root[1], NOW)
    # An edited statement: its signature no longer verifies.
    edited = {"handoff": {**out_doc["handoff"], "peer_uri": "elsewhere"}, "signature": out_doc["signature"]}
    with pytest.raises(TrustError, match="does not verify"):
        verify_handoff(edited, root[1], NOW)
    # A node outside the fleet.
    other_root = ca("another root", None, 1, NOW)
    with pytest.raises(TrustError):
        verify_handoff(out_doc, other_root[1], NOW)


def test_a_rolled_back_ledger_is_refused(fleet):
    root, _a, _b = fleet
    ledger = _ledger()
    out, out_doc, inn, in_doc = _handover(fleet, ledger)
    # Drop the last stop before the handover: the migrated-out no longer chains.
    with pytest.raises(TrustError, match="chain breaks"):
        verify_ledger([*ledger[:-1], out.entry, inn.entry], {out.entry.seq: out_doc, inn.entry.seq: in_doc},
                      root[1], NOW)


def _rows():
    return {
        "instances": [{"id": ID, "name": "vm", "uuid": UUID, "overlay_identity": "1:2"}],
        "instance_events": [{"seq": 7, "instance_id": ID, "kind": "created", "detail": "x"}],
        "manifests": [{"instance_id": ID, "digest": "d" * 64, "body": b"{}"}],
        "vtpms": [{"instance_id": ID, "sealed_key": b"bound to the source TPM", "ek_cert": b"\x30\x00"}],
        **{t: [] for t in TABLES if t not in ("instances", "instance_events", "manifests", "vtpms")},
    }


COLUMNS = {
    "instances": frozenset({"id", "name", "uuid", "overlay_identity"}),
    "instance_events": frozenset({"seq", "instance_id", "kind", "detail"}),
    "manifests": frozenset({"instance_id", "digest", "body"}),
    "vtpms": frozenset({"instance_id", "sealed_key", "ek_cert"}),
    **{t: frozenset({"instance_id"}) for t in TABLES if t not in ("instances", "instance_events", "manifests",
                                                                 "vtpms")},
}


def test_records_travel_without_what_binds_them_to_the_source():
    sent = encode_rows(_rows())
    assert "sealed_key" not in sent["vtpms"][0] and "overlay_identity" not in sent["instances"][0]
    assert "seq" not in sent["instance_events"][0]
    got = decode_rows(sent, ID, COLUMNS)
    assert got["manifests"][0]["body"] == b"{}" and got["vtpms"][0]["ek_cert"] == b"\x30\x00"


@pytest.mark.parametrize("change, words", [
    (lambda d: d["instance_events"].append({"instance_id": "i-ffffffffffff", "kind": "x", "detail": "y"}),
     "belongs to"),
    (lambda d: d["vtpms"][0].update(sealed_key={"b64": "AA=="}), "does not keep"),
    (lambda d: d["instances"][0].update(injected=1), "does not keep"),
    (lambda d: d.pop("guest_boots"), "expected the tables"),
    (lambda d: d["manifests"].clear(), "no signed manifest"),
    (lambda d: d["instances"][0].update(name=["not", "text"]), "is a list"),
    (lambda d: d["manifests"][0].update(body={"b64": "not base64!"}), "base64"),
])
def test_records_that_do_not_belong_are_refused(change, words):
    sent = encode_rows(_rows())
    change(sent)
    with pytest.raises(TrustError, match=words):
        decode_rows(sent, ID, COLUMNS)
