"""Every refused launch: one line, its documented exit code, nothing written.

The config points libvirt at a socket that does not exist, so a refusal that
happened only after reaching libvirt would show up as exit code 7 instead.
"""

import json
import subprocess

import pytest

from tvorch.cli import main
from tvorch.errors import ExitCode

UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


@pytest.fixture
def node_dirs(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("state", "overlays", "logs")}
    cfg = tmp_path / "tvorch.toml"
    cfg.write_text(
        f'state_dir = "{dirs["state"]}"\noverlay_dir = "{dirs["overlays"]}"\n'
        f'console_log_dir = "{dirs["logs"]}"\nlibvirt_uri = "{UNREACHABLE}"\nvirt_type = "qemu"\n'
    )
    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    return tmp_path


@pytest.fixture
def disk(tmp_path):
    """A small raw disk with an MBR signature, converted to qcow2."""
    raw = tmp_path / "disk.raw"
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    raw.write_bytes(bytes(data))
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    return qcow


def snapshot(root):
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.name != "tvorch.toml"
    )


def refuse(capsys, root, args, code, words):
    before = snapshot(root)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvorch: error: "), err
    assert words in lines[0]
    assert snapshot(root) == before
    return lines[0]


@pytest.mark.parametrize(
    "name, words",
    [
        ("", "must not be empty"),
        ("x" * 65, "at most 64"),
        ("a<b", "letters, digits"),
        ("a&b", "letters, digits"),
        ("it's", "letters, digits"),
        ("a/b", "letters, digits"),
        ("..", "letters, digits"),
    ],
)
def test_bad_names(capsys, node_dirs, disk, name, words):
    refuse(capsys, node_dirs, ["launch", str(disk), "--name", name], ExitCode.INVALID_INPUT, words)


@pytest.mark.parametrize(
    "opts, words",
    [
        (["--memory", "0"], "refused memory 0 MiB"),
        (["--memory", "99999999"], "refused memory"),
        (["--vcpus", "0"], "refused vcpus 0"),
        (["--vcpus", "1000"], "refused vcpus 1000"),
        (["--firmware", "bios", "--secure-boot"], "Secure Boot needs UEFI"),
        (["--firmware-profile", "nope"], "unknown"),
        (["--initrd", "/etc/hostname"], "without --kernel"),
        (["--kernel", "/nonexistent/vmlinuz"], "not a readable file"),
    ],
)
def test_bad_options(capsys, node_dirs, disk, opts, words):
    refuse(capsys, node_dirs, ["launch", str(disk), "--name", "ok", *opts], ExitCode.INVALID_INPUT, words)


def test_non_integer_memory_is_a_usage_error(capsys, node_dirs, disk):
    refuse(capsys, node_dirs, ["launch", str(disk), "--name", "ok", "--memory", "lots"], ExitCode.USAGE, "--memory")


def _truncated(tmp_path, disk):
    path = tmp_path / "cut.qcow2"
    data = disk.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _missing_backing(tmp_path, disk):
    base = tmp_path / "base.qcow2"
    base.write_bytes(disk.read_bytes())
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    base.unlink()
    return top


def _text(tmp_path, disk):
    path = tmp_path / "notes.txt"
    path.write_text("not a disk\n" * 100)
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda tmp, disk: tmp / "absent.qcow2", "absent.qcow2"),
        (lambda tmp, disk: tmp, "directory"),
        (_text, "not a disk image"),
        (_truncated, "cut.qcow2"),
        (_missing_backing, "base.qcow2"),
    ],
)
def test_bad_images(capsys, node_dirs, disk, make, words):
    image = make(node_dirs, disk)
    refuse(capsys, node_dirs, ["launch", str(image), "--name", "ok"], ExitCode.IMAGE_REFUSED, words)


def test_unreachable_libvirt(capsys, node_dirs, disk):
    line = refuse(capsys, node_dirs, ["launch", str(disk), "--name", "ok"], ExitCode.LIBVIRT, "cannot connect")
    assert UNREACHABLE in line


