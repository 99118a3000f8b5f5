"""One error tree for tvorch; every subclass carries its process exit code.

Entry points catch ``TvorchError`` and print ``str(err)`` as the single line
the user sees; anything else is a bug and shows a traceback only under
``--debug``. The codes are part of the CLI contract (see README, "Exit codes").
"""

from __future__ import annotations

import linecache
import re
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
    FILE = 15  # a file or directory could not be created, read or written (path and operation named)
    UNHEALTHY = 16  # `tvorch status`: the daemon is not running, its heartbeat is stale, or libvirt is lost
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


class DaemonUnhealthy(TvorchError):
    """`tvorch status`: the daemon is not following libvirt (so monitoring can alert on the exit code)."""

    exit_code = ExitCode.UNHEALTHY


class TrustError(TvorchError):
    """A measurement, signature, certificate or manifest did not verify or is not trusted."""

    exit_code = ExitCode.TRUST_REFUSED


class EvidenceError(TvorchError):
    """Malformed attestation evidence: event log, IMA log, quote structures."""

    exit_code = ExitCode.EVIDENCE


class KeylimeUnreachable(TvorchError):
    """The Keylime verifier could not be reached (tvorch's own verdict stands; the submission is queued)."""

    exit_code = ExitCode.TIMEOUT


class TpmError(TvorchError):
    """A TPM command failed; ``rc`` is the TPM/TSS response code when there is one."""

    exit_code = ExitCode.TPM

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message if rc is None else f"{message} (TPM rc 0x{rc:x})")
        self.rc = rc


# The call on the failing source line says what was tried; the first match wins.
_OPERATIONS = (
    (re.compile(r"\b(mkdir|makedirs)\("), "create directory"),
    (re.compile(r"\b(replace|rename)\("), "rename"),
    (re.compile(r"\b(unlink|rmdir|rmtree|remove)\("), "remove"),
    (re.compile(r"\b(chmod|fchmod)\("), "change the mode of"),
    (re.compile(r"\b(chown|fchown)\("), "change the owner of"),
    (re.compile(r"\b(link|symlink)\("), "link"),
    (re.compile(r"\b(copy\w*|copyfile)\("), "copy"),
    (re.compile(r"\b(write\w*|fsync)\("), "write"),
    (re.compile(r"\b(read\w*)\("), "read"),
    (re.compile(r"\b(open|mkstemp)\("), "open"),
    (re.compile(r"\b(stat|lstat|exists|is_dir|is_file)\("), "look up"),
)


def describe_os_error(err: OSError) -> str:
    """One line naming the path and the operation that failed, from the error and where it was raised."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ""
    operation = next((op for pattern, op in _OPERATIONS if pattern.search(line)), "use")
    path = err.filename if err.filename is not None else "a file"
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    reason = err.strerror or str(err) or type(err).__name__
    return f"cannot {operation} {path}{target}: {reason}"
