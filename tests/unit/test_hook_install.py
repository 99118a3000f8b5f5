"""Installing the libvirt qemu hook shim (tvorch.service.hook_install) next to other people's hooks.

The hooks directory is shared: tvorch must never overwrite or remove a hook
it did not write, and the shim it writes must really pass libvirt's argv,
stdin and its own config through to tvorch's interpreter.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tvorch.errors import ConfigError, ConflictError, InputError
from tvorch.service.hook_install import DROP_IN, MARKER, install, render_shim, uninstall

PYTHON = "/opt/tvorch/bin/python"
THEIRS = b"#!/bin/sh\n# the operator's own hook\nlogger \"$@\"\nexit 0\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ROOT with its bytes (None for directories) and mode."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (None, mode(p))
        for name in filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (p.read_bytes(), mode(p))
    return out


def test_install_into_empty_dir_takes_the_main_slot(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    config = str(config_file(tmp_path, "tvorch.toml"))
    done = install(hooks, config, python=PYTHON)
    shim = hooks / "qemu"
    assert done.path == str(shim) and done.created is True and done.config == config
    assert mode(shim) == 0o755
    text = shim.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert MARKER in text
    assert f"TVORCH_PYTHON='{PYTHON}'\n" in text
    assert f"export TVORCH_CONFIG='{config}'\n" in text
    assert 'exec "$TVORCH_PYTHON" -m tvorch.hook "$@"' in text
    assert not (hooks / "qemu.d").exists()


def test_install_without_config_exports_none(tmp_path: Path) -> None:
    install(tmp_path, None, python=PYTHON)
    text = (tmp_path / "qemu").read_text()
    assert "TVORCH_CONFIG" not in text
    assert f"TVORCH_PYTHON='{PYTHON}'" in text


def test_install_again_updates_in_place(tmp_path: Path) -> None:
    configs = tmp_path / "etc"
    configs.mkdir()
    install(tmp_path, str(config_file(configs, "a.toml")), python=PYTHON)
    again = install(tmp_path, str(config_file(configs, "b.toml")), python="/srv/venv/bin/python")
    assert again.created is False and again.path == str(tmp_path / "qemu")
    text = (tmp_path / "qemu").read_text()
    assert str(configs / "b.toml") in text and str(configs / "a.toml") not in text
    assert "TVORCH_PYTHON='/srv/venv/bin/python'" in text
    assert mode(tmp_path / "qemu") == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc", "qemu"]  # no temporary file left behind


def test_someone_elses_hook_keeps_the_main_slot(tmp_path: Path) -> None:
    theirs = tmp_path / "qemu"
    theirs.write_bytes(THEIRS)
    theirs.chmod(0o700)
    done = install(tmp_path, None, python=PYTHON)
    assert done.path == str(tmp_path / "qemu.d" / DROP_IN) and done.created is True
    assert theirs.read_bytes() == THEIRS and mode(theirs) == 0o700
    drop_in = tmp_path / "qemu.d" / DROP_IN
    assert mode(drop_in) == 0o755 and MARKER in drop_in.read_text()
    assert install(tmp_path, None, python=PYTHON).created is False  # the drop-in is now ours: updated
    assert theirs.read_bytes() == THEIRS


def test_foreign_drop_in_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_bytes(THEIRS)
    (tmp_path / "qemu.d").mkdir()
    (tmp_path / "qemu.d" / DROP_IN).write_bytes(b"#!/bin/sh\n# not tvorch\n")
    before = snapshot(tmp_path)
    with pytest.raises(ConflictError, match=DROP_IN):
        install(tmp_path, None, python=PYTHON)
    assert snapshot(tmp_path) == before


def test_uninstall_removes_ours_from_both_places(tmp_path: Path) -> None:
    install(tmp_path, None, python=PYTHON)
    (tmp_path / "qemu.d").mkdir()
    (tmp_path / "qemu.d" / DROP_IN).write_bytes(render_shim(PYTHON, None))
    (tmp_path / "qemu.d" / "10-other").write_bytes(THEIRS)
    removed = uninstall(tmp_path)
    assert sorted(removed) == sorted([str(tmp_path / "qemu"), str(tmp_path / "qemu.d" / DROP_IN)])
    assert not (tmp_path / "qemu").exists() and not (tmp_path / "qemu.d" / DROP_IN).exists()
    assert (tmp_path / "qemu.d" / "10-other").read_bytes() == THEIRS


def test_uninstall_never_removes_theirs(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_bytes(THEIRS)
    install(tmp_path, None, python=PYTHON)  # goes to the drop-in
    assert uninstall(tmp_path) == [str(tmp_path / "qemu.d" / DROP_IN)]
    assert (tmp_path / "qemu").read_bytes() == THEIRS
    (tmp_path / "qemu.d" / DROP_IN).write_bytes(THEIRS)
    assert uninstall(tmp_path) == []
    assert (tmp_path / "qemu.d" / DROP_IN).read_bytes() == THEIRS


def test_uninstall_with_nothing_installed(tmp_path: Path) -> None:
    assert uninstall(tmp_path / "absent") == []


FAKE_PYTHON = """#!/bin/sh
# Stands in for the virtualenv's interpreter: shows what the shim gave it.
for arg in "$@"; do printf 'arg=%s\\n' "$arg"; done
printf 'config=%s\\n' "${TVORCH_CONFIG-<unset>}"
printf 'stdin='; cat
"""


def _fake_interpreter(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("config", ["/etc/tvorch/my node.toml", None])
def test_rendered_shim_passes_argv_stdin_and_config_through(tmp_path: Path, config: str | None) -> None:
    """Run the real shim with sh; a space in every path checks the quoting."""
    fake = _fake_interpreter(tmp_path / "venv dir" / "bin")
    shim = tmp_path / "qemu"
    shim.write_bytes(render_shim(str(fake), config))
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        ["sh", str(shim), "vm one", "prepare", "begin", "-"],
        input=b"<domain/>", capture_output=True, env=env, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:6] == ["arg=-m", "arg=tvorch.hook", "arg=vm one", "arg=prepare", "arg=begin", "arg=-"]
    assert lines[6] == f"config={config if config else '<unset>'}"
    assert lines[7] == "stdin=<domain/>"


def test_shim_does_not_override_an_inherited_config_when_none_given(tmp_path: Path) -> None:
    fake = _fake_interpreter(tmp_path / "bin")
    shim = tmp_path / "qemu"
    shim.write_bytes(render_shim(str(fake), None))
    result = subprocess.run(["sh", str(shim), "vm", "release", "end", "-"], input=b"", capture_output=True,
                            env={"PATH": "/usr/bin:/bin", "TVORCH_CONFIG": "/x.toml"}, timeout=30, check=False)
    assert "config=/x.toml" in result.stdout.decode().splitlines()


def test_installed_shim_is_executable_directly(tmp_path: Path) -> None:
    """libvirtd execs the hook file itself, not `sh FILE`: the mode and #! line must do."""
    fake = _fake_interpreter(tmp_path / "bin")
    done = install(tmp_path / "hooks", str(config_file(tmp_path, "t.toml")), python=str(fake))
    result = subprocess.run([done.path, "vm", "started", "begin", "-"], input=b"x", capture_output=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[2:] == ["arg=vm", "arg=started", "arg=begin", "arg=-",
                                                       f"config={tmp_path / 't.toml'}", "stdin=x"]


def config_file(directory: Path, name: str) -> Path:
    """A real (empty: all defaults) config, since install-hook loads the one it names."""
    path = directory / name
    path.write_text("")
    return path


def test_a_config_that_does_not_load_is_refused(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    with pytest.raises(ConfigError, match="config file not found"):
        install(hooks, str(tmp_path / "missing.toml"), python=PYTHON)
    (tmp_path / "typo.toml").write_text("stop_timout = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'stop_timout'"):
        install(hooks, str(tmp_path / "typo.toml"), python=PYTHON)
    assert not hooks.exists()


@pytest.mark.parametrize("bad", ["/etc/it's.toml", "/etc/a\nb.toml"])
def test_config_path_with_quote_or_newline_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError, match="quotes and newlines"):
        install(tmp_path, bad, python=PYTHON)
    assert list(tmp_path.iterdir()) == []


def test_interpreter_path_with_quote_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        install(tmp_path, None, python="/opt/o'brien/bin/python")
    assert list(tmp_path.iterdir()) == []
