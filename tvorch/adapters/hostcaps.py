"""What this host can run: is KVM really usable, is the emulator there.

`/dev/kvm` existing is not enough: on nested or restricted hosts it opens but
lacks what q35 + OVMF need (SMM), and guests die with "KVM internal error".
We ask the kernel directly with the KVM ioctls, which costs microseconds.
"""

from __future__ import annotations

import fcntl
import os

_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_CHECK_EXTENSION = 0xAE03
_KVM_API_VERSION = 12
_KVM_CAP_X86_SMM = 117


def probe_kvm(device: str = "/dev/kvm") -> str | None:
    """None when KVM is usable for q35/OVMF guests, else the reason it is not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"{device}: {err.strerror}"
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != _KVM_API_VERSION:
            return f"{device}: unsupported KVM API version"
        if fcntl.ioctl(fd, _KVM_CHECK_EXTENSION, _KVM_CAP_X86_SMM) <= 0:
            return f"{device}: KVM lacks System Management Mode, which q35/OVMF guests need"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as err:
        return f"{device}: {err.strerror}"
    finally:
        os.close(fd)
    return None


def is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)
