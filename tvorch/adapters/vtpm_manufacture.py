"""Manufacture a vTPM state: swtpm_setup with EK and platform certificates from the node CA.

Runs ``swtpm_setup --tpm2 --createek --create-ek-cert --create-platform-cert
--lock-nvram`` with a private swtpm_setup.conf (in a 0700 temporary
directory) whose ``create_certs_tool`` is ``tvorch.adapters.swtpm_certs``;
that tool finds the node state directory in the ``create_certs_tool_config``
file written beside it, and the platform's manufacturer, model and version
in the ``create_certs_tool_options`` file. The resulting state is what
libvirt takes as is (DESIGN.md, "Environment facts").

Why no ``--runas``: swtpm_setup drops to that user before running the certs
tool, which would then need to read the node CA key, and that key must
never be readable by ``tss`` (the user every swtpm runs as). So swtpm_setup
runs as the caller (root in production) and the finished state is handed to
OWNER afterwards (chown of the directory and its files).

swtpm_setup keeps no copy of the certificates outside the TPM's NV, so
``--write-ek-cert-files`` collects the EK certificates, the tool leaves a
copy of the platform certificate (which that option does not write, in
0.7.1) in the config's ``collect_dir``, and ``manufacture`` checks them all
against the node CA and returns them for the caller to record.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.adapters.files import ensure_private_dir
from tvorch.adapters.node_keys import load_or_create
from tvorch.adapters.swtpm_certs import COLLECT_DIR_KEY, NODE_STATE_DIR_KEY, PLATFORM_CERT_FILE, tvorch_version
from tvorch.adapters.vtpm_state import hand_over
from tvorch.core.vtpm.ekcert import ek_fingerprint, verify_ek_certificate
from tvorch.core.vtpm.platformcert import DEFAULT_MANUFACTURER, DEFAULT_MODEL, verify_platform_certificate
from tvorch.errors import ConflictError, HostError, OperationTimeout, TvorchError

DEFAULT_TIMEOUT = 60.0
RSA_EK_FILE = "ek-rsa2048.crt"  # the names --write-ek-cert-files uses (swtpm 0.7)
ECC_EK_FILE = "ek-secp384r1.crt"
COLLECT_DIR = "platform"  # in the temporary directory: where the certs tool copies the platform certificate
# swtpm_setup's own framing lines, never the reason it failed.
_NOISE = ("Starting vTPM manufacturing", "Ending vTPM manufacturing", "An error occurred",
          "Error getting next filename", "Invoking ", "TPM is listening")


class VtpmManufactureError(HostError):
    """swtpm_setup could not make the vTPM state (its last meaningful line is kept); exit code HOST."""


@dataclass(frozen=True)
class ManufacturedVtpm:
    """What the caller records: the RSA EK certificate is the vTPM's identity, the ECC one its twin."""

    ek_cert_der: bytes  # RSA 2048 EK certificate, as written at NV index 0x01c00002
    ek_public_pem: bytes
    ek_fingerprint: str  # sha256 of the EK SubjectPublicKeyInfo (tvorch.core.vtpm.ekcert.ek_fingerprint)
    ek_certs: dict[str, bytes] = field(default_factory=dict)  # every EK cert by file name (RSA and ECC)
    # TCG platform certificate (an attribute certificate naming the RSA EK certificate), as written
    # at NV index 0x01c08000; None only for a vTPM made without one.
    platform_cert_der: bytes | None = None

    def ek_cert(self) -> x509.Certificate:
        """The RSA EK certificate, parsed."""
        return x509.load_der_x509_certificate(self.ek_cert_der)


