"""Private directories and atomic file writes for state, secrets and records."""

from __future__ import annotations

import os
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


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write, fsync, rename, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
