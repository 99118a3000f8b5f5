"""Per-name instance locks: one launch, start, stop or destroy of a name at a time.

An exclusive ``flock`` on ``<state_dir>/locks/<name>.lock``, held for the whole
operation. The kernel releases a flock when its holder dies, even by SIGKILL,
so a ``launching`` record whose lock is free belongs to a launcher that is
gone: that is how reconciliation tells an interrupted launch from one in
progress. Locks are per open file, so two holders in one process exclude each
other as two processes do.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.launch.instance import validate_name
from ..errors import ConflictError, StoreError
from .files import ensure_private_dir


def _open(state_dir: Path, name: str) -> int:
    """The lock file's descriptor; the name is checked first because it becomes a file name."""
    validate_name(name)
    locks = Path(state_dir) / "locks"
    path = locks / f"{name}.lock"
    try:
        ensure_private_dir(Path(state_dir))
        ensure_private_dir(locks)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise StoreError(f"cannot open instance lock {path}: {err.strerror or err}") from None


@contextmanager
def instance_lock(state_dir: Path, name: str) -> Iterator[None]:
    """Hold NAME's lock for the block, waiting for the current holder if there is one."""
    fd = _open(state_dir, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def try_instance_lock(state_dir: Path, name: str) -> Iterator[bool]:
    """Hold NAME's lock for the block if it is free at once; yields whether it was."""
    fd = _open(state_dir, name)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def is_held(state_dir: Path, name: str) -> bool:
    """Whether someone (this process included) holds NAME's lock now."""
    with try_instance_lock(state_dir, name) as got:
        return not got


class StoreLock:
    """`tvorch serve`'s hold on a state directory: one daemon per store.

    An exclusive ``flock`` on ``<state_dir>/serve.lock``, taken at once or
    refused (two daemons would each reconcile, attest and write the heartbeat
    row of the other). The holder's pid is written into the file so the
    refusal can name it. The kernel drops the lock when its holder dies.
    """

    def __init__(self, state_dir: Path) -> None:
        path = Path(state_dir) / "serve.lock"
        try:
            ensure_private_dir(Path(state_dir))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StoreError(f"cannot open the daemon lock {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConflictError(f"refused: another tvorch serve (pid {holder}) holds the store in {state_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
