"""The commented default configuration file the Debian package ships.

`/etc/tvorch/tvorch.toml` is a conffile: dpkg keeps an operator's edits on
upgrade. It is generated from `tvorch.config`'s defaults at package build time
(`python -m tvorch.default_config`), so it cannot drift from what tvorch does
without a file: every key, with its default, commented out, under the
comment the dataclass field carries.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from typing import Any

from .config import Config, effective_config

HEADER = """\
# tvorch's configuration (README, "Configuration"). Every key is shown with
# its default, commented out: uncomment a line (and its [section] line) to
# change it. A key not set here keeps its default; an unknown key or a value of the wrong type is
# refused with the key's name. Every key, defaults included, goes into each
# launch manifest's policy digest.
"""

FIRMWARE_EXAMPLE = """\
# Named OVMF profiles (launch --firmware-profile NAME), e.g. the Debian
# snakeoil keys a test guest is signed with:
# [firmware_profiles.snakeoil]
# code = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd"
# vars_template = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"
# secure_boot = true
"""

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def toml_value(value: Any) -> str:
    """A default as TOML: strings, integers, booleans and flat lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for default {value!r}")


def field_comments(cls: type) -> dict[str, list[str]]:
    """The `#` lines written just above each field in the dataclass's source."""
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped)
            continue
        match = _FIELD.match(line)
        if match:
            comments[match.group(1)] = pending
        pending = []
    return comments


def render() -> str:
    """Every key of tvorch.config with its default, commented out."""
    defaults = effective_config(Config())
    section_types = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    top_comments = field_comments(Config)
    out = [HEADER]
    sections: list[tuple[str, dict[str, Any]]] = []
    for key, value in defaults.items():
        if isinstance(value, dict):
            if key != "firmware_profiles":
                sections.append((key, value))
            continue
        out.extend(top_comments.get(key, []))
        out.append(f"# {key} = {toml_value(value)}")
    for name, table in sections:
        section_type = section_types[name]
        assert isinstance(section_type, type)
        comments = field_comments(section_type)
        doc = inspect.getdoc(section_type) or ""
        out.append("")
        if doc:
            out.append(f"# {doc.splitlines()[0]}")
        out.append(f"# [{name}]")
        for key, value in table.items():
            out.extend(comments.get(key, []))
            out.append(f"# {key} = {toml_value(value)}")
    out.append("")
    out.append(FIRMWARE_EXAMPLE.rstrip("\n"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
