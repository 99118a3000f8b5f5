"""PE/COFF images: their sections and their Authenticode hash as UEFI computes it.

UEFI measures every boot application into PCR 4 with this hash (EDK2's
DxeTpm2MeasureBootLib / HashPeImage): the headers without the CheckSum field
and the Certificate Table directory entry, then each section's raw data in
file-offset order, then the data after the last section up to the
certificate table. An image whose sections overlap, run past the end of the
file, or whose certificate table is not the file's tail is refused: firmware
and other tools disagree on such images, so no hash of them can be trusted.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ...errors import ImageError

_PE32, _PE32_PLUS = 0x10B, 0x20B
_SECURITY_DIR = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY
# How far a section's VirtualSize may exceed its raw data (zero fill, a .bss): systemd-stub measures
# VirtualSize bytes, so a hostile size must not make the prediction allocate gigabytes.
_MAX_ZERO_FILL = 64 << 20


@dataclass(frozen=True)
class Section:
    name: str
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_offset: int


@dataclass(frozen=True)
class PeImage:
    """The parts of a PE image that decide its Authenticode hash and its sections' bytes."""

    data: bytes
    checksum_offset: int
    security_entry_offset: int | None  # where the Certificate Table directory entry is, if the image has one
    size_of_headers: int
    sections: tuple[Section, ...]
    cert_offset: int
    cert_size: int

    def authenticode_sha256(self) -> str:
        """The image's Authenticode sha256, lowercase hex (what UEFI extends into PCR 4)."""
        d = self.data
        h = hashlib.sha256()
        h.update(d[:self.checksum_offset])
        if self.security_entry_offset is None:
            h.update(d[self.checksum_offset + 4:self.size_of_headers])
        else:
            h.update(d[self.checksum_offset + 4:self.security_entry_offset])
            h.update(d[self.security_entry_offset + 8:self.size_of_headers])
        hashed = self.size_of_headers
        for s in sorted(self.sections, key=lambda s: s.raw_offset):
            if s.raw_size:
                h.update(d[s.raw_offset:s.raw_offset + s.raw_size])
                hashed += s.raw_size
        end = len(d) - self.cert_size
        if end > hashed:
            h.update(d[hashed:end])
        return h.hexdigest()

    def section(self, name: str) -> Section | None:
        """The first section named NAME (as systemd-stub looks them up)."""
        return next((s for s in self.sections if s.name == name), None)

    def section_data(self, name: str) -> bytes | None:
        """NAME's bytes as a loader maps them: VirtualSize bytes, raw data zero-filled past SizeOfRawData."""
        s = self.section(name)
        if s is None:
            return None
        raw = self.data[s.raw_offset:s.raw_offset + min(s.raw_size, s.virtual_size)]
        return raw + b"\0" * (s.virtual_size - len(raw))


def parse_pe(data: bytes, what: str = "PE image") -> PeImage:
    """Parse and vet DATA as a PE image; ImageError naming WHAT on anything a hash cannot be trusted for."""
    data = bytes(data)
    n = len(data)
    if n < 0x40 or data[:2] != b"MZ":
        raise ImageError(f"{what} is not a PE image (no MZ header)")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 24 > n or data[pe:pe + 4] != b"PE\0\0":
        raise ImageError(f"{what} is not a PE image (no PE signature)")
    nsections, opt_size = struct.unpack_from("<H", data, pe + 6)[0], struct.unpack_from("<H", data, pe + 20)[0]
    opt = pe + 24
    if opt + opt_size > n or opt_size < 2:
        raise ImageError(f"{what}: optional header runs past the end of the file")
    magic = struct.unpack_from("<H", data, opt)[0]
    if magic == _PE32:
        ndirs_at, dirs_at = opt + 92, opt + 96
    elif magic == _PE32_PLUS:
        ndirs_at, dirs_at = opt + 108, opt + 112
    else:
        raise ImageError(f"{what}: unknown optional header magic {magic:#x}")
    if ndirs_at + 4 > opt + opt_size:
        raise ImageError(f"{what}: optional header of {opt_size} bytes is too short")
    size_of_headers = struct.unpack_from("<I", data, opt + 60)[0]
    ndirs = struct.unpack_from("<I", data, ndirs_at)[0]
    if dirs_at + 8 * ndirs > opt + opt_size:
        raise ImageError(f"{what}: {ndirs} data directories do not fit its optional header")
    table = opt + opt_size
    if table + 40 * nsections > n or table + 40 * nsections > size_of_headers or size_of_headers > n:
        raise ImageError(f"{what}: section table or headers run past the headers or the file")
    sections = []
    for i in range(nsections):
        raw_name, vsize, vaddr, rsize, roff = struct.unpack_from("<8sIIII", data, table + 40 * i)
        name = raw_name.split(b"\0", 1)[0].decode("latin-1")
        if rsize and (roff < size_of_headers or roff + rsize > n):
            raise ImageError(f"{what}: section {name} (bytes {roff}-{roff + rsize}) lies outside the file's data")
        if vsize > rsize + _MAX_ZERO_FILL:
            raise ImageError(f"{what}: section {name} claims {vsize} bytes in memory for {rsize} in the file")
        sections.append(Section(name, vsize, vaddr, rsize, roff))
    ordered = sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.raw_offset + a.raw_size > b.raw_offset:
            raise ImageError(f"{what}: sections {a.name} and {b.name} overlap in the file")
    data_end = max([size_of_headers] + [s.raw_offset + s.raw_size for s in ordered])
    security_entry: int | None = None
    cert_offset = cert_size = 0
    if ndirs > _SECURITY_DIR:
        security_entry = dirs_at + 8 * _SECURITY_DIR
        cert_offset, cert_size = struct.unpack_from("<II", data, security_entry)
        if cert_size or cert_offset:
            if cert_size == 0 or cert_offset + cert_size != n or cert_offset < data_end:
                raise ImageError(f"{what}: certificate table (bytes {cert_offset}-{cert_offset + cert_size}) "
                                 f"is not the tail of the file ({n} bytes, section data ends at {data_end})")
    return PeImage(data, opt + 64, security_entry, size_of_headers, tuple(sections), cert_offset, cert_size)
