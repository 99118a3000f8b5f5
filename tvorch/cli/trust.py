"""Trust commands: image and reference values, launch manifests, the node CA.

cryptography and the services are imported inside the commands that use
them, so that loading the CLI for another command (`launch`) does not pay
for image-signature checking and the like.
"""

from __future__ import annotations

import json

import click

from ..core.launch.references import FILE_REFERENCE_KINDS, REFERENCE_KINDS, ReferenceValue
from .common import Context, emit, json_option, pass_ctx, write_output
from .group import cli


def _ref_table(refs: list[ReferenceValue]) -> str:
    if not refs:
        return "no trusted values"
    return "\n".join(f"{r.kind:<9} {r.digest}  {r.label}  ({r.path})" + (f"  signed by {r.signer}" if r.signer else "")
                     for r in refs)


@cli.group()
def image() -> None:
    """Trusted images (reference values for image layers)."""


@image.command(name="trust")
@click.argument("path")
@click.option("--label", help="A name for the image (default: its file name).")
@click.option("--signature", metavar="SIG", help="Detached signature over the image (raw or base64).")
@click.option("--cert", metavar="CERT", help="Certificate of the signing key (PEM or DER).")
@click.option("--chain", metavar="CHAIN.pem",
              help="Intermediates between --cert and policy.image_signing_ca (PEM, any order).")
@click.option("--rehash", is_flag=True, help="Hash again instead of trusting the digest cache.")
@json_option
@pass_ctx
def image_trust(ctx: Context, path: str, label: str | None, signature: str | None, cert: str | None,
                chain: str | None, rehash: bool, as_json: bool) -> None:
    """Trust every layer of the image at PATH."""
    from ..service import trust

    done = trust.trust_image(ctx.node, path, label, signature, cert, rehash, chain)
    for warning in (w for t in done for w in t.warnings):
        click.echo(f"tvorch: warning: {warning}", err=True)
    emit(as_json, [t.to_json() for t in done], lambda: "\n".join(
        f"{'trusted' if t.added else 'already trusted'} {t.reference.digest}  {t.reference.path}" for t in done))


@image.command(name="list")
@json_option
@pass_ctx
def image_list(ctx: Context, as_json: bool) -> None:
    """List trusted image digests."""
    refs = ctx.node.store.references("image")
    emit(as_json, [r.to_json() for r in refs], lambda: _ref_table(refs))


@image.command(name="untrust")
@click.argument("digest_or_path")
@json_option
@pass_ctx
def image_untrust(ctx: Context, digest_or_path: str, as_json: bool) -> None:
    """Stop trusting an image digest (give the hex digest or the file); exit 0 if it was already removed."""
    from ..service import trust

    done = trust.remove_reference(ctx.node, "image", digest_or_path)
    ref = done.reference
    emit(as_json, done.to_json(), f"no longer trusted: {ref.digest}  {ref.label}" if done.removed_at is None
         else f"already gone: {ref.digest}  {ref.label} (untrusted at {done.removed_at})")


@cli.group()
def reference() -> None:
    """Reference values for firmware, kernel, initrd, emulator and swtpm."""


@reference.command(name="add")
@click.argument("kind", type=click.Choice(FILE_REFERENCE_KINDS))
@click.argument("path")
@click.option("--label", help="A name for it (default: its file name).")
@click.option("--rehash", is_flag=True, help="Hash again instead of trusting the digest cache.")
@json_option
@pass_ctx
def reference_add(ctx: Context, kind: str, path: str, label: str | None, rehash: bool, as_json: bool) -> None:
    """Trust the file at PATH as a KIND reference value."""
    from ..service import trust

    done = trust.add_reference(ctx.node, kind, path, label, rehash)
    emit(as_json, done.to_json(),
         f"{'trusted' if done.added else 'already trusted'} {kind} {done.reference.digest}  {done.reference.path}")


@reference.command(name="list")
@click.option("--kind", type=click.Choice(REFERENCE_KINDS))
@json_option
@pass_ctx
def reference_list(ctx: Context, kind: str | None, as_json: bool) -> None:
    """List reference values (all kinds, or one)."""
    refs = ctx.node.store.references(kind)
    emit(as_json, [r.to_json() for r in refs], lambda: _ref_table(refs))


@reference.command(name="remove")
@click.argument("kind", type=click.Choice(FILE_REFERENCE_KINDS))
@click.argument("digest_or_path")
@json_option
@pass_ctx
def reference_remove(ctx: Context, kind: str, digest_or_path: str, as_json: bool) -> None:
    """Stop trusting a reference value; exit 0 if it was already removed."""
    from ..service import trust

    done = trust.remove_reference(ctx.node, kind, digest_or_path)
    emit(as_json, done.to_json(), f"no longer trusted: {kind} {done.reference.digest}" if done.removed_at is None
         else f"already gone: {kind} {done.reference.digest} (removed at {done.removed_at})")


