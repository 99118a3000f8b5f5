"""The guest attestation agents, run for real against a real swtpm, with tvorch as the host.

Two agents answer ``tvorch-attest/1`` (tvorch/core/attestation/agent_protocol.py):
``scripts/tvorch-guest-agent`` (Python, for real guests) and the busybox sh
agent of the test guest (``scripts/build-test-guest.sh``, between its
``GUEST_AGENT`` markers), run here with busybox's applets first on PATH, as
in the guest. The host side is tvorch's own: GuestChannel, akcert's
make_credential and check_ak_public, verify_quote, the event log replay.

The port: a pty. Both agents open a path read-write, as they open
/dev/vportNpM in a guest (a unix socket path cannot be open(2)ed); the pty is
raw, so bytes pass unchanged. A thread bridges the pty's master to a unix
socket, as QEMU bridges a virtio-serial port to its chardev socket, so
GuestChannel connects exactly as it does to a guest. Unlike a virtio port, a
pty does not read as end of file when no host is connected; the one test of
reopening closes the pty instead. The agents get the pty through a symlink in
tmp_path that is removed first at teardown, so an agent that outlived its
test cannot reopen a pty number the system has given to someone else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.components import require
from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.guest_channel import GuestAgentError, GuestChannel
from tvorch.adapters.tpm import open_tpm
from tvorch.core.attestation import agent_protocol
from tvorch.core.attestation.agent_protocol import Response, parse_response
from tvorch.core.attestation.akcert import check_ak_public, make_credential
from tvorch.core.attestation.eventlog import EV_NO_ACTION, parse_event_log, replay
from tvorch.core.attestation.quote import ak_name, verify_quote

ROOT = Path(__file__).resolve().parents[2]
PY_AGENT = ROOT / "scripts" / "tvorch-guest-agent"
BUILD_SCRIPT = ROOT / "scripts" / "build-test-guest.sh"
EVENTLOG = ROOT / "tests" / "data" / "eventlogs" / "seabios-direct.bin"
EVENTLOG_PCRS = ROOT / "tests" / "data" / "eventlogs" / "seabios-direct.pcrs.json"
BUSYBOX = Path("/bin/busybox")
AGENTS = ("python", "shell")
AGENT_NAMES = {"python": "tvorch-guest-agent/1", "shell": "tvorch-test-guest-agent/1"}
AK_HANDLE = 0x81010002
TIMEOUT = 30.0


def _require_tools() -> None:
    require(shutil.which("tpm2_quote") is not None, "tpm2-tools (Debian package tpm2-tools)")


def shell_agent_source() -> str:
    """The test guest's agent, as build-test-guest.sh writes it into the initramfs."""
    match = re.search(r"<<'GUEST_AGENT'\n(.*?\n)GUEST_AGENT\n", BUILD_SCRIPT.read_text(), re.S)
    assert match, f"no GUEST_AGENT here-document in {BUILD_SCRIPT}"
    return match.group(1)


def busybox_bin(directory: Path) -> Path:
    """A directory of busybox applet links, to put first on PATH (the guest has nothing else)."""
    require(BUSYBOX.is_file(), "busybox (Debian package busybox-static)")
    directory.mkdir(exist_ok=True)
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        (directory / applet).symlink_to(BUSYBOX)
    return directory


class PtyBridge:
    """A unix socket whose one client at a time is joined to a pty's master (QEMU's chardev, in small)."""

    def __init__(self, master: int, path: Path) -> None:
        self.master = master
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pty-bridge", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if ready:
                conn, _ = self._listener.accept()
                with conn:
                    self._pump(conn)

    def _pump(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([conn.fileno(), self.master], [], [], 0.05)
            if conn.fileno() in ready:
                data = conn.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(self.master, view):]
            if self.master in ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the pty went away
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


@dataclass
class Agent:
    kind: str
    proc: subprocess.Popen[bytes]
    socket_path: Path
    stderr_path: Path
    master: int  # the pty's master: the host end

    def channel(self, timeout: float = TIMEOUT) -> GuestChannel:
        return GuestChannel(self.socket_path, timeout)

    def raw(self, line: bytes) -> Response:
        """Send LINE as it is and parse the one line that comes back."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(self.socket_path))
            sock.sendall(line)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, f"the agent sent no answer to {line!r}"
                answer += chunk
        assert answer.count(b"\n") == 1, f"one answer line expected, got {answer!r}"
        return parse_response(answer)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _pty(tmp: Path, name: str) -> tuple[int, int, Path]:
    """A raw pty, and a symlink to its slave (what the agents get as their port)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp / name
    link.symlink_to(os.ttyname(slave))
    return master, slave, link


