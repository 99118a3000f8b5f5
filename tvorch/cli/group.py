"""The `tvorch` group and its global options; command modules attach to it."""

from __future__ import annotations

import click

from .common import Context


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="TVORCH_CONFIG", metavar="PATH",
              help="Config file (default /etc/tvorch/tvorch.toml; env TVORCH_CONFIG).")
@click.option("--debug", is_flag=True, help="Debug logging, and tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress (info level).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool, verbose: bool) -> None:
    """tvorch: trusted launch of KVM guests with a virtual TPM."""
    # Logging is set here, once, for every command; the config's log_level
    # applies when the command loads the config and no flag was given.
    # Imported here, not at module level: structlog costs ~15 ms and `--help` needs none of it.
    from ..logs import configure_logging

    configure_logging("debug" if debug else "info" if verbose else "warning")
    ctx.obj = Context(config_path, debug, verbose)
    ctx.call_on_close(ctx.obj.close)
