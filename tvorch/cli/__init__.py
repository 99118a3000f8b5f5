"""`tvorch` command line: parse, configure once, call the service, map errors.

Every refusal is one line on stderr (`tvorch: error: ...`) and a documented
exit code (tvorch.errors.ExitCode); `--debug` adds the traceback. Commands
live in one module per area, each attaching itself to the group.
"""

from __future__ import annotations

import sys
import traceback

import click

from ..errors import ExitCode, TvorchError, describe_os_error
from . import attest, evidence, firmware, gate, host, ima, instances, keylime, migrate, node, predict, trust, vtpm  # noqa: F401  (they register their commands)
from .group import cli

def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="tvorch", standalone_mode=False)
    except TvorchError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"tvorch: error: {err}", err=True)
        return int(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("tvorch: error: interrupted", err=True)
        return int(ExitCode.INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as err:
        # `tvorch image` alone: show that group's help, as a usage error.
        click.echo(err.ctx.get_help() if err.ctx else str(err), err=True)
        return int(ExitCode.USAGE)
    except click.ClickException as err:
        # One line instead of click's usage block.
        click.echo(f"tvorch: error: {' '.join(err.format_message().split())}", err=True)
        return int(ExitCode.USAGE)
    except OSError as err:  # a file or directory tvorch could not use: say which, and what was tried
        if debug:
            traceback.print_exc()
        click.echo(f"tvorch: error: {describe_os_error(err)}", err=True)
        return int(ExitCode.FILE)
    except Exception as err:  # a bug: say so in one line unless debugging
        if debug:
            traceback.print_exc()
        click.echo(f"tvorch: internal error: {type(err).__name__}: {err} (run with --debug for details)", err=True)
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)

