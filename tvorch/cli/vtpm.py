"""`tvorch vtpm manufacture`: make a vTPM state by hand, for developers and operators.

Launch will do this itself; the command lets one inspect what a vTPM made by
this node looks like (its EK certificate, issued by the node CA) and try the
state with swtpm or libvirt directly.
"""

from __future__ import annotations

from pathlib import Path

import click

from .common import Context, emit, json_option, pass_ctx
from .gate import vtpm


@vtpm.command(name="manufacture")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vmid", required=True, metavar="ID", help="Passed to swtpm_setup and its certificate tool.")
@click.option("--owner", default="tss", show_default=True, help="User the state is handed to (when root).")
@json_option
@pass_ctx
def vtpm_manufacture(ctx: Context, directory: Path, vmid: str, owner: str, as_json: bool) -> None:
    """Manufacture a TPM 2 state in DIR whose EK certificates the node CA issued."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ..adapters.vtpm_manufacture import manufacture

    made = manufacture(directory, Path(ctx.node.cfg.state_dir), vmid, owner)
    pems = {name: x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
            for name, der in made.ek_certs.items()}
    emit(as_json,
         {"state_dir": str(directory), "vmid": vmid, "ek_fingerprint": made.ek_fingerprint,
          "ek_public_pem": made.ek_public_pem.decode(), "ek_certificates_pem": pems},
         lambda: "\n".join([f"state:          {directory}", f"EK fingerprint: sha256:{made.ek_fingerprint}",
                            *(f"{name}:\n{pem.rstrip()}" for name, pem in pems.items())]))
