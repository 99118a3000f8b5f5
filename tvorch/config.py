"""tvorch's configuration: a TOML file validated into frozen dataclasses.

Every key has a default, so a node with no file runs with the defaults. An
unknown key or a value of the wrong type is refused with the key's dotted name,
because a typo that silently falls back to a default is how policies get lost.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .adapters.files import read_bounded
from .core.launch.images import UNSAFE_IMAGE_POLICIES
from .core.launch.references import REFERENCE_KINDS
from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/tvorch/tvorch.toml"
CONFIG_ENV = "TVORCH_CONFIG"


@dataclass(frozen=True)
class LaunchDefaults:
    """Values `tvorch launch` uses when an option is not given."""

    memory_mib: int = 1024
    vcpus: int = 1
    firmware: str = "efi"
    secure_boot: bool = False
    tpm_model: str = "crb"
    # A UEFI launch without a firmware reference for its platform: "create" boots the reference VM once
    # (about 15 s; every later launch on that platform reuses it), "existing" predicts PCRs 0-3 and 6 only
    # from a stored one (`tvorch firmware reference create`).
    firmware_reference: str = "create"
    max_memory_mib: int = 262144
    max_vcpus: int = 64


@dataclass(frozen=True)
class Policy:
    """What a launch must satisfy; its digest goes into every manifest."""

    # Measurement kinds that must match a reference value (`tvorch image trust`,
    # `tvorch reference add`): image, firmware, kernel, initrd, emulator, swtpm.
    require_trusted: tuple[str, ...] = ("image",)
    # Whether `tvorch launch --allow-untrusted-image` may waive the image check.
    allow_untrusted_image: bool = False
    # Whether the hook refuses to start domains tvorch did not launch.
    require_tvorch_domains: bool = False
    # What the hook does about the host attestation verdict: "ignore" (until
    # host attestation is set up) or "require" (refuse without a passing one).
    host_verdict: str = "ignore"
    # CA certificate (PEM) that image signing certificates must chain to;
    # empty: `tvorch image trust --signature` is refused.
    image_signing_ca: str = ""
    # What launch does about an image layer someone other than root can change
    # (core.launch.images.layer_writers): "refuse-world-writable" refuses world-writable
    # layers and warns about ones owned (or group-writable) by another user or
    # group; "refuse" refuses both; "warn" only warns.
    unsafe_image_files: str = "refuse-world-writable"
    # How an instance's first verified boot is judged (README, "Predicted boot measurements"):
    # "predicted" against the launch manifest's signed boot prediction, event by event (a match becomes
    # the baseline, a difference is refused and not learned; learned, and said so, where the manifest
    # has no prediction); "learn": the first verified boot becomes the baseline (trust on first use).
    first_boot: str = "predicted"


@dataclass(frozen=True)
class HostAttestation:
    """Where the host's evidence comes from, and how fresh a verdict must be."""

    # tpm2-tss TCTI: "device:/dev/tpmrm0" on a node; "swtpm:host=127.0.0.1,port=2321" in tests.
    tcti: str = "device:/dev/tpmrm0"
    eventlog: str = "/sys/kernel/security/tpm0/binary_bios_measurements"
    ima_log: str = "/sys/kernel/security/ima/binary_runtime_measurements"
    bank: str = "sha256"
    pcrs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 10)
    # The reviewed host policy (JSON, written by `tvorch host baseline`).
    policy: str = "/etc/tvorch/host-policy.json"
    # Seconds a verdict stays fresh for the hook (policy.host_verdict = "require").
    verdict_max_age: int = 900


@dataclass(frozen=True)
class Serve:
    """`tvorch serve`: how often it attests the host and reports that it lives."""

    # Seconds between host attestations (0: never); keep it below host.verdict_max_age.
    attest_interval: int = 300
    heartbeat_interval: int = 5
    # Longest wait between attempts to reach libvirtd again.
    reconnect_max_wait: int = 30
    # Instances started (autostart, resumed saves) or saved/shut down at once (README, "Start paths").
    start_concurrency: int = 2
    # On SIGTERM: "shutdown" (ACPI, power off after stop_timeout), "save" (managed save, resumed by
    # the next serve) or "none" (guests left running). Default shutdown: every vTPM state is ledgered and
    # no guest memory is left on disk.
    on_shutdown: str = "shutdown"


@dataclass(frozen=True)
class Vtpm:
    """How each instance's vTPM state is protected at rest (README, "vTPM state and records")."""

    # "host-tpm": a random key per instance encrypts the state; the key is sealed
    # to the host TPM (host.tcti) under seal_pcrs and given to libvirt only for a
    # start. "none": state in clear, for development nodes without a TPM.
    key_protection: str = "host-tpm"
    # Host PCRs the key is sealed to: firmware code, option ROMs, boot loader, Secure Boot.
    seal_pcrs: tuple[int, ...] = (0, 2, 4, 7)
    seal_bank: str = "sha256"
    # RSA public key (PEM) of an operator-held escrow key; each state key is also
    # wrapped to it (RSA-OAEP) so `tvorch vtpm rekey --escrow-key` can recover a
    # VM after a firmware update. Empty: no escrow, and a changed boot state
    # makes the vTPMs of existing VMs unrecoverable.
    escrow_public_key: str = ""
    # The user libvirt runs swtpm as (qemu.conf swtpm_user); it owns the state.
    swtpm_user: str = "tss"


