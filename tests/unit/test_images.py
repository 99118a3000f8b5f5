"""Pure image inspection: qcow2 headers, tables and raw probing, on crafted bytes."""

from __future__ import annotations

import struct

import pytest

from tvorch.core.launch.images import (
    ImageChain,
    ImageFormat,
    ImageLayer,
    check_qcow2_l2_table,
    RAW_PROBE_BYTES,
    check_qcow2_layout,
    check_raw_disk,
    parse_qcow2_header,
    qcow2_header_bytes_needed,
    resolve_backing_path,
)
from tvorch.errors import ExitCode, ImageError

C = 1 << 16  # the cluster size the crafted images use
COMPRESSED = 1 << 62


def ext(kind: int, body: bytes) -> bytes:
    return struct.pack(">II", kind, len(body)) + body + b"\0" * (-len(body) % 8)


def qcow2(
    *,
    version: int = 3,
    cluster_bits: int = 16,
    size: int = 1 << 30,
    backing: bytes | None = None,
    backing_fmt: bytes | None = None,
    crypt: int = 0,
    l1_size: int = 2,
    incompat: int = 0,
    header_length: int | None = None,
    extensions: bytes = b"",
    backing_offset: int | None = None,
    total: int = 4096,
) -> bytes:
    """A header as QEMU lays it out: fields, extensions, end marker, backing name."""
    hlen = header_length if header_length is not None else (72 if version == 2 else 112)
    cs = 1 << cluster_bits if 9 <= cluster_bits <= 21 else C
    fields = struct.pack(
        ">4sIQIIQIIQQIIQ", b"QFI\xfb", version, 0, 0, cluster_bits, size, crypt, l1_size, 3 * cs, cs, 1, 0, 0
    )
    if version == 3:
        fields += struct.pack(">QQQII", incompat, 0, 0, 4, hlen)
    fields = fields.ljust(hlen, b"\0")
    exts = (ext(0xE2792ACA, backing_fmt) if backing_fmt else b"") + extensions + b"\0" * 8
    data = bytearray((fields + exts).ljust(total, b"\0"))
    if backing is not None:
        off = backing_offset if backing_offset is not None else len(fields) + len(exts)
        struct.pack_into(">QI", data, 8, off, len(backing))
        data[off : off + len(backing)] = backing[: max(0, total - off)]
    return bytes(data)


def refused(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match) as info:
        parse_qcow2_header(data)
    assert "\n" not in str(info.value)
    assert info.value.exit_code is ExitCode.IMAGE_REFUSED


def test_parses_v3_header_with_backing_file_and_format():
    h = parse_qcow2_header(qcow2(backing=b"../base.raw", backing_fmt=b"raw", incompat=1))
    assert (h.version, h.cluster_size, h.virtual_size, h.header_length) == (3, C, 1 << 30, 112)
    assert (h.backing_file, h.backing_format) == ("../base.raw", "raw")
    assert (h.l1_table_offset, h.l1_size, h.refcount_table_offset, h.refcount_table_clusters) == (3 * C, 2, C, 1)
    assert h.dirty and h.incompatible_features == 1


def test_parses_v2_header_after_72_bytes():
    h = parse_qcow2_header(qcow2(version=2, backing=b"/img/base.qcow2", backing_fmt=b"qcow2"))
    assert (h.version, h.header_length, h.incompatible_features) == (2, 72, 0)
    assert (h.backing_file, h.backing_format) == ("/img/base.qcow2", "qcow2")


def test_no_backing_file_and_extended_l2_entry_size():
    h = parse_qcow2_header(qcow2(incompat=1 << 4, size=1 << 29))
    assert h.backing_file is None and h.backing_format is None
    assert (h.l2_entry_size, h.l2_entries) == (16, C // 16)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"QFI\xfa" + bytes(200), "bad magic"),
        (qcow2()[:60], "truncated qcow2 header"),
        (qcow2()[:90], "truncated qcow2 v3 header"),
        (qcow2(header_length=200)[:150], "truncated qcow2 header"),
        (qcow2(header_length=96), "header_length 96"),
        (qcow2(version=4), "unsupported qcow2 version 4"),
        (qcow2(version=1), "unsupported qcow2 version 1"),
        (qcow2(cluster_bits=8), "cluster_bits 8 outside 9..21"),
        (qcow2(cluster_bits=22), "cluster_bits 22 outside 9..21"),
        (qcow2(crypt=1), "encrypted"),
        (qcow2(crypt=2), "encrypted"),
        (qcow2(incompat=1 << 1), "marked corrupt"),
        (qcow2(incompat=1 << 2), "external data file"),
        (qcow2(incompat=1 << 5), "unknown incompatible features 0x20"),
        (qcow2(incompat=1 << 3), "compression type disagrees"),
        (qcow2(l1_size=1, size=1 << 40), "L1 table of 1 entries is too small"),
        (qcow2(backing=b"base.img", backing_offset=4090), "backing file name .* outside the header bytes"),
        (qcow2(backing=b"b" * 1024), "too long"),
        (qcow2(backing=b"base\0.img"), "NUL"),
        (qcow2(extensions=struct.pack(">II", 0x6803F857, 1 << 20)), "extension 0x6803f857 is too large"),
        (qcow2(extensions=struct.pack(">II", 0x6803F857, 2000), total=1024), "extensions run past"),
        (qcow2(backing_fmt=b"q" * 16), "backing format extension of 16 bytes"),
    ],
)
def test_refuses_malformed_header(data, match):
    refused(data, match)


