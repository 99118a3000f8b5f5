"""The Debian package: `make deb`, lintian, `apt-get install ./tvorch_*.deb`, a
launch through /usr/bin/tvorch and the package's hook, `apt-get remove` (hook
gone, vTPM state kept) and `apt-get purge` (says what it leaves, leaves it).

Marked `package`: tests/conftest.py runs it after every other test, because
installing the package replaces the node's hook for a while (the session's
hook is put back at the end, byte for byte). It refuses to run where a
tvorch package is already installed: it never removes an operator's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.components import require
from tvorch.adapters.files import atomic_write
from tvorch.service import hook_install

from .conftest import HOOK, PREFIX, Tv, virsh

pytestmark = [pytest.mark.integration, pytest.mark.package]
ROOT = Path(__file__).resolve().parents[2]
NODE_CONFIG = Path("/etc/tvorch/tvorch.toml")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
# Keep a config file the node already has (make demo writes one) instead of asking.
APT_OPTS = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def run(*cmd: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def installed() -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "tvorch"], capture_output=True, text=True)
    return proc.returncode == 0 and "installed" in proc.stdout and "not-installed" not in proc.stdout


def tvorch_hooks() -> list[Path]:
    return [p for p in (HOOK, HOOK.parent / "qemu.d" / hook_install.DROP_IN)
            if p.exists() and hook_install.MARKER in p.read_text(errors="replace")]


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    for tool in ("dpkg-buildpackage", "dh", "lintian", "apt-get"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/setup-host.sh)")
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    run("make", "-C", str(ROOT), "deb", f"DEB_BUILD={out / 'build'}", f"DEB_OUT={out}")
    print(f"make deb: {time.monotonic() - started:.1f} s")
    debs = list(out.glob("tvorch_*_amd64.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_lintian_finds_no_errors(deb: Path):
    proc = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert errors == [] and proc.returncode == 0, proc.stdout + proc.stderr


def test_install_launch_remove_purge(deb: Path, tv: Tv, guest_dir: Path):
    require(not installed(), "no tvorch package installed on this node (the test would remove it)")
    session_hook = HOOK.read_bytes()
    node_config = NODE_CONFIG.read_bytes() if NODE_CONFIG.exists() else None
    name = f"{PREFIX}pkg-{secrets.token_hex(2)}"
    env = {**os.environ, "TVORCH_CONFIG": str(tv.config)}
    try:
        done = run("apt-get", "install", "-y", *APT_OPTS, f"{deb}", env=APT_ENV)
        assert "tvorch: libvirt hook updated in place" in done.stdout  # the session's hook was tvorch's
        assert Path("/usr/bin/tvorch").resolve() == Path("/opt/tvorch/bin/tvorch")
        assert "/opt/tvorch/bin/python" in HOOK.read_text()
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "tvorch").stdout
        assert str(NODE_CONFIG) in conffiles
        # The package built tvorch's compiled IMA fold, and its libcrypto is there to load it.
        run("/opt/tvorch/bin/python", "-c", "from tvorch.core.attestation import ima; "
            "assert ima._fold_plain is not ima._fold_reference, 'the compiled IMA fold is missing'")

        # The package's hook, reading this session's config, gates a launch by the package's CLI.
        ours = hook_install.render_shim("/opt/tvorch/bin/python", str(tv.config))
        for _ in range(3):
            run("/usr/bin/tvorch", "install-hook", "--hook-config", str(tv.config))
            assert HOOK.read_bytes() == ours
            launch = subprocess.run(["/usr/bin/tvorch", "launch", str(guest_dir / "guest.qcow2"), "--name", name,
                                     "--memory", "512", "--json"], capture_output=True, text=True, env=env, timeout=600)
            # Another test session on this node may point the one hook at its own config meanwhile:
            # only then is the launch tried again.
            if launch.returncode == 0 or HOOK.read_bytes() == ours:
                break
        assert launch.returncode == 0, launch.stderr
        assert virsh("domstate", name).stdout.strip() == "running"
        record = tv.json("show", name)
        vtpm_state = Path("/var/lib/libvirt/swtpm") / record["uuid"] / "tpm2"
        assert any(vtpm_state.iterdir())
        before = {p.name: p.read_bytes() for p in vtpm_state.iterdir() if p.is_file()}

        removed = run("apt-get", "remove", "-y", "tvorch", env=APT_ENV)
        assert tvorch_hooks() == [], removed.stdout
        assert not Path("/usr/bin/tvorch").exists() and not Path("/opt/tvorch").exists()
        assert vtpm_state.is_dir() and set(before) <= {p.name for p in vtpm_state.iterdir()}
        assert (tv.state_dir / "tvorch.db").is_file()

        purged = run("apt-get", "purge", "-y", "tvorch", env=APT_ENV)
        assert "/var/lib/libvirt/swtpm   the VMs' vTPM states: tenants' data, never purged" in purged.stdout
        assert not NODE_CONFIG.exists()  # the conffile goes (put back below when the node had one)
        assert vtpm_state.is_dir() and set(before) <= {p.name for p in vtpm_state.iterdir()}
    finally:
        if installed():
            subprocess.run(["apt-get", "purge", "-y", "tvorch"], capture_output=True, env=APT_ENV)
        # The session's hook and the node's config, as they were.
        atomic_write(HOOK, session_hook, mode=0o755)
        if node_config is not None:
            NODE_CONFIG.parent.mkdir(mode=0o755, exist_ok=True)
            atomic_write(NODE_CONFIG, node_config, mode=0o644)
    assert HOOK.read_bytes() == session_hook
    tv.destroy(name)
