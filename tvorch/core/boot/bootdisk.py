"""A boot disk as UEFI sees it: the GPT, the EFI system partition, its FAT.

Pure: everything reads through a ``ByteSource`` (offset and length in, bytes
out), so a 2 GiB image costs the partition table, the FAT's directory and
table sectors it walks, and the clusters of the one file asked for. Every
structure is checked against what it claims before it is believed: CRCs of
the GPT, cluster numbers within the file system, chains without loops and
long enough for the file's size. A fault is an ImageError in one line.

Layouts: UEFI 2.10 chapter 5 (GPT), Microsoft's FAT specification
(FAT12/16/32, long file names), and for the event, the TCG PC Client Platform
Firmware Profile 1.05 (UEFI_GPT_DATA, as EDK2's Tcg2 measures it).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Protocol

from ...errors import ImageError

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_SIZE = 92  # sizeof(EFI_PARTITION_TABLE_HEADER): what EDK2 copies into the event
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
DEFAULT_BOOT_PATH = r"\EFI\BOOT\BOOTX64.EFI"
_MAX_ENTRIES = 1024  # far above any real table; keeps a hostile count from asking for gigabytes
MAX_DIRECTORY = 65536 * 32  # FAT allows 65536 entries in a directory
MAX_BOOT_FILE = 512 << 20  # a boot file larger than this is not read into memory


class ByteSource(Protocol):
    """Random access to a disk's (or a partition's) bytes; short reads only past the end."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class Slice:
    """The bytes of SOURCE from START for LENGTH: a partition as a ByteSource of its own."""

    def __init__(self, source: ByteSource, start: int, length: int) -> None:
        self._source, self._start, self._length = source, start, length

    @property
    def size(self) -> int:
        return self._length

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._length)
        if offset >= end:
            return b""
        return self._source.read(self._start + offset, end - offset)


def _exact(source: ByteSource, offset: int, length: int, what: str) -> bytes:
    data = source.read(offset, length)
    if len(data) != length:
        raise ImageError(f"{what} is cut short: {len(data)} of {length} bytes at byte {offset}")
    return data


