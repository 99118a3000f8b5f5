"""The host TPM adapter against a real swtpm, and quote interop with tpm2-tools both ways."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.components import require
from tests.tpm_fixtures import running_swtpm, swtpm_host_fixture  # noqa: F401
from tvorch.adapters.tpm import AK_PRIV, AK_PUB, HOST_DIR, ak_info, open_tpm, read_ak
from tvorch.core.attestation.quote import verify_quote
from tvorch.errors import ExitCode, InputError, TpmError, TrustError

NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_create_ak_is_idempotent_and_keeps_the_blobs_private(swtpm_host: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with open_tpm(swtpm_host) as tpm:
        first = tpm.create_ak(state)
        assert tpm.create_ak(state) == first
    with open_tpm(swtpm_host) as tpm:  # a new session re-derives the EK and loads the same AK
        assert tpm.create_ak(state) == first
    assert read_ak(state) == first
    assert first.fingerprint.startswith("sha256:") and first.name.startswith(b"\x00\x0b")
    assert first.pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "private" not in repr(first)
    host = state / HOST_DIR
    assert stat.S_IMODE(host.stat().st_mode) == 0o700
    for name in (AK_PUB, AK_PRIV):
        assert stat.S_IMODE((host / name).stat().st_mode) == 0o600
    assert (host / AK_PUB).read_bytes() == first.public


def test_an_ak_of_another_tpm_does_not_load(swtpm_host: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with open_tpm(swtpm_host) as tpm:
        tpm.create_ak(state)
    with running_swtpm(tmp_path / "other-tpm") as other, open_tpm(other) as tpm:
        with pytest.raises(TpmError, match="made on another TPM") as err:
            tpm.create_ak(state)
    assert err.value.rc == 0x1DF and err.value.exit_code == ExitCode.TPM  # TPM_RC_INTEGRITY, parameter 1
    assert read_ak(tmp_path / "nothing-here") is None


def test_read_and_extend_pcrs(swtpm_host: str) -> None:
    with open_tpm(swtpm_host) as tpm:
        before = tpm.read_pcrs(range(24))  # more than the 8 one PCR_Read returns
        assert sorted(before) == list(range(24))
        assert before[0] == bytes(32) and before[17] == b"\xff" * 32  # locality PCRs start at all ones
        event = sha256(b"grub")
        tpm.extend(9, {"sha256": event, "sha1": hashlib.sha1(b"grub").digest()})
        assert tpm.read_pcrs([9]) == {9: sha256(bytes(32) + event)}
        assert tpm.read_pcrs([9], "sha1") == {9: hashlib.sha1(bytes(20) + hashlib.sha1(b"grub").digest()).digest()}
        with pytest.raises(InputError, match="32 bytes"):
            tpm.extend(9, {"sha256": b"short"})
        with pytest.raises(InputError, match="out of range"):
            tpm.read_pcrs([24])
        with pytest.raises(InputError, match="no PCRs"):
            tpm.read_pcrs([])


def test_quote_verifies_and_follows_extends(swtpm_host: str, tmp_path: Path) -> None:
    pcrs = [0, 7, 9, 10]
    with open_tpm(swtpm_host) as tpm:
        ak = tpm.create_ak(tmp_path)
        first = tpm.quote(ak, NONCE, pcrs)
        verify_quote(first.attest, first.signature, ak.public, NONCE, first.pcr_values, "sha256")
        tpm.extend(9, {"sha256": sha256(b"kernel")})
        second = tpm.quote(ak, NONCE, pcrs)
    assert second.pcr_values[9] == sha256(bytes(32) + sha256(b"kernel")) != first.pcr_values[9]
    info = verify_quote(second.attest, second.signature, ak.public, NONCE, second.pcr_values, "sha256")
    assert info.pcr_selection == tuple(pcrs)
    with pytest.raises(TrustError, match="PCR digest"):
        verify_quote(second.attest, second.signature, ak.public, NONCE, first.pcr_values, "sha256")


def test_quoting_leaves_no_objects_in_the_tpm(swtpm_host: str, tmp_path: Path) -> None:
    """Without a resource manager a leaked object fills one of swtpm's three slots for good."""
    with open_tpm(swtpm_host) as tpm:
        ak = tpm.create_ak(tmp_path)
        for _ in range(5):
            tpm.quote(ak, NONCE, [0])


