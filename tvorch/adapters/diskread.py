"""Read a disk image's guest-visible bytes on demand: raw files and qcow2 backing chains.

``tvorch predict`` needs a few hundred KiB of a multi-GiB image (the GPT, the
ESP's FAT and its boot file), so nothing here reads more than the clusters a
read touches: per qcow2 layer the L1 table once, each L2 table when first
needed, and data clusters as asked. Unallocated clusters fall through to the
backing file (zeros past its end or without one); zero clusters read as
zeros; zlib-compressed clusters are inflated. Encryption, external data
files, zstd and extended L2 entries are refused (``tvorch.core.launch.images``
refuses the first two when the chain is opened). ``bytes_read`` counts what
came from the files, for the benchmark and the tests.
"""

from __future__ import annotations

import os
import struct
import zlib

from tvorch.adapters.imagefiles import inspect_image
from tvorch.core.launch.images import ImageChain, ImageFormat, Qcow2Header, parse_qcow2_header, qcow2_header_bytes_needed
from tvorch.errors import ImageError

_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62
_ZERO = 1


class _Layer:
    def __init__(self, path: str, fmt: ImageFormat, counter: "DiskImage") -> None:
        self.path = path
        self.counter = counter
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.file_size = os.fstat(self.fd).st_size
        self.backing: _Layer | None = None
        self.header: Qcow2Header | None = None
        self.size = self.file_size
        if fmt is ImageFormat.QCOW2:
            head = self.pread(0, 4096)
            need = qcow2_header_bytes_needed(head)
            if need > len(head):
                head = self.pread(0, need)
            h = parse_qcow2_header(head)
            if h.extended_l2 or h.compression_type != 0:
                raise ImageError(f"image {path}: qcow2 extended L2 entries or zstd compression are not supported here")
            self.header = h
            self.size = h.virtual_size
            raw = self.pread(h.l1_table_offset, h.l1_size * 8)
            if len(raw) != h.l1_size * 8:
                raise ImageError(f"image {path}: qcow2 L1 table is cut short")
            self.l1 = struct.unpack(f">{h.l1_size}Q", raw)
            self.l2: dict[int, tuple[int, ...]] = {}

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        self.counter.bytes_read += len(data)
        return data

    def close(self) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes:
        """LENGTH guest bytes from OFFSET (the caller keeps within self.size)."""
        if self.header is None:
            data = self.pread(offset, length)
            return data + b"\0" * (length - len(data))  # a raw file shorter than its use reads zeros, as qemu
        cs = self.header.cluster_size
        out = []
        while length:
            within = offset % cs
            n = min(length, cs - within)
            out.append(self._cluster_bytes(offset - within, within, n))
            offset += n
            length -= n
        return b"".join(out)

    def _cluster_bytes(self, cluster_start: int, within: int, n: int) -> bytes:
        h = self.header
        assert h is not None
        cs = h.cluster_size
        index = cluster_start // cs
        l1_index, l2_index = divmod(index, h.l2_entries)
        entry = 0
        if l1_index < len(self.l1):
            l2_offset = self.l1[l1_index] & _OFFSET_MASK
            if l2_offset:
                table = self.l2.get(l2_offset)
                if table is None:
                    raw = self.pread(l2_offset, cs)
                    if len(raw) != cs:
                        raise ImageError(f"image {self.path}: qcow2 L2 table at {l2_offset:#x} is cut short")
                    table = self.l2[l2_offset] = struct.unpack(f">{h.l2_entries}Q", raw)
                entry = table[l2_index]
        if entry & _COMPRESSED:
            x = 62 - (h.cluster_bits - 8)
            host = entry & ((1 << x) - 1)
            sectors = ((entry >> x) & ((1 << (h.cluster_bits - 8)) - 1)) + 1
            raw = self.pread(host, sectors * 512 - (host & 511))
            try:
                d = zlib.decompressobj(-12)
                plain = d.decompress(raw, cs)
            except zlib.error as err:
                raise ImageError(f"image {self.path}: compressed cluster at {host:#x} does not inflate: {err}") from None
            if len(plain) != cs:
                raise ImageError(f"image {self.path}: compressed cluster at {host:#x} inflates to {len(plain)} bytes")
            return plain[within:within + n]
        host = entry & _OFFSET_MASK
        if entry & _ZERO and h.version >= 3:
            return b"\0" * n
        if host:
            data = self.pread(host + within, n)
            if len(data) != n:
                raise ImageError(f"image {self.path}: data cluster at {host:#x} is cut short")
            return data
        return self._below(cluster_start + within, n)

    def _below(self, offset: int, n: int) -> bytes:
        b = self.backing
        if b is None or offset >= b.size:
            return b"\0" * n
        m = min(n, b.size - offset)
        return b.read(offset, m) + b"\0" * (n - m)


class DiskImage:
    """An image (a tvorch.core.boot.bootdisk.ByteSource): guest-visible bytes, read through its backing chain."""

    def __init__(self, path: str, chain: ImageChain | None = None) -> None:
        self.bytes_read = 0
        chain = chain or inspect_image(path)
        self.chain = chain
        below: _Layer | None = None
        self._layers: list[_Layer] = []
        try:
            for layer in chain.layers:  # base first
                opened = _Layer(layer.path, layer.format, self)
                opened.backing = below
                self._layers.append(opened)
                below = opened
        except BaseException:
            self.close()
            raise
        assert below is not None
        self._top = below

    @property
    def size(self) -> int:
        return self._top.size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        return self._top.read(offset, length) if length else b""

    def close(self) -> None:
        for layer in self._layers:
            layer.close()
        self._layers = []

    def __enter__(self) -> "DiskImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