def test_header_bytes_needed_is_the_first_cluster():
    assert qcow2_header_bytes_needed(qcow2()) == 64 * 1024
    assert qcow2_header_bytes_needed(qcow2(cluster_bits=21)) == 2 * 1024 * 1024
    assert qcow2_header_bytes_needed(b"not qcow2") == 64 * 1024


# --- tables: a file of 6 clusters, L1 at 3C, one L2 table at 4C, data at 5C ---
def layout_header(l1_size: int = 2):
    return parse_qcow2_header(qcow2(l1_size=l1_size, size=(1 << 29) * l1_size))


def l1(*entries: int) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def l2(*entries: int, entry_size: int = 8) -> bytes:
    words = [w for e in entries for w in ((e, 0xFFFF_FFFF) if entry_size == 16 else (e,))]
    return struct.pack(f">{len(words)}Q", *words).ljust(C, b"\0")


def test_layout_accepts_tables_inside_the_file():
    check_qcow2_layout(layout_header(), 6 * C, l1(4 * C | 1 << 63, 0))


@pytest.mark.parametrize(
    ("file_size", "table", "match"),
    [
        (3 * C + 8, l1(0, 0)[:8], "L1 table .* past the end"),
        (6 * C, l1(0), "L1 table .* past the end"),
        (6 * C, l1(6 * C, 0), "L2 table at 0x60000 lies past the end"),
        (5 * C - 1, l1(4 * C, 0), "L2 table at 0x40000 lies past the end"),
        (6 * C, l1(4 * C + 512, 0), "not cluster-aligned"),
    ],
)
def test_layout_refuses_truncated_tables(file_size, table, match):
    with pytest.raises(ImageError, match=match):
        check_qcow2_layout(layout_header(), file_size, table)


def test_layout_refuses_refcount_table_past_the_end():
    with pytest.raises(ImageError, match="refcount table"):
        check_qcow2_layout(parse_qcow2_header(qcow2(l1_size=0, size=0)), C + 100, b"")


def test_l2_accepts_data_inside_the_file_and_unallocated_or_zero_entries():
    h = layout_header()
    # 5C: data; 0: unallocated; 1: zero cluster reading as zeros; a last cluster may be partly written.
    check_qcow2_l2_table(h, 5 * C + 1, l2(5 * C | 1 << 63, 0, 1, 5 * C | 1))


@pytest.mark.parametrize(
    ("entry", "match"),
    [(6 * C, "data cluster at 0x60000 lies past the end"), (5 * C + 512, "not cluster-aligned")],
)
def test_l2_refuses_standard_cluster_outside_the_file(entry, match):
    with pytest.raises(ImageError, match=match):
        check_qcow2_l2_table(layout_header(), 6 * C, l2(5 * C, entry))


def compressed(host: int, extra_sectors: int, cluster_bits: int = 16) -> int:
    x = 62 - (cluster_bits - 8)
    return COMPRESSED | extra_sectors << x | host


def test_l2_compressed_cluster_checks_host_offset_and_last_sector():
    h = layout_header()
    size = 5 * C + 1000  # data from 5C+100: 3 more sectors end in the sector at 5C+1536
    check_qcow2_l2_table(h, size, l2(compressed(5 * C + 100, 1)))
    with pytest.raises(ImageError, match="compressed cluster at 0x50064"):
        check_qcow2_l2_table(h, size, l2(compressed(5 * C + 100, 2)))
    with pytest.raises(ImageError, match="compressed cluster at 0x60000"):
        check_qcow2_l2_table(h, size, l2(compressed(6 * C, 0)))


def test_l2_extended_entries_ignore_the_subcluster_bitmap():
    h = parse_qcow2_header(qcow2(incompat=1 << 4, l1_size=2, size=1 << 29))
    check_qcow2_l2_table(h, 6 * C, l2(5 * C, 0, entry_size=16))
    with pytest.raises(ImageError, match="0x60000"):
        check_qcow2_l2_table(h, 6 * C, l2(5 * C, 6 * C, entry_size=16))


