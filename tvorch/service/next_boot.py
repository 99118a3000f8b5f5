"""A planned boot change inside a guest, predicted before it boots: `tvorch predict --instance NAME --boot-file PATH`.

A kernel update inside the guest writes a new UKI onto its own disk. Instead
of `tvorch baseline accept` after the fact, the operator has tvorch read the
new boot file from the instance's disk (its overlay, through the backing
chain), predict the boot it makes, and keep that as the instance's expected
next boot. The disk side (PCRs 4, 5, 8, 9, 11-14) is computed from the disk
as `tvorch predict` does; the firmware side (PCRs 0-3, 6, and 7 unless Secure
Boot verified the boot file) is the launch manifest's signed prediction,
which the new boot file does not change. A later boot that differs from the
baseline is judged against it (service.attest): a match becomes the baseline
(source "predicted"), a difference is refused and not learned.

Stored as state_dir/expected-boot/<instance id>.json (0600, written
atomically): node state like the baseline, not a signed statement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..adapters.diskread import DiskImage
from ..adapters.files import atomic_write, ensure_private_dir
from ..config import Config
from ..core.boot.bootdisk import read_boot_file
from ..core.boot.bootpredict import predict_uefi_disk
from ..core.codec import canonical_json
from ..core.launch.instance import validate_name
from ..core.launch.manifest_format import stored_manifest
from ..core.boot.prediction import EventSource, PredictedEvent, Prediction
from ..core.timestamps import utc_now
from ..errors import ConflictError, NotFoundError
from .node import Node
from .predict import _stub_dropins

_AUTHORITY = "EV_EFI_VARIABLE_AUTHORITY"


def expected_path(cfg: Config, instance_id: str) -> Path:
    return Path(cfg.state_dir) / "expected-boot" / f"{instance_id}.json"


def predict_next_boot(node: Node, name: str, boot_path: str) -> dict[str, Any]:
    """Predict the boot of BOOT_PATH on NAME's own disk and keep it as NAME's expected next boot."""
    record = node.store.get_live(validate_name(name))
    manifest = node.store.manifest(record.id)
    if manifest is None:
        raise NotFoundError(f"instance '{name}' has no launch manifest to take the firmware side from")
    parsed = stored_manifest(manifest)
    launched = parsed.boot_prediction
    if launched is None or launched.prediction is None:
        why = "none" if launched is None else f"unavailable: {launched.reason}"
        raise ConflictError(f"refused: instance '{name}' has no launch prediction to take the firmware side from "
                            f"({why})")
    if any(m.kind == "kernel" for m in parsed.measurements):
        raise ConflictError(f"refused: instance '{name}' boots a kernel given at launch (direct kernel boot), "
                            "not a boot file on its disk")
    with DiskImage(record.overlay) as disk:
        gpt, fat, boot_file = read_boot_file(disk, boot_path)
        dropins = _stub_dropins(fat, boot_path)
    # Secure Boot as at launch: the firmware-side prediction measured a db authority (PCR 7) only then.
    secure = any(e.type_name == "EV_EFI_VARIABLE_AUTHORITY" for e in launched.prediction.events)
    side = predict_uefi_disk(gpt, boot_file, stub_dropins=dropins, boot_path=boot_path, secure_boot=secure)
    prediction = combine(launched.prediction, side.events, side.covered, {p for p, _ in side.not_predicted})
    body = {"boot_file": boot_path, "made_at": utc_now(), "prediction": prediction.to_json()}
    path = expected_path(node.cfg, record.id)
    ensure_private_dir(path.parent)
    atomic_write(path, canonical_json(body))
    node.store.add_event(record.id, "next-boot-predicted",
                         f"{boot_path}: PCRs {', '.join(map(str, sorted(prediction.covered)))}")
    return {"name": record.name, "instance_id": record.id, **body}


def combine(launched: Prediction, disk_events: tuple[PredictedEvent, ...], disk_covered: frozenset[int],
            disk_unknown: set[int]) -> Prediction:
    """The launch prediction with its disk side replaced by a new one.

    PCR 7 is dropped when the launch prediction has db authority events in it:
    under Secure Boot they follow the boot file's signature, which is new.
    """
    dropped = set(disk_covered) | disk_unknown
    if any(e.pcr == 7 and e.type_name == _AUTHORITY for e in launched.events):
        dropped.add(7)
    kept = [e for e in launched.events if e.pcr not in dropped]
    events = sorted(kept + list(disk_events), key=lambda e: e.pcr)  # stable: each PCR keeps its order
    return Prediction(tuple(events), (launched.covered - dropped) | disk_covered)


def expected_next_boot(cfg: Config, instance_id: str) -> tuple[Prediction, str] | None:
    """The instance's expected next boot and the boot file it was read from, if one is kept."""
    try:
        raw = json.loads(expected_path(cfg, instance_id).read_bytes())
    except FileNotFoundError:
        return None
    p = raw["prediction"]
    events = tuple(PredictedEvent(int(e["pcr"]), str(e["type"]), str(e["digest"]), str(e["what"]),
                                  EventSource(e["source"])) for e in p["events"])
    return Prediction(events, frozenset(int(c) for c in p["covered"])), str(raw["boot_file"])


def forget_next_boot(cfg: Config, instance_id: str) -> None:
    expected_path(cfg, instance_id).unlink(missing_ok=True)
