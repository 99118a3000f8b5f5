"""IMA measurement list: formats, template hashes, replay, incremental re-checks, allowlist, CLI.

This machine's kernel exposes no IMA list, so most lists here come from the
writer in tvorch.core.attestation.ima; what keeps that honest is (a) byte layouts and
PCR values computed independently in the tests with struct and hashlib, and
(b) lines the kernel really printed, quoted on the linux-integrity list,
whose template hashes only the kernel's exact data layout reproduces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvorch.cli import main
from tvorch.core.attestation.ima import (
    ImaFailure,
    ImaFailureReason,
    ImaReplay,
    bad_template_hashes,
    boot_aggregate_digest,
    boot_aggregate_entry,
    boot_aggregate_pcrs,
    boot_aggregate_problem,
    check_allowlist,
    exclude_matcher,
    find_boot_aggregate,
    ima_buf_entry,
    ima_ng_entry,
    parse_ima_ascii,
    parse_ima_binary,
    replay_ima,
    replay_more,
    replay_until,
    to_ascii,
    to_binary,
    violation_entry,
)
from tvorch.errors import EvidenceError, ExitCode, InputError

# Printed by Linux on real machines (linux-integrity mailing list, posts by the IMA
# maintainers): an ima-ng list without a TPM, an ima-buf entry, and an ima-sig list
# whose lines end in a space because the empty sig field keeps its separator.
KERNEL_ASCII = (
    "10 0adefe762c149c7cec19da62f0da1297fcfbffff ima-ng "
    "sha256:0000000000000000000000000000000000000000000000000000000000000000 boot_aggregate\n"
    "10 49ab61dd97ea2f759edcb6c6a3387ac67f0aa576 ima-buf "
    "sha256:0c907aab3261194f16b0c2a422a82f145bc9b9ecb8fdb633fa43e3e5379f0af2 kernel_version 372e312e302d7263312b\n"
    "10 7c23cc970eceec906f7a41bc2fbde770d7092209 ima-ng "
    "sha256:72ade6ae3d35cfe5ede7a77b1c0ed1d1782a899445fdcb219c0e994a084a70d5 /bin/busybox\n"
    "10 f60a05d7354fb34aabc02965216abd3428ea52bb ima-sig "
    "sha256:9887dd089ee19a6517bca10580b02c1bb9aa6cd86c157b6ead8a1c0403f348d5 boot_aggregate \n"
)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def ng_template_data(path: bytes, digest: bytes, algo: bytes = b"sha256", sig: bytes | None = None) -> bytes:
    """ima-ng / ima-sig template data assembled by hand, field by field."""
    d_ng = algo + b":\x00" + digest
    n_ng = path + b"\x00"
    td = u32(len(d_ng)) + d_ng + u32(len(n_ng)) + n_ng
    return td if sig is None else td + u32(len(sig)) + sig


def oracle_pcr(steps: list[tuple[bytes, bytes]], bank: str) -> bytes:
    """PCR 10 from (template hash, template data) pairs, one extend at a time."""
    h = getattr(hashlib, bank)
    size = h().digest_size
    value = bytes(size)
    for template_hash, td in steps:
        if template_hash == bytes(20):
            digest = b"\xff" * size
        elif bank == "sha1":
            digest = template_hash
        else:
            digest = h(td).digest()
        value = h(value + digest).digest()
    return value


def sample_entries() -> list:
    """One of each writer template, a violation and a few ordinary files."""
    return [
        boot_aggregate_entry(sha256(b"pcrs 0-9")),
        ima_ng_entry("/usr/bin/qemu-system-x86_64", sha256(b"qemu")),
        ima_ng_entry("/usr/bin/swtpm", sha256(b"swtpm"), template="ima-sig", signature=b"\x03\x02\x04sig-bytes"),
        ima_ng_entry("/usr/sbin/libvirtd", sha256(b"libvirtd"), template="ima-sig"),
        ima_ng_entry("/usr/lib/old.so", hashlib.sha1(b"old").digest(), algo="sha1", template="ima"),
        violation_entry("/var/log/syslog"),
        ima_buf_entry("kexec-cmdline", b"root=/dev/vda1 ro ima_policy=tcb"),
        ima_ng_entry("/opt/app/run me.sh", hashlib.sha512(b"x").digest(), algo="sha512"),
    ]


# --- formats ---------------------------------------------------------------------------------------


def test_kernel_output_parses_with_matching_template_hashes_and_is_reproduced_exactly():
    entries = parse_ima_ascii(KERNEL_ASCII)
    assert [e.template_name for e in entries] == ["ima-ng", "ima-buf", "ima-ng", "ima-sig"]
    assert [e.path for e in entries] == ["boot_aggregate", "kernel_version", "/bin/busybox", "boot_aggregate"]
    assert bad_template_hashes(entries) == ()
    assert entries[1].file_digest == sha256(b"7.1.0-rc1+")  # ima-buf: the digest of the buffer
    assert entries[3].signature == b"" and entries[0].signature is None
    assert to_ascii(entries) == KERNEL_ASCII
    assert parse_ima_binary(to_binary(entries)) == (entries, len(to_binary(entries)))


def test_binary_layout_of_ima_ng_and_ima_sig_is_the_kernels():
    digest = sha256(b"bash")
    ng = ima_ng_entry("/usr/bin/bash", digest)
    td = ng_template_data(b"/usr/bin/bash", digest)
    assert ng.template_data == td and ng.template_hash == hashlib.sha1(td).digest()
    assert to_binary([ng]) == u32(10) + hashlib.sha1(td).digest() + u32(6) + b"ima-ng" + u32(len(td)) + td

    sig = b"\x03\x02\x04\x11\x22\x33\x44\x00\x05abcde"
    signed = ima_ng_entry("/usr/bin/bash", digest, template="ima-sig", signature=sig)
    td_sig = ng_template_data(b"/usr/bin/bash", digest, sig=sig)
    assert signed.template_data == td_sig and signed.signature == sig
    assert to_binary([signed]) == u32(10) + hashlib.sha1(td_sig).digest() + u32(7) + b"ima-sig" + u32(len(td_sig)) + td_sig


def test_legacy_ima_template_layout_and_hash():
    """Binary: digest, u32 name length, name (no template data length); hashed with the name padded to 256."""
    digest = hashlib.sha1(b"init").digest()
    entry = ima_ng_entry("/sbin/init", digest, algo="sha1", template="ima")
    padded = digest + b"/sbin/init".ljust(256, b"\x00")
    assert entry.template_hash == hashlib.sha1(padded).digest() and entry.template_data == padded
    assert to_binary([entry]) == u32(10) + entry.template_hash + u32(3) + b"ima" + digest + u32(10) + b"/sbin/init"
    assert to_ascii([entry]) == f"10 {entry.template_hash.hex()} ima {digest.hex()} /sbin/init\n"
    assert (entry.file_digest_algo, entry.file_digest, entry.path) == ("sha1", digest, "/sbin/init")


@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_round_trip_every_writer_template(fmt):
    entries = sample_entries()
    parsed = parse_ima_binary(to_binary(entries))[0] if fmt == "binary" else parse_ima_ascii(to_ascii(entries))
    assert parsed == tuple(entries)
    assert bad_template_hashes(parsed) == ()
    assert parsed[2].signature == b"\x03\x02\x04sig-bytes" and parsed[3].signature == b""
    assert parsed[7].path == "/opt/app/run_me.sh"  # the kernel writes spaces as underscores


def test_ascii_line_format():
    text = to_ascii(sample_entries()[:4] + [dataclasses.replace(sample_entries()[1], pcr=9)])
    lines = text.splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    assert lines[1].startswith("10 ") and " ima-ng sha256:" in lines[1]
    assert lines[2].endswith(" 0302047369672d6279746573\n")  # ima-sig: the signature in hex
    assert lines[3].endswith("/usr/sbin/libvirtd \n")  # empty signature: the separator stays
    assert lines[4].startswith(" 9 ")  # "%2d"
    assert parse_ima_ascii(text)[4].pcr == 9
    # An editor that trimmed the trailing space loses nothing: the field was empty.
    assert parse_ima_ascii(lines[3].replace(" \n", "\n"))[0] == parse_ima_ascii(lines[3])[0]


def test_other_templates_ngv2_modsig_and_custom_format():
    digest = sha256(b"verity")
    v2 = ima_ng_entry("/usr/bin/v", digest, template="ima-sigv2", signature=b"\x06sig")
    assert v2.file_digest_algo == "ima:sha256"
    assert v2.template_data.startswith(u32(len(b"ima:sha256:\x00") + 32) + b"ima:sha256:\x00" + digest)
    # ima-modsig: d-ng | n-ng | sig | d-modsig | modsig, the last three possibly empty.
    fields = [b"sha256:\x00" + digest, b"/lib/modules/m.ko\x00", b"", b"sha256:\x00" + sha256(b"m"), b"PKCS7"]
    td = b"".join(u32(len(f)) + f for f in fields)
    custom_td = ng_template_data(b"/x", digest)
    log = (u32(10) + hashlib.sha1(td).digest() + u32(10) + b"ima-modsig" + u32(len(td)) + td
           + u32(10) + hashlib.sha1(custom_td).digest() + u32(9) + b"d-ng|n-ng" + u32(len(custom_td)) + custom_td)
    modsig, custom = parse_ima_binary(log)[0]
    assert (modsig.path, modsig.file_digest, modsig.signature) == ("/lib/modules/m.ko", digest, b"")
    assert (custom.template_name, custom.path) == ("d-ng|n-ng", "/x")
    for entries in ([v2, modsig, custom],):
        assert parse_ima_ascii(to_ascii(entries)) == tuple(entries)
        assert parse_ima_binary(to_binary(entries))[0] == tuple(entries)
        assert bad_template_hashes(entries) == ()
    assert to_ascii([modsig]).endswith(f" /lib/modules/m.ko  sha256:{sha256(b'm').hex()} {b'PKCS7'.hex()}\n")


def test_undecodable_path_bytes_round_trip():
    log = to_binary([ima_ng_entry("/tmp/\udcff\udcfe", sha256(b"x"))])
    (entry,) = parse_ima_binary(log)[0]
    assert entry.template_data.endswith(b"/tmp/\xff\xfe\x00")
    text = to_ascii([entry]).encode("utf-8", "surrogateescape")
    assert parse_ima_ascii(text.decode("utf-8", "surrogateescape")) == (entry,)


# --- template hashes and violations ----------------------------------------------------------------


def test_template_hash_mismatch_is_found_at_its_index():
    entries = sample_entries()
    log = bytearray(to_binary(entries))
    # Change one byte of entry 3's path in the binary list: it still parses.
    at = log.index(b"/usr/sbin/libvirtd")
    log[at + 5] ^= 0x01
    parsed = parse_ima_binary(bytes(log))[0]
    assert bad_template_hashes(parsed) == (3,)
    assert bad_template_hashes(parsed[2:], first_index=2) == (3,)
    forged = dataclasses.replace(entries[6], template_hash=bytes(19) + b"\x01")
    assert bad_template_hashes(entries[:6] + [forged]) == (6,)


def test_invalidated_entry_replays_as_all_ones_and_is_not_a_bad_hash():
    entries = [boot_aggregate_entry(bytes(32)), violation_entry("/etc/shadow"), ima_ng_entry("/bin/sh", sha256(b"sh"))]
    assert entries[1].invalidated and entries[1].template_hash == bytes(20)
    assert entries[1].file_digest == bytes(32)
    assert bad_template_hashes(entries) == ()
    for bank, h in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
        size = h().digest_size
        v = h(bytes(size) + (entries[0].template_hash if bank == "sha1" else h(entries[0].template_data).digest())).digest()
        v = h(v + b"\xff" * size).digest()
        v = h(v + (entries[2].template_hash if bank == "sha1" else h(entries[2].template_data).digest())).digest()
        assert replay_ima(entries, bank) == v
    # Its template data is still the kernel's: a zero digest of the algo's size.
    assert entries[1].template_data == ng_template_data(b"/etc/shadow", bytes(32))


# --- replay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_replay_matches_an_independent_computation(bank):
    files = [(b"/usr/bin/qemu-system-x86_64", sha256(b"q")), (b"/usr/bin/swtpm", sha256(b"s")),
             (b"/usr/sbin/libvirtd", sha256(b"l"))]
    entries = [ima_ng_entry(p.decode(), d) for p, d in files]
    steps = []
    for p, d in files:
        td = ng_template_data(p, d)
        steps.append((hashlib.sha1(td).digest(), td))
    steps.insert(1, (bytes(20), b"ignored"))
    entries.insert(1, violation_entry("/var/tmp/x"))
    assert replay_ima(entries, bank) == oracle_pcr(steps, bank)
    assert len(replay_ima(entries, bank)) == {"sha1": 20, "sha256": 32}[bank]


def test_replay_from_a_start_value_other_pcrs_and_other_banks():
    entries = sample_entries()
    half = replay_ima(entries[:3], "sha256")
    assert replay_ima(entries[3:], "sha256", start=half) == replay_ima(entries, "sha256")
    elsewhere = dataclasses.replace(entries[1], pcr=11)
    assert replay_ima(entries[:1] + [elsewhere] + entries[2:]) == replay_ima(entries[:1] + entries[2:])
    assert replay_ima([elsewhere], pcr=11) == oracle_pcr([(elsewhere.template_hash, elsewhere.template_data)], "sha256")
    assert replay_ima(entries, "sha384") == oracle_pcr([(e.template_hash, e.template_data) for e in entries], "sha384")
    assert replay_ima([], "sha1") == bytes(20)
    with pytest.raises(InputError):
        replay_ima(entries, "md5")
    with pytest.raises(InputError):
        replay_ima(entries, "sha256", start=bytes(20))


@settings(max_examples=50, deadline=None)
@given(split=st.integers(0, 40), bank=st.sampled_from(["sha1", "sha256"]))
def test_incremental_replay_equals_full_replay(split, bank):
    entries = [boot_aggregate_entry(bytes(20))] + [ima_ng_entry(f"/f/{i}", sha256(bytes([i]))) for i in range(39)]
    entries[7] = violation_entry("/f/7")
    state = replay_more(ImaReplay.initial(bank), entries[:split])
    assert state.count == split
    done = replay_more(state, entries[split:])
    assert done == ImaReplay(bank, 40, replay_ima(entries, bank))
    assert replay_more(done, []) == done


def test_parse_from_an_offset_continues_exactly():
    entries = sample_entries()
    log = to_binary(entries)
    ends = [len(to_binary(entries[:i])) for i in range(len(entries) + 1)]
    for i, offset in enumerate(ends):
        rest, end = parse_ima_binary(log, offset)
        assert rest == tuple(entries[i:]) and end == len(log)
    # The kernel appends; a re-check reads and replays only what is new.
    first, offset = parse_ima_binary(log)
    state = replay_more(ImaReplay.initial(), first)
    more = [ima_ng_entry(f"/new/{i}", sha256(bytes([i]))) for i in range(5)]
    grown = log + to_binary(more)
    new, end = parse_ima_binary(grown, offset)
    assert new == tuple(more) and end == len(grown)
    assert replay_more(state, new) == ImaReplay("sha256", len(entries) + 5, replay_ima(entries + more))
    assert parse_ima_binary(grown, end) == ((), end)
    for bad_offset in (-1, len(grown) + 1):
        with pytest.raises(EvidenceError, match="offset"):
            parse_ima_binary(grown, bad_offset)
    with pytest.raises(EvidenceError, match=rf"entry 0 at byte {ends[1] + 1}\b"):
        parse_ima_binary(log, ends[1] + 1)  # not an entry boundary


def test_replay_until_the_quoted_value_leaves_later_entries_for_next_time():
    entries = sample_entries()
    quoted = replay_ima(entries[:5])
    state = replay_until(entries, quoted, ImaReplay.initial())
    assert state == ImaReplay("sha256", 5, quoted)
    later = replay_until(entries[5:], replay_ima(entries), state)
    assert later is not None and later.count == len(entries)
    assert replay_until(entries, b"\x01" * 32, ImaReplay.initial()) is None
    assert replay_until([], bytes(20), ImaReplay.initial("sha1")) == ImaReplay.initial("sha1")


def test_boot_aggregate_helpers():
    entries = sample_entries()
    assert find_boot_aggregate(entries) is entries[0]
    assert find_boot_aggregate(entries[1:]) is None and find_boot_aggregate([]) is None
    # A file whose event name is "boot_aggregate" later in the list is not the boot aggregate.
    assert find_boot_aggregate([entries[1], dataclasses.replace(entries[1], path="boot_aggregate")]) is None
    pcrs = {i: bytes([i]) * 32 for i in range(10)}
    assert boot_aggregate_digest(pcrs, "sha256") == sha256(b"".join(bytes([i]) * 32 for i in range(10)))
    sha1_pcrs = {i: bytes([i]) * 20 for i in range(8)}
    assert boot_aggregate_digest(sha1_pcrs, "sha1") == hashlib.sha1(b"".join(bytes([i]) * 20 for i in range(8))).digest()
    with pytest.raises(EvidenceError, match="PCRs 8, 9"):
        boot_aggregate_digest({i: bytes(32) for i in range(8)}, "sha256")
    agg = boot_aggregate_entry(boot_aggregate_digest(pcrs, "sha256"))
    assert (agg.path, agg.file_digest_algo) == ("boot_aggregate", "sha256")


def test_boot_aggregate_is_checked_against_the_quoted_boot_pcrs():
    """The kernel's rule (ima_calc_boot_aggregate_tfm): PCRs 0-9 in sha256 (and other banks), 0-7 in sha1."""
    assert boot_aggregate_pcrs("sha256") == tuple(range(10)) and boot_aggregate_pcrs("sha1") == tuple(range(8))
    pcrs = {i: sha256(bytes([i])) for i in range(11)}
    good = [boot_aggregate_entry(sha256(b"".join(pcrs[i] for i in range(10)))), ima_ng_entry("/bin/sh", sha256(b"sh"))]
    assert boot_aggregate_problem(good, "sha256", pcrs) is None
    # PCRs 8-9 are part of it: a kernel or command line that changed them changes it.
    assert boot_aggregate_problem(good, "sha256", {**pcrs, 9: sha256(b"another kernel")}).startswith(
        f"boot_aggregate {good[0].file_digest.hex()[:16]}... is not the digest of the quoted PCRs 0-9 (")
    assert boot_aggregate_problem([boot_aggregate_entry(bytes(32)), *good[1:]], "sha256", pcrs) is not None
    assert boot_aggregate_problem(good[1:], "sha256", pcrs) == "the IMA list does not start with boot_aggregate"
    assert boot_aggregate_problem(good, "sha256", {i: pcrs[i] for i in range(8)}) == (
        "boot_aggregate cannot be checked: the quote does not cover PCRs 8, 9")
    sha1_agg = boot_aggregate_entry(hashlib.sha1(b"".join(bytes(20) for _ in range(8))).digest())
    assert boot_aggregate_problem([sha1_agg], "sha256", pcrs) == (
        "boot_aggregate is a sha1 digest, not over the quoted sha256 PCRs")
    assert boot_aggregate_problem([sha1_agg], "sha1", {i: bytes(20) for i in range(8)}) is None


