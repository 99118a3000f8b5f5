"""`tvorch predict IMAGE`: the sha256 events and PCR values a launch would produce, computed before any boot."""

from __future__ import annotations

import click

from .common import Context, emit, json_option, pass_ctx
from .group import cli
from .instances import launch


@cli.command()
@click.argument("image")
@json_option
@pass_ctx
def predict(ctx: Context, image: str, firmware: str | None, secure_boot: bool | None, firmware_profile: str | None,
            tpm_model: str | None, kernel: str | None, initrd: str | None, cmdline: str | None,
            memory: int | None, vcpus: int | None, as_json: bool) -> None:
    """The boot measurements (PCR, event type, sha256, what) launching IMAGE would produce, and the PCR values."""
    from ..config import load_config
    from ..service.predict import PredictRequest, predict as run

    d = load_config(ctx.config_path).launch
    req = PredictRequest(
        image=image, firmware=firmware or d.firmware, secure_boot=d.secure_boot if secure_boot is None else secure_boot,
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


# The launch options that decide what is measured, the very Option objects `tvorch launch` takes.
LAUNCH_OPTIONS = ("memory", "vcpus", "firmware", "secure_boot", "firmware_profile", "tpm_model", "kernel", "initrd",
                  "cmdline")
predict.params[1:1] = [p for p in launch.params if p.name in LAUNCH_OPTIONS]
