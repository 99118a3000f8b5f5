"""A real swtpm as the host TPM, for tests (no mocks).

Use it from a test module with
``from tests.tpm_fixtures import swtpm_host_fixture  # noqa: F401`` and a test
parameter ``swtpm_host``: the fixture's name differs from the function's so
the parameter does not shadow the import (ruff F811). It yields the TCTI
string that tvorch's config and ``TPM2TOOLS_TCTI`` both take. Each test gets a
fresh TPM (a swtpm starts in about 50 ms), so PCR extends and keys never leak
between tests. ``running_swtpm`` is the same as a context manager, for other
fixtures. Without swtpm the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.components import require

_START_ATTEMPTS = 5  # the free ports found may be taken before swtpm binds them
_READY_TIMEOUT = 10.0


def _free_port_pair() -> tuple[int, int] | None:
    """A free port N on 127.0.0.1 with N+1 free too (the swtpm TCTI's control port is N+1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except (OSError, OverflowError):
                return None
    return port, port + 1


def _wait_ready(proc: subprocess.Popen[bytes], ports: tuple[int, int]) -> bool:
    """Poll until both ports accept; False if swtpm exited (a port was taken)."""
    deadline = time.monotonic() + _READY_TIMEOUT
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"swtpm did not accept connections on {ports} in {_READY_TIMEOUT} s") from None
            time.sleep(0.01)
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_swtpm(state_dir: Path, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """A swtpm on free ports N, N+1 of 127.0.0.1 with its state in STATE_DIR; yields the TCTI string.

    EXTRA_ARGS go to swtpm as they are (say, ``--key pwdfile=F,mode=aes-256-cbc``)."""
    swtpm = shutil.which("swtpm")
    require(swtpm is not None, "swtpm (Debian package swtpm)")
    state_dir.mkdir(parents=True, exist_ok=True)
    errors = b""
    for _ in range(_START_ATTEMPTS):
        ports = _free_port_pair()
        if ports is None:
            continue
        server, ctrl = ports
        proc = subprocess.Popen(
            [swtpm, "socket", "--tpm2",
             "--server", f"type=tcp,port={server},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear",
             "--tpmstate", f"dir={state_dir}", *extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            if _wait_ready(proc, ports):
                yield f"swtpm:host=127.0.0.1,port={server}"
                return
        finally:
            _stop(proc)
            assert proc.stderr is not None
            errors = proc.stderr.read()
            proc.stderr.close()
    pytest.fail(f"swtpm did not start in {_START_ATTEMPTS} attempts: {errors.decode(errors='replace')}")


@pytest.fixture(name="swtpm_host")
def swtpm_host_fixture(tmp_path: Path) -> Iterator[str]:
    """A fresh swtpm serving as the host TPM; the TCTI string for tvorch and tpm2-tools."""
    with running_swtpm(tmp_path / "swtpm-state") as tcti:
        yield tcti