# --- allowlist -------------------------------------------------------------------------------------


def test_allowlist_collects_every_failure_of_every_kind():
    good = ima_ng_entry("/usr/bin/qemu-system-x86_64", sha256(b"qemu"))
    wrong_digest = ima_ng_entry("/usr/bin/swtpm", sha256(b"trojan"))
    unknown = ima_ng_entry("/usr/local/bin/miner", sha256(b"miner"))
    tampered = dataclasses.replace(ima_ng_entry("/usr/sbin/libvirtd", sha256(b"libvirtd")), path="/usr/sbin/other")
    tampered = dataclasses.replace(tampered, template_hash=hashlib.sha1(b"not it").digest())
    invalid = violation_entry("/usr/bin/python3.11")
    also_wrong = ima_ng_entry("/usr/bin/qemu-system-x86_64", sha256(b"qemu v2"))
    entries = [boot_aggregate_entry(bytes(32)), good, wrong_digest, unknown, tampered, invalid, also_wrong]
    allowlist = {
        "/usr/bin/qemu-system-x86_64": frozenset({sha256(b"qemu").hex()}),
        "/usr/bin/swtpm": frozenset({sha256(b"swtpm").hex().upper()}),
        "/usr/sbin/libvirtd": frozenset({sha256(b"libvirtd").hex()}),
        "/usr/bin/python3.11": frozenset({bytes(32).hex()}),
    }
    required = ["/usr/bin/qemu-system-x86_64", "/usr/sbin/libvirtd", "/usr/bin/tvorch", "/usr/bin/tvorch"]
    failures = check_allowlist(entries, allowlist, required, excludes=["boot_aggregate"])
    R = ImaFailureReason
    assert [(f.reason, f.path, f.index) for f in failures] == [
        (R.DIGEST_NOT_ALLOWED, "/usr/bin/swtpm", 2),
        (R.NOT_IN_ALLOWLIST, "/usr/local/bin/miner", 3),
        (R.BAD_TEMPLATE_HASH, "/usr/sbin/other", 4),
        (R.INVALIDATED, "/usr/bin/python3.11", 5),
        (R.DIGEST_NOT_ALLOWED, "/usr/bin/qemu-system-x86_64", 6),
        # libvirtd's only entry has a bad template hash: nothing it says is believed.
        (R.REQUIRED_NOT_MEASURED, "/usr/sbin/libvirtd", None),
        (R.REQUIRED_NOT_MEASURED, "/usr/bin/tvorch", None),
    ]
    assert failures[0].digest == f"sha256:{sha256(b'trojan').hex()}" and failures[-1].digest == ""
    assert str(failures[0]).startswith("entry 2: /usr/bin/swtpm (sha256:")
    assert str(failures[-1]) == "/usr/bin/tvorch must be measured but never was"
    assert json.loads(json.dumps(failures[1].to_json()))["reason"] == "not-in-allowlist"
    assert check_allowlist([good], allowlist, ["/usr/bin/qemu-system-x86_64"]) == ()


