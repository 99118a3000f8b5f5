"""core.attestation.keylime: tvorch's evidence and policies in Keylime 7.14's formats, on bytes and dicts."""

import json
import struct
from pathlib import Path

import pytest

from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.attestation.hostpolicy import DEFAULT_EXCLUDES, HostPolicy
from tvorch.core.attestation.keylime import (
    Evidence,
    evidence_payload,
    expected_pcrs,
    import_runtime_policy,
    manifest_prediction,
    mb_refstate,
    parse_answer,
    pcr_blob,
    quote_string,
    runtime_policy,
    tpm_policy,
)
from tvorch.core.boot.prediction import PredictedEvent, Prediction
from tvorch.errors import ConfigError, EvidenceError

DATA = Path(__file__).resolve().parent.parent / "data" / "eventlogs"
A, B, C = "a" * 64, "b" * 64, "c" * 64


def blob_values(blob: bytes) -> tuple[int, int, list[bytes]]:
    """Keylime's own reading of the blob (keylime/tpm/tpm_util.py __get_pcrs_from_blob), restated."""
    (count,) = struct.unpack_from("<I", blob, 0)
    alg, size = struct.unpack_from("<HB", blob, 4)
    select = int.from_bytes(blob[7:10], "little")
    o = 4 + 16 * 8
    (lists,) = struct.unpack_from("<I", blob, o)
    o += 4
    values = []
    for _ in range(lists):
        o += 4
        for _ in range(8):
            (sz,) = struct.unpack_from("<H", blob, o)
            values.append(blob[o + 2:o + 2 + sz]) if sz else None
            o += 66
    assert o == len(blob) and count == 1 and size == 3
    return alg, select, values


def test_pcr_blob_is_what_tpm2_quote_writes():
    pcrs = {i: bytes([i]) * 32 for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)}
    alg, select, values = blob_values(pcr_blob("sha256", pcrs))
    assert alg == 0x000B and select == sum(1 << i for i in pcrs)
    assert values == [pcrs[i] for i in sorted(pcrs)]  # in PCR order, 8 per TPML_DIGEST
    assert quote_string(b"att", b"sig", "sha256", pcrs).startswith("rYXR0:c2ln:")


def test_tpm_policy_names_every_pcr_with_a_mask():
    assert tpm_policy({0: [A], 7: [B.upper()]}) == {"mask": "0x81", "0": [A], "7": [B]}


def test_expected_pcrs_prefers_the_signed_prediction_and_refuses_an_unknown_pcr():
    prediction = Prediction((PredictedEvent(4, "EV_SEPARATOR", C, "separator"),), {4})
    manifest = {"boot_prediction": {**prediction.to_json(), "status": "predicted", "not_predicted": {}}}
    predicted = manifest_prediction(manifest)
    assert predicted == {4: prediction.pcrs[4]}
    got = expected_pcrs((0, 4), {0: A, 4: B}, predicted)
    assert got[0] == [A] and got[4] == [prediction.pcrs[4]] and got[4] != [B]
    assert manifest_prediction({"boot_prediction": {"status": "unavailable", "reason": "no GPT"}}) is None
    assert manifest_prediction({}) is None
    with pytest.raises(EvidenceError, match="quoted PCR 9"):
        expected_pcrs((0, 9), {0: A})


def evidence(**over) -> Evidence:
    base = dict(nonce=b"n" * 20, bank="sha256", pcrs={0: bytes(32), 7: bytes(32)}, attest=b"a", signature=b"s",
                ak_public=b"k", ek=b"e")
    return Evidence(**{**base, **over})


def test_payload_refuses_a_policy_that_leaves_a_quoted_pcr_unnamed():
    """Keylime calls a badly signed quote valid under a tpm_policy naming no PCR: never send one."""
    with pytest.raises(EvidenceError, match=r"unnamed"):
        evidence_payload(evidence(), {"mask": "0x0"})
    with pytest.raises(EvidenceError, match=r"\[7\]"):
        evidence_payload(evidence(), tpm_policy({0: [A]}))
    body = evidence_payload(evidence(), tpm_policy({0: [A], 7: [B]}))
    assert body["type"] == "tpm" and json.loads(body["data"]["tpm_policy"])["7"] == [B]
    assert body["data"]["nonce"] == "bm5ubm5ubm5ubm5ubm5ubm5ubm4="  # base64: Keylime decodes it


def test_answers_parse_into_a_verdict():
    ok = parse_answer(200, json.dumps({"code": 200, "results": {"valid": True, "failures": []}}).encode())
    assert ok.valid and ok.failures == ()
    bad = parse_answer(200, json.dumps({"results": {"valid": False, "failures": [
        {"type": "pcr_validation.invalid_pcr_4", "context": {"got": "x"}}]}}).encode())
    assert not bad.valid and bad.failures == ('pcr_validation.invalid_pcr_4: {"got": "x"}',)
    with pytest.raises(EvidenceError, match="HTTP 500"):
        parse_answer(500, b"Internal Server Error")