def _agent_command(kind: str, port: Path, work: Path, eventlog: Path, ima: Path,
                   extra: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if kind == "python":
        # -I -S: no site-packages, nothing from the environment: the standard library only.
        return [sys.executable, "-I", "-S", str(PY_AGENT), "--port", str(port), "--workdir", str(work),
                "--eventlog", str(eventlog), "--ima-log", str(ima), *extra], env
    script = work.parent / "tvorch-agent"
    script.write_text(shell_agent_source())
    env.update(PATH=f"{busybox_bin(work.parent / 'bin')}:{env.get('PATH', '/usr/bin:/bin')}",
               TVORCH_AGENT_DIR=str(work), TVORCH_AGENT_EVENTLOG=str(eventlog), TVORCH_AGENT_IMA=str(ima))
    return [str(BUSYBOX), "sh", str(script), str(port)], env


@contextmanager
def running_agent(kind: str, tmp: Path, tcti: str, *, eventlog: Path | None = None, ima: Path | None = None,
                  extra: Sequence[str] = ()) -> Iterator[Agent]:
    _require_tools()
    tmp.mkdir(parents=True, exist_ok=True)
    master, slave, port = _pty(tmp, "port")
    bridge = PtyBridge(master, tmp / "chan.sock")
    cmd, env = _agent_command(kind, port, tmp / "work", eventlog or tmp / "no-eventlog", ima or tmp / "no-ima", extra)
    env["TPM2TOOLS_TCTI"] = tcti
    stderr_path = tmp / "agent.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    try:
        yield Agent(kind, proc, tmp / "chan.sock", stderr_path, master)
    finally:
        port.unlink(missing_ok=True)
        _stop(proc)
        bridge.close()
        os.close(master)
        os.close(slave)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the agent and whatever it runs (its own session: the shell's tools and sleeps)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a tool or sleep the shell left behind
    except ProcessLookupError:
        pass


def _extend_from_log(tcti: str, raw_log: bytes) -> None:
    """Extend the swtpm's sha256 PCRs with the log's events: a TPM this log describes."""
    with open_tpm(tcti) as tpm:
        for event in parse_event_log(raw_log).events:
            if event.event_type != EV_NO_ACTION and "sha256" in event.digests:
                tpm.extend(event.pcr, {"sha256": bytes.fromhex(event.digests["sha256"])})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hello(agent: Agent) -> tuple[bytes, bytes, bytes]:
    with agent.channel() as channel:
        answer = channel.call("hello")
    assert answer.text("agent") == AGENT_NAMES[agent.kind]
    return answer.data("ek_public"), answer.data("ak_public"), answer.hex("ak_name")


# --- the whole exchange ------------------------------------------------------------------
@pytest.mark.parametrize("kind", AGENTS)
def test_hello_activate_quote_as_tvorch_checks_them(kind: str, tmp_path: Path) -> None:
    raw_log = EVENTLOG.read_bytes()
    ima = tmp_path / "ima.bin"
    ima.write_bytes(b"\x0a\x00\x00\x00 stand-in for binary_runtime_measurements")
    with running_swtpm(tmp_path / "tpm") as tcti:
        _extend_from_log(tcti, raw_log)
        with running_agent(kind, tmp_path / "agent", tcti, eventlog=EVENTLOG, ima=ima) as agent:
            with agent.channel() as channel:
                hello = channel.call("hello")
                assert hello.text("agent") == AGENT_NAMES[kind]
                ek_public, ak_public = hello.data("ek_public"), hello.data("ak_public")
                check_ak_public(ak_public)  # restricted, fixedTPM, ... signing key
                assert hello.hex("ak_name") == ak_name(ak_public)

                # Credential activation: only the TPM with this EK and this AK returns the secret.
                secret = secrets.token_bytes(32)
                id_object, encrypted_secret = make_credential(ek_public, hello.hex("ak_name"), secret)
                activated = channel.call("activate", id_object=_b64(id_object),
                                         encrypted_secret=_b64(encrypted_secret))
                assert activated.data("secret") == secret

                nonce = secrets.token_bytes(20)
                quoted = channel.call("quote", nonce=nonce.hex(),
                                      pcrs=agent_protocol.pcr_list("sha256", tuple(range(10))))
                bank, values = agent_protocol.parse_pcr_values(quoted.text("pcrs"))
                info = verify_quote(quoted.data("attest"), quoted.data("signature"), ak_public, nonce, values, bank)
                assert info.pcr_selection == tuple(range(10))
                log = quoted.b64("eventlog", optional=True)
                assert log == raw_log
                assert quoted.b64("ima", optional=True) == ima.read_bytes()
                # The log replays to the quoted values, which are the guest's that made the log.
                replayed = replay(parse_event_log(log), "sha256", range(10))
                assert {i: v.hex() for i, v in values.items()} == replayed
                assert replayed == {int(i): v for i, v in json.loads(EVENTLOG_PCRS.read_text())["sha256"].items()}

                # A second nonce, a PCR set in another order, and no IMA list: "-".
                ima.unlink()
                nonce = secrets.token_bytes(32)
                quoted = channel.call("quote", nonce=nonce.hex(), pcrs="sha256:16,7,0")
                bank, values = agent_protocol.parse_pcr_values(quoted.text("pcrs"))
                assert sorted(values) == [0, 7, 16] and bank == "sha256"
                verify_quote(quoted.data("attest"), quoted.data("signature"), ak_public, nonce, values, bank)
                assert quoted.b64("ima", optional=True) is None

                # The AK is the same key at the next hello: kept in the TPM, not made again.
                again = channel.call("hello")
                assert again.data("ak_public") == ak_public and again.data("ek_public") == ek_public
            assert "Traceback" not in agent.stderr()


@pytest.mark.parametrize("kind", AGENTS)
def test_ak_is_persistent_and_outlives_the_agent(kind: str, tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tcti:
        with running_agent(kind, tmp_path / "first", tcti) as agent:
            ek_public, ak_public, name = _hello(agent)
        handles = subprocess.run(["tpm2_getcap", "handles-persistent"], env=dict(os.environ, TPM2TOOLS_TCTI=tcti),
                                 capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        assert f"- 0x{AK_HANDLE:x}" in handles.splitlines()
        with running_agent(kind, tmp_path / "second", tcti) as agent:
            # A new agent activates a credential before any hello: it makes the EK's context itself.
            secret = secrets.token_bytes(32)
            id_object, encrypted_secret = make_credential(ek_public, name, secret)
            with agent.channel() as channel:
                answer = channel.call("activate", id_object=_b64(id_object), encrypted_secret=_b64(encrypted_secret))
            assert answer.data("secret") == secret
            assert _hello(agent) == (ek_public, ak_public, name)


@pytest.mark.parametrize("kind", AGENTS)
def test_a_credential_for_another_key_is_refused(kind: str, tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tcti, running_agent(kind, tmp_path / "agent", tcti) as agent:
        ek_public, _, name = _hello(agent)
        other_name = name[:2] + hashlib.sha256(b"some other key").digest()
        id_object, encrypted_secret = make_credential(ek_public, other_name, b"s" * 32)
        with agent.channel() as channel:
            with pytest.raises(GuestAgentError, match="activatecredential"):
                channel.call("activate", id_object=_b64(id_object), encrypted_secret=_b64(encrypted_secret))
            # ... and the agent goes on.
            assert channel.call("hello").data("ak_public")


# --- what is not a request ---------------------------------------------------------------
def _blob(size: int) -> str:
    return _b64(size.to_bytes(2, "big") + b"\x01" * size)


BAD_REQUESTS = [
    # (line, the id the answer carries, words of the error)
    (b"tvorch-attest/2 r1 hello\n", "r1", "unsupported protocol"),
    (b"TVORCH-ATTEST/1 r2 hello\n", "r2", "unsupported protocol"),
    (b"tvorch-attest/1 r3 reboot\n", "r3", "unknown operation"),
    (b"tvorch-attest/1 r4\n", "r4", "request is not"),
    (b"tvorch-attest/1 bad-id! hello\n", "0", "request is not"),
    (b"hello\n", "0", "unsupported protocol"),
    (b"tvorch-attest/1 r5 hello \xff\xfe\n", "r5", ""),
    (b"tvorch-attest/1 r6 hello novalue\n", "r6", "malformed field"),
    (b"tvorch-attest/1 r7 hello k=v k=w\n", "r7", "given twice"),
    (b"tvorch-attest/1 r8 activate\n", "r8", "needs id_object"),
    (b"tvorch-attest/1 r9 activate id_object=" + _blob(4).encode() + b"\n", "r9", "needs encrypted_secret"),
    (b"tvorch-attest/1 r10 activate id_object=@@@@ encrypted_secret=AAAA\n", "r10", "malformed field"),
    (b"tvorch-attest/1 r11 activate id_object=AAA encrypted_secret=AAAA\n", "r11", "not base64"),
    (b"tvorch-attest/1 r12 activate id_object=A=AA encrypted_secret=AAAA\n", "r12", "not base64"),
    (b"tvorch-attest/1 r13 activate id_object=AAAA encrypted_secret=" + _blob(4).encode() + b"\n", "r13",
     "not a marshaled TPM2B"),
    (b"tvorch-attest/1 r14 activate id_object=" + _blob(8).encode() + b" encrypted_secret=" + _blob(8).encode()
     + b"\n", "r14", "activatecredential"),
    (b"tvorch-attest/1 r15 quote pcrs=sha256:0\n", "r15", "nonce"),
    (b"tvorch-attest/1 r16 quote nonce=ABCD pcrs=sha256:0\n", "r16", "nonce"),
    (b"tvorch-attest/1 r17 quote nonce=abc pcrs=sha256:0\n", "r17", "nonce"),
    (b"tvorch-attest/1 r18 quote nonce=" + b"00" * 65 + b" pcrs=sha256:0\n", "r18", "nonce"),
    (b"tvorch-attest/1 r19 quote nonce=00\n", "r19", "pcrs"),
    (b"tvorch-attest/1 r20 quote nonce=00 pcrs=md5:0\n", "r20", "pcrs is not"),
    (b"tvorch-attest/1 r21 quote nonce=00 pcrs=sha256:\n", "r21", "pcrs is not"),
    (b"tvorch-attest/1 r22 quote nonce=00 pcrs=sha256\n", "r22", "pcrs is not"),
    (b"tvorch-attest/1 r23 quote nonce=00 pcrs=sha256:0,,1\n", "r23", "pcrs is not"),
    (b"tvorch-attest/1 r24 quote nonce=00 pcrs=sha256:24\n", "r24", "outside 0-23"),
    (b"tvorch-attest/1 r25 quote nonce=00 pcrs=sha256:1,1\n", "r25", "twice"),
    (b"tvorch-attest/1 r26 quote nonce=00 pcrs=sha256:x\n", "r26", ""),
]


@pytest.mark.parametrize("kind", AGENTS)
def test_bad_requests_get_an_error_answer_and_the_agent_goes_on(kind: str, tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tcti, running_agent(kind, tmp_path / "agent", tcti) as agent:
        _hello(agent)  # an AK exists: the requests below fail for what they are, not for its lack
        for line, request_id, words in BAD_REQUESTS:
            answer = agent.raw(line)
            assert not answer.ok, f"{line!r} was answered ok"
            assert answer.request_id == request_id, line
            assert words in (answer.error or ""), f"{line!r}: {answer.error!r}"
        # A blank line has no id to answer to; the next request is answered as usual.
        with agent.channel() as channel:
            assert channel.call("hello").data("ak_public")
        assert agent.raw(b"\r\n \ntvorch-attest/1 r99 hello\r\n").request_id == "r99"
        assert agent.proc.poll() is None
        assert "Traceback" not in agent.stderr()


@pytest.mark.parametrize("kind", AGENTS)
def test_without_a_tpm_every_request_gets_a_one_line_error(kind: str, tmp_path: Path) -> None:
    # A TCTI to a port nothing listens on: every tool fails at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with running_agent(kind, tmp_path / "agent", f"swtpm:host=127.0.0.1,port={port}") as agent:
        for _ in range(2):
            answer = agent.raw(b"tvorch-attest/1 n1 hello\n")
            assert not answer.ok and answer.request_id == "n1"
            assert answer.error and answer.error.startswith("createek: "), answer.error
        assert agent.proc.poll() is None
        assert "Traceback" not in agent.stderr()


# --- the Python agent's own options and its port handling ---------------------------------
def test_python_agent_once_answers_one_request_and_exits(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tcti, \
            running_agent("python", tmp_path / "agent", tcti, extra=["--once"]) as agent:
        answer = agent.raw(b"tvorch-attest/1 o1 quote nonce=zz pcrs=sha256:0\n")
        assert not answer.ok and answer.request_id == "o1"
        assert agent.proc.wait(timeout=TIMEOUT) == 0


def test_python_agent_reopens_its_port_when_the_host_end_goes(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "tpm") as tcti, running_agent("python", tmp_path / "agent", tcti) as agent:
        _, ak_public, _ = _hello(agent)
        # The host end goes away (the pty's master closes: the agent reads EIO where a virtio
        # port reads end of file), then comes back as another pty at the same path.
        master, slave, new_link = _pty(tmp_path, "port2")
        bridge = PtyBridge(master, tmp_path / "chan2.sock")
        try:
            os.replace(new_link, tmp_path / "agent" / "port")
            with open(os.devnull, "rb") as null:
                os.dup2(null.fileno(), agent.master)  # closes the master; running_agent closes the fd later
            second = Agent("python", agent.proc, tmp_path / "chan2.sock", agent.stderr_path, master)
            with second.channel() as channel:
                assert channel.call("hello").data("ak_public") == ak_public
            assert "host not connected" in agent.stderr()
        finally:
            (tmp_path / "agent" / "port").unlink(missing_ok=True)
            bridge.close()
            os.close(master)
            os.close(slave)


def test_python_agent_is_stdlib_only_and_documents_its_options() -> None:
    out = subprocess.run([sys.executable, "-I", "-S", str(PY_AGENT), "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="400"), timeout=TIMEOUT, check=True).stdout
    for option in ("--port", "--once", "--eventlog", "--ima-log", "/dev/virtio-ports/org.tvorch.attest.0"):
        assert option in out