def test_allowlist_excludes_prefixes_and_globs_but_not_bad_hashes():
    entries = [
        ima_ng_entry("/tmp/build/a.out", sha256(b"1")),
        ima_ng_entry("/var/log/journal/x", sha256(b"2")),
        ima_ng_entry("/home/u/.cache/y.py", sha256(b"3")),
        violation_entry("/tmp/being-written"),
        dataclasses.replace(ima_ng_entry("/tmp/z", sha256(b"4")), template_hash=bytes(19) + b"\x02"),
        ima_ng_entry("/usr/bin/required-but-excluded", sha256(b"5")),
        ima_ng_entry("/tmpfile", sha256(b"6")),
    ]
    excludes = ["/tmp/", "/var/log/*", "/home/*/.cache/*", "/usr/bin/required-*"]
    failures = check_allowlist(entries, {}, ["/usr/bin/required-but-excluded"], excludes)
    # A required path is digest-checked even where an exclude would match it.
    assert [(f.reason, f.index) for f in failures] == [
        (ImaFailureReason.BAD_TEMPLATE_HASH, 4), (ImaFailureReason.NOT_IN_ALLOWLIST, 5),
        (ImaFailureReason.NOT_IN_ALLOWLIST, 6)]
    matcher = exclude_matcher(["/run/", "*.pyc", "/etc/[ab]*"])
    assert [matcher(p) for p in ("/run/x", "/runner", "/a/b.pyc", "/etc/alt", "/etc/c")] == [
        True, False, True, True, False]
    assert isinstance(failures[0], ImaFailure)


