"""The Linux IMA measurement list: parse it, check it, replay it to PCR 10, write it.

Host attestation (DESIGN flow 3) replays the kernel's IMA list against the
quoted PCR 10 and checks every measured file against an allowlist; this
module is that logic on bytes, with no file or TPM access. The formats follow
the kernel (security/integrity/ima/ima_fs.c, ima_template_lib.c, ima_crypto.c,
ima_queue.c):

binary_runtime_measurements, per entry, little-endian (the kernel writes its
native order, or little-endian under ``ima_canonical_fmt``; tvorch's hosts
are little-endian)::

    u32 PCR | 20-byte SHA-1 template hash | u32 name length | template name
    every template but "ima": u32 template data length | template data
    "ima":                    20-byte digest | u32 file name length | file name

The template data is its fields, each a u32 length and bytes: ``d-ng`` is
``"<algo>:" NUL digest`` (``d-ngv2``: ``"<ima|verity>:<algo>:" NUL digest``),
``n-ng`` the name and a NUL (the kernel turns spaces into ``_``), ``sig`` the
security.ima signature or nothing, ``buf`` the measured buffer (``ima-buf``),
``d-modsig``/``modsig`` the appended signature's digest and signature.

The template hash is SHA-1 over the template data; for the "ima" template it
is SHA-1 over the digest and the file name NUL-padded to 256 bytes. That
hashed form is what ``ImaEntry.template_data`` holds for every template, so
one rule serves the hash check and the replay of every bank.

ascii_runtime_measurements: ``"%2d <template hash> <template name>"``, then a
space and each field (digests in hex after their ``<algo>:`` prefix, names as
text, signatures and buffers in hex; an empty field leaves only its space, so
an ``ima-sig`` line without signature ends in a space), then a newline.

Replay: since Linux 5.8 each PCR bank is extended with that bank's hash of the
template data (the sha1 bank with the SHA-1 template hash the list carries).
A measurement invalidated by a violation (ToMToU, open writers) has an
all-zero template hash and is extended as all ones in every bank. Kernels
before 5.8 extended every bank with the zero-padded SHA-1 template hash:
replay those against the sha1 bank.

The kernel never shows half an entry (seq_file writes whole records), so a
list that ends inside an entry is refused as truncated rather than cut short.
"""

from __future__ import annotations

import binascii
import fnmatch
import gc
import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

from ...errors import EvidenceError, InputError

IMA_PCR = 10
BOOT_AGGREGATE = "boot_aggregate"
ZERO_TEMPLATE_HASH = bytes(20)  # the template hash of an invalidated measurement

_HEAD = struct.Struct("<I20sI")  # PCR, template hash, template name length
_U32 = struct.Struct("<I")
_u32_at = _U32.unpack_from
_u32 = _U32.pack
_NAME_MAX = 255  # IMA_EVENT_NAME_LEN_MAX: the "ima" template's file name limit
_IMA_TD_LEN = 20 + _NAME_MAX + 1  # "ima" template data as hashed: digest, padded name
_TEMPLATE_NAME_MAX = 255  # the kernel's own limit is 240 (15 fields of 16 characters)
_PCR_MAX = 0xFFFFFFFF

# The kernel's hash_algo_name[] (crypto/hash_info.c) and digest sizes.
_DIGEST_SIZES = {
    "md4": 16, "md5": 16, "sha1": 20, "rmd160": 20, "sha256": 32, "sha384": 48, "sha512": 64,
    "sha224": 28, "rmd128": 16, "rmd256": 32, "rmd320": 40, "wp256": 32, "wp384": 48, "wp512": 64,
    "tgr128": 16, "tgr160": 20, "tgr192": 24, "sm3": 32, "streebog256": 32, "streebog512": 64,
    "sha3-256": 32, "sha3-384": 48, "sha3-512": 64,
}
# The prefix before ":\0" in a d-ng field (d-ngv2 adds a digest type) -> (algo text, digest size).
_NG_PREFIXES = {a.encode(): (a, n) for a, n in _DIGEST_SIZES.items()}
_NGV2_PREFIXES = {f"{t}:{a}".encode(): (f"{t}:{a}", n) for a, n in _DIGEST_SIZES.items() for t in ("ima", "verity")}

