"""SHA-256 of files as fast as the hardware allows, and a cache so big images are hashed once.

A launch measures disk images of many GiB; the hook must answer in
milliseconds. So hashing streams through one reused buffer (no copies;
hashlib drops the GIL for each large update) and refuses a file that changed
while it was read, and a digest is cached under the file's identity
(device, inode, size, mtime, ctime), which any change to the file replaces.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from collections.abc import Callable
from typing import Protocol

from ..core.launch.measurements import DigestKey, FileDigest
from ..errors import ImageError

ALGORITHM = "sha256"

# Measured on this host (benchmarks/hash_throughput.py): 256 KiB to 16 MiB
# reads all hash at the same speed from the page cache; 1 MiB keeps the
# buffer in L2 and the syscalls few.
CHUNK_SIZE = 1024 * 1024

# A file changed this recently may change again within the same timestamp
# tick (1-2 s on some file systems) without a new mtime or ctime: its digest
# is returned but not cached ("racily clean", as git calls it).
RACY_WINDOW_NS = 2_000_000_000

Progress = Callable[[int, int], None]


class DigestCache(Protocol):
    """Where measure_file keeps digests; tvorch's store backs it with a table."""

    def cached_digest(self, key: DigestKey) -> str | None: ...

    def cache_digest(self, key: DigestKey, digest: str) -> None: ...


def _key(info: os.stat_result) -> DigestKey:
    return DigestKey(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _read_into(file: io.RawIOBase, buffer: bytearray, path: str | os.PathLike[str]) -> int:
    try:
        return file.readinto(buffer) or 0
    except OSError as err:  # EIO from a failing disk, say
        raise ImageError(f"cannot read {path}: {err.strerror}") from None


def _hash_file(path: str | os.PathLike[str], progress: Progress | None) -> tuple[str, os.stat_result]:
    """Hash PATH's bytes; return the digest and the file's status as it was while read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ImageError(f"cannot read {path}: {err.strerror}") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ImageError(f"cannot hash {path}: not a regular file")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        done = 0
        with open(fd, "rb", buffering=0, closefd=False) as file:
            while count := _read_into(file, buffer, path):
                digest.update(view[:count])
                done += count
                if progress is not None:
                    progress(done, before.st_size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if _key(after) != _key(before) or done != after.st_size:
        raise ImageError(f"{path} changed while it was being hashed; refusing its digest")
    return digest.hexdigest(), after


def sha256_file(path: str | os.PathLike[str], *, progress: Progress | None = None) -> str:
    """Hex SHA-256 of PATH; PROGRESS(done, total) is called after each read."""
    return _hash_file(path, progress)[0]


def measure_file(
    path: str | os.PathLike[str],
    cache: DigestCache,
    *,
    rehash: bool = False,
    progress: Progress | None = None,
) -> FileDigest:
    """PATH's digest: from CACHE without reading a byte when the file is untouched.

    REHASH ignores the cached digest (and replaces it). A digest is cached
    under the status the file had while it was read, never a later stat, so
    a file replaced meanwhile cannot lend its identity to old bytes.
    """
    if not rehash:
        try:
            info = os.stat(path)
        except OSError as err:
            raise ImageError(f"cannot read {path}: {err.strerror}") from None
        cached = cache.cached_digest(_key(info))
        if cached is not None:
            return FileDigest(str(path), ALGORITHM, cached, info.st_size, cached=True)
    started_ns = time.time_ns()
    digest, info = _hash_file(path, progress)
    if info.st_ctime_ns <= started_ns - RACY_WINDOW_NS:
        cache.cache_digest(_key(info), digest)
    return FileDigest(str(path), ALGORITHM, digest, info.st_size, cached=False)
