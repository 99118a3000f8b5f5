"""Staged direct-boot files and their read-only view (adapters.boot_files), on real mounts (root)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tvorch.adapters import boot_files
from tvorch.errors import TrustError

from ..components import require

pytestmark = pytest.mark.integration


@pytest.fixture
def dirs(tmp_path: Path):
    require(os.geteuid() == 0, "mounting the read-only view needs root")
    state, view = tmp_path / "state", Path(f"/run/tvorch-test-view-{os.getpid()}-{tmp_path.name}")
    yield state, view
    while subprocess.run(["umount", "-l", str(view)], capture_output=True).returncode == 0:
        pass
    view.rmdir()


def _mounts(view: Path) -> list[list[str]]:
    return [f for f in (line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines())
            if f[4] == str(view)]


def test_stage_copies_into_a_read_only_view(dirs, tmp_path: Path):
    state, view = dirs
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel bytes" * 1000)
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()
    booted = boot_files.stage(str(state), str(view), str(kernel), digest)
    assert booted == str(view / digest)
    assert Path(booted).read_bytes() == kernel.read_bytes()
    info = os.stat(booted)
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o644)
    with pytest.raises(OSError) as err:
        os.chown(booted, 65534, 65534)
    assert err.value.errno == errno.EROFS
    assert len(_mounts(view)) == 1 and "ro" in _mounts(view)[0][5].split(",")
    # Staging the same content again reuses the copy and stacks no second mount.
    assert boot_files.stage(str(state), str(view), str(kernel), digest) == booted
    assert len(_mounts(view)) == 1


def test_a_file_that_is_not_what_was_measured_is_refused(dirs, tmp_path: Path):
    state, view = dirs
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"changed after it was measured")
    with pytest.raises(TrustError, match="changed while it was being launched"):
        boot_files.stage(str(state), str(view), str(kernel), "0" * 64)
    assert [p.name for p in boot_files.source_dir(str(state)).iterdir()] == []


def test_a_stale_view_is_replaced(dirs, tmp_path: Path):
    """The source directory removed and made again (a reset) leaves the mount on the old one."""
    state, view = dirs
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    digest = hashlib.sha256(b"k").hexdigest()
    boot_files.stage(str(state), str(view), str(kernel), digest)
    source = boot_files.source_dir(str(state))
    (source / digest).unlink()
    source.rmdir()
    assert not (view / digest).exists()
    booted = boot_files.stage(str(state), str(view), str(kernel), digest)
    assert Path(booted).read_bytes() == b"k"


def test_prune_keeps_what_a_domain_boots_and_what_was_just_staged(dirs, tmp_path: Path):
    state, view = dirs
    staged = []
    for content in (b"named", b"unnamed", b"recent"):
        src = tmp_path / content.decode()
        src.write_bytes(content)
        staged.append(boot_files.stage(str(state), str(view), str(src), hashlib.sha256(content).hexdigest()))
    old = time.time() - boot_files.PRUNE_GRACE_S - 10
    source = boot_files.source_dir(str(state))
    for path in staged[:2]:
        os.utime(source / Path(path).name, (old, old))
    removed = boot_files.prune(str(state), str(view), {staged[0]})
    assert removed == [Path(staged[1]).name]
    assert sorted(p.name for p in source.iterdir()) == sorted([Path(staged[0]).name, Path(staged[2]).name])