def test_l2_refuses_a_short_table():
    with pytest.raises(ImageError, match="L2 table is 100 bytes"):
        check_qcow2_l2_table(layout_header(), 6 * C, bytes(100))


# --- raw probing ---
MBR = bytes(510) + b"\x55\xaa"
MiB = 1 << 20


def at(offset: int, data: bytes, total: int = RAW_PROBE_BYTES) -> bytes:
    """DATA at OFFSET in an otherwise zero file head."""
    head = bytearray(max(total, offset + len(data)))
    head[offset : offset + len(data)] = data
    return bytes(head)


# Superblocks laid out as mkfs.ext4, mkfs.xfs, mkfs.btrfs, mksquashfs and mkfs.erofs
# (e2fsprogs 1.47, xfsprogs 6.1, btrfs-progs 6.2, squashfs-tools 4.5, erofs-utils 1.5) write them.
def ext_fs(*, magic=b"\x53\xef", inodes=1024, blocks=4096, log_block=0, rev=1, incompat=0, blocks_hi=0, offset=1024):
    sb = bytearray(1024)
    struct.pack_into("<II", sb, 0, inodes, blocks)
    struct.pack_into("<I", sb, 0x18, log_block)
    sb[0x38:0x3A] = magic
    struct.pack_into("<I", sb, 0x4C, rev)
    struct.pack_into("<I", sb, 0x60, incompat)
    struct.pack_into("<I", sb, 0x150, blocks_hi)
    return at(offset, bytes(sb))


def xfs(*, magic=b"XFSB", block_size=4096, blocks=1024, sector_size=512):
    sb = bytearray(512)
    sb[:4] = magic
    struct.pack_into(">IQ", sb, 4, block_size, blocks)
    struct.pack_into(">H", sb, 102, sector_size)
    return at(0, bytes(sb))


def btrfs(*, magic=b"_BHRfS_M", bytenr=0x10000, sector=4096, node=16384, size=120 * MiB, offset=0x10000):
    sb = bytearray(4096)
    struct.pack_into("<Q", sb, 0x30, bytenr)
    sb[0x40:0x48] = magic
    struct.pack_into("<II", sb, 0x90, sector, node)
    struct.pack_into("<Q", sb, 0xD1, size)
    return at(offset, bytes(sb))


def squashfs(*, magic=b"hsqs", block_size=1 << 17, block_log=17, major=4, used=221):
    sb = bytearray(96)
    sb[:4] = magic
    struct.pack_into("<I", sb, 12, block_size)
    struct.pack_into("<H", sb, 22, block_log)
    struct.pack_into("<H", sb, 28, major)
    struct.pack_into("<Q", sb, 40, used)
    return at(0, bytes(sb))


def erofs(*, magic=b"\xe2\xe1\xf5\xe0", block_bits=12, blocks=1, offset=1024):
    sb = bytearray(128)
    sb[:4] = magic
    sb[0x0C] = block_bits
    struct.pack_into("<I", sb, 0x24, blocks)
    return at(offset, bytes(sb))


@pytest.mark.parametrize(
    ("head", "size", "kind"),
    [
        (MBR, 1 << 20, "MBR"),
        (bytes(0x8001) + b"CD001", 1 << 20, "ISO 9660"),
        (MBR, 512, "MBR"),
        (ext_fs(), 4 * MiB, "ext2/3/4"),
        (ext_fs(log_block=2, blocks=1024), 4 * MiB, "ext2/3/4"),  # 4 KiB blocks
        (ext_fs(incompat=0x80, blocks=0, blocks_hi=1), 4 << 40, "ext2/3/4"),  # 64bit: 2**32 blocks
        (ext_fs(), 8 * MiB, "ext2/3/4"),  # a file longer than its file system is fine
        (xfs(), 4 * MiB, "XFS"),
        (btrfs(), 120 * MiB, "Btrfs"),
        (squashfs(), 4096, "squashfs"),  # mksquashfs pads to 4 KiB
        (erofs(), 4096, "EROFS"),
        (ext_fs()[:RAW_PROBE_BYTES] + MBR, 4 * MiB, "ext2/3/4"),  # a boot loader in the ext boot block
    ],
)
def test_raw_disk_kinds(head, size, kind):
    assert check_raw_disk(head, size) == kind


NOT_A_DISK = "not a disk image: no qcow2 header"


