"""An OSError anywhere in a command is one line naming the path and the operation, exit 15.

The errors are real ones, raised by the calls tvorch makes; no command may end
in "internal error" because a file or directory was not what it expected.
"""

import os

import pytest

from tvorch.cli import main
from tvorch.errors import ExitCode, describe_os_error


def raised(call):
    with pytest.raises(OSError) as info:
        call()
    return describe_os_error(info.value)


def test_describe_names_the_operation_and_the_path(tmp_path):
    missing = tmp_path / "no" / "such"
    assert raised(lambda: os.mkdir(missing)) == f"cannot create directory {missing}: No such file or directory"
    assert raised(lambda: open(tmp_path, "rb")) == f"cannot open {tmp_path}: Is a directory"
    target = tmp_path / "elsewhere" / "x"
    assert raised(lambda: os.replace(missing, target)) == (
        f"cannot rename {missing} -> {target}: No such file or directory")
    assert raised(lambda: os.unlink(missing)) == f"cannot remove {missing}: No such file or directory"
    assert raised(lambda: (tmp_path / "a" / "b").write_bytes(b"x")).startswith(f"cannot open {tmp_path / 'a' / 'b'}")


def test_a_command_hitting_a_broken_node_file_is_one_line(tmp_path, monkeypatch, capsys):
    # The node CA certificate is a directory: reading it fails deep inside the command.
    state = tmp_path / "state"
    cfg = tmp_path / "tvorch.toml"
    cfg.write_text(f'state_dir = "{state}"\nvirt_type = "qemu"\n')
    monkeypatch.setenv("TVORCH_CONFIG", str(cfg))
    assert main(["ca", "show", "--pem"]) == 0  # made on first use
    capsys.readouterr()
    (state / "pki" / "ca.pem").unlink()
    (state / "pki" / "ca.pem").mkdir()
    rc = main(["ca", "show", "--pem"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == ExitCode.FILE, err
    assert len(err) == 1 and err[0].startswith("tvorch: error: ") and "internal error" not in err[0], err
    assert str(state / "pki") in err[0]
