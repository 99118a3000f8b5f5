"""A vTPM's state at rest in libvirt's directory: its digest, and replacing it whole.

libvirt keeps a domain's swtpm state in ``<swtpm_state_dir>/<uuid>/tpm2``
(the directory 0700, owned by the swtpm user). The digest covers every state
file there (name and content), not swtpm's lock file, so an older copy of any
of them is a different digest.

A restore replaces the state as one step: the new files are written and
synced in a staging directory beside ``tpm2`` (``tpm2.staged-*``), which is
then exchanged with ``tpm2`` by ``renameat2(RENAME_EXCHANGE)``; at every
instant ``tpm2`` is either the old state or the new one, never a mixture or
missing. Whatever is left in a staging directory after a crash is swept.

Imported by the hook: the standard library and ``core.vtpm.ledger`` only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from pathlib import Path

from ..core.vtpm.ledger import state_digest_of
from .files import fsync_dir, write_synced
from ..errors import TrustError

TPM2_DIR = "tpm2"
STAGED_PREFIX = "tpm2.staged-"
_IGNORED = {".lock"}
_RENAME_EXCHANGE = 2
_MAX_STATE_FILE = 64 * 1024 * 1024


def tpm2_dir(instance_dir: Path) -> Path:
    return instance_dir / TPM2_DIR


class UnsafeState(TrustError):
    """The state directory holds something swtpm never writes (a link, a directory, a device)."""


def read_state(instance_dir: Path) -> dict[str, bytes] | None:
    """The state files {name: content}; None when there is no state.

    swtpm runs as the swtpm user, who owns this directory, and writes only
    regular files there: only those are read, never through a link (root
    following a planted link would carry another file into the ledger, a
    backup, a restore). Anything else is left out, so a state file replaced
    by a link is missing from the digest, which then differs from the ledger.
    """
    try:
        entries = sorted(os.scandir(tpm2_dir(instance_dir)), key=lambda e: e.name)
    except FileNotFoundError:
        return None
    files = {}
    for entry in entries:
        if entry.name in _IGNORED:
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UnsafeState(f"{entry.path} is not a regular file; a vTPM state holds only files")
            files[entry.name] = f.read(_MAX_STATE_FILE + 1)
        if len(files[entry.name]) > _MAX_STATE_FILE:
            raise UnsafeState(f"{entry.path} is larger than a vTPM state file can be")
    return files or None


def state_digest(instance_dir: Path) -> str | None:
    """sha256 over the sorted (name, sha256(content)) of the state files; None without state."""
    files = read_state(instance_dir)
    return state_digest_of(files) if files else None


def stage_state(instance_dir: Path, files: dict[str, bytes], owner: str, tag: str) -> Path:
    """Write FILES, synced, into a fresh staging directory beside tpm2, owned like tpm2 is."""
    staged = instance_dir / f"{STAGED_PREFIX}{tag}"
    os.mkdir(staged, 0o700)
    for name, content in files.items():
        fd = os.open(staged / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            write_synced(fd, content)
        finally:
            os.close(fd)
    hand_over(staged, owner)
    fsync_dir(staged)
    fsync_dir(instance_dir)
    return staged


def exchange(instance_dir: Path, staged: Path) -> None:
    """Swap STAGED and tpm2 atomically; afterwards STAGED holds the old state."""
    import ctypes  # not at the top: the hook imports this module and never exchanges
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(staged), at_fdcwd, os.fsencode(tpm2_dir(instance_dir)),
                      _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {staged}: {os.strerror(err)}")
    fsync_dir(instance_dir)


def sweep_staged(instance_dir: Path) -> list[Path]:
    """Remove staging directories a crash left behind; returns what was removed."""
    try:
        leftovers = [p for p in instance_dir.iterdir() if p.name.startswith(STAGED_PREFIX) and p.is_dir()]
    except FileNotFoundError:
        return []
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def hand_over(path: Path, owner: str) -> None:
    """chown PATH and the files in it to OWNER, when we are root and OWNER exists (libvirt runs swtpm as it)."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(owner)
    except KeyError:
        return
    for item in [path, *path.iterdir()]:
        os.chown(item, user.pw_uid, user.pw_gid, follow_symlinks=False)
