"""The libvirt hook and its records: install-hook, uninstall-hook, hook, events, vtpm.

What only one command needs is imported inside it, so that loading the CLI
for another command (`launch`) does not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..core.launch.instance import validate_name
from ..errors import NotFoundError, TrustError
from .common import Context, emit, json_option, pass_ctx
from .group import cli


@cli.command(name="install-hook")
@click.option("--hooks-dir", default="/etc/libvirt/hooks", show_default=True, metavar="DIR")
@click.option("--hook-config", metavar="PATH", help="Config file the hook reads (default: its standard lookup).")
@json_option
def install_hook(hooks_dir: str, hook_config: str | None, as_json: bool) -> None:
    """Install tvorch's qemu hook (a qemu.d/ drop-in if another hook is there)."""
    from ..service import hook_install

    done = hook_install.install(Path(hooks_dir), hook_config)
    note = "restart libvirtd for the new hook to take effect" if done.created else "updated in place"
    emit(as_json, {"path": done.path, "created": done.created, "restart_libvirtd": done.created},
         f"installed {done.path}; {note}")


@cli.command(name="uninstall-hook")
@click.option("--hooks-dir", default="/etc/libvirt/hooks", show_default=True, metavar="DIR")
@json_option
def uninstall_hook(hooks_dir: str, as_json: bool) -> None:
    """Remove tvorch's qemu hook (never anyone else's)."""
    from ..service import hook_install

    removed = hook_install.uninstall(Path(hooks_dir))
    emit(as_json, {"removed": removed}, "removed " + ", ".join(removed) if removed else "no tvorch hook installed")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def hook(ctx: Context, args: tuple[str, ...]) -> None:
    """libvirt's qemu hook: NAME OPERATION SUB-OPERATION EXTRA, domain XML on stdin."""
    from .. import hook as hook_entry  # tvorch.hook, the lean entry point libvirtd's shim runs

    if ctx.config_path:  # the hook reads its config the way libvirtd's shim gives it
        os.environ["TVORCH_CONFIG"] = ctx.config_path
    raise SystemExit(hook_entry.main(list(args)))


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def events(ctx: Context, name: str, as_json: bool) -> None:
    """The hook's decisions for instance NAME (or a domain of that name it refused): time, operation, verdict, reasons."""
    store = ctx.node.store
    record = store.find_live(validate_name(name))
    rows = store.hook_events(record.id if record else None, name)
    if record is None and not rows:
        raise NotFoundError(f"no instance named '{name}', and no hook decision about a domain of that name")
    emit(as_json, rows, lambda: "\n".join(
        f"{r['at']}  {r['operation']:<16} {r['verdict']:<9} {'; '.join(r['reasons'])}" for r in rows)
        or "no hook decisions recorded")


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def check(ctx: Context, name: str, as_json: bool) -> None:
    """What the hook would decide at NAME's next start, hashing its measured files without the hook's
    deadline (they are then in the digest cache). Exit 12 when the start would be refused."""
    from ..service.gate_check import check_start

    result = check_start(ctx.node, validate_name(name))
    if result.reasons and not as_json:
        raise TrustError(f"the hook would refuse to start {result.name}: " + "; ".join(result.reasons))
    emit(as_json, result.to_json(), f"the hook would allow {result.name} to start"
         + (" (running: its vTPM state and NVRAM are checked at its next start)" if result.running else ""))
    if result.reasons:
        raise TrustError(f"the hook would refuse to start {result.name}: " + "; ".join(result.reasons))
