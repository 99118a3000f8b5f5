"""Benchmarks cannot rot: every benchmarks/*.py runs in its smoke mode, and must exit 0.

Each benchmark accepts ``--smoke`` (a few iterations, tiny sizes, goals not
judged): the figures mean nothing, what counts is that it still runs against
today's code, libvirt and guest. A benchmark added later is picked up by the
glob. One that needs a tvorch node (the installed hook reading its config)
says so with ``SMOKE_NEEDS = "node"``, one that needs a running instance with
its guest agent with ``SMOKE_NEEDS = "guest"``: it then gets the session's
test config in $TVORCH_CONFIG and, for a guest, the shared booted guest's name
in $TVORCH_BENCH_GUEST; the others get neither and boot nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NEEDS = re.compile(r'^SMOKE_NEEDS = "(node|guest)"(?:\s*#.*)?$', re.MULTILINE)


def _needs(path: Path) -> str | None:
    found = NEEDS.search(path.read_text())
    return found[1] if found else None


def test_smoke_needs_are_read() -> None:
    """The benchmarks that launch or attest declare it (else they would run against the node's default config)."""
    found = {p.stem: _needs(p) for p in BENCHMARKS.glob("*.py")}
    assert {"launch_overhead": "node", "launch_scale": "node", "guest_attest": "guest",
            "keylime_submit": "guest"}.items() <= found.items()


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.stem)
def test_benchmark_runs_in_smoke_mode(path: Path, request: pytest.FixtureRequest) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TVORCH_CONFIG", "TVORCH_BENCH_GUEST")}
    needs = _needs(path)
    if needs is not None:
        env["TVORCH_CONFIG"] = str(request.getfixturevalue("tv").config)
    if needs == "guest":
        env["TVORCH_BENCH_GUEST"] = request.getfixturevalue("booted_guest").name
    proc = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, env=env,
                          cwd=BENCHMARKS.parent, timeout=300)
    assert proc.returncode == 0, (
        f"{path.name} --smoke exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
