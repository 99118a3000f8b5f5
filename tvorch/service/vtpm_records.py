"""What an instance's vTPM is, as `tvorch vtpm show` and `tvorch vtpm ek` tell it: its record, EK and ledger.

Reads only; the state key and the state's life are in ``vtpm``, backup,
restore and rekey in ``vtpm_backup``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..adapters import vtpm_state
from ..core.vtpm.ekcert import verify_ek_certificate
from ..core.launch.instance import InstanceRecord, InstanceState
from ..core.vtpm.ledger import LedgerEntry, broken_link
from ..core.vtpm.platformcert import verify_platform_certificate
from ..core.vtpm.records import VtpmRecord
from ..errors import NotFoundError, TrustError, TvorchError
from .node import Node
from .records import show as show_instance
from .vtpm import instance_dir


def record_of(node: Node, name: str) -> tuple[InstanceRecord, VtpmRecord]:
    record = node.store.get_live(name)
    vtpm = node.store.vtpm(record.id)
    if vtpm is None:
        raise NotFoundError(f"instance '{name}' has no vTPM record (launched before tvorch manufactured vTPMs)")
    return record, vtpm


def show(node: Node, name: str) -> dict[str, Any]:
    record = show_instance(node, name)
    _, vtpm = record_of(node, name)
    ledger = node.store.ledger(record.id)
    on_disk = vtpm_state.state_digest(instance_dir(node.cfg, record))
    last = ledger[-1] if ledger else None
    in_use = record.state in (InstanceState.RUNNING, InstanceState.PAUSED)  # swtpm is writing it
    return {
        "name": record.name, **vtpm.to_json(),
        "ledger_entries": len(ledger), "ledger_intact": broken_link(ledger) is None,
        "ledger_last": last.to_json() if last else None,
        "state_digest": on_disk,
        # None while the VM runs: the state moves on until the stop is ledgered.
        "state_matches_ledger": None if in_use else (
            on_disk is not None and last is not None and on_disk == last.state_digest),
        "pending": node.store.vtpm_pending(record.id),
    }


def ek(node: Node, name: str) -> tuple[x509.Certificate, VtpmRecord]:
    _, vtpm = record_of(node, name)
    return x509.load_der_x509_certificate(vtpm.ek_cert), vtpm


def ledger(node: Node, name: str) -> list[LedgerEntry]:
    record = node.store.get_live(name)
    entries = node.store.ledger(record.id)
    broken = broken_link(entries)
    if broken is not None:
        raise TrustError(f"the vTPM ledger of '{name}' is broken at entry {broken}")
    return entries


def ek_summary(cert: x509.Certificate, vtpm: VtpmRecord, ca: x509.Certificate) -> dict[str, Any]:
    """What `tvorch vtpm ek` shows, with whether the certificates check against the node CA now."""
    now = datetime.now(timezone.utc)
    try:
        verify_ek_certificate(cert, ca, now)
        chain = "valid: issued by the node CA"
    except (TvorchError, ValueError) as err:
        chain = f"INVALID: {err}"
    platform = None
    if vtpm.platform_cert is not None:
        try:
            verify_platform_certificate(vtpm.platform_cert, ca, cert, now)
            platform = "valid: issued by the node CA for this EK certificate"
        except (TvorchError, ValueError) as err:
            platform = f"INVALID: {err}"
    return {
        "subject": cert.subject.rfc4514_string() or "(empty; the TPM is named in subjectAltName)",
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ek_fingerprint": vtpm.ek_fingerprint,
        "certificate_sha256": hashlib.sha256(vtpm.ek_cert).hexdigest(),
        "chain": chain,
        "platform_certificate": platform,
        "platform_certificate_sha256": hashlib.sha256(vtpm.platform_cert).hexdigest() if vtpm.platform_cert else None,
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
