"""`tvorch predict`: the boot measurements a launch of an image would produce, without running it.

The disk side (PCRs 4, 5, 8, 9, 11-14) is computed here from the image and
the direct-boot files; the firmware side (PCRs 0-3, 6, 7) comes from a
firmware reference when one exists, and is listed as not predicted when not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters.diskread import DiskImage
from ..core.boot.bootdisk import DEFAULT_BOOT_PATH, Fat, read_boot_file
from ..core.boot.bootpredict import (
    STUB_DROPIN_DIRS,
    STUB_DROPIN_SUFFIX,
    BootPrediction,
    predict_seabios_direct,
    predict_uefi_direct,
    predict_uefi_disk,
)
from ..core.boot.prediction import PredictedEvent, Prediction
from ..errors import EvidenceError, ImageError, InputError, NotFoundError, TvorchError

if TYPE_CHECKING:
    from .node import Node

FIRMWARE_PCRS = (0, 1, 2, 3, 6, 7)
MAX_BOOT_FILE = 1 << 30  # a kernel or initrd larger than 1 GiB is not a kernel or initrd


@dataclass(frozen=True)
class PredictRequest:
    image: str
    firmware: str = "efi"  # "efi" (OVMF) or "bios" (SeaBIOS)
    secure_boot: bool = False
    firmware_profile: str | None = None
    tpm_model: str = "crb"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None


@dataclass(frozen=True)
class PredictResult:
    prediction: Prediction
    not_predicted: tuple[tuple[int, str], ...]
    scenario: str
    bytes_read: int
    cached: bool = False  # the disk side came from the prediction cache (state_dir/predictions/)

    def to_json(self) -> dict[str, object]:
        out = self.prediction.to_json()
        out["scenario"] = self.scenario
        out["not_predicted"] = {str(p): why for p, why in sorted(self.not_predicted)}
        out["image_bytes_read"] = self.bytes_read
        out["cached"] = self.cached
        return out


def _read_file(path: str, what: str) -> bytes:
    from ..adapters.files import read_bounded

    try:
        return read_bounded(path, MAX_BOOT_FILE)
    except OSError as err:
        raise InputError(f"cannot read the {what} {path}: {err.strerror or err}") from None


def _stub_dropins(fat: Fat, boot_path: str) -> bool:
    """Whether systemd-stub would find credentials or system extensions next to BOOT_PATH or in \\loader."""
    return fat.has_directory(boot_path + STUB_DROPIN_SUFFIX) or any(fat.has_directory(d) for d in STUB_DROPIN_DIRS)


def _check_options(req: PredictRequest) -> None:
    if req.firmware not in ("efi", "bios"):
        raise InputError(f"firmware {req.firmware!r} is not efi or bios")
    if req.kernel is None and (req.initrd is not None or req.cmdline is not None):
        raise InputError("--initrd and --cmdline need --kernel")
    if req.firmware == "bios" and req.kernel is None:
        raise InputError("a SeaBIOS boot from disk is not predicted: only direct kernel boot (--kernel)")


def predict_disk_side(req: PredictRequest) -> tuple[BootPrediction, str, int]:
    """The computed events, the scenario's name, and the image bytes read to get them."""
    _check_options(req)
    direct = req.kernel is not None
    if req.firmware == "bios":
        with DiskImage(req.image):  # the image is still opened and vetted as launch would
            pass
        return predict_seabios_direct(), "seabios-direct", 0
    if direct:
        assert req.kernel is not None
        kernel = _read_file(req.kernel, "kernel")
        initrd = _read_file(req.initrd, "initrd") if req.initrd else None
        with DiskImage(req.image):
            pass
        memory = (req.memory_mib or 1024) << 20
        return predict_uefi_direct(kernel, initrd, req.cmdline or "", memory), "ovmf-direct", 0
    with DiskImage(os.path.abspath(req.image)) as disk:
        gpt, fat, boot_file = read_boot_file(disk, DEFAULT_BOOT_PATH)
        dropins = _stub_dropins(fat, DEFAULT_BOOT_PATH)
        read = disk.bytes_read
    return predict_uefi_disk(gpt, boot_file, stub_dropins=dropins, secure_boot=req.secure_boot), "ovmf-disk", read


