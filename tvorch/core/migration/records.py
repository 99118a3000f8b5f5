"""The instance's records as they travel from one node's store to another's.

What moves with the VM (issue #18): the instance record and its history, the
signed manifest, the vTPM record (identity, EK and platform certificates,
key check value), both ledgers with their handoff statements, and the guest
evidence (baseline, verified boots). Each table travels as a
list of rows; bytes as ``{"b64": ...}``. What only made sense on the source
does not travel: the state key's two wrappings (bound to the source's TPM
and escrow key; the key itself travels wrapped to the destination's TPM),
the guest AK's certification (signed by the source; the destination certifies
the same AK again against the EK at its first attestation, so its bundles
carry its own), the hook's runs and decisions, the overlay's identity, managed saves,
autostart.

Pure: dicts in, dicts out, every row checked to belong to the instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tvorch.core.codec import b64decode, b64encode
from tvorch.errors import TrustError

# table -> the column naming the instance; in the order rows are inserted (parents first).
TABLES: dict[str, str] = {
    "instances": "id",
    "instance_events": "instance_id",
    "manifests": "instance_id",
    "vtpms": "instance_id",
    "vtpm_ledger": "instance_id",
    "nvram_ledger": "instance_id",
    "ledger_handoffs": "instance_id",
    "guest_baselines": "instance_id",
    "guest_boots": "instance_id",
}
# Columns the destination sets itself (an autoincrement key, what is bound to the source).
LOCAL_COLUMNS: dict[str, frozenset[str]] = {
    "instances": frozenset({"overlay_identity"}),
    "instance_events": frozenset({"seq"}),
    "vtpms": frozenset({"sealed_key", "escrow_key", "escrow_fingerprint", "pending", "key_lent_at"}),
    "guest_boots": frozenset({"seq"}),
}
MAX_ROWS = 100_000


def encode_value(value: object) -> object:
    return {"b64": b64encode(bytes(value))} if isinstance(value, (bytes, bytearray, memoryview)) else value


def decode_value(value: object, where: str) -> object:
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise TrustError(f"records: {where} is an object other than {{'b64': ...}}")
        return b64decode(value["b64"], f"records: {where}", TrustError)
    if value is None or isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    raise TrustError(f"records: {where} is a {type(value).__name__}")


def encode_rows(tables: Mapping[str, Sequence[Mapping[str, object]]]) -> dict[str, list[dict[str, object]]]:
    """The transfer form of TABLES' rows, the destination's own columns left out."""
    out: dict[str, list[dict[str, object]]] = {}
    for table in TABLES:
        skip = LOCAL_COLUMNS.get(table, frozenset())
        out[table] = [{k: encode_value(v) for k, v in row.items() if k not in skip} for row in tables.get(table, [])]
    return out


def decode_rows(doc: object, instance_id: str, columns: Mapping[str, frozenset[str]]
                ) -> dict[str, list[dict[str, Any]]]:
    """Rows to insert, checked: known tables and COLUMNS (the destination's schema), every row the instance's,
    one instance row. TrustError names the first thing that does not hold."""
    if not isinstance(doc, dict) or set(doc) != set(TABLES):
        raise TrustError(f"records: expected the tables {', '.join(TABLES)}")
    total = sum(len(rows) if isinstance(rows, list) else 0 for rows in doc.values())
    if total > MAX_ROWS:
        raise TrustError(f"records: {total} rows, more than {MAX_ROWS}")
    out: dict[str, list[dict[str, Any]]] = {}
    for table, key in TABLES.items():
        rows = doc[table]
        if not isinstance(rows, list):
            raise TrustError(f"records: table {table} is not a list")
        allowed = columns[table] - LOCAL_COLUMNS.get(table, frozenset())
        decoded = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not set(row) <= allowed or key not in row:
                extra = sorted(set(row) - allowed) if isinstance(row, dict) else []
                raise TrustError(f"records: {table}[{i}] has columns this node does not keep: {extra}")
            if row[key] != instance_id:
                raise TrustError(f"records: {table}[{i}] belongs to {row[key]!r}, not {instance_id}")
            decoded.append({k: decode_value(v, f"{table}[{i}].{k}") for k, v in row.items()})
        out[table] = decoded
    if len(out["instances"]) != 1:
        raise TrustError(f"records: {len(out['instances'])} instance rows, not 1")
    if len(out["manifests"]) != 1:
        raise TrustError("records: the instance has no signed manifest")
    return out


def single(rows: Mapping[str, list[dict[str, Any]]], table: str) -> dict[str, Any] | None:
    found = rows.get(table, [])
    return found[0] if found else None
