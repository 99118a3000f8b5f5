"""A small DER writer and a strict DER reader, for the TCG structures ``cryptography`` has no classes for.

Pure. The writer makes the few universal types the TCG credential profiles
use; the reader takes exactly one definite-length element (no BER: no
indefinite lengths, no long-form length where the short form fits, no
padded length or INTEGER), so a structure read back compares byte for byte
with what was signed. Anything else raises ``DerError`` (a ``ValueError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

# Universal tags, and the constructed context-specific tag [n] is 0xA0 | n.
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
UTF8_STRING = 0x0C
PRINTABLE_STRING = 0x13
IA5_STRING = 0x16
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30
SET = 0x31
_TEXT_TAGS = (UTF8_STRING, PRINTABLE_STRING, IA5_STRING)


class DerError(ValueError):
    """Bytes that are not the DER expected here."""


def context(n: int, content: bytes) -> bytes:
    """A constructed context-specific element [N] (IMPLICIT over a SEQUENCE, or EXPLICIT around one element)."""
    if not 0 <= n <= 30:
        raise ValueError(f"context tag [{n}] needs the high-tag-number form")
    return tlv(0xA0 | n, content)


def tlv(tag: int, content: bytes) -> bytes:
    """One element: TAG, the definite length (short form below 128), CONTENT."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    """SET OF: DER sorts the encoded elements."""
    return tlv(SET, b"".join(sorted(parts)))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in the fewest octets (a leading 0x00 only to keep the sign bit clear)."""
    if value < 0:
        raise ValueError("negative INTEGER")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form ("2.23.133.8.2")."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39) or min(arcs) < 0:
        raise ValueError(f"not an object identifier: {dotted!r}")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(OID, bytes(body))


def utf8(text: str) -> bytes:
    return tlv(UTF8_STRING, text.encode())


def octet_string(data: bytes) -> bytes:
    return tlv(OCTET_STRING, data)


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), as signatures and keys are."""
    return tlv(BIT_STRING, b"\x00" + data)


def generalized_time(moment: datetime) -> bytes:
    """GeneralizedTime YYYYMMDDHHMMSSZ in UTC, whole seconds (RFC 5280 4.1.2.5.2; RFC 5755 4.2.6)."""
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    return tlv(GENERALIZED_TIME, moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%SZ").encode())


@dataclass(frozen=True)
class Element:
    """One parsed element: its tag, its content, and its whole encoding (what a signature covers)."""

    tag: int
    content: bytes
    raw: bytes

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)

    def children(self) -> list[Element]:
        """The elements inside a constructed element (SEQUENCE, SET, [n])."""
        if not self.constructed:
            raise DerError(f"element with tag 0x{self.tag:02x} is primitive, not constructed")
        return read_all(self.content)

    def expect(self, tag: int, what: str) -> Element:
        if self.tag != tag:
            raise DerError(f"{what}: tag 0x{self.tag:02x} where 0x{tag:02x} was expected")
        return self

    def as_int(self) -> int:
        self.expect(INTEGER, "INTEGER")
        data = self.content
        if not data:
            raise DerError("empty INTEGER")
        if len(data) > 1 and ((data[0] == 0 and data[1] < 0x80) or (data[0] == 0xFF and data[1] >= 0x80)):
            raise DerError("INTEGER is not in its shortest form")
        return int.from_bytes(data, "big", signed=True)

    def as_oid(self) -> str:
        self.expect(OID, "OBJECT IDENTIFIER")
        data = self.content
        if not data or data[-1] & 0x80:
            raise DerError("truncated OBJECT IDENTIFIER")
        values: list[int] = []
        value = 0
        start = True
        for byte in data:
            if start and byte == 0x80:
                raise DerError("OBJECT IDENTIFIER arc is padded")
            value = (value << 7) | (byte & 0x7F)
            start = not byte & 0x80
            if start:
                values.append(value)
                value = 0
        first = min(values[0] // 40, 2)
        return ".".join(str(a) for a in [first, values[0] - 40 * first, *values[1:]])

    def as_text(self) -> str:
        if self.tag not in _TEXT_TAGS:
            raise DerError(f"tag 0x{self.tag:02x} is not a string type")
        try:
            return self.content.decode("utf-8" if self.tag == UTF8_STRING else "ascii")
        except UnicodeDecodeError:
            raise DerError("string is not validly encoded") from None

    def as_bits(self) -> bytes:
        """The octets of a BIT STRING with no unused bits."""
        self.expect(BIT_STRING, "BIT STRING")
        if not self.content or self.content[0] != 0:
            raise DerError("BIT STRING has unused bits")
        return self.content[1:]

    def as_time(self) -> datetime:
        """A GeneralizedTime in the DER form YYYYMMDDHHMMSSZ."""
        self.expect(GENERALIZED_TIME, "GeneralizedTime")
        try:
            text = self.content.decode("ascii")
            if len(text) != 15 or not text.endswith("Z") or not text[:14].isdigit():
                raise ValueError(text)
            return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            raise DerError(f"GeneralizedTime {self.content!r} is not YYYYMMDDHHMMSSZ") from None


def read(data: bytes) -> Element:
    """Exactly one element spanning all of DATA."""
    element, end = _read_at(data, 0)
    if end != len(data):
        raise DerError(f"{len(data) - end} bytes after the element")
    return element


def read_prefix(data: bytes) -> tuple[Element, int]:
    """The one element DATA starts with, and the offset just after it (what follows is not looked at)."""
    return _read_at(data, 0)


def read_all(data: bytes) -> list[Element]:
    """The elements one after the other in DATA (the content of a constructed element)."""
    out = []
    offset = 0
    while offset < len(data):
        element, offset = _read_at(data, offset)
        out.append(element)
    return out


def _read_at(data: bytes, offset: int) -> tuple[Element, int]:
    if len(data) - offset < 2:
        raise DerError("truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError("high-tag-number form is not used here")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise DerError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > len(data):
            raise DerError("truncated or oversized length")
        size = data[pos:pos + count]
        length = int.from_bytes(size, "big")
        if size[0] == 0 or length < 0x80:
            raise DerError("length is not in its shortest form")
        pos += count
    end = pos + length
    if end > len(data):
        raise DerError("element runs past the end of the data")
    return Element(tag, data[pos:end], data[offset:end]), end
