"""`tvorch` command line: parse, configure once, call the service, map errors.

Every refusal is one line on stderr (`tvorch: error: ...`) and a documented
exit code (tvorch.errors.ExitCode); `--debug` adds the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click
from cryptography.hazmat.primitives import hashes

from .config import load_config
from .core.instance import InstanceRecord
from .core.ledger import broken_link
from .core.manifest import manifest_digest
from .errors import ExitCode, InputError, TvorchError
from .logs import configure_logging
from .service import hook_install, instances, manifests, trust
from .service.instances import Node
from .service.launch import LaunchRequest, launch as launch_instance


class Context:
    def __init__(self, config_path: str | None, debug: bool, verbose: bool) -> None:
        self.config_path = config_path
        self.debug = debug
        self.verbose = verbose
        self._node: Node | None = None

    @property
    def node(self) -> Node:
        if self._node is None:
            cfg = load_config(self.config_path)
            level = "debug" if self.debug else "info" if self.verbose else cfg.log_level
            configure_logging(level)
            self._node = Node(cfg)
        return self._node

    def close(self) -> None:
        if self._node is not None:
            self._node.close()


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def emit(as_json: bool, payload: Any, text: str | Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
    else:
        click.echo(text() if callable(text) else text)


def _record_text(r: InstanceRecord) -> str:
    lines = [
        f"name:       {r.name}",
        f"id:         {r.id}",
        f"uuid:       {r.uuid}",
        f"state:      {r.state.value}",
        f"virt type:  {r.virt_type}",
        f"image:      {r.image}",
        f"overlay:    {r.overlay}",
        f"console:    {r.console_log}",
        f"created:    {r.created_at}",
    ]
    if r.error:
        lines.append(f"error:      {r.error}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="TVORCH_CONFIG", metavar="PATH",
              help="Config file (default /etc/tvorch/tvorch.toml; env TVORCH_CONFIG).")
@click.option("--debug", is_flag=True, help="Debug logging, and tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress (info level).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool, verbose: bool) -> None:
    """tvorch: trusted launch of KVM guests with a virtual TPM."""
    ctx.obj = Context(config_path, debug, verbose)
    ctx.call_on_close(ctx.obj.close)


@cli.command()
@click.argument("image")
@click.option("--name", required=True, help="Instance (and libvirt domain) name.")
@click.option("--memory", type=int, help="Memory in MiB [config launch.memory_mib].")
@click.option("--vcpus", type=int, help="Virtual CPUs [config launch.vcpus].")
@click.option("--firmware", type=click.Choice(["efi", "bios"]), help="Firmware [config launch.firmware].")
@click.option("--secure-boot/--no-secure-boot", default=None, help="UEFI Secure Boot [config launch.secure_boot].")
@click.option("--firmware-profile", metavar="NAME", help="Named OVMF code/vars from config [firmware_profiles].")
@click.option("--tpm-model", type=click.Choice(["crb", "tis"]), help="vTPM interface [config launch.tpm_model].")
@click.option("--kernel", metavar="PATH", help="Direct kernel boot: kernel image.")
@click.option("--initrd", metavar="PATH", help="Direct kernel boot: initrd.")
@click.option("--cmdline", metavar="ARGS", help="Direct kernel boot: kernel command line.")
@click.option("--network", metavar="NET", help="Attach a NIC on this libvirt network.")
@click.option("--rehash", is_flag=True, help="Hash every file again instead of trusting the digest cache.")
@click.option("--allow-untrusted-image", is_flag=True,
              help="Launch an image that is not trusted, if policy.allow_untrusted_image permits.")
@json_option
@pass_ctx
def launch(ctx: Context, image: str, name: str, memory: int | None, vcpus: int | None, firmware: str | None,
           secure_boot: bool | None, firmware_profile: str | None, tpm_model: str | None, kernel: str | None,
           initrd: str | None, cmdline: str | None, network: str | None, rehash: bool, allow_untrusted_image: bool,
           as_json: bool) -> None:
    """Measure IMAGE, check it is trusted, sign a manifest, then define and start it with a vTPM."""
    req = LaunchRequest(
        image=image, name=name, memory_mib=memory, vcpus=vcpus, firmware=firmware, secure_boot=secure_boot,
        firmware_profile=firmware_profile, tpm_model=tpm_model, kernel=kernel, initrd=initrd, cmdline=cmdline,
        network=network, rehash=rehash, allow_untrusted_image=allow_untrusted_image,
    )
    record = launch_instance(ctx.node, req)
    emit(as_json, record.to_json(), lambda: "\n".join([
        f"launched {record.name} ({record.id}, uuid {record.uuid}) running under {record.virt_type}",
        f"  serial console log: {record.console_log}",
        f"  interactive console: virsh -c {ctx.node.cfg.libvirt_uri} console {record.name}",
        f"  stop it:    tvorch stop {record.name}",
        f"  remove it:  tvorch destroy {record.name}",
    ]))


@cli.command(name="list")
@json_option
@pass_ctx
def list_(ctx: Context, as_json: bool) -> None:
    """List instances and their current state."""
    records = instances.list_instances(ctx.node)

    def table() -> str:
        rows = [("NAME", "ID", "STATE", "VIRT", "IMAGE")]
        rows += [(r.name, r.id, r.state.value, r.virt_type, r.image) for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows)

    emit(as_json, [r.to_json() for r in records], table)


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show one instance, with its history."""
    record = instances.show(ctx.node, name)
    events = ctx.node.store.events(record.id)
    emit(as_json, {**record.to_json(), "events": [e.to_json() for e in events]},
         lambda: _record_text(record) + "\nevents:\n" + "\n".join(
             f"  {e.at}  {e.kind:<14} {e.detail}" for e in events))


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def start(ctx: Context, name: str, as_json: bool) -> None:
    """Start a stopped instance."""
    record, changed = instances.start(ctx.node, name)
    emit(as_json, {**record.to_json(), "changed": changed},
         f"started {name}" if changed else f"{name} is already running")


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Power off at once instead of asking the guest.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds to wait for the guest [config stop_timeout].")
@json_option
@pass_ctx
def stop(ctx: Context, name: str, force: bool, timeout: float | None, as_json: bool) -> None:
    """Shut an instance down (graceful, or --force)."""
    record, changed = instances.stop(ctx.node, name, force, timeout)
    emit(as_json, {**record.to_json(), "changed": changed},
         f"stopped {name}" if changed else f"{name} is already stopped")