def test_bad_config_is_one_line(capsys, tmp_path, monkeypatch, disk):
    cfg = tmp_path / "tvorch.toml"
    cfg.write_text("stop_timout = 3\n")
    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    refuse(capsys, tmp_path, ["list"], ExitCode.CONFIG, "unknown config key 'stop_timout'")


def test_unknown_instance(capsys, node_dirs):
    # The store is created on first use; that is allowed, so only check the line and code.
    assert main(["show", "ghost"]) == ExitCode.NOT_FOUND
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tvorch: error: ")


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["attest", "vm1", "--nonce", "xyz"], ExitCode.INVALID_INPUT, "not hex"),
        (["attest", "vm1", "--nonce", "00ff"], ExitCode.INVALID_INPUT, "give 8 to 64 bytes"),
        (["verify", "missing.json", "--ca", "ca.pem", "--nonce", "00" * 16], ExitCode.INVALID_INPUT, "cannot read"),
        (["verify", "b.json", "--ca", "ca.pem", "--nonce", "zz"], ExitCode.INVALID_INPUT, "not hex"),
        (["verify", "b.json", "--ca", "ca.pem", "--nonce", "00" * 16, "--skip-check", "hots"],
         ExitCode.INVALID_INPUT, "no check named 'hots': the checks are 'node certificate', 'bundle signature'"),
        (["verify", "b.json", "--ca", "ca.pem", "--nonce", "00" * 16, "--max-age", "5x"], ExitCode.USAGE,
         "not a duration"),
        (["verify", "b.json", "--ca", "ca.pem", "--nonce", "00" * 16, "--max-host-age", "0"], ExitCode.USAGE,
         "not a duration"),
        (["verify", ".", "--ca", "ca.pem", "--nonce", "00" * 16], ExitCode.INVALID_INPUT,
         "cannot read .: a directory, not a regular file"),
        (["verify", "/dev/null", "--ca", "ca.pem", "--nonce", "00" * 16], ExitCode.INVALID_INPUT,
         "cannot read /dev/null: not a regular file"),
        (["vtpm", "restore", "vm1", "missing.tar"], ExitCode.INVALID_INPUT, "does not exist"),
        (["vtpm", "show", "a/b"], ExitCode.INVALID_INPUT, "letters, digits"),
        (["baseline", "accept", "vm1"], ExitCode.USAGE, "--reason"),
        (["eventlog", "compare", "missing-a.bin", "missing-b.bin"], ExitCode.INVALID_INPUT, "cannot read"),
    ],
)
def test_attestation_and_vtpm_refusals(capsys, node_dirs, monkeypatch, args, code, words):
    monkeypatch.chdir(node_dirs)
    refuse(capsys, node_dirs, args, code, words)


def test_verify_refuses_a_file_that_is_not_a_bundle(capsys, node_dirs, monkeypatch):
    """A garbled bundle is a failed `format` check, exit 13 (malformed evidence), never a traceback."""
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives import serialization

    from tvorch.core.signing import make_ca

    monkeypatch.chdir(node_dirs)
    _, ca_cert = make_ca("test CA", datetime.now(timezone.utc))
    (node_dirs / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (node_dirs / "b.json").write_text('{"format": "something else"}')
    assert main(["verify", "b.json", "--ca", "ca.pem", "--nonce", "00" * 16]) == ExitCode.EVIDENCE
    out, err = capsys.readouterr()
    assert "format" in out and "FAIL" in out
    assert err.strip().splitlines() == [err.strip()] and err.startswith("tvorch: error: evidence bundle b.json failed")
    # A PCR key int() refuses (issue #13: it was an "internal error"): the same one line, the same code.
    from tests.unit.test_bundle import FIXTURE, make_pieces

    valid = make_pieces(FIXTURE).bundle()
    for key in ("²", "1" * 5000):
        bundle = json.loads(valid)
        bundle["guest"]["pcrs"][key] = "00" * 32
        (node_dirs / "b.json").write_text(json.dumps(bundle))
        assert main(["verify", "b.json", "--ca", "ca.pem", "--nonce", "00" * 16]) == ExitCode.EVIDENCE
        out, err = capsys.readouterr()
        assert err.strip().splitlines() == [err.strip()] and "malformed evidence" in err
