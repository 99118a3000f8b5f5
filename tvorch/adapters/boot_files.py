"""Direct-boot kernels and initrds, kept where no QEMU can write them.

libvirt hands a direct-boot kernel and initrd to the qemu user for the whole run
(DAC relabelling; there is no per-file `relabel='no'` for them), so any QEMU on the
node could rewrite the files another instance boots. tvorch therefore boots copies:
content-addressed files in `state_dir/boot-files` (root's), shown to QEMU through a
read-only bind mount at `boot_files_dir`. libvirt's chown there fails with EROFS,
which libvirt tolerates, so the files stay root's and unwritable at every moment.

The mount does not survive a reboot; launch and the hook's start gate re-make it
whenever it is missing or stale (pointing at a directory that was replaced).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from pathlib import Path

from tvorch.adapters.files import ensure_private_dir, fsync_dir
from tvorch.errors import HostError, TrustError

MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
MNT_DETACH = 2
# A staged file no instance names is removed only this long after it was last staged: a launch
# in flight has staged its files but not yet recorded the domain that names them.
PRUNE_GRACE_S = 3600
_CHUNK = 1 << 20


def source_dir(state_dir: str) -> Path:
    return Path(state_dir) / "boot-files"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)  # glibc: find_library would run ldconfig in the hook


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _mount_count(view: str) -> int:
    """How many mounts are stacked at VIEW (os.path.ismount misses a bind mount within one filesystem)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
            return sum(1 for line in lines if len(f := line.split(" ")) > 4 and _unescape(f[4]) == view)
    except OSError:
        return 0


def _view_ok(source: Path, view: Path) -> bool:
    try:
        src, seen = os.stat(source), os.stat(view)
    except OSError:
        return False
    same = (src.st_dev, src.st_ino) == (seen.st_dev, seen.st_ino)
    return same and bool(os.statvfs(view).f_flag & os.ST_RDONLY)


def ensure_view(state_dir: str, view_dir: str) -> None:
    """Make VIEW_DIR a read-only bind mount of the staged files, unless it is one already."""
    source, view = source_dir(state_dir), Path(view_dir)
    if _view_ok(source, view):
        return
    try:
        ensure_private_dir(Path(state_dir))
        source.mkdir(mode=0o755, exist_ok=True)
        os.chmod(source, 0o755)  # QEMU reads through the view, whose root is this directory
        view.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise HostError(f"cannot keep direct-boot files read-only: {err.filename}: {err.strerror}") from err
    libc = _libc()
    # A stale view (its directory was removed and made again) or one remounted writable: take it down.
    for _ in range(_mount_count(str(view))):
        if libc.umount2(str(view).encode(), MNT_DETACH) != 0:
            break
    for target, flags, what in ((str(source), MS_BIND, "bind-mount"),
                                (None, MS_REMOUNT | MS_BIND | MS_RDONLY, "make read-only")):
        src = target.encode() if target is not None else None
        if libc.mount(src, str(view).encode(), None, flags, None) != 0:
            code = ctypes.get_errno()
            raise HostError(f"cannot {what} {view} (boot_files_dir, the read-only view of {source}): "
                            f"{os.strerror(code)}; direct-boot instances need it")
    if not _view_ok(source, view):
        raise HostError(f"{view} (boot_files_dir) is still not a read-only view of {source}")


def stage(state_dir: str, view_dir: str, path: str, digest: str) -> str:
    """Copy PATH (measured as DIGEST) into the staged files; the path QEMU boots it from.

    The copy is hashed as it is written: a file changed since it was measured is refused."""
    source = source_dir(state_dir)
    ensure_view(state_dir, view_dir)
    target = source / digest
    if target.is_file():
        os.utime(target)  # staged again: not pruned while this launch is in flight
        return str(Path(view_dir) / digest)
    tmp = source / f".{digest}.{os.getpid()}.tmp"
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as out:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if sha.hexdigest() != digest:
            raise TrustError(f"launch refused: {path} changed while it was being launched "
                             f"(sha256 {sha.hexdigest()[:16]}…, measured {digest[:16]}…)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        fsync_dir(source)
    except OSError as err:
        raise HostError(f"cannot copy {path} to {source}: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return str(Path(view_dir) / digest)


def prune(state_dir: str, view_dir: str, named: set[str]) -> list[str]:
    """Remove staged files that no domain in NAMED (paths under VIEW_DIR) boots; the ones removed."""
    source, removed = source_dir(state_dir), list[str]()
    keep = {Path(p).name for p in named if Path(p).parent == Path(view_dir)}
    try:
        entries = list(os.scandir(source))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if entry.name in keep or entry.name.startswith("."):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < PRUNE_GRACE_S:
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            continue
    return removed
