"""Image files: open a disk image and its backing chain, vet it, make overlays.

The reading side reads only what ``tvorch.core.launch.images`` needs and leaves the
judging to it. Per layer it reads the first 64 KiB (the whole first cluster
when a qcow2 image's clusters are larger, at most 2 MiB; 68 KiB of a raw
file, to reach a Btrfs superblock); for a qcow2 layer
also the active L1 table (``l1_size * 8`` bytes) and every L2 table that
table references (one cluster each), so an image cut short anywhere in its
tables or data is refused before a guest reads zeros from it.

Layer paths are the ones qemu will open: the top image's real path (the
overlay names it, so a later change of a symlink cannot swap the base), and
below it each backing name joined onto its naming image's directory.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from tvorch.core.launch.images import (
    QCOW2_HEADER_READ,
    QCOW2_MAGIC,
    RAW_PROBE_BYTES,
    ImageChain,
    ImageFormat,
    ImageLayer,
    Qcow2Header,
    backing_open_path,
    check_qcow2_l2_table,
    check_qcow2_layout,
    check_raw_disk,
    parse_qcow2_header,
    qcow2_header_bytes_needed,
    qcow2_l2_table_offsets,
    resolve_backing_path,
)
from tvorch.errors import ConflictError, HostError, ImageError, OperationTimeout

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT = 60.0

_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def inspect_image(path: str, max_depth: int = 16) -> ImageChain:
    """Open PATH and its backing files, refuse anything unsafe; return the chain base first.

    MAX_DEPTH is the most layers the chain may have, PATH included.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    top = os.path.abspath(path)
    _stat_regular(top, top, named_by=None)  # name a missing/odd top plainly, before realpath
    opened_as = os.path.realpath(top)
    name = opened_as
    named_by: str | None = None
    expected: str | None = None
    layers: list[ImageLayer] = []  # top first while walking
    seen: dict[tuple[int, int], str] = {}
    while True:
        if len(layers) >= max_depth:
            raise ImageError(f"backing chain of {top} is deeper than {max_depth} layers at {name}")
        layer, key, header = _read_layer(opened_as, name, named_by)
        if key in seen:
            same = "" if seen[key] == name else f" (as {seen[key]})"
            raise ImageError(f"backing chain of {top} loops: {name} is already in the chain{same}")
        seen[key] = name
        if expected is not None and layer.format.value != expected:
            raise ImageError(
                f"backing file {name} is {layer.format.value} but {named_by} says its format is {expected}"
            )
        if header is None or header.backing_file is None:
            layers.append(layer)
            break
        try:
            next_open = backing_open_path(opened_as, header.backing_file)
        except ImageError as err:
            raise ImageError(f"image {name}: {err}") from None
        next_name = resolve_backing_path(opened_as, header.backing_file)
        if header.backing_format is not None and header.backing_format not in {f.value for f in ImageFormat}:
            raise ImageError(f"image {name}: backing format {header.backing_format!r} is not supported")
        layers.append(dataclasses.replace(layer, backing=next_name, backing_format=header.backing_format))
        named_by, name, opened_as, expected = name, next_name, next_open, header.backing_format
    return ImageChain(layers=tuple(reversed(layers)))


def _describe(path: str, named_by: str | None) -> str:
    return f"backing file {path} of {named_by}" if named_by else f"image {path}"


def _stat_regular(opened_as: str, name: str, named_by: str | None) -> os.stat_result:
    """stat before open, so a FIFO or device is refused without ever being opened."""
    try:
        st = os.stat(opened_as)
    except OSError as err:
        raise _os_refusal(err, name, named_by) from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ImageError(f"{_describe(name, named_by)} is {kind}, not a regular file")
    return st


def _os_refusal(err: OSError, name: str, named_by: str | None) -> ImageError:
    what = _describe(name, named_by)
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageError(f"backing file {name} of {named_by} is missing" if named_by else f"no such image: {name}")
    if err.errno == errno.ELOOP:
        return ImageError(f"{what}: symlink loop")
    if err.errno in (errno.EACCES, errno.EPERM):
        return ImageError(f"{what}: permission denied")
    return ImageError(f"{what}: {err.strerror or err}")


