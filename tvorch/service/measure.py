"""Measure what a launch will run, and judge it against the reference values.

Every file that decides what the guest executes is hashed (through the digest
cache, so an unchanged file is not read again) before anything is defined.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from ..adapters.digests import measure_file
from ..adapters.firmware_files import resolve_for_spec
from ..adapters.progress import progress_for
from ..adapters.store import Store
from ..config import Config, effective_config
from ..core.launch.images import ImageChain
from ..core.launch.manifest import Measurement, canonical_json
from ..core.launch.references import Checked, check_references
from ..core.launch.spec import DomainSpec
from ..errors import TrustError

# Which reference-value kind judges each measurement kind.
REFERENCE_KIND = {
    "image-layer": "image",
    "firmware-code": "firmware",
    "firmware-vars": "firmware",
    "kernel": "kernel",
    "initrd": "initrd",
    "emulator": "emulator",
    "swtpm": "swtpm",
}


@dataclass(frozen=True)
class Measured:
    measurements: tuple[Measurement, ...]
    policy_digest: str


def policy_digest(cfg: Config) -> str:
    """SHA-256 of every setting in force (defaults included), in canonical JSON."""
    return hashlib.sha256(canonical_json(effective_config(cfg))).hexdigest()


def file_measurement(store: Store, kind: str, path: str, rehash: bool, **details: str | int | bool) -> Measurement:
    """PATH as QEMU and libvirt will name it (a symlink is not resolved), and its content's digest."""
    digest = measure_file(path, store, rehash=rehash, progress=progress_for(path))
    return Measurement(
        kind=kind, path=path, digest=digest.digest, size=digest.size, details={**details, "cached": digest.cached}
    )


def measure_launch(cfg: Config, store: Store, spec: DomainSpec, chain: ImageChain, rehash: bool) -> Measured:
    """Image layers (base first), firmware, direct-boot files, emulator and swtpm."""
    out: list[Measurement] = []
    for index, layer in enumerate(chain.layers):
        out.append(file_measurement(
            store, "image-layer", layer.path, rehash,
            layer=index, format=layer.format.value, virtual_size=layer.virtual_size,
        ))
    firmware = resolve_for_spec(spec)
    out.append(file_measurement(store, "firmware-code", firmware.code, rehash, firmware=firmware.kind))
    if firmware.vars_template is not None:
        out.append(file_measurement(store, "firmware-vars", firmware.vars_template, rehash))
    if spec.direct_boot is not None:
        boot = spec.direct_boot
        out.append(file_measurement(store, "kernel", boot.kernel, rehash))
        if boot.initrd is not None:
            out.append(file_measurement(store, "initrd", boot.initrd, rehash))
        if boot.cmdline is not None:
            out.append(Measurement(kind="cmdline", digest=hashlib.sha256(boot.cmdline.encode()).hexdigest(),
                                   size=len(boot.cmdline.encode()), details={"text": boot.cmdline}))
    out.append(file_measurement(store, "emulator", spec.emulator, rehash))
    out.append(file_measurement(store, "swtpm", cfg.swtpm, rehash))
    return Measured(tuple(out), policy_digest(cfg))


def judge(cfg: Config, store: Store, measured: Measured, allow_untrusted_image: bool) -> Measured:
    """Check required kinds against the reference values; refuse with every failure named.

    Returns the measurements with each waived one marked (`"waived": true` in
    its details), so the signed manifest says the operator overrode the check.
    """
    trusted = {(r.kind, r.digest) for r in store.references()}
    checked = [
        Checked(REFERENCE_KIND[m.kind], m.path or m.kind, m.digest)
        for m in measured.measurements
        if m.kind in REFERENCE_KIND
    ]
    verdict = check_references(
        checked, trusted, cfg.policy.require_trusted, waive_kinds=("image",) if allow_untrusted_image else ()
    )
    if not verdict.passed:
        raise TrustError(f"launch refused: {verdict.reason()}")
    waived = {(f.path, f.digest) for f in verdict.waived}
    return dataclasses.replace(measured, measurements=tuple(
        dataclasses.replace(m, details={**m.details, "waived": True}) if (m.path, m.digest) in waived else m
        for m in measured.measurements
    ))
