"""What a Keylime verifier takes from tvorch, and what it adds to `tvorch attest`.

    .venv/bin/python benchmarks/keylime_submit.py [--name tvorch-demo] [--config FILE] [--runs 10] [--quick]

Starts a real Keylime 7.14.3 verifier on 127.0.0.1 (tests/keylime_verifier.py:
the cached venv, SQLite in a temp dir), then, against a running tvorch VM whose
guest agent answers (`make demo` leaves one):

  (1) submissions per second one verifier takes from tvorch: the guest boot
      evidence of one real `tvorch attest`, with the instance's exported
      tpm_policy and measured-boot reference state, POSTed one after another
      over loopback (a new TLS connection each, as tvorch does) for a bounded
      number of submissions; beside it, the same loop against a tpm_policy
      only (no event log), the cheapest evidence Keylime judges.
  (2) `tvorch attest NAME` with keylime.verifier_url set (guest boot and host
      quote submitted, verdicts recorded) against the reference run without
      it, interleaved run by run: both medians and the ratio.

--quick: 3 attest runs and 50 submissions; --smoke (what `make test` runs): 1
and 5. The VM's events gain "keylime-valid".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.keylime_verifier import keylime_verifier  # noqa: E402
from tvorch.adapters.keylime import KeylimeClient  # noqa: E402
from tvorch.config import DEFAULT_CONFIG_PATH, load_config  # noqa: E402
from tvorch.core.attestation.keylime import Evidence, evidence_payload  # noqa: E402
from tvorch.service import keylime as service  # noqa: E402
from tvorch.service.node import Node  # noqa: E402

TVORCH = str(Path(sys.executable).parent / "tvorch")
SMOKE_NEEDS = "guest"  # tests/integration/test_benchmarks.py: a running instance, named in $TVORCH_BENCH_GUEST


def attest(config: Path, name: str, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([TVORCH, "--config", str(config), "attest", name, "--nonce", secrets.token_hex(20),
                           "--out", str(out), "--json"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"keylime_submit: tvorch attest exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return elapsed, json.loads(proc.stdout)


def rate(client: KeylimeClient, payload: dict, count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        verdict = client.verify(payload)
        if not verdict.valid:
            raise SystemExit(f"keylime_submit: Keylime judged the evidence invalid: {verdict.failures}")
    return count / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=os.environ.get("TVORCH_BENCH_GUEST", "tvorch-demo"))
    parser.add_argument("--config", default=os.environ.get("TVORCH_CONFIG", DEFAULT_CONFIG_PATH))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--submissions", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="1 attest run, 5 submissions (make test)")
    args = parser.parse_args()
    runs, submissions = (1, 5) if args.smoke else (3, 50) if args.quick else (args.runs, args.submissions)
    base = Path(args.config)
    cfg = load_config(str(base))
    if cfg.keylime.verifier_url:
        raise SystemExit("keylime_submit: give a config without keylime.verifier_url (the reference run)")
    tmp = Path(tempfile.mkdtemp(prefix="tvbench-keylime-"))
    with keylime_verifier(tmp / "verifier") as verifier:
        with_keylime = tmp / "tvorch-keylime.toml"
        with_keylime.write_text(base.read_text() + f'\n[keylime]\nverifier_url = "{verifier.url}"\n'
                                f'ca_file = "{verifier.ca_file}"\n')
        bundle = tmp / "bundle.json"
        _, summary = attest(with_keylime, args.name, bundle)  # warm: AK certified, baseline present
        if not summary.get("keylime", {}).get("guest", {}).get("valid"):
            raise SystemExit(f"keylime_submit: Keylime did not judge the boot valid: {summary.get('keylime')}")
        with_times, without_times = [], []
        for i in range(runs):
            for side in (("with", "without") if i % 2 == 0 else ("without", "with")):
                config, times = (with_keylime, with_times) if side == "with" else (base, without_times)
                times.append(attest(config, args.name, bundle)[0])
            print(f"run {i + 1}/{runs}: attest with Keylime {with_times[-1] * 1000:7.1f} ms   "
                  f"without {without_times[-1] * 1000:7.1f} ms", flush=True)

        doc = json.loads(bundle.read_text())
        g = doc["guest"]
        ev = Evidence(nonce=bytes.fromhex(doc["nonce"]), bank=g["bank"],
                      pcrs={int(k): bytes.fromhex(v) for k, v in g["pcrs"].items()},
                      attest=base64.b64decode(g["attest"]), signature=base64.b64decode(g["signature"]),
                      ak_public=base64.b64decode(g["ak_public"]), ek=doc["vtpm"]["ek_cert_pem"].encode(),
                      eventlog=base64.b64decode(g["eventlog"]))
        node = Node(cfg)
        try:
            tpm = service.instance_policy(node, args.name, "tpm")
            mb = service.instance_policy(node, args.name, "mb")
        finally:
            node.close()
        client = KeylimeClient(verifier.url, str(verifier.ca_file))
        full = rate(client, evidence_payload(ev, tpm, mb), submissions)
        pcr_only = rate(client, evidence_payload(ev, tpm), submissions)
    a, b = statistics.median(with_times), statistics.median(without_times)
    print(f"\n(1) one Keylime verifier, loopback, {submissions} sequential submissions each:")
    print(f"    boot evidence + tpm_policy + measured-boot state  {full:7.1f} /s  ({1000 / full:5.1f} ms each)")
    print(f"    tpm_policy only (the reference)                    {pcr_only:7.1f} /s  ({1000 / pcr_only:5.1f} ms each)")
    print(f"(2) tvorch attest with Keylime     {a * 1000:8.1f} ms median")
    print(f"    tvorch attest without (ref.)   {b * 1000:8.1f} ms median")
    print(f"    ratio with/without: {a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
