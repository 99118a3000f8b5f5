"""`tvorch attest`, `tvorch verify`, `tvorch baseline ...`: guest attestation and the evidence bundle."""

from __future__ import annotations

import click

from ..errors import EvidenceError, TrustError
from .common import Context, emit, json_option, pass_ctx, write_output
from .group import cli


@cli.command()
@click.argument("name")
@click.option("--nonce", required=True, metavar="HEX", help="The verifier's fresh nonce, 8-64 bytes as hex.")
@click.option("--out", metavar="FILE", help="Write the evidence bundle here (default: stdout).")
@click.option("--timeout", type=click.IntRange(1, 3600), metavar="S",
              help="Seconds to wait for the guest agent (default guest.agent_timeout).")
@json_option
@pass_ctx
def attest(ctx: Context, name: str, nonce: str, out: str | None, timeout: int | None, as_json: bool) -> None:
    """Quote NAME's vTPM through its guest agent and write one evidence bundle for `tvorch verify`."""
    from ..service import attest as service

    bundle, guest = service.attest(ctx.node, name, service.parse_nonce(nonce), timeout)
    summary = guest.summary()
    if out is None:
        click.echo(bundle.decode())
    else:
        write_output(out, bundle)
        emit(as_json, {**summary, "bundle": out}, lambda: "\n".join([
            f"{name}: guest quote verified (vTPM reset count {summary['reset_count']}); "
            f"boot {summary['baseline']}" + {"prediction": " the launch prediction",
                                             "next-boot prediction": " its expected next boot"}.get(
                                                 summary["judged_against"], ""),
            *(f"  {line}" for line in summary["differences"]),
            *(f"keylime ({what}): " + ("valid" if r.get("valid") else "INVALID: " + "; ".join(r["failures"])
                                       if r["submitted"] else f"not submitted: {r['queued']}")
              for what, r in summary.get("keylime", {}).items()),
            *([f"live configuration DIFFERS: {guest.live_config}"] if guest.live_config else []),
            f"evidence bundle: {out}",
        ]))
    if summary["baseline"] == "differs":
        against = {"prediction": "the launch manifest's boot prediction (not learned)",
                   "next-boot prediction": "its baseline and its expected next boot (tvorch predict --instance; "
                                           "not learned)"}.get(summary["judged_against"], "its baseline")
        raise TrustError(f"{name}: this boot differs from {against}: {'; '.join(summary['differences'])}")
    if guest.live_config is not None:
        raise TrustError(f"{name}: the {guest.live_config}: changed while it runs (tvorch events {name}); "
                         "the bundle says so and verify fails its live configuration check")


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 90s, 15m, 2h, 7d."""

    name = "duration"
    _UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        number, unit = text.rstrip("smhd"), text[len(text.rstrip("smhd")):]
        if not (number.isascii() and number.isdecimal() and len(number) <= 9 and unit in self._UNITS) \
                or int(number) == 0:
            self.fail(f"{str(value)[:40]!r} is not a duration: give seconds, or a number with s, m, h or d "
                      "(90, 15m, 2h, 7d)", param, ctx)
        return int(number) * self._UNITS[unit]


@cli.command()
@click.argument("bundle", metavar="BUNDLE")
@click.option("--ca", required=True, metavar="CA.pem",
              help="The node CA certificate (`tvorch ca show --pem`), or the fleet's root above it.")
@click.option("--chain", metavar="CHAIN.pem",
              help="More intermediates towards --ca than the bundle carries (`tvorch ca show --chain --pem`).")
@click.option("--nonce", required=True, metavar="HEX", help="The nonce given to `tvorch attest`.")
@click.option("--uuid", metavar="UUID", help="The VM the bundle must be about (its libvirt UUID).")
@click.option("--max-age", type=Duration(), metavar="DURATION",
              help="Refuse a bundle made longer ago than this (90, 15m, 2h; default: any age, shown).")
@click.option("--max-host-age", type=Duration(), metavar="DURATION",
              help="Refuse a host verdict this much older than the bundle (default: the default of "
                   "host.verdict_max_age; verify reads no config).")
@click.option("--skip-check", "skip", multiple=True, metavar="NAME",
              help="Report this check as SKIPPED and do not count it (repeatable), e.g. host on a node "
                   "without measured boot.")
@json_option
def verify(bundle: str, ca: str, chain: str | None, nonce: str, uuid: str | None, max_age: int | None,
           max_host_age: int | None, skip: tuple[str, ...], as_json: bool) -> None:
    """Check every link of an evidence bundle offline; exit 0 only if every check not skipped passes.

    Reads no config or state. Exit 13 when the bundle or evidence in it does not parse, 12 when a check fails.
    """
    from ..config import HostAttestation
    from ..service.attest import parse_nonce, verify_file

    if max_host_age is None:
        max_host_age = HostAttestation.verdict_max_age  # the default, not this machine's config
    report = verify_file(bundle, ca, parse_nonce(nonce), uuid, max_age=max_age, max_host_age=max_host_age,
                         skip=skip, chain_path=chain)
    emit(as_json, report.to_json(), report.table)
    if not report.passed:
        failed = f"evidence bundle {bundle} failed: {', '.join(c.name for c in report.failures())}"
        raise EvidenceError(f"{failed} (malformed evidence)") if report.malformed else TrustError(failed)


@cli.group()
def baseline() -> None:
    """An instance's boot baseline (its first verified boot's event log) and its boots against it."""


@baseline.command(name="show")
@click.argument("name")
@json_option
@pass_ctx
def baseline_show(ctx: Context, name: str, as_json: bool) -> None:
    """When NAME's baseline was learned or accepted, and every verified boot with its verdict."""
    from ..service.attest import baseline_show as show

    info = show(ctx.node, name)

    def text() -> str:
        b = info["baseline"]
        lines = [f"baseline: {'none yet (learned at the first verified boot)' if b is None else ''}"
                 f"{'' if b is None else b['source'] + ' at ' + b['learned_at'] + ', ' + b['reason']}"]
        if b is not None:
            lines.append("  events by PCR: " + ", ".join(f"{p}: {n}" for p, n in sorted(
                b["events_by_pcr"].items(), key=lambda item: int(item[0]))))
        for boot in info["boots"]:
            verdict = boot["verdict"]
            lines.append(f"{boot['at']}  reset {boot['reset_count']:>4}  {verdict['baseline']}")
            lines += [f"    {_describe(d)}" for d in verdict["differences"]]
        return "\n".join(lines)

    emit(as_json, info, text)


def _describe(difference: dict) -> str:
    return str(difference.get("description") or difference)


@baseline.command(name="accept")
@click.argument("name")
@click.option("--reason", required=True, help="Why the change is intended (recorded with the new baseline).")
@json_option
@pass_ctx
def baseline_accept(ctx: Context, name: str, reason: str, as_json: bool) -> None:
    """Make NAME's last verified boot its baseline (after an intended change), recorded as an event."""
    from ..service.attest import baseline_accept as accept

    info = accept(ctx.node, name, reason)
    emit(as_json, info, f"{name}: baseline is now the boot verified last ({info['baseline']['reason']})")