@pytest.mark.parametrize(
    ("head", "size", "match"),
    [
        (MBR, 1000, "1000 bytes is not a whole number of 512-byte sectors"),
        (ext_fs(), 4 * MiB + 1, "not a whole number of 512-byte sectors"),
        (MBR[:400], 400, "not a whole number"),
        (b"hello, world\n" * 100, 1536, NOT_A_DISK),
        (bytes(0x8000) + b"\x01CD002", 1 << 20, NOT_A_DISK),
        # near misses: a magic number in the wrong place, or with fields no driver accepts
        (ext_fs(offset=0), 4 * MiB, NOT_A_DISK),
        (ext_fs(magic=b"\xef\x53"), 4 * MiB, NOT_A_DISK),
        (ext_fs(log_block=7), 4 * MiB, NOT_A_DISK),
        (ext_fs(rev=2), 4 * MiB, NOT_A_DISK),
        (ext_fs(inodes=0), 4 * MiB, NOT_A_DISK),
        (ext_fs(blocks=0), 4 * MiB, NOT_A_DISK),
        (xfs(magic=b"xfsb"), 4 * MiB, NOT_A_DISK),
        (xfs(block_size=3000), 4 * MiB, NOT_A_DISK),
        (xfs(sector_size=0), 4 * MiB, NOT_A_DISK),
        (b"XFSB is the magic of XFS\n".ljust(4096, b" "), 4096, NOT_A_DISK),
        (btrfs(offset=0), 120 * MiB, NOT_A_DISK),
        (btrfs(bytenr=0x4000000), 120 * MiB, NOT_A_DISK),  # a backup copy, not the primary superblock
        (btrfs(sector=1000), 120 * MiB, NOT_A_DISK),
        (btrfs()[:0x10040], 120 * MiB, NOT_A_DISK),  # the head given ends before the magic
        (squashfs(major=3), 4096, NOT_A_DISK),
        (squashfs(magic=b"sqsh"), 4096, NOT_A_DISK),  # big-endian squashfs 3
        (squashfs(block_log=16), 4096, NOT_A_DISK),
        (b"hsqs, said the snake\n".ljust(4096, b" "), 4096, NOT_A_DISK),
        (erofs(block_bits=8), 4096, NOT_A_DISK),
        (erofs(offset=0), 4096, NOT_A_DISK),
        (erofs(blocks=0), 4096, NOT_A_DISK),
        # a file system cut short: the guest would read past the end
        (ext_fs(), 2 * MiB, "ext2/3/4 file system of 4194304 bytes is longer than the file \\(2097152 bytes\\): truncated"),
        (ext_fs(incompat=0x80, blocks_hi=1), 4 * MiB, "ext2/3/4 .* truncated"),
        (xfs(), 2 * MiB, "XFS .* truncated"),
        (btrfs(), 100 * MiB, "Btrfs .* truncated"),
        (squashfs(used=8192), 4096, "squashfs .* truncated"),
        (erofs(blocks=2), 4096, "EROFS .* truncated"),
        (ext_fs()[:RAW_PROBE_BYTES] + MBR, 2 * MiB, "truncated"),  # a boot signature does not excuse it
    ],
)
def test_raw_files_that_are_not_disks_are_refused(head, size, match):
    with pytest.raises(ImageError, match=match) as info:
        check_raw_disk(head, size)
    assert "\n" not in str(info.value)
    assert info.value.exit_code is ExitCode.IMAGE_REFUSED


# --- paths and chains ---
@pytest.mark.parametrize(
    ("image", "name", "expected"),
    [
        ("/img/vm/top.qcow2", "base.raw", "/img/vm/base.raw"),
        ("/img/vm/top.qcow2", "../base/./b.qcow2", "/img/base/b.qcow2"),
        ("/img/vm/top.qcow2", "/srv/b.qcow2", "/srv/b.qcow2"),
        ("/img/vm/top.qcow2", "dir/with:colon", "/img/vm/dir/with:colon"),
    ],
)
def test_resolve_backing_path(image, name, expected):
    assert resolve_backing_path(image, name) == expected


@pytest.mark.parametrize("name", ["nbd://host/export", "json:{}", "file:base.raw", ""])
def test_resolve_backing_path_refuses_protocols_and_empty_names(name):
    with pytest.raises(ImageError):
        resolve_backing_path("/img/top.qcow2", name)


def test_resolve_backing_path_wants_an_absolute_image_path():
    with pytest.raises(ValueError):
        resolve_backing_path("top.qcow2", "base.raw")


def test_chain_orders_base_first():
    base = ImageLayer("/b.raw", ImageFormat.RAW, 1 << 20, 1 << 20)
    top = ImageLayer("/t.qcow2", ImageFormat.QCOW2, 2 << 20, 1 << 18, backing="/b.raw", backing_format="raw")
    chain = ImageChain((base, top))
    assert (chain.base, chain.top, chain.virtual_size) == (base, top, 2 << 20)
    with pytest.raises(ValueError):
        ImageChain(())
