"""Concurrent `tvorch launch`/`destroy` and concurrent hook calls against the real libvirtd.

A cloud controller fires commands at a node in parallel, and libvirtd runs the
hook for every domain at once; the store, the overlays, the domains and the
vTPM ledger must stay consistent whatever interleaving happens. The guests
are small TCG guests that are never waited for: only the bookkeeping counts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tvorch.core.launch.domain_xml import parse_instance_metadata
from tvorch.errors import ExitCode

from .conftest import PREFIX, Tv, our_domains, virsh

pytestmark = pytest.mark.integration

COUNT = 8
CONC = f"{PREFIX}conc-"
HOOK_CALLS = 20
# A refusal is a documented outcome under contention; an internal error (1) or a usage error (2) is not.
CLEAN_FAILURES = {int(c) for c in ExitCode} - {ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE}
SWTPM_STATE = Path("/var/lib/libvirt/swtpm")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The refusal lines; JSON log lines (e.g. the TCG fallback warning) may come with them."""
    return [line for line in proc.stderr.splitlines() if line.startswith("tvorch: ")]


def in_parallel(calls: list[tuple[str, ...]], run: Callable[..., subprocess.CompletedProcess[str]]
                ) -> list[subprocess.CompletedProcess[str]]:
    """Run every call at once (one thread per subprocess), results in call order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: run(*args), calls))


def integrity(tv: Tv) -> str:
    db = sqlite3.connect(tv.state_dir / "tvorch.db")
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def conc_records(tv: Tv) -> dict[str, dict]:
    return {r["name"]: r for r in tv.json("list") if r["name"].startswith(CONC)}


def conc_files(directory: Path) -> set[Path]:
    """Overlays of these tests, temporary ones (`.NAME.*.tmp`) included."""
    return {p for p in directory.iterdir() if p.name.lstrip(".").startswith(CONC)} if directory.is_dir() else set()


@pytest.fixture
def cleanup(tv: Tv):
    """Whatever a failing assertion leaves behind is destroyed (the session fixture would too, later)."""
    yield
    for name in sorted(n for n in our_domains() if n.startswith(CONC)):
        tv.destroy(name)


def test_concurrent_launches_and_destroys_stay_consistent(tv: Tv, guest_dir: Path, cleanup):
    names = [f"{CONC}{i}" for i in range(COUNT)]
    image = str(guest_dir / "guest.qcow2")
    launches = in_parallel(
        [("launch", image, "--name", n, "--memory", "256", "--json") for n in names],
        lambda *args: tv.run(*args, check=False),
    )

    ok: dict[str, dict] = {}
    for name, proc in zip(names, launches):
        assert "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode == 0:
            ok[name] = json.loads(proc.stdout)
        else:
            assert proc.returncode in CLEAN_FAILURES, (name, proc.returncode, proc.stderr)
            assert len(error_lines(proc)) == 1, (name, proc.stderr)
    assert ok, "no launch succeeded: " + "; ".join(p.stderr.strip() for p in launches)

    assert integrity(tv) == "ok"
    records = conc_records(tv)
    domains = {n for n in our_domains() if n.startswith(CONC)}
    for name, launched in ok.items():
        record = records[name]
        assert record["state"] == "running" and record["id"] == launched["id"], record
        assert Path(record["overlay"]).is_file()
        assert virsh("domuuid", name).stdout.strip() == record["uuid"]
        # The manifest is stored, and it is the one the domain's metadata names.
        shown = tv.json("manifest", "show", name)
        assert shown["manifest"]["instance_id"] == record["id"]
        meta = parse_instance_metadata(virsh("dumpxml", name).stdout)
        assert meta is not None and meta.manifest_digest == shown["digest"]
    for name in set(names) - set(ok):
        # A refused launch leaves at most a `failed` record, never a domain.
        assert name not in domains
        assert name not in records or records[name]["state"] == "failed", records.get(name)
    # No domain and no overlay without a running record.
    assert domains == set(ok)
    assert conc_files(tv.overlay_dir) == {Path(records[n]["overlay"]) for n in ok}

    destroys = in_parallel([("destroy", "--purge-vtpm", n) for n in names], lambda *args: tv.run(*args, check=False))
    for name, proc in zip(names, destroys):
        assert "Traceback" not in proc.stderr, proc.stderr
        if name in ok or name in records:
            assert proc.returncode == 0, (name, proc.stderr)
        else:  # never recorded: nothing to destroy
            assert proc.returncode == ExitCode.NOT_FOUND and len(error_lines(proc)) == 1, (name, proc.stderr)

    assert integrity(tv) == "ok"
    assert not {n for n in our_domains() if n.startswith(CONC)}
    assert not conc_files(tv.overlay_dir)
    assert not conc_records(tv)
    for name, launched in ok.items():
        assert not (SWTPM_STATE / launched["uuid"]).exists(), name
        assert not (NVRAM_DIR / f"{name}_VARS.fd").exists(), name


def test_concurrent_release_hooks_keep_the_ledger_a_chain(tv: Tv, guest_dir: Path, cleanup):
    """20 `release end` calls at once after one run.

    Expected: exactly one ledgers. The hook ledgers the vTPM state only when
    a `release end` closes a run (one `started begin` after a start it
    allowed; here the launch's), and a run closes once: the store takes its
    write lock first (BEGIN IMMEDIATE, 15 s busy timeout, far longer than 20
    short writes need) and checks and clears the run inside that lock, so
    the other 19 find none and ledger nothing (a release after a refused
    start must not bless the state on disk). One new entry, seq consecutive,
    the chain intact, and every call exits 0 and prints nothing (a lost
    write would show as a `tvorch: hook error` line on stderr, still exit 0,
    since a release must never fail). The extra `started begin` opens no
    second run: it follows no start the hook allowed.
    """
    name = f"{CONC}hook"
    tv.run("launch", str(guest_dir / "guest.qcow2"), "--name", name, "--memory", "256")
    xml = virsh("dumpxml", name).stdout
    env = {**os.environ, "TVORCH_CONFIG": str(tv.config)}

    def hook(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tvorch.hook", name, *args, "-"], input=xml,
                              capture_output=True, text=True, env=env, timeout=60)

    started = hook("started", "begin")
    assert (started.returncode, started.stdout, started.stderr) == (0, "", "")
    before = tv.json("vtpm", "ledger", name)
    assert before["intact"]

    calls = in_parallel([("release", "end")] * HOOK_CALLS, hook)
    assert [(p.returncode, p.stdout, p.stderr) for p in calls] == [(0, "", "")] * HOOK_CALLS

    after = tv.json("vtpm", "ledger", name)
    seqs = [e["seq"] for e in after["entries"]]
    assert after["intact"] and after["broken_at"] is None
    assert len(seqs) == len(set(seqs)) == len(before["entries"]) + 1
    assert seqs == list(range(len(seqs)))
    new = after["entries"][len(before["entries"]):]
    assert all(e["event"] == "stopped" and len(e["state_digest"]) == 64 for e in new)
    assert integrity(tv) == "ok"

    tv.run("destroy", "--purge-vtpm", name)
