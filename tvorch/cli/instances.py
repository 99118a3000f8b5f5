"""Instance lifecycle commands: launch, list, show, start, stop, destroy.

The services (libvirt, the store, manifest signing) are imported inside each
command: every CLI call loads this module, and `tvorch launch` is on a cloud
controller's critical path, so loading the CLI must not cost more than the
command itself needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .common import Context, emit, json_option, pass_ctx
from .group import cli

if TYPE_CHECKING:
    from ..core.launch.instance import InstanceRecord

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
@click.option("--autostart", is_flag=True, help="Start it whenever `tvorch serve` starts (node boot).")
@json_option
@pass_ctx
def launch(ctx: Context, image: str, name: str, memory: int | None, vcpus: int | None, firmware: str | None,
           secure_boot: bool | None, firmware_profile: str | None, tpm_model: str | None, kernel: str | None,
           initrd: str | None, cmdline: str | None, network: str | None, rehash: bool, allow_untrusted_image: bool,
           autostart: bool, as_json: bool) -> None:
    """Measure IMAGE, check it is trusted, sign a manifest, then define and start it with a vTPM."""
    from ..service.launch import LaunchRequest, launch as launch_instance

    req = LaunchRequest(
        image=image, name=name, memory_mib=memory, vcpus=vcpus, firmware=firmware, secure_boot=secure_boot,
        firmware_profile=firmware_profile, tpm_model=tpm_model, kernel=kernel, initrd=initrd, cmdline=cmdline,
        network=network, rehash=rehash, allow_untrusted_image=allow_untrusted_image,
    )
    record = launch_instance(ctx.node, req)
    if autostart:
        ctx.node.store.set_autostart(record.id, True)
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
    from ..service import instances

    records = instances.list_instances(ctx.node)

    def table() -> str:
        rows = [("NAME", "ID", "STATE", "VIRT", "IMAGE")]
        rows += [(r.name, r.id, r.state.value, r.virt_type, r.image) for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4] for row in rows)

    auto = ctx.node.store.autostart_ids()
    emit(as_json, [{**r.to_json(), "autostart": r.id in auto} for r in records], table)


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show one instance, with its history."""
    from ..service import instances

    record = instances.show(ctx.node, name)
    events = ctx.node.store.events(record.id)
    auto = record.id in ctx.node.store.autostart_ids()
    emit(as_json, {**record.to_json(), "autostart": auto, "events": [e.to_json() for e in events]},
         lambda: _record_text(record) + f"\nautostart:  {'on (tvorch serve starts it)' if auto else 'off'}"
         + "\nevents:\n" + "\n".join(f"  {e.at}  {e.kind:<14} {e.detail}" for e in events))


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def start(ctx: Context, name: str, as_json: bool) -> None:
    """Start a stopped instance."""
    from ..service import instances

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
    from ..service import instances

    record, changed = instances.stop(ctx.node, name, force, timeout)
    emit(as_json, {**record.to_json(), "changed": changed},
         f"stopped {name}" if changed else f"{name} is already stopped")


@cli.command()
@click.argument("name")
@json_option
@pass_ctx
def save(ctx: Context, name: str, as_json: bool) -> None:
    """Save a running instance (libvirt managed save, the vTPM state ledgered); `tvorch start` resumes it."""
    from ..service import startpaths

    record, changed = startpaths.save(ctx.node, name)
    emit(as_json, {**record.to_json(), "changed": changed},
         f"saved {name}; `tvorch start {name}` resumes it" if changed else f"{name} is already saved")


@cli.command()
@click.argument("name")
@click.argument("setting", type=click.Choice(["on", "off"]))
@json_option
@pass_ctx
def autostart(ctx: Context, name: str, setting: str, as_json: bool) -> None:
    """Whether `tvorch serve` starts NAME when it starts (not libvirt's autostart, which cannot lend the key)."""
    from ..service import startpaths

    record, changed = startpaths.set_autostart(ctx.node, name, setting == "on")
    emit(as_json, {"name": record.name, "id": record.id, "autostart": setting == "on", "changed": changed},
         f"autostart {setting} for {name}" + ("" if changed else " (unchanged)"))


@cli.command()
@click.argument("name")
@click.option("--purge-vtpm", is_flag=True, help="Also delete the vTPM state (irreversible).")
@json_option
@pass_ctx
def destroy(ctx: Context, name: str, purge_vtpm: bool, as_json: bool) -> None:
    """Power off and remove an instance; its vTPM state is kept unless --purge-vtpm. Exit 0 when it is already destroyed."""
    from ..service import instances

    done = instances.destroy(ctx.node, name, purge_vtpm)
    vtpm_state = "purged" if done.vtpm_purged else "kept"
    emit(as_json, {**done.record.to_json(), "vtpm_purged": done.vtpm_purged, "already_destroyed": done.already},
         f"{name} was already destroyed (at {done.record.updated_at}); vTPM state {vtpm_state}"
         if done.already else f"destroyed {name}; vTPM state {vtpm_state}")


@cli.command()
@json_option
@pass_ctx
def reconcile(ctx: Context, as_json: bool) -> None:
    """Make the store and libvirt agree: settle interrupted launches, remove orphan overlays."""
    from ..service.reconcile import reconcile as reconcile_node

    lines = reconcile_node(ctx.node)
    emit(as_json, lines, lambda: "\n".join(lines) or "nothing to reconcile")
