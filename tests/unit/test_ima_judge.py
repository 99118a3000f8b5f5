"""judge_ima_list: the one-pass judgement of plain lists says exactly what the general path says.

The reference is the general path alone (entry objects: parse, replay to the
quoted PCR 10, boot_aggregate against PCRs 0-9, check_allowlist or the
template hashes alone, as host attestation composed them before the fast path
existed): every case, passing or not, binary and ASCII, must give the same PCR
value and the same problems.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import pytest

from tests.components import require
from tvorch.core.attestation import ima
from tvorch.core.attestation.hostpolicy import DEFAULT_EXCLUDES
from tvorch.core.attestation.ima import (
    IMA_PCR,
    _judge_general,
    ImaEntry,
    boot_aggregate_digest,
    boot_aggregate_entry,
    ima_buf_entry,
    ima_ng_entry,
    judge_ima_list,
    replay_ima,
    to_ascii,
    to_binary,
    violation_entry,
)

@pytest.fixture(autouse=True, params=["compiled", "reference"])
def fold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case twice: with the compiled fold the judgement uses, and with its Python reference."""
    if request.param == "reference":
        monkeypatch.setattr(ima, "_fold_plain", ima._fold_reference)
    else:
        require(ima._fold_plain is not ima._fold_reference, "tvorch's compiled IMA fold is not built")


PCRS = {i: hashlib.sha256(b"PCR %d" % i).digest() for i in range(10)}
REQUIRED = ("/usr/bin/qemu-system-x86_64",)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def files(n: int = 6) -> list[ImaEntry]:
    return [boot_aggregate_entry(boot_aggregate_digest(PCRS, "sha256")),
            ima_ng_entry("/usr/bin/qemu-system-x86_64", sha(b"qemu"))] + [
        ima_ng_entry(f"/usr/lib/lib{i}.so", sha(b"%d" % i)) for i in range(n)]


def allow(entries: list[ImaEntry]) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for e in entries[1:]:
        out.setdefault(e.path, set()).add(e.file_digest.hex())
    return {p: frozenset(d) for p, d in out.items()}


def reference(data: bytes, bank: str, quoted: dict[int, bytes] | None,
              allowlist: dict[str, frozenset[str]] | None) -> tuple[bytes, tuple[str, ...]]:
    """The general path alone: entry objects, every failure named."""
    judged = _judge_general(data, bank, quoted.get(IMA_PCR) if quoted else None, quoted, allowlist,
                            REQUIRED if allowlist is not None else (), DEFAULT_EXCLUDES)
    return judged.pcr_value, judged.problems


def quote_of(entries: list[ImaEntry], bank: str = "sha256") -> dict[int, bytes]:
    return {**PCRS, IMA_PCR: replay_ima(entries, bank)}


Case = Callable[[], tuple[list[ImaEntry], dict[int, bytes] | None, dict[str, frozenset[str]] | None]]


def _passing():
    e = files()
    return e, quote_of(e), allow(e)


def _quote_before_the_last_two():
    e = files()
    return e + [ima_ng_entry("/usr/bin/unknown", sha(b"x")), violation_entry("/etc/x")], quote_of(e), allow(e)


def _digest_not_allowed():
    e = files()
    a = allow(e)
    a["/usr/lib/lib3.so"] = frozenset({sha(b"other").hex()})
    return e, quote_of(e), a


def _not_in_allowlist_but_excluded():
    e = files() + [ima_ng_entry("/tmp/build.sh", sha(b"t"))]
    return e, quote_of(e), allow(e[:-1])


def _required_under_exclude_with_wrong_digest():
    e = files()
    e[1] = ima_ng_entry("/usr/bin/qemu-system-x86_64", sha(b"evil"))
    return e, quote_of(e), allow(files())


def _required_never_measured():
    e = files()
    del e[1]
    return e, quote_of(e), allow(files())


def _bad_template_hash():
    e = files()
    e[4] = dataclasses.replace(e[4], template_hash=bytes(19) + b"\x01")
    return e, quote_of(e), allow(e)


def _violation():
    e = files() + [violation_entry("/usr/lib/lib1.so")]
    return e, quote_of(e), allow(e)


def _wrong_boot_aggregate():
    e = files()
    e[0] = boot_aggregate_entry(sha(b"another boot"))
    return e, quote_of(e), allow(e)


def _boot_aggregate_not_first():
    e = files()
    e[0], e[1] = e[1], e[0]
    return e, quote_of(e), allow(e)


def _irregular_entries():
    e = files()
    e.insert(3, ima_ng_entry("/usr/lib/signed.so", sha(b"s"), template="ima-sig", signature=b"\x03sig"))
    e.insert(4, ima_buf_entry("kexec-cmdline", b"console=ttyS0"))
    e.insert(5, ima_ng_entry("/usr/lib/lib1.so", hashlib.sha1(b"1").digest(), algo="sha1"))
    e.insert(6, ima_ng_entry("/usr/lib/lib2.so", sha(b"2"), pcr=11))
    return e, quote_of(e), allow(e)


def _spaces_and_non_ascii():
    e = files() + [ima_ng_entry("/srv/my file", sha(b"a")), ima_ng_entry("/srv/caf\u00e9", sha(b"b"))]
    return e, quote_of(e), allow(e)


