"""Trust commands: image and reference values, launch manifests, the node CA.

cryptography and the services are imported inside the commands that use
them, so that loading the CLI for another command (`launch`) does not pay
for image-signature checking and the like.
"""

from __future__ import annotations

import json

import click

from ..core.references import FILE_REFERENCE_KINDS, REFERENCE_KINDS, ReferenceValue
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
@click.option("--rehash", is_flag=True, help="Hash again instead of trusting the digest cache.")
@json_option
@pass_ctx
def image_trust(ctx: Context, path: str, label: str | None, signature: str | None, cert: str | None,
                rehash: bool, as_json: bool) -> None:
    """Trust every layer of the image at PATH."""
    from ..service import trust

    done = trust.trust_image(ctx.node, path, label, signature, cert, rehash)
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
    from ..core.manifest import manifest_digest
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
@click.option("--ca", "ca_path", required=True, metavar="CA.pem", help="The node CA certificate.")
@json_option
def manifest_verify(file: str, ca_path: str, as_json: bool) -> None:
    """Verify a manifest FILE with nothing but the node CA certificate."""
    from ..service import manifests

    m = manifests.verify_file(file, ca_path)
    emit(as_json, {"valid": True, "instance_id": m.instance_id, "name": m.name, "node": m.node,
                   "config_digest": m.config_digest, "measurements": len(m.measurements)},
         f"valid: manifest of {m.name} ({m.instance_id}) signed on {m.node}, {len(m.measurements)} measurements")


@cli.group()
def ca() -> None:
    """The node CA that signs manifests (and, later, vTPM EK certificates)."""


@ca.command(name="show")
@click.option("--pem", is_flag=True, help="Print the CA certificate in PEM.")
@json_option
@pass_ctx
def ca_show(ctx: Context, pem: bool, as_json: bool) -> None:
    """Show the node CA certificate."""
    from cryptography.hazmat.primitives import hashes

    from ..service import manifests

    identity = manifests.node_identity(ctx.node.cfg)
    cert = identity.ca_cert
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    if pem:
        click.echo(identity.ca_pem().decode(), nl=False)
        return
    emit(as_json, {"subject": cert.subject.rfc4514_string(), "sha256_fingerprint": fingerprint,
                   "not_after": cert.not_valid_after_utc.isoformat(), "pem": identity.ca_pem().decode()},
         f"subject:     {cert.subject.rfc4514_string()}\nfingerprint: sha256:{fingerprint}\n"
         f"not after:   {cert.not_valid_after_utc.isoformat()}")