def _firmware_side(req: PredictRequest, disk: BootPrediction, node: Callable[[], Node] | None,
                   create_reference: bool = False) -> tuple[tuple[PredictedEvent, ...], tuple[tuple[int, str], ...]]:
    """PCRs 0-3, 6 and 7 from the firmware reference (booted first when CREATE_REFERENCE and there is
    none), or PCR 7 alone without one."""
    if req.firmware == "bios":
        return (), ()  # the SeaBIOS prediction has its own (core.boot.bootpredict.predict_seabios_direct)
    if node is None:
        return (), tuple((p, "firmware side not asked for") for p in FIRMWARE_PCRS)
    from ..core.boot.secureboot import pcr7_events
    from ..core.boot.uefi_vars import parse_vars_file
    from .firmware_reference import choice_from_options, firmware_events, reference_key

    n = node()
    choice = choice_from_options(n.cfg, memory_mib=req.memory_mib, vcpus=req.vcpus, secure_boot=req.secure_boot,
                                 firmware_profile=req.firmware_profile, tpm_model=req.tpm_model)
    try:
        events = tuple(firmware_events(n, choice, disk.firmware_loads, create=create_reference))
    except NotFoundError as err:
        missing = tuple((p, f"{err} (tvorch firmware reference create)") for p in FIRMWARE_PCRS if p != 7)
    except EvidenceError:
        raise  # the firmware disagrees with the computed PCR 7: nothing of this is predicted
    except TvorchError as err:  # the reference VM did not boot, or its log could not be read
        missing = tuple((p, f"the firmware reference could not be made: {err}") for p in FIRMWARE_PCRS if p != 7)
    else:
        if not req.kernel:
            return events, ()
        # A reference boots from a disk: its Boot#### variables (PCR 1) are not the ones
        # OVMF writes for a direct kernel boot, so that PCR is left to the boot itself.
        return (tuple(e for e in events if e.pcr != 1),
                ((1, "direct kernel boot: OVMF's boot options differ from the firmware reference's"),))
    _key, resolved = reference_key(n.cfg, choice)
    assert resolved.vars_template is not None  # reference_key refuses firmware without one
    store = parse_vars_file(_read_file(resolved.vars_template, "vars template"), resolved.vars_template)
    return tuple(pcr7_events(store, disk.firmware_loads)), missing


# --- the disk side, cached by the image's layer digests -------------------------------

CACHE_VERSION = 1  # bump when what the disk side computes changes: older entries are then never found


def _cache_key(req: PredictRequest, node: Node) -> str | None:
    """The disk side's cache key: the image's layer digests from the digest cache, and the options.

    None when a layer's digest is not cached (predict never hashes a whole
    image: launch and `image trust` do, and fill the cache) or when the
    firmware side needs the boot file's bytes (Secure Boot: its signer).
    """
    import hashlib

    from ..adapters.digests import measure_file
    from ..adapters.imagefiles import inspect_image
    from ..core.launch.manifest import canonical_json
    from ..core.launch.measurements import DigestKey

    if req.secure_boot and req.firmware == "efi":
        return None
    layers = []
    for layer in inspect_image(req.image).layers:
        st = os.stat(layer.path)
        digest = node.store.cached_digest(DigestKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if digest is None:
            return None
        layers.append(digest)
    try:
        files = {what: measure_file(path, node.store).digest
                 for what, path in (("kernel", req.kernel), ("initrd", req.initrd)) if path}
    except ImageError:
        return None  # an unreadable kernel or initrd: predict_disk_side says so, naming which
    body = {"version": CACHE_VERSION, "layers": layers, "files": files, "firmware": req.firmware,
            "cmdline": req.cmdline, "memory_mib": req.memory_mib if files else None}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _cache_path(node: Node, key: str) -> Path:
    return Path(node.cfg.state_dir) / "predictions" / f"{key}.json"


def _cached(node: Node, key: str) -> tuple[BootPrediction, str] | None:
    import json

    try:
        raw = json.loads(_cache_path(node, key).read_bytes())
        events = tuple(PredictedEvent(int(e["pcr"]), str(e["type"]), str(e["digest"]), str(e["what"]))
                       for e in raw["events"])
        missing = tuple((int(p), str(why)) for p, why in raw["not_predicted"])
        return BootPrediction(events, frozenset(int(p) for p in raw["covered"]), missing), str(raw["scenario"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is computed again and replaced


def _store(node: Node, key: str, disk: BootPrediction, scenario: str) -> None:
    from ..adapters.files import atomic_write, ensure_private_dir
    from ..core.launch.manifest import canonical_json

    path = _cache_path(node, key)
    ensure_private_dir(path.parent)
    body = {"scenario": scenario, "covered": sorted(disk.covered), "not_predicted": [list(m) for m in disk.not_predicted],
            "events": [{"pcr": e.pcr, "type": e.type_name, "digest": e.digest, "what": e.what} for e in disk.events]}
    atomic_write(path, canonical_json(body))


def predict(req: PredictRequest, node: Callable[[], Node] | None = None, *,
            create_reference: bool = False) -> PredictResult:
    """Disk side (cached by image digest when NODE is given), then the firmware side from NODE.

    NODE is a factory: a request refused on its options never opens the store.
    CREATE_REFERENCE boots the platform's firmware reference VM when there is none (launch).
    """
    _check_options(req)
    key = None
    hit = None
    if node is not None:
        key = _cache_key(req, node())
        hit = _cached(node(), key) if key else None
    if hit is not None:
        disk, scenario = hit
        read, cached = 0, True
    else:
        disk, scenario, read = predict_disk_side(req)
        cached = False
        if key is not None and node is not None:
            _store(node(), key, disk, scenario)
    fw_events, fw_missing = _firmware_side(req, disk, node, create_reference)
    events = sorted(tuple(fw_events) + disk.events, key=lambda e: e.pcr)  # stable: each PCR keeps its order
    covered = disk.covered | {e.pcr for e in fw_events}
    prediction = Prediction(events=tuple(events), covered=covered)
    missing = tuple(sorted(set(disk.not_predicted) | set(fw_missing)))
    return PredictResult(prediction, missing, scenario, read, cached)
