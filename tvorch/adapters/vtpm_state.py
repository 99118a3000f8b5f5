"""The digest of a vTPM's state at rest, as swtpm leaves it in libvirt's directory.

The digest covers every state file (name and content) in `<dir>/tpm2`, not
swtpm's lock file, so an older copy of any of them is a different digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_IGNORED = {".lock"}


def state_digest(state_dir: Path) -> str | None:
    """sha256 over the sorted (name, sha256(content)) of the state files; None without state."""
    tpm2 = state_dir / "tpm2"
    try:
        files = sorted(p for p in tpm2.iterdir() if p.is_file() and p.name not in _IGNORED)
    except FileNotFoundError:
        return None
    if not files:
        return None
    outer = hashlib.sha256()
    for path in files:
        outer.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return outer.hexdigest()
