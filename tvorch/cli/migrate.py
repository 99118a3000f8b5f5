"""Live migration: `tvorch migrate` on the source node, `tvorch migrate-in` (run by it) on the destination."""

from __future__ import annotations

import shlex
import sys
import urllib.parse

import click

from .common import Context, emit, json_option, pass_ctx
from .group import cli


def _default_command(dest_uri: str) -> list[str]:
    """`ssh root@HOST tvorch` for a remote libvirt URI (qemu+ssh://, qemu+tls://, qemu+tcp://)."""
    host = urllib.parse.urlsplit(dest_uri).hostname
    if not host:
        raise click.UsageError(f"{dest_uri} names no host: say how to run tvorch there with --via")
    return ["ssh", "-oBatchMode=yes", f"root@{host}", "tvorch"]


@cli.command()
@click.argument("name")
@click.argument("dest_uri")
@click.option("--via", metavar="COMMAND",
              help="How to run tvorch on the destination, whose `migrate-in` this talks to over stdin/stdout "
                   "[default: ssh -oBatchMode=yes root@HOST tvorch, HOST from DEST_URI].")
@click.option("--ca", "ca_path", metavar="PEM",
              help="CA the destination must chain to [default: this node's fleet root, `tvorch ca install`].")
@click.option("--migrate-uri", metavar="URI", help="Where the destination's QEMU listens (tcp://HOST:PORT).")
@click.option("--disks-uri", metavar="URI", help="Where the destination's libvirt serves the disk copy (tcp://HOST:PORT).")
@click.option("--shared-storage", is_flag=True, help="The overlay is on storage both nodes share: do not copy it.")
@click.option("--bandwidth", type=click.IntRange(min=1), metavar="MIB_S", help="Cap the migration at MiB/s.")
@json_option
@pass_ctx
def migrate(ctx: Context, name: str, dest_uri: str, via: str | None, ca_path: str | None, migrate_uri: str | None,
            disks_uri: str | None, shared_storage: bool, bandwidth: int | None, as_json: bool) -> None:
    """Move running instance NAME, its sealed vTPM key and its records to the node at DEST_URI (libvirt)."""
    from ..adapters.peer import Destination

    # Started before the services load: the destination's start-up (ssh, Python) overlaps with ours.
    try:
        command = shlex.split(via) if via else _default_command(dest_uri)
    except ValueError as err:
        raise click.UsageError(f"--via {via!r}: {err}") from None
    dest = Destination([*command, "migrate-in"])
    from ..service.migrate import migrate as migrate_instance

    done = migrate_instance(ctx.node, name, dest_uri, dest, ca_path, migrate_uri, disks_uri,
                            copy_storage=not shared_storage, bandwidth_mib=bandwidth)
    emit(as_json, done.to_json(), lambda: (
        f"migrated {done.name} ({done.instance_id}) to {done.destination} in {done.seconds:.1f} s; "
        f"this node keeps a tombstone (ledger entry {done.ledger_seq}: migrated-out)"))


@cli.command("migrate-in")
@click.option("--ca", "ca_path", metavar="PEM",
              help="CA the source must chain to [default: this node's fleet root].")
@pass_ctx
def migrate_in(ctx: Context, ca_path: str | None) -> None:
    """The destination's side of `tvorch migrate` (run by it, speaking over stdin and stdout)."""
    from ..adapters.peer import Line
    from ..service.migrate_in import serve

    serve(ctx.node, Line(sys.stdin.buffer, sys.stdout.buffer, "the source"), ca_path)
