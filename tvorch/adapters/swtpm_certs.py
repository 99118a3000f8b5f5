"""swtpm_setup's ``create_certs_tool``: EK and platform certificates from the node CA.

swtpm_setup (0.7) runs the program its config names once per EK it creates
(a TPM 2 always gets an RSA 2048 and an ECC P-384 EK), with::

    --type ek --ek HEX | --ek x=HEX,y=HEX[,id=CURVE] --dir DIR --vmid ID
    --tpm-spec-family 2.0 --tpm-spec-level 0 --tpm-spec-revision 164
    --tpm-manufacturer id:00001014 --tpm-model swtpm --tpm-version id:20191023
    --tpm2 --configfile FILE --optsfile FILE [--logfile FILE]
    [--allow-signing] [--decryption]

and expects DIR/ek.cert (DER), which it writes into the TPM's NV. The RSA
exponent is not passed: a TPM EK's is always 65537.

With ``--create-platform-cert`` it runs the program once more, right after
the RSA EK's run and with the very same arguments but ``--type platform``
(so ``--ek`` is the RSA EK and DIR still holds its ek.cert), and expects
DIR/platform.cert (DER), which it writes to NV index 0x01c08000. It passes
no platform options: those come from the ``--optsfile`` (one
``--option value`` a line, as swtpm_localca reads it), where
``tvorch.adapters.vtpm_manufacture`` puts ``--platform-manufacturer``,
``--platform-model`` and ``--platform-version``; options on the command
line win. The certificate (``tvorch.core.vtpm.platformcert``) names DIR/ek.cert
as its holder and ``--vmid`` as the platform serial. swtpm_setup keeps no
copy of it, so the tool also writes one into the config's ``collect_dir``.

The node state directory comes from the ``--configfile`` that
``tvorch.adapters.vtpm_manufacture`` writes (``node_state_dir = PATH``), so
nothing travels in the environment. Errors: one line on stderr, exit 1;
swtpm_setup shows that line and fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.core.vtpm.ekcert import EkPublicKey, TpmSpecification, issue_ek_certificate, verify_ek_certificate
from tvorch.core.vtpm.platformcert import DEFAULT_MANUFACTURER, DEFAULT_MODEL, Platform, issue_platform_certificate
from tvorch.errors import TvorchError

NODE_STATE_DIR_KEY = "node_state_dir"
COLLECT_DIR_KEY = "collect_dir"  # where the tool leaves a copy of the platform certificate
EK_CERT_FILE = "ek.cert"
PLATFORM_CERT_FILE = "platform.cert"
_RSA_EXPONENT = 65537  # TPM2_Create with exponent 0 means 2**16 + 1; EK templates use 0
# TPM2 ECC curve names swtpm_setup passes as id=...; absent means secp256r1.
_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}


class CertToolError(TvorchError):
    """A request from swtpm_setup this tool cannot serve."""


def parse_ek(value: str) -> EkPublicKey:
    """The EK public key from swtpm_setup's --ek: an RSA modulus in hex, or x=..,y=..[,id=curve]."""
    try:
        if "=" not in value:
            modulus = int(value, 16)
            if modulus.bit_length() < 2048:
                raise CertToolError(f"RSA EK modulus has {modulus.bit_length()} bits; at least 2048 expected")
            return rsa.RSAPublicNumbers(_RSA_EXPONENT, modulus).public_key()
        fields = dict(part.split("=", 1) for part in value.split(","))
        curve_name = fields.get("id", "secp256r1")
        curve = _CURVES.get(curve_name)
        if curve is None:
            raise CertToolError(f"unsupported ECC curve '{curve_name}'")
        return ec.EllipticCurvePublicNumbers(int(fields["x"], 16), int(fields["y"], 16), curve).public_key()
    except (ValueError, KeyError) as err:
        raise CertToolError(f"malformed --ek value: {err}") from None


def read_config(path: Path) -> dict[str, str]:
    """``key = value`` lines (the swtpm-localca.conf syntax); '#' starts a comment."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CertToolError(f"cannot read {path}: {err.strerror}") from None
    config: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            if not sep:
                raise CertToolError(f"{path}: not 'key = value': {line!r}")
            config[key.strip()] = value.strip()
    return config


def read_options(path: Path) -> list[str]:
    """The optsfile's arguments: ``--option value`` a line (the value may hold spaces); '#' lines are comments."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CertToolError(f"cannot read {path}: {err.strerror}") from None
    args: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            args += [option, value.strip()] if value.strip() else [option]
    return args