# --- malformed input -------------------------------------------------------------------------------


def test_truncation_at_every_offset_is_an_error_except_on_entry_boundaries():
    """The kernel never shows half an entry, so a list cut inside one is refused, not shortened."""
    entries = sample_entries()
    log = to_binary(entries)
    boundaries = {len(to_binary(entries[:i])): i for i in range(len(entries) + 1)}
    for cut in range(len(log) + 1):
        if cut in boundaries:
            assert parse_ima_binary(log[:cut]) == (tuple(entries[:boundaries[cut]]), cut)
        else:
            with pytest.raises(EvidenceError, match=r"^IMA binary log entry \d+ at byte \d+: "):
                parse_ima_binary(log[:cut])
    text = to_ascii(entries)
    line_ends = {len(to_ascii(entries[:i])): i for i in range(len(entries) + 1)}
    for cut in range(len(text) + 1):
        if cut in line_ends:
            assert parse_ima_ascii(text[:cut]) == tuple(entries[:line_ends[cut]])
        else:
            with pytest.raises(EvidenceError, match=r"^IMA ASCII log entry \d+ at character \d+: "):
                parse_ima_ascii(text[:cut])


def test_error_names_the_entry_and_its_offset():
    entries = sample_entries()
    log = bytearray(to_binary(entries))
    third = len(to_binary(entries[:2]))
    log[third + 28:third + 28 + 7] = b"ima-xyz"  # an unknown template, same length as "ima-sig"
    with pytest.raises(EvidenceError, match=rf"^IMA binary log entry 2 at byte {third}: unsupported IMA template"):
        parse_ima_binary(bytes(log))
    lines = to_ascii(entries).splitlines(keepends=True)
    lines[4] = lines[4].replace(" ima ", " ima-ng ")
    with pytest.raises(EvidenceError, match=rf"entry 4 at character {len(''.join(lines[:4]))}: "):
        parse_ima_ascii("".join(lines))
    for bad in ("10 abc ima-ng sha256:00 /x\n", "x 0000000000000000000000000000000000000000 ima-ng sha256: /x\n",
                "10 " + "0" * 40 + " ima-ng sha256:" + "0" * 62 + " /x\n", "10 " + "0" * 40 + " ima-ng\n",
                "\n", "10 " + "0" * 40 + " ima-ng md9:00 /x\n", "10 " + "0" * 40 + " ima-ng sha1:" + "0" * 40 + " /x /y\n"):
        with pytest.raises(EvidenceError):
            parse_ima_ascii(bad)


