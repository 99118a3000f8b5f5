"""Disk image inspection on bytes: qcow2 headers and tables, raw disk probing.

Pure: the adapter (``tvorch.adapters.imagefiles``) reads the bytes named here
and passes them in; nothing in this module touches a file. Every refusal is an
``ImageError`` whose message says what is wrong in one line; the adapter adds
the path.

The checks follow the qcow2 specification (``docs/interop/qcow2.txt`` in QEMU)
and refuse what QEMU itself would refuse at open, plus what would make the
measured image differ from what the guest reads: encryption, an external data
file, a ``corrupt`` mark, and a file cut short (tables or data clusters past
the end of the file).
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass
from enum import Enum

from tvorch.errors import ImageError

QCOW2_MAGIC = b"QFI\xfb"

# How many leading bytes the adapter reads first. For qcow2 that covers the
# header, its extensions and the backing file name in every image QEMU
# writes; when the first cluster is larger, ``qcow2_header_bytes_needed`` asks
# for the whole first cluster (QEMU keeps all of these inside it).
QCOW2_HEADER_READ = 64 * 1024
# What ``check_raw_disk`` looks at: the MBR signature (offset 510), the ISO
# 9660 volume descriptor id (0x8001) and file system superblocks, the last of
# which is Btrfs's 4 KiB one at 64 KiB.
RAW_PROBE_BYTES = 68 * 1024

_V2_HEADER_LENGTH = 72
_V3_MIN_HEADER_LENGTH = 104
_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21
_MAX_BACKING_NAME = 1023  # QEMU refuses longer names
_MAX_BACKING_FORMAT = 15  # QEMU's backing_format buffer is 16 bytes with NUL
_MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
_MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE

_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

_COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

# L1 entry bits 9-55: L2 table offset. L2 entry bits 9-55: host cluster offset
# (standard clusters); bit 62 marks a compressed cluster.
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2_COMPRESSED = 1 << 62


class ImageFormat(str, Enum):
    QCOW2 = "qcow2"
    RAW = "raw"


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a qcow2 header that decide what the guest reads."""

    version: int
    cluster_bits: int
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    l1_table_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    incompatible_features: int
    header_length: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def dirty(self) -> bool:
        """Lazy refcounts left unflushed: QEMU repairs this, reading is safe."""
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 16 with extended L2 (entry + subcluster bitmap)."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def qcow2_header_bytes_needed(prefix: bytes) -> int:
    """How many leading bytes ``parse_qcow2_header`` should get: the first cluster.

    QEMU keeps the header, its extensions and the backing file name inside
    the first cluster. PREFIX needs only the first 24 bytes; when it is not a
    plausible qcow2 start this returns ``QCOW2_HEADER_READ`` and lets the
    parser refuse it.
    """
    if len(prefix) < 24 or prefix[:4] != QCOW2_MAGIC:
        return QCOW2_HEADER_READ
    cluster_bits = _u32(prefix, 20)
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        return QCOW2_HEADER_READ
    return max(QCOW2_HEADER_READ, 1 << cluster_bits)


