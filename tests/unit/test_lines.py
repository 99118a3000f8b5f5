"""LineReader: the framing both the guest channel and the migration line read through."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tvorch.adapters.lines import LineReader, LineTooLong


Ends = tuple[int, int, Callable[[], None]]


@pytest.fixture(params=["pipe", "socket"])
def ends(request: pytest.FixtureRequest) -> Iterator[Ends]:
    """(read fd, write fd, close the writing end) of a pipe or of a unix socket pair."""
    if request.param == "pipe":
        r, w = os.pipe()
        closed: list[int] = []
        yield r, w, lambda: (os.close(w), closed.append(w))
        for fd in {r, w} - set(closed):
            os.close(fd)
    else:
        a, b = socket.socketpair()
        yield a.fileno(), b.fileno(), lambda: b.shutdown(socket.SHUT_WR)
        a.close()
        b.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_lines_split_across_and_within_reads(ends: Ends) -> None:
    r, w, _ = ends
    lines = LineReader(r, 1024)
    os.write(w, b"one\ntw")
    assert lines.read_line(soon()) == b"one"
    os.write(w, b"o\nthree\n\nfour")
    assert [lines.read_line(soon()) for _ in range(3)] == [b"two", b"three", b""]
    later = threading.Timer(0.2, os.write, (w, b"\n"))
    later.start()
    assert lines.read_line(soon()) == b"four"  # waits for the rest of the line
    later.join()


def test_the_deadline_is_kept(ends: Ends) -> None:
    r, w, _ = ends
    os.write(w, b"no newline yet")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        LineReader(r, 1024).read_line(start + 0.3)
    assert 0.25 <= time.monotonic() - start < 3


def test_a_closed_end_is_eof_and_what_came_before_is_kept(ends: Ends) -> None:
    r, w, close = ends
    lines = LineReader(r, 1024)
    os.write(w, b"last\npartial")
    close()
    assert lines.read_line(soon()) == b"last"
    with pytest.raises(EOFError):
        lines.read_line(soon())


def test_a_line_past_the_limit_is_refused_without_reading_on(ends: Ends) -> None:
    r, w, _ = ends
    os.write(w, b"x" * 100)
    with pytest.raises(LineTooLong):
        LineReader(r, 64).read_line(soon())
    os.write(w, b"x" * 30 + b"\n")
    assert LineReader(r, 64).read_line(soon()) == b"x" * 30  # exactly at the limit is fine


def test_a_read_error_is_raised_as_it_is() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        LineReader(r, 64).read_line(soon())
