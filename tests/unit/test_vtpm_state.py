"""The vTPM state digest (tvorch.adapters.vtpm_state): the value the rollback check compares.

Any older copy of any state file must give another digest, and swtpm's own
lock file must not (it comes and goes with every run).
"""

from __future__ import annotations

import os
from pathlib import Path

from tvorch.adapters.vtpm_state import state_digest


def make_state(root: Path, files: dict[str, bytes]) -> Path:
    """A directory shaped like libvirt's <swtpm_state_dir>/<uuid>, with FILES in tpm2/."""
    (root / "tpm2").mkdir(parents=True)
    for name, data in files.items():
        (root / "tpm2" / name).write_bytes(data)
    return root


STATE = {"tpm2-00.permall": b"permanent state " * 64, "tpm2-00.volatilestate": b"volatile"}


def test_no_directory_is_none(tmp_path: Path) -> None:
    assert state_digest(tmp_path / "absent") is None
    (tmp_path / "no-tpm2").mkdir()
    assert state_digest(tmp_path / "no-tpm2") is None


def test_empty_directory_is_none(tmp_path: Path) -> None:
    assert state_digest(make_state(tmp_path / "vm", {})) is None


def test_only_a_lock_file_is_none(tmp_path: Path) -> None:
    assert state_digest(make_state(tmp_path / "vm", {".lock": b""})) is None


def test_digest_is_hex_sha256_and_stable(tmp_path: Path) -> None:
    d = state_digest(make_state(tmp_path / "vm", STATE))
    assert d is not None and len(d) == 64 and int(d, 16) >= 0
    assert state_digest(tmp_path / "vm") == d


def test_equal_content_gives_equal_digest(tmp_path: Path) -> None:
    assert state_digest(make_state(tmp_path / "a", STATE)) == state_digest(make_state(tmp_path / "b", STATE))


def test_content_change_changes_digest(tmp_path: Path) -> None:
    vm = make_state(tmp_path / "vm", STATE)
    before = state_digest(vm)
    data = bytearray(STATE["tpm2-00.permall"])
    data[100] ^= 1
    (vm / "tpm2" / "tpm2-00.permall").write_bytes(bytes(data))
    assert state_digest(vm) != before


def test_added_file_changes_digest(tmp_path: Path) -> None:
    vm = make_state(tmp_path / "vm", STATE)
    before = state_digest(vm)
    (vm / "tpm2" / "tpm2-00.savestate").write_bytes(b"")
    assert state_digest(vm) != before


def test_renamed_file_changes_digest(tmp_path: Path) -> None:
    vm = make_state(tmp_path / "vm", STATE)
    before = state_digest(vm)
    os.rename(vm / "tpm2" / "tpm2-00.volatilestate", vm / "tpm2" / "tpm2-01.volatilestate")
    assert state_digest(vm) != before


def test_swapped_contents_change_digest(tmp_path: Path) -> None:
    """Names are bound to contents: the same bytes under each other's names are another state."""
    swapped = {"tpm2-00.permall": STATE["tpm2-00.volatilestate"], "tpm2-00.volatilestate": STATE["tpm2-00.permall"]}
    assert state_digest(make_state(tmp_path / "a", STATE)) != state_digest(make_state(tmp_path / "b", swapped))


def test_lock_file_is_ignored(tmp_path: Path) -> None:
    vm = make_state(tmp_path / "vm", STATE)
    before = state_digest(vm)
    (vm / "tpm2" / ".lock").write_bytes(b"swtpm lock")
    assert state_digest(vm) == before
    (vm / "tpm2" / ".lock").write_bytes(b"another pid")
    assert state_digest(vm) == before


def test_subdirectory_is_not_state(tmp_path: Path) -> None:
    vm = make_state(tmp_path / "vm", STATE)
    before = state_digest(vm)
    (vm / "tpm2" / "sub").mkdir()
    assert state_digest(vm) == before
