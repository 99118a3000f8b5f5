"""`tvorch migrate-in`: the destination of a live migration, speaking to the source over stdin/stdout.

The steps (README "Live migration"), each refused with one reason the source
prints:

1. hello: the source names the instance and sends a nonce.
2. offer: this node proves itself, signed by its node key: its host AK's
   certification, a transport key made in its TPM and certified by that AK
   over the nonce (only this TPM can open what is wrapped to it), and a host
   verdict judged now over the nonce.
3. transfer: the source's records, its signed `migrated-out` handoff and the
   vTPM key wrapped to the transport key. Checked here against this node's
   anchor (manifest, handoff, the whole ledger) and against this node's disk
   (every file the manifest measured, with the same digest). The key is
   opened in the TPM, sealed to this host, and the records stored as an
   `incoming` instance; the overlay and NVRAM made; the key lent to libvirt.
4. commit or abort: libvirt migrated the VM (this node's hook gated
   `migrate begin` like a start) or did not. On commit, or on a lost source
   while the VM runs here, the ledger gets the source's `migrated-out` and
   this node's `migrated-in`; otherwise everything that arrived is dropped.

The name's lock is held throughout, so `tvorch reconcile` settles an
instance left `incoming` only once this process is gone.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..adapters import imagefiles
from ..adapters.digests import measure_file
from ..adapters.files import atomic_write, ensure_private_dir
from ..adapters.guest_channel import prepare_socket_dir, socket_path
from ..adapters.locks import instance_lock
from ..adapters.peer import Line, PeerGone
from ..core.codec import b64decode, b64encode
from ..core.launch.gate import FILE_KINDS, nvram_path
from ..core.launch.instance import InstanceState, validate_name
from ..core.launch.manifest import verify_manifest
from ..core.launch.manifest_format import manifest_digest, stored_manifest
from ..core.migration.handoff import (
    PROTOCOL,
    Handoff,
    HandoffEvent,
    handoff_from_json,
    next_entry,
    session_of,
    sign_handoff,
    verify_handoff,
    verify_ledger,
)
from ..core.migration.records import decode_rows, single
from ..core.signed import carried_chain, sign_block
from ..core.timestamps import utc_now
from ..core.vtpm.ledger import LedgerEntry
from ..core.vtpm.records import check_key
from ..errors import ConflictError, InputError, TrustError, TvorchError
from ..faults import crash_point
from ..logs import get_logger
from .host import ak_certification, attest
from .manifests import node_identity
from .migration import anchor, node_name, qualifying
from .node import Node
from .vtpm import wrap_key

log = get_logger(__name__)
_ID_CHARS = set("0123456789abcdef")


def serve(node: Node, line: Line, ca_path: str | None) -> str:
    """Take one instance in; returns what became of it ("arrived" or "not taken")."""
    cfg = node.cfg
    # Before the source speaks (it is starting meanwhile): this node's identity, libvirt, and a transport key
    # in this node's TPM (an RSA key takes the TPM a tenth of a second or more to make).
    identity = node_identity(cfg)
    hv = node.hypervisor
    transport = _transport_key(cfg)
    hello = line.receive("hello")
    if hello.get("protocol") != PROTOCOL:
        raise _refuse(line, f"the source speaks {hello.get('protocol')!r}, this node {PROTOCOL!r}")
    instance_id, name, uuid = (str(hello.get(k, "")) for k in ("instance_id", "name", "uuid"))
    try:
        validate_name(name)
    except InputError as err:
        raise _refuse(line, str(err)) from None
    if not (instance_id.startswith("i-") and len(instance_id) == 14 and set(instance_id[2:]) <= _ID_CHARS):
        raise _refuse(line, f"{instance_id!r} is not a tvorch instance id")
    nonce = b64decode(hello.get("nonce"), "the source's nonce", TrustError)
    if len(nonce) != 32:
        raise _refuse(line, "the source's nonce is not 32 bytes")
    try:
        trusted = anchor(identity, ca_path)
    except TvorchError as err:
        raise _refuse(line, str(err)) from None
    with instance_lock(Path(cfg.state_dir), name), ExitStack() as undo:
        store = node.store
        taken = store.find_live(name) or store.by_uuid(uuid)
        if taken is not None and taken.state is not InstanceState.MIGRATED:
            raise _refuse(line, f"an instance named '{name}' or with UUID {uuid} is on this node already")
        if hv.domain_exists(name) or any(d.uuid == uuid for d in hv.domains()):
            raise _refuse(line, f"libvirt on this node has a domain named '{name}' or with UUID {uuid} already")
        offer = _offer(node, nonce, transport)
        line.send("offer", offer=offer, signature=sign_block(offer, identity.signing_key, identity.signing_cert,
                                                              identity.carried_chain()))
        transfer = line.receive("transfer", "abort")
        if transfer["type"] == "abort":
            return "not taken"
        try:
            out_doc, out, record_rows, key = _check_transfer(node, transfer, instance_id, name, uuid, trusted,
                                                             identity, transport, session_of(nonce))
        except TvorchError as err:
            raise _refuse(line, str(err)) from None
        record = single(record_rows, "instances")
        assert record is not None
        keys = wrap_key(cfg, key) if key is not None else None
        source_uri = str(transfer.get("source_uri", ""))
        store.take_in(record_rows, keys.sealed if keys else None, keys.seal_pcrs if keys else (),
                      keys.escrow if keys else None,
                      keys.escrow_fingerprint if keys else None, source_uri, out.node, out_doc)
        undo.callback(_forget, node, instance_id, name)
        crash_point("migrate-in-taken")
        _make_disks(node, record, transfer.get("nvram"), undo)
        vtpm = store.vtpm(instance_id)
        if key is not None and vtpm is not None and vtpm.secret_uuid:
            store.set_key_lent(instance_id, True)
            undo.callback(store.set_key_lent, instance_id, False)
            undo.enter_context(hv.vtpm_secret(vtpm.secret_uuid, f"tvorch-vtpm-{instance_id}", key))
        line.send("ready")
        crash_point("migrate-in-ready")
        try:
            end = line.receive("commit", "abort", timeout=3600)["type"]
        except (PeerGone, TvorchError) as err:
            end = "lost"
            log.warning("migration_source_lost", instance=name, reason=str(err))
        if end == "abort" or (end == "lost" and not _runs_here(node, name, uuid)):
            return "not taken"  # the ExitStack drops the secret, the disks and the records
        in_doc = arrive(node, instance_id, out, out_doc, source_uri)
        undo.pop_all()
        # The key stays lent until here: libvirt needed it to start swtpm for the incoming VM.
        if vtpm is not None and vtpm.secret_uuid:
            hv.drop_vtpm_secret(vtpm.secret_uuid)
        store.set_key_lent(instance_id, False)
        if end == "commit":
            line.send("committed", handoff=in_doc)
        return "arrived"


def arrive(node: Node, instance_id: str, out: Handoff, out_doc: dict[str, Any], source_uri: str) -> dict[str, Any]:
    """The VM runs here: ledger the source's migrated-out and this node's signed migrated-in."""
    identity = node_identity(node.cfg)
    entry = next_entry(out.entry, HandoffEvent.IN, utc_now())
    handoff = Handoff(HandoffEvent.IN, entry, out.uuid, out.name, out.manifest_digest, node_name(identity), out.node,
                      source_uri, out.session)
    in_doc = sign_handoff(handoff, identity.signing_key, identity.signing_cert, identity.carried_chain())
    node.store.arrived(instance_id, out.entry, out_doc, entry, in_doc, source_uri)
    log.info("migrated_in", instance=out.name, source=source_uri)
    return in_doc


def _transport_key(cfg: Any) -> Any:
    """A transport key made in this node's TPM for this one migration (never written anywhere)."""
    from ..adapters.tpm import open_tpm

    with open_tpm(cfg.host.tcti) as tpm:
        return tpm.create_transport_key()


