"""The tvorch-attest/1 lines, and the host end of the channel against a socket that plays the guest."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tvorch.adapters.guest_channel import GuestAgentError, GuestChannel
from tvorch.core.attestation.agent_protocol import parse_pcr_values, parse_response, pcr_list, request_line
from tvorch.errors import EvidenceError, OperationTimeout


def test_request_lines_are_one_ascii_line():
    line = request_line("ab12", "quote", nonce="00ff", pcrs="sha256:0,1,7")
    assert line == b"tvorch-attest/1 ab12 quote nonce=00ff pcrs=sha256:0,1,7\n"
    for bad in ({"nonce": "a b"}, {"nonce": "x\ny"}, {"Bad": "1"}):
        with pytest.raises(ValueError):
            request_line("ab12", "quote", **bad)
    with pytest.raises(ValueError):
        request_line("a b", "hello")
    with pytest.raises(ValueError):
        request_line("ab12", "shell")


def test_ok_and_error_answers():
    ok = parse_response(b"tvorch-attest/1 ab12 ok secret=c2VjcmV0 ak_name=000b00 ima=-\n")
    assert ok.ok and ok.request_id == "ab12"
    assert ok.data("secret") == b"secret" and ok.hex("ak_name") == b"\x00\x0b\x00"
    assert ok.b64("ima", optional=True) is None
    err = parse_response(b"tvorch-attest/1 ab12 error tpm2_quote failed: bad handle")
    assert not err.ok and err.error == "tpm2_quote failed: bad handle"


@pytest.mark.parametrize("line, words", [
    (b"HTTP/1.1 200 OK", "not tvorch-attest/1"),
    (b"tvorch-attest/1 ab12 maybe", "status"),
    (b"tvorch-attest/1 ab12 ok novalue", "malformed field"),
    (b"tvorch-attest/1 ab12 ok a=1 a=2", "malformed field"),
    (b"tvorch-attest/1 ab12 ok a=\xff", "not ASCII"),
    (b"tvorch-attest/1 ab12 ok a=<x>", "malformed field"),
])
def test_malformed_answers_are_one_line_refusals(line, words):
    with pytest.raises(EvidenceError, match=words):
        parse_response(line)


def test_missing_or_undecodable_fields():
    answer = parse_response(b"tvorch-attest/1 ab12 ok attest=abc pcrs=sha256:0=zz")
    with pytest.raises(EvidenceError, match="lacks 'signature'"):
        answer.data("signature")
    with pytest.raises(EvidenceError, match="not valid base64"):
        answer.data("attest")
    with pytest.raises(EvidenceError, match="malformed"):
        parse_pcr_values(answer.text("pcrs"))


def test_pcr_lists_round_trip():
    assert pcr_list("sha256", (7, 0, 11)) == "sha256:0,7,11"
    bank, values = parse_pcr_values("sha256:0=" + "00" * 32 + ",7=" + "ab" * 32)
    assert bank == "sha256" and values == {0: b"\0" * 32, 7: b"\xab" * 32}


def _guest(path: Path, answers) -> threading.Thread:
    """A unix socket server that reads each request and sends what ANSWERS makes of it."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            buffer = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    request_id = line.split(b" ")[1]
                    for reply in answers(request_id):
                        conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_channel_skips_stale_answers_and_reports_errors(tmp_path):
    path = tmp_path / "agent.sock"
    calls = []

    def answers(request_id: bytes):
        calls.append(request_id)
        yield b"tvorch-attest/1 0ld0ne ok secret=AAAA\n"  # an answer to an earlier request
        if len(calls) == 1:
            yield b"tvorch-attest/1 " + request_id + b" ok agent=test/1\n"
        else:
            yield b"tvorch-attest/1 " + request_id + b" error no TPM\n"

    _guest(path, answers)
    with GuestChannel(path, timeout=5) as channel:
        assert channel.call("hello").text("agent") == "test/1"
        with pytest.raises(GuestAgentError, match="refused quote: no TPM"):
            channel.call("quote", nonce="00", pcrs="sha256:0")


def test_channel_times_out_and_refuses_a_missing_socket(tmp_path):
    path = tmp_path / "silent.sock"
    _guest(path, lambda request_id: iter(()))
    with GuestChannel(path, timeout=0.3) as channel:
        with pytest.raises(OperationTimeout, match="did not answer hello within 0.3 s"):
            channel.call("hello")
    with pytest.raises(EvidenceError, match="cannot open the guest channel"):
        with GuestChannel(tmp_path / "none.sock", timeout=1):
            pass


def test_hello_is_said_again_until_the_agent_hears_it(tmp_path, monkeypatch):
    """An agent re-opening its port misses the first hello; the channel says it again."""
    import tvorch.adapters.guest_channel as guest_channel

    monkeypatch.setattr(guest_channel, "HELLO_RESEND", 0.2)
    path = tmp_path / "agent.sock"
    heard = []

    def answers(request_id: bytes):
        heard.append(request_id)
        if len(heard) >= 2:  # the first hello fell on a closed port
            yield b"tvorch-attest/1 " + request_id + b" ok agent=test/1\n"

    _guest(path, answers)
    with GuestChannel(path, timeout=5) as channel:
        assert channel.hello().text("agent") == "test/1"
    assert len(heard) == 2
    silent = tmp_path / "silent.sock"
    _guest(silent, lambda request_id: iter(()))
    with GuestChannel(silent, timeout=0.5) as channel:
        with pytest.raises(OperationTimeout, match="did not answer hello within 0.5 s"):
            channel.hello()
