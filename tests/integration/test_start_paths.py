"""Start paths for a sealed vTPM (README, "Start paths"), against the real libvirtd, swtpm and test guest.

One guest goes through all of them: launch --autostart, `virsh start` refused naming `tvorch start`,
started by `tvorch serve`, saved by it on SIGTERM (serve.on_shutdown = "save"), a restore with a
rolled-back vTPM state refused, resumed by the next `tvorch serve`, shut down by it on SIGTERM
(serve.on_shutdown = "shutdown"), a rolled-back save image refused, then booted again: its vTPM's NV
value survived it all.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from .conftest import PREFIX, Tv, virsh
from .guest import wait_for_ready
from .test_daemon import start_daemon, state_of, stop_daemon, wait_until

pytestmark = pytest.mark.integration


def _serve_config(tv: Tv, on_shutdown: str) -> Path:
    config = tv.config.with_name(f"tvorch-serve-{on_shutdown}.toml")
    config.write_text(tv.config.read_text() + f'[serve]\non_shutdown = "{on_shutdown}"\nstart_concurrency = 2\n')
    return config


def _ledger_events(tv: Tv, name: str) -> list[str]:
    return [e["event"] for e in tv.json("vtpm", "ledger", name)["entries"]]


def _event_kinds(tv: Tv, name: str) -> list[str]:
    return [e["kind"] for e in tv.json("show", name)["events"]]


def test_autostart_save_restore_shutdown(tv: Tv, guest_dir: Path, tmp_path: Path):
    name = f"{PREFIX}paths-{secrets.token_hex(2)}"
    record = tv.launch(guest_dir / "guest.qcow2", name, "--memory", "256", "--autostart")
    log = Path(record["console_log"])
    state = Path(f"/var/lib/libvirt/swtpm/{record['uuid']}/tpm2")
    image = Path(f"/var/lib/libvirt/qemu/save/{name}.save")
    # The daemons save and shut down every running instance of the session's store: start those again after.
    others = [r["name"] for r in tv.json("list") if r["state"] == "running" and r["name"] != name]
    try:
        first = wait_for_ready(log)
        assert first.nv is not None and first.nv[0] == "stored", first.nv
        # show and list say which instances the daemon starts at node boot.
        assert tv.json("show", name)["autostart"] is True
        assert {r["name"]: r["autostart"] for r in tv.json("list")}[name] is True
        stored = first.nv[1]
        tv.run("stop", name)
        assert _ledger_events(tv, name)[-1] == "stopped"
        before_run = tmp_path / "before-run"
        shutil.copytree(state, before_run)

        # libvirt's own start: refused by the hook, naming the command that works.
        refused = virsh("start", name, check=False)
        assert refused.returncode != 0 and f"`tvorch start {name}`" in refused.stderr, refused.stderr
        assert "Secret not found" not in refused.stderr

        # Node boot: the daemon starts the autostart instance.
        proc, _ = start_daemon(tv, tmp_path, _serve_config(tv, "save"))
        try:
            wait_until(lambda: state_of(tv, name) == "running", timeout=60, what="autostart instance running")
            assert wait_for_ready(log).nv == ("found", stored)
        finally:
            # Host shutdown with serve.on_shutdown = "save": a managed save through tvorch.
            assert stop_daemon(proc) == 0
        assert virsh("domstate", name).stdout.strip() == "shut off"
        assert image.exists()
        assert _ledger_events(tv, name)[-2:] == ["stopped", "saved"]
        assert "saved" in _event_kinds(tv, name)
        saved_image = tmp_path / "saved.image"
        shutil.copy2(image, saved_image)

        # A restore with a rolled-back vTPM state: refused by the hook, nothing resumed.
        at_save = tmp_path / "at-save"
        shutil.copytree(state, at_save)
        shutil.copy2(before_run / "tpm2-00.permall", state / "tpm2-00.permall")
        rolled = tv.run("start", name, check=False)
        assert rolled.returncode != 0 and "vTPM state differs from the last recorded stop" in rolled.stderr, \
            rolled.stderr
        assert image.exists() and virsh("domstate", name).stdout.strip() == "shut off"
        shutil.copy2(at_save / "tpm2-00.permall", state / "tpm2-00.permall")

        # The next daemon resumes it (the key lent for the restore) ...
        proc, _ = start_daemon(tv, tmp_path, _serve_config(tv, "shutdown"))
        try:
            wait_until(lambda: state_of(tv, name) == "running", timeout=60, what="saved instance resumed")
            assert "restored" in _event_kinds(tv, name)
            assert not image.exists()
        finally:
            # ... and with serve.on_shutdown = "shutdown" shuts it down, its state ledgered.
            assert stop_daemon(proc) == 0
        assert virsh("domstate", name).stdout.strip() == "shut off"
        assert state_of(tv, name) == "stopped"
        assert _ledger_events(tv, name)[-1] == "stopped"

        # A rolled-back save image (the one made before the restore, recorded then): refused.
        shutil.copy2(saved_image, image)
        replayed = tv.run("start", name, check=False)
        assert replayed.returncode != 0 and "older than its last stop" in replayed.stderr, replayed.stderr
        assert virsh("domstate", name).stdout.strip() == "shut off"
        os.remove(image)

        # Booted again: the NV value the first boot stored is still in its vTPM.
        tv.run("start", name)
        assert wait_for_ready(log).nv == ("found", stored)
    finally:
        if image.exists():
            os.remove(image)
        tv.run("destroy", "--purge-vtpm", name, check=False)
        for other in others:
            tv.run("start", other, check=False)