def _offer(node: Node, nonce: bytes, transport: Any) -> dict[str, Any]:
    """The transport key certified by the host AK over the nonce, and a host verdict over it."""
    from ..adapters.tpm import open_tpm, read_ak

    cfg = node.cfg
    ak = read_ak(Path(cfg.state_dir))
    statement = ak_certification(cfg)
    if ak is None or statement is None:
        raise TrustError("this node has no certified host AK: run `tvorch host init`")
    with open_tpm(cfg.host.tcti) as tpm:
        attest_bytes, signature = tpm.certify_key(ak, transport, qualifying(nonce, "transport key"))
    host: dict[str, Any]
    try:
        verdict = attest(cfg, node.store, nonce)
        host = {"passed": verdict.passed, "failures": list(verdict.failures), "at": verdict.at,
                "policy_digest": verdict.policy_digest, "quote": verdict.quote_json}
    except TvorchError as err:
        host = {"passed": False, "failures": [f"no host verdict: {err}"], "at": utc_now(), "policy_digest": "",
                "quote": ""}
    offer = {
        "node": node_name(node_identity(cfg)), "ak_certification": statement,
        "transport": {"public": b64encode(transport.public), "attest": b64encode(attest_bytes),
                      "signature": b64encode(signature)},
        "host": host,
    }
    return offer


