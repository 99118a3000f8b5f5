"""`tvorch firmware reference list|show|create|remove`: the signed firmware references (docs/firmware-references.md)."""

from __future__ import annotations

import click

from .common import Context, emit, json_option, pass_ctx
from .group import cli


@cli.group()
def firmware() -> None:
    """Firmware: the references predicted boot measurements are taken from."""


@firmware.group()
def reference() -> None:
    """Firmware references: PCR 0-3 and 6 events kept from one reference boot per firmware and platform."""


def _line(ref: object) -> str:
    from ..core.boot.firmware_reference import FirmwareReference

    assert isinstance(ref, FirmwareReference)
    k = ref.key
    return (f"{k.digest[:16]}  {ref.created_at}  {ref.firmware}  {k.machine} {k.virt_type} {k.memory_mib} MiB "
            f"{k.vcpus} vCPU secure-boot {'on' if k.secure_boot else 'off'} {k.devices}")


@reference.command(name="list")
@json_option
@pass_ctx
def reference_list(ctx: Context, as_json: bool) -> None:
    """List the stored firmware references (each one's signature is checked)."""
    from ..service.firmware_reference import list_references

    refs = list_references(ctx.node.cfg)
    emit(as_json, [r.to_json() for r in refs], lambda: "\n".join(_line(r) for r in refs) or "no firmware references")


@reference.command(name="show")
@click.argument("digest")
@json_option
@pass_ctx
def reference_show(ctx: Context, digest: str, as_json: bool) -> None:
    """Show the reference whose key digest starts with DIGEST: its inputs and events."""
    from ..service.firmware_reference import show_reference

    ref = show_reference(ctx.node.cfg, digest)
    emit(as_json, ref.to_json(), lambda: "\n".join(
        [_line(ref), f"vars template {ref.vars_template}"]
        + [f"PCR{e.pcr:<2} {e.type_name:<32} {e.digest}  {e.what}" for e in ref.events]))


@reference.command(name="create")
@click.option("--memory", "memory", type=int, help="MiB of guest memory (default: launch.memory_mib).")
@click.option("--vcpus", type=int, help="vCPUs (default: launch.vcpus).")
@click.option("--secure-boot/--no-secure-boot", default=None, help="UEFI Secure Boot (default: launch.secure_boot).")
@click.option("--firmware-profile", metavar="NAME", help="A [firmware_profiles.NAME] code and vars template.")
@click.option("--tpm-model", type=click.Choice(["crb", "tis"]), help="vTPM interface (default: launch.tpm_model).")
@click.option("--network", metavar="NET", help="As a launch with this libvirt network (a NIC changes boot options).")
@json_option
@pass_ctx
def reference_create(ctx: Context, memory: int | None, vcpus: int | None, secure_boot: bool | None,
                     firmware_profile: str | None, tpm_model: str | None, network: str | None,
                     as_json: bool) -> None:
    """Make the reference a launch with these options would use (boots a reference VM unless it exists)."""
    from ..service.firmware_reference import choice_from_options, reference_for

    choice = choice_from_options(ctx.node.cfg, memory_mib=memory, vcpus=vcpus, secure_boot=secure_boot,
                                 firmware_profile=firmware_profile, tpm_model=tpm_model, network=network)
    ref = reference_for(ctx.node, choice)
    emit(as_json, ref.to_json(), lambda: _line(ref))


@reference.command(name="remove")
@click.argument("digest")
@json_option
@pass_ctx
def reference_remove(ctx: Context, digest: str, as_json: bool) -> None:
    """Remove a stored reference; the next launch with its inputs boots a new one."""
    from ..service.firmware_reference import remove_reference

    removed = remove_reference(ctx.node.cfg, digest)
    emit(as_json, {"removed": removed}, f"removed firmware reference {removed}")
