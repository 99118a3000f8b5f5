"""Private directories and atomic file writes for state, secrets and records."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigError


def ensure_private_dir(path: Path, mode: int = 0o700) -> None:
    """Create PATH (and parents) if missing; a new leaf gets MODE whatever the umask.

    An existing directory keeps its mode: it may be shared (a mistaken
    `state_dir = "/var/lib"` must not lock everyone else out of it).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(20, "exists and is not a directory") from None
            return
        os.chmod(path, mode)
    except OSError as err:
        raise ConfigError(f"cannot create directory {path}: {err.strerror}") from None


def write_synced(fd: int, data: bytes, mode: int = 0o600) -> None:
    """All of DATA to FD, with MODE whatever the umask, and fsync."""
    os.fchmod(fd, mode)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink in directory PATH durable."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write, fsync, rename, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_synced(fd, data, mode)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file that must not exist yet, whole or not at all: FileExistsError if PATH exists.

    The bytes go to a fresh temporary name (O_EXCL) and are synced, then
    hard-linked to PATH, which fails rather than replace anything there.
    """
    import tempfile  # here: the hook imports this module and never creates files

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        write_synced(fd, data, mode)
        os.close(fd)
        fd = -1
        os.link(tmp, path, follow_symlinks=False)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
    fsync_dir(path.parent)


def read_bounded(path: str, limit: int) -> bytes:
    """The bytes of PATH, a regular file of at most LIMIT bytes.

    O_NONBLOCK so a FIFO never hangs us; the size is checked by reading (files
    in securityfs, like the IMA list, report a size of 0).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # every error names PATH (not None, nor the descriptor)
            raise IsADirectoryError(21, "a directory, not a regular file", path) if stat.S_ISDIR(mode) else \
                OSError(22, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(27, f"larger than {limit} bytes", path)
    return data