def parse_qcow2_header(data: bytes) -> Qcow2Header:
    """Parse and vet a qcow2 header from the file's first bytes.

    DATA is the file's first cluster (``qcow2_header_bytes_needed``; 64 KiB
    is enough for every image QEMU writes), or the whole file when shorter.
    Anything the header points to beyond DATA is refused, so giving too few
    bytes can only refuse an image, never accept a bad one.
    """
    if len(data) < 4 or data[:4] != QCOW2_MAGIC:
        raise ImageError("not a qcow2 image: bad magic")
    if len(data) < 8:
        raise ImageError(f"truncated qcow2 header: {len(data)} bytes")
    version = _u32(data, 4)
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    if len(data) < _V2_HEADER_LENGTH:
        raise ImageError(f"truncated qcow2 header: {len(data)} bytes, need {_V2_HEADER_LENGTH}")

    backing_file_offset = _u64(data, 8)
    backing_file_size = _u32(data, 16)
    cluster_bits = _u32(data, 20)
    virtual_size = _u64(data, 24)
    crypt_method = _u32(data, 32)
    l1_size = _u32(data, 36)
    l1_table_offset = _u64(data, 40)
    refcount_table_offset = _u64(data, 48)
    refcount_table_clusters = _u32(data, 56)
    nb_snapshots = _u32(data, 60)
    snapshots_offset = _u64(data, 64)

    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise ImageError(f"qcow2 cluster_bits {cluster_bits} outside {_MIN_CLUSTER_BITS}..{_MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise ImageError(f"encrypted qcow2 image (crypt_method {crypt_method}) is not supported")

    incompatible = 0
    compression_type = 0
    header_length = _V2_HEADER_LENGTH
    if version == 3:
        if len(data) < _V3_MIN_HEADER_LENGTH:
            raise ImageError(f"truncated qcow2 v3 header: {len(data)} bytes, need {_V3_MIN_HEADER_LENGTH}")
        incompatible = _u64(data, 72)
        refcount_order = _u32(data, 96)
        header_length = _u32(data, 100)
        if header_length < _V3_MIN_HEADER_LENGTH:
            raise ImageError(f"qcow2 header_length {header_length} is below {_V3_MIN_HEADER_LENGTH}")
        if header_length > cluster_size:
            raise ImageError(f"qcow2 header_length {header_length} exceeds the cluster size {cluster_size}")
        if header_length > len(data):
            raise ImageError(f"truncated qcow2 header: header_length {header_length}, {len(data)} bytes given")
        if refcount_order > 6:
            raise ImageError(f"qcow2 refcount_order {refcount_order} is above 6")
        _check_incompatible(incompatible)
        if header_length > _V3_MIN_HEADER_LENGTH:
            compression_type = data[104]
        _check_compression(compression_type, incompatible)

    if l1_size * 8 > _MAX_L1_BYTES:
        raise ImageError(f"qcow2 L1 table of {l1_size} entries is too large")
    l2_entries = cluster_size // (16 if incompatible & INCOMPAT_EXTL2 else 8)
    l1_needed = -(-virtual_size // (l2_entries * cluster_size))
    if l1_size < l1_needed:
        raise ImageError(f"qcow2 L1 table of {l1_size} entries is too small for a virtual size of {virtual_size}")
    if refcount_table_clusters == 0 or refcount_table_clusters * cluster_size > _MAX_REFTABLE_BYTES:
        raise ImageError(f"qcow2 refcount table of {refcount_table_clusters} clusters is invalid")
    for name, offset in (("L1 table", l1_table_offset), ("refcount table", refcount_table_offset)):
        if offset == 0 or offset % cluster_size:
            raise ImageError(f"qcow2 {name} offset {offset:#x} is not a non-zero multiple of the cluster size")

    backing_file = _backing_name(data, backing_file_offset, backing_file_size, cluster_size)
    ext_end = min(backing_file_offset or cluster_size, cluster_size)
    backing_format = _backing_format(data, header_length, ext_end)

    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=virtual_size,
        backing_file=backing_file,
        backing_format=backing_format,
        l1_table_offset=l1_table_offset,
        l1_size=l1_size,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        incompatible_features=incompatible,
        header_length=header_length,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        compression_type=compression_type,
    )


def _check_incompatible(bits: int) -> None:
    """Refuse features that change what is read, or that QEMU would refuse."""
    if bits & INCOMPAT_CORRUPT:
        raise ImageError("qcow2 image is marked corrupt")
    if bits & INCOMPAT_DATA_FILE:
        raise ImageError("qcow2 image keeps its data in an external data file, which is not supported")
    unknown = bits & ~_INCOMPAT_KNOWN
    if unknown:
        raise ImageError(f"qcow2 image has unknown incompatible features {unknown:#x}")


def _check_compression(compression_type: int, incompatible: int) -> None:
    if compression_type not in _COMPRESSION_TYPES:
        raise ImageError(f"qcow2 image has unknown compression type {compression_type}")
    if bool(compression_type) != bool(incompatible & INCOMPAT_COMPRESSION):
        raise ImageError("qcow2 compression type disagrees with its incompatible feature bit")


def _backing_name(data: bytes, offset: int, size: int, cluster_size: int) -> str | None:
    if offset == 0 or size == 0:
        return None
    if size > _MAX_BACKING_NAME:
        raise ImageError(f"qcow2 backing file name of {size} bytes is too long")
    end = offset + size
    if end > min(len(data), cluster_size):
        raise ImageError(f"qcow2 backing file name at {offset:#x}+{size} lies outside the header bytes given")
    raw = data[offset:end]
    if b"\0" in raw:
        raise ImageError("qcow2 backing file name contains a NUL byte")
    # surrogateescape: a non-UTF-8 name still round-trips to the same bytes.
    return raw.decode("utf-8", "surrogateescape")


def _backing_format(data: bytes, start: int, ext_end: int) -> str | None:
    """Walk the header extensions; return the backing format name if present."""
    limit = min(ext_end, len(data))
    offset = start
    fmt: str | None = None
    while offset < ext_end:
        if offset + 8 > limit:
            raise ImageError("truncated qcow2 header: extensions run past the bytes given")
        ext_type, ext_len = struct.unpack_from(">II", data, offset)
        if ext_type == _EXT_END:
            return fmt
        body = offset + 8
        if body + ext_len > ext_end:
            raise ImageError(f"qcow2 header extension {ext_type:#x} is too large")
        if body + ext_len > limit:
            raise ImageError("truncated qcow2 header: extensions run past the bytes given")
        if ext_type == _EXT_BACKING_FORMAT:
            if ext_len > _MAX_BACKING_FORMAT:
                raise ImageError(f"qcow2 backing format extension of {ext_len} bytes is too long")
            try:
                fmt = data[body : body + ext_len].decode("ascii")
            except UnicodeDecodeError:
                raise ImageError("qcow2 backing format is not ASCII") from None
        offset = body + ((ext_len + 7) & ~7)
    return fmt


def qcow2_l2_table_offsets(header: Qcow2Header, l1_table: bytes) -> tuple[int, ...]:
    """Offsets of the L2 tables the active L1 table references (unallocated skipped)."""
    count = min(header.l1_size, len(l1_table) // 8)
    entries = struct.unpack_from(f">{count}Q", l1_table)
    return tuple(e & _OFFSET_MASK for e in entries if e & _OFFSET_MASK)


def check_qcow2_layout(header: Qcow2Header, file_size: int, l1_table: bytes) -> None:
    """Refuse a qcow2 file whose metadata tables lie past its end (truncated).

    L1_TABLE is what the file holds at ``l1_table_offset`` for ``l1_size * 8``
    bytes (shorter if the file ends first). Only the active L1 table is
    checked; internal snapshots' tables are not what the guest reads.
    """
    reftable_end = header.refcount_table_offset + header.refcount_table_clusters * header.cluster_size
    if reftable_end > file_size:
        raise ImageError(
            f"qcow2 refcount table at {header.refcount_table_offset:#x} ends past the end of the file "
            f"({file_size} bytes): truncated"
        )
    l1_bytes = header.l1_size * 8
    if header.l1_table_offset + l1_bytes > file_size or len(l1_table) < l1_bytes:
        raise ImageError(
            f"qcow2 L1 table at {header.l1_table_offset:#x}+{l1_bytes} lies past the end of the file "
            f"({file_size} bytes): truncated"
        )
    if header.nb_snapshots and header.snapshots_offset >= file_size:
        raise ImageError(f"qcow2 snapshot table at {header.snapshots_offset:#x} lies past the end of the file")
    for offset in qcow2_l2_table_offsets(header, l1_table):
        if offset % header.cluster_size:
            raise ImageError(f"qcow2 L2 table offset {offset:#x} is not cluster-aligned")
        if offset + header.cluster_size > file_size:
            raise ImageError(
                f"qcow2 L2 table at {offset:#x} lies past the end of the file ({file_size} bytes): truncated"
            )


def check_qcow2_l2_table(header: Qcow2Header, file_size: int, l2_table: bytes) -> None:
    """Refuse an L2 table that maps guest data past the end of the file.

    Like ``qemu-img check``, a standard cluster may be the file's last,
    partly written cluster: it must start inside the file. A compressed
    cluster's data (bits 0..x-1 host offset, x..61 additional 512-byte
    sectors, x = 62 - (cluster_bits - 8)) must start, and have its last
    sector start, inside the file; QEMU writes exactly that far.
    """
    if len(l2_table) != header.cluster_size:
        raise ImageError(
            f"qcow2 L2 table is {len(l2_table)} bytes, expected {header.cluster_size}: truncated"
        )
    step = header.l2_entry_size // 8
    entries = struct.unpack(f">{len(l2_table) // 8}Q", l2_table)[::step]
    cluster_mask = header.cluster_size - 1
    x = 62 - (header.cluster_bits - 8)
    host_mask = (1 << x) - 1
    sectors_mask = (1 << (header.cluster_bits - 8)) - 1
    for entry in entries:
        if entry & _L2_COMPRESSED:
            host = entry & host_mask
            last_sector = (host & ~511) + ((entry >> x) & sectors_mask) * 512
            if host >= file_size or last_sector >= file_size:
                raise ImageError(
                    f"qcow2 compressed cluster at {host:#x} lies past the end of the file ({file_size} bytes): "
                    "truncated"
                )
            continue
        offset = entry & _OFFSET_MASK
        if not offset:
            continue
        if offset & cluster_mask:
            raise ImageError(f"qcow2 data cluster offset {offset:#x} is not cluster-aligned")
        if offset >= file_size:
            raise ImageError(
                f"qcow2 data cluster at {offset:#x} lies past the end of the file ({file_size} bytes): truncated"
            )


@dataclass(frozen=True)
class RawFilesystem:
    """A file system whose superblock starts a raw image (no partition table)."""

    name: str
    size: int  # bytes the superblock says the file system spans


def _is_pow2(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def _ext(head: bytes) -> RawFilesystem | None:
    """ext2/3/4: superblock at 1024, s_magic 0xEF53 (LE) at +0x38."""
    sb = head[1024:2048]
    if len(sb) < 1024 or sb[0x38:0x3A] != b"\x53\xef":
        return None
    inodes, blocks_lo, log_block = struct.unpack_from("<II16xI", sb, 0)
    rev_level = struct.unpack_from("<I", sb, 0x4C)[0]
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    if inodes == 0 or log_block > 6 or rev_level > 1:  # 1 KiB..64 KiB blocks, revisions 0 and 1
        return None
    blocks = blocks_lo | (struct.unpack_from("<I", sb, 0x150)[0] << 32 if incompat & 0x80 else 0)  # 64bit
    return RawFilesystem("ext2/3/4", blocks * (1024 << log_block)) if blocks else None


def _xfs(head: bytes) -> RawFilesystem | None:
    """XFS: superblock at 0, magic 'XFSB', big-endian."""
    if len(head) < 512 or head[:4] != b"XFSB":
        return None
    block_size, data_blocks = struct.unpack_from(">IQ", head, 4)
    sector_size = struct.unpack_from(">H", head, 102)[0]
    if not (_is_pow2(block_size, 512, 65536) and _is_pow2(sector_size, 512, 32768)) or not data_blocks:
        return None
    return RawFilesystem("XFS", data_blocks * block_size)


_BTRFS_SUPER = 0x10000


def _btrfs(head: bytes) -> RawFilesystem | None:
    """Btrfs: superblock at 64 KiB, magic '_BHRfS_M' at +0x40; it names its own offset at +0x30."""
    sb = head[_BTRFS_SUPER : _BTRFS_SUPER + 4096]
    if len(sb) < 0x100 or sb[0x40:0x48] != b"_BHRfS_M":
        return None
    bytenr = struct.unpack_from("<Q", sb, 0x30)[0]
    sector_size, node_size = struct.unpack_from("<II", sb, 0x90)
    device_bytes = struct.unpack_from("<Q", sb, 0xD1)[0]  # dev_item.total_bytes: this device's size
    if bytenr != _BTRFS_SUPER or not _is_pow2(sector_size, 4096, 65536) or not _is_pow2(node_size, 4096, 65536):
        return None
    return RawFilesystem("Btrfs", device_bytes) if device_bytes else None


def _squashfs(head: bytes) -> RawFilesystem | None:
    """squashfs 4: superblock at 0, magic 'hsqs' (little-endian; v4 is the only one Linux reads)."""
    if len(head) < 96 or head[:4] != b"hsqs":
        return None
    block_size = struct.unpack_from("<I", head, 12)[0]
    block_log, = struct.unpack_from("<H", head, 22)
    major, = struct.unpack_from("<H", head, 28)
    bytes_used, = struct.unpack_from("<Q", head, 40)
    if major != 4 or not _is_pow2(block_size, 4096, 1 << 20) or block_size != 1 << block_log or not bytes_used:
        return None
    return RawFilesystem("squashfs", bytes_used)


def _erofs(head: bytes) -> RawFilesystem | None:
    """EROFS: superblock at 1024, magic 0xE0F5E1E2 (LE)."""
    sb = head[1024:1152]
    if len(sb) < 128 or sb[:4] != b"\xe2\xe1\xf5\xe0":
        return None
    block_bits = sb[0x0C]
    blocks, = struct.unpack_from("<I", sb, 0x24)
    if not 9 <= block_bits <= 16 or not blocks:
        return None
    return RawFilesystem("EROFS", blocks << block_bits)


_FILESYSTEMS = (_ext, _xfs, _btrfs, _squashfs, _erofs)


def raw_filesystem(head: bytes) -> RawFilesystem | None:
    """The file system whose superblock HEAD holds at its documented offset, if any.

    A magic number alone is not enough: the fields that say how the file
    system is laid out (block sizes, revision, its own offset) must be ones
    its kernel driver accepts, so a stray magic in text or noise is no disk.
    """
    for probe in _FILESYSTEMS:
        found = probe(head)
        if found is not None:
            return found
    return None


def check_raw_disk(head: bytes, file_size: int) -> str:
    """What a raw file holds, when it plausibly is a disk; ``ImageError`` when not.

    HEAD is the file's first ``RAW_PROBE_BYTES`` (68 KiB) or all of it when
    shorter. A disk is whole 512-byte sectors holding a file system without
    a partition table (ext2/3/4, XFS, Btrfs, squashfs, EROFS: for direct
    kernel boot, the kernel mounts it), or a partitioned or boot disk (the
    MBR signature 0x55AA at 510; GPT disks carry it in their protective MBR),
    or an ISO 9660 volume ('CD001' at 0x8001). A file system that claims to
    be longer than the file is refused as truncated. This keeps text files
    and random bytes from being booted as disks.
    """
    if file_size < 512 or file_size % 512:
        raise ImageError(f"not a disk image: {file_size} bytes is not a whole number of 512-byte sectors")
    found = raw_filesystem(head)
    if found is not None:
        if found.size > file_size:
            raise ImageError(
                f"{found.name} file system of {found.size} bytes is longer than the file ({file_size} bytes): "
                "truncated"
            )
        return found.name
    if head[510:512] == b"\x55\xaa":
        return "MBR"
    if head[0x8001:0x8006] == b"CD001":
        return "ISO 9660"
    raise ImageError(
        "not a disk image: no qcow2 header, MBR boot signature, ISO 9660 volume "
        "or ext2/3/4, XFS, Btrfs, squashfs or EROFS superblock"
    )


@dataclass(frozen=True)
class ImageLayer:
    """One file of a backing chain, as qemu will open it."""

    path: str
    format: ImageFormat
    virtual_size: int
    file_size: int
    backing: str | None = None
    backing_format: str | None = None
    # The file's permission bits and owner as opened (None: not known, nothing judged).
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


# How someone other than root can change a layer's bytes (``layer_writers``).
WORLD_WRITABLE = "world-writable"
OTHER_WRITER = "other-writer"
# policy.unsafe_image_files: what launch does about each kind (refuse or warn).
UNSAFE_IMAGE_POLICIES = {
    "refuse": frozenset({WORLD_WRITABLE, OTHER_WRITER}),
    "refuse-world-writable": frozenset({WORLD_WRITABLE}),
    "warn": frozenset(),
}


def layer_writers(layer: ImageLayer) -> tuple[tuple[str, str], ...]:
    """Who besides root can change LAYER's bytes, as (kind, "image layer PATH is ...") pairs.

    A base image is read by QEMU for as long as the guest runs, long after
    it was measured: whoever can write it changes what the guest reads. That
    is anyone for a world-writable file, its owner when that is not root
    (an owner can chmod), and a group other than root's when group-writable.
    """
    if layer.mode is None:
        return ()
    found: list[tuple[str, str]] = []
    if layer.mode & 0o002:
        found.append((WORLD_WRITABLE, f"image layer {layer.path} is world-writable (mode {layer.mode & 0o7777:04o})"))
    if layer.uid not in (None, 0):
        found.append((OTHER_WRITER, f"image layer {layer.path} is owned by uid {layer.uid}, not root"))
    elif layer.mode & 0o020 and layer.gid not in (None, 0):
        found.append((OTHER_WRITER, f"image layer {layer.path} is writable by group {layer.gid}"))
    return tuple(found)


def judge_layer_writers(chain: ImageChain, policy: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(refusals, warnings) for the chain's layers under ``policy.unsafe_image_files`` = POLICY."""
    refuse = UNSAFE_IMAGE_POLICIES[policy]
    found = [writer for layer in chain.layers for writer in layer_writers(layer)]
    return (tuple(text for kind, text in found if kind in refuse),
            tuple(text for kind, text in found if kind not in refuse))


@dataclass(frozen=True)
class ImageChain:
    """An image and its backing files, ordered base first, top last."""

    layers: tuple[ImageLayer, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("an image chain has at least one layer")

    @property
    def top(self) -> ImageLayer:
        return self.layers[-1]

    @property
    def base(self) -> ImageLayer:
        return self.layers[0]

    @property
    def virtual_size(self) -> int:
        """The guest sees the top layer's size, whatever its backing files say."""
        return self.top.virtual_size


def backing_open_path(image_path: str, backing_name: str) -> str:
    """The path qemu opens for BACKING_NAME: joined onto the image's directory, unnormalised.

    Refuses names qemu would read as a protocol ("nbd:...", "json:{...}"):
    a colon before the first slash makes qemu leave the local file system.
    """
    if not posixpath.isabs(image_path):
        raise ValueError(f"image path must be absolute: {image_path!r}")
    if not backing_name:
        raise ImageError("empty backing file name")
    if ":" in backing_name.split("/", 1)[0]:
        raise ImageError(f"backing file name {backing_name!r} names a protocol, not a file")
    return posixpath.join(posixpath.dirname(image_path), backing_name)


def resolve_backing_path(image_path: str, backing_name: str) -> str:
    """Absolute, normalised path of BACKING_NAME as named by IMAGE_PATH (like qemu).

    Relative names are relative to the naming image's directory. Lexical
    only: the adapter checks that symlinks do not make ".." lead elsewhere.
    """
    return posixpath.normpath(backing_open_path(image_path, backing_name))
