"""Whether `tvorch launch` costs the same with 30 other instances on the node as with none.

    .venv/bin/python benchmarks/launch_scale.py [--instances 30] [--runs 5] [--smoke]

A launch reconciles only its own name (tvorch.service.reconcile.reconcile_name):
the other instances are `tvorch reconcile`'s, `tvorch list`'s and the daemon's.
So its cost must not grow with the number of instances. This times RUNS
launches of the test guest (trusted, digest cached; each destroyed with
`--purge-vtpm` right after, untimed) with the node as it is, then makes
INSTANCES more instances, each launched and stopped at once (`stop --force`:
defined, stopped, with their vTPM state, overlay and records), times RUNS
launches again, and removes what it made. It prints the median of each and
the ratio (goal < 1.1).

The config is $TVORCH_CONFIG, else the node's default config; the installed
hook must read that config (as for launch_overhead.py). Its store may hold
instances already: the comparison is then N against N + INSTANCES, which is
what the ratio is about. Everything made is named `tvbench-scale-*`.
--smoke (what `make test` runs): 1 instance, 1 run of each, no warm-up, goal not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

TVORCH = [sys.executable, "-m", "tvorch.cli"]
IMAGE = Path(os.environ.get("TVORCH_TEST_GUEST_DIR", "/var/cache/tvorch/test-guest")) / "guest.qcow2"
GOAL_RATIO = 1.1
TAG = secrets.token_hex(2)
SMOKE_NEEDS = "node"  # tests/integration/test_benchmarks.py: a config the installed hook reads


def tvorch(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*TVORCH, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise SystemExit(f"launch_scale: tvorch {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def launch(name: str) -> float:
    """Seconds until `tvorch launch` returned with the domain started."""
    t0 = time.perf_counter()
    proc = tvorch("launch", str(IMAGE), "--name", name, "--memory", "256", "--json")
    elapsed = time.perf_counter() - t0
    if json.loads(proc.stdout)["state"] != "running":
        raise SystemExit(f"launch_scale: {name} is not running after launch")
    return elapsed


def timed_launches(runs: int, label: str, made: list[str]) -> list[float]:
    times = []
    for i in range(runs):
        name = f"tvbench-scale-{TAG}-{label}-{i}"
        made.append(name)
        times.append(launch(name))
        tvorch("destroy", "--purge-vtpm", name)
        print(f"  {label} run {i + 1}/{runs}: {times[-1] * 1000:7.1f} ms", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=30, help="stopped instances added (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="timed launches at each size (default 5)")
    parser.add_argument("--smoke", action="store_true", help="1 instance, 1 run, goal not judged (make test)")
    args = parser.parse_args()
    if args.smoke:
        args.instances, args.runs = 1, 1
    if args.runs < 1 or args.instances < 1:
        parser.error("--runs and --instances must be at least 1")
    if not IMAGE.is_file():
        raise SystemExit(f"launch_scale: no test guest at {IMAGE} (make guest)")
    tvorch("image", "trust", str(IMAGE), "--label", "test guest (launch_scale)")
    made: list[str] = []
    try:
        before = len(json.loads(tvorch("list", "--json").stdout))
        if not args.smoke:
            warm = f"tvbench-scale-{TAG}-warm"
            made.append(warm)
            launch(warm)  # untimed: page cache, digest cache, node keys
            tvorch("destroy", "--purge-vtpm", warm)
        print(f"launch with the node as it is ({before} instances):", flush=True)
        base = timed_launches(args.runs, "base", made)
        t0 = time.perf_counter()
        for i in range(args.instances):
            name = f"tvbench-scale-{TAG}-stopped-{i}"
            made.append(name)
            launch(name)
            tvorch("stop", "--force", name)
        print(f"made {args.instances} stopped instances in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"launch with {before + args.instances} instances:", flush=True)
        loaded = timed_launches(args.runs, "loaded", made)
    finally:
        for name in made:
            tvorch("destroy", "--purge-vtpm", name, check=False)
    a, b = statistics.median(base), statistics.median(loaded)
    ratio = b / a
    print(f"\nlaunch, {before} instances:  {a * 1000:8.1f} ms median of {args.runs}")
    print(f"launch, {before + args.instances} instances: {b * 1000:8.1f} ms median of {args.runs}")
    verdict = "PASS" if ratio < GOAL_RATIO else "FAIL"
    print(f"ratio: {ratio:.3f}  goal < {GOAL_RATIO}: {verdict if not args.smoke else 'not judged (--smoke)'}")
    return 0 if args.smoke or verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