# -- manifests and the node CA -------------------------------------------------


@cli.group()
def manifest() -> None:
    """Signed launch manifests."""


@manifest.command(name="show")
@click.argument("name")
@click.option("--out", metavar="FILE", help="Write the signed manifest file here (byte for byte).")
@json_option
@pass_ctx
def manifest_show(ctx: Context, name: str, out: str | None, as_json: bool) -> None:
    """Show the launch manifest of instance NAME."""
    from ..core.launch.manifest import manifest_digest
    from ..service import manifests

    body = manifests.manifest_of(ctx.node, name)
    if out:
        write_output(out, body)
    doc = json.loads(body)
    m = doc["manifest"]
    emit(as_json, {**doc, "digest": manifest_digest(body)}, lambda: "\n".join(
        [f"manifest sha256:{manifest_digest(body)} for {m['name']} ({m['instance_id']}, uuid {m['uuid']})",
         f"  created {m['created_at']} on {m['node']}",
         f"  config  sha256:{m['config_digest']}",
         f"  policy  sha256:{m['policy_digest']}"]
        + [f"  {x['kind']:<13} sha256:{x['digest']}  {x['path'] or ''}" for x in m["measurements"]]))


@manifest.command(name="verify")
@click.argument("file")
@click.option("--ca", "ca_path", required=True, metavar="CA.pem",
              help="The node CA certificate, or the fleet's root above it.")
@click.option("--chain", "chain_path", metavar="CHAIN.pem",
              help="More intermediates towards --ca than the manifest carries (`tvorch ca show --chain --pem`).")
@json_option
def manifest_verify(file: str, ca_path: str, chain_path: str | None, as_json: bool) -> None:
    """Verify a manifest FILE with nothing but the node CA certificate (or the fleet's root)."""
    from ..service import manifests

    m = manifests.verify_file(file, ca_path, chain_path)
    emit(as_json, {"valid": True, "instance_id": m.instance_id, "name": m.name, "node": m.node,
                   "config_digest": m.config_digest, "measurements": len(m.measurements)},
         f"valid: manifest of {m.name} ({m.instance_id}) signed on {m.node}, {len(m.measurements)} measurements")


@cli.group()
def ca() -> None:
    """The node CA that issues the node signing and vTPM EK certificates; in a fleet, under its root."""


@ca.command(name="show")
@click.option("--pem", is_flag=True, help="Print the CA certificate in PEM.")
@click.option("--chain", "with_chain", is_flag=True,
              help="With --pem: the CA certificate, then the chain above it to the fleet's root "
                   "(openssl verify's -untrusted).")
@json_option
@pass_ctx
def ca_show(ctx: Context, pem: bool, with_chain: bool, as_json: bool) -> None:
    """Show the node CA certificate, and in a fleet the chain above it."""
    from ..service import fleet

    info = fleet.ca_info(ctx.node.cfg)
    if pem:
        click.echo(info["chain_pem" if with_chain else "pem"], nl=False)
        return
    emit(as_json, info, lambda: "\n".join(
        [f"subject:     {info['subject']}", f"issuer:      {info['issuer']}",
         f"fingerprint: sha256:{info['sha256_fingerprint']}", f"not after:   {info['not_after']}"]
        + [f"chain:       '{c['subject']}' (not after {c['not_after']}{'' if c['valid_now'] else ', NOT VALID NOW'})"
           for c in info["chain"]] + ([] if info["chain"] else ["chain:       none (self-signed: no fleet root installed)"])))


@ca.command(name="csr")
@click.option("--out", metavar="FILE", help="Write the request here (PEM; default: stdout).")
@json_option
@pass_ctx
def ca_csr(ctx: Context, out: str | None, as_json: bool) -> None:
    """A PKCS#10 request for the node CA key (CA, pathlen 0) for the fleet's CA to sign."""
    from ..service import fleet

    pem = fleet.csr_pem(ctx.node.cfg)
    if out is None:
        click.echo(pem.decode(), nl=False)
        return
    write_output(out, pem)
    emit(as_json, {"out": out}, f"certificate request for the node CA key written to {out}")


@ca.command(name="install")
@click.argument("cert", metavar="CERT.pem")
@click.option("--chain", "chain_path", required=True, metavar="CHAIN.pem",
              help="The certificates from CERT's issuer up to the fleet's self-signed root (PEM).")
@json_option
@pass_ctx
def ca_install(ctx: Context, cert: str, chain_path: str, as_json: bool) -> None:
    """Replace the self-signed node CA certificate with CERT, issued by the fleet for the same key."""
    from ..service import fleet

    info = fleet.install(ctx.node.cfg, cert, chain_path)
    emit(as_json, info, lambda: "installed node CA: " + " <- ".join(
        [f"'{info['subject']}'"] + [f"'{c['subject']}'" for c in info["chain"]]))
