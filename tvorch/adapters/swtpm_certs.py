"""swtpm_setup's ``create_certs_tool``: EK certificates from the node CA.

swtpm_setup (0.7) runs the program its config names once per EK it creates
(a TPM 2 always gets an RSA 2048 and an ECC P-384 EK), with::

    --type ek --ek HEX | --ek x=HEX,y=HEX[,id=CURVE] --dir DIR --vmid ID
    --tpm-spec-family 2.0 --tpm-spec-level 0 --tpm-spec-revision 164
    --tpm-manufacturer id:00001014 --tpm-model swtpm --tpm-version id:20191023
    --tpm2 --configfile FILE --optsfile FILE [--logfile FILE]
    [--allow-signing] [--decryption]

(``--type platform`` too with --create-platform-cert, which tvorch does not
ask for yet), and expects DIR/ek.cert (DER), which it writes into the TPM's
NV. The RSA exponent is not passed: a TPM EK's is always 65537.

The node state directory comes from the ``--configfile`` that
``tvorch.adapters.vtpm_manufacture`` writes (``node_state_dir = PATH``), so
nothing travels in the environment. Errors: one line on stderr, exit 1;
swtpm_setup shows that line and fails.
"""

from __future__ import annotations

import argparse
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.core.ekcert import EkPublicKey, TpmSpecification, issue_ek_certificate
from tvorch.errors import TvorchError

NODE_STATE_DIR_KEY = "node_state_dir"
EK_CERT_FILE = "ek.cert"
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
    return p


def run(argv: list[str]) -> None:
    """Serve one swtpm_setup request: write DIR/ek.cert signed by the node CA."""
    args, _unknown = _parser().parse_known_args(argv)  # later swtpm versions may add options
    if args.type != "ek":
        raise CertToolError(f"certificate type '{args.type}' is not supported (only 'ek')")
    if not args.tpm2:
        raise CertToolError("only TPM 2 EK certificates are supported")
    if args.allow_signing:
        raise CertToolError("signing EKs are not supported (a TCG EK only decrypts)")
    config = read_config(args.configfile)
    if NODE_STATE_DIR_KEY not in config:
        raise CertToolError(f"{args.configfile} names no {NODE_STATE_DIR_KEY}")
    ek = parse_ek(args.ek)
    from tvorch.adapters.node_keys import load_or_create  # after the cheap checks

    identity = load_or_create(Path(config[NODE_STATE_DIR_KEY]), socket.gethostname())
    cert = issue_ek_certificate(
        identity.ca_key, identity.ca_cert, ek,
        args.tpm_manufacturer, args.tpm_model, args.tpm_version,
        None, datetime.now(timezone.utc),
        tpm_spec=TpmSpecification(args.tpm_spec_family, args.tpm_spec_level, args.tpm_spec_revision),
    )
    try:
        (args.dir / EK_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.DER))
    except OSError as err:
        raise CertToolError(f"cannot write {args.dir / EK_CERT_FILE}: {err.strerror}") from None


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
