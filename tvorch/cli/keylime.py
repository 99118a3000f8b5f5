"""`tvorch keylime policy` and `tvorch host policy import --keylime`: tvorch's policies in Keylime's formats."""

from __future__ import annotations

import json

import click

from ..core.attestation.keylime import KIND_RUNTIME, POLICY_KINDS
from ..errors import InputError
from .common import Context, emit, json_option, pass_ctx, write_output
from .group import cli
from .host import host


@cli.group()
def keylime() -> None:
    """Export what tvorch knows for a Keylime verifier (docs/keylime.md)."""


@keylime.command(name="policy")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(POLICY_KINDS),
              help="tpm: the instance's expected PCRs (tpm_policy); mb: its boot baseline as a measured-boot "
                   "reference state; runtime: the host's IMA allowlist (NAME: host).")
@click.option("--out", metavar="FILE", help="Write the policy here (default: print it).")
@json_option
@pass_ctx
def keylime_policy(ctx: Context, name: str, kind: str, out: str | None, as_json: bool) -> None:
    """NAME's policy (an instance, or `host`) in Keylime's format."""
    from ..service import keylime as service

    if name == "host":
        doc = service.host_policy(ctx.node.cfg, kind)
    elif kind == KIND_RUNTIME:
        raise InputError("refused --kind runtime for an instance: the runtime policy is the host's (NAME: host)")
    else:
        doc = service.instance_policy(ctx.node, name, kind)
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    if out:
        write_output(out, data)
        emit(as_json, {"out": out, "kind": kind}, f"wrote the Keylime {kind} policy of {name} to {out}")
    else:
        click.echo(data.decode(), nl=False)





@host.group(name="policy")
def host_policy() -> None:
    """The host policy (host.policy)."""


@host_policy.command(name="import")
@click.option("--keylime", "keylime_file", required=True, metavar="FILE",
              help="A Keylime runtime policy: its digests become the IMA allowlist (PCRs and required paths stay).")
@json_option
@pass_ctx
def host_policy_import(ctx: Context, keylime_file: str, as_json: bool) -> None:
    """Replace host.policy's IMA allowlist and excludes with a Keylime runtime policy's."""
    from ..service import keylime as service

    policy = service.import_host_policy(ctx.node.cfg, keylime_file)
    emit(as_json, {"policy": ctx.node.cfg.host.policy, "allowlist_paths": len(policy.ima_allowlist)},
         f"imported {len(policy.ima_allowlist)} allowlisted path(s) into {ctx.node.cfg.host.policy}")