def _no_quote():
    e = files()
    return e, None, allow(e)


def _quote_never_reached():
    e = files()
    return e, {**PCRS, IMA_PCR: sha(b"elsewhere")}, allow(e)


def _no_allowlist():
    e = files()
    e[3] = dataclasses.replace(e[3], template_hash=bytes(19) + b"\x02")
    return e, quote_of(e), None


def _empty():
    return [], quote_of([]), {}


def _uppercase_allowlist():
    e = files()
    return e, quote_of(e), {p: frozenset(d.upper() for d in ds) for p, ds in allow(e).items()}


def _boot_pcr_missing():
    e = files()
    q = quote_of(e)
    del q[9]
    return e, q, allow(e)


CASES = {f.__name__.lstrip("_"): f for f in (
    _passing, _quote_before_the_last_two, _digest_not_allowed, _not_in_allowlist_but_excluded,
    _required_under_exclude_with_wrong_digest, _required_never_measured, _bad_template_hash, _violation,
    _wrong_boot_aggregate, _boot_aggregate_not_first, _irregular_entries, _spaces_and_non_ascii, _no_quote,
    _quote_never_reached, _no_allowlist, _empty, _uppercase_allowlist, _boot_pcr_missing)}


PASSING = {"passing", "quote_before_the_last_two", "not_in_allowlist_but_excluded", "no_quote", "quote_never_reached",
           "uppercase_allowlist", "irregular_entries", "spaces_and_non_ascii"}


@pytest.mark.parametrize("form", ["binary", "ascii"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_judgement_equals_the_general_path(case: str, form: str) -> None:
    entries, quoted, allowlist = CASES[case]()
    data = to_binary(entries) if form == "binary" else to_ascii(entries).encode()
    judged = judge_ima_list(data, "sha256", quoted, allowlist, REQUIRED if allowlist is not None else (),
                            DEFAULT_EXCLUDES)
    expected = reference(data, "sha256", quoted, allowlist)
    assert (judged.pcr_value, judged.problems) == expected
    assert (expected[1] == ()) == (case in PASSING), expected[1]


@pytest.mark.parametrize("form", ["binary", "ascii"])
def test_damage_after_the_quoted_entries_is_still_refused(form: str) -> None:
    """Entries past the quoted PCR 10 are not judged, but a list cut short is not believed."""
    entries = files()
    quoted = quote_of(entries)
    more = entries + [ima_ng_entry("/usr/bin/later", sha(b"l"))]
    data = to_binary(more)[:-3] if form == "binary" else to_ascii(more).encode()[:-1]
    judged = judge_ima_list(data, "sha256", quoted, allow(entries), REQUIRED, DEFAULT_EXCLUDES)
    assert judged == judge_ima_list(data, "sha256", quoted, allow(entries), REQUIRED, DEFAULT_EXCLUDES)
    assert (judged.pcr_value, judged.problems) == reference(data, "sha256", quoted, allow(entries))
    assert judged.problems and "truncated" in judged.problems[-1]


def test_sha1_bank() -> None:
    entries = [boot_aggregate_entry(hashlib.sha1(b"".join(PCRS[i][:20] for i in range(8))).digest())] + files()[1:]
    data = to_binary(entries)
    quoted = {i: PCRS[i][:20] for i in range(8)} | {IMA_PCR: replay_ima(entries, "sha1")}
    judged = judge_ima_list(data, "sha1", quoted, allow(entries), REQUIRED, DEFAULT_EXCLUDES)
    assert (judged.pcr_value, judged.problems) == reference(data, "sha1", quoted, allow(entries))


@pytest.mark.parametrize("form", ["binary", "ascii"])
def test_every_damaged_byte_is_judged_as_the_general_path_does(form: str) -> None:
    """A flipped bit anywhere (framing, PCR, template, digest, name, hash): the same PCR value and problems."""
    entries = files(2)
    quoted = quote_of(entries)
    allowlist = allow(entries)
    data = to_binary(entries) if form == "binary" else to_ascii(entries).encode()
    for i in range(len(data)):
        for bit in (0x01, 0x20):
            damaged = data[:i] + bytes([data[i] ^ bit]) + data[i + 1:]
            judged = judge_ima_list(damaged, "sha256", quoted, allowlist, REQUIRED, DEFAULT_EXCLUDES)
            assert (judged.pcr_value, judged.problems) == reference(damaged, "sha256", quoted, allowlist), (i, bit)


def test_a_plain_passing_list_is_judged_in_one_pass() -> None:
    """The fast path vouches for a plain list that passes (else the benchmark's rate is the general path's)."""
    from tvorch.core.attestation.ima import _judge_plain, exclude_matcher

    entries = files()
    for data in (to_binary(entries), to_ascii(entries).encode()):
        assert _judge_plain(data, "sha256", quote_of(entries)[IMA_PCR], quote_of(entries), allow(entries),
                            frozenset(REQUIRED), exclude_matcher((*DEFAULT_EXCLUDES, "boot_aggregate"))) == quote_of(entries)[IMA_PCR]
