import json

import pytest

from tvorch.core.attestation.hostpolicy import (
    HostEvidence,
    HostPolicy,
    judge_host,
    parse_policy,
    policy_to_json,
)
from tvorch.errors import ConfigError

A, B, C = "a" * 64, "b" * 64, "c" * 64
REQUIRED = ("/usr/bin/qemu-system-x86_64", "/usr/bin/swtpm")


def policy(**over) -> HostPolicy:
    base = dict(bank="sha256", pcrs={0: A, 7: B}, ima_allowlist={"/usr/bin/swtpm": frozenset({C})},
                ima_required=REQUIRED)
    return HostPolicy(**{**base, **over})


def evidence(**over) -> HostEvidence:
    base = dict(quoted_pcrs={0: A, 7: B, 10: C}, quote_problem=None, eventlog_pcrs={0: A, 7: B},
                eventlog_problem=None, ima_pcr=C, ima_problems=())
    return HostEvidence(**{**base, **over})


def test_clean_evidence_passes():
    assert judge_host(policy(), evidence(), REQUIRED) == ()


def test_every_failure_is_listed():
    failures = judge_host(
        policy(),
        evidence(quoted_pcrs={0: B, 7: B, 10: A}, eventlog_pcrs={0: A, 7: B}, ima_problems=("/tmp/x not allowed",)),
        REQUIRED + ("/usr/sbin/libvirtd",),
    )
    text = "\n".join(failures)
    assert "PCR 0: quoted" in text  # against the policy
    assert "PCR 0: event log replays" in text  # against the log
    assert "IMA: /tmp/x not allowed" in text
    assert "PCR 10: IMA log replays" in text
    assert "does not require /usr/sbin/libvirtd" in text
    assert len(failures) == 5


def test_a_failed_quote_makes_pcr_comparisons_moot():
    failures = judge_host(policy(), evidence(quoted_pcrs={}, quote_problem="nonce differs"), REQUIRED)
    assert failures == ("quote: nonce differs",)


def test_selection_not_covering_the_policy():
    failures = judge_host(policy(pcrs={0: A, 7: B, 4: C}), evidence(), REQUIRED)
    assert failures == ("PCR 4: the policy needs it but the quote does not cover it",)


def test_unusable_logs_are_failures_not_crashes():
    failures = judge_host(policy(), evidence(eventlog_pcrs=None, eventlog_problem="truncated at byte 12",
                                             ima_pcr=None, ima_problems=("truncated entry 3",)), REQUIRED)
    assert failures == ("event log: truncated at byte 12", "IMA: truncated entry 3")


def test_policy_file_round_trip_and_is_stable():
    p = policy()
    data = policy_to_json(p)
    assert parse_policy(data) == p
    assert policy_to_json(parse_policy(data)) == data


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.update(extra=1), "top level"),
    (lambda d: d.pop("ima"), "top level"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["pcrs"].update({"24": A}), "pcrs.24"),
    (lambda d: d["pcrs"].update({"²": A}), "pcrs.²"),  # str.isdigit, but int() refuses it
    (lambda d: d["pcrs"].update({"1" * 5000: A}), "pcrs." + "1" * 24),  # more digits than int() takes
    (lambda d: d["pcrs"].update({"1": "XYZ"}), "pcrs.1"),
    (lambda d: d["ima"]["allowlist"].update({"/x": "abc"}), "ima.allowlist./x"),
    (lambda d: d["ima"].update(required="/usr/bin/swtpm"), "ima.required"),
])
def test_malformed_policy_is_refused_by_key(mutate, where):
    doc = json.loads(policy_to_json(policy()))
    mutate(doc)
    with pytest.raises(ConfigError, match=f"'{where}'"):
        parse_policy(json.dumps(doc).encode())


def test_not_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_policy(b"{", "policy.json")
