"""Fixtures for integration tests: the real libvirtd, swtpm, OVMF and test guest.

Everything these tests create carries the prefix ``tvtest-`` and is removed at
the end; domains the tests did not create are never touched. Without a
component the tests skip, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.components import require
from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.files import atomic_write
from tvorch.service import hook_install

from .guest import GuestReport, wait_for_ready

URI = "qemu:///system"
PREFIX = "tvtest-"
GUEST_DIR = Path(os.environ.get("TVORCH_TEST_GUEST_DIR", "/var/cache/tvorch/test-guest"))
SNAKEOIL_CODE = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd"
SNAKEOIL_VARS = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=check)


def our_domains() -> set[str]:
    out = virsh("list", "--all", "--name", check=False).stdout
    return {n for n in out.split() if n.startswith(PREFIX)}


@dataclass
class Tv:
    """Runs the real `tvorch` CLI in a subprocess against a test config."""

    config: Path
    state_dir: Path
    overlay_dir: Path
    log_dir: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TVORCH_CONFIG": str(self.config)}
        proc = subprocess.run(
            [sys.executable, "-m", "tvorch.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"tvorch {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json").stdout)

    def launch(self, image: Path | str, name: str, *opts: str) -> dict:
        return self.json("launch", str(image), "--name", name, "--memory", "512", *opts)

    def destroy(self, name: str) -> None:
        self.run("destroy", "--purge-vtpm", name, check=False)


@pytest.fixture(scope="session")
def libvirt_ready() -> None:
    ok = shutil.which("virsh") is not None and virsh("version", check=False).returncode == 0
    require(ok, f"libvirtd answering at {URI}")


HOOK = Path("/etc/libvirt/hooks/qemu")


@pytest.fixture(scope="session")
def hook_for(libvirt_ready):
    """Point libvirt's hook at a test config for the session, then put it back.

    libvirtd runs whatever is at the hook's path on each call, so swapping the
    file's content works without a restart (the file must have existed when
    libvirtd started: `make test` installs it first).
    """
    require(HOOK.is_file() and hook_install.MARKER in HOOK.read_text(),
            f"tvorch's hook installed at {HOOK} before libvirtd started (make libvirt)")
    original = HOOK.read_bytes()

    def point_at(config: Path) -> None:
        atomic_write(HOOK, hook_install.render_shim(sys.executable, str(config)), mode=0o755)

    yield point_at
    atomic_write(HOOK, original, mode=0o755)


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    require((GUEST_DIR / "guest.qcow2").is_file(), f"test guest built in {GUEST_DIR} (make guest)")
    return GUEST_DIR


@pytest.fixture(scope="session")
def host_tpm(tmp_path_factory) -> Iterator[str]:
    """A swtpm standing in for the host TPM the vTPM keys are sealed to, for the whole session."""
    with running_swtpm(tmp_path_factory.mktemp("host-tpm")) as tcti:
        yield tcti


@pytest.fixture(scope="session")
def escrow_key(tmp_path_factory) -> Path:
    """The operator's escrow key pair (RSA 3072): the private half is what `vtpm rekey --escrow-key` takes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    root = tmp_path_factory.mktemp("escrow")
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    (root / "escrow.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (root / "escrow.pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return root / "escrow.pem"


@pytest.fixture(scope="session")
def tv(libvirt_ready, hook_for, guest_dir: Path, host_tpm: str, escrow_key: Path, tmp_path_factory) -> Tv:
    root = tmp_path_factory.mktemp("tvorch")
    tag = secrets.token_hex(3)
    env = Tv(
        config=root / "tvorch.toml",
        state_dir=root / "state",
        # qemu runs as libvirt-qemu and must reach its overlay: keep it under libvirt's images.
        overlay_dir=Path(f"/var/lib/libvirt/images/{PREFIX}{tag}"),
        log_dir=root / "console",
    )
    boot_view = Path(f"/run/tvorch/{PREFIX}boot-{tag}")  # the read-only view of staged direct-boot files
    env.config.write_text(
        f'state_dir = "{env.state_dir}"\n'
        f'overlay_dir = "{env.overlay_dir}"\n'
        f'console_log_dir = "{env.log_dir}"\n'
        f'boot_files_dir = "{boot_view}"\n'
        f'libvirt_uri = "{URI}"\n'
        "stop_timeout = 60\n"
        "[host]\n"
        f'tcti = "{host_tpm}"\n'
        "[vtpm]\n"
        f'escrow_public_key = "{escrow_key.with_name("escrow.pub.pem")}"\n'
        "[firmware_profiles.snakeoil]\n"
        f'code = "{SNAKEOIL_CODE}"\n'
        f'vars_template = "{SNAKEOIL_VARS}"\n'
        "secure_boot = true\n"
    )
    hook_for(env.config)
    for image in ("guest.qcow2", "guest-signed.qcow2"):
        env.run("image", "trust", str(guest_dir / image), "--label", f"test guest {image}")
    before = our_domains()
    yield env
    for name in our_domains() - before:
        env.destroy(name)
        if name in our_domains():  # not ours in the store: remove it directly
            virsh("destroy", name, check=False)
            virsh("undefine", "--nvram", "--remove-all-storage", "--tpm", name, check=False)
    shutil.rmtree(env.overlay_dir, ignore_errors=True)
    while subprocess.run(["umount", "-l", str(boot_view)], capture_output=True).returncode == 0:
        pass
    shutil.rmtree(boot_view, ignore_errors=True)


@pytest.fixture(scope="session")
def tv_clear(tv: Tv) -> Tv:
    """The same store and hook, launching with vTPM state in clear (vtpm.key_protection = "none").

    For the tests of libvirt's own start paths (`virsh start`, save/restore):
    an encrypted vTPM starts only through `tvorch start`, which lends libvirt
    the key for the start, so those paths fail for it by design.
    """
    config = tv.config.with_name("tvorch-clear.toml")
    text = tv.config.read_text()
    assert "[vtpm]\n" in text
    config.write_text(text.replace("[vtpm]\n", '[vtpm]\nkey_protection = "none"\n'))
    return Tv(config=config, state_dir=tv.state_dir, overlay_dir=tv.overlay_dir, log_dir=tv.log_dir)


@dataclass(frozen=True)
class BootedGuest:
    name: str
    record: dict
    report: GuestReport


@pytest.fixture(scope="session")
def booted_guest(tv: Tv, guest_dir: Path) -> BootedGuest:
    """One guest booted with UEFI and a vTPM, shared by the tests that only read it."""
    name = f"{PREFIX}shared-{secrets.token_hex(2)}"
    record = tv.launch(guest_dir / "guest.qcow2", name)
    report = wait_for_ready(Path(record["console_log"]))
    yield BootedGuest(name, record, report)
    tv.destroy(name)
