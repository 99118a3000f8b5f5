import os
import stat

import pytest

from tvorch.adapters.files import atomic_write, ensure_private_dir, read_bounded
from tvorch.errors import ConfigError


def test_read_bounded_reads_a_regular_file_and_refuses_the_rest(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bounded(str(path), 10) == b"x" * 10
    with pytest.raises(OSError, match="larger than 9 bytes"):
        read_bounded(str(path), 9)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # and it does not hang
        read_bounded(str(fifo), 10)
    with pytest.raises(IsADirectoryError):
        read_bounded(str(tmp_path), 10)
    with pytest.raises(OSError, match="not a regular file"):
        read_bounded("/dev/zero", 10)


def test_private_dir_is_created_0700_but_an_existing_one_keeps_its_mode(tmp_path):
    new = tmp_path / "a" / "b"
    ensure_private_dir(new)
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    ensure_private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create directory .*file"):
        ensure_private_dir(tmp_path / "file")


def test_atomic_write_is_0600_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "secret"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
