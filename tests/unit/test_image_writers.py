"""Image layers someone other than root can change (issue #13): said at `image trust`, judged at launch.

QEMU reads a base image for as long as the guest runs, long after launch
measured it, so whoever can write the file changes what the guest reads.
The launch refusals use the CLI with libvirt unreachable: a refusal that
happened only after reaching libvirt would show up as exit code 7.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tvorch.adapters.imagefiles import inspect_image
from tvorch.cli import main
from tvorch.config import parse_config
from tvorch.core.launch.images import (
    OTHER_WRITER,
    WORLD_WRITABLE,
    ImageChain,
    ImageFormat,
    ImageLayer,
    judge_layer_writers,
    layer_writers,
)
from tvorch.errors import ConfigError, ExitCode

NOBODY = 65534
UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def layer(path: str = "/img/base.raw", **owner: int) -> ImageLayer:
    return ImageLayer(path, ImageFormat.RAW, 1 << 20, 1 << 20, **owner)


@pytest.mark.parametrize(
    ("owner", "expected"),
    [
        ({"mode": 0o644, "uid": 0, "gid": 0}, ()),
        ({"mode": 0o664, "uid": 0, "gid": 0}, ()),  # root's group
        ({"mode": 0o444, "uid": 0, "gid": 100}, ()),  # another group, but only to read
        ({}, ()),  # not known: nothing judged
        ({"mode": 0o666, "uid": 0, "gid": 0}, ((WORLD_WRITABLE, "is world-writable (mode 0666)"),)),
        ({"mode": 0o1777, "uid": 0, "gid": 0}, ((WORLD_WRITABLE, "is world-writable (mode 1777)"),)),
        ({"mode": 0o444, "uid": 1000, "gid": 0}, ((OTHER_WRITER, "is owned by uid 1000, not root"),)),
        ({"mode": 0o664, "uid": 0, "gid": 64055}, ((OTHER_WRITER, "is writable by group 64055"),)),
        (
            {"mode": 0o666, "uid": 1000, "gid": 1000},
            ((WORLD_WRITABLE, "is world-writable (mode 0666)"), (OTHER_WRITER, "is owned by uid 1000, not root")),
        ),
    ],
)
def test_layer_writers(owner, expected):
    found = layer_writers(layer(**owner))
    assert found == tuple((kind, f"image layer /img/base.raw {text}") for kind, text in expected)


def test_policy_decides_what_is_refused_and_what_is_only_said():
    chain = ImageChain((layer("/img/base.raw", mode=0o666, uid=0, gid=0),
                        layer("/img/top.qcow2", mode=0o644, uid=1000, gid=1000)))
    writable = "image layer /img/base.raw is world-writable (mode 0666)"
    owned = "image layer /img/top.qcow2 is owned by uid 1000, not root"
    assert judge_layer_writers(chain, "refuse-world-writable") == ((writable,), (owned,))
    assert judge_layer_writers(chain, "refuse") == ((writable, owned), ())
    assert judge_layer_writers(chain, "warn") == ((), (writable, owned))


def test_policy_key_default_and_choices():
    assert parse_config(b"").policy.unsafe_image_files == "refuse-world-writable"
    assert parse_config(b'[policy]\nunsafe_image_files = "warn"\n').policy.unsafe_image_files == "warn"
    with pytest.raises(ConfigError, match="policy.unsafe_image_files' must be one of refuse, refuse-world-writable"):
        parse_config(b'[policy]\nunsafe_image_files = "ignore"\n')


def raw_disk(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_inspect_image_reports_mode_and_owner_of_every_layer(tmp_path):
    base = raw_disk(tmp_path / "base.raw", 0o666, NOBODY, NOBODY)
    (only,) = inspect_image(str(base)).layers
    assert (only.mode, only.uid, only.gid) == (0o666, NOBODY, NOBODY)


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node whose libvirt is unreachable; WRITE(policy) sets policy.unsafe_image_files."""
    cfg = tmp_path / "tvorch.toml"

    def write(policy: str | None = None) -> Path:
        cfg.write_text(
            f'state_dir = "{tmp_path / "state"}"\noverlay_dir = "{tmp_path / "overlays"}"\n'
            f'console_log_dir = "{tmp_path / "logs"}"\nlibvirt_uri = "{UNREACHABLE}"\nvirt_type = "qemu"\n'
            + (f'[policy]\nunsafe_image_files = "{policy}"\n' if policy else "")
        )
        return tmp_path

    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    write()
    return write


def test_image_trust_warns_in_one_line_and_in_json(capsys, node, tmp_path):
    image = raw_disk(tmp_path / "shared.raw", 0o666)
    assert main(["image", "trust", str(image), "--json"]) == 0
    out, err = capsys.readouterr()
    warning = f"image layer {image} is world-writable (mode 0666): launch refuses it (policy.unsafe_image_files)"
    assert err.splitlines() == [f"tvorch: warning: {warning}"]
    (trusted,) = json.loads(out)
    assert trusted["warnings"] == [warning] and trusted["added"] is True
    # Trusted all the same, and said again when trusted again.
    assert main(["image", "trust", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("already trusted") and err.splitlines() == [f"tvorch: warning: {warning}"]


def test_image_trust_of_a_root_owned_image_says_nothing(capsys, node, tmp_path):
    image = raw_disk(tmp_path / "fine.raw", 0o644)
    assert main(["image", "trust", str(image), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)[0]["warnings"] == []


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.name != "tvorch.toml")


@pytest.mark.parametrize(
    ("policy", "mode", "uid", "gid", "words"),
    [
        (None, 0o666, 0, 0, "is world-writable (mode 0666)"),
        ("refuse", 0o644, NOBODY, 0, f"is owned by uid {NOBODY}, not root"),
        ("refuse", 0o664, 0, NOBODY, f"is writable by group {NOBODY}"),
    ],
)
def test_launch_refuses_before_anything_is_written(capsys, node, tmp_path, policy, mode, uid, gid, words):
    root = node(policy)
    image = raw_disk(tmp_path / "disk.raw", mode, uid, gid)
    before = snapshot(root)
    assert main(["launch", str(image), "--name", "ok"]) == ExitCode.IMAGE_REFUSED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tvorch: error: launch refused: image layer {image} {words}")
    assert "policy.unsafe_image_files" in lines[0]
    assert snapshot(root) == before


@pytest.mark.parametrize(("policy", "mode", "uid"), [(None, 0o644, NOBODY), ("warn", 0o666, 0)])
def test_launch_only_warns_where_the_policy_says_so(capsys, node, tmp_path, policy, mode, uid):
    node(policy)
    image = raw_disk(tmp_path / "disk.raw", mode, uid)
    # Past the check: the launch goes on and stops only at libvirt, which is unreachable.
    assert main(["launch", str(image), "--name", "ok"]) == ExitCode.LIBVIRT
    err = capsys.readouterr().err
    assert "image_layer_writable" in err and f"image layer {image} is" in err