def _outcome(fn, data):
    try:
        return fn(data)
    except EvidenceError as err:
        assert "\n" not in str(err)
        return err


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_parse_or_raise_evidence_error_only(data):
    result = _outcome(parse_ima_binary, data)
    assert isinstance(result, (tuple, EvidenceError))
    if isinstance(result, tuple):
        assert result[1] == len(data)


def _mutations():
    log = to_binary(sample_entries())
    return st.tuples(st.just(log), st.lists(st.tuples(st.integers(0, len(log) - 1), st.integers(0, 255),
                                                     st.sampled_from(["set", "insert", "delete"])), max_size=4))


@settings(max_examples=400, deadline=None)
@given(_mutations())
def test_mutated_logs_parse_or_raise_evidence_error_only(case):
    log, edits = case
    data = bytearray(log)
    for at, value, how in edits:
        at = min(at, len(data) - 1)
        if how == "set":
            data[at] = value
        elif how == "insert":
            data.insert(at, value)
        else:
            del data[at]
    result = _outcome(parse_ima_binary, bytes(data))
    assert isinstance(result, (tuple, EvidenceError))
    if isinstance(result, tuple):
        entries = result[0]
        # Whatever parses is written back byte for byte, and the in-place fast path
        # agrees with the field-by-field decoder the ASCII parser uses.
        assert to_binary(entries) == bytes(data)
        # The ASCII list cannot carry a newline inside a field (the kernel prints it raw too).
        if not any(b"\n" in e.template_data for e in entries):
            assert parse_ima_ascii(to_ascii(entries)) == entries


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
       | st.builds(lambda t, i, s: t[:i] + s + t[i:], st.just(to_ascii(sample_entries())),
                   st.integers(0, 2000), st.text(max_size=3)))