def manufacture(
    state_dir: Path,
    node_state_dir: Path,
    vmid: str,
    owner: str = "tss",
    *,
    key: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ManufacturedVtpm:
    """Make a fresh TPM 2 state in STATE_DIR (created 0700, must be empty) with node-CA EK certificates.

    KEY, when given, encrypts the state (``--pwdfile-fd N --cipher
    aes-256-cbc``, read from a pipe so it never touches a disk; libvirt
    must then start swtpm with the same secret). OWNER gets the state when
    running as root and the user exists.
    """
    swtpm_setup = shutil.which("swtpm_setup")
    if swtpm_setup is None or shutil.which("swtpm") is None:
        raise HostError("swtpm_setup and swtpm are needed to make a vTPM (Debian packages swtpm, swtpm-tools)")
    identity = load_or_create(node_state_dir, socket.gethostname())  # make the CA now, not in the tool
    created = not state_dir.exists()
    ensure_private_dir(state_dir)
    if any(state_dir.iterdir()):
        raise ConflictError(f"{state_dir} is not empty; a vTPM state is never overwritten")
    os.chmod(state_dir, 0o700)  # an existing empty directory too: the state holds the vTPM's secrets
    try:
        with tempfile.TemporaryDirectory(prefix="tvorch-vtpm-") as tmp:
            work = Path(tmp)
            conf = _write_configs(work, node_state_dir)
            certs = work / "certs"
            certs.mkdir()
            command = [swtpm_setup, "--tpm2", "--tpm-state", str(state_dir.absolute()), "--createek", "--create-ek-cert",
                       "--create-platform-cert", "--lock-nvram", "--pcr-banks", "sha256", "--config", str(conf),
                       "--vmid", vmid, "--write-ek-cert-files", str(certs)]
            _run(command, timeout, key)
            found = {p.name: p.read_bytes() for p in sorted(certs.glob("ek-*.crt"))}
            platform_file = work / COLLECT_DIR / PLATFORM_CERT_FILE
            platform_der = platform_file.read_bytes() if platform_file.exists() else None
        if RSA_EK_FILE not in found:
            raise VtpmManufactureError(f"swtpm_setup wrote no {RSA_EK_FILE} (it wrote: {', '.join(found) or 'none'})")
        if platform_der is None:
            raise VtpmManufactureError("the certs tool left no copy of the platform certificate")
        now = datetime.now(timezone.utc)
        for name, der in found.items():  # the tool must have used this node's CA
            try:
                verify_ek_certificate(x509.load_der_x509_certificate(der), identity.ca_cert, now)
            except (ValueError, TvorchError) as err:
                raise VtpmManufactureError(f"EK certificate {name} from swtpm_setup does not check: {err}") from None
        try:  # by this node's CA, for the RSA EK certificate just checked
            verify_platform_certificate(platform_der, identity.ca_cert,
                                        x509.load_der_x509_certificate(found[RSA_EK_FILE]), now)
        except TvorchError as err:
            raise VtpmManufactureError(f"platform certificate from swtpm_setup does not check: {err}") from None
        hand_over(state_dir, owner)
    except BaseException:
        if created:  # leave nothing half made behind, so a retry starts clean
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    cert = x509.load_der_x509_certificate(found[RSA_EK_FILE])
    public = cert.public_key()
    if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise VtpmManufactureError(f"{RSA_EK_FILE} holds a {type(public).__name__}, not an EK")
    return ManufacturedVtpm(
        ek_cert_der=found[RSA_EK_FILE],
        ek_public_pem=public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        ek_fingerprint=ek_fingerprint(public),
        ek_certs=found,
        platform_cert_der=platform_der,
    )


def _write_configs(work: Path, node_state_dir: Path) -> Path:
    """swtpm_setup.conf, the certs tool's config and options, and a wrapper (the config takes a path only).

    The options file is the platform's identity in the platform certificate (swtpm_setup passes none).
    """
    tool = work / "tvorch-swtpm-certs"
    tool.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m tvorch.adapters.swtpm_certs \"$@\"\n")
    tool.chmod(0o700)
    tool_conf = work / "swtpm-certs.conf"
    collect = work / COLLECT_DIR
    collect.mkdir(exist_ok=True)
    tool_conf.write_text(f"{NODE_STATE_DIR_KEY} = {node_state_dir.resolve()}\n{COLLECT_DIR_KEY} = {collect}\n")
    tool_opts = work / "swtpm-certs.options"
    tool_opts.write_text(f"--platform-manufacturer {DEFAULT_MANUFACTURER}\n--platform-model {DEFAULT_MODEL}\n"
                         f"--platform-version {tvorch_version()}\n")
    conf = work / "swtpm_setup.conf"
    conf.write_text(
        f"create_certs_tool = {tool}\n"
        f"create_certs_tool_config = {tool_conf}\n"
        f"create_certs_tool_options = {tool_opts}\n"
        "active_pcr_banks = sha256\n"
    )
    return conf


def _run(command: list[str], timeout: float, key: bytes | None) -> None:
    """Run swtpm_setup; KEY goes through a pipe (`--pwdfile-fd`), small enough for the pipe's buffer."""
    read_fd = None
    if key is not None:
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, key)
        finally:
            os.close(write_fd)
        command = [*command, "--pwdfile-fd", str(read_fd), "--cipher", "aes-256-cbc"]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
                              pass_fds=() if read_fd is None else (read_fd,))
    except subprocess.TimeoutExpired:
        raise OperationTimeout(f"swtpm_setup did not finish in {timeout:g} s") from None
    except OSError as err:
        raise HostError(f"cannot run swtpm_setup: {err.strerror}") from None
    finally:
        if read_fd is not None:
            os.close(read_fd)
    if done.returncode != 0:
        raise VtpmManufactureError(
            f"swtpm_setup failed (exit {done.returncode}): {_last_meaningful(done.stderr, done.stdout)}")


def _last_meaningful(stderr: bytes, stdout: bytes) -> str:
    """The reason, from stderr first: stdout (progress) is block-buffered and comes out after it."""
    for stream in (stderr, stdout):
        lines = [line.strip() for line in stream.decode(errors="replace").splitlines() if line.strip()]
        useful = [line for line in lines if not any(noise in line for noise in _NOISE)]
        if useful:
            return useful[-1][:500]
    return "no output"


def swtpm_version(swtpm: str) -> str:
    """"0.7.1" from `swtpm --version` ("TPM emulator version 0.7.1, Copyright ..."); "unknown" if unreadable."""
    try:
        out = subprocess.run([swtpm, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    words = out.replace(",", " ").split()
    return words[words.index("version") + 1] if "version" in words[:-1] else "unknown"
