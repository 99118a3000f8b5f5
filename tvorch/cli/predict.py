"""`tvorch predict IMAGE`: the sha256 events and PCR values a launch would produce, computed before any boot."""

from __future__ import annotations

import click

from .common import Context, emit, json_option, pass_ctx
from .group import cli
from .instances import launch


@cli.command()
@click.argument("image", required=False)
@click.option("--instance", metavar="NAME", help="Predict the next boot of instance NAME from its own disk "
              "(a planned change inside the guest) and keep it as its expected next boot; no IMAGE.")
@click.option("--boot-file", metavar="PATH", help="With --instance: the boot file on the guest's EFI system "
              "partition, as firmware names it (default \\EFI\\BOOT\\BOOTX64.EFI).")
@json_option
@pass_ctx
def predict(ctx: Context, image: str | None, instance: str | None, boot_file: str | None, firmware: str | None,
            secure_boot: bool | None, firmware_profile: str | None,
            tpm_model: str | None, kernel: str | None, initrd: str | None, cmdline: str | None,
            memory: int | None, vcpus: int | None, as_json: bool) -> None:
    """The boot measurements (PCR, event type, sha256, what) launching IMAGE would produce, and the PCR values."""
    from ..config import load_config
    from ..errors import InputError
    from ..service.launch_options import firmware_choice
    from ..service.predict import PredictRequest, predict as run

    if instance is not None:
        given = [n for n, v in (("IMAGE", image), ("--firmware", firmware), ("--secure-boot", secure_boot),
                                ("--firmware-profile", firmware_profile), ("--tpm-model", tpm_model),
                                ("--kernel", kernel), ("--initrd", initrd), ("--cmdline", cmdline),
                                ("--memory", memory), ("--vcpus", vcpus)) if v is not None]
        if given:
            raise InputError(f"refused {', '.join(given)} with --instance: the instance's launch decided them")
        _predict_instance(ctx, instance, boot_file, as_json)
        return
    if image is None or boot_file is not None:
        raise InputError("give IMAGE, or --instance NAME [--boot-file PATH]")

    cfg = load_config(ctx.config_path)
    d = cfg.launch
    # As launch decides them: a firmware profile fixes Secure Boot, BIOS has none.
    chosen, secure, _images = firmware_choice(cfg, firmware, secure_boot, firmware_profile)
    req = PredictRequest(
        image=image, firmware=chosen.value, secure_boot=secure,
        firmware_profile=firmware_profile, tpm_model=tpm_model or d.tpm_model, kernel=kernel, initrd=initrd,
        cmdline=cmdline, memory_mib=memory or d.memory_mib, vcpus=vcpus or d.vcpus,
    )
    result = run(req, lambda: ctx.node)

    def text() -> str:
        p = result.prediction
        lines = [f"scenario: {result.scenario}", "events (sha256):"]
        lines += [f"  PCR{e.pcr:<2} {e.type_name:<34} {e.digest}  {e.what}" for e in p.events]
        lines.append("PCRs (sha256):")
        lines += [f"  {pcr:>2}: {value}" for pcr, value in p.pcrs.items()]
        lines += [f"  {pcr:>2}: not predicted ({why})" for pcr, why in result.not_predicted]
        return "\n".join(lines)

    emit(as_json, result.to_json(), text)


def _predict_instance(ctx: Context, name: str, boot_file: str | None, as_json: bool) -> None:
    from ..core.boot.bootdisk import DEFAULT_BOOT_PATH
    from ..service.next_boot import predict_next_boot

    done = predict_next_boot(ctx.node, name, boot_file or DEFAULT_BOOT_PATH)

    def text() -> str:
        p = done["prediction"]
        lines = [f"{name}: expected next boot, from {done['boot_file']} on its disk "
                 "(its next boot that differs from the baseline is judged against it)", "PCRs (sha256):"]
        lines += [f"  {pcr:>2}: {value}" for pcr, value in p["pcrs"].items()]
        return "\n".join(lines)

    emit(as_json, done, text)


# The launch options that decide what is measured, the very Option objects `tvorch launch` takes.
LAUNCH_OPTIONS = ("memory", "vcpus", "firmware", "secure_boot", "firmware_profile", "tpm_model", "kernel", "initrd",
                  "cmdline")
predict.params[1:1] = [p for p in launch.params if p.name in LAUNCH_OPTIONS]