def host_policy() -> HostPolicy:
    return HostPolicy("sha256", {0: A}, {"/usr/bin/swtpm": frozenset({B}), "/usr/bin/qemu": frozenset({C, A})},
                      ("/usr/bin/swtpm",), DEFAULT_EXCLUDES)


def test_runtime_policy_round_trip():
    doc = runtime_policy(host_policy())
    assert doc["digests"]["/usr/bin/qemu"] == sorted([A, C]) and doc["meta"] == {"version": 1, "generator": 2}
    back = import_runtime_policy(json.dumps(doc).encode(), host_policy(), "p.json")
    assert back == host_policy()


def test_import_refuses_what_tvorch_cannot_hold():
    doc = runtime_policy(host_policy())
    for change, message in ((dict(excludes=["^/opt/.*"]), "not a glob tvorch wrote"),
                            (dict(keyrings={"ima": [A]}), "'keyrings'"),
                            (dict(digests={"/x": ["XYZ"]}), "lowercase hex")):
        with pytest.raises(ConfigError, match=message):
            import_runtime_policy(json.dumps({**doc, **change}).encode(), host_policy(), "p.json")
    with pytest.raises(ConfigError, match="not a Keylime runtime policy"):
        import_runtime_policy(b"{}", host_policy(), "p.json")


def test_mb_refstate_has_the_keylime_policy_shape():
    ref = mb_refstate(parse_event_log((DATA / "uefi-crb.bin").read_bytes()))
    assert set(ref) == {"has_secureboot", "scrtm_and_bios", "pk", "kek", "db", "dbx", "vendor_db", "mokdig",
                        "mokxdig", "kernels"}
    assert ref["has_secureboot"] is False and ref["scrtm_and_bios"][0]["platform_firmware"]
    assert all(d["sha256"].startswith("0x") for d in ref["scrtm_and_bios"][0]["platform_firmware"])
    secure = mb_refstate(parse_event_log((DATA / "uefi-secureboot.bin").read_bytes()))
    assert secure["has_secureboot"] is True


def test_config_keys_are_checked():
    from tvorch.config import parse_config

    cfg = parse_config(b'[keylime]\nverifier_url = "https://kl.fleet:8881"\nca_file = "/etc/tvorch/kl-ca.pem"\n')
    assert cfg.keylime.verifier_url == "https://kl.fleet:8881" and cfg.keylime.timeout == 10
    assert parse_config(b"").keylime.verifier_url == ""  # default: off
    for text, message in ((b'[keylime]\nverifier_url = "http://kl:8881"', "TLS only"),
                          (b'[keylime]\nca_file = "ca.pem"', "absolute path"),
                          (b'[keylime]\ntimeout = 0', "at least 1"),
                          (b'[keylime]\nurl = "https://x"', "unknown config key 'keylime.url'")):
        with pytest.raises(ConfigError, match=message):
            parse_config(text)


def test_an_unreachable_verifier_queues_the_submission_and_backs_off(tmp_path: Path):
    import os
    import stat
    import time

    from tvorch.adapters.retry import keylime_backoff
    from tvorch.config import parse_config
    from tvorch.service import keylime as service
    from tvorch.logs import configure_logging
    from tvorch.service.node import Node

    configure_logging("warning")  # to this test's stderr: an earlier CLI test may have left a closed one
    cfg = parse_config(f'state_dir = "{tmp_path}/state"\n[keylime]\nverifier_url = "https://127.0.0.1:9"\n'
                       f'timeout = 2\n'.encode())
    node = Node(cfg)
    try:
        done = service.submit(node, "host", {"type": "tpm", "data": {}})
        assert done.verdict is None and "unreachable" in (done.queued or "")
        queued = list((tmp_path / "state/keylime/pending").iterdir())
        assert len(queued) == 1 and stat.S_IMODE(os.stat(queued[0]).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(queued[0].parent).st_mode) == 0o700
        status = service.pending(cfg)
        assert status["pending"] == 1 and status["enabled"] and "unreachable" in status["last_error"]
        assert service.retry_pending(node, now=time.time()) == 0  # not yet: its backoff has not passed
        assert json.loads(queued[0].read_text())["attempts"] == 1
        later = time.time() + keylime_backoff(1) + 1
        assert service.retry_pending(node, now=later) == 0  # still down: tried again, backs off further
        item = json.loads(queued[0].read_text())
        assert item["attempts"] == 2 and item["next_at"] >= later + keylime_backoff(2) - 1
    finally:
        node.close()
    assert keylime_backoff(1) == 30 and keylime_backoff(2) == 60 and keylime_backoff(20) == 3600
