"""The launch manifest's format: its fields, their reading and the digest that names it.

What a launch measured, as dataclasses and as the JSON the signed file
carries (docs/launch-manifest.md), and the one reader of it. Signing and
verifying the file are in ``core.launch.manifest``; this module needs no
``cryptography``, so the hook (which must not pay for that import) reads the
manifest tvorch recorded with the same code as a verifier: ``stored_manifest``
for the file's bytes, ``manifest_digest`` for the value the domain's
``<metadata>`` names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tvorch.core.codec import MAX_JSON_INT, parse_json
from tvorch.core.boot.prediction import BANK, EventSource, PredictedEvent, Prediction
from tvorch.core.timestamps import EXAMPLE as TIME_EXAMPLE
from tvorch.core.timestamps import is_canonical_utc
from tvorch.errors import TrustError

MANIFEST_VERSION = 1
DIGEST_ALGORITHM = "sha256"

# What each measurement is of. A verifier must know what every entry means,
# so a new kind is a change to this list (and to docs/launch-manifest.md), not free text.
MEASUREMENT_KINDS = frozenset(
    {
        "image-layer",  # one file of the disk image's backing chain
        "firmware-code",  # OVMF code image or SeaBIOS binary
        "firmware-vars",  # the OVMF vars template the instance's vars were copied from
        "kernel",  # direct kernel boot
        "initrd",
        "cmdline",  # the kernel command line's UTF-8 bytes (no path)
        "emulator",  # the QEMU binary
        "swtpm",  # the swtpm binary
        "vtpm-ek",  # the vTPM's RSA EK certificate (DER) tvorch manufactured; details name the EK
    }
)

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DetailValue = str | int | bool


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """The digest of one thing that decides what the guest runs."""

    kind: str  # one of MEASUREMENT_KINDS
    path: str | None = None  # absolute path when measured; None for "cmdline"
    digest: str  # lowercase hex of the manifest's algorithm over the bytes
    size: int | None = None  # bytes hashed, for files
    details: Mapping[str, DetailValue] = field(default_factory=dict)  # e.g. format, virtual_size, layer

    def __post_init__(self) -> None:
        # A read-only copy: the dataclass is frozen, its details should be too.
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


@dataclass(frozen=True, kw_only=True)
class LaunchManifest:
    """Everything a launch measured, for one instance on one node."""

    instance_id: str
    uuid: str  # the libvirt domain UUID, lowercase 8-4-4-4-12
    name: str
    node: str  # the node's hostname
    created_at: str  # UTC, "2024-05-01T12:00:00.123+00:00"
    measurements: tuple[Measurement, ...]
    config_digest: str  # digest of the canonical domain configuration
    policy_digest: str  # digest of tvorch's launch policy in force
    algorithm: str = DIGEST_ALGORITHM
    version: int = MANIFEST_VERSION
    # The boot measurements predicted at launch (README, "Predicted boot measurements"); None: none made
    # (a manifest without the field is byte for byte what it was before predictions).
    boot_prediction: BootPredictionRecord | None = None


PREDICTION_STATUSES = ("predicted", "unavailable")


@dataclass(frozen=True)
class BootPredictionRecord:
    """What launch predicted the first boot's vTPM will hold, or why it could not."""

    status: str  # "predicted" or "unavailable"
    prediction: Prediction | None = None  # with "predicted"
    not_predicted: Mapping[int, str] = field(default_factory=dict)  # PCR -> why, with "predicted"
    reason: str | None = None  # with "unavailable": the refusal, in one line

    def to_dict(self) -> dict[str, Any]:
        if self.prediction is None:
            return {"status": self.status, "reason": self.reason}
        out = self.prediction.to_json()
        out["status"] = self.status
        out["not_predicted"] = {str(p): why for p, why in sorted(self.not_predicted.items())}
        return out


def manifest_to_dict(manifest: LaunchManifest) -> dict[str, Any]:
    """The manifest as JSON-ready values (docs/launch-manifest.md)."""
    return {
        "version": manifest.version,
        "instance_id": manifest.instance_id,
        "uuid": manifest.uuid,
        "name": manifest.name,
        "node": manifest.node,
        "created_at": manifest.created_at,
        "algorithm": manifest.algorithm,
        "measurements": [
            {"kind": m.kind, "path": m.path, "digest": m.digest, "size": m.size, "details": dict(m.details)}
            for m in manifest.measurements
        ],
        "config_digest": manifest.config_digest,
        "policy_digest": manifest.policy_digest,
        **({"boot_prediction": manifest.boot_prediction.to_dict()} if manifest.boot_prediction else {}),
    }


