"""The host end of a guest's attestation channel: a unix socket libvirt binds for the virtio-serial port.

QEMU accepts one client at a time and passes bytes through; whether an agent
reads them depends on the guest (a guest still booting does not yet). So each
exchange is one request and a wait, up to a deadline, for the answer with the
same id; answers to earlier requests that timed out are skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path

from ..core.attestation.agent_protocol import MAX_LINE, Response, parse_response, request_line
from ..core.launch.domain_xml import guest_channel_path
from ..errors import ConfigError, EvidenceError, OperationTimeout, TvorchError
from .files import ensure_private_dir
from .lines import LineReader, LineTooLong


SOCKET_NAME = "attest.sock"


def socket_path(channel_dir: Path, instance_id: str, domain_xml: str = "") -> Path:
    """An instance's channel socket: where its domain XML binds it (instances launched before the
    per-instance directories keep <channel_dir>/<id>.sock), else <channel_dir>/<id>/attest.sock."""
    named = guest_channel_path(domain_xml) if domain_xml else None
    return Path(named) if named else channel_dir / instance_id / SOCKET_NAME


def prepare_socket_dir(socket_path: Path, channel_dir: Path) -> None:
    """Make the directory an instance's channel socket is bound in: root's own, 0700, inside CHANNEL_DIR.

    libvirtd (root) binds the socket and hands QEMU the listening descriptor,
    so QEMU never needs the path. Every QEMU runs as the same user
    (libvirt-qemu): one that could reach another VM's socket could hold it
    (QEMU serves one client at a time) and make that VM's attestation fail.
    So only root, i.e. tvorch, can reach it. A socket directly in CHANNEL_DIR
    (instances launched before this layout) is left as it is.
    """
    ensure_private_dir(channel_dir, 0o711)
    directory = socket_path.parent
    if directory == channel_dir:
        return
    ensure_private_dir(directory, 0o700)
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise NotADirectoryError(20, "not a directory")
        os.chmod(directory, 0o700)
    except OSError as err:
        raise ConfigError(f"cannot make {directory} private: {err.strerror}") from None


def remove_socket_dir(socket_path: Path, channel_dir: Path) -> None:
    """Remove an instance's socket directory (and what libvirt left in it); the shared CHANNEL_DIR stays."""
    if socket_path.parent != channel_dir and socket_path.parent.parent == channel_dir:
        shutil.rmtree(socket_path.parent, ignore_errors=True)


class GuestAgentError(TvorchError):
    """The guest agent answered `error`; exit code EVIDENCE."""

    exit_code = EvidenceError.exit_code


# Seconds between hellos while the agent has not answered (see GuestChannel.hello).
HELLO_RESEND = 5.0


class GuestChannel:
    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lines: LineReader | None = None

    def __enter__(self) -> GuestChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError as err:
            sock.close()
            raise EvidenceError(f"cannot open the guest channel {self.path}: {err.strerror or err} "
                                "(is the VM running?)") from None
        self._sock = sock
        self._lines = LineReader(sock.fileno(), MAX_LINE)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock, self._lines = None, None

    def hello(self) -> Response:
        return self.resend("hello")

    def resend(self, op: str, **fields: str) -> Response:
        """OP (one without effect in the guest: hello, quote), sent again every HELLO_RESEND seconds until the timeout.

        An agent that is re-opening its port after the previous client hung up
        misses what arrived meanwhile; saying it again is safe, and a late
        answer to an earlier one is skipped.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.call(op, _deadline=min(deadline, time.monotonic() + HELLO_RESEND), **fields)
            except OperationTimeout:
                if time.monotonic() >= deadline:
                    raise OperationTimeout(f"the guest agent did not answer {op} within {self.timeout:g} s "
                                           "(is it running in the guest?)") from None

    def call(self, op: str, _deadline: float | None = None, **fields: str) -> Response:
        """Send one request and return its answer; an `error` answer raises GuestAgentError."""
        assert self._sock is not None, "use GuestChannel as a context manager"
        request_id = secrets.token_hex(6)
        try:
            self._sock.sendall(request_line(request_id, op, **fields))
        except OSError as err:
            raise EvidenceError(f"the guest channel {self.path} failed: {err.strerror or err}") from None
        deadline = time.monotonic() + self.timeout if _deadline is None else _deadline
        while True:
            response = parse_response(self._read_line(deadline, op))
            if response.request_id != request_id:
                continue  # the answer to an earlier request that timed out
            if not response.ok:
                raise GuestAgentError(f"the guest agent refused {op}: {response.error}")
            return response

    def _read_line(self, deadline: float, op: str) -> bytes:
        assert self._lines is not None
        try:
            return self._lines.read_line(deadline)
        except TimeoutError:
            raise OperationTimeout(f"the guest agent did not answer {op} within {self.timeout:g} s "
                                   "(is it running in the guest?)") from None
        except LineTooLong:
            raise EvidenceError(f"the guest agent's answer exceeds {MAX_LINE} bytes") from None
        except EOFError:
            raise EvidenceError(f"the guest channel {self.path} closed (the VM stopped?)") from None
        except OSError as err:
            raise EvidenceError(f"the guest channel {self.path} failed: {err.strerror or err}") from None
