"""The line the source and destination of a migration speak over: one JSON object per line.

The source runs the destination's `tvorch migrate-in` through a command the
operator names (``ssh root@node-b tvorch`` by default; tests enter a second
node's namespaces) and talks to it over its stdin and stdout, as rsync and
libvirt's own ssh transport do. Nothing on this line is trusted for being on
it: everything that matters is signed by a node or bound to a TPM
(service.migrate). The destination's stderr is kept for the error message.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from ..core.codec import canonical_json, parse_json
from ..errors import ExitCode, OperationTimeout, TrustError, TvorchError
from .lines import LineReader, LineTooLong

MAX_LINE = 256 * 1024 * 1024  # a host quote with its IMA list, the records, the NVRAM file


class PeerGone(TvorchError):
    """The other side closed the line (it exited, or was killed): the migration does not happen (exit 12)."""

    exit_code = ExitCode.TRUST_REFUSED


class Line:
    """One end of the line: send and receive JSON objects of a given ``type``."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes], who: str) -> None:
        self._writer, self.who = writer, who
        self._lines = LineReader(reader.fileno(), MAX_LINE)

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self._writer.write(canonical_json({"type": kind, **fields}) + b"\n")
            self._writer.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise PeerGone(f"{self.who} closed the connection") from None

    def receive(self, *kinds: str, timeout: float = 300.0) -> dict[str, Any]:
        """The next message, which must be one of KINDS; a "refused" message raises TrustError with its reason."""
        line = self._read_line(timeout)
        msg = parse_json(line, f"message from {self.who}", TrustError, top=None)
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise TrustError(f"{self.who} sent a message without a type")
        if msg["type"] == "refused":
            raise TrustError(f"{self.who} refused: {msg.get('reason', 'no reason given')}")
        if msg["type"] not in kinds:
            raise TrustError(f"{self.who} sent {msg['type']!r}, expected {' or '.join(kinds)}")
        return msg

    def _read_line(self, timeout: float) -> bytes:
        try:
            return self._lines.read_line(time.monotonic() + timeout)
        except TimeoutError:
            raise OperationTimeout(f"{self.who} did not answer within {timeout:g} s") from None
        except LineTooLong:
            raise TrustError(f"{self.who} sent a message longer than {MAX_LINE} bytes") from None
        except (EOFError, OSError):
            raise PeerGone(f"{self.who} closed the connection") from None


class Destination:
    """The destination's `tvorch migrate-in`, run by COMMAND (argv), as a context manager."""

    def __init__(self, command: Sequence[str]) -> None:
        self._errors = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._errors)
        except OSError as err:
            self._errors.close()
            raise TrustError(f"cannot run the destination's tvorch ({command[0]}): {err.strerror}") from None
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self.line = Line(self._proc.stdout, self._proc.stdin, "the destination")
        self._released = False

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def last_error(self) -> str:
        """The last line the destination wrote on stderr (its own one-line refusal), if any."""
        self._errors.seek(0)
        lines = [ln.strip() for ln in self._errors.read()[-4096:].decode("utf-8", "replace").splitlines()]
        return next((ln for ln in reversed(lines) if ln), "")

    def release(self) -> None:
        """Done with it: close the line and let it finish by itself (it has answered everything)."""
        self._close_streams()
        self._released = True

    def close(self, wait: float = 30.0) -> int | None:
        """Close the line and wait for it to exit (killed after WAIT seconds)."""
        if self._released:
            self._errors.close()
            return None
        self._close_streams()
        try:
            code = self._proc.wait(wait)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._errors.close()
        return code

    def _close_streams(self) -> None:
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

