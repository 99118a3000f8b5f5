"""README.md stays true to the code: its configuration table names every key of tvorch/config.py with
its default, its command-line table names every `tvorch` command the click group registers, every
docs/ link resolves, and the first screen keeps what issue #16 puts there (make demo / make test
first, the node install within the first 60 lines)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import click

from tvorch.cli import cli
from tvorch.config import Config, FirmwareProfile

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _table_after(section: str, header: str) -> list[list[str]]:
    """The rows of the first markdown table under SECTION whose header line is HEADER, as stripped cells."""
    lines = README.splitlines()
    start = lines.index(header, lines.index(section))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        # A `\|` inside a cell is a literal bar (launch\|bios), not a cell border.
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([c.strip() for c in cells])
    return rows


def _shown(value: Any) -> str:
    """A default as the README writes it: bare words and numbers, `""` for empty, JSON lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if value == "":
        return '""'
    return str(value)


def _config_defaults() -> dict[str, str]:
    """Every key the config file takes, dotted, with its default as shown; (required) for no default."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        if f.name in ("source", "raw"):
            continue  # where it was read from, not a key
        if f.name == "firmware_profiles":
            for p in dataclasses.fields(FirmwareProfile):
                has = p.default is not dataclasses.MISSING
                out[f"firmware_profiles.NAME.{p.name}"] = _shown(p.default) if has else "(required)"
        elif f.default_factory is not dataclasses.MISSING:  # a section
            section = f.default_factory()
            for s in dataclasses.fields(section):
                out[f"{f.name}.{s.name}"] = _shown(getattr(section, s.name))
        else:
            out[f.name] = _shown(f.default)
    return out


def test_config_table_names_every_key_with_its_default():
    rows = _table_after("## Configuration", "| key | default | meaning |")
    table = {r[0].strip("`"): r[1].strip("`") for r in rows}
    expected = _config_defaults()
    assert sorted(set(expected) - set(table)) == [], "keys missing from README's config table"
    assert sorted(set(table) - set(expected)) == [], "README's config table names keys config.py does not have"
    wrong = {k: (table[k], v) for k, v in expected.items() if table[k] != v}
    assert wrong == {}, "README default differs from config.py (README, code)"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        path = prefix + (name,)
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, path))
        else:
            out.append(path)
    return out


def test_cli_table_names_every_command():
    rows = _table_after("## Command line", "| command | what it does |")
    firsts = [r[0] for r in rows]
    missing = []
    for path in _commands(cli):
        *groups, leaf = path
        head = " ".join(("tvorch", *groups))
        # `tvorch eventlog show FILE` / `replay FILE`, `tvorch firmware reference list\|show\|...`
        if not any(f"`{head} " in cell and re.search(rf"(?<![\w-]){re.escape(leaf)}(?![\w-])", cell)
                   for cell in firsts):
            missing.append(" ".join(path))
    assert missing == [], "commands missing from README's command table"


def test_docs_links_resolve():
    links = re.findall(r"\]\((docs/[^)#\s]+)", README)
    assert links, "README links no docs/ file"
    assert [link for link in links if not (ROOT / link).is_file()] == []
    listed = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert sorted(listed - set(links)) == [], "docs/ files README does not link"


def test_first_screen():
    lines = README.splitlines()
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("make ")]
    assert commands[:2] == ["make demo", "make test"]
    install = lines.index("## Installing on a compute node")
    assert install < 60
    assert "apt-get install ./tvorch_" in "\n".join(lines[install:install + 10])