@cli.command()
@click.argument("name")
@click.option("--purge-vtpm", is_flag=True, help="Also delete the vTPM state (irreversible).")
@json_option
@pass_ctx
def destroy(ctx: Context, name: str, purge_vtpm: bool, as_json: bool) -> None:
    """Power off and remove an instance; its vTPM state is kept unless --purge-vtpm."""
    record = instances.destroy(ctx.node, name, purge_vtpm)
    emit(as_json, {**record.to_json(), "vtpm_purged": purge_vtpm},
         f"destroyed {name}; vTPM state " + ("purged" if purge_vtpm else "kept"))


# -- the libvirt hook ----------------------------------------------------------


@cli.command(name="install-hook")
@click.option("--hooks-dir", default="/etc/libvirt/hooks", show_default=True, metavar="DIR")
@click.option("--hook-config", metavar="PATH", help="Config file the hook reads (default: its standard lookup).")
@json_option
def install_hook(hooks_dir: str, hook_config: str | None, as_json: bool) -> None:
    """Install tvorch's qemu hook (a qemu.d/ drop-in if another hook is there)."""
    done = hook_install.install(Path(hooks_dir), hook_config)
    note = "restart libvirtd for the new hook to take effect" if done.created else "updated in place"
    emit(as_json, {"path": done.path, "created": done.created, "restart_libvirtd": done.created},
         f"installed {done.path}; {note}")


@cli.command(name="uninstall-hook")
@click.option("--hooks-dir", default="/etc/libvirt/hooks", show_default=True, metavar="DIR")
@json_option
def uninstall_hook(hooks_dir: str, as_json: bool) -> None:
    """Remove tvorch's qemu hook (never anyone else's)."""
    removed = hook_install.uninstall(Path(hooks_dir))
    emit(as_json, {"removed": removed}, "removed " + ", ".join(removed) if removed else "no tvorch hook installed")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def hook(args: tuple[str, ...]) -> None:
    """libvirt's qemu hook: NAME OPERATION SUB-OPERATION EXTRA, domain XML on stdin."""
    from . import hook as hook_entry

    raise SystemExit(hook_entry.main(list(args)))


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def events(ctx: Context, name: str, as_json: bool) -> None:
    """The hook's decisions for instance NAME: time, operation, verdict, reasons."""
    record = ctx.node.store.get_live(name)
    rows = ctx.node.store.hook_events(record.id)
    emit(as_json, rows, lambda: "\n".join(
        f"{r['at']}  {r['operation']:<16} {r['verdict']:<9} {'; '.join(r['reasons'])}" for r in rows)
        or "no hook decisions recorded")


