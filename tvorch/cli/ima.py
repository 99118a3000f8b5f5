"""IMA commands: replay a measurement list to PCR 10, and show its entries.

They read a file (the kernel's binary or ASCII list, or a copy of one) and
need no configuration, store or TPM.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..errors import InputError
from .common import emit, json_option
from .group import cli

if TYPE_CHECKING:
    from ..core.attestation.ima import ImaEntry


# A day of a busy node's IMA list is a few tens of MB; more is not a measurement list.
MAX_LIST_BYTES = 512 * 1024 * 1024


def _read_entries(path: str, fmt: str) -> tuple[ImaEntry, ...]:
    """Entries of the list at PATH ("-" for stdin), in FMT or told apart by parse_ima_list.

    The parser (~5 ms to import) is imported here, not when the CLI loads.
    """
    from ..adapters.files import read_bounded
    from ..core.attestation.ima import parse_ima_ascii, parse_ima_binary, parse_ima_list

    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            data = read_bounded(path, MAX_LIST_BYTES)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    if fmt == "binary":
        return parse_ima_binary(data)[0]
    if fmt == "ascii":
        return parse_ima_ascii(data.decode("utf-8", "surrogateescape"))
    return parse_ima_list(data)


_file = click.argument("file", metavar="FILE")
_format = click.option("--format", "fmt", type=click.Choice(["auto", "binary", "ascii"]), default="auto",
                       show_default=True, help="binary_runtime_measurements or ascii_runtime_measurements.")


@cli.group()
def ima() -> None:
    """The Linux IMA measurement list (/sys/kernel/security/ima/)."""


@ima.command(name="replay")
@_file
@click.option("--bank", type=click.Choice(["sha256", "sha1", "sha384", "sha512"]), default="sha256",
              show_default=True, help="The PCR bank to compute.")
@_format
@json_option
def ima_replay(file: str, bank: str, fmt: str, as_json: bool) -> None:
    """Replay FILE to PCR 10 and check its template hashes."""
    from ..core.attestation.ima import bad_template_hashes, replay_ima

    entries = _read_entries(file, fmt)
    value = replay_ima(entries, bank).hex()
    bad = list(bad_template_hashes(entries))
    payload = {"bank": bank, "pcr": 10, "value": value, "entries": len(entries), "bad_template_hashes": bad}
    emit(as_json, payload, lambda: (
        f"PCR 10 ({bank}): {value}\nentries: {len(entries)}\n"
        f"bad template hashes: {', '.join(map(str, bad)) if bad else 'none'}"))


@ima.command(name="show")
@_file
@_format
@json_option
def ima_show(file: str, fmt: str, as_json: bool) -> None:
    """List the entries of FILE: index, template, file digest, path."""
    entries = _read_entries(file, fmt)
    payload = [{
        "index": i, "pcr": e.pcr, "template": e.template_name, "template_hash": e.template_hash.hex(),
        "algo": e.file_digest_algo, "digest": e.file_digest.hex(), "path": e.path,
        "signature": None if e.signature is None else e.signature.hex(), "invalidated": e.invalidated,
    } for i, e in enumerate(entries)]

    def text() -> str:
        lines = []
        for i, e in enumerate(entries):
            digest = "(invalidated)" if e.invalidated else f"{e.file_digest_algo}:{e.file_digest.hex()[:16]}"
            lines.append(f"{i:>6}  {e.template_name:<10} {digest:<24} {e.path}")
        return "\n".join(lines) if lines else "no entries"

    emit(as_json, payload, text)
