"""Reconcile asks another node's libvirt whether it runs a migrated VM: that question has a time limit.

libvirt's client has no connect timeout; a destination that accepts the
connection and never answers (a hung libvirtd, a half-open network path)
held `tvorch reconcile`, and with it `tvorch list` and the daemon.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tvorch.adapters.hypervisor import remote_domain_running

TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # libvirt's test:///default "test" domain, running


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def within(seconds: float, func):  # type: ignore[no-untyped-def]
    """FUNC's result, failing the test (not hanging it) when it takes longer than SECONDS."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(func()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still waiting after {seconds} s"
    return out[0]


def test_a_libvirt_that_never_answers_is_unreachable_after_the_time_limit(silent_port: int) -> None:
    start = time.monotonic()
    answer = within(10, lambda: remote_domain_running(f"qemu+tcp://127.0.0.1:{silent_port}/system",
                                                      TEST_DOMAIN_UUID, timeout=1.0))
    assert answer is None
    assert 0.9 <= time.monotonic() - start < 5


def test_a_refused_connection_is_unreachable_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert within(10, lambda: remote_domain_running(f"qemu+tcp://127.0.0.1:{port}/system", TEST_DOMAIN_UUID,
                                                        timeout=5.0)) is None


def test_a_libvirt_that_answers_says_whether_the_domain_runs() -> None:
    assert remote_domain_running("test:///default", TEST_DOMAIN_UUID) is True
    assert remote_domain_running("test:///default", "00000000-0000-4000-8000-000000000001") is False
