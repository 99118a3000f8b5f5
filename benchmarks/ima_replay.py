"""How fast tvorch checks a big IMA list, next to a naive parser, and how cheap a re-check is.

    .venv/bin/python benchmarks/ima_replay.py [--entries 100000] [--append 1000] [--rounds 5]

Builds an ima-ng binary_runtime_measurements list in memory (a boot_aggregate,
then realistic paths with sha256 file digests), then times, best of ROUNDS,
parse + template-hash check + sha256-bank replay of every entry: with
tvorch.core.attestation.ima from the binary list and from the same list in ASCII form
(what a host quote carries), and with a deliberately naive reader (a BytesIO,
one struct call per field, no validation), once building the same ImaEntry
objects and once plain dicts; all must agree. Then appends APPEND entries and
times the incremental re-check: parse from the saved offset, check and replay
only the new entries from the saved state, and proves the result equals a
full replay. tvorch's goal is at least 200,000 entries/s for the full check.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import platform
import struct
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from tvorch.core.attestation.ima import (
    ImaEntry,
    ImaReplay,
    bad_template_hashes,
    boot_aggregate_entry,
    ima_ng_entry,
    parse_ima_ascii,
    parse_ima_binary,
    replay_more,
    to_ascii,
    to_binary,
)

GOAL = 200_000
T = TypeVar("T")

_DIRS = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3/dist-packages/setuptools",
         "/usr/libexec/qemu", "/etc/ssl/certs", "/usr/lib/systemd", "/usr/share/perl5/Debconf")
_NAMES = ("libvirtd", "qemu-system-x86_64", "swtpm", "libssl.so.3", "libc.so.6", "python3.11", "bash",
          "__init__.py", "ca-certificates.crt", "systemd-udevd", "Log.pm", "ld-linux-x86-64.so.2")


def make_entries(count: int, start: int = 0) -> list[ImaEntry]:
    """COUNT ima-ng entries with varied realistic paths and distinct sha256 digests."""
    out = []
    for i in range(start, start + count):
        path = f"{_DIRS[i % len(_DIRS)]}/{i // len(_DIRS) % 997:03d}-{_NAMES[i % len(_NAMES)]}"
        out.append(ima_ng_entry(path, hashlib.sha256(i.to_bytes(8, "little")).digest()))
    return out


def naive_check(data: bytes, typed: bool = True) -> tuple[int, int, bytes]:
    """The same job written the obvious way: (entries, bad template hashes, sha256 PCR 10).

    TYPED builds the same ImaEntry objects tvorch returns; otherwise plain
    dicts, which are cheaper to build and, holding only bytes and str, are
    never visited by the cyclic garbage collector.
    """
    f = io.BytesIO(data)
    entries: list[object] = []
    while True:
        header = f.read(4)
        if not header:
            break
        pcr = struct.unpack("<I", header)[0]
        template_hash = f.read(20)
        name_len = struct.unpack("<I", f.read(4))[0]
        name = f.read(name_len).decode()
        td_len = struct.unpack("<I", f.read(4))[0]
        td = f.read(td_len)
        t = io.BytesIO(td)
        d_len = struct.unpack("<I", t.read(4))[0]
        algo, _, digest = t.read(d_len).partition(b":\0")
        n_len = struct.unpack("<I", t.read(4))[0]
        path = t.read(n_len).rstrip(b"\0").decode()
        if typed:
            entries.append(ImaEntry(pcr, template_hash, name, td, algo.decode(), digest, path, None))
        else:
            entries.append({"pcr": pcr, "template_hash": template_hash, "template_name": name,
                            "template_data": td, "algo": algo.decode(), "digest": digest, "path": path})
    fields = [(e.pcr, e.template_hash, e.template_data) if isinstance(e, ImaEntry)
              else (e["pcr"], e["template_hash"], e["template_data"]) for e in entries]  # type: ignore[index]
    bad = sum(1 for _, th, td in fields if hashlib.sha1(td).digest() != th)
    pcr_value = bytes(32)
    for pcr, _, td in fields:
        if pcr == 10:
            pcr_value = hashlib.sha256(pcr_value + hashlib.sha256(td).digest()).digest()
    return len(entries), bad, pcr_value


def tvorch_check(data: bytes) -> tuple[int, int, bytes, int]:
    """(entries, bad template hashes, sha256 PCR 10, offset after the last entry)."""
    entries, end = parse_ima_binary(data)
    bad = bad_template_hashes(entries)
    state = replay_more(ImaReplay.initial("sha256"), entries)
    return len(entries), len(bad), state.pcr_value, end


def tvorch_check_ascii(text: str) -> tuple[int, int, bytes]:
    """(entries, bad template hashes, sha256 PCR 10) from the ASCII list."""
    entries = parse_ima_ascii(text)
    bad = bad_template_hashes(entries)
    state = replay_more(ImaReplay.initial("sha256"), entries)
    return len(entries), len(bad), state.pcr_value


def best(rounds: int, fn: Callable[[], T]) -> tuple[float, T]:
    times, result = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    assert result is not None
    return min(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--append", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="2,000 entries, 1 round, goal not judged (make test)")
    args = ap.parse_args()
    if args.smoke:
        args.entries, args.append, args.rounds = 2_000, 100, 1

    print(f"python {platform.python_version()} on {platform.machine()}, {args.rounds} rounds, best shown")
    t0 = time.perf_counter()
    entries = [boot_aggregate_entry(bytes(32))] + make_entries(args.entries - 1)
    log = to_binary(entries)
    print(f"built {len(entries):,} ima-ng entries, {len(log) / 1e6:.1f} MB binary list, "
          f"in {time.perf_counter() - t0:.2f} s")

    t_fast, (n, bad, value, offset) = best(args.rounds, lambda: tvorch_check(log))
    text = to_ascii(entries)
    t_ascii, (n4, bad4, value4) = best(args.rounds, lambda: tvorch_check_ascii(text))
    t_naive, (n2, bad2, value2) = best(args.rounds, lambda: naive_check(log))
    t_dicts, (n3, bad3, value3) = best(args.rounds, lambda: naive_check(log, typed=False))
    assert (n, bad, value) == (n2, bad2, value2) == (n3, bad3, value3) == (n4, bad4, value4) \
        == (len(entries), 0, value), "the readers disagree"
    rate = n / t_fast
    print(f"parse + template-hash check + sha256 replay of {n:,} entries:")
    print(f"  tvorch.core.attestation.ima          {t_fast * 1e3:7.1f} ms {rate:>10,.0f} entries/s  "
          f"(goal {GOAL:,}: {'met' if rate >= GOAL else 'MISSED'})")
    print(f"  tvorch.core.attestation.ima, ASCII   {t_ascii * 1e3:7.1f} ms {n / t_ascii:>10,.0f} entries/s  "
          f"({len(text) / 1e6:.1f} MB ascii_runtime_measurements)")
    print(f"  naive, same ImaEntry     {t_naive * 1e3:7.1f} ms {n / t_naive:>10,.0f} entries/s  "
          f"(tvorch/naive speed {t_naive / t_fast:.2f}x)")
    print(f"  naive, dicts, no checks  {t_dicts * 1e3:7.1f} ms {n / t_dicts:>10,.0f} entries/s  "
          f"(tvorch/naive speed {t_dicts / t_fast:.2f}x)")
    print(f"PCR 10 (sha256) = {value.hex()}")

    # The kernel appends; the verifier kept the offset and the replay state from the last check.
    state = replay_more(ImaReplay.initial("sha256"), parse_ima_binary(log)[0])
    grown = log + to_binary(make_entries(args.append, start=args.entries))

    def recheck() -> tuple[int, int, ImaReplay, int]:
        new, end = parse_ima_binary(grown, offset)
        bad_new = bad_template_hashes(new, first_index=state.count)
        return len(new), len(bad_new), replay_more(state, new), end

    t_inc, (processed, bad_new, after, end) = best(args.rounds, recheck)
    t_full, full = best(1, lambda: tvorch_check(grown))
    assert end == len(grown) and bad_new == 0 and after.pcr_value == full[2] and after.count == full[0]
    print(f"re-check after {args.append:,} appended entries: entries processed = {processed:,}, "
          f"{t_inc * 1e3:.2f} ms  (a full re-check: {full[0]:,} entries, {t_full * 1e3:.0f} ms; "
          "the results agree)")
    return 0 if args.smoke or rate >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
