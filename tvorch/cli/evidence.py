"""Evidence commands: read a firmware event log, show what it measured, replay it.

The parser (tvorch.core.attestation.eventlog, ~5 ms to import) is imported by the commands
that use it, so that loading the CLI for another command (`launch`) does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import click

from ..errors import EvidenceError, InputError
from .common import emit, json_option
from .group import cli

if TYPE_CHECKING:
    from ..core.attestation.eventlog import EventLog, TcgEvent

# Real firmware logs are tens of KiB; anything far larger is not one, and is not read whole.
MAX_LOG_BYTES = 16 << 20
# tvorch.core.attestation.eventlog.MAX_PCR, written out so that `--pcr`'s range needs no parser import.
MAX_PCR = 31


def read_event_log(path: str) -> EventLog:
    from ..adapters.files import read_bounded
    from ..core.attestation.eventlog import parse_event_log

    try:
        raw = read_bounded(path, MAX_LOG_BYTES)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return parse_event_log(raw)
    except EvidenceError as err:
        raise EvidenceError(f"{path}: {err}") from None


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _describe(event: TcgEvent) -> str:
    """One line saying what an event measured, from its decoded fields."""
    d: Mapping[str, Any] | None = event.decoded  # shape depends on the event type
    if d is None:
        return _bytes(len(event.data))
    if "decode_error" in d:
        return f"undecodable: {d['decode_error']}"
    if "algorithms" in d:
        algs = ", ".join(str(a["name"]) for a in d["algorithms"])
        return f"{d['signature']}: {algs} (platform class {d['platform_class']}, spec {d['spec_version']})"
    if "locality" in d:
        return f"StartupLocality: locality {d['locality']}"
    if "device_path" in d:
        return f"{d['device_path']} ({_bytes(d['image_length'])})"
    if "data_sha256" in d:
        return f"{d['name']} ({d['guid']}), {_bytes(d['data_length'])}"
    if "partitions" in d:
        return f"disk {d['disk_guid']}, {len(d['partitions'])} partition(s)"
    if "tables" in d:
        return ", ".join(f"{t['guid']} at 0x{t['address']:x}" for t in d["tables"]) or "no tables"
    if "tag_id" in d:
        return f"tag 0x{d['tag_id']:x}: " + (repr(d["text"]) if "text" in d else _bytes(d["data_length"]))
    if "base" in d:
        return f"base 0x{d['base']:x}, length 0x{d['length']:x}"
    if "version" in d:
        return f"version {d['version']!r}"
    if "text" in d:
        return repr(d["text"])
    if "binary_length" in d:
        return f"binary, {_bytes(d['binary_length'])}"
    if "value" in d:
        return f"0x{d['value']:08x}" if isinstance(d["value"], int) else str(d["value"])
    return str(d.get("signature", ""))


def _table(log: EventLog) -> str:
    bank = "sha256" if "sha256" in log.spec_algorithms else next(iter(log.spec_algorithms))
    width = max(len(e.type_name) for e in log.events)
    lines = [f"{'#':>4}  {'PCR':>3}  {'TYPE':<{width}}  {bank.upper():<12}  DESCRIPTION"]
    for e in log.events:
        digest = e.digests.get(bank, "-")[:12]
        lines.append(f"{e.index:>4}  {e.pcr:>3}  {e.type_name:<{width}}  {digest:<12}  {_describe(e)}")
    return "\n".join(lines)


@cli.group()
def eventlog() -> None:
    """UEFI (TCG PC Client) firmware event logs."""


@eventlog.command(name="show")
@click.argument("file")
@json_option
def eventlog_show(file: str, as_json: bool) -> None:
    """Show every event of the firmware event log in FILE.

    On a host or guest the log is /sys/kernel/security/tpm0/binary_bios_measurements.
    """
    log = read_event_log(file)
    emit(as_json, log.to_json(), lambda: _table(log))


@eventlog.command(name="compare")
@click.argument("baseline")
@click.argument("observed")
@click.option("--bank", default="sha256", show_default=True, help="PCR bank whose digests are compared.")
@json_option
def eventlog_compare(baseline: str, observed: str, bank: str, as_json: bool) -> None:
    """Compare two event logs event by event (a boot against its baseline); exit 12 if they differ."""
    from ..core.attestation.guest_baseline import compare
    from ..errors import TrustError

    verdict = compare(read_event_log(baseline), read_event_log(observed), bank)
    emit(as_json, verdict.to_json(), lambda: "\n".join(
        [f"{group}: " + ("no difference" if not diffs else f"{len(diffs)} differences")
         + "".join(f"\n  {d.describe()}" for d in diffs) for group, diffs in verdict.by_group().items()]))
    if not verdict.matches:
        raise TrustError(f"{observed} differs from {baseline} in {len(verdict.differences)} events")


@eventlog.command(name="replay")
@click.argument("file")
@click.option("--bank", default="sha256", show_default=True, help="PCR bank to replay (sha1, sha256, ...).")
@click.option("--pcr", "pcrs", type=click.IntRange(0, MAX_PCR), multiple=True, metavar="N",
              help="Only this PCR (repeatable; default: every PCR the log extends).")
@json_option
def eventlog_replay(file: str, bank: str, pcrs: tuple[int, ...], as_json: bool) -> None:
    """Print the PCR values the log in FILE adds up to."""
    from ..core.attestation.eventlog import replay

    values = replay(read_event_log(file), bank, pcrs or None)
    emit(as_json, {"bank": bank, "pcrs": {str(pcr): value for pcr, value in values.items()}},
         lambda: "\n".join([f"PCR  {bank}"] + [f"{pcr:>3}  {value}" for pcr, value in values.items()]))