def manifest_from_dict(data: object) -> LaunchManifest:
    """Parse a manifest, refusing any missing, unknown or ill-formed field by name."""
    fields = fields_of(data, "manifest", _MANIFEST_FIELDS, optional=("boot_prediction",))
    version = _int(fields["version"], "version")
    if version != MANIFEST_VERSION:
        raise TrustError(f"manifest field 'version': unsupported version {version} (this tvorch reads {MANIFEST_VERSION})")
    algorithm = _str(fields["algorithm"], "algorithm")
    if algorithm != DIGEST_ALGORITHM:
        raise TrustError(f"manifest field 'algorithm': unsupported digest algorithm {algorithm!r}")
    uuid = _str(fields["uuid"], "uuid")
    if not _is_canonical_uuid(uuid):
        raise TrustError(f"manifest field 'uuid': {uuid!r} is not a lowercase 8-4-4-4-12 UUID")
    raw_measurements = fields["measurements"]
    if not isinstance(raw_measurements, list):
        raise TrustError("manifest field 'measurements': must be a list")
    return LaunchManifest(
        version=version,
        instance_id=_str(fields["instance_id"], "instance_id"),
        uuid=uuid,
        name=_str(fields["name"], "name"),
        node=_str(fields["node"], "node"),
        created_at=_timestamp(fields["created_at"], "created_at"),
        algorithm=algorithm,
        measurements=tuple(_measurement(m, f"measurements[{i}]") for i, m in enumerate(raw_measurements)),
        config_digest=_digest(fields["config_digest"], "config_digest"),
        policy_digest=_digest(fields["policy_digest"], "policy_digest"),
        boot_prediction=_boot_prediction(fields["boot_prediction"]) if "boot_prediction" in fields else None,
    )


def manifest_digest(file_bytes: bytes) -> str:
    """SHA-256 hex of the signed file's bytes: the value recorded in the domain's metadata."""
    return hashlib.sha256(file_bytes).hexdigest()


def stored_manifest(file_bytes: bytes) -> LaunchManifest:
    """The manifest in a signed manifest file tvorch recorded, read strictly; its signature is not checked.

    For a file whose digest the caller compares with what it trusts (the
    hook, with the domain's metadata and the store); a file from elsewhere
    goes through ``core.launch.manifest.verify_manifest``. TrustError for anything
    that is not a manifest file.
    """
    doc = parse_json(file_bytes, "manifest file", TrustError)
    if "manifest" not in doc:
        raise TrustError("manifest file: missing field 'manifest'")
    return manifest_from_dict(doc["manifest"])


_MANIFEST_FIELDS = (
    "version",
    "instance_id",
    "uuid",
    "name",
    "node",
    "created_at",
    "algorithm",
    "measurements",
    "config_digest",
    "policy_digest",
)
_MEASUREMENT_FIELDS = ("kind", "path", "digest", "size", "details")


def _measurement(data: object, where: str) -> Measurement:
    fields = fields_of(data, where, _MEASUREMENT_FIELDS)
    kind = _str(fields["kind"], f"{where}.kind")
    if kind not in MEASUREMENT_KINDS:
        raise TrustError(f"manifest field '{where}.kind': unknown measurement kind {kind!r}")
    path = fields["path"]
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        raise TrustError(f"manifest field '{where}.path': must be an absolute path or null")
    size = fields["size"]
    if size is not None:
        _int(size, f"{where}.size")
    details = fields["details"]
    if not isinstance(details, dict):
        raise TrustError(f"manifest field '{where}.details': must be an object")
    for key, value in details.items():
        if not _DETAIL_KEY.fullmatch(key):
            raise TrustError(f"manifest field '{where}.details': key {key!r} is not lowercase letters, digits and _")
        if not isinstance(value, (str, int)):  # bool is an int
            raise TrustError(f"manifest field '{where}.details.{key}': must be a string, integer or boolean")
        if isinstance(value, int) and not isinstance(value, bool):
            _int(value, f"{where}.details.{key}")
    return Measurement(kind=kind, path=path, digest=_digest(fields["digest"], f"{where}.digest"), size=size, details=details)


