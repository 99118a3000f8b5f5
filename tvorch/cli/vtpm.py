"""`tvorch vtpm ...`: each instance's vTPM: its identity, records, backups, and the state key's seal."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.launch.instance import validate_name
from .common import Context, emit, json_option, pass_ctx
from .group import cli


@cli.group()
def vtpm() -> None:
    """Per-instance vTPMs: EK certificate, record, ledger, backup/restore, rekey."""


@vtpm.command(name="show")
@click.argument("name")
@json_option
@pass_ctx
def vtpm_show(ctx: Context, name: str, as_json: bool) -> None:
    """NAME's vTPM record: state directory, EK, how its key is kept, and whether the state matches the ledger."""
    from ..service import vtpm_records as service

    info = service.show(ctx.node, validate_name(name))
    last = info["ledger_last"]

    def text() -> str:
        lines = [
            f"instance:       {info['name']} ({info['instance_id']})",
            f"state:          {info['state_dir']}",
            f"swtpm:          {info['swtpm_version']}",
            f"EK fingerprint: sha256:{info['ek_fingerprint']}",
            f"key:            {_key_line(info)}",
            f"escrow:         {'sha256:' + info['escrow'] if info['escrow'] else 'none'}",
            f"ledger:         {info['ledger_entries']} entries, chain {'intact' if info['ledger_intact'] else 'BROKEN'}"
            + (f", last {last['event']} at {last['at']}" if last else ""),
            f"on disk:        {'sha256:' + info['state_digest'] if info['state_digest'] else 'no state'} "
            f"({_match(info['state_matches_ledger'])})",
        ]
        if info["pending"]:
            lines.append(f"pending:        {info['pending']['op']} from {info['pending']['source']} (interrupted)")
        return "\n".join(lines)

    emit(as_json, info, text)


def _match(matches: bool | None) -> str:
    if matches is None:
        return "in use by the running VM; ledgered at its stop"
    return "matches the ledger" if matches else "DIFFERS from the ledger: the next start will be refused"


def _key_line(info: dict) -> str:
    if info["purged_at"]:
        return f"purged at {info['purged_at']}"
    if info["key_protection"] == "none":
        return "none: state in clear (vtpm.key_protection = none)"
    return (f"sealed to the host TPM, PCRs {','.join(map(str, info['seal_pcrs']))}; "
            f"libvirt secret {info['secret_uuid']} (only during a start)")


@vtpm.command(name="ek")
@click.argument("name")
@click.option("--pem", is_flag=True, help="Print the EK certificate as PEM only.")
@json_option
@pass_ctx
def vtpm_ek(ctx: Context, name: str, pem: bool, as_json: bool) -> None:
    """NAME's EK certificate (issued by the node CA, `tvorch ca show`) and its key's fingerprint."""
    from ..service import vtpm_records as service
    from ..service.manifests import node_identity

    cert, record = service.ek(ctx.node, validate_name(name))
    info = service.ek_summary(cert, record, node_identity(ctx.node.cfg).ca_cert)
    if pem:
        click.echo(info["pem"], nl=False)
        return
    emit(as_json, info, lambda: "\n".join([
        f"subject:        {info['subject']}",
        f"issuer:         {info['issuer']}",
        f"serial:         {info['serial']}",
        f"valid:          {info['not_before']} .. {info['not_after']}",
        f"EK fingerprint: sha256:{info['ek_fingerprint']}",
        f"certificate:    sha256:{info['certificate_sha256']}",
        f"chain:          {info['chain']}",
        f"platform cert:  {info['platform_certificate'] or 'none recorded'}",
    ]))


@vtpm.command(name="ledger")
@click.argument("name")
@click.option("--nvram", is_flag=True, help="The ledger of NAME's UEFI variable store (NVRAM) instead.")
@click.option("--ca", "ca_path", metavar="PEM",
              help="Verify the migrations' signed handoffs under this CA [default: this node's fleet root].")
