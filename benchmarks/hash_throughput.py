"""How fast tvorch hashes a big file, next to `openssl dgst` and `sha256sum`.

    .venv/bin/python benchmarks/hash_throughput.py [--size-gib 2] [--rounds 5] [--sweep]

Makes a file of the given size in /var/tmp, reads it once so every round
hashes from the page cache, then runs tvorch's sha256_file, `openssl dgst
-sha256` and `sha256sum` in turn, round after round, and prints each one's
median. tvorch's goal is at least 0.95 of openssl's throughput. --sweep also
times other read sizes and hashlib.file_digest (what CHUNK_SIZE was chosen
by). Ends with a cached measure_file call, which should read nothing. The
file is deleted whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tvorch.adapters import digests
from tvorch.adapters.digests import measure_file, sha256_file
from tvorch.core.launch.measurements import DigestKey

PATTERN_SIZE = 8 * 1024 * 1024


class DictCache:
    def __init__(self) -> None:
        self.entries: dict[DigestKey, str] = {}

    def cached_digest(self, key: DigestKey) -> str | None:
        return self.entries.get(key)

    def cache_digest(self, key: DigestKey, digest: str) -> None:
        self.entries[key] = digest


def make_file(directory: Path, size: int) -> Path:
    """SIZE bytes of one random 8 MiB block repeated: quick to write, and SHA-256 speed ignores content."""
    fd, name = tempfile.mkstemp(prefix="tvorch-hash-bench-", suffix=".bin", dir=directory)
    pattern = memoryview(os.urandom(PATTERN_SIZE))
    try:
        left = size
        while left:
            left -= os.write(fd, pattern[: min(left, PATTERN_SIZE)])
    finally:
        os.close(fd)
    return Path(name)


def tool_digest(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    # openssl: "SHA2-256(FILE)= HEX"; sha256sum: "HEX  FILE"
    return out.split("= ")[-1].strip() if "= " in out else out.split()[0]


def timed(run: Callable[[], str]) -> tuple[float, str]:
    start = time.perf_counter()
    digest = run()
    return time.perf_counter() - start, digest


def file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def with_chunk_size(size: int, path: Path) -> Callable[[], str]:
    def run() -> str:
        saved = digests.CHUNK_SIZE
        digests.CHUNK_SIZE = size
        try:
            return sha256_file(path)
        finally:
            digests.CHUNK_SIZE = saved

    return run


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--sweep", action="store_true", help="also time other read sizes and hashlib.file_digest")
    parser.add_argument("--smoke", action="store_true", help="a 16 MiB file, 1 round (make test)")
    args = parser.parse_args()
    if args.smoke:
        args.size_gib, args.rounds = 16 / 1024, 1
    size = int(args.size_gib * 2**30)

    print(f"{cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}; {ssl.OPENSSL_VERSION}")
    print(f"openssl binary: {subprocess.run(['openssl', 'version'], capture_output=True, text=True).stdout.strip()}")
    print(f"file: {size / 2**30:.2f} GiB in {args.dir}, page cache warm, {args.rounds} rounds, order rotating")

    path = make_file(args.dir, size)
    try:
        candidates: dict[str, Callable[[], str]] = {
            f"tvorch sha256_file ({digests.CHUNK_SIZE // 1024} KiB reads)": lambda: sha256_file(path),
            "openssl dgst -sha256": lambda: tool_digest(["openssl", "dgst", "-sha256", str(path)]),
            "sha256sum": lambda: tool_digest(["sha256sum", str(path)]),
        }
        if args.sweep:
            candidates["hashlib.file_digest (256 KiB reads)"] = lambda: file_digest(path)
            for kib in (64, 256, 4096, 16384):
                candidates[f"sha256_file with {kib} KiB reads"] = with_chunk_size(kib * 1024, path)
        expected = sha256_file(path)  # also warms the page cache
        times: dict[str, list[float]] = {name: [] for name in candidates}
        names = list(candidates)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                seconds, digest = timed(candidates[name])
                if digest != expected:
                    raise SystemExit(f"{name} gave {digest}, expected {expected}")
                times[name].append(seconds)

        medians = {name: statistics.median(values) for name, values in times.items()}
        width = max(map(len, medians))
        for name, median in medians.items():
            spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
            print(f"  {name:<{width}}  median {median:.3f} s  {size / median / 1e9:5.2f} GB/s  (range {spread} s)")
        tvorch_name, openssl_name, sha256sum_name = names[:3]
        ratio = medians[openssl_name] / medians[tvorch_name]
        print(f"tvorch/openssl throughput: {ratio:.3f} (goal >= 0.95)")
        print(f"tvorch/sha256sum throughput: {medians[sha256sum_name] / medians[tvorch_name]:.2f}")

        # A file changed within RACY_WINDOW_NS is not cached; this one is older by now.
        age_ns = time.time_ns() - path.stat().st_ctime_ns
        if age_ns < digests.RACY_WINDOW_NS:
            time.sleep((digests.RACY_WINDOW_NS - age_ns) / 1e9 + 0.01)
        cache = DictCache()
        first = measure_file(path, cache)
        calls = 1000
        start = time.perf_counter()
        for _ in range(calls):
            result = measure_file(path, cache)
        per_call = (time.perf_counter() - start) / calls
        assert result.cached and result.digest == first.digest == expected
        print(f"measure_file, cache hit: {per_call * 1e6:.1f} us per call (uncached: {medians[tvorch_name]:.3f} s)")
    finally:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
