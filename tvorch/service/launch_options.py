"""What a launch's options and the configured defaults choose: the virtualisation type and the firmware.

Shared by `launch` and the firmware reference (which boots the firmware a
launch with the same options would), so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..core.launch.spec import Firmware, FirmwareImages, VirtType
from ..errors import HostError, InputError
from ..logs import get_logger

log = get_logger(__name__)

_SAID: set[str] = set()  # why KVM is unusable, said once per process (a launch also predicts and may boot a reference)


def choose_virt_type(setting: str, kvm_problem: str | None) -> VirtType:
    """`auto` takes KVM when it is usable and falls back to TCG, saying why."""
    if setting != "auto":
        return VirtType(setting)
    if kvm_problem is None:
        return VirtType.KVM
    if kvm_problem not in _SAID:
        _SAID.add(kvm_problem)
        log.warning("kvm_unusable_using_tcg", reason=kvm_problem)
    return VirtType.QEMU


def firmware_choice(cfg: Config, firmware_option: str | None, secure_boot_option: bool | None,
                    firmware_profile: str | None) -> tuple[Firmware, bool, FirmwareImages | None]:
    """The firmware, Secure Boot and firmware images of --firmware, --secure-boot and --firmware-profile."""
    if firmware_profile is not None:
        profile = cfg.firmware_profiles.get(firmware_profile)
        if profile is None:
            known = ", ".join(sorted(cfg.firmware_profiles)) or "none configured"
            raise InputError(f"refused firmware profile '{firmware_profile}': unknown (known: {known})")
        if firmware_option == Firmware.BIOS.value:
            raise InputError("refused --firmware-profile with --firmware bios: profiles are UEFI firmware")
        if secure_boot_option is not None and secure_boot_option != profile.secure_boot:
            raise InputError(f"refused --secure-boot setting: firmware profile '{firmware_profile}' fixes it")
        for path in (profile.code, profile.vars_template):
            if not Path(path).is_file():
                raise HostError(f"firmware profile '{firmware_profile}': {path} does not exist")
        images = FirmwareImages(profile.code, profile.vars_template, profile.secure_boot)
        return Firmware.EFI, profile.secure_boot, images
    firmware = Firmware(firmware_option or cfg.launch.firmware)
    secure_boot = cfg.launch.secure_boot if secure_boot_option is None else secure_boot_option
    if firmware is Firmware.BIOS and secure_boot:
        if secure_boot_option:
            raise InputError("refused --secure-boot with --firmware bios: Secure Boot needs UEFI firmware")
        secure_boot = False  # the configured default applies to UEFI only
    return firmware, secure_boot, None