# --- GPT ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    number: int  # 1-based index in the entry array, as UEFI's HD() device path counts
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    name: str

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def length(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR


@dataclass(frozen=True)
class Gpt:
    """A primary GPT and the UEFI_GPT_DATA that firmware measures for it."""

    disk_guid: uuid.UUID
    partitions: tuple[Partition, ...]  # the used entries, in array order
    event_data: bytes  # header (92 bytes), UINT64 count, the used entries as stored

    def esp(self) -> Partition:
        for p in self.partitions:
            if p.type_guid == ESP_TYPE:
                return p
        raise ImageError("the disk's GPT has no EFI system partition")


def parse_gpt(disk: ByteSource) -> Gpt:
    """The primary GPT at LBA 1, checked (signature, CRCs, entry bounds); ImageError otherwise."""
    header = disk.read(SECTOR, SECTOR)
    if len(header) < GPT_HEADER_SIZE or header[:8] != GPT_SIGNATURE:
        raise ImageError("the disk has no GPT (no 'EFI PART' header at LBA 1)")
    (header_size, header_crc, my_lba, first_usable, last_usable, entry_lba, count, entry_size,
     entries_crc) = struct.unpack_from("<I I 4x Q 8x Q Q 16x Q I I I", header, 12)
    if not GPT_HEADER_SIZE <= header_size <= SECTOR:
        raise ImageError(f"GPT header size {header_size} is not 92 to 512")
    check = bytearray(header[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != header_crc:
        raise ImageError("GPT header CRC does not match")
    if my_lba != 1:
        raise ImageError(f"GPT header at LBA 1 says it is at LBA {my_lba}")
    if not 128 <= entry_size <= 4096 or entry_size % 8 or count > _MAX_ENTRIES or entry_lba < 2:
        raise ImageError(f"GPT partition array of {count} entries of {entry_size} bytes at LBA {entry_lba} is not valid")
    array = _exact(disk, entry_lba * SECTOR, count * entry_size, "GPT partition array")
    if zlib.crc32(array) != entries_crc:
        raise ImageError("GPT partition array CRC does not match")
    used: list[bytes] = []
    partitions: list[Partition] = []
    for i in range(count):
        entry = array[i * entry_size:(i + 1) * entry_size]
        if not any(entry[:16]):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if not first_usable <= first <= last <= last_usable:
            raise ImageError(f"GPT partition {i + 1} spans LBAs {first}-{last}, outside the usable {first_usable}-{last_usable}")
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        used.append(entry)
        partitions.append(Partition(i + 1, uuid.UUID(bytes_le=entry[:16]), uuid.UUID(bytes_le=entry[16:32]),
                                    first, last, name))
    event = header[:GPT_HEADER_SIZE] + struct.pack("<Q", len(used)) + b"".join(used)
    return Gpt(uuid.UUID(bytes_le=header[56:72]), tuple(partitions), event)


# --- FAT ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DirEntry:
    name: str  # the long name when there is one, else the 8.3 name
    is_dir: bool
    cluster: int
    size: int


class Fat:
    """A FAT12/16/32 file system read through a ByteSource (one partition)."""

    def __init__(self, volume: ByteSource) -> None:
        self._vol = volume
        bs = volume.read(0, SECTOR)
        if len(bs) < SECTOR or bs[510:512] != b"\x55\xaa":
            raise ImageError("the EFI system partition holds no FAT file system (no boot sector signature)")
        (self.sector_size, self._spc, reserved, nfats, root_entries, total16, _media,
         fat16_size, _spt, _heads, _hidden, total32) = struct.unpack_from("<HBHBHHBHHHII", bs, 11)
        fat_size = fat16_size or struct.unpack_from("<I", bs, 36)[0]
        total = total16 or total32
        if self.sector_size not in (512, 1024, 2048, 4096) or self._spc == 0 or self._spc & (self._spc - 1) \
                or reserved == 0 or nfats == 0 or fat_size == 0 or total == 0:
            raise ImageError("the EFI system partition's FAT boot sector is not valid")
        ss = self.sector_size
        self.cluster_size = ss * self._spc
        root_sectors = (root_entries * 32 + ss - 1) // ss
        self._fat_offset = reserved * ss
        self._fat_bytes = fat_size * ss
        self._root_offset = (reserved + nfats * fat_size) * ss
        self._root_bytes = root_sectors * ss
        self._data_offset = self._root_offset + self._root_bytes
        data_sectors = total - (reserved + nfats * fat_size + root_sectors)
        if data_sectors <= 0:
            raise ImageError("the EFI system partition's FAT has no data area")
        self.clusters = data_sectors // self._spc
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        if total * ss > volume.size:
            raise ImageError(f"the FAT file system ({total * ss} bytes) is larger than its partition ({volume.size} bytes)")
        if self.bits * (self.clusters + 2) > self._fat_bytes * 8:
            raise ImageError("the FAT is too small for the clusters of its file system")
        self._root_cluster = struct.unpack_from("<I", bs, 44)[0] if self.bits == 32 else 0
        self._blocks: dict[int, bytes] = {}

    # FAT entries, read one 4 KiB block at a time as the chains need them
    def _fat_bytes_at(self, offset: int, length: int) -> bytes:
        out = b""
        while length:
            block, within = divmod(offset, 4096)
            if block not in self._blocks:
                self._blocks[block] = _exact(self._vol, self._fat_offset + block * 4096,
                                             min(4096, self._fat_bytes - block * 4096), "FAT")
            piece = self._blocks[block][within:within + length]
            out += piece
            offset += len(piece)
            length -= len(piece)
        return out

    def _next(self, cluster: int) -> int:
        if self.bits == 12:
            raw = int.from_bytes(self._fat_bytes_at(cluster * 3 // 2, 2), "little")
            return (raw >> 4) if cluster & 1 else (raw & 0xFFF)
        if self.bits == 16:
            return int.from_bytes(self._fat_bytes_at(cluster * 2, 2), "little")
        return int.from_bytes(self._fat_bytes_at(cluster * 4, 4), "little") & 0x0FFFFFFF

    def _end(self, value: int) -> bool:
        return value >= {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]

    def chain(self, first: int, what: str) -> list[int]:
        """FIRST's cluster chain; ImageError on a loop, a free or bad cluster, a cluster out of range."""
        out: list[int] = []
        seen: set[int] = set()
        cluster = first
        while True:
            if not 2 <= cluster < self.clusters + 2:
                raise ImageError(f"FAT cluster chain of {what} reaches cluster {cluster}, outside 2-{self.clusters + 1}")
            if cluster in seen:
                raise ImageError(f"FAT cluster chain of {what} loops back to cluster {cluster}")
            seen.add(cluster)
            out.append(cluster)
            nxt = self._next(cluster)
            if self._end(nxt):
                return out
            cluster = nxt

    def _cluster_offset(self, cluster: int) -> int:
        return self._data_offset + (cluster - 2) * self.cluster_size

    def _read_chain(self, chain: list[int], length: int, what: str) -> bytes:
        """LENGTH bytes from CHAIN's clusters, reading runs of adjacent clusters at once."""
        parts: list[bytes] = []
        left = length
        i = 0
        while left > 0 and i < len(chain):
            j = i + 1
            while j < len(chain) and chain[j] == chain[j - 1] + 1:
                j += 1
            n = min(left, (j - i) * self.cluster_size)
            parts.append(_exact(self._vol, self._cluster_offset(chain[i]), n, what))
            left -= n
            i = j
        return b"".join(parts)

    def _directory(self, cluster: int, what: str) -> list[_DirEntry]:
        if cluster == 0:  # the FAT12/16 fixed root directory
            raw = _exact(self._vol, self._root_offset, self._root_bytes, "FAT root directory")
        else:
            chain = self.chain(cluster, what)
            if len(chain) * self.cluster_size > MAX_DIRECTORY + self.cluster_size:
                raise ImageError(f"FAT {what} spans {len(chain)} clusters, more than a directory can hold")
            raw = self._read_chain(chain, len(chain) * self.cluster_size, what)
        entries: list[_DirEntry] = []
        lfn: dict[int, str] = {}
        for off in range(0, len(raw) - 31, 32):
            e = raw[off:off + 32]
            if e[0] == 0:
                break
            if e[0] == 0xE5:
                lfn = {}
                continue
            attr = e[11]
            if attr & 0x3F == 0x0F:
                seq = e[0] & 0x1F
                lfn[seq] = (e[1:11] + e[14:26] + e[28:32]).decode("utf-16-le", errors="replace")
                continue
            if attr & 0x08:  # volume label
                lfn = {}
                continue
            long = "".join(lfn[k] for k in sorted(lfn)).split("\0", 1)[0] if lfn else ""
            lfn = {}
            base, ext = e[0:8].decode("latin-1").rstrip(), e[8:11].decode("latin-1").rstrip()
            short = base + ("." + ext if ext else "")
            if short in (".", ".."):
                continue
            hi = struct.unpack_from("<H", e, 20)[0] if self.bits == 32 else 0
            cl = (hi << 16) | struct.unpack_from("<H", e, 26)[0]
            size = struct.unpack_from("<I", e, 28)[0]
            entries.append(_DirEntry(long or short, bool(attr & 0x10), cl, size))
            if long and long.upper() != short.upper():
                entries.append(_DirEntry(short, bool(attr & 0x10), cl, size))
        return entries

    def read_file(self, path: str) -> bytes:
        """The file at PATH (backslashes, case-insensitive as UEFI's FAT driver); ImageError if absent or broken."""
        parts = [p for p in path.replace("/", "\\").split("\\") if p]
        if not parts:
            raise ImageError("no file named")
        cluster = self._root_cluster
        where = ""
        for n, part in enumerate(parts):
            entries = self._directory(cluster, "directory " + (where or "\\"))
            found = next((e for e in entries if e.name.upper() == part.upper()), None)
            last = n == len(parts) - 1
            where += "\\" + part
            if found is None or found.is_dir == last:
                raise ImageError(f"the EFI system partition has no {'file' if last else 'directory'} {where}")
            cluster = found.cluster
            if last:
                if found.size == 0:
                    return b""
                if found.size > MAX_BOOT_FILE:
                    raise ImageError(f"{where} is {found.size} bytes, more than the {MAX_BOOT_FILE} a boot file may have")
                chain = self.chain(cluster, where)
                if len(chain) * self.cluster_size < found.size:
                    raise ImageError(f"FAT cluster chain of {where} is cut short: {len(chain)} clusters "
                                     f"for {found.size} bytes")
                return self._read_chain(chain, found.size, where)
            if cluster == 0 and self.bits != 32:
                raise ImageError(f"FAT directory {where} starts at cluster 0")
        raise AssertionError("unreachable")

    def exists(self, path: str) -> bool:
        try:
            self.read_file(path)
        except ImageError:
            return False
        return True

    def has_directory(self, path: str) -> bool:
        """Whether PATH names a directory (used to see whether the stub would find drop-ins)."""
        parts = [p for p in path.replace("/", "\\").split("\\") if p]
        cluster = self._root_cluster
        for part in parts:
            try:
                entries = self._directory(cluster, part)
            except ImageError:
                return False
            found = next((e for e in entries if e.name.upper() == part.upper()), None)
            if found is None or not found.is_dir:
                return False
            cluster = found.cluster
        return True


def read_boot_file(disk: ByteSource, path: str = DEFAULT_BOOT_PATH) -> tuple[Gpt, Fat, bytes]:
    """The disk's GPT, its ESP's file system, and the bytes of PATH on it."""
    gpt = parse_gpt(disk)
    esp = gpt.esp()
    if esp.offset + esp.length > disk.size:
        raise ImageError(f"the EFI system partition ends at byte {esp.offset + esp.length}, past the disk's {disk.size}")
    fat = Fat(Slice(disk, esp.offset, esp.length))
    return gpt, fat, fat.read_file(path)
