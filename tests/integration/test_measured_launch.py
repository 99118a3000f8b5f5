"""Measured launch against the real libvirtd: manifests, reference values, refusals."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path

import pytest

from tvorch.core.launch.canonical import autoselection_hint, config_digest
from tvorch.core.launch.domain_xml import parse_instance_metadata

from .conftest import PREFIX, BootedGuest, Tv, our_domains, virsh

pytestmark = pytest.mark.integration


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tv: Tv, booted_guest: BootedGuest, tmp_path_factory) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("manifest")
    manifest, ca = out / "manifest.json", out / "ca.pem"
    tv.run("manifest", "show", booted_guest.name, "--out", str(manifest))
    ca.write_text(tv.run("ca", "show", "--pem").stdout)
    return manifest, ca, json.loads(manifest.read_bytes())["manifest"]


def test_manifest_verifies_with_only_the_ca(tv: Tv, exported):
    manifest, ca, body = exported
    result = json.loads(tv.run("manifest", "verify", str(manifest), "--ca", str(ca), "--json").stdout)
    assert result["valid"] is True and result["instance_id"] == body["instance_id"]


def test_manifest_rejects_a_changed_byte(tv: Tv, exported, tmp_path: Path):
    manifest, ca, _ = exported
    data = bytearray(manifest.read_bytes())
    data[data.index(b'"name":"') + 8] ^= 0x01
    changed = tmp_path / "changed.json"
    changed.write_bytes(bytes(data))
    proc = tv.run("manifest", "verify", str(changed), "--ca", str(ca), check=False)
    assert proc.returncode == 12 and proc.stderr.startswith("tvorch: error: ")


def test_domain_metadata_names_the_manifest(booted_guest: BootedGuest, exported):
    manifest, _, _ = exported
    meta = parse_instance_metadata(virsh("dumpxml", booted_guest.name).stdout)
    assert meta is not None and meta.manifest_digest == sha256(manifest)


def test_manifest_measures_what_runs(booted_guest: BootedGuest, guest_dir: Path, exported):
    _, _, body = exported
    by_kind: dict[str, list[dict]] = {}
    for m in body["measurements"]:
        by_kind.setdefault(m["kind"], []).append(m)
    (layer,) = by_kind["image-layer"]
    assert layer["path"] == str(guest_dir / "guest.qcow2")
    assert layer["digest"] == sha256(guest_dir / "guest.qcow2")
    assert layer["details"]["format"] == "qcow2"
    # What libvirt actually runs: the QEMU command line names the firmware and emulator we measured.
    cmdline = Path(f"/var/log/libvirt/qemu/{booted_guest.name}.log").read_text()
    (code,) = by_kind["firmware-code"]
    assert code["digest"] == sha256(Path(code["path"]))
    assert Path(code["path"]).name in cmdline
    assert by_kind["emulator"][0]["digest"] == sha256(Path("/usr/bin/qemu-system-x86_64"))
    assert by_kind["swtpm"][0]["digest"] == sha256(Path("/usr/bin/swtpm"))


def test_config_digest_matches_what_libvirt_holds(booted_guest: BootedGuest, exported):
    """The digest of libvirt's live and inactive XML is the manifest's. After a libvirtd restart
    (other tests make one) libvirt 9.0's live XML forgets the auto-selected firmware's features;
    the hint the hook uses, from the defined XML and the manifest, maps it back."""
    _, _, body = exported
    inactive = virsh("dumpxml", "--inactive", booted_guest.name).stdout
    hint = autoselection_hint(inactive, body["measurements"])
    assert hint is not None
    for xml in (virsh("dumpxml", booted_guest.name).stdout, inactive):
        assert config_digest(xml, hint) == body["config_digest"]


def _modified_copy(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    return dest


def test_untrusted_image_is_refused_and_nothing_is_defined(tv: Tv, guest_dir: Path, tmp_path: Path):
    image = _modified_copy(guest_dir / "guest.qcow2", tmp_path / "changed.qcow2")
    name = f"{PREFIX}untrusted-{secrets.token_hex(2)}"
    overlays = sorted(tv.overlay_dir.iterdir())
    proc = tv.run("launch", str(image), "--name", name, check=False)
    assert proc.returncode == 12, proc.stderr
    assert f"image {image}" in proc.stderr and "not a trusted reference value" in proc.stderr
    assert name not in our_domains()
    assert sorted(tv.overlay_dir.iterdir()) == overlays
    assert all(r["name"] != name for r in tv.json("list"))
    # The policy does not permit the override.
    proc = tv.run("launch", str(image), "--name", name, "--allow-untrusted-image", check=False)
    assert proc.returncode == 12 and "does not permit" in proc.stderr


def test_trust_list_untrust(tv: Tv, guest_dir: Path, tmp_path: Path):
    image = _modified_copy(guest_dir / "guest.qcow2", tmp_path / "other.qcow2")
    digest = sha256(image)
    added = tv.json("image", "trust", str(image), "--label", "other")
    assert [a["digest"] for a in added] == [digest] and added[0]["added"] is True
    assert tv.json("image", "trust", str(image))[0]["added"] is False
    assert digest in {r["digest"] for r in tv.json("image", "list")}
    removed = tv.json("image", "untrust", digest)
    assert removed["digest"] == digest
    assert digest not in {r["digest"] for r in tv.json("image", "list")}
    # A controller retrying the removal is told it is already gone (exit 0); a digest never trusted is not found.
    again = tv.json("image", "untrust", digest)
    assert again["removed"] is False and again["already_removed_at"]
    assert tv.run("image", "untrust", "ab" * 32, check=False).returncode == 5


def test_cached_digest_and_rehash(tv: Tv, guest_dir: Path):
    """Launching a trusted image again does not re-read it; --rehash does."""
    name = f"{PREFIX}cache-{secrets.token_hex(2)}"
    for rehash, cached in ((False, True), (True, False)):
        args = ["--rehash"] if rehash else []
        rec = tv.launch(guest_dir / "guest.qcow2", name, *args)
        try:
            body = tv.json("manifest", "show", name)["manifest"]
            layer = next(m for m in body["measurements"] if m["kind"] == "image-layer")
            assert layer["details"]["cached"] is cached
        finally:
            tv.run("destroy", "--purge-vtpm", rec["name"])


def test_waived_untrusted_image_is_marked_in_the_signed_manifest(tv: Tv, guest_dir: Path, tmp_path: Path):
    """Where the policy permits the override, the manifest says the image was not trusted."""
    permissive = tmp_path / "permissive.toml"
    permissive.write_text(tv.config.read_text().replace(
        "[firmware_profiles.snakeoil]", "[policy]\nallow_untrusted_image = true\n[firmware_profiles.snakeoil]"))
    images = Path(f"/var/lib/libvirt/images/{PREFIX}waive-{secrets.token_hex(2)}")
    images.mkdir(mode=0o755)
    image = _modified_copy(guest_dir / "guest.qcow2", images / "untrusted.qcow2")
    image.chmod(0o644)
    name = f"{PREFIX}waived-{secrets.token_hex(2)}"
    loose = Tv(permissive, tv.state_dir, tv.overlay_dir, tv.log_dir)
    try:
        loose.launch(image, name, "--allow-untrusted-image")
        body = tv.json("manifest", "show", name)["manifest"]
        layer = next(m for m in body["measurements"] if m["kind"] == "image-layer")
        assert layer["details"]["waived"] is True and layer["path"] == str(image)
        assert any(e["kind"] == "policy-waived" for e in tv.json("show", name)["events"])
    finally:
        tv.run("destroy", "--purge-vtpm", name, check=False)
        shutil.rmtree(images, ignore_errors=True)
