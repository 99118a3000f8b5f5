"""What tvorch measured before a launch, and how a measurement is found again.

Pure types: hashing files is tvorch.adapters.digests' job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class FileDigest:
    """One file's digest; ``cached`` says it came from the digest cache, unread."""

    path: str
    algorithm: str
    digest: str  # lowercase hex
    size: int
    cached: bool


class DigestKey(NamedTuple):
    """What a cached SHA-256 is valid for: one inode, as long as nothing touched it.

    Any write changes mtime and ctime, chmod/chown change ctime, a replacement
    by rename brings a new inode: each gives a new key, so a stale digest is
    never found. A plain tuple, so a store can bind it as SQL parameters.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
