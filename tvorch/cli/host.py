"""Host attestation commands: `tvorch host init|quote|attest|baseline|status`.

tvorch.service.host pulls in tpm2_pytss (0.02-0.3 s to import): each command
that needs it imports it itself, so no other command (`launch` above all)
pays for it.
"""

from __future__ import annotations

import json
import time

import click

from ..errors import InputError, TrustError
from .common import Context, emit, json_option, pass_ctx, write_output
from .group import cli


@cli.group()
def host() -> None:
    """Attest this node: its TPM quote, UEFI event log and IMA log."""


@host.command(name="init")
@json_option
@pass_ctx
def host_init(ctx: Context, as_json: bool) -> None:
    """Create the host attestation key and certify it against the TPM's EK (once; later calls show it)."""
    from ..service import host as host_service

    ak, certification = host_service.init(ctx.node.cfg)
    emit(as_json, {"ak_fingerprint": ak.fingerprint, "ak_pem": ak.pem.decode(), "ak_certification": certification},
         f"host attestation key {ak.fingerprint}, certified by credential activation at "
         f"{certification['certified_at']}")


@host.command(name="quote")
@click.option("--nonce", required=True, metavar="HEX", help="The verifier's nonce (hex).")
@click.option("--out", required=True, metavar="FILE", help="Write the quote and the logs it covers here.")
@json_option
@pass_ctx
def host_quote(ctx: Context, nonce: str, out: str, as_json: bool) -> None:
    """Quote the configured PCRs with NONCE; the file also carries the event and IMA logs."""
    try:
        raw_nonce = bytes.fromhex(nonce)
    except ValueError:
        raise InputError(f"refused --nonce {nonce!r}: not hex") from None
    if not 8 <= len(raw_nonce) <= 64:
        raise InputError(f"refused --nonce: {len(raw_nonce)} bytes, expected 8 to 64")
    from ..service import host as host_service

    q = host_service.quote(ctx.node.cfg, raw_nonce)
    write_output(out, (json.dumps(q.to_json(), indent=2, sort_keys=True) + "\n").encode())
    emit(as_json, {"out": out, "pcrs": sorted(q.pcrs), "bank": q.bank}, f"wrote quote over PCRs "
         f"{','.join(map(str, sorted(q.pcrs)))} ({q.bank}) to {out}")


@host.command(name="attest")
@json_option
@pass_ctx
def host_attest(ctx: Context, as_json: bool) -> None:
    """Quote with a fresh nonce, judge against the host policy, store the verdict (exit 12 if it fails)."""
    from ..service import host as host_service

    verdict = host_service.attest(ctx.node.cfg, ctx.node.store)
    emit(as_json, verdict.to_json(time.time()), lambda: "host attestation passed" if verdict.passed else
         "host attestation FAILED:\n" + "\n".join(f"  - {f}" for f in verdict.failures))
    if not verdict.passed:
        raise TrustError(f"host attestation failed with {len(verdict.failures)} failure(s); verdict stored")


@host.command(name="baseline")
@click.option("--out", metavar="FILE", help="Write the policy here (default: print it).")
@json_option
@pass_ctx
def host_baseline(ctx: Context, out: str | None, as_json: bool) -> None:
    """Learn a host policy from the current evidence, for review (not applied)."""
    from ..core.attestation.hostpolicy import policy_to_json
    from ..service import host as host_service

    data = policy_to_json(host_service.baseline(ctx.node.cfg))
    if out:
        write_output(out, data)
        emit(as_json, {"out": out}, f"wrote a host policy to {out}; review it, then set host.policy to use it")
    else:
        click.echo(data.decode(), nl=False)


@host.command(name="status")
@json_option
@pass_ctx
def host_status(ctx: Context, as_json: bool) -> None:
    """The latest host verdict and its age."""
    verdict = ctx.node.store.latest_host_verdict()
    if verdict is None:
        emit(as_json, {"verdict": None}, "no host verdict yet (tvorch host attest)")
        return
    doc = verdict.to_json(time.time())
    emit(as_json, doc, lambda: "\n".join(
        [f"{'passed' if verdict.passed else 'FAILED'} at {verdict.at} ({doc['age_seconds']} s ago), "
         f"policy sha256:{verdict.policy_digest[:16]}"] + [f"  - {f}" for f in verdict.failures]))
