"""One error tree for tvorch; every subclass carries its process exit code.

Entry points catch ``TvorchError`` and print ``str(err)`` as the single line
the user sees; anything else is a bug and shows a traceback only under
``--debug``. The codes are part of the CLI contract (see README, "Exit codes").
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # unexpected internal error (a bug)
    USAGE = 2  # bad command-line syntax (click's own code)
    INVALID_INPUT = 3  # a value was refused: name, memory, vcpus, path ...
    IMAGE_REFUSED = 4  # the disk image is missing, malformed or unsafe
    NOT_FOUND = 5  # no such instance
    CONFLICT = 6  # name in use, wrong state for the operation
    LIBVIRT = 7  # libvirt unreachable or refused the operation
    CONFIG = 8  # configuration file missing keys, wrong types, unknown keys
    STORE = 9  # the state database is unusable
    TIMEOUT = 10  # an operation did not finish in time
    HOST = 11  # the host cannot run what was asked (emulator, firmware)
    TRUST_REFUSED = 12  # a measurement, signature or manifest did not verify or is not trusted
    EVIDENCE = 13  # an event log, IMA log or quote is malformed
    TPM = 14  # the TPM refused or failed a command (the TPM response code is kept)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class TvorchError(Exception):
    """Base of every error tvorch reports to a user."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the cause said.
        super().__init__(" ".join(str(message).split()))


class InputError(TvorchError):
    exit_code = ExitCode.INVALID_INPUT


class ImageError(TvorchError):
    exit_code = ExitCode.IMAGE_REFUSED


class NotFoundError(TvorchError):
    exit_code = ExitCode.NOT_FOUND


class ConflictError(TvorchError):
    exit_code = ExitCode.CONFLICT


class LibvirtError(TvorchError):
    exit_code = ExitCode.LIBVIRT


class ConfigError(TvorchError):
    exit_code = ExitCode.CONFIG


class StoreError(TvorchError):
    exit_code = ExitCode.STORE


class OperationTimeout(TvorchError):
    exit_code = ExitCode.TIMEOUT


class HostError(TvorchError):
    exit_code = ExitCode.HOST


class TrustError(TvorchError):
    """A measurement, signature, certificate or manifest did not verify or is not trusted."""

    exit_code = ExitCode.TRUST_REFUSED


class EvidenceError(TvorchError):
    """Malformed attestation evidence: event log, IMA log, quote structures."""

    exit_code = ExitCode.EVIDENCE


class TpmError(TvorchError):
    """A TPM command failed; ``rc`` is the TPM/TSS response code when there is one."""

    exit_code = ExitCode.TPM

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message if rc is None else f"{message} (TPM rc 0x{rc:x})")
        self.rc = rc