@cli.group()
def vtpm() -> None:
    """Per-instance vTPM records."""


@vtpm.command(name="ledger")
@click.argument("name")
@json_option
@pass_ctx
def vtpm_ledger(ctx: Context, name: str, as_json: bool) -> None:
    """The hash-chained ledger of NAME's vTPM state digests, and whether the chain holds."""
    record = ctx.node.store.get_live(name)
    entries = ctx.node.store.ledger(record.id)
    broken = broken_link(entries)
    emit(as_json, {"entries": [e.to_json() for e in entries], "intact": broken is None, "broken_at": broken},
         lambda: "\n".join([f"{e.seq:>4}  {e.at}  {e.event:<10} sha256:{e.state_digest}" for e in entries]
                           + ["chain intact" if broken is None else f"chain BROKEN at entry {broken}"]))


# -- reference values ----------------------------------------------------------


def _ref_table(refs: list) -> str:
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
    done = trust.trust_image(ctx.node, path, label, signature, cert, rehash)
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
    """Stop trusting an image digest (give the hex digest or the file)."""
    ref = trust.remove_reference(ctx.node, "image", digest_or_path)
    emit(as_json, ref.to_json(), f"no longer trusted: {ref.digest}  {ref.label}")


@cli.group()
def reference() -> None:
    """Reference values for firmware, kernel, initrd, emulator and swtpm."""


@reference.command(name="add")
@click.argument("kind", type=click.Choice(["firmware", "kernel", "initrd", "emulator", "swtpm"]))
@click.argument("path")
@click.option("--label", help="A name for it (default: its file name).")
@click.option("--rehash", is_flag=True, help="Hash again instead of trusting the digest cache.")
@json_option
@pass_ctx
def reference_add(ctx: Context, kind: str, path: str, label: str | None, rehash: bool, as_json: bool) -> None:
    """Trust the file at PATH as a KIND reference value."""
    done = trust.add_reference(ctx.node, kind, path, label, rehash)
    emit(as_json, done.to_json(),
         f"{'trusted' if done.added else 'already trusted'} {kind} {done.reference.digest}  {done.reference.path}")


@reference.command(name="list")
@click.option("--kind", type=click.Choice(["image", "firmware", "kernel", "initrd", "emulator", "swtpm"]))
@json_option
@pass_ctx
def reference_list(ctx: Context, kind: str | None, as_json: bool) -> None:
    """List reference values (all kinds, or one)."""
    refs = ctx.node.store.references(kind)
    emit(as_json, [r.to_json() for r in refs], lambda: _ref_table(refs))


@reference.command(name="remove")
@click.argument("kind", type=click.Choice(["firmware", "kernel", "initrd", "emulator", "swtpm"]))
@click.argument("digest_or_path")
@json_option
@pass_ctx
def reference_remove(ctx: Context, kind: str, digest_or_path: str, as_json: bool) -> None:
    """Stop trusting a reference value."""
    ref = trust.remove_reference(ctx.node, kind, digest_or_path)
    emit(as_json, ref.to_json(), f"no longer trusted: {kind} {ref.digest}")


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


def write_output(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="tvorch", standalone_mode=False)
    except TvorchError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"tvorch: error: {err}", err=True)
        return int(err.exit_code)
    except click.exceptions.Abort:
        click.echo("tvorch: error: aborted", err=True)
        return int(ExitCode.FAILURE)
    except click.ClickException as err:
        # One line instead of click's usage block.
        click.echo(f"tvorch: error: {' '.join(err.format_message().split())}", err=True)
        return int(ExitCode.USAGE)
    except Exception as err:  # a bug: say so in one line unless debugging
        if debug:
            traceback.print_exc()
        click.echo(f"tvorch: internal error: {type(err).__name__}: {err} (run with --debug for details)", err=True)
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