def _check_transfer(node: Node, transfer: dict[str, Any], instance_id: str, name: str, uuid: str, trusted: Any,
                    identity: Any, transport: Any, session: str) -> tuple[dict[str, Any], Handoff, dict[str, list[dict[str, Any]]],
                                                         bytes | None]:
    """Everything that arrived, checked before anything is written; the key opened in this TPM."""
    now = datetime.now(timezone.utc)
    out_doc = transfer.get("handoff")
    out = verify_handoff(out_doc, trusted, now)
    assert isinstance(out_doc, dict)
    if (out.entry.instance_id, out.name, out.uuid) != (instance_id, name, uuid):
        raise TrustError("the source's handoff statement is for another instance")
    if out.peer != node_name(identity):
        raise TrustError(f"the source handed the vTPM to node {out.peer[:16]}, not to this node")
    if out.session != session:
        raise TrustError("the source's handoff statement is from another migration (replayed)")
    rows = decode_rows(transfer.get("records"), instance_id, node.store.table_columns())
    record = rows["instances"][0]
    if (record.get("name"), record.get("uuid")) != (name, uuid):
        raise TrustError("the records are for another instance")
    manifest_row = rows["manifests"][0]
    body = bytes(manifest_row["body"])
    if manifest_digest(body) != out.manifest_digest or manifest_row.get("digest") != out.manifest_digest:
        raise TrustError("the records' manifest is not the one the handoff names")
    verify_manifest(body, trusted, now, carried_chain(out_doc["signature"], "handoff statement")
                    if isinstance(out_doc, dict) else ())
    ledger = [LedgerEntry(**{k: r[k] for k in ("instance_id", "seq", "at", "event", "state_digest", "prev_hash",
                                                "entry_hash")}) for r in rows["vtpm_ledger"]]
    handoffs = {int(r["seq"]): _json(r["statement"]) for r in rows["ledger_handoffs"]}
    verify_ledger([*ledger, out.entry], {**handoffs, out.entry.seq: out_doc}, trusted, now)
    problems = _stage_boot_files(node, body)
    problems += _files_here(node, body)
    if problems:
        raise TrustError("this node's files differ from the manifest: " + "; ".join(problems))
    vtpm = single(rows, "vtpms")
    wrapped = transfer.get("wrapped_key")
    if vtpm is None or vtpm.get("key_protection") == "none":
        return out_doc, out, rows, None
    if not isinstance(wrapped, str):
        raise TrustError("the source sent no vTPM key for an encrypted vTPM")
    from ..adapters.tpm import open_tpm
    from ..core.migration.transport import TRANSPORT_LABEL

    with open_tpm(node.cfg.host.tcti) as tpm:
        key = tpm.decrypt_transport(transport, b64decode(wrapped, "the wrapped vTPM key", TrustError), TRANSPORT_LABEL)
    return out_doc, out, rows, check_key(key, vtpm.get("key_check"), "the source")


def _stage_boot_files(node: Node, manifest_body: bytes) -> list[str]:
    """A direct-boot instance boots root's read-only copies of its kernel and initrd (adapters.boot_files):
    this node makes its own from the operator's files at the paths the launch copied them from, which must
    have the manifest's digests (as an image's layers must). What could not be staged, one line each."""
    from ..adapters import boot_files  # ctypes: only for a direct boot

    cfg = node.cfg
    view = cfg.boot_files_dir.rstrip("/") + "/"
    problems = []
    for m in stored_manifest(manifest_body).measurements:
        source = m.details.get("source")
        if m.kind not in ("kernel", "initrd") or not (m.path or "").startswith(view) or not isinstance(source, str):
            continue
        try:
            boot_files.stage(cfg.state_dir, cfg.boot_files_dir, source, m.digest)
        except TrustError:
            problems.append(f"{FILE_KINDS[m.kind]} {source} on this node is not the manifest's "
                            f"(sha256:{m.digest[:12]})")
        except TvorchError as err:
            problems.append(f"{FILE_KINDS[m.kind]} {source}: {err}")
    return problems


