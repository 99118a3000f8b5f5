"""tvorch's element in a domain's <metadata>, and reading it back.

Kept apart from the renderer because the libvirt hook reads it on every
start: this module imports nothing but ElementTree.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tvorch.errors import InputError

# tvorch's own element in the domain <metadata>; libvirt keeps it verbatim.
METADATA_NAMESPACE = "https://tvorch.dev/xmlns/instance/1"
METADATA_PREFIX = "tvorch"
METADATA_VERSION = "1"
MANIFEST_DIGEST_PREFIX = "sha256:"
_SHA256_HEX = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class InstanceMetadata:
    """What tvorch recorded in a domain's <metadata>."""

    instance_id: str
    # sha256 hex of the launch manifest, without the "sha256:" prefix.
    manifest_digest: str | None


def parse_instance_metadata(xml: str) -> InstanceMetadata | None:
    """Return what tvorch recorded in a domain XML, or None if it is not ours.

    Looks the element up by namespace URI, not prefix: libvirt re-serialises
    the metadata and may move the namespace declaration or rename the prefix.
    Raises ``InputError`` for XML that is not well-formed and for a manifest
    attribute that is not ``sha256:<64 lowercase hex>``.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"domain XML is not well-formed: {err}") from err
    instance = root.find(f"metadata/{{{METADATA_NAMESPACE}}}instance")
    if instance is None or not instance.get("id"):
        return None
    manifest = instance.get("manifest")
    digest = None
    if manifest is not None:
        digest = manifest.removeprefix(MANIFEST_DIGEST_PREFIX)
        if not manifest.startswith(MANIFEST_DIGEST_PREFIX) or not _SHA256_HEX.fullmatch(digest):
            raise InputError(f"domain metadata has a malformed manifest digest: {manifest!r}")
    return InstanceMetadata(instance_id=instance.get("id", ""), manifest_digest=digest)