_PREDICTION_FIELDS = ("status", "bank", "covered", "pcrs", "events", "not_predicted")
_PREDICTED_EVENT_FIELDS = ("pcr", "type", "digest", "what", "source")
_MAX_PCR = 23


def _pcr(value: object, where: str) -> int:
    if isinstance(value, str) and value.isdigit() and str(int(value)) == value:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_PCR:
        raise TrustError(f"manifest field '{where}': must be a PCR index from 0 to {_MAX_PCR}")
    return value


def _boot_prediction(data: object) -> BootPredictionRecord:
    """The boot_prediction section: refused unless its events replay to the PCR values it states."""
    where = "boot_prediction"
    if isinstance(data, dict) and data.get("status") == "unavailable":
        fields = fields_of(data, where, ("status", "reason"))
        return BootPredictionRecord("unavailable", reason=_str(fields["reason"], f"{where}.reason"))
    fields = fields_of(data, where, _PREDICTION_FIELDS)
    if fields["status"] != "predicted":
        raise TrustError(f"manifest field '{where}.status': must be one of {', '.join(PREDICTION_STATUSES)}")
    if fields["bank"] != BANK:
        raise TrustError(f"manifest field '{where}.bank': must be {BANK!r}")
    covered, events, pcrs, missing = fields["covered"], fields["events"], fields["pcrs"], fields["not_predicted"]
    if not isinstance(covered, list) or not isinstance(events, list) or not isinstance(pcrs, dict) \
            or not isinstance(missing, dict):
        raise TrustError(f"manifest field '{where}': covered and events must be lists, pcrs and not_predicted objects")
    parsed = []
    for i, e in enumerate(events):
        ev = fields_of(e, f"{where}.events[{i}]", _PREDICTED_EVENT_FIELDS)
        try:
            source = EventSource(ev["source"])
        except ValueError:
            raise TrustError(f"manifest field '{where}.events[{i}].source': unknown source {ev['source']!r}") from None
        parsed.append(PredictedEvent(_pcr(ev["pcr"], f"{where}.events[{i}].pcr"),
                                     _str(ev["type"], f"{where}.events[{i}].type"),
                                     _digest(ev["digest"], f"{where}.events[{i}].digest"),
                                     _str(ev["what"], f"{where}.events[{i}].what"), source))
    try:
        prediction = Prediction(tuple(parsed), frozenset(_pcr(p, f"{where}.covered") for p in covered))
    except ValueError as err:
        raise TrustError(f"manifest field '{where}': {err}") from None
    stated = {_pcr(p, f"{where}.pcrs"): _digest(v, f"{where}.pcrs.{p}") for p, v in pcrs.items()}
    if stated != dict(prediction.pcrs):
        raise TrustError(f"manifest field '{where}.pcrs': the PCR values are not what its events replay to")
    reasons = {_pcr(p, f"{where}.not_predicted"): _str(v, f"{where}.not_predicted.{p}") for p, v in missing.items()}
    return BootPredictionRecord("predicted", prediction, reasons)


def fields_of(data: object, where: str, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TrustError(f"manifest {where}: must be a JSON object")
    for name in names:
        if name not in data:
            raise TrustError(f"manifest {where}: missing field '{name}'")
    for name in data:
        if name not in names and name not in optional:
            raise TrustError(f"manifest {where}: unknown field '{name}'")
    return data


def _str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise TrustError(f"manifest field '{name}': must be a non-empty string")
    return value


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_JSON_INT:
        raise TrustError(f"manifest field '{name}': must be an integer from 0 to 2**53-1")
    return value


def _digest(value: object, name: str) -> str:
    if not isinstance(value, str) or not _HEX_DIGEST.fullmatch(value):
        raise TrustError(f"manifest field '{name}': must be a sha256 digest (64 lowercase hex digits)")
    return value


def _timestamp(value: object, name: str) -> str:
    text = _str(value, name)
    if not is_canonical_utc(text):
        raise TrustError(f"manifest field '{name}': {text!r} is not a UTC time like {TIME_EXAMPLE}")
    return text


def _is_canonical_uuid(text: str) -> bool:
    """What str(uuid.UUID(TEXT)) == TEXT says, without importing uuid on the hook's path."""
    return _CANONICAL_UUID.fullmatch(text) is not None