@json_option
@pass_ctx
def vtpm_ledger(ctx: Context, name: str, nvram: bool, ca_path: str | None, as_json: bool) -> None:
    """The hash-chained ledger of NAME's vTPM state digests (manufacture, stops, backups, restores)."""
    from ..core.vtpm.ledger import broken_link
    from ..service.manifests import node_identity
    from ..service.migration import ledger_handoffs

    record = ctx.node.store.get_live(validate_name(name))
    entries = ctx.node.store.ledger(record.id, "nvram_ledger" if nvram else "vtpm_ledger")
    broken = broken_link(entries)
    handoffs, problem = ([], None) if nvram else ledger_handoffs(
        node_identity(ctx.node.cfg), entries, ctx.node.store.handoffs(record.id), ca_path)
    by_seq = {h.entry.seq: h for h in handoffs}
    rows = [{**e.to_json(), **({"node": by_seq[e.seq].node, "peer": by_seq[e.seq].peer,
                                "peer_uri": by_seq[e.seq].peer_uri} if e.seq in by_seq else {})} for e in entries]
    migrated = any(e.event in ("migrated-out", "migrated-in") for e in entries)
    doc = {"entries": rows, "intact": broken is None, "broken_at": broken,
           "handoffs_verified": (problem is None) if migrated else None, "handoffs_problem": problem}
    lines = [f"{e.seq:>4}  {e.at}  {e.event:<12} sha256:{e.state_digest}"
             + (f"  node {by_seq[e.seq].node[:16]} -> {by_seq[e.seq].peer[:16]}" if e.seq in by_seq else "")
             for e in entries]
    lines.append("chain intact" if broken is None else f"chain BROKEN at entry {broken}")
    if migrated:
        lines.append("migrations signed by each node, under the fleet root" if problem is None
                     else f"migrations NOT verified: {problem}")
    emit(as_json, doc, lambda: "\n".join(lines))


@vtpm.command(name="backup")
@click.argument("name")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_ctx
def vtpm_backup(ctx: Context, name: str, dest: Path, as_json: bool) -> None:
    """Copy stopped NAME's vTPM state to DEST (a new file; the state stays encrypted), as a ledger entry."""
    from ..service import vtpm_backup as service

    done = service.backup(ctx.node, validate_name(name), dest)
    emit(as_json, done, f"{name}: vTPM state sha256:{done['state_digest']} backed up to {dest}")


@vtpm.command(name="restore")
@click.argument("name")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_ctx
def vtpm_restore(ctx: Context, name: str, src: Path, as_json: bool) -> None:
    """Replace stopped NAME's vTPM state with a backup of that same vTPM; recorded, so not a rollback."""
    from ..service import vtpm_backup as service

    done = service.restore(ctx.node, validate_name(name), src)
    emit(as_json, done, f"{name}: vTPM state restored from {src} (backup of {done['backup_created_at']})")


@vtpm.command(name="rekey")
@click.argument("name")
@click.option("--escrow-key", type=click.Path(dir_okay=False, path_type=Path), metavar="PEM",
              help="The operator's escrow private key (RSA PEM): recovers a key the host TPM no longer unseals.")
@json_option
@pass_ctx
def vtpm_rekey(ctx: Context, name: str, escrow_key: Path | None, as_json: bool) -> None:
    """Seal NAME's vTPM state key again to the host TPM as it is now (vtpm.seal_pcrs)."""
    from ..service import vtpm_backup as service

    done = service.rekey(ctx.node, validate_name(name), escrow_key)
    emit(as_json, done, f"{name}: vTPM key {done['how']}; sealed to {done['sealed_to']['bank']} PCRs "
                        f"{','.join(map(str, done['sealed_to']['pcrs']))}")


@vtpm.command(name="manufacture")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vmid", required=True, metavar="ID", help="Passed to swtpm_setup and its certificate tool.")
@click.option("--owner", default="tss", show_default=True, help="User the state is handed to (when root).")
@json_option
@pass_ctx
def vtpm_manufacture(ctx: Context, directory: Path, vmid: str, owner: str, as_json: bool) -> None:
    """Manufacture an unencrypted TPM 2 state in DIR whose EK certificates the node CA issued (for inspection;
    `tvorch launch` manufactures each instance's own)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ..adapters.vtpm_manufacture import manufacture

    made = manufacture(directory, Path(ctx.node.cfg.state_dir), vmid, owner)
    pems = {name: x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
            for name, der in made.ek_certs.items()}
    emit(as_json,
         {"state_dir": str(directory), "vmid": vmid, "ek_fingerprint": made.ek_fingerprint,
          "ek_public_pem": made.ek_public_pem.decode(), "ek_certificates_pem": pems},
         lambda: "\n".join([f"state:          {directory}", f"EK fingerprint: sha256:{made.ek_fingerprint}",
                            *(f"{name}:\n{pem.rstrip()}" for name, pem in pems.items())]))
