"""The compiled IMA fold (_ima_fold.c) equals its Python reference on every input.

A passing host list is folded (parsed, template hashes checked, replayed) by
C code that reads bytes a relying party may have been handed: it must give
exactly what _fold_plain_binary / _fold_plain_ascii give, None included, on
well-formed lists, every damaged byte, every cut, random bytes and random
entries, and never read outside its input (the damaged and cut inputs are
the ones that would).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.components import require
from tvorch.core.attestation import ima
from tvorch.core.attestation.ima import (
    IMA_PCR,
    ImaEntry,
    boot_aggregate_entry,
    ima_buf_entry,
    ima_ng_entry,
    replay_ima,
    to_ascii,
    to_binary,
    violation_entry,
)

try:
    from tvorch.core.attestation._ima_fold import fold as native
except ImportError:  # the tests below fail under CI, skip elsewhere
    native = None


@pytest.fixture(autouse=True)
def _built() -> None:
    require(native is not None, "tvorch's compiled IMA fold is not built (make venv builds it)")


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def entries(n: int = 5) -> list[ImaEntry]:
    return [boot_aggregate_entry(sha(b"boot"))] + [ima_ng_entry(f"/usr/lib/lib{i}.so", sha(b"%d" % i)) for i in range(n)]


def forms(e: list[ImaEntry]) -> list[tuple[bytes, bool]]:
    return [(to_binary(e), True), (to_ascii(e).encode("utf-8", "surrogateescape"), False)]


def same(data: bytes, binary: bool, target: bytes | None) -> None:
    assert native(data, binary, target) == ima._fold_reference(data, binary, target), (data[:200], binary, target)


def targets(e: list[ImaEntry]) -> list[bytes | None]:
    return [None, replay_ima(e), replay_ima(e[:2]), sha(b"never")]


def test_the_judgement_uses_the_compiled_fold() -> None:
    assert ima._fold_plain is native


@pytest.mark.parametrize("binary", [True, False])
def test_a_plain_list_folds_to_its_replay_and_names_each_entry(binary: bool) -> None:
    e = entries()
    data = to_binary(e) if binary else to_ascii(e).encode()
    value, end, named = native(data, binary, None)
    assert value == replay_ima(e) and end == len(data)
    assert named == [(x.path, x.file_digest.hex()) for x in e]
    # Stops after the entry that reaches the target.
    value, end, named = native(data, binary, replay_ima(e[:3]))
    assert value == replay_ima(e[:3]) and len(named) == 3
    assert end == len(to_binary(e[:3]) if binary else to_ascii(e[:3]).encode())


LISTS = {
    "plain": entries(),
    "empty": [],
    "one": entries(0),
    "irregular": entries(2) + [ima_ng_entry("/x", sha(b"s"), template="ima-sig", signature=b"\x03")] + entries(1),
    "buffer": entries(2) + [ima_buf_entry("kexec-cmdline", b"console=ttyS0")],
    "sha1 digest": entries(2) + [ima_ng_entry("/y", hashlib.sha1(b"y").digest(), algo="sha1")],
    "pcr 11": entries(2) + [ima_ng_entry("/z", sha(b"z"), pcr=11)],
    "violation": entries(2) + [violation_entry("/etc/shadow")],
    "spaces (written as _)": entries(2) + [ima_ng_entry("/srv/my file", sha(b"a"))],
    "non-ascii": entries(2) + [ima_ng_entry("/srv/caf\u00e9", sha(b"b"))],
    "undecodable": entries(2) + [ima_ng_entry("/srv/\udcff", sha(b"c"))],
    "one-character name": entries(1) + [ima_ng_entry("a", sha(b"d"))],
    "longest ascii name": entries(1) + [ima_ng_entry("/" + "n" * 4094, sha(b"e"))],
    "name past the ascii limit": entries(1) + [ima_ng_entry("/" + "n" * 4095, sha(b"f"))],
    "very long name": entries(1) + [ima_ng_entry("/" + "n" * 70000, sha(b"g"))],
}


@pytest.mark.parametrize("name", sorted(LISTS))
def test_every_kind_of_list_folds_as_the_reference(name: str) -> None:
    e = LISTS[name]
    for data, binary in forms(e):
        for target in targets(e) if e else [None, sha(b"x")]:
            same(data, binary, target)
            same(bytearray(data), binary, target)  # what a caller may hand it


def test_the_cases_the_reference_refuses_are_refused() -> None:
    """Not a tautology: the reference and the compiled fold decline the same lists (None), not just agree."""
    for name in ("irregular", "buffer", "sha1 digest", "pcr 11", "violation", "undecodable"):
        for data, binary in forms(LISTS[name]):
            assert native(data, binary, None) is None, name
    assert native(to_ascii(LISTS["name past the ascii limit"]).encode(), False, None) is None
    assert native(to_binary(LISTS["very long name"]), True, None) is not None
    upper = to_ascii(entries(2)).encode()
    line = upper.split(b"\n")[1]
    assert native(upper.replace(line, line[:3] + line[3:43].upper() + line[43:]), False, None) is None


@pytest.mark.parametrize("binary", [True, False])
def test_every_damaged_byte_and_every_cut_folds_as_the_reference(binary: bool) -> None:
    e = entries(2)
    data = to_binary(e) if binary else to_ascii(e).encode()
    target = replay_ima(e)
    for i in range(len(data)):
        for bit in (0x01, 0x20, 0x80):
            same(data[:i] + bytes([data[i] ^ bit]) + data[i + 1:], binary, target)
        same(data[:i], binary, target)
        same(data[:i], binary, None)


def test_length_fields_that_point_outside_the_list_are_refused() -> None:
    data = bytearray(to_binary(entries(1)))
    first = len(to_binary(entries(0)))
    for field, value in ((first + 34, 0xFFFFFFFF), (first + 82, 0xFFFFFFFF), (first + 34, 0xFFFFFFCF),
                         (first + 82, 0xFFFFFFCF - 48)):
        damaged = bytearray(data)
        damaged[field:field + 4] = value.to_bytes(4, "little")
        assert native(bytes(damaged), True, None) is None
        same(bytes(damaged), True, None)


def test_bad_arguments_are_type_errors_not_crashes() -> None:
    with pytest.raises(TypeError):
        native("text", False, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native(b"", True, bytearray(32))  # type: ignore[arg-type]
    data = to_binary(entries())
    for target in (b"short", replay_ima(entries()) + b"\0"):  # never reached, as in the reference
        same(data, True, target)
        assert native(data, True, target)[1] == len(data)


paths = st.text(st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(paths, st.binary(min_size=32, max_size=32)), max_size=6), st.integers(0, 7))
def test_random_entries_fold_as_the_reference(files: list[tuple[str, bytes]], stop: int) -> None:
    e = [boot_aggregate_entry(sha(b"boot"))] + [ima_ng_entry(p, d) for p, d in files]
    for data, binary in forms(e):
        same(data, binary, replay_ima(e[:stop + 1]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_fold_as_the_reference(data: bytes, binary: bool) -> None:
    same(data, binary, None)
    same(to_binary(entries(1)) + data, True, None)
    same(to_ascii(entries(1)).encode() + data, False, None)


def test_pcr_index_is_the_ima_pcr() -> None:
    assert IMA_PCR == 10  # the compiled fold hard-codes it