def _files_here(node: Node, manifest_body: bytes) -> list[str]:
    """What differs between the manifest's measured files and this node's: a missing or changed layer."""
    problems = []
    for m in stored_manifest(manifest_body).measurements:
        if m.kind not in FILE_KINDS or not m.path:
            continue
        what = FILE_KINDS[m.kind]
        try:
            digest = measure_file(m.path, node.store).digest
        except TvorchError as err:
            problems.append(f"{what} {m.path}: {err}")
            continue
        if digest != m.digest:
            problems.append(f"{what} {m.path} is sha256:{digest[:12]} here, the manifest's sha256:{m.digest[:12]}")
    return problems


def _make_disks(node: Node, record: dict[str, Any], nvram: object, undo: ExitStack) -> None:
    """The overlay (backed by this node's copy of the image, which libvirt fills with the source's top layer)
    and the UEFI variable store as the source's QEMU last wrote it."""
    cfg = node.cfg
    overlay = str(record["overlay"])
    ensure_private_dir(Path(cfg.overlay_dir), 0o711)
    ensure_private_dir(Path(cfg.console_log_dir))  # libvirt opens the console log, but makes no directory
    channels = Path(cfg.guest.channel_dir)
    prepare_socket_dir(socket_path(channels, str(record["id"]), str(record["domain_xml"])), channels)
    chain = imagefiles.inspect_image(str(record["image"]), cfg.max_backing_depth)
    imagefiles.create_overlay(chain, overlay)
    undo.callback(imagefiles.remove_overlay, overlay)
    node.store.set_overlay_identity(str(record["id"]), imagefiles.file_identity(overlay))
    if isinstance(nvram, str):
        path = Path(nvram_path(str(record["domain_xml"]), str(record["name"])))
        if path.exists():
            raise ConflictError(f"the UEFI variable store {path} exists on this node already")
        ensure_private_dir(path.parent, 0o755)
        atomic_write(path, b64decode(nvram, "the NVRAM file", TrustError))
        undo.callback(_unlink, path)


def _runs_here(node: Node, name: str, uuid: str) -> bool:
    try:
        return node.hypervisor.domain_uuid(name) == uuid and node.hypervisor.state(name) in (
            InstanceState.RUNNING, InstanceState.PAUSED)
    except TvorchError:
        return False


def _forget(node: Node, instance_id: str, name: str) -> None:
    node.store.forget_incoming(instance_id)
    log.info("migration_in_dropped", instance=name)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _json(text: object) -> object:
    return json.loads(str(text))


def _refuse(line: Line, reason: str) -> TrustError:
    """Tell the source why, and fail here with the same line."""
    try:
        line.send("refused", reason=reason)
    except PeerGone:
        pass
    return TrustError(f"migration refused: {reason}")


def settle(node: Node, migration: dict[str, Any]) -> str | None:
    """`tvorch reconcile` for an instance a `migrate-in` that is gone left `incoming`: it arrived if it runs here,
    else everything that came for it is dropped."""
    record = node.store.by_id(migration["instance_id"])
    if record is None or record.state is not InstanceState.INCOMING:
        return None
    statement = migration["statement"]
    if node.hypervisor.migrating(record.name):
        return f"warning: {record.name}: still arriving from {migration['peer_uri']}; a later reconcile settles it"
    if _runs_here(node, record.name, record.uuid):
        handoff = handoff_from_json(statement["handoff"])  # verified when it arrived
        arrive(node, record.id, handoff, statement, migration["peer_uri"])
        vtpm = node.store.vtpm(record.id)
        if vtpm is not None and vtpm.secret_uuid:
            node.hypervisor.drop_vtpm_secret(vtpm.secret_uuid)
        node.store.set_key_lent(record.id, False)
        return f"{record.name}: its migration from {migration['peer_uri']} completed (it runs here)"
    imagefiles.remove_overlay(record.overlay)
    path = Path(nvram_path(record.domain_xml, record.name))
    if path.exists() and not node.hypervisor.domain_exists(record.name):
        _unlink(path)
    vtpm = node.store.vtpm(record.id)
    if vtpm is not None and vtpm.secret_uuid:
        node.hypervisor.drop_vtpm_secret(vtpm.secret_uuid)
    _forget(node, record.id, record.name)
    return f"{record.name}: its migration from {migration['peer_uri']} did not complete; what arrived is dropped"