def _read_layer(
    opened_as: str, name: str, named_by: str | None
) -> tuple[ImageLayer, tuple[int, int], Qcow2Header | None]:
    """Open one layer and vet it; return it (without backing), its (dev, ino) and qcow2 header."""
    st = _stat_regular(opened_as, name, named_by)
    if opened_as != name:
        # ".." after a symlinked directory: the kernel and normpath disagree.
        try:
            other: os.stat_result | None = os.stat(name)
        except OSError:
            other = None
        if other is None or (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
            raise ImageError(f"{_describe(opened_as, named_by)} leads through a symlink to a file other than {name}")
    try:
        fd = os.open(opened_as, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise _os_refusal(err, name, named_by) from None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise ImageError(f"{_describe(name, named_by)} changed while being inspected")
        size = fst.st_size
        try:
            layer, key, header = _vet_layer(fd, name, size, (fst.st_dev, fst.st_ino))
        except ImageError as err:
            raise ImageError(f"{_describe(name, named_by)}: {err}") from None
        except OSError as err:
            raise _os_refusal(err, name, named_by) from None
    finally:
        os.close(fd)
    # Who may write it, as opened: what launch and `image trust` judge (core.launch.images.layer_writers).
    layer = dataclasses.replace(layer, mode=stat.S_IMODE(fst.st_mode), uid=fst.st_uid, gid=fst.st_gid)
    return layer, key, header


def _vet_layer(
    fd: int, name: str, size: int, key: tuple[int, int]
) -> tuple[ImageLayer, tuple[int, int], Qcow2Header | None]:
    head = _pread(fd, QCOW2_HEADER_READ, 0)
    if head[:4] != QCOW2_MAGIC:
        if len(head) < min(size, RAW_PROBE_BYTES):
            head += _pread(fd, RAW_PROBE_BYTES - len(head), len(head))
        check_raw_disk(head, size)
        return ImageLayer(path=name, format=ImageFormat.RAW, virtual_size=size, file_size=size), key, None
    needed = qcow2_header_bytes_needed(head)
    if needed > len(head) and size > len(head):
        head = _pread(fd, needed, 0)
    header = parse_qcow2_header(head)
    l1_table = _pread(fd, header.l1_size * 8, header.l1_table_offset)
    check_qcow2_layout(header, size, l1_table)
    # Each distinct table once: a hostile L1 repeating one offset costs nothing extra.
    for offset in sorted(set(qcow2_l2_table_offsets(header, l1_table))):
        check_qcow2_l2_table(header, size, _pread(fd, header.cluster_size, offset))
    layer = ImageLayer(path=name, format=ImageFormat.QCOW2, virtual_size=header.virtual_size, file_size=size)
    return layer, key, header


def _pread(fd: int, count: int, offset: int) -> bytes:
    """Read up to COUNT bytes at OFFSET; fewer only at the end of the file."""
    chunks: list[bytes] = []
    while count > 0:
        chunk = os.pread(fd, count, offset)
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def create_overlay(chain: ImageChain, dest: str, timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """Create DEST, a 0600 qcow2 overlay backed by the chain's top, so the chain is never written.

    qemu-img writes into a private temporary file beside DEST, which is then
    hard-linked into place: DEST appears complete or not at all, and an
    existing DEST is never touched (ConflictError).
    """
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        raise ConflictError(f"overlay {dest} already exists")
    directory = os.path.dirname(dest)
    try:
        import tempfile  # here, not at import: the libvirt hook imports this module

        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise ImageError(f"cannot create overlay {dest}: {err.strerror or err}") from None
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        fd = -1
        _run_qemu_img(
            ["create", "-q", "-f", "qcow2", "-F", chain.top.format.value, "-b", chain.top.path, tmp],
            tmp,
            dest,
            timeout,
        )
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(fd)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise ConflictError(f"overlay {dest} already exists") from None
        except OSError as err:
            raise ImageError(f"cannot create overlay {dest}: {err.strerror or err}") from None
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _run_qemu_img(args: list[str], tmp: str, dest: str, timeout: float) -> None:
    import subprocess  # here, not at import: the libvirt hook imports this module

    try:
        proc = subprocess.run(
            [QEMU_IMG, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except FileNotFoundError:
        raise HostError(f"{QEMU_IMG} not found: install qemu-utils to create overlays") from None
    except subprocess.TimeoutExpired:
        raise OperationTimeout(f"{QEMU_IMG} did not create overlay {dest} within {timeout:g} s") from None
    if proc.returncode != 0:
        raise ImageError(f"cannot create overlay {dest}: {_qemu_img_reason(proc.stderr, tmp, dest, proc.returncode)}")


def _qemu_img_reason(stderr: str, tmp: str, dest: str, returncode: int) -> str:
    """qemu-img's last error line; hint lines it prints after the error carry no prefix."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{QEMU_IMG}: ")] or lines
    if not errors:
        return f"{QEMU_IMG} exit status {returncode}"
    reason = errors[-1].removeprefix(f"{QEMU_IMG}: ").removeprefix(f"{tmp}: ")
    return reason.replace(tmp, dest)


def remove_overlay(path: str) -> None:
    """Delete an instance's overlay; already gone is fine (removal is idempotent)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ImageError(f"cannot remove overlay {path}: {err.strerror or err}") from None


def file_identity(path: str) -> str:
    """"device:inode" of PATH: replacing a file by another (even a copy) changes it."""
    info = os.stat(path)
    return f"{info.st_dev}:{info.st_ino}"


def overlay_problem(path: str, identity: str | None, backing: str | None) -> str | None:
    """None when PATH is still the overlay tvorch created over BACKING, else why not."""
    try:
        if identity is not None and file_identity(path) != identity:
            return f"overlay {path} was replaced since launch"
        with open(path, "rb") as f:
            header = parse_qcow2_header(f.read(QCOW2_HEADER_READ))
    except OSError as err:
        return f"overlay {path}: {err.strerror}"
    except ImageError as err:
        return f"overlay {path}: {err}"
    if backing is not None and header.backing_file != backing:
        return f"overlay {path} now backs onto {header.backing_file!r}, not {backing}"
    return None
