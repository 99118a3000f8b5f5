"""What every command module shares: the context, `--json`, output.

Nothing heavy is imported here: every command module imports this one, and
`tvorch launch` is on a cloud controller's critical path. The node (libvirt,
the store, structlog) is imported when a command first asks for it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import click

from ..errors import InputError

if TYPE_CHECKING:
    from ..service.node import Node

class Context:
    def __init__(self, config_path: str | None, debug: bool, verbose: bool) -> None:
        self.config_path = config_path
        self.debug = debug
        self.verbose = verbose
        self._node: Node | None = None

    @property
    def node(self) -> Node:
        if self._node is None:
            from ..config import load_config
            from ..logs import configure_logging
            from ..service.node import Node

            cfg = load_config(self.config_path)
            if not (self.debug or self.verbose):
                configure_logging(cfg.log_level)  # the group set flag-derived logging already
            self._node = Node(cfg)
        return self._node

    def close(self) -> None:
        if self._node is not None:
            self._node.close()


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def emit(as_json: bool, payload: Any, text: str | Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
    else:
        click.echo(text() if callable(text) else text)


def write_output(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror}") from None