@dataclass(frozen=True)
class GuestAttestation:
    """The guest channel and what a guest quote covers (README, "Guest attestation")."""

    # Where libvirt binds each domain's attestation channel socket (<id>.sock); 0711, root.
    channel_dir: str = "/run/tvorch/channels"
    bank: str = "sha256"
    # Boot PCRs quoted: firmware and boot loader (0-9) and the UKI's (11-14); not IMA's 10.
    pcrs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)
    # Seconds to wait for the guest agent to answer (a guest still booting does not).
    agent_timeout: int = 60


@dataclass(frozen=True)
class Keylime:
    """A Keylime verifier that judges each boot and host quote tvorch has verified (docs/keylime.md)."""

    # https://HOST:PORT of the verifier (or of the pool's one URL); empty: no submissions.
    verifier_url: str = ""
    # CA certificate (PEM) of the verifier's TLS certificate; empty: the system's CAs.
    ca_file: str = ""
    # Client certificate and key (PEM) for verifiers that require one; empty: none sent.
    client_cert: str = ""
    client_key: str = ""
    # Seconds to wait for one answer.
    timeout: int = 10


@dataclass(frozen=True)
class FirmwareProfile:
    """A named OVMF code image + vars template (e.g. an operator's own SB keys)."""

    code: str
    vars_template: str
    secure_boot: bool = True


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/tvorch"
    libvirt_uri: str = "qemu:///system"
    virt_type: str = "auto"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    swtpm: str = "/usr/bin/swtpm"
    overlay_dir: str = "/var/lib/libvirt/images/tvorch"
    console_log_dir: str = "/var/log/tvorch"
    swtpm_state_dir: str = "/var/lib/libvirt/swtpm"
    # Where QEMU reads direct-boot kernels and initrds: a read-only view of state_dir/boot-files.
    boot_files_dir: str = "/run/tvorch/boot"
    max_backing_depth: int = 16
    stop_timeout: int = 120
    # The hook's hard deadline: past it a start is refused, anything else allowed.
    hook_deadline_ms: int = 10000
    log_level: str = "warning"
    launch: LaunchDefaults = field(default_factory=LaunchDefaults)
    policy: Policy = field(default_factory=Policy)
    host: HostAttestation = field(default_factory=HostAttestation)
    serve: Serve = field(default_factory=Serve)
    vtpm: Vtpm = field(default_factory=Vtpm)
    guest: GuestAttestation = field(default_factory=GuestAttestation)
    keylime: Keylime = field(default_factory=Keylime)
    firmware_profiles: Mapping[str, FirmwareProfile] = field(default_factory=dict)
    # Where this config came from, and its bytes (b"" for built-in defaults).
    source: str = field(default="<defaults>", compare=False)
    raw: bytes = field(default=b"", compare=False, repr=False)

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "tvorch.db"


