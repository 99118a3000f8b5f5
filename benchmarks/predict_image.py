"""What `tvorch predict` reads of a big image, and how long it takes, next to reading the whole disk.

    .venv/bin/python benchmarks/predict_image.py [--guest-dir /var/cache/tvorch/test-guest] [--size-gib 2]
                                                [--rounds 5] [--quick]

Builds, in /var/tmp, a SIZE-GiB qcow2 disk holding the test guest's GPT and
ESP (its UKI) followed by pseudo-random data up to the end, and a qcow2
overlay on it (a backing chain, as launch makes). Reads it once so every
round runs from the page cache, then times, best of ROUNDS, the prediction
of the overlay (tvorch.service.predict: open and vet the chain, GPT, FAT,
the boot file, Authenticode, the PCR events), counting the bytes read from
the files (/proc/self/io rchar), side by side with the reference: reading
the whole virtual disk through the same reader. Goal: the prediction reads
only the tables and the boot file and takes < 1 s. --quick (--smoke, which
`make test` runs, also leaves the goal unjudged): a 256 MiB disk,
2 rounds. The files are deleted whatever happens.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tvorch.adapters.diskread import DiskImage
from tvorch.service.predict import PredictRequest, predict

CHUNK = 4 << 20


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def build(guest: Path, work: Path, size: int) -> Path:
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(guest / "guest.qcow2"), str(raw)],
                   check=True)
    used = raw.stat().st_size
    with open(raw, "r+b") as f:
        f.seek(used)
        block = os.urandom(CHUNK)
        for _ in range((size - used) // CHUNK):
            f.write(block)  # allocated data past the ESP: a full disk, not a sparse one
            block = block[1:] + block[:1]
        f.truncate(size)
    base = work / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True)
    raw.unlink()
    top = work / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    return top


def timed(fn, rounds: int) -> tuple[float, int, object]:
    best, read, result = float("inf"), 0, None
    for _ in range(rounds):
        before, t0 = rchar(), time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        if elapsed < best:
            best, read = elapsed, rchar() - before
    return best, read, result


def read_all(path: Path) -> int:
    with DiskImage(str(path)) as disk:
        n = 0
        for off in range(0, disk.size, CHUNK):
            n += len(disk.read(off, CHUNK))
        return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest-dir", default=os.environ.get("TVORCH_TEST_GUEST_DIR", "/var/cache/tvorch/test-guest"))
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="as --quick, the goal not judged (make test)")
    args = ap.parse_args()
    args.quick = args.quick or args.smoke
    size = (256 << 20) if args.quick else int(args.size_gib * (1 << 30))
    rounds = 2 if args.quick else args.rounds
    guest = Path(args.guest_dir)
    if not (guest / "guest.qcow2").exists():
        print(f"no test guest in {guest} (scripts/build-test-guest.sh)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tvorch-bench-predict-", dir="/var/tmp"))
    try:
        top = build(guest, work, size)
        read_all(top)  # into the page cache
        ours, our_bytes, result = timed(lambda: predict(PredictRequest(image=str(top))), rounds)
        ref, ref_bytes, _ = timed(lambda: read_all(top), max(1, rounds // 2))
        print(f"python {platform.python_version()}, {platform.machine()}, disk {size / (1 << 30):.2f} GiB "
              f"(qcow2 {top.stat().st_size + (work / 'base.qcow2').stat().st_size} bytes on file, 2 layers)")
        print(f"{'':24}{'seconds':>10}{'bytes read':>16}")
        print(f"{'tvorch predict':24}{ours:10.3f}{our_bytes:16,d}")
        print(f"{'reference: whole disk':24}{ref:10.3f}{ref_bytes:16,d}")
        print(f"predict/reference: time {ours / ref:.4f}, bytes {our_bytes / ref_bytes:.4f}")
        print(f"PCRs predicted: {sorted(result.prediction.covered)}; goal < 1 s: {'met' if ours < 1 else 'MISSED'}")
        return 0 if args.smoke or ours < 1 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
