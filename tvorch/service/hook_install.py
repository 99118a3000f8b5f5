"""Install tvorch's libvirt qemu hook without clobbering anyone else's.

libvirt runs `/etc/libvirt/hooks/qemu`, and (libvirt >= 6.5) every executable
in `/etc/libvirt/hooks/qemu.d/`. We take the main slot when it is free or
already ours, and a drop-in otherwise. libvirtd only notices a hook that was
not there when it started, so a new hook needs a libvirtd restart.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..adapters.files import atomic_write
from ..config import load_config
from ..errors import ConflictError, InputError

MARKER = "# tvorch-hook"
DROP_IN = "50-tvorch"


@dataclass(frozen=True)
class HookInstall:
    path: str
    created: bool  # a hook file that was not there before: libvirtd must be restarted
    config: str | None


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def render_shim(python: str, config: str | None) -> bytes:
    """The shim from hooks/qemu with this interpreter (and config) filled in."""
    lines = []
    for line in _shim_template().splitlines():
        if line.startswith("TVORCH_PYTHON="):
            lines.append(f"TVORCH_PYTHON={_sh_quote(python)}")
            if config:
                lines.append(f"export TVORCH_CONFIG={_sh_quote(config)}")
        else:
            lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def _shim_template() -> str:
    # hooks/qemu, installed with the package as tvorch.hooks (see pyproject.toml).
    return resources.files("tvorch.hooks").joinpath("qemu").read_text()


def _sh_quote(value: str) -> str:
    if "'" in value or "\n" in value:
        raise InputError(f"refused path {value!r}: quotes and newlines cannot go in the hook shim")
    return f"'{value}'"


def target(hooks_dir: Path) -> Path:
    main = hooks_dir / "qemu"
    if not main.exists() or _is_ours(main):
        return main
    return hooks_dir / "qemu.d" / DROP_IN


def install(hooks_dir: Path, config: str | None, python: str = sys.executable) -> HookInstall:
    if config is not None:
        # The hook reads it on every start of every domain: a typo here would refuse them all.
        config = os.path.abspath(config)
        _sh_quote(config)
        load_config(config)
    if not hooks_dir.is_absolute() or (hooks_dir.exists() and not hooks_dir.is_dir()):
        raise InputError(f"refused --hooks-dir {str(hooks_dir)!r}: not an absolute path to a directory")
    path = target(hooks_dir)
    drop_in = path.parent.name == "qemu.d"
    if drop_in and path.exists() and not _is_ours(path):
        raise ConflictError(f"{path} exists and is not tvorch's; not replacing it")
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render_shim(python, config), mode=0o755)
    return HookInstall(str(path), created, config)


def uninstall(hooks_dir: Path) -> list[str]:
    removed = []
    for path in (hooks_dir / "qemu", hooks_dir / "qemu.d" / DROP_IN):
        if path.exists() and _is_ours(path):
            os.unlink(path)
            removed.append(str(path))
    return removed