_CHOICES = {
    "virt_type": ("auto", "kvm", "qemu"),
    "log_level": ("debug", "info", "warning", "error"),
    "launch.firmware": ("efi", "bios"),
    "launch.tpm_model": ("crb", "tis"),
    "launch.firmware_reference": ("create", "existing"),
    "policy.host_verdict": ("ignore", "require"),
    "policy.first_boot": ("predicted", "learn"),
    "serve.on_shutdown": ("shutdown", "save", "none"),
    "policy.unsafe_image_files": tuple(UNSAFE_IMAGE_POLICIES),
    "host.bank": ("sha1", "sha256", "sha384"),
    "vtpm.key_protection": ("host-tpm", "none"),
    "vtpm.seal_bank": ("sha1", "sha256", "sha384"),
    "guest.bank": ("sha1", "sha256", "sha384"),
}
_LIST_CHOICES = {
    "policy.require_trusted": REFERENCE_KINDS,
}
_NOT_FROM_FILE = {"source", "raw"}
# Lower bounds beyond "not negative": values that would switch a safeguard off.
_MINIMUMS = {
    "hook_deadline_ms": 1, "stop_timeout": 1, "max_backing_depth": 1,
    "launch.memory_mib": 128, "launch.vcpus": 1, "launch.max_memory_mib": 128, "launch.max_vcpus": 1,
    "host.verdict_max_age": 1, "serve.heartbeat_interval": 1, "serve.reconnect_max_wait": 1,
    "serve.start_concurrency": 1,
    "guest.agent_timeout": 1, "keylime.timeout": 1,
}
# Upper bound of every integer: TOML carries any size, but a huge one would overflow a timer, libvirt's
# XML or the manifest's canonical JSON (2**53-1) far from the config, as an internal error.
INT_MAX = 2**31 - 1
# Paths tvorch writes to or trusts: relative ones would depend on the caller's directory.
_ABSOLUTE = {
    "state_dir", "emulator", "swtpm", "overlay_dir", "console_log_dir", "swtpm_state_dir", "boot_files_dir",
    "host.eventlog", "host.ima_log", "host.policy", "guest.channel_dir",
}
# Paths that may also be left empty (the feature is then off).
_ABSOLUTE_OR_EMPTY = {"policy.image_signing_ca", "vtpm.escrow_public_key",
                      "keylime.ca_file", "keylime.client_cert", "keylime.client_key"}


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean"}.get(tp, "a table")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - _NOT_FROM_FILE
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        dotted = f"{prefix}{f.name}"
        values[f.name] = _convert(hints[f.name], data[f.name], dotted)
        for item in values[f.name] if dotted in _LIST_CHOICES else ():
            if item not in _LIST_CHOICES[dotted]:
                raise ConfigError(
                    f"config key '{dotted}' items must be among {', '.join(_LIST_CHOICES[dotted])}, not {item!r}"
                )
        if dotted in _MINIMUMS and values[f.name] < _MINIMUMS[dotted]:
            raise ConfigError(f"config key '{dotted}' must be at least {_MINIMUMS[dotted]}, not {values[f.name]}")
        if dotted in _ABSOLUTE and not values[f.name].startswith("/"):
            raise ConfigError(f"config key '{dotted}' must be an absolute path, not {values[f.name]!r}")
        if dotted in _ABSOLUTE_OR_EMPTY and values[f.name] and not values[f.name].startswith("/"):
            raise ConfigError(f"config key '{dotted}' must be an absolute path or empty, not {values[f.name]!r}")
        if dotted in ("host.pcrs", "vtpm.seal_pcrs", "guest.pcrs") and (not values[f.name] or max(values[f.name]) > 23):
            raise ConfigError(f"config key '{dotted}' must list PCR indices 0-23, not {list(values[f.name])}")
        if dotted == "keylime.verifier_url" and values[f.name] and not values[f.name].startswith("https://"):
            raise ConfigError(f"config key '{dotted}' must be https://HOST:PORT (Keylime serves TLS only) "
                              f"or empty, not {values[f.name]!r}")
        choices = _CHOICES.get(dotted)
        if choices and values[f.name] not in choices:
            raise ConfigError(
                f"config key '{dotted}' must be one of {', '.join(choices)}, "
                f"not {values[f.name]!r}"
            )
    try:
        return cls(**values)
    except TypeError as err:  # a required key of a table is missing
        missing = str(err).split("argument")[-1].strip(": '")
        raise ConfigError(f"config table '{prefix.rstrip('.')}' lacks key '{missing}'") from None


def _convert(tp: Any, value: Any, dotted: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' must be a table")
        return _build(tp, value, dotted + ".")
    if get_origin(tp) is Mapping:
        _, item_type = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' must be a table")
        return {k: _convert(item_type, v, f"{dotted}.{k}") for k, v in value.items()}
    if get_origin(tp) is tuple:
        (item_type, _) = get_args(tp)
        if not isinstance(value, list) or any(
                type(v) is not item_type or (item_type is int and not 0 <= v <= INT_MAX) for v in value):
            raise ConfigError(f"config key '{dotted}' must be a list of {_type_name(item_type).split()[-1]}s"
                              + (f" from 0 to {INT_MAX}" if item_type is int else ""))
        return tuple(value)
    # bool is a subclass of int: keep them apart so `vcpus = true` is refused.
    if type(value) is not tp:
        raise ConfigError(f"config key '{dotted}' must be {_type_name(tp)}, not {value!r}")
    if tp is int and value < 0:
        raise ConfigError(f"config key '{dotted}' must not be negative")
    if tp is int and value > INT_MAX:
        raise ConfigError(f"config key '{dotted}' must be at most {INT_MAX}, not {value}")
    return value


def effective_config(cfg: Config) -> dict[str, Any]:
    """Every setting in force, defaults included: what the policy digest covers."""
    data = dataclasses.asdict(cfg)
    for key in _NOT_FROM_FILE:
        data.pop(key)
    return data


def parse_config(text: bytes, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    cfg = _build(Config, data, "")
    return dataclasses.replace(cfg, source=source, raw=text)


def load_config(path: str | None = None) -> Config:
    """Load from PATH, else $TVORCH_CONFIG, else the default path if it exists."""
    explicit = path or os.environ.get(CONFIG_ENV)
    target = explicit or DEFAULT_CONFIG_PATH
    try:
        text = read_bounded(target, 1024 * 1024)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file not found: {target}") from None
        return Config()
    except OSError as err:
        raise ConfigError(f"cannot read config file {target}: {err.strerror}") from None
    return parse_config(text, target)
