"""`tvorch migrate NAME DEST_URI`: move a running instance, its sealed vTPM key and its records to another node.

Before anything moves, the destination proves itself (service.migrate_in's
offer): a node of the same fleet (its signature chains to the anchor), a
transport key its host TPM made and its certified AK certified over this
node's nonce, and, with ``policy.host_verdict = "require"``, a passing host
verdict over the same nonce. Only then is the vTPM key unsealed here and
wrapped to that transport key, so it exists in clear only in this process
and the destination's TPM. The migration is journaled before the records
leave, and settled by `tvorch reconcile` if this process dies: the instance
is the destination's once the destination runs it, and stays here otherwise.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ..adapters import imagefiles
from ..adapters.guest_channel import remove_socket_dir, socket_path
from ..adapters.locks import instance_lock
from ..adapters.peer import Destination, PeerGone
from ..core.attestation.akcert import verify_host_ak_certification
from ..core.attestation.quote import HostQuote
from ..core.codec import b64decode, b64encode, parse_json
from ..core.launch.gate import nvram_path
from ..core.launch.instance import InstanceState
from ..core.launch.manifest_format import manifest_digest
from ..core.migration.handoff import (
    PROTOCOL,
    Handoff,
    HandoffEvent,
    handoff_from_json,
    next_entry,
    session_of,
    sign_handoff,
)
from ..core.migration.records import encode_rows
from ..core.signed import key_fingerprint, verify_block
from ..core.timestamps import utc_now
from ..core.vtpm.records import check_key
from ..errors import ConflictError, EvidenceError, LibvirtError, NotFoundError, TrustError, TvorchError
from ..faults import crash_point
from ..logs import get_logger
from . import records
from .manifests import node_identity
from .migration import anchor, node_name, qualifying
from .node import Node
from .vtpm import unseal

log = get_logger(__name__)


@dataclass(frozen=True)
class Migrated:
    name: str
    instance_id: str
    destination: str  # the libvirt URI
    destination_node: str  # its node CA key's fingerprint
    seconds: float
    ledger_seq: int  # the migrated-out entry
    phases: tuple[tuple[str, float], ...] = ()  # (step, seconds it took), in order: where the time went

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.instance_id, "destination": self.destination,
                "destination_node": self.destination_node, "seconds": round(self.seconds, 2),
                "ledger_seq": self.ledger_seq, "phases": {k: round(v, 3) for k, v in self.phases}}


def migrate(node: Node, name: str, dest_uri: str, command: list[str] | Destination, ca_path: str | None,
            migrate_uri: str | None = None, disks_uri: str | None = None, copy_storage: bool = True,
            bandwidth_mib: int | None = None) -> Migrated:
    """COMMAND runs the destination's `migrate-in` (or is it, started already: the CLI starts it before it
    loads this module, so the two start-ups overlap)."""
    cfg = node.cfg
    started = time.monotonic()
    phases: list[tuple[str, float]] = []

    def phase(step: str, since: list[float] = [started]) -> None:  # noqa: B006 - the clock between calls
        now = time.monotonic()
        phases.append((step, now - since[0]))
        since[0] = now

    # The destination's tvorch is started first: its start-up (a shell, ssh, Python) overlaps with ours.
    with command if isinstance(command, Destination) else Destination([*command, "migrate-in"]) as dest:
        node.connect()
        identity = node_identity(cfg)
        trusted = anchor(identity, ca_path)
        with instance_lock(Path(cfg.state_dir), name):
            record = records.show(node, name)
            store, hv = node.store, node.hypervisor
            if record.state is not InstanceState.RUNNING:
                raise ConflictError(f"'{name}' is {record.state.value}: live migration moves a running instance")
            if store.migration(record.id) is not None:
                raise ConflictError(f"'{name}' has a migration in flight: `tvorch reconcile` settles it first")
            vtpm = store.vtpm(record.id)
            if vtpm is not None and vtpm.encrypted and vtpm.sealed_key is None:
                raise ConflictError(f"the vTPM key of '{name}' was purged; it cannot move")
            if store.vtpm_pending(record.id) is not None:
                raise ConflictError(f"a vTPM restore of '{name}' is not settled: `tvorch reconcile` first")
            body = store.manifest(record.id)
            last = store.last_ledger_entry(record.id)
            if body is None or last is None:
                raise NotFoundError(f"'{name}' has no launch manifest or no vTPM ledger; it cannot move")
            # Unsealed while the destination starts; it leaves this process only wrapped to the TPM of a
            # destination that proved itself.
            key = None
            if vtpm is not None and vtpm.encrypted and vtpm.sealed_key is not None:
                key = check_key(unseal(cfg, vtpm.sealed_key), vtpm.key_check, "the host TPM")
            nonce = os.urandom(32)
            line = dest.line
            phase("checked and unsealed here")
            try:
                line.send("hello", protocol=PROTOCOL, instance_id=record.id, name=record.name, uuid=record.uuid,
                          nonce=b64encode(nonce))
                offer = line.receive("offer", timeout=600)
                phase("the destination's offer")
                dest_node, transport = _check_offer(cfg.policy.host_verdict, offer, trusted, nonce, identity)
                crash_point("migrate-offered")
                out = Handoff(HandoffEvent.OUT, next_entry(last, HandoffEvent.OUT, utc_now()), record.uuid,
                              record.name, manifest_digest(body), node_name(identity), dest_node, dest_uri,
                              session_of(nonce))
                out_doc = sign_handoff(out, identity.signing_key, identity.signing_cert, identity.carried_chain())
                nvram = _nvram(record.domain_xml, record.name)
                store.begin_migration(record.id, "out", dest_uri, dest_node, out_doc)
                crash_point("migrate-journaled")
            except (PeerGone, TvorchError) as err:
                raise _refused(name, err, dest) from None
            try:
                from ..core.migration.transport import wrap_for_transport

                line.send("transfer", records=encode_rows(store.export_rows(record.id)), handoff=out_doc,
                          wrapped_key=b64encode(wrap_for_transport(transport, key)) if key is not None else None,
                          nvram=b64encode(nvram) if nvram is not None else None, source_uri=socket.gethostname())
                phase("offer checked, records sent")
                line.receive("ready", timeout=600)
                phase("the destination took them")
                crash_point("migrate-ready")
            except (PeerGone, TvorchError) as err:
                store.end_migration(record.id, f"the destination did not take it: {err}")
                raise _refused(name, err, dest) from None
            try:
                hv.migrate(name, dest_uri, hv.domain_xml(name, inactive=True), migrate_uri, disks_uri,
                           copy_storage, bandwidth_mib)
            except LibvirtError as err:
                _abort(line)
                store.end_migration(record.id, str(err))
                if "tvorch: refused" in str(err):
                    raise TrustError(f"migration of '{name}' refused by the destination's hook: {err}") from None
                raise
            phase("libvirt migrated it")
            crash_point("migrate-migrated")
            leave(node, record.id, out, out_doc, dest_uri)
            crash_point("migrate-left")
            try:
                line.send("commit")
                line.receive("committed", timeout=120)
            except (PeerGone, TvorchError) as err:
                # It runs there: the destination's reconcile (or its migrate-in on losing us) settles its side.
                log.warning("migration_commit_unanswered", instance=name, reason=str(err))
            dest.release()  # it exits by itself; nothing is left to wait for
            phase("ledgered on both nodes")
        return Migrated(record.name, record.id, dest_uri, dest_node, time.monotonic() - started, out.entry.seq,
                        tuple(phases))


def leave(node: Node, instance_id: str, out: Handoff, out_doc: dict[str, Any], dest_uri: str) -> None:
    """The VM runs on the destination: ledger migrated-out, forget the key, keep a tombstone, drop the overlay
    (the tenant's disk now lives there)."""
    record = node.store.by_id(instance_id)
    node.store.leave_tombstone(instance_id, out.entry, out_doc, dest_uri)
    if record is not None:
        channels = Path(node.cfg.guest.channel_dir)
        remove_socket_dir(socket_path(channels, record.id, record.domain_xml), channels)
        try:
            imagefiles.remove_overlay(record.overlay)
        except TvorchError as err:
            log.warning("migrated_overlay_kept", path=record.overlay, reason=str(err))
        records.prune_boot_files(node)  # its direct-boot copies, unless another instance boots them (or one just staged)
    log.info("migrated_out", instance=out.name, destination=dest_uri)


def settle(node: Node, migration: dict[str, Any]) -> str | None:
    """`tvorch reconcile` for a migration out whose `tvorch migrate` is gone: the destination has the
    instance if it runs it there and not here; it is still this node's if it runs here."""
    record = node.store.by_id(migration["instance_id"])
    if record is None or migration["direction"] != "out":
        return None
    hv = node.hypervisor
    if hv.migrating(record.name):
        return f"warning: {record.name}: still leaving for {migration['peer_uri']}; a later reconcile settles it"
    here = hv.domain_uuid(record.name) == record.uuid and hv.state(record.name) in (
        InstanceState.RUNNING, InstanceState.PAUSED)
    there = hv.remote_domain_running(migration["peer_uri"], record.uuid)
    if here and there is not True:
        node.store.end_migration(record.id, "tvorch migrate was interrupted; the instance still runs here")
        return f"{record.name}: its migration to {migration['peer_uri']} did not happen; it runs here"
    if there and not here:
        statement = migration["statement"]
        leave(node, record.id, handoff_from_json(statement["handoff"]), statement, migration["peer_uri"])
        return f"{record.name}: its migration to {migration['peer_uri']} completed; a tombstone is left here"
    where = ("it runs on both nodes (the migration is still under way?)" if here and there else
             "it runs on neither node" if there is False else "it does not run here, and the destination is "
             "unreachable")
    return f"warning: {record.name}: migration to {migration['peer_uri']} left unsettled: {where}"


def _check_offer(host_verdict: str, msg: dict[str, Any], trusted: Any, nonce: bytes, identity: Any
                 ) -> tuple[str, Any]:
    """The destination's node name and transport key, once everything it offered is checked."""
    from ..core.migration.transport import verify_key_certification

    now = datetime.now(timezone.utc)
    offer = msg.get("offer")
    try:
        cert, node_ca = verify_block(msg.get("signature"), offer, trusted, now, (), "destination's offer")
    except TrustError as err:
        raise TrustError(f"the destination is not a node under {trusted.subject.rfc4514_string()}: {err}") from None
    assert isinstance(offer, dict)
    dest_node = key_fingerprint(node_ca)
    if dest_node == node_name(identity):
        raise TrustError("the destination is this node")
    if offer.get("node") != dest_node:
        raise TrustError("the destination's offer names another node than the one that signed it")
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # verify_block checked it is P-256
    ak = verify_host_ak_certification(offer.get("ak_certification"), public)
    t = offer.get("transport")
    if not isinstance(t, dict):
        raise TrustError("the destination's offer has no transport key")
    transport = verify_key_certification(
        ak.ak_public, b64decode(t.get("public"), "transport public", TrustError),
        b64decode(t.get("attest"), "transport certification", TrustError),
        b64decode(t.get("signature"), "transport signature", TrustError), qualifying(nonce, "transport key"))
    if host_verdict == "require":
        _check_host(offer.get("host"), ak.ak_public, nonce)
    return dest_node, transport


def _check_host(host: object, ak_public: bytes, nonce: bytes) -> None:
    """policy.host_verdict = "require": the destination's host verdict, made now over our nonce, passed."""
    if not isinstance(host, dict):
        raise TrustError("the destination sent no host verdict")
    if host.get("passed") is not True:
        failures = host.get("failures") or ["no reason given"]
        raise TrustError("the destination's host attestation failed: " + "; ".join(map(str, failures[:3])))
    try:
        quote = HostQuote.from_json(parse_json(str(host.get("quote", "")).encode(), "host quote", EvidenceError,
                                               top=None))
        if quote.ak_public != ak_public:
            raise TrustError("the destination's host quote is not signed by its certified AK")
        quote.verify(nonce)
    except EvidenceError as err:
        raise TrustError(f"the destination's host quote does not verify: {err}") from None


def _nvram(domain_xml: str, name: str) -> bytes | None:
    """The UEFI variable store QEMU writes through to (a UEFI guest's), read to travel with it."""
    if "<nvram" not in domain_xml and "<loader" not in domain_xml:
        return None
    try:
        return Path(nvram_path(domain_xml, name)).read_bytes()
    except FileNotFoundError:
        return None


def _abort(line: Any) -> None:
    try:
        line.send("abort")
    except PeerGone:
        pass


def _refused(name: str, err: Exception, dest: Destination) -> TvorchError:
    """One line for the operator: what the destination said, else what went wrong on the line."""
    said = dest.last_error()
    if isinstance(err, PeerGone):
        why = (f"the destination's tvorch stopped: {said}" if said else
               "the destination closed the connection (did its tvorch run? see --via)")
        return TrustError(f"migration of '{name}' refused: {why}")
    if isinstance(err, TrustError):
        return TrustError(f"migration of '{name}' refused: {err}")
    return err if isinstance(err, TvorchError) else TrustError(f"migration of '{name}' failed: {err}")
