"""What both ends of a live migration share: whom they trust, and how a node is named to the other.

The source (service.migrate) and the destination (service.migrate_in) each
check the other against an anchor: the fleet's root this node's own chain
ends at, or a CA the operator names (``--ca``). A node is named by its node
CA key's fingerprint, the same across renewals of its certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from cryptography import x509

from ..adapters.files import read_bounded
from ..adapters.node_keys import NodeIdentity
from ..core.chain import is_self_signed
from ..core.migration.handoff import PROTOCOL, Handoff, HandoffEvent, verify_ledger
from ..core.signed import key_fingerprint
from ..core.vtpm.ledger import LedgerEntry
from ..errors import InputError, TrustError, TvorchError

_CA_FILE_MAX = 1024 * 1024


def anchor(identity: NodeIdentity, ca_path: str | None) -> x509.Certificate:
    """The certificate the other node must chain to: CA_PATH when given, else this node's fleet root."""
    if ca_path:
        try:
            data = read_bounded(ca_path, _CA_FILE_MAX)
        except OSError as err:
            raise InputError(f"cannot read the CA {ca_path}: {err.strerror or err}") from None
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise InputError(f"{ca_path} is not a PEM certificate") from None
    root = identity.chain[-1] if identity.chain else None
    if root is None or not is_self_signed(root):
        raise TrustError("this node is in no fleet (`tvorch ca install`), so it cannot tell a node of its fleet from "
                         "any other: name the CA the other node must chain to with --ca")
    return root


def node_name(identity: NodeIdentity) -> str:
    return key_fingerprint(identity.ca_cert)


def qualifying(nonce: bytes, what: str) -> bytes:
    """What a TPM signs for the source's NONCE: bound to the protocol and to WHAT it vouches for."""
    return hashlib.sha256(f"{PROTOCOL} {what}\0".encode() + nonce).digest()



def ledger_handoffs(identity: NodeIdentity, entries: Sequence[LedgerEntry], statements: Mapping[int, object],
                    ca_path: str | None) -> tuple[list[Handoff], str | None]:
    """The ledger's migrations, verified under CA_PATH or this node's fleet root: (handoffs, None), or
    ([], why not) when they do not verify or there is nothing to verify them under."""
    if not statements and not any(e.event in (HandoffEvent.OUT.value, HandoffEvent.IN.value) for e in entries):
        return [], None
    try:
        trusted = anchor(identity, ca_path)
        return verify_ledger(entries, statements, trusted, datetime.now(timezone.utc)), None
    except TvorchError as err:
        return [], str(err)