def test_random_and_mutated_ascii_parse_or_raise_evidence_error_only(text):
    result = _outcome(parse_ima_ascii, text)
    assert isinstance(result, (tuple, EvidenceError))
    if isinstance(result, tuple):
        # The one-pass ima-ng/ima-sig reader agrees with the field-by-field decoder.
        assert parse_ima_binary(to_binary(result))[0] == result


# --- CLI -------------------------------------------------------------------------------------------


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["binary", "ascii"])
def test_cli_replay_and_show(tmp_path, capsys, fmt):
    entries = sample_entries()
    entries[3] = dataclasses.replace(entries[3], template_hash=bytes(19) + b"\x09")
    path = tmp_path / "log"
    if fmt == "binary":
        path.write_bytes(to_binary(entries))
    else:
        path.write_text(to_ascii(entries))
    code, out, _ = _run(capsys, "ima", "replay", str(path), "--json")
    assert code == 0
    assert json.loads(out) == {"bank": "sha256", "pcr": 10, "value": replay_ima(entries).hex(),
                               "entries": len(entries), "bad_template_hashes": [3]}
    code, out, _ = _run(capsys, "ima", "replay", str(path), "--bank", "sha1", "--format", fmt)
    assert code == 0 and f"PCR 10 (sha1): {replay_ima(entries, 'sha1').hex()}" in out and "bad template hashes: 3" in out
    code, out, _ = _run(capsys, "ima", "show", str(path))
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(entries)
    assert re.match(r"\s+1  ima-ng\s+sha256:[0-9a-f]{16}\s+/usr/bin/qemu-system-x86_64$", lines[1])
    assert "(invalidated)" in lines[5]
    code, out, _ = _run(capsys, "ima", "show", str(path), "--json")
    shown = json.loads(out)
    assert shown[2]["signature"] == b"\x03\x02\x04sig-bytes".hex() and shown[2]["template"] == "ima-sig"
    assert shown[0]["path"] == "boot_aggregate" and shown[5]["invalidated"] is True


def test_cli_refusals(tmp_path, capsys):
    code, out, err = _run(capsys, "ima", "replay", str(tmp_path / "missing"))
    assert code == ExitCode.INVALID_INPUT and err.startswith("tvorch: error: cannot read") and err.count("\n") == 1
    broken = tmp_path / "broken"
    broken.write_bytes(to_binary(sample_entries())[:-3])
    code, out, err = _run(capsys, "ima", "replay", str(broken), "--json")
    assert code == ExitCode.EVIDENCE and out == "" and err.count("\n") == 1
    assert re.match(r"tvorch: error: IMA binary log entry 7 at byte \d+: truncated", err)
    code, _, err = _run(capsys, "ima", "show", str(broken), "--format", "ascii")
    assert code == ExitCode.EVIDENCE and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    code, out, _ = _run(capsys, "ima", "replay", str(empty), "--json")
    assert code == 0 and json.loads(out)["value"] == "00" * 32
