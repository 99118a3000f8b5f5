"""systemd's notify protocol: one datagram per state change to $NOTIFY_SOCKET.

No dependency needed: the protocol is `KEY=VALUE` lines in a datagram on a
unix socket (an abstract one when the path starts with '@'). Outside systemd
there is no socket, and every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send LINES (e.g. "READY=1", "STATUS=...") to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        # Never block the daemon on a reader that is not reading: drop the datagram.
        sock.setblocking(False)
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """How often to ping the watchdog (half of WatchdogSec=), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None
