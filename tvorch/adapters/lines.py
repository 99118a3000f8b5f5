"""Newline-framed messages from a stream, up to a deadline: the guest channel and the migration line.

Both read whatever arrives (a socket, a pipe), keep what follows the newline
for the next call, and must neither wait past the caller's deadline nor hold
an unbounded line. The callers say what each outcome means for them.
"""

from __future__ import annotations

import os
import select
import time


class LineTooLong(Exception):
    """The other end sent more than the reader's limit without a newline."""


class LineReader:
    def __init__(self, fd: int, max_line: int) -> None:
        self._fd, self.max_line = fd, max_line
        self._buffer = b""

    def read_line(self, deadline: float) -> bytes:
        """The next line, without its newline.

        DEADLINE is a time.monotonic() value. Raises TimeoutError when it
        passes, EOFError when the other end closed, LineTooLong past the limit,
        and OSError as the read raised it.
        """
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                raise EOFError
            self._buffer += chunk
            if len(self._buffer) > self.max_line:
                raise LineTooLong
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line
