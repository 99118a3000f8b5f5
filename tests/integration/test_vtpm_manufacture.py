"""vTPM manufacturing with the real swtpm_setup and swtpm: the EK certificates
and the platform certificate the node CA issued are the ones in the TPM's NV,
for the TPM's own EK, and the NV is locked so nobody replaces them later."""

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
from tvorch.core.vtpm.ekcert import EK_CERTIFICATE, ek_fingerprint, issue_ek_certificate, verify_ek_certificate
from tvorch.core.vtpm.platformcert import Platform, parse_platform_certificate, verify_platform_certificate
from tvorch.core.signing import verify_chain
from tvorch.errors import ConflictError, TrustError

RSA_EK_CERT_INDEX = "0x01c00002"
ECC_EK_CERT_INDEX = "0x01c00016"  # NIST P-384 (TCG EK profile's high range); 0x01c0000a is P-256
PLATFORM_CERT_INDEX = "0x01c08000"  # TCG: the first platform certificate index
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
    assert swtpm_certs.main(["--type", "attestation", "--ek", "ab", *base]) == 1
    assert "'attestation' is not supported" in capsys.readouterr().err
    assert swtpm_certs.main(["--type", "ek", "--ek", "x=zz,y=1", *base]) == 1
    assert "malformed --ek" in capsys.readouterr().err
    assert swtpm_certs.main(["--type", "platform", "--ek", "ab", *base[:-1]]) == 1
    assert "only TPM 2 platform certificates" in capsys.readouterr().err
    assert swtpm_certs.main(["--type", "ek"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad arguments" in err
    assert not (tmp_path / swtpm_certs.EK_CERT_FILE).exists()


# --- the platform certificate --------------------------------------------------------------------


def test_platform_certificate_is_in_nv_and_checks(made: Made, tpm: dict[str, str], tmp_path: Path) -> None:
    assert made.vtpm.platform_cert_der is not None
    platform_nv, ek_nv = tmp_path / "platform.der", tmp_path / "ek.der"
    for index, out in ((PLATFORM_CERT_INDEX, platform_nv), (RSA_EK_CERT_INDEX, ek_nv)):
        done = _tpm2(tpm, "tpm2_nvread", "-C", "o", "-o", str(out), index)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert platform_nv.read_bytes() == made.vtpm.platform_cert_der
    # Checked against what the TPM holds, not against what manufacture returned.
    ca_cert = load_or_create(made.node_state, "ignored").ca_cert
    ek_cert = x509.load_der_x509_certificate(ek_nv.read_bytes())
    verify_platform_certificate(platform_nv.read_bytes(), ca_cert, ek_cert, datetime.now(timezone.utc))
    cert = parse_platform_certificate(platform_nv.read_bytes())
    assert (cert.holder_serial, cert.holder_issuer) == (ek_cert.serial_number, ca_cert.subject.public_bytes())
    assert cert.platform == Platform("tvorch", "tvorch-vm", swtpm_certs.tvorch_version(), "tvtest-vm")
    # The ECC EK's certificate is not its holder.
    ecc_cert = x509.load_der_x509_certificate(made.vtpm.ek_certs[ECC_EK_FILE])
    with pytest.raises(TrustError, match="is for the EK certificate with serial"):
        verify_platform_certificate(made.vtpm.platform_cert_der, ca_cert, ecc_cert, datetime.now(timezone.utc))


def test_platform_certificate_nv_is_locked(tpm: dict[str, str], tmp_path: Path) -> None:
    attributes = _tpm2(tpm, "tpm2_nvreadpublic", PLATFORM_CERT_INDEX)
    assert attributes.returncode == 0, attributes.stderr.decode(errors="replace")
    assert b"writelocked" in attributes.stdout and b"platformcreate" in attributes.stdout, attributes.stdout
    forged = tmp_path / "forged.der"
    forged.write_bytes(b"\x30\x03\x02\x01\x00")
    done = _tpm2(tpm, "tpm2_nvwrite", "-C", "p", "-i", str(forged), PLATFORM_CERT_INDEX)
    assert done.returncode != 0
    assert b"0x148" in done.stderr, done.stderr  # TPM_RC_NV_LOCKED


@pytest.fixture
def tool_request(made: Made, tmp_path: Path) -> tuple[list[str], Path, Path]:
    """A --type platform request as swtpm_setup makes it, after the RSA EK's: DIR holds that EK's ek.cert."""
    identity = load_or_create(made.node_state, "ignored")
    key = rsa.generate_private_key(65537, 2048)
    cert = issue_ek_certificate(identity.ca_key, identity.ca_cert, key.public_key(), "id:00001014", "swtpm",
                                "id:20191023", None, datetime.now(timezone.utc))
    work = tmp_path / "dir"
    work.mkdir()
    (work / swtpm_certs.EK_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.DER))
    collect = tmp_path / "collect"
    collect.mkdir()
    conf = tmp_path / "c.conf"
    conf.write_text(f"{swtpm_certs.NODE_STATE_DIR_KEY} = {made.node_state}\n{swtpm_certs.COLLECT_DIR_KEY} = {collect}\n")
    opts = tmp_path / "c.options"
    opts.write_text("# platform\n--platform-manufacturer ACME Clouds\n--platform-model tvorch-vm\n"
                    "--platform-version 9.9\n")
    modulus = f"{key.public_key().public_numbers().n:x}"
    argv = ["--type", "platform", "--ek", modulus, "--dir", str(work), "--vmid", "vm-7", "--tpm-spec-family", "2.0",
            "--tpm-manufacturer", "id:00001014", "--tpm2", "--configfile", str(conf), "--optsfile", str(opts)]
    return argv, work, collect


def test_certs_tool_issues_the_platform_certificate(made: Made, tool_request: tuple[list[str], Path, Path]) -> None:
    argv, work, collect = tool_request
    assert swtpm_certs.main([*argv, "--platform-model", "override"]) == 0
    written = (work / swtpm_certs.PLATFORM_CERT_FILE).read_bytes()
    assert (collect / swtpm_certs.PLATFORM_CERT_FILE).read_bytes() == written
    ek_cert = x509.load_der_x509_certificate((work / swtpm_certs.EK_CERT_FILE).read_bytes())
    ca_cert = load_or_create(made.node_state, "ignored").ca_cert
    verify_platform_certificate(written, ca_cert, ek_cert, datetime.now(timezone.utc))
    # The optsfile's options, the command line's winning; --vmid is the platform serial.
    assert parse_platform_certificate(written).platform == Platform("ACME Clouds", "override", "9.9", "vm-7")


def test_certs_tool_platform_refusals(made: Made, tool_request: tuple[list[str], Path, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv, work, _ = tool_request
    ek_file = work / swtpm_certs.EK_CERT_FILE
    ek_der = ek_file.read_bytes()
    other = f"{rsa.generate_private_key(65537, 2048).public_key().public_numbers().n:x}"
    assert swtpm_certs.main([*argv, "--ek", other]) == 1
    assert "certifies another key than the EK in --ek" in capsys.readouterr().err
    assert swtpm_certs.main([*argv, "--platform-version", "v" * 256]) == 1
    assert "1 to 255 characters" in capsys.readouterr().err
    ek_file.write_bytes(b"junk")
    assert swtpm_certs.main(argv) == 1
    assert "is not a DER certificate" in capsys.readouterr().err
    ek_file.unlink()
    assert swtpm_certs.main(argv) == 1
    assert "cannot read" in capsys.readouterr().err
    # An EK certificate from another CA: no platform certificate from this one names it.
    stranger = load_or_create(made.node_state.parent / "stranger", "ignored")
    cert = x509.load_der_x509_certificate(ek_der)
    foreign = issue_ek_certificate(stranger.ca_key, stranger.ca_cert, cert.public_key(),  # type: ignore[arg-type]
                                   "id:00001014", "swtpm", "id:20191023", None, datetime.now(timezone.utc))
    ek_file.write_bytes(foreign.public_bytes(serialization.Encoding.DER))
    assert swtpm_certs.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EK certificate was issued by" in err
    assert not (work / swtpm_certs.PLATFORM_CERT_FILE).exists()


def test_manufacture_refuses_certificates_from_another_ca(made: Made, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write_configs = vtpm_manufacture._write_configs

    def foreign_node(work: Path, node_state_dir: Path) -> Path:  # the tool signs with another node's CA
        conf = write_configs(work, node_state_dir)
        text = (work / "swtpm-certs.conf").read_text()
        (work / "swtpm-certs.conf").write_text(text.replace(str(node_state_dir.resolve()), str(tmp_path / "other")))
        return conf

    monkeypatch.setattr(vtpm_manufacture, "_write_configs", foreign_node)
    state = tmp_path / "vm" / "tpm2"
    with pytest.raises(VtpmManufactureError, match="does not check"):
        manufacture(state, made.node_state, "tvtest-vm")
    assert not state.exists()


def test_manufacture_checks_the_platform_certificate(made: Made, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_configs = vtpm_manufacture._write_configs

    def corrupting_tool(work: Path, node_state_dir: Path) -> Path:  # the copy it leaves gets a stray byte
        conf = write_configs(work, node_state_dir)
        tool = work / "tvorch-swtpm-certs"
        copy = work / vtpm_manufacture.COLLECT_DIR / swtpm_certs.PLATFORM_CERT_FILE
        exec_line = tool.read_text().splitlines()[-1].removeprefix("exec ")
        tool.write_text(f"#!/bin/sh\n{exec_line} || exit 1\n"
                        f"case \"$*\" in *'--type platform'*) printf x >> '{copy}';; esac\n")
        return conf

    monkeypatch.setattr(vtpm_manufacture, "_write_configs", corrupting_tool)
    state = tmp_path / "vm" / "tpm2"
    with pytest.raises(VtpmManufactureError, match="platform certificate from swtpm_setup does not check: "
                                                   "platform certificate is malformed: 1 bytes after"):
        manufacture(state, made.node_state, "tvtest-vm")
    assert not state.exists()


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
