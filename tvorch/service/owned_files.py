"""What tvorch owns on this node, and whether a domain that is not an instance uses any of it.

For the hook's no-metadata path (tvorch.hook): a domain without tvorch's
metadata is not an instance, so it may not use an instance's overlay, NVRAM
file, vTPM state, console log or channel socket, anything under tvorch's own
directories, nor a trusted image or an instance's image layer other than
read-only. The XML is judged by tvorch.core.launch.domain_files; this module resolves
paths (symbolic links, storage pool volumes) and lists what is owned, from the
config and the store. Like the hook it never calls libvirt and imports
nothing heavy: libvirt's storage pool definitions are read from disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapters.files import read_bounded
from ..adapters.store import Store
from ..config import Config
from ..core.launch.domain_files import (
    FileUse,
    OwnedFiles,
    OwnedPath,
    file_uses,
    owned_file_uses,
    volume_path,
)
from ..core.launch.gate import LIBVIRT_NVRAM_DIR
from ..core.launch.instance import InstanceRecord, InstanceState
from ..errors import TvorchError

# Where libvirtd keeps the definitions of active and of persistent storage pools.
POOL_DIRS = ("/run/libvirt/storage", "/etc/libvirt/storage")


def stranger_refusals(cfg: Config, store: Store | None, xml: str, uuid: str | None) -> tuple[str, ...]:
    """Why the domain in XML (not a tvorch instance; its <uuid> UUID) may not start: () when it may."""
    records = store.list_instances(include_destroyed=True) if store is not None else []
    reasons = []
    for record in records:
        kept = Path(cfg.swtpm_state_dir) / record.uuid
        if record.uuid == uuid and record.state is InstanceState.DESTROYED and kept.exists():
            # libvirt picks a vTPM's state directory by the domain's UUID.
            reasons.append(f"its UUID selects the vTPM state {kept} kept for destroyed tvorch instance {record.id}")
    uses = []
    for use in file_uses(xml):
        path = _volume(use) if use.pool is not None else use.path
        if path is None:
            reasons.append(f"<{use.element}> names volume {use.path} of storage pool {use.pool}, "
                           "whose target path cannot be read")
            continue
        uses.append(FileUse(os.path.realpath(path), use.element, use.writable))
    reasons.extend(owned_file_uses(tuple(uses), owned_files(cfg, store, records)))
    return tuple(reasons)


def _volume(use: FileUse) -> str | None:
    if not use.pool or "/" in use.pool or use.pool.startswith("."):
        return None
    for directory in POOL_DIRS:
        try:
            text = read_bounded(f"{directory}/{use.pool}.xml", 1024 * 1024).decode("utf-8", "replace")
        except OSError:
            continue
        return volume_path(text, use.path)
    return None


def owned_files(cfg: Config, store: Store | None, records: list[InstanceRecord]) -> OwnedFiles:
    """Everything tvorch owns on this node, with symbolic links resolved."""
    trees = [
        (cfg.state_dir, "tvorch's state directory (state_dir)"),
        (cfg.overlay_dir, "tvorch's overlay directory (overlay_dir)"),
        (cfg.console_log_dir, "tvorch's console log directory (console_log_dir)"),
        (cfg.guest.channel_dir, "tvorch's guest channel directory (guest.channel_dir)"),
    ]
    files = [(path, "tvorch's configuration") for path in (
        cfg.source, cfg.host.policy, cfg.policy.image_signing_ca, cfg.vtpm.escrow_public_key) if path.startswith("/")]
    if cfg.vtpm.key_protection == "host-tpm" and cfg.host.tcti.startswith("device:"):
        device = cfg.host.tcti.removeprefix("device:").split(",")[0]
        # The same TPM through the kernel's resource manager (/dev/tpmrmN) or directly (/dev/tpmN).
        sibling = device.replace("/tpmrm", "/tpm") if "/tpmrm" in device else device.replace("/tpm", "/tpmrm")
        files += [(path, "the host TPM that seals the vTPM keys") for path in (device, sibling)]
    shared = []
    if store is not None:
        shared = [(ref.path, f"trusted image '{ref.label}'") for ref in store.references("image")]
    for record in records:
        owner = f"tvorch instance {record.id} ({record.name})"
        if record.state is InstanceState.DESTROYED:
            continue
        files += [(str(Path(cfg.swtpm_state_dir) / record.uuid), f"{owner}: its vTPM state"),
                  (f"{LIBVIRT_NVRAM_DIR}/{record.name}_VARS.fd", f"{owner}: its NVRAM"),
                  (record.overlay, f"{owner}: its overlay"), (record.console_log, owner)]
        shared.append((record.image, f"the image of {owner}"))
        try:
            uses = file_uses(record.domain_xml) if record.domain_xml else ()
        except TvorchError:
            uses = ()
        for use in uses:
            if use.pool is None:
                (files if use.writable else shared).append((use.path, owner if use.writable else f"used by {owner}"))
    return OwnedFiles(trees=_resolved(trees), files=_resolved(files), shared=_resolved(shared))


def _resolved(paths: list[tuple[str, str]]) -> tuple[OwnedPath, ...]:
    """Each path once (its first owner), links resolved: the directories, where every instance's files
    share a few, once each (the hook decides within milliseconds); the file itself too when it is a link."""
    directories: dict[str, str] = {}
    owned: dict[str, str] = {}
    for path, owner in paths:
        head, tail = os.path.split(path)
        if head not in directories:
            directories[head] = os.path.realpath(head)
        resolved = os.path.join(directories[head], tail)
        if os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
        owned.setdefault(resolved, owner)
    return tuple(OwnedPath(path, owner) for path, owner in owned.items())