def tvorch_version() -> str:
    """The installed tvorch's version: the default platform version."""
    try:
        return importlib.metadata.version("tvorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, not argparse's usage block
        raise CertToolError(f"bad arguments from swtpm_setup: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tvorch.adapters.swtpm_certs", add_help=False)
    p.add_argument("--type", required=True)
    p.add_argument("--ek", required=True)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--vmid", default="")
    p.add_argument("--configfile", required=True, type=Path)
    p.add_argument("--optsfile")
    p.add_argument("--logfile")
    p.add_argument("--tpm2", action="store_true")
    p.add_argument("--tpm-spec-family", default="2.0")
    p.add_argument("--tpm-spec-level", type=int, default=0)
    p.add_argument("--tpm-spec-revision", type=int, default=0)
    p.add_argument("--tpm-manufacturer", default="id:00001014")
    p.add_argument("--tpm-model", default="swtpm")
    p.add_argument("--tpm-version", default="id:20191023")
    p.add_argument("--allow-signing", action="store_true")
    p.add_argument("--decryption", action="store_true")
    p.add_argument("--platform-manufacturer", default=DEFAULT_MANUFACTURER)
    p.add_argument("--platform-model", default=DEFAULT_MODEL)
    p.add_argument("--platform-version", default=None)
    return p


def run(argv: list[str]) -> None:
    """Serve one swtpm_setup request: DIR/ek.cert or DIR/platform.cert, signed by the node CA."""
    args, _unknown = _parser().parse_known_args(argv)  # later swtpm versions may add options
    if args.type not in ("ek", "platform"):
        raise CertToolError(f"certificate type '{args.type}' is not supported (only 'ek' and 'platform')")
    if args.optsfile:  # its options first, so the command line's win
        args, _unknown = _parser().parse_known_args([*read_options(Path(args.optsfile)), *argv])
    if not args.tpm2:
        raise CertToolError(f"only TPM 2 {args.type} certificates are supported")
    if args.type == "ek" and args.allow_signing:
        raise CertToolError("signing EKs are not supported (a TCG EK only decrypts)")
    config = read_config(args.configfile)
    if NODE_STATE_DIR_KEY not in config:
        raise CertToolError(f"{args.configfile} names no {NODE_STATE_DIR_KEY}")
    ek = parse_ek(args.ek)
    from tvorch.adapters.node_keys import load_or_create  # after the cheap checks

    identity = load_or_create(Path(config[NODE_STATE_DIR_KEY]), socket.gethostname())
    now = datetime.now(timezone.utc)
    if args.type == "platform":
        der = _platform_certificate(args, ek, identity.ca_key, identity.ca_cert, now)
        _write(args.dir / PLATFORM_CERT_FILE, der)
        if COLLECT_DIR_KEY in config:
            _write(Path(config[COLLECT_DIR_KEY]) / PLATFORM_CERT_FILE, der)
        return
    cert = issue_ek_certificate(
        identity.ca_key, identity.ca_cert, ek,
        args.tpm_manufacturer, args.tpm_model, args.tpm_version,
        None, now,
        tpm_spec=TpmSpecification(args.tpm_spec_family, args.tpm_spec_level, args.tpm_spec_revision),
    )
    _write(args.dir / EK_CERT_FILE, cert.public_bytes(serialization.Encoding.DER))


def _platform_certificate(args: argparse.Namespace, ek: EkPublicKey, ca_key: ec.EllipticCurvePrivateKey,
                          ca_cert: x509.Certificate, now: datetime) -> bytes:
    """The platform certificate whose holder is DIR/ek.cert, the certificate of the EK in --ek."""
    ek_file = args.dir / EK_CERT_FILE
    try:
        ek_cert = x509.load_der_x509_certificate(ek_file.read_bytes())
    except OSError as err:
        raise CertToolError(f"cannot read {ek_file} (the platform certificate names the EK certificate "
                            f"swtpm_setup had made just before): {err.strerror}") from None
    except ValueError as err:
        raise CertToolError(f"{ek_file} is not a DER certificate: {err}") from None
    if _spki(ek_cert.public_key()) != _spki(ek):
        raise CertToolError(f"{ek_file} certifies another key than the EK in --ek")
    verify_ek_certificate(ek_cert, ca_cert, now)  # a certificate of this node's CA, or no platform certificate
    platform = Platform(args.platform_manufacturer, args.platform_model,
                        args.platform_version or tvorch_version(), args.vmid or None)
    try:
        return issue_platform_certificate(ca_key, ca_cert, ek_cert, platform, now)
    except ValueError as err:
        raise CertToolError(f"cannot issue the platform certificate: {err}") from None


def _spki(key: object) -> bytes:
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise CertToolError(f"an EK is an RSA or ECC key, not {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as err:
        raise CertToolError(f"cannot write {path}: {err.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    """Exit status for swtpm_setup: 0, or 1 with one line on stderr."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except TvorchError as err:
        print(f"tvorch swtpm_certs: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, but swtpm_setup must still get one line
        print(f"tvorch swtpm_certs: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
