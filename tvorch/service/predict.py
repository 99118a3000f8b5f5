"""`tvorch predict`: the boot measurements a launch of an image would produce, without running it.

The disk side (PCRs 4, 5, 8, 9, 11-14) is computed here from the image and
the direct-boot files; the firmware side (PCRs 0-3, 6, 7) comes from a
firmware reference when one exists, and is listed as not predicted when not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..adapters.diskread import DiskImage
from ..core.bootdisk import DEFAULT_BOOT_PATH, Fat, read_boot_file
from ..core.bootpredict import (
    STUB_DROPIN_DIRS,
    STUB_DROPIN_SUFFIX,
    BootPrediction,
    predict_seabios_direct,
    predict_uefi_direct,
    predict_uefi_disk,
)
from ..core.prediction import PredictedEvent, Prediction
from ..errors import InputError

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

    def to_json(self) -> dict[str, object]:
        out = self.prediction.to_json()
        out["scenario"] = self.scenario
        out["not_predicted"] = {str(p): why for p, why in sorted(self.not_predicted)}
        out["image_bytes_read"] = self.bytes_read
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


def predict_disk_side(req: PredictRequest) -> tuple[BootPrediction, str, int]:
    """The computed events, the scenario's name, and the image bytes read to get them."""
    if req.firmware not in ("efi", "bios"):
        raise InputError(f"firmware {req.firmware!r} is not efi or bios")
    direct = req.kernel is not None
    if not direct and (req.initrd is not None or req.cmdline is not None):
        raise InputError("--initrd and --cmdline need --kernel")
    if req.firmware == "bios":
        if not direct:
            raise InputError("a SeaBIOS boot from disk is not predicted: only direct kernel boot (--kernel)")
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
    return predict_uefi_disk(gpt, boot_file, stub_dropins=dropins), "ovmf-disk", read


def _firmware_side(req: PredictRequest) -> tuple[tuple[PredictedEvent, ...], frozenset[int], tuple[tuple[int, str], ...]]:
    """The firmware reference's events, if the firmware side of tvorch offers them yet."""
    reason = "firmware side (PCRs 0-3, 6, 7): no firmware reference"
    return (), frozenset(), tuple((p, reason) for p in FIRMWARE_PCRS)


def predict(req: PredictRequest) -> PredictResult:
    disk, scenario, read = predict_disk_side(req)
    fw_events, fw_covered, fw_missing = _firmware_side(req)
    events = sorted(tuple(fw_events) + disk.events, key=lambda e: e.pcr)  # stable: each PCR keeps its order
    prediction = Prediction(events=tuple(events), covered=disk.covered | fw_covered)
    missing = tuple(sorted(set(disk.not_predicted) | set(fw_missing)))
    return PredictResult(prediction, missing, scenario, read)