_BANKS: dict[str, Callable[[bytes], "hashlib._Hash"]] = {
    "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}
_BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

# Template fields tvorch understands, by how the kernel shows them (DATA_FMT_*).
_RAW_DIGEST, _NG_DIGEST, _NGV2_DIGEST, _STRING, _HEX = range(5)
_FIELD_KINDS = {
    "d": _RAW_DIGEST, "d-ng": _NG_DIGEST, "d-modsig": _NG_DIGEST, "d-ngv2": _NGV2_DIGEST,
    "n": _STRING, "n-ng": _STRING, "sig": _HEX, "buf": _HEX, "modsig": _HEX,
}
_MAY_BE_EMPTY = frozenset({"sig", "buf", "d-modsig", "modsig"})
# Built-in templates (ima_template.c); a custom ima_template_fmt shows its format as its name.
_BUILTIN_FORMATS = {
    "ima": "d|n", "ima-ng": "d-ng|n-ng", "ima-ngv2": "d-ngv2|n-ng", "ima-sig": "d-ng|n-ng|sig",
    "ima-sigv2": "d-ngv2|n-ng|sig", "ima-buf": "d-ng|n-ng|buf", "ima-modsig": "d-ng|n-ng|sig|d-modsig|modsig",
}


@dataclass(frozen=True, slots=True)
class ImaEntry:
    """One measurement. ``template_data`` is what the template hash covers (see the module doc)."""

    pcr: int
    template_hash: bytes  # SHA-1, as the list carries it
    template_name: str
    template_data: bytes
    file_digest_algo: str  # "sha256"; "ima:sha256" or "verity:sha256" for d-ngv2
    file_digest: bytes
    path: str  # the event name: a file path, "boot_aggregate", a buffer's name; undecodable bytes surrogate-escaped
    signature: bytes | None  # the sig field; None when the template has none

    @property
    def invalidated(self) -> bool:
        """A violation entry: IMA could not trust what it measured (ToMToU, open writers)."""
        return self.template_hash == ZERO_TEMPLATE_HASH


# --- templates -------------------------------------------------------------------------------------


class _Template:
    """A template's fields and how its data is framed and hashed."""

    __slots__ = ("name", "fields", "legacy", "fast", "has_sig")

    def __init__(self, name: str, fields: tuple[str, ...]) -> None:
        self.name = name
        self.fields = fields
        self.legacy = name == "ima"  # no length prefixes; the name hashed as 256 bytes
        # ima-ng and ima-sig make up nearly every real list: the binary parser reads them in place.
        self.fast = fields in (("d-ng", "n-ng"), ("d-ng", "n-ng", "sig"))
        self.has_sig = "sig" in fields

    def split(self, td: bytes) -> list[bytes]:
        """The template data's fields, as the kernel holds them (names with their NUL)."""
        if self.legacy:
            if len(td) != _IMA_TD_LEN:
                raise ValueError(f"'ima' template data is {len(td)} bytes, not {_IMA_TD_LEN}")
            name = td[20:].rstrip(b"\0")
            return [td[:20], name + b"\0"]
        fields: list[bytes] = []
        pos, end = 0, len(td)
        for field in self.fields:
            if end - pos < 4:
                raise ValueError(f"template data ends before the length of field {field!r}")
            (flen,) = _u32_at(td, pos)
            pos += 4
            if flen > end - pos:
                raise ValueError(f"field {field!r} ({flen} bytes) overruns the template data")
            fields.append(td[pos:pos + flen])
            pos += flen
        if pos != end:
            raise ValueError(f"{end - pos} bytes follow the template's last field")
        return fields

    def join(self, fields: Sequence[bytes]) -> bytes:
        """Template data from field values (the inverse of split)."""
        if self.legacy:
            digest, name = fields
            if len(digest) != 20:
                raise ValueError("the 'ima' template's digest must be 20 bytes")
            if len(name) > _NAME_MAX + 1:
                raise ValueError(f"the 'ima' template's file name is limited to {_NAME_MAX} bytes")
            return digest + name.ljust(_NAME_MAX + 1, b"\0")
        return b"".join(_u32(len(f)) + f for f in fields)

    def decode(self, td: bytes) -> tuple[str, bytes, str, bytes | None]:
        """(file digest algo, file digest, path, signature) from template data; ValueError if malformed."""
        fields = self.split(td)
        algo, digest, path, signature = "", b"", "", None
        have_digest = have_name = False
        for field, value in zip(self.fields, fields):
            if not value:
                if field not in _MAY_BE_EMPTY:
                    raise ValueError(f"field {field!r} is empty")
                if field == "sig":
                    signature = b""
                continue
            kind = _FIELD_KINDS[field]
            if kind == _STRING:
                name = _string(value)
                if not have_name:
                    path, have_name = name, True
            elif kind == _HEX:
                if field == "sig":
                    signature = value
            else:
                field_algo, field_digest = _digest(kind, value)
                if not have_digest:
                    algo, digest, have_digest = field_algo, field_digest, True
        return algo, digest, path, signature


def _string(value: bytes) -> str:
    if value[-1] != 0 or b"\0" in value[:-1]:
        raise ValueError("a name field is not one NUL-terminated string")
    return value[:-1].decode("utf-8", "surrogateescape")


def _digest(kind: int, value: bytes) -> tuple[str, bytes]:
    if kind == _RAW_DIGEST:
        if len(value) == 20:
            return "sha1", value
        if len(value) == 16:
            return "md5", value
        raise ValueError(f"a 'd' digest is {len(value)} bytes (sha1 or md5 expected)")
    sep = value.find(b":\0")
    known = (_NG_PREFIXES if kind == _NG_DIGEST else _NGV2_PREFIXES).get(value[:sep]) if sep > 0 else None
    if known is None:
        raise ValueError(f"digest field {value[:40]!r} does not start with a known '<algo>:' NUL prefix")
    algo, size = known
    digest = value[sep + 2:]
    if len(digest) != size:
        raise ValueError(f"{algo} digest is {len(digest)} bytes, not {size}")
    return algo, digest


_TEMPLATE_CACHE: dict[str, _Template] = {}


def _template(name: str) -> _Template:
    """The template called NAME: a built-in one, or a custom format shown by its format string."""
    tmpl = _TEMPLATE_CACHE.get(name)
    if tmpl is None:
        fields = tuple(_BUILTIN_FORMATS.get(name, name).split("|"))
        if not all(f in _FIELD_KINDS for f in fields):
            raise ValueError(f"unsupported IMA template {name[:64]!r}")
        tmpl = _TEMPLATE_CACHE[name] = _Template(name, fields)
    return tmpl


def _entry(pcr: int, template_hash: bytes, tmpl: _Template, td: bytes) -> ImaEntry:
    algo, digest, path, signature = tmpl.decode(td)
    return ImaEntry(pcr, template_hash, tmpl.name, td, algo, digest, path, signature)


# --- parsing ---------------------------------------------------------------------------------------


def parse_ima_binary(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[tuple[ImaEntry, ...], int]:
    """Entries of binary_runtime_measurements from OFFSET on, and the offset after the last one.

    Pass the returned offset back in to read only what the kernel appended
    since. Any framing problem is an EvidenceError naming the entry (counted
    from OFFSET) and its byte offset.
    """
    buf = data if type(data) is bytes else bytes(data)
    end = len(buf)
    if not 0 <= offset <= end:
        raise EvidenceError(f"IMA binary log: offset {offset} is outside the {end} bytes read")
    entries: list[ImaEntry] = []
    append = entries.append
    head = _HEAD.unpack_from
    pos = start = offset
    u32_at = _u32_at
    find = buf.find
    tmpl: _Template | None = None
    # The last template name and d-ng prefix read: consecutive entries nearly always share them.
    name = b""
    prefix, algo, digest_size = b"sha256:\0", "sha256", 32
    with _gc_paused():
        try:
            while pos < end:
                start = pos
                if end - pos < 28:
                    raise ValueError(f"truncated: {end - pos} bytes left, an entry header needs 28")
                pcr, template_hash, name_len = head(buf, pos)
                pos += 28
                if tmpl is None or name_len != len(name) or not buf.startswith(name, pos):
                    tmpl, name = _read_template_name(buf, pos, name_len)
                pos += name_len
                if tmpl.legacy:
                    td, pos = _read_legacy_data(buf, pos)
                    append(_entry(pcr, template_hash, tmpl, td))
                    continue
                if end - pos < 4:
                    raise ValueError("truncated before the template data length")
                (td_len,) = _u32_at(buf, pos)
                pos += 4
                if td_len > end - pos:
                    raise ValueError(f"truncated: template data of {td_len} bytes, {end - pos} left")
                td_end = pos + td_len
                td = buf[pos:td_end]
                if tmpl.fast and td_len >= 8:
                    # ima-ng/ima-sig read in place; anything irregular falls through to
                    # _Template.decode, which reads it again and says what is wrong.
                    d_start = pos + 4
                    d_end = d_start + u32_at(buf, pos)[0]
                    same_prefix = buf.startswith(prefix, d_start)
                    if not same_prefix:
                        sep = find(b":\0", d_start, d_end)
                        known = _NG_PREFIXES.get(buf[d_start:sep]) if sep > d_start else None
                        if known is not None:
                            (algo, digest_size), prefix, same_prefix = known, buf[d_start:sep + 2], True
                    n_start = d_end + 4
                    if same_prefix and d_end - d_start - len(prefix) == digest_size and n_start <= td_end:
                        n_end = n_start + u32_at(buf, d_end)[0]
                        if tmpl.has_sig:
                            framed = n_end + 4 <= td_end and n_end + 4 + u32_at(buf, n_end)[0] == td_end
                            signature: bytes | None = buf[n_end + 4:td_end]
                        else:
                            framed, signature = n_end == td_end, None
                        if framed and n_end > n_start and buf[n_end - 1] == 0 and find(b"\0", n_start, n_end - 1) < 0:
                            append(ImaEntry(pcr, template_hash, tmpl.name, td, algo, buf[d_start + len(prefix):d_end],
                                            buf[n_start:n_end - 1].decode("utf-8", "surrogateescape"), signature))
                            pos = td_end
                            continue
                append(_entry(pcr, template_hash, tmpl, td))
                pos = td_end
        except (ValueError, struct.error) as err:
            raise EvidenceError(f"IMA binary log entry {len(entries)} at byte {start}: {err}") from None
    return tuple(entries), pos


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold off the cyclic collector while a parse allocates a tracked entry per measurement.

    The entries form no cycles, but 100,000 new tracked objects trigger
    repeated full collections that cost about a third of the parse.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_template_name(buf: bytes, pos: int, name_len: int) -> tuple[_Template, bytes]:
    if not 0 < name_len <= _TEMPLATE_NAME_MAX:
        raise ValueError(f"template name length {name_len} is not 1-{_TEMPLATE_NAME_MAX}")
    if name_len > len(buf) - pos:
        raise ValueError("truncated inside the template name")
    name = buf[pos:pos + name_len]
    return _template(name.decode("ascii")), name


def _read_legacy_data(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The "ima" template's digest and length-prefixed name at POS, as hashed (name padded to 256)."""
    if len(buf) - pos < 24:
        raise ValueError("truncated inside an 'ima' template entry")
    (file_len,) = _u32_at(buf, pos + 20)
    if file_len > _NAME_MAX:
        raise ValueError(f"'ima' template file name length {file_len} exceeds {_NAME_MAX}")
    if file_len > len(buf) - pos - 24:
        raise ValueError("truncated inside an 'ima' template file name")
    file_name = buf[pos + 24:pos + 24 + file_len]
    if b"\0" in file_name:
        raise ValueError("an 'ima' template file name contains NUL")
    return buf[pos:pos + 20] + file_name.ljust(_NAME_MAX + 1, b"\0"), pos + 24 + file_len


def parse_ima_ascii(text: str) -> tuple[ImaEntry, ...]:
    """Entries of ascii_runtime_measurements, with their template data rebuilt from the fields.

    Every line must end in a newline: a last line without one is a truncated
    entry. Undecodable bytes in names should reach here surrogate-escaped
    (``bytes.decode("utf-8", "surrogateescape")``) so the rebuilt data is exact.
    """
    lines = text.split("\n")
    unterminated = lines.pop()
    entries: list[ImaEntry] = []
    append = entries.append
    pos = 0
    with _gc_paused():
        for line in lines:
            try:
                append(_ascii_fast(line.split(" ")) or _ascii_entry(line))
            except (ValueError, struct.error) as err:
                raise EvidenceError(f"IMA ASCII log entry {len(entries)} at character {pos}: {err}") from None
            pos += len(line) + 1
    if unterminated:
        raise EvidenceError(f"IMA ASCII log entry {len(entries)} at character {pos}: truncated (the line has no newline)")
    return tuple(entries)


def _ascii_fast(columns: list[str]) -> ImaEntry | None:
    """An ima-ng or ima-sig line read in one pass; None leaves the line to _ascii_entry."""
    n = len(columns)
    if not (n == 5 and columns[2] == "ima-ng" or n == 6 and columns[2] == "ima-sig"):
        return None
    pcr_text, hash_text, name, digest_text, path = columns[:5]
    algo, _, digest_hex = digest_text.partition(":")
    known = _NG_PREFIXES.get(algo.encode())
    if known is None or not (pcr_text.isascii() and pcr_text.isdigit()) or not path.isascii() or "\0" in path:
        return None
    try:
        template_hash, digest = binascii.a2b_hex(hash_text), binascii.a2b_hex(digest_hex)
        signature = binascii.a2b_hex(columns[5]) if n == 6 else None
    except ValueError:
        return None
    pcr = int(pcr_text)
    if len(template_hash) != 20 or len(digest) != known[1] or pcr > _PCR_MAX:
        return None
    d_ng = algo.encode() + b":\0" + digest
    n_ng = path.encode() + b"\0"
    td = _u32(len(d_ng)) + d_ng + _u32(len(n_ng)) + n_ng
    if signature is not None:
        td += _u32(len(signature)) + signature
    return ImaEntry(pcr, template_hash, name, td, algo, digest, path, signature)


def parse_ima_list(data: bytes) -> tuple[ImaEntry, ...]:
    """Entries of either list, as read from the kernel: binary if it has a NUL, else ASCII.

    A binary entry starts with a u32 PCR index, so its first bytes hold NULs;
    the ASCII list never has one. Names in ASCII are decoded surrogate-escaped.
    """
    if b"\0" in data[:64]:
        return parse_ima_binary(data)[0]
    return parse_ima_ascii(data.decode("utf-8", "surrogateescape"))


def _ascii_entry(line: str) -> ImaEntry:
    columns = line.lstrip(" ").split(" ")  # "%2d": a one-digit PCR has a leading space
    if len(columns) < 3:
        raise ValueError("fewer than three columns")
    pcr_text, hash_text, name = columns[:3]
    if not (pcr_text.isascii() and pcr_text.isdigit()) or int(pcr_text) > _PCR_MAX:
        raise ValueError(f"PCR {pcr_text[:16]!r} is not a number")
    template_hash = _unhex(hash_text)
    if len(template_hash) != 20:
        raise ValueError("the template hash is not 20 bytes of hex")
    tmpl = _template(name)
    values = columns[3:]
    missing = tmpl.fields[len(values):]
    if len(values) > len(tmpl.fields):
        raise ValueError(f"{len(values)} fields for template {name!r}, which has {len(tmpl.fields)}")
    if not all(f in _MAY_BE_EMPTY for f in missing):
        raise ValueError(f"template {name!r} needs {len(tmpl.fields)} fields, the line has {len(values)}")
    # Trailing empty fields may have lost their spaces to an editor; they are empty either way.
    fields = [_ascii_field(f, v) for f, v in zip(tmpl.fields, values)] + [b""] * len(missing)
    return _entry(int(pcr_text), template_hash, tmpl, tmpl.join(fields))


def _ascii_field(field: str, text: str) -> bytes:
    kind = _FIELD_KINDS[field]
    if kind == _STRING:
        return text.encode("utf-8", "surrogateescape") + b"\0"
    if not text:
        return b""
    if kind in (_NG_DIGEST, _NGV2_DIGEST):
        prefix, colon, digest = text.rpartition(":")
        if not colon:
            raise ValueError(f"digest {text[:40]!r} has no '<algo>:' prefix")
        return prefix.encode("ascii") + b":\0" + _unhex(digest)
    return _unhex(text)


def _unhex(text: str) -> bytes:
    return binascii.a2b_hex(text.encode("ascii"))


# --- checks and replay -----------------------------------------------------------------------------


def bad_template_hashes(entries: Sequence[ImaEntry], first_index: int = 0) -> tuple[int, ...]:
    """Indices (plus FIRST_INDEX) whose template hash is not SHA-1 of the template data.

    Invalidated entries (all-zero template hash) are not failures: the kernel
    records violations that way on purpose.
    """
    sha1 = hashlib.sha1
    zero = ZERO_TEMPLATE_HASH
    return tuple(first_index + i for i, e in enumerate(entries)
                 if e.template_hash != zero and sha1(e.template_data).digest() != e.template_hash)


def _check_bank(bank: str) -> int:
    size = _BANK_SIZES.get(bank)
    if size is None:
        raise InputError(f"unknown PCR bank {bank!r} (expected one of {', '.join(_BANKS)})")
    return size


def _fold(bank: str, value: bytes, entries: Iterable[ImaEntry], pcr: int) -> bytes:
    """Extend VALUE with each entry of PCR, as the kernel extends that bank."""
    h = _BANKS[bank]
    zero = ZERO_TEMPLATE_HASH
    if bank == "sha1":
        ones20 = b"\xff" * 20
        for e in entries:
            if e.pcr == pcr:
                th = e.template_hash
                value = h(value + (ones20 if th == zero else th)).digest()
        return value
    ones = b"\xff" * _BANK_SIZES[bank]
    for e in entries:
        if e.pcr == pcr:
            value = h(value + (ones if e.template_hash == zero else h(e.template_data).digest())).digest()
    return value


def replay_ima(entries: Iterable[ImaEntry], bank: str = "sha256", start: bytes | None = None,
               pcr: int = IMA_PCR) -> bytes:
    """The value of PCR (10) in BANK after the entries measured into it, from START (zeros)."""
    size = _check_bank(bank)
    if start is not None and len(start) != size:
        raise InputError(f"a {bank} PCR value is {size} bytes, not {len(start)}")
    return _fold(bank, bytes(size) if start is None else start, entries, pcr)


@dataclass(frozen=True)
class ImaReplay:
    """Where a replay stands: a re-check folds in only the entries after COUNT."""

    bank: str
    count: int  # entries consumed, of every PCR: the index of the next one
    pcr_value: bytes
    pcr: int = IMA_PCR

    @classmethod
    def initial(cls, bank: str = "sha256", pcr: int = IMA_PCR) -> ImaReplay:
        return cls(bank, 0, bytes(_check_bank(bank)), pcr)


def replay_more(state: ImaReplay, new_entries: Sequence[ImaEntry]) -> ImaReplay:
    """STATE advanced by the entries that follow the COUNT already replayed."""
    _check_bank(state.bank)
    return ImaReplay(state.bank, state.count + len(new_entries),
                     _fold(state.bank, state.pcr_value, new_entries, state.pcr), state.pcr)


def replay_until(entries: Sequence[ImaEntry], target: bytes, state: ImaReplay) -> ImaReplay | None:
    """The first state from STATE on, through ENTRIES (those after state.count), whose value is TARGET.

    IMA appends to its list before it extends the PCR, so a list read after a
    quote may hold entries the quote does not: the verifier replays until the
    quoted value and leaves the rest for the next check. None if never reached.
    """
    if state.pcr_value == target:
        return state
    h = _BANKS[state.bank]
    ones = b"\xff" * _BANK_SIZES[state.bank]
    zero = ZERO_TEMPLATE_HASH
    value = state.pcr_value
    for i, e in enumerate(entries, 1):
        if e.pcr != state.pcr:
            continue
        if e.template_hash == zero:
            digest = ones
        elif state.bank == "sha1":
            digest = e.template_hash
        else:
            digest = h(e.template_data).digest()
        value = h(value + digest).digest()
        if value == target:
            return ImaReplay(state.bank, state.count + i, value, state.pcr)
    return None


def find_boot_aggregate(entries: Sequence[ImaEntry]) -> ImaEntry | None:
    """The boot_aggregate entry, which IMA writes first; None if the list does not start with it.

    Only the first entry counts: a file's event name can also be
    "boot_aggregate" (a relative name when the path is unavailable).
    """
    return entries[0] if entries and entries[0].path == BOOT_AGGREGATE else None


def boot_aggregate_pcrs(algo: str) -> tuple[int, ...]:
    """The PCRs the kernel's boot_aggregate covers in bank ALGO: 0-7, and 8-9 for every bank but sha1
    (Linux 5.8 on; ima_calc_boot_aggregate_tfm leaves 8-9 out of sha1 "to avoid ambiguity")."""
    _check_bank(algo)
    return tuple(range(8) if algo == "sha1" else range(10))


def boot_aggregate_digest(pcr_values: Mapping[int, bytes], algo: str) -> bytes:
    """The boot_aggregate digest the kernel computes from the TPM's ALGO bank.

    The ALGO hash of the values of ``boot_aggregate_pcrs(ALGO)`` concatenated
    in order (ima_calc_boot_aggregate_tfm).
    """
    size = _check_bank(algo)
    indices = boot_aggregate_pcrs(algo)
    missing = [i for i in indices if len(pcr_values.get(i, b"")) != size]
    if missing:
        raise EvidenceError(f"boot_aggregate needs {algo} PCRs {', '.join(map(str, missing))}")
    return _BANKS[algo](b"".join(pcr_values[i] for i in indices)).digest()


def boot_aggregate_problem(entries: Sequence[ImaEntry], bank: str, pcr_values: Mapping[int, bytes]) -> str | None:
    """Why the list's boot_aggregate is not what the quoted PCR_VALUES of BANK make, or None when it is.

    The kernel reads the bank of IMA's hash algorithm (else sha256, else
    sha1) and records it as the entry's digest algorithm, so the entry must
    name BANK. The PCRs are the ones quoted now: the boot PCRs 0-9 do not
    change after the kernel starts, so they are the values it hashed. Only
    meaningful for entries that replay to a quoted PCR 10.
    """
    entry = find_boot_aggregate(entries)
    if entry is None:
        return "the IMA list does not start with boot_aggregate"
    if entry.file_digest_algo != bank:
        return (f"boot_aggregate is a {entry.file_digest_algo or 'plain'} digest, "
                f"not over the quoted {bank} PCRs")
    missing = [i for i in boot_aggregate_pcrs(bank) if i not in pcr_values]
    if missing:
        return f"boot_aggregate cannot be checked: the quote does not cover PCRs {', '.join(map(str, missing))}"
    expected = boot_aggregate_digest(pcr_values, bank)
    if entry.file_digest != expected:
        covered = boot_aggregate_pcrs(bank)
        return (f"boot_aggregate {entry.file_digest.hex()[:16]}... is not the digest of the quoted PCRs "
                f"{covered[0]}-{covered[-1]} ({expected.hex()[:16]}...)")
    return None


# --- allowlist -------------------------------------------------------------------------------------


class ImaFailureReason(str, Enum):
    NOT_IN_ALLOWLIST = "not-in-allowlist"
    DIGEST_NOT_ALLOWED = "digest-not-allowed"
    REQUIRED_NOT_MEASURED = "required-not-measured"
    BAD_TEMPLATE_HASH = "bad-template-hash"
    INVALIDATED = "invalidated"


_REASON_TEXT = {
    ImaFailureReason.NOT_IN_ALLOWLIST: "is not in the allowlist",
    ImaFailureReason.DIGEST_NOT_ALLOWED: "has a digest the allowlist does not allow",
    ImaFailureReason.REQUIRED_NOT_MEASURED: "must be measured but never was",
    ImaFailureReason.BAD_TEMPLATE_HASH: "has a template hash that does not match its data",
    ImaFailureReason.INVALIDATED: "was measured while open for writing or changed while measured (violation)",
}


@dataclass(frozen=True)
class ImaFailure:
    reason: ImaFailureReason
    path: str
    digest: str  # "<algo>:<hex>", "" when nothing was measured
    index: int | None  # the entry, None for a required path never measured

    def __str__(self) -> str:
        where = "" if self.index is None else f"entry {self.index}: "
        digest = f" ({self.digest[:24]}...)" if self.digest else ""
        return f"{where}{self.path}{digest} {_REASON_TEXT[self.reason]}"

    def to_json(self) -> dict[str, object]:
        return {"reason": self.reason.value, "path": self.path, "digest": self.digest, "index": self.index}


def exclude_matcher(excludes: Iterable[str]) -> Callable[[str], bool]:
    """A test for paths to ignore: each exclude is a glob if it has * ? or [, else a path prefix."""
    patterns = list(excludes)
    prefixes = tuple(p for p in patterns if not any(c in p for c in "*?["))
    globs = [fnmatch.translate(p) for p in patterns if any(c in p for c in "*?[")]
    glob = re.compile("|".join(globs)).match if globs else None
    return lambda path: path.startswith(prefixes) or (glob is not None and glob(path) is not None)


def check_allowlist(entries: Sequence[ImaEntry], allowlist: Mapping[str, frozenset[str]],
                    required: Iterable[str] = (), excludes: Iterable[str] = ()) -> tuple[ImaFailure, ...]:
    """Every failure of ENTRIES against ALLOWLIST (path -> allowed hex digests), in list order.

    An entry with a bad template hash is reported as such and nothing else is
    believed of it (it neither fails nor satisfies the allowlist). EXCLUDES
    skip the allowlist, not the template hash check, and never apply to a
    required path: what trusted launch relies on is always digest-checked,
    wherever it lives. Paths are as the kernel writes them (spaces
    become "_"). boot_aggregate is checked against the quoted PCRs
    (boot_aggregate_digest), so exclude it here.
    """
    matches_exclude = exclude_matcher(excludes)
    required = tuple(dict.fromkeys(required))
    must = frozenset(required)

    def excluded(path: str) -> bool:
        return path not in must and matches_exclude(path)

    allowed = {p: frozenset(d.lower() for d in ds) for p, ds in allowlist.items()}
    bad = set(bad_template_hashes(entries))
    seen: set[str] = set()
    failures: list[ImaFailure] = []
    for i, e in enumerate(entries):
        digest = f"{e.file_digest_algo}:{e.file_digest.hex()}" if e.file_digest_algo else ""
        if i in bad:
            failures.append(ImaFailure(ImaFailureReason.BAD_TEMPLATE_HASH, e.path, digest, i))
            continue
        seen.add(e.path)
        if excluded(e.path):
            continue
        if e.invalidated:
            failures.append(ImaFailure(ImaFailureReason.INVALIDATED, e.path, digest, i))
            continue
        ok = allowed.get(e.path)
        if ok is None:
            failures.append(ImaFailure(ImaFailureReason.NOT_IN_ALLOWLIST, e.path, digest, i))
        elif e.file_digest.hex() not in ok:
            failures.append(ImaFailure(ImaFailureReason.DIGEST_NOT_ALLOWED, e.path, digest, i))
    for path in required:
        if path not in seen:
            failures.append(ImaFailure(ImaFailureReason.REQUIRED_NOT_MEASURED, path, "", None))
    return tuple(failures)


# --- the whole judgement --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImaJudgement:
    """What a verifier concludes from an IMA list: the PCR value it replays to, and every problem."""

    pcr_value: bytes  # up to the quoted value when reached, else the whole list's; b"" if unreadable
    problems: tuple[str, ...]  # parse error, boot_aggregate, template hashes, allowlist failures


def judge_ima_list(data: bytes, bank: str, quoted: Mapping[int, bytes] | None,
                   allowlist: Mapping[str, frozenset[str]] | None, required: Iterable[str] = (),
                   excludes: Iterable[str] = ()) -> ImaJudgement:
    """Parse, replay and check an IMA list as host attestation does (QUOTED: the verified quote's PCRs).

    IMA appends before it extends, so with a quoted PCR 10 only the entries up
    to the first that replays to it are judged, and the first entry must be
    the quoted boot PCRs' boot_aggregate; without (or never reaching) it the
    whole list is. With an ALLOWLIST every judged entry is checked against it
    (check_allowlist, boot_aggregate excluded); without, only template hashes.

    A host that passes is the common case and its list is nearly all ima-ng
    entries with sha256 digests: those are judged in one pass over the bytes
    (_judge_plain), with no entry objects. The first entry it cannot vouch for
    sends the whole list to the general path below, which says what is wrong.
    """
    target = quoted.get(IMA_PCR) if quoted else None
    required = tuple(required)
    must = frozenset(required)
    exclude = exclude_matcher((*excludes, BOOT_AGGREGATE))
    try:
        fast = _judge_plain(data, bank, target, quoted or {}, allowlist, must, exclude)
    except (EvidenceError, ValueError, struct.error, IndexError):
        fast = None  # the general path finds the same and says where
    if fast is not None:
        return ImaJudgement(fast, ())
    return _judge_general(data, bank, target, quoted, allowlist, required, excludes)


def _judge_general(data: bytes, bank: str, target: bytes | None, quoted: Mapping[int, bytes] | None,
                   allowlist: Mapping[str, frozenset[str]] | None, required: Iterable[str],
                   excludes: Iterable[str]) -> ImaJudgement:
    """judge_ima_list for any list: entry objects, every failure named."""
    problems: list[str] = []
    value = b""
    try:
        entries = parse_ima_list(data)
        state = replay_until(entries, target, ImaReplay.initial(bank)) if target else None
        if state is not None:
            entries, value = entries[:state.count], state.pcr_value
            # Authenticated by the quote: its first entry must be the quoted boot PCRs' digest.
            problem = boot_aggregate_problem(entries, bank, quoted or {})
            if problem is not None:
                problems.append(problem)
        else:
            value = replay_ima(entries, bank)
        if allowlist is None:
            problems += [f"entry {i}: template hash does not match its data" for i in bad_template_hashes(entries)]
        else:  # the allowlist check reports bad template hashes itself
            problems += [str(f) for f in check_allowlist(entries, allowlist, required, (*excludes, BOOT_AGGREGATE))]
    except EvidenceError as err:
        return ImaJudgement(value, (*problems, str(err)))
    return ImaJudgement(value, tuple(problems))


def _judge_plain(data: bytes, bank: str, target: bytes | None, quoted: Mapping[int, bytes],
                 allowlist: Mapping[str, frozenset[str]] | None, must: frozenset[str],
                 excluded: Callable[[str], bool]) -> bytes | None:
    """The replayed PCR value when every judged entry is a plain ima-ng entry that passes; else None.

    Plain (see _fold_plain_binary): PCR 10, template "ima-ng", a sha256 file
    digest, a NUL-terminated name, its template hash right. Passes: allowed by
    the allowlist (or excluded, but never a required path), every required
    path measured, and the first entry the quoted boot_aggregate when the
    target is reached. Anything else, however harmless, is None: the general
    path decides it.
    """
    if bank != "sha256":
        return None  # its boot_aggregate is a sha256 digest; other banks take the general path
    binary = b"\0" in data[:64]
    folded = _fold_plain(data, binary, target)
    if folded is None:
        return None
    value, end, entries = folded
    if end < len(data):  # unjudged, but a list must be whole to be believed
        if binary:
            parse_ima_binary(data, end)
        else:
            parse_ima_ascii(str(data[end:], "ascii"))
    if not entries or entries[0][0] != BOOT_AGGREGATE:
        return None
    if allowlist is not None:
        allowed = allowlist.get
        for path, digest_hex in entries:
            ok = allowed(path)
            if (ok is None or digest_hex not in ok) and (path in must or not excluded(path)):
                return None
    if must and not must <= {path for path, _ in entries}:
        return None
    if value == target:
        # The quoted boot PCRs must be the first entry's digest (boot_aggregate_problem).
        if any(len(quoted.get(i, b"")) != 32 for i in boot_aggregate_pcrs(bank)):
            return None
        if bytes.fromhex(entries[0][1]) != boot_aggregate_digest(quoted, bank):
            return None
    return value


# The fold: the per-entry loop of _judge_plain (parse, template-hash check, replay), on bytes alone.
# _fold_plain_binary and _fold_plain_ascii are the reference; the compiled _ima_fold.fold (built
# with the package, from _ima_fold.c) must equal them on every input and is used when present.
Folded = tuple[bytes, int, list[tuple[str, str]]]  # PCR 10 (sha256), where it stopped, (name, digest hex) each

# A d-ng field of a sha256 file digest, length first: what nearly every ima-ng entry carries.
_PLAIN_DIGEST = _u32(40) + b"sha256:\0"
_PLAIN_TEMPLATE = _u32(6) + b"ima-ng"
# PCR, template hash, template name (length and "ima-ng"), template data length, d-ng prefix, digest, n-ng length.
_PLAIN_HEAD = struct.Struct("<I20s10sI12s32sI")
_U32_OF = [_u32(n) for n in range(4097)]  # a name's length field, up to PATH_MAX and its NUL


def _fold_plain_binary(buf: bytes, target: bytes | None) -> Folded | None:
    """Fold binary entries from the start while each is plain, up to the one that reaches TARGET."""
    h, sha1 = hashlib.sha256, hashlib.sha1
    value = bytes(32)
    entries: list[tuple[str, str]] = []
    append = entries.append
    end = len(buf)
    pos = 0
    fixed = _PLAIN_HEAD.unpack_from
    find = buf.find
    try:
        while pos < end:
            pcr, template_hash, template, td_len, digest_prefix, digest, n_len = fixed(buf, pos)
            td_end = pos + 38 + td_len
            # The name: NUL-terminated, no other NUL, at least one character.
            if pcr != IMA_PCR or template != _PLAIN_TEMPLATE or digest_prefix != _PLAIN_DIGEST \
                    or td_len != 48 + n_len or td_end > end or find(b"\0", pos + 86, td_end) != td_end - 1 \
                    or n_len < 2:
                return None
            td = buf[pos + 38:td_end]
            if sha1(td).digest() != template_hash:
                return None
            value = h(value + h(td).digest()).digest()
            append((buf[pos + 86:td_end - 1].decode(), digest.hex()))  # strict UTF-8, else the general path
            pos = td_end
            if value == target:
                break
    except (struct.error, UnicodeDecodeError):
        return None
    return value, pos, entries


def _fold_plain_ascii(data: bytes, target: bytes | None) -> Folded | None:
    """Fold ASCII lines from the start while each is plain, up to the one that reaches TARGET."""
    if not data.isascii() or b"\0" in data or data[-1:] not in (b"", b"\n"):
        return None  # a last line without newline is truncated: the general path says so
    h, sha1 = hashlib.sha256, hashlib.sha1
    value = bytes(32)
    entries: list[tuple[str, str]] = []
    append = entries.append
    a2b = binascii.a2b_hex
    lengths = _U32_OF
    prefix = _PLAIN_DIGEST
    pos = 0
    lines = data.decode("ascii").split("\n")
    lines.pop()
    try:
        for line in lines:
            # "10 <40 hex> ima-ng sha256:<64 hex> <name>": every column but the name at a fixed place.
            path = line[123:]
            if line[:3] != "10 " or line[43:58] != " ima-ng sha256:" or line[122:123] != " " or " " in path:
                return None
            hash_text, digest_hex = line[3:43], line[58:122]
            name = path.encode()
            td = prefix + a2b(digest_hex) + lengths[len(name) + 1] + name + b"\0"
            # Lowercase hex as the kernel writes it; other text is left to the general path.
            if sha1(td).hexdigest() != hash_text:
                return None
            value = h(value + h(td).digest()).digest()
            append((path, digest_hex))
            pos += len(line) + 1
            if value == target:
                break
    except (ValueError, IndexError):  # not hex; a name past PATH_MAX
        return None
    return value, pos, entries


def _fold_reference(data: bytes, binary: bool, target: bytes | None) -> Folded | None:
    buf = data if type(data) is bytes else bytes(data)
    return _fold_plain_binary(buf, target) if binary else _fold_plain_ascii(buf, target)


try:
    from ._ima_fold import fold as _fold_plain  # built from _ima_fold.c with the package
except ImportError:  # a source tree nobody built: the reference, 1.5-3x slower (benchmarks/ima_judge.py)
    _fold_plain = _fold_reference


# --- writing (tests, benchmarks, fixtures) ---------------------------------------------------------


def _event_name(path: str) -> bytes:
    name = path.encode("utf-8", "surrogateescape")
    if b"\0" in name:
        raise ValueError("an IMA event name cannot contain NUL")
    return name.replace(b" ", b"_") + b"\0"  # the kernel's ima_write_template_field_data


def _digest_field(template: _Template, algo: str, digest: bytes) -> bytes:
    if len(digest) != _DIGEST_SIZES.get(algo, -1):
        raise ValueError(f"a {algo} digest is {_DIGEST_SIZES.get(algo)} bytes, not {len(digest)}")
    kind = _FIELD_KINDS[template.fields[0]]
    if kind == _RAW_DIGEST:
        if algo != "sha1":
            raise ValueError("the 'ima' template records sha1 digests only")
        return digest
    return (f"ima:{algo}" if kind == _NGV2_DIGEST else algo).encode() + b":\0" + digest


def _make(template: str, fields: Sequence[bytes], pcr: int) -> ImaEntry:
    tmpl = _template(template)
    td = tmpl.join(fields)
    return _entry(pcr, hashlib.sha1(td).digest(), tmpl, td)


def ima_ng_entry(path: str, file_bytes_digest: bytes, algo: str = "sha256", template: str = "ima-ng",
                 signature: bytes = b"", pcr: int = IMA_PCR) -> ImaEntry:
    """The entry the kernel records for a file with this content digest.

    TEMPLATE is "ima-ng", "ima-sig", "ima-ngv2", "ima-sigv2" or "ima" (sha1
    only, names up to 255 bytes); a SIGNATURE needs a template with a sig field.
    """
    tmpl = _template(template)
    if tmpl.fields[1:] not in (("n",), ("n-ng",), ("n-ng", "sig")):
        raise ValueError(f"template {template!r} does not record a file digest and name")
    if signature and "sig" not in tmpl.fields:
        raise ValueError(f"template {template!r} has no signature field")
    fields = [_digest_field(tmpl, algo, file_bytes_digest), _event_name(path)]
    if "sig" in tmpl.fields:
        fields.append(signature)
    return _make(template, fields, pcr)


def boot_aggregate_entry(digest: bytes, template: str = "ima-ng", pcr: int = IMA_PCR) -> ImaEntry:
    """The first entry of every list; the algo follows the digest's size (sha1, sha256, sha384, sha512)."""
    algo = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}.get(len(digest))
    if algo is None:
        raise ValueError(f"no boot_aggregate algo has {len(digest)}-byte digests")
    return ima_ng_entry(BOOT_AGGREGATE, digest, algo, template, pcr=pcr)


def ima_buf_entry(name: str, buf: bytes, algo: str = "sha256", pcr: int = IMA_PCR) -> ImaEntry:
    """An ima-buf entry (kexec-cmdline, keys, critical data): the buffer and its digest."""
    tmpl = _template("ima-buf")
    return _make("ima-buf", [_digest_field(tmpl, algo, hashlib.new(algo, buf).digest()), _event_name(name), buf], pcr)


def violation_entry(path: str, algo: str = "sha256", template: str = "ima-ng", pcr: int = IMA_PCR) -> ImaEntry:
    """An invalidated measurement as the kernel records it: zero digest, zero template hash."""
    return replace(ima_ng_entry(path, bytes(_DIGEST_SIZES.get(algo, 0)), algo, template, pcr=pcr),
                   template_hash=ZERO_TEMPLATE_HASH)


def to_binary(entries: Iterable[ImaEntry]) -> bytes:
    """binary_runtime_measurements for ENTRIES, from their template data and template hash."""
    out: list[bytes] = []
    for e in entries:
        if len(e.template_hash) != 20:
            raise ValueError("a template hash is 20 bytes")
        tmpl = _template(e.template_name)
        name = e.template_name.encode("ascii")
        out.append(_HEAD.pack(e.pcr, e.template_hash, len(name)) + name)
        if tmpl.legacy:
            digest, file_name = tmpl.split(e.template_data)
            out.append(digest + _u32(len(file_name) - 1) + file_name[:-1])
        else:
            out.append(_u32(len(e.template_data)) + e.template_data)
    return b"".join(out)


def to_ascii(entries: Iterable[ImaEntry]) -> str:
    """ascii_runtime_measurements for ENTRIES, character for character as the kernel shows it."""
    lines: list[str] = []
    for e in entries:
        tmpl = _template(e.template_name)
        columns = [f"{e.pcr:2d} {e.template_hash.hex()} {e.template_name}"]
        for field, value in zip(tmpl.fields, tmpl.split(e.template_data)):
            kind = _FIELD_KINDS[field]
            if not value:
                text = ""
            elif kind == _STRING:
                text = value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind in (_NG_DIGEST, _NGV2_DIGEST):
                sep = value.index(b":\0")
                text = value[:sep + 1].decode("ascii") + value[sep + 2:].hex()
            else:
                text = value.hex()
            columns.append(text)
        lines.append(" ".join(columns) + "\n")
    return "".join(lines)
