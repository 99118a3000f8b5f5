"""vTPM manufacturing with the real swtpm_setup and swtpm: the EK certificates
the node CA issued are the ones in the TPM's NV, for the TPM's own EK, and
the NV is locked so nobody replaces them later."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.components import require
from tests.tpm_fixtures import running_swtpm
from tvorch.adapters import swtpm_certs, vtpm_manufacture
from tvorch.adapters.node_keys import load_or_create
from tvorch.adapters.vtpm_manufacture import (
    ECC_EK_FILE,
    RSA_EK_FILE,
    ManufacturedVtpm,
    VtpmManufactureError,
    manufacture,
)
from tvorch.core.ekcert import EK_CERTIFICATE, ek_fingerprint, verify_ek_certificate
from tvorch.core.signing import verify_chain
from tvorch.errors import ConflictError, TrustError

RSA_EK_CERT_INDEX = "0x01c00002"
ECC_EK_CERT_INDEX = "0x01c00016"  # NIST P-384 (TCG EK profile's high range); 0x01c0000a is P-256
RSA_EK_HANDLE = "0x81010001"  # swtpm_setup makes both EKs persistent
ECC_EK_HANDLE = "0x81010016"


@dataclass(frozen=True)
class Made:
    state: Path
    node_state: Path
    vtpm: ManufacturedVtpm


def _require_tools() -> None:
    for tool in ("swtpm", "swtpm_setup", "tpm2_nvread", "tpm2_nvwrite", "tpm2_nvreadpublic", "tpm2_readpublic"):
        require(shutil.which(tool) is not None, f"{tool} (Debian packages swtpm, swtpm-tools, tpm2-tools)")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    _require_tools()
    base = tmp_path_factory.mktemp("vtpm")
    state = base / "vm" / "tpm2"
    node_state = base / "node"
    return Made(state, node_state, manufacture(state, node_state, "tvtest-vm"))


@pytest.fixture(scope="module")
def tpm(made: Made) -> Iterator[dict[str, str]]:
    """A swtpm on the manufactured state; the environment tpm2-tools need to reach it."""
    with running_swtpm(made.state) as tcti:
        yield {**os.environ, "TPM2TOOLS_TCTI": tcti}


def _tpm2(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, env=env, capture_output=True, timeout=10, check=False)


def test_ek_certificates_chain_to_the_node_ca(made: Made) -> None:
    ca_cert = load_or_create(made.node_state, "ignored").ca_cert
    now = datetime.now(timezone.utc)
    assert set(made.vtpm.ek_certs) == {RSA_EK_FILE, ECC_EK_FILE}
    for der in made.vtpm.ek_certs.values():
        cert = x509.load_der_x509_certificate(der)
        verify_ek_certificate(cert, ca_cert, now)
        cert.verify_directly_issued_by(ca_cert)
        assert EK_CERTIFICATE in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        # An EK decrypts: it has no digitalSignature, so the signing-chain check refuses it by design.
        with pytest.raises(TrustError, match="digitalSignature"):
            verify_chain(cert, ca_cert, now, purpose=EK_CERTIFICATE)
    rsa_cert = made.vtpm.ek_cert()
    assert isinstance(rsa_cert.public_key(), rsa.RSAPublicKey)
    assert made.vtpm.ek_cert_der == made.vtpm.ek_certs[RSA_EK_FILE]
    ecc_key = x509.load_der_x509_certificate(made.vtpm.ek_certs[ECC_EK_FILE]).public_key()
    assert isinstance(ecc_key, ec.EllipticCurvePublicKey)


def test_state_is_private_and_handed_to_tss(made: Made) -> None:
    st = made.state.stat()
    assert st.st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        try:
            tss = pwd.getpwnam("tss")
        except KeyError:
            return
        assert (st.st_uid, st.st_gid) == (tss.pw_uid, tss.pw_gid)
        assert all(p.stat().st_uid == tss.pw_uid for p in made.state.iterdir())


@pytest.mark.parametrize(("index", "name"), [(RSA_EK_CERT_INDEX, RSA_EK_FILE), (ECC_EK_CERT_INDEX, ECC_EK_FILE)])
def test_nv_holds_the_returned_certificates(made: Made, tpm: dict[str, str], tmp_path: Path, index: str,
                                            name: str) -> None:
    out = tmp_path / "nv.der"
    done = _tpm2(tpm, "tpm2_nvread", "-C", "o", "-o", str(out), index)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert out.read_bytes() == made.vtpm.ek_certs[name]


def _tpm_public(env: dict[str, str], handle: str, out: Path) -> bytes:
    done = _tpm2(env, "tpm2_readpublic", "-c", handle, "-f", "pem", "-o", str(out))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return serialization.load_pem_public_key(out.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_public(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_certificates_are_for_the_tpms_own_eks(made: Made, tpm: dict[str, str], tmp_path: Path) -> None:
    rsa_ek = _tpm_public(tpm, RSA_EK_HANDLE, tmp_path / "rsa.pem")
    assert rsa_ek == _cert_public(made.vtpm.ek_cert_der)
    assert _tpm_public(tpm, ECC_EK_HANDLE, tmp_path / "ecc.pem") == _cert_public(made.vtpm.ek_certs[ECC_EK_FILE])
    tpm_key = serialization.load_der_public_key(rsa_ek)
    assert isinstance(tpm_key, rsa.RSAPublicKey)
    assert ek_fingerprint(tpm_key) == made.vtpm.ek_fingerprint
    assert serialization.load_pem_public_key(made.vtpm.ek_public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == rsa_ek


def test_nv_is_locked(made: Made, tpm: dict[str, str], tmp_path: Path) -> None:
    forged = tmp_path / "forged.der"
    forged.write_bytes(b"\x30\x03\x02\x01\x00")
    attributes = _tpm2(tpm, "tpm2_nvreadpublic", RSA_EK_CERT_INDEX)
    assert b"writelocked" in attributes.stdout, attributes.stdout
    # The cert indices are written with platform authorization (ppwrite), which a
    # swtpm started with startup-clear grants with an empty password: only the lock stops it.
    done = _tpm2(tpm, "tpm2_nvwrite", "-C", "p", "-i", str(forged), RSA_EK_CERT_INDEX)
    assert done.returncode != 0
    assert b"0x148" in done.stderr, done.stderr  # TPM_RC_NV_LOCKED


def test_existing_state_is_never_overwritten(made: Made) -> None:
    before = {p.name: p.read_bytes() for p in made.state.iterdir()}
    with pytest.raises(ConflictError, match="not empty"):
        manufacture(made.state, made.node_state, "tvtest-vm")
    assert {p.name: p.read_bytes() for p in made.state.iterdir()} == before


def test_certs_tool_refuses_what_it_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"{swtpm_certs.NODE_STATE_DIR_KEY} = {tmp_path / 'node'}\n")
    base = ["--dir", str(tmp_path), "--configfile", str(conf), "--tpm2"]
    assert swtpm_certs.main(["--type", "platform", "--ek", "ab", *base]) == 1
    assert "not supported" in capsys.readouterr().err
    assert swtpm_certs.main(["--type", "ek", "--ek", "x=zz,y=1", *base]) == 1
    assert "malformed --ek" in capsys.readouterr().err
    assert swtpm_certs.main(["--type", "ek"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad arguments" in err
    assert not (tmp_path / swtpm_certs.EK_CERT_FILE).exists()


def test_certs_tool_failure_is_reported_and_cleaned_up(made: Made, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_configs = vtpm_manufacture._write_configs

    def without_node_dir(work: Path, node_state_dir: Path) -> Path:
        conf = write_configs(work, node_state_dir)
        (work / "swtpm-certs.conf").write_text("unrelated = 1\n")
        return conf

    monkeypatch.setattr(vtpm_manufacture, "_write_configs", without_node_dir)
    state = tmp_path / "vm" / "tpm2"
    with pytest.raises(VtpmManufactureError, match="names no node_state_dir"):
        manufacture(state, made.node_state, "tvtest-vm")
    assert not state.exists()  # a retry starts clean


def test_cli_manufacture_prints_the_fingerprint_and_certificates(made: Made, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tvorch.cli import main

    config = tmp_path / "tvorch.toml"
    config.write_text(f'state_dir = "{made.node_state}"\n')
    state = tmp_path / "cli" / "tpm2"
    assert main(["--config", str(config), "vtpm", "manufacture", str(state), "--vmid", "tvtest-cli", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cert = x509.load_pem_x509_certificate(doc["ek_certificates_pem"][RSA_EK_FILE].encode())
    verify_ek_certificate(cert, load_or_create(made.node_state, "ignored").ca_cert, datetime.now(timezone.utc))
    assert doc["ek_fingerprint"] == ek_fingerprint(cert.public_key())  # type: ignore[arg-type]
    assert main(["--config", str(config), "vtpm", "manufacture", str(state), "--vmid", "tvtest-cli"]) == 6
    assert "never overwritten" in capsys.readouterr().err
