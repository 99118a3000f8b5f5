"""Image files on disk: real images made by qemu-img, refused or accepted."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tvorch.adapters.imagefiles import create_overlay, inspect_image, remove_overlay
from tvorch.core.launch.images import ImageFormat
from tvorch.errors import ConflictError, ImageError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")

MiB = 1 << 20


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def raw_disk(path: Path, size: int = MiB, fill: bool = False) -> Path:
    """A raw disk: an MBR boot signature, and non-zero bytes throughout when FILL."""
    data = bytearray(random.Random(7).randbytes(size) if fill else bytes(size))
    data[510:512] = b"\x55\xaa"
    path.write_bytes(data)
    return path


def qcow2(path: Path, backing: str | Path | None = None, fmt: str = "qcow2", unsafe: bool = False) -> Path:
    """A qcow2 image; UNSAFE writes the backing name without opening it (as for broken chains)."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-F", fmt, "-b", backing] + (["-u"] if unsafe else [])
    qemu_img(*args, path, *(["1M"] if unsafe or backing is None else []))
    return path


def refused(path: Path | str, match: str, **kwargs: int) -> str:
    with pytest.raises(ImageError, match=match) as info:
        inspect_image(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- good images ---
def test_raw_disk_is_one_raw_layer(tmp_path):
    chain = inspect_image(str(raw_disk(tmp_path / "d.raw")))
    assert [(l.format, l.virtual_size, l.file_size, l.backing) for l in chain.layers] == [
        (ImageFormat.RAW, MiB, MiB, None)
    ]


def test_iso_image_is_accepted_as_raw(tmp_path):
    iso = tmp_path / "cd.iso"
    iso.write_bytes(bytes(0x8001) + b"CD001" + bytes(0x8000 - 6 + 2048))
    assert inspect_image(str(iso)).top.format is ImageFormat.RAW


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)")
def test_ext4_file_system_without_partition_table_is_a_raw_disk(tmp_path):
    """A root file system for direct kernel boot; cut short, it is refused."""
    fs = tmp_path / "root.ext4"
    with open(fs, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", str(fs)], check=True)
    assert [(l.format, l.virtual_size) for l in inspect_image(str(fs)).layers] == [(ImageFormat.RAW, 8 * MiB)]
    with open(fs, "r+b") as f:
        f.truncate(4 * MiB)
    refused(fs, f"image {fs}: ext2/3/4 file system of {8 * MiB} bytes is longer than the file .*: truncated")


def test_three_layer_chain_is_base_first(tmp_path):
    base = raw_disk(tmp_path / "base.raw", 2 * MiB)
    mid = qcow2(tmp_path / "mid.qcow2", base, fmt="raw")
    top = qcow2(tmp_path / "top.qcow2", mid)
    chain = inspect_image(str(top))
    assert [l.path for l in chain.layers] == [str(base), str(mid), str(top)]
    assert [l.format for l in chain.layers] == [ImageFormat.RAW, ImageFormat.QCOW2, ImageFormat.QCOW2]
    assert [(l.backing, l.backing_format) for l in chain.layers] == [(None, None), (str(base), "raw"), (str(mid), "qcow2")]
    assert chain.virtual_size == 2 * MiB and chain.base.path == str(base)


def test_relative_backing_names_are_relative_to_the_naming_image(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "vm").mkdir()
    raw_disk(tmp_path / "base" / "b.raw")
    qcow2(tmp_path / "vm" / "top.qcow2", "../base/b.raw", fmt="raw", unsafe=True)
    chain = inspect_image(str(tmp_path / "vm" / "top.qcow2"))
    assert chain.base.path == str(tmp_path / "base" / "b.raw")
    assert chain.top.backing == chain.base.path


def test_top_given_through_a_symlink_is_recorded_by_its_real_path(tmp_path):
    disk = raw_disk(tmp_path / "d.raw")
    (tmp_path / "current").symlink_to(disk)
    assert inspect_image(str(tmp_path / "current")).top.path == str(disk)


def test_compressed_qcow2_with_a_partial_last_cluster_is_accepted(tmp_path):
    src = tmp_path / "t.raw"
    text = b"".join(b"block %08d " % i * 40 for i in range(4096))
    src.write_bytes(b"\0" * 510 + b"\x55\xaa" + text[: 2 * MiB - 512])
    qemu_img("convert", "-c", "-O", "qcow2", src, tmp_path / "c.qcow2")
    assert inspect_image(str(tmp_path / "c.qcow2")).top.virtual_size == 2 * MiB
    os.truncate(tmp_path / "c.qcow2", (tmp_path / "c.qcow2").stat().st_size - 700)
    refused(tmp_path / "c.qcow2", "compressed cluster .* past the end")


def test_backing_name_whose_dotdot_crosses_a_symlink_is_refused(tmp_path):
    """qemu opens vm/link/../b.raw, which the kernel resolves inside link's target, not vm/b.raw."""
    for d in ("vm", "elsewhere/sub"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "vm" / "link").symlink_to(tmp_path / "elsewhere" / "sub")
    raw_disk(tmp_path / "vm" / "b.raw")
    raw_disk(tmp_path / "elsewhere" / "b.raw")
    top = qcow2(tmp_path / "vm" / "top.qcow2", "link/../b.raw", fmt="raw", unsafe=True)
    refused(top, f"backing file {tmp_path / 'vm' / 'link' / '..' / 'b.raw'} of {top} leads through a symlink")


# --- refusals ---
def test_missing_image(tmp_path):
    assert refused(tmp_path / "nope.qcow2", "no such image") == f"no such image: {tmp_path / 'nope.qcow2'}"


def test_directory(tmp_path):
    refused(tmp_path, f"image {tmp_path} is a directory")


def test_text_file_is_not_a_disk_image(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes((b"these are not the sectors you are looking for\n" * 100)[:2048])
    refused(text, f"image {text}: not a disk image: no qcow2 header, MBR boot signature, ISO 9660 volume "
                  "or ext2/3/4, XFS, Btrfs, squashfs or EROFS superblock")
    text.write_bytes(b"#!/bin/sh\necho hi\n")
    refused(text, "not a disk image: 18 bytes is not a whole number of 512-byte sectors")


def test_random_bytes_are_not_a_disk_image(tmp_path):
    data = bytearray(random.Random(1).randbytes(MiB))
    data[510] = 0  # no accidental boot signature
    (tmp_path / "noise").write_bytes(data)
    refused(tmp_path / "noise", "not a disk image")


def test_truncated_qcow2(tmp_path):
    image = tmp_path / "d.qcow2"
    qemu_img("convert", "-O", "qcow2", raw_disk(tmp_path / "d.raw", 4 * MiB, fill=True), image)
    assert inspect_image(str(image)).top.format is ImageFormat.QCOW2
    os.truncate(image, image.stat().st_size // 2)
    refused(image, f"image {image}: qcow2 data cluster at .* past the end of the file .*truncated")


def test_truncated_qcow2_header(tmp_path):
    image = qcow2(tmp_path / "d.qcow2")
    os.truncate(image, 80)
    refused(image, "truncated qcow2 v3 header")


def test_missing_backing_file(tmp_path):
    top = qcow2(tmp_path / "top.qcow2", "gone.raw", fmt="raw", unsafe=True)
    refused(top, f"backing file {tmp_path / 'gone.raw'} of {top} is missing")


def test_backing_symlink_loop(tmp_path):
    (tmp_path / "l1").symlink_to("l2")
    (tmp_path / "l2").symlink_to("l1")
    refused(qcow2(tmp_path / "top.qcow2", "l1", fmt="raw", unsafe=True), f"backing file {tmp_path / 'l1'} .*symlink loop")


def test_backing_chain_loop(tmp_path):
    base = raw_disk(tmp_path / "base.raw")
    a = qcow2(tmp_path / "a.qcow2", base, fmt="raw")
    b = qcow2(tmp_path / "b.qcow2", a)
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", b, a)
    refused(b, f"backing chain of {b} loops: {b} is already in the chain")


def test_chain_deeper_than_max_depth(tmp_path):
    layer = raw_disk(tmp_path / "l0.raw")
    for i in range(1, 4):
        layer = qcow2(tmp_path / f"l{i}.qcow2", layer, fmt="raw" if i == 1 else "qcow2")
    assert len(inspect_image(str(layer), max_depth=4).layers) == 4
    refused(layer, f"deeper than 3 layers at {tmp_path / 'l0.raw'}", max_depth=3)


def test_fifo_as_backing_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    top = qcow2(tmp_path / "top.qcow2", "fifo", fmt="raw", unsafe=True)
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("inspect_image blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)  # a blocking open would hang here: fail instead
    try:
        refused(top, f"backing file {tmp_path / 'fifo'} of {top} is a FIFO, not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_device_as_image():
    refused("/dev/null", "image /dev/null is a character device, not a regular file")


def test_backing_format_that_disagrees_with_the_file(tmp_path):
    raw_disk(tmp_path / "base.raw")
    top = qcow2(tmp_path / "top.qcow2", "base.raw", fmt="qcow2", unsafe=True)
    refused(top, f"backing file {tmp_path / 'base.raw'} is raw but {top} says its format is qcow2")


def encrypted_qcow2(path: Path, how: str) -> Path:
    """qemu-img's LUKS PBKDF2 benchmark (~2 s) at times fails at once with
    "Unable to get accurate CPU usage" (a zero CPU-time delta here): retry that."""
    options = f"encrypt.format={how},encrypt.key-secret=sec0" + (",encrypt.iter-time=10" if how == "luks" else "")
    args = ["qemu-img", "create", "-q", "--object", "secret,id=sec0,data=abc", "-f", "qcow2", "-o", options]
    for _ in range(10):
        proc = subprocess.run([*args, str(path), "1M"], capture_output=True, text=True)
        if "accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.mark.parametrize("how", ["luks", "aes"])  # crypt_method 2 and 1
def test_encrypted_qcow2(tmp_path, how):
    image = encrypted_qcow2(tmp_path / "enc.qcow2", how)
    refused(image, f"image {image}: encrypted qcow2 image \\(crypt_method {2 if how == 'luks' else 1}\\)")


def as_nobody(func: Callable[[], str]) -> str:
    """Run FUNC in a forked child with uid/gid 65534 and no groups; return what it returns."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, func().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return result


def test_unreadable_image():
    """Root reads any file (CAP_DAC_OVERRIDE), so as root the check runs in a child as nobody.

    The image is root's, mode 0600, in a directory of its own that anyone may
    search (pytest's tmp_path sits under a 0700 directory): the child's open
    fails with a real EACCES, the error a non-root tvorch would meet.
    """
    with tempfile.TemporaryDirectory(prefix="tvorch-test-") as box:
        os.chmod(box, 0o711)
        image = raw_disk(Path(box) / "d.raw")
        expected = f"image {image}: permission denied"
        if os.geteuid() != 0:
            image.chmod(0o000)
            refused(image, expected)
            return
        image.chmod(0o600)

        def attempt() -> str:
            try:
                inspect_image(str(image))
            except ImageError as err:
                return str(err)
            return "accepted"

        assert as_nobody(attempt) == expected


# --- overlays ---
def test_create_overlay_backs_onto_the_chain_top(tmp_path):
    base = raw_disk(tmp_path / "base.raw", 2 * MiB, fill=True)
    top = qcow2(tmp_path / "top.qcow2", base, fmt="raw")
    chain = inspect_image(str(top))
    before = hashlib.sha256(top.read_bytes()).hexdigest(), hashlib.sha256(base.read_bytes()).hexdigest()
    overlay = tmp_path / "vm" / "disk.qcow2"
    overlay.parent.mkdir()
    create_overlay(chain, str(overlay))
    info = json.loads(qemu_img("info", "--output=json", overlay))
    assert (info["format"], info["backing-filename"], info["backing-filename-format"]) == ("qcow2", str(top), "qcow2")
    assert info["virtual-size"] == 2 * MiB
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600
    assert os.listdir(overlay.parent) == ["disk.qcow2"]  # no temporary file left behind
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 64k", str(overlay)], check=True, capture_output=True)
    after = hashlib.sha256(top.read_bytes()).hexdigest(), hashlib.sha256(base.read_bytes()).hexdigest()
    assert after == before
    assert [l.path for l in inspect_image(str(overlay)).layers] == [str(base), str(top), str(overlay)]


def test_create_overlay_refuses_an_existing_destination(tmp_path):
    chain = inspect_image(str(raw_disk(tmp_path / "base.raw")))
    dest = tmp_path / "disk.qcow2"
    dest.write_bytes(b"someone else's")
    with pytest.raises(ConflictError, match="already exists"):
        create_overlay(chain, str(dest))
    assert dest.read_bytes() == b"someone else's"


def test_create_overlay_failure_reports_qemu_img_and_leaves_nothing(tmp_path):
    base = raw_disk(tmp_path / "base.raw")
    chain = inspect_image(str(base))
    base.unlink()  # gone between inspection and creation
    (tmp_path / "vm").mkdir()
    dest = tmp_path / "vm" / "disk.qcow2"
    with pytest.raises(ImageError, match=f"cannot create overlay {dest}: Could not open '{base}': No such file or directory$"):
        create_overlay(chain, str(dest))
    assert os.listdir(tmp_path / "vm") == []


def test_remove_overlay_is_idempotent(tmp_path):
    overlay = raw_disk(tmp_path / "disk.qcow2")
    remove_overlay(str(overlay))
    assert not overlay.exists()
    remove_overlay(str(overlay))
