"""The parser of the test guest's serial report (tests/integration/guest.py).

Checked on serial logs captured from real boots of the guest (tests/data/guest-serial,
README.txt there says how), plus the malformed reports the guest should never print.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from tests.integration.guest import (
    PREFIX,
    GuestReport,
    NvMarker,
    parse_report,
    wait_for_ready,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "guest-serial"


def report(name: str) -> GuestReport:
    return parse_report((DATA / name).read_text(errors="replace"))


def test_first_boot_prints_the_ek_certificate_and_stores_the_marker():
    first = report("first-boot.log")
    assert first.tpm_present
    assert first.ek_cert == (DATA / "ek-rsa2048.der").read_bytes()
    assert first.ek_cert_error is None
    assert first.nv == NvMarker("stored", "27d062a4f63e5ca551f2dc38aab27705")
    # What was there before still parses, from around the new lines.
    assert sorted(first.pcrs) == list(range(10))
    assert first.eventlog[32:48] == b"Spec ID Event03\0"
    assert first.secure_boot == "unknown"


def test_ek_certificate_is_the_vtpm_ek_certificate():
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives.asymmetric import rsa

    cert = x509.load_der_x509_certificate(report("first-boot.log").ek_cert)
    assert cert.issuer.rfc4514_string() == "CN=swtpm-localca"
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    # TCG EK certificate: extended key usage tcg-kp-EKCertificate (2.23.133.8.1).
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u.dotted_string for u in eku] == ["2.23.133.8.1"]


def test_second_boot_finds_the_marker_the_first_stored():
    first, second = report("first-boot.log"), report("second-boot.log")
    assert second.nv == NvMarker("found", first.nv.value)
    assert second.nv == ("found", first.nv[1])  # a plain tuple compares too
    assert second.ek_cert == first.ek_cert
    # Same firmware, same configuration: the early-boot PCRs repeat.
    assert second.pcrs == first.pcrs


def test_no_ek_certificate_index():
    r = report("no-ek-cert.log")
    assert r.tpm_present and r.ek_cert is None and r.ek_cert_error is None
    assert r.nv.kind == "stored" and len(r.nv.value) == 32


def test_nv_error_is_one_line_from_the_guest():
    r = report("nv-error.log")
    assert r.ek_cert is not None  # another state, another certificate
    assert r.nv == NvMarker(
        "error",
        "nvread: Requested to read more bytes than available from offset, offset=0, "
        "request-read-size=16 actual-data-size=8",
    )


def test_no_tpm():
    r = report("no-tpm.log")
    assert not r.tpm_present and r.pcrs == {} and r.eventlog == b""
    assert r.ek_cert is None and r.ek_cert_error is None
    assert r.nv == NvMarker("error", "no TPM device")


def test_tpm12_fails_at_getcap_for_both():
    r = report("tpm12.log")
    assert r.tpm_present and r.ek_cert is None
    assert r.ek_cert_error.startswith("getcap: Esys_GetCapability(0x80001)")
    assert r.nv == NvMarker("error", r.ek_cert_error)


def test_report_of_an_older_guest_has_neither():
    """A guest built before tpm2-tools printed no ekcert or nv lines."""
    lines = (DATA / "first-boot.log").read_text(errors="replace").splitlines()
    stripped = [line.rstrip("\r") for line in lines]
    begin = stripped.index(f"{PREFIX}ekcert-begin")
    end = stripped.index(f"{PREFIX}nv stored 27d062a4f63e5ca551f2dc38aab27705")
    old = parse_report("\n".join(stripped[:begin] + stripped[end + 1:]))
    assert old.ek_cert is None and old.ek_cert_error is None and old.nv is None
    assert old.pcrs == report("first-boot.log").pcrs


def _synthetic(*lines: str) -> str:
    return "\r\n".join([f"{PREFIX}boot x", *lines, f"{PREFIX}ready"]) + "\r\n"


@pytest.mark.parametrize(
    "lines",
    [
        (f"{PREFIX}ekcert-begin", "AAAA"),                              # no end marker
        (f"{PREFIX}ekcert-begin", "AA*A", f"{PREFIX}ekcert-end"),      # not base64
        (f"{PREFIX}nv stored 00",),                                     # short value
        (f"{PREFIX}nv found 27D062A4F63E5CA551F2DC38AAB27705",),        # not as the guest prints
        (f"{PREFIX}nv kept 27d062a4f63e5ca551f2dc38aab27705",),         # unknown kind
        (f"{PREFIX}nv",),
    ],
)
def test_malformed_reports_are_refused(lines):
    with pytest.raises(ValueError):
        parse_report(_synthetic(*lines))


def test_synthetic_round_trip():
    der = bytes(range(256)) * 3
    body = base64.encodebytes(der).decode().splitlines()
    r = parse_report(_synthetic(f"{PREFIX}ekcert-begin", *body, f"{PREFIX}ekcert-end",
                                f"{PREFIX}nv error nvdefine: the TPM said no"))
    assert r.ek_cert == der
    assert r.nv == NvMarker("error", "nvdefine: the TPM said no")


def test_wait_for_ready_reads_the_log(tmp_path: Path):
    log = tmp_path / "console.log"
    log.write_bytes((DATA / "second-boot.log").read_bytes())
    start = time.monotonic()
    assert wait_for_ready(log, timeout=5) == report("second-boot.log")
    assert time.monotonic() - start < 1