def test_a_tpm_that_is_not_there_is_a_tpm_error() -> None:
    with pytest.raises(TpmError, match="cannot open the TPM") as err:
        with open_tpm("swtpm:host=127.0.0.1,port=1"):
            pass
    assert err.value.rc


# --- interop with tpm2-tools ---------------------------------------------------


@pytest.fixture
def tools(swtpm_host: str, tmp_path: Path):
    """Run a tpm2-tools command against the test swtpm in tmp_path, flushing what it leaves loaded."""
    require(shutil.which("tpm2_checkquote") is not None, "tpm2-tools")
    env = {**os.environ, "TPM2TOOLS_TCTI": swtpm_host}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed: {result.stderr}")
        if args[0] != "tpm2_checkquote":  # swtpm has no resource manager
            subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)
        return result

    return run


def test_tpm2_checkquote_accepts_a_tvorch_quote(swtpm_host: str, tmp_path: Path, tools) -> None:
    pcrs = [0, 1, 9, 16]
    with open_tpm(swtpm_host) as tpm:
        ak = tpm.create_ak(tmp_path / "state")
        tpm.extend(16, {"sha256": sha256(b"interop")})
        quote = tpm.quote(ak, NONCE, pcrs)
    (tmp_path / "ak.pem").write_bytes(ak.pem)
    (tmp_path / "attest.bin").write_bytes(quote.attest)
    (tmp_path / "sig.bin").write_bytes(quote.signature)
    (tmp_path / "pcrs.bin").write_bytes(b"".join(quote.pcr_values[i] for i in pcrs))
    check = ["tpm2_checkquote", "-u", "ak.pem", "-m", "attest.bin", "-s", "sig.bin",
             "-f", "pcrs.bin", "-l", "sha256:0,1,9,16", "-g", "sha256"]
    tools(*check, "-q", NONCE.hex())
    assert tools(*check, "-q", "ff" * 16, check=False).returncode != 0
    # tpm2-tools also reads the AK in TPM2B_PUBLIC form, as tvorch keeps it.
    tools(*check[:2], str(tmp_path / "state" / HOST_DIR / AK_PUB), *check[3:], "-q", NONCE.hex())


@pytest.mark.parametrize(("key_alg", "scheme"), [("ecc", "ecdsa"), ("rsa", "rsassa")])
def test_tvorch_accepts_a_tpm2_quote_made_with_tpm2_createak(
    swtpm_host: str, tmp_path: Path, tools, key_alg: str, scheme: str
) -> None:
    tools("tpm2_createek", "-c", "ek.ctx", "-G", key_alg, "-u", "ek.pub")
    tools("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", key_alg, "-g", "sha256", "-s", scheme,
          "-u", "ak.pub", "-r", "ak.priv", "-n", "ak.name")
    tools("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,7,10", "-q", NONCE.hex(), "-g", "sha256",
          "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-F", "values")
    raw = (tmp_path / "quote.pcrs").read_bytes()
    values = {pcr: raw[32 * k: 32 * (k + 1)] for k, pcr in enumerate([0, 7, 10])}
    ak_public = (tmp_path / "ak.pub").read_bytes()
    attest, signature = (tmp_path / "quote.msg").read_bytes(), (tmp_path / "quote.sig").read_bytes()
    info = verify_quote(attest, signature, ak_public, NONCE, values, "sha256")
    assert info.pcr_selection == (0, 7, 10)
    assert ak_info(ak_public, b"").name == (tmp_path / "ak.name").read_bytes()
    with pytest.raises(TrustError, match="nonce"):
        verify_quote(attest, signature, ak_public, b"other", values, "sha256")


def test_tvorch_quotes_with_an_ak_made_by_tpm2_createak(swtpm_host: str, tmp_path: Path, tools) -> None:
    """Same EK template, same blob formats: tpm2_createak's ak.pub/ak.priv load under tvorch's EK."""
    tools("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
    tools("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
          "-u", "ak.pub", "-r", "ak.priv")
    ak = ak_info((tmp_path / "ak.pub").read_bytes(), (tmp_path / "ak.priv").read_bytes())
    with open_tpm(swtpm_host) as tpm:
        quote = tpm.quote(ak, NONCE, [0, 1])
    verify_quote(quote.attest, quote.signature, ak.public, NONCE, quote.pcr_values, "sha256")
